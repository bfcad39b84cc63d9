//! The slab tracer's run: preflight, plan and attach, then the shared loop
//! (`event_loop.rs`) drives the session (`slab::session`: ring buffer ->
//! decoder -> aggregator -> report) and shows each report (TUI, text or
//! JSON, metrics), until Ctrl-C, SIGTERM or --duration; then detach, write
//! the files and print the final report.

use std::{io::IsTerminal, path::Path, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};

use crate::{
    kernel::btf::Btf,
    kernel::features::{self, Features},
    kernel::irq_context,
    kernel::own_memory,
    kernel::procinfo::TracedProcess,
    kernel::tracefs::Tracefs,
    output,
    output::folded::Weight,
    output::stdout::{self, Printed},
    pipeline::event_loop::{self, Flow, Signals, Sources, Tool},
    pipeline::RunOptions,
    present::tui::{self, Tui},
    present::view::{self, TextOptions},
    slab::aggregator::rows::SnapshotOptions,
    slab::caches::{self, Catalogue},
    slab::plan::{self, HookMode},
    slab::probes::{Floor, Probes},
    slab::report::{GroupBy, Report, SortKey},
    slab::session::{cgroup_source, slab_line, Session, Setup},
    slab::zoom,
    symbolize::Symbolizer,
};

/// What the slab tracer is asked for (main.rs fills it from the command line).
#[derive(Debug, Clone)]
pub struct TraceOptions {
    pub run: RunOptions,
    /// Only this process (tgid), filtered in the kernel.
    pub pid: Option<u32>,
    /// Only processes whose command name contains this (text views).
    pub comm: Option<String>,
    /// Processes, stacks under each, and frames per stack in the live view.
    pub limit: usize,
    pub stacks: usize,
    pub frames: usize,
    pub sort: SortKey,
    /// What rows aggregate at start (the live view cycles it).
    pub group_by: GroupBy,
    /// Window of growth and allocation rates.
    pub rate_window: Duration,
    /// Objects the kernel can track at once; None: from the cache's size.
    pub max_objects: Option<u32>,
    /// Where kubelet's pod and container logs are, to name pods.
    pub pods_root: std::path::PathBuf,
    /// Stacks for every allocation instead of 1 in `stack_sample`.
    pub exact: bool,
    pub stack_sample: u64,
    /// Key the exact counts by each allocation's first user frames too.
    pub user_paths: bool,
    pub no_kernel_stacks: bool,
    pub no_user_stacks: bool,
    /// Files written at exit, and their weight.
    pub pprof: Option<std::path::PathBuf>,
    pub folded: Option<std::path::PathBuf>,
    pub flamegraph: Option<std::path::PathBuf>,
    pub weight: Weight,
    /// Prometheus metrics served at this address.
    pub metrics: Option<std::net::SocketAddr>,
    pub hooks: HookMode,
    /// Benchmark floor: empty programs on the same hooks instead of ours.
    pub floor: Option<Floor>,
}

pub async fn run(args: TraceOptions, cache: &str) -> Result<()> {
    let root = Path::new("/");
    features::require_root()?;
    let checked = preflight(&args, root).await?;
    // What the kernel filters on: a thread id given to --pid is its process.
    let args = TraceOptions {
        pid: checked.traced.as_ref().map(|t| t.pid),
        ..args
    };
    let tracefs = Tracefs::locate_or_mount()?;
    let features = Features::detect(root, Some(tracefs.root()));
    let catalogue = Catalogue::read(root).context("reading the slab cache catalogue")?;
    let selection = caches::select(&catalogue, cache)?;
    // Without BTF the raw tracepoints' argument layout cannot be checked; the
    // classic tracepoints still work.
    let btf = Btf::from_sys_fs().ok();
    let plan = plan::build(
        &tracefs,
        btf.as_ref(),
        &catalogue,
        &selection,
        &plan::PlanOptions {
            pid: args.pid,
            kernel_stacks: !args.no_kernel_stacks,
            user_stacks: !args.no_user_stacks,
            hooks: args.hooks,
            stack_sample: if args.exact { 1 } else { args.stack_sample },
            on_demand_maps: features::kernel_at_least(6, 1),
        },
    )?;
    let ringbuf_bytes = crate::pipeline::event_loop::ringbuf_bytes(args.run.ringbuf_mib)?;
    let mut plan = plan;
    // Wake the reader at a quarter full; the poll timer drains smaller batches.
    plan.config.wakeup_bytes = u64::from(ringbuf_bytes / 4);
    // Strata are keyed by the user path only on request: the walk costs more
    // than the rest of a matched allocation (`cargo xtask bench`), and
    // sampling is unbiased without it.
    plan.config.user_fingerprint = u32::from(args.user_paths && !args.no_user_stacks);
    let cgroup_source = cgroup_source(root, btf.as_ref());
    plan.config.task = cgroup_source.task;
    plan.notes.push(cgroup_source.note);
    match irq_context::resolve(btf.as_ref()) {
        Ok(irq) => plan.config.irq = irq,
        Err(why) => plan.notes.push(format!(
            "interrupt context unknown on this kernel ({why}): allocations made in softirq or \
             irq are charged to the interrupted process"
        )),
    }
    // The parsed BTF (~17 MB on 6.18) has done its work: freed before kallsyms
    // is loaded, its pages are reused instead of pinned under it in the heap.
    let have_btf = btf.is_some();
    drop(btf);
    // Before attaching: parsing kallsyms later would stall the first drains.
    let mut symbols = Symbolizer::new();
    symbols.warm_kernel();
    own_memory::return_freed_memory();
    let slab_baseline = slab_line(root, &plan.cache, &selection.aliases_included);
    let max_objects = match args.max_objects {
        Some(n) => n,
        None => {
            let active = slab_baseline.as_ref().map(|l| l.active_objs);
            let n = plan::live_map_entries(active);
            plan.notes.push(format!(
                "sized to track {n} objects at once ({}; --max-objects sets it)",
                active.map_or("/proc/slabinfo unreadable".to_string(), |a| format!(
                    "twice the cache's {a} active objects, 65536 at least"
                ))
            ));
            n
        }
    };
    plan.config.live_bucket_mask =
        plan::live_bucket_mask(max_objects, features::kernel_at_least(5, 12));
    let zoom_policy = zoom::Policy::default();
    plan.config.zoom_window_cap = zoom_policy.kernel_window_cap();
    let (mut probes, ring) = Probes::attach(&plan, max_objects, ringbuf_bytes, args.floor)?;

    if !(args.exact || args.no_kernel_stacks && args.no_user_stacks) {
        plan.notes.push(format!(
            "every object is counted exactly per (process, kernel call site{}); full stacks are \
             captured for each new stratum's first {} allocations per CPU, for a random 1 in {} \
             of the rest, and more often for a while where a stratum's surviving objects drew \
             none (zoom); each draw's probability is recorded, and the drawn objects split those \
             counts into unbiased per-stack estimates with a 95% interval (--exact captures \
             every stack)",
            if plan.config.user_fingerprint != 0 {
                ", first user frames"
            } else {
                ""
            },
            plan.config.census_allocs,
            args.stack_sample.max(1).next_power_of_two()
        ));
    }
    for note in &plan.notes {
        eprintln!("leaktrace: {note}");
    }
    eprintln!(
        "leaktrace: {}",
        plan::hooks_note(&features, &plan.attachments, have_btf)
    );
    eprintln!(
        "leaktrace: attached to {} (bpf prog ids {:?}); Ctrl-C to stop",
        plan.cache,
        probes.program_ids()
    );

    let mut state = Session::new(Setup {
        config: &plan.config,
        max_objects,
        rate_window: args.rate_window,
        zoom_policy,
        symbols,
        cgroup_mount: cgroup_source.mount,
        pods_root: args.pods_root.clone(),
        slab_baseline,
        cache: plan.cache.clone(),
        aliases: selection.aliases_included.clone(),
        snapshot_opts: SnapshotOptions {
            sort: args.sort,
            limit: args.limit,
            stacks: args.stacks,
            comm: args.comm.clone(),
            pid: args.pid,
        },
        traced: checked.traced,
        group_by: args.group_by,
    });

    let outcome = event_loop(
        &args,
        ring,
        &mut probes,
        &mut state,
        checked.metrics,
        checked.signals,
    )
    .await;
    // Any end signal from here on is a second one: it ends a wait for a FIFO's reader.
    let ended = event_loop::EndMark::now();
    // Counters first, then detach, then render: the report states what the
    // kernel side saw up to the moment it stopped.
    let counters = probes.counters().unwrap_or_default();
    drop(probes);
    // A loop that failed (a closed stdout, a terminal error) still leaves
    // everything counted so far: the files and the report get it, then the
    // loop's error is what the run exits with.
    let failed = match outcome {
        Ok(mut ring) => {
            state.drain(&mut ring);
            None
        }
        Err(e) => Some(e),
    };
    state.symbolize_pending(Duration::MAX);
    state.uncut();
    let final_report = state.report("final", counters);
    let cancelled = || ended.passed();
    let patience = output::files::Patience::new(&cancelled);
    let emitted = emit_final(&args, &checked.outputs, &final_report, &patience);
    match failed {
        Some(e) => Err(e),
        None => emitted,
    }
}

/// What the command line names outside the kernel, checked before anything is
/// attached: an hour of tracing must not end in "no such directory".
struct Preflight {
    outputs: output::Outputs,
    metrics: Option<tokio::net::TcpListener>,
    traced: Option<TracedProcess>,
    signals: Signals,
}

async fn preflight(args: &TraceOptions, root: &Path) -> Result<Preflight> {
    let traced = args
        .pid
        .map(|pid| TracedProcess::check(root, pid))
        .transpose()?;
    let outputs = output::Outputs::check(&output::OutputFiles {
        pprof: args.pprof.as_deref(),
        folded: args.folded.as_deref(),
        flamegraph: args.flamegraph.as_deref(),
        weight: args.weight,
    })?;
    let metrics = match args.metrics {
        Some(addr) => Some(output::metrics::bind(addr).await?),
        None => None,
    };
    Ok(Preflight {
        outputs,
        metrics,
        traced,
        signals: Signals::install()?,
    })
}

async fn event_loop(
    args: &TraceOptions,
    ring: RingBuf<MapData>,
    probes: &mut Probes,
    state: &mut Session,
    metrics: Option<tokio::net::TcpListener>,
    signals: Signals,
) -> Result<RingBuf<MapData>> {
    let src = Sources::with_signals(ring, args.run.interval, args.run.duration, signals)?;
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
}

enum SlabInput {
    Key(tui::Action),
    Scrape(std::io::Result<(tokio::net::TcpStream, std::net::SocketAddr)>),
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
        }
        Ok(Flow::Continue)
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
fn emit_final(
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
