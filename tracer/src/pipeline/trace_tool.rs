//! The slab tracer on the shared loop (`event_loop.rs`): what each drain,
//! poll, refresh and key or scrape does to the session, and how each report
//! is shown: the TUI, text or JSON lines through `output/stdout.rs`, the
//! Prometheus endpoint, and the files at the end.

use std::{io::IsTerminal, sync::Arc};

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};

use crate::{
    output,
    output::stdout::{self, Printed},
    pipeline::event_loop::{self, Flow, Signals, Sources, Tool},
    pipeline::trace_options::TraceOptions,
    present::tui::{self, Tui},
    present::view::{self, TextOptions},
    slab::probes::Probes,
    slab::report::Report,
    slab::session::Session,
};

/// The slab tracer on the shared loop until it ends; returns the ring so
/// the run can drain what arrived before detaching. Errors: the terminal
/// cannot be set up for --top, a snapshot cannot be printed.
pub async fn run_loop(
    args: &TraceOptions,
    ring: RingBuf<MapData>,
    probes: &mut Probes,
    state: &mut Session,
    metrics: Option<tokio::net::TcpListener>,
    signals: Signals,
    snapshots: Option<std::fs::File>,
) -> Result<RingBuf<MapData>> {
    let poll = if state.kheap_rate().is_some() {
        event_loop::SPARSE_POLL
    } else {
        event_loop::POLL
    };
    let src = Sources::with_signals(ring, args.run.interval, args.run.duration, signals, poll)?;
    let tty = std::io::stdout().is_terminal();
    // The interactive view only where a person watches; JSON and pipes get lines.
    let tui = if args.run.top && tty && !args.run.json {
        Some(Tui::start(args.sort, args.frames)?)
    } else {
        None
    };
    if let Some(listener) = &metrics {
        // Under the TUI stderr would scribble over the screen; the flag says where.
        if tui.is_none() {
            let local = listener
                .local_addr()
                .map_or_else(|_| "?".to_string(), |a| a.to_string());
            eprintln!("leaktrace: serving Prometheus metrics at http://{local}/metrics");
        }
    }
    let mut tool = SlabTool {
        args,
        probes,
        state,
        text_opts: text_options(args, Some(args.frames)),
        tui,
        metrics,
        metrics_body: Arc::from(""),
        refreshes: 0,
        requests: snapshots.as_ref().map(|_| {
            tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(tokio::io::stdin()))
        }),
        snapshots,
    };
    let ring = event_loop::run(src, &mut tool).await;
    // Leave the alternate screen before the final report prints.
    drop(tool);
    ring
}

/// The slab tracer on the shared loop.
struct SlabTool<'a> {
    args: &'a TraceOptions,
    probes: &'a mut Probes,
    state: &'a mut Session,
    text_opts: TextOptions,
    tui: Option<Tui>,
    metrics: Option<tokio::net::TcpListener>,
    /// Rendered once per refresh and shared with every scrape until the next.
    metrics_body: Arc<str>,
    refreshes: u64,
    /// `--pprof-snapshots`: request lines on stdin, profiles to fd 3.
    requests: Option<tokio::io::Lines<tokio::io::BufReader<tokio::io::Stdin>>>,
    snapshots: Option<std::fs::File>,
}

enum SlabInput {
    Key(tui::Action),
    Scrape(std::io::Result<(tokio::net::TcpStream, std::net::SocketAddr)>),
    Request(std::io::Result<Option<String>>),
}

impl Tool for SlabTool<'_> {
    type Input = SlabInput;

    fn drain(&mut self, ring: &mut RingBuf<MapData>) {
        self.state.drain(ring);
    }

    fn poll(&mut self) {
        self.state.poll(self.probes);
    }

    fn tick(&mut self) -> Result<()> {
        let (args, state) = (self.args, &mut *self.state);
        state.tick(args.pid);
        // Build a report every tick even when nothing is shown: it resolves
        // symbols of the top processes while they are still alive.
        let counters = self.probes.counters().unwrap_or_default();
        let report = state.report("snapshot", counters);
        if self.metrics.is_some() {
            self.metrics_body = Arc::from(output::metrics::render(&report));
        }
        if args.run.top {
            emit_snapshot(args, &report, self.tui.as_mut(), &self.text_opts)?;
        }
        self.refreshes += 1;
        if self.refreshes == 2 {
            crate::pipeline::fault::panic_if_asked("panic-on-second-refresh");
        }
        Ok(())
    }

    async fn input(&mut self) -> SlabInput {
        tokio::select! {
            action = event_loop::unless_absent(self.tui.as_mut().map(|t| t.next_action())) => {
                SlabInput::Key(action)
            }
            conn = event_loop::unless_absent(self.metrics.as_ref().map(|l| l.accept())) => {
                SlabInput::Scrape(conn)
            }
            line = event_loop::unless_absent(self.requests.as_mut().map(|r| r.next_line())) => {
                SlabInput::Request(line)
            }
        }
    }

    fn handle(&mut self, input: SlabInput) -> Result<Flow> {
        match input {
            SlabInput::Key(tui::Action::Quit) => return Ok(Flow::Stop),
            SlabInput::Key(tui::Action::Redraw) => {
                if let Some(t) = self.tui.as_mut() {
                    t.redraw()?;
                }
            }
            SlabInput::Key(tui::Action::Regroup) => {
                self.state.group_by = self.state.group_by.next();
            }
            SlabInput::Key(tui::Action::None) => {}
            // A failed accept (e.g. out of fds) costs one scrape, not the run.
            SlabInput::Scrape(Ok((conn, _))) => {
                tokio::spawn(output::metrics::serve(conn, self.metrics_body.clone()));
            }
            SlabInput::Scrape(Err(_)) => {}
            SlabInput::Request(Ok(Some(line))) => {
                if line.trim() == "snapshot" {
                    self.write_profile()?;
                }
            }
            // The requester is gone: nobody will read another profile.
            SlabInput::Request(Ok(None) | Err(_)) => return Ok(Flow::Stop),
        }
        Ok(Flow::Continue)
    }
}

impl SlabTool<'_> {
    /// One `--all-caches` profile to fd 3: its length (8 bytes,
    /// little-endian), then the gzipped pprof bytes. Errors: fd 3 closed.
    fn write_profile(&mut self) -> Result<()> {
        use std::io::Write;
        let Some(out) = self.snapshots.as_mut() else {
            return Ok(());
        };
        let counters = self.probes.counters().unwrap_or_default();
        let report = self.state.report("profile", counters);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
        // No estimates (not expected of an --all-caches run): still one
        // answer, or the requester waits out its timeout and restarts us.
        let profile = output::kheap_pprof::build(&report, now).unwrap_or_else(|| {
            output::kheap_pprof::empty(self.state.kheap_rate().unwrap_or(0), now)
        });
        let bytes = output::pprof::encode(&profile)?;
        out.write_all(&(bytes.len() as u64).to_le_bytes())
            .and_then(|()| out.write_all(&bytes))
            .and_then(|()| out.flush())
            .context("writing a profile to fd 3 (--pprof-snapshots)")
    }
}

fn emit_snapshot(
    args: &TraceOptions,
    report: &Report,
    tui: Option<&mut Tui>,
    opts: &TextOptions,
) -> Result<()> {
    if let Some(tui) = tui {
        return tui.show(report);
    }
    stdout::print(report, args.run.json, Printed::Snapshot, || {
        let cut = report.cut(args.limit, args.stacks, args.comm.as_deref());
        view::render(&cut, opts)
    })
}

/// Files first, so a closed stdout (e.g. `| head`) cannot cost the profile;
/// then the report, even when a file failed: it is the one output that
/// always reaches the user, and the run still exits non-zero.
pub fn emit_final(
    args: &TraceOptions,
    outputs: &output::Outputs,
    report: &Report,
    patience: &output::files::Patience<'_>,
) -> Result<()> {
    let files = outputs.write(report, patience);
    let printed = stdout::print(report, args.run.json, Printed::Final, || {
        let cut = report.cut(args.limit, args.stacks, args.comm.as_deref());
        view::render(&cut, &text_options(args, None))
    });
    files.and(printed)
}

fn text_options(args: &TraceOptions, frames: Option<usize>) -> TextOptions {
    TextOptions {
        frames,
        sort_label: args.sort.name(),
        interval_s: args.run.interval.as_secs_f64(),
    }
}
