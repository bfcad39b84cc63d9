//! `leaktrace memcg`'s run: preflight, plan and attach (`memcg::plan`, `memcg::hooks`), then
//! the session (`memcg::session`: ring buffer -> `memcg::decode` ->
//! `memcg::state::Tracker` -> report) ->
//! view or JSON on the shared loop (`event_loop.rs`), until Ctrl-C, SIGTERM or
//! --duration; then detach and print the final report (and --pprof).

use std::{
    io::IsTerminal,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Result;
use aya::maps::{MapData, RingBuf};

use crate::{
    kernel::btf::Btf,
    kernel::cgroupfs::Hierarchy,
    kernel::facts::{self, KernelFacts},
    kernel::features,
    kernel::tracefs::Tracefs,
    memcg::{
        hooks::{Counters, Hooks},
        kmem, plan,
        report::Report,
        session::Session,
        state::SnapshotOptions,
    },
    output::files::{Destination, Patience},
    output::memcg_pprof,
    output::stdout::{self, Printed},
    pipeline::event_loop::{self, Flow, Sources, Tool},
    pipeline::RunOptions,
    present::memcg_view::{self as view, KernelRelease, ViewOptions},
    present::screen::TextScreen,
    present::tui::Action,
};

/// What `leaktrace memcg` is asked for (main.rs fills it from the command line).
#[derive(Debug, Clone)]
pub struct MemcgOptions {
    pub run: RunOptions,
    /// A one-shot list (with a duration: after tracing that long).
    pub list: bool,
    /// A removed memcg still not released after this long is a zombie.
    pub zombie_after: Duration,
    /// Window of creation and release rates.
    pub rate_window: Duration,
    /// Memcgs shown in the text views, and pinning stacks per dying memcg.
    pub limit: usize,
    pub stacks: usize,
    /// Which memory controller (1 or 2) when both are mounted; None: where it is bound.
    pub cgroup_version: Option<u8>,
    /// Lifetimes only: no charged slab objects tracked.
    pub no_pins: bool,
    pub no_kernel_stacks: bool,
    /// Charged objects the kernel can track at once.
    pub max_objects: u32,
    /// One memcg's full story, by id.
    pub why: Option<u64>,
    /// The dying memcgs and their pins as a pprof profile, written at exit.
    pub pprof: Option<PathBuf>,
}

/// `leaktrace memcg`, to the end: a one-shot list (`--list`/`--why` without
/// `--duration`, no BPF) or a traced run. Errors: not root (traced runs), no
/// memory controller, a kernel whose cgroup tracepoints cannot be read, an
/// unwritable `--pprof`, a closed stdout.
pub async fn run(args: MemcgOptions) -> Result<()> {
    let root = Path::new("/");
    // Checked before anything is attached: a profile asked for is never lost
    // to an unwritable path at the end.
    let pprof = args
        .pprof
        .as_deref()
        .map(|p| Destination::check("--pprof", p))
        .transpose()?;
    let hierarchy = Hierarchy::detect(root, args.cgroup_version)?;
    let mut run = Session::start(
        root,
        hierarchy,
        SnapshotOptions {
            zombie_after_ns: args.zombie_after.as_nanos() as u64,
            rate_window_ns: args.rate_window.as_nanos() as u64,
            include_preexisting_live: args.list,
            stacks: args.stacks,
        },
    )?;
    // A plain --list is a look at cgroupfs and /proc/cgroups: no BPF, no root.
    if (args.list || args.why.is_some()) && args.run.duration.is_none() {
        run.mode = "none (one-shot list from cgroupfs; --duration traces first)".into();
        let report = run.report("list", Counters::default());
        return emit_final(
            &args,
            &report,
            pprof.as_ref(),
            &event_loop::EndMark::now(),
            &running_kernel(root),
        );
    }

    features::require_root()?;
    let tracefs = Tracefs::locate_or_mount()?;
    let btf = Btf::from_sys_fs().ok();
    let facts = KernelFacts::probe(root, Some(tracefs.root()), btf.as_ref());
    let plan = plan::build(
        &tracefs,
        btf.as_ref(),
        &run.hierarchy,
        &plan::PlanOptions {
            pins: !args.no_pins,
            stacks: !args.no_kernel_stacks,
            all_hierarchies: false,
            kprobes: plan::kprobes_usable(&facts),
        },
    )?;
    let mut plan = plan;
    if plan.percpu() && !run.measure_percpu() {
        plan.drop_percpu(
            "cgroup_mkdir is not in /proc/kallsyms: per-CPU shares are estimated only",
        );
    }
    let ringbuf_bytes = event_loop::ringbuf_bytes(args.run.ringbuf_mib)?;
    let (hooks, ring) = Hooks::attach(&plan, args.max_objects, ringbuf_bytes)?;
    run.mode = mode_line(&plan, &facts.features);
    run.attribution = plan.attribution.clone();
    run.reseed()?;
    for note in &plan.notes {
        eprintln!("leaktrace: {note}");
    }
    eprintln!("leaktrace: {}", run.mode);
    eprintln!("leaktrace: {}", run.attribution);
    eprintln!(
        "leaktrace: memory controller: cgroup v{} (hierarchy {}) at {}; {} dying memcgs before tracing ({})",
        run.hierarchy.version,
        run.hierarchy.id,
        run.hierarchy.mount.display(),
        run.dying_at_start.count,
        run.dying_at_start.source
    );
    eprintln!(
        "leaktrace: attached to memcg lifetimes (bpf prog ids {:?}); Ctrl-C to stop",
        hooks.prog_ids
    );

    let outcome = event_loop(&args, ring, &hooks, &mut run).await;
    // Any end signal from here on is a second one: it ends a wait for a FIFO's reader.
    let ended = event_loop::EndMark::now();
    let counters = hooks.counters();
    drop(hooks);
    let mut ring = outcome?;
    run.drain(&mut ring);
    let kind = if args.list || args.why.is_some() {
        "list"
    } else {
        "final"
    };
    let report = run.report(kind, counters);
    emit_final(
        &args,
        &report,
        pprof.as_ref(),
        &ended,
        &running_kernel(root),
    )
}

fn mode_line(plan: &plan::Plan, features: &facts::Features) -> String {
    let events: Vec<String> = plan
        .attachments
        .iter()
        .map(|(_, s, e)| format!("{s}:{e}"))
        .chain(plan.raw_attachments.iter().map(|(_, e)| format!("raw {e}")))
        .collect();
    let kprobes = if !plan.kprobes.is_empty() {
        let f: Vec<&str> = plan.kprobes.iter().map(|(_, f)| *f).collect();
        format!("+ kprobes {}: memcg css offline/free exact", f.join(","))
    } else if features.kprobes {
        "(kprobes present but mem_cgroup_css_* not usable: memcg lifetime = cgroup lifetime)".into()
    } else {
        "(no kprobes on this kernel: memcg lifetime = cgroup lifetime from tracepoints)".into()
    };
    format!(
        "memcg hooks: tracepoints {} {kprobes}; kernel {}",
        events.join(","),
        features.kernel_release
    )
}

async fn event_loop(
    args: &MemcgOptions,
    ring: RingBuf<MapData>,
    hooks: &Hooks,
    run: &mut Session,
) -> Result<RingBuf<MapData>> {
    // Charge events wake the reader in batches; the poll timer drains the rest.
    let src = Sources::new(ring, args.run.interval, args.run.duration)?;
    // On a terminal the text view is a live screen (the slab tracer's ratatui
    // machinery); piped, or as JSON, snapshots are printed one after another.
    let screen = if args.run.top && !args.run.json && std::io::stdout().is_terminal() {
        Some(TextScreen::start(
            "q/Esc/^C quit (prints the final report)",
        )?)
    } else {
        None
    };
    let mut tool = MemcgTool {
        args,
        hooks,
        run,
        screen,
    };
    let ring = event_loop::run(src, &mut tool).await;
    // Leave the alternate screen before the final report prints.
    drop(tool);
    ring
}

/// `memcg` on the shared loop.
struct MemcgTool<'a> {
    args: &'a MemcgOptions,
    hooks: &'a Hooks,
    run: &'a mut Session,
    screen: Option<TextScreen>,
}

impl Tool for MemcgTool<'_> {
    type Input = Action;

    fn drain(&mut self, ring: &mut RingBuf<MapData>) {
        self.run.drain(ring);
    }

    fn tick(&mut self) -> Result<()> {
        if self.args.run.top {
            let report = self.run.report("snapshot", self.hooks.counters());
            match self.screen.as_mut() {
                Some(s) => s.show(view::render(&report, &view_options(self.args), false))?,
                None => emit_snapshot(self.args, &report)?,
            }
        }
        Ok(())
    }

    async fn input(&mut self) -> Action {
        event_loop::unless_absent(self.screen.as_mut().map(|s| s.next_action())).await
    }

    fn handle(&mut self, action: Action) -> Result<Flow> {
        match action {
            Action::Quit => return Ok(Flow::Stop),
            Action::Redraw => {
                if let Some(s) = self.screen.as_mut() {
                    s.redraw()?;
                }
            }
            Action::Regroup | Action::None => {}
        }
        Ok(Flow::Continue)
    }
}

fn emit_snapshot(args: &MemcgOptions, report: &Report) -> Result<()> {
    stdout::print(report, args.run.json, Printed::Snapshot, || {
        view::render(report, &view_options(args), false)
    })
}

/// The profile first, so a closed stdout cannot cost the file; then the
/// report, even when the profile failed (it went to its fallback, named on
/// stderr); then whether `--why` found its memcg. A FIFO waits for its
/// reader until an end signal arrives after `ended`, or its bound.
fn emit_final(
    args: &MemcgOptions,
    report: &Report,
    pprof: Option<&Destination>,
    ended: &event_loop::EndMark,
    kernel: &KernelRelease,
) -> Result<()> {
    let file = pprof.map_or(Ok(()), |dest| {
        let cancelled = || ended.passed();
        let written = memcg_pprof::profile(report)
            .and_then(|bytes| dest.write(&bytes, &Patience::new(&cancelled)));
        match &written {
            Ok(()) => eprintln!("leaktrace: wrote pprof profile {}", dest.path.display()),
            Err(e) => eprintln!("leaktrace: error: {e:#}"),
        }
        written.map_err(|_| {
            anyhow::anyhow!("the pprof profile could not be written where asked (see above)")
        })
    });
    let printed = stdout::print(report, args.run.json, Printed::Final, || match args.why {
        Some(id) => view::why(report, id, kernel),
        None => view::render(report, &view_options(args), true),
    });
    file.and(printed)?;
    match args.why {
        Some(id) if report.finds_memcg(id) == Some(false) => anyhow::bail!(
            "--why {id}: no memory cgroup has this id in hierarchy {} ({}), live, dying or \
             traced; `leaktrace memcg --list` shows the ids (the ID column)",
            report.hierarchy.id,
            report.hierarchy.mount.display()
        ),
        _ => Ok(()),
    }
}

fn view_options(args: &MemcgOptions) -> ViewOptions {
    ViewOptions {
        interval_s: args.run.interval.as_secs_f64(),
        limit: args.limit,
    }
}

/// `--why` explains what releases a memcg on this kernel; an unreadable
/// release reads as 0.0, whose explanations are the oldest kernels'.
fn running_kernel(root: &Path) -> KernelRelease {
    let release = facts::read_release(root).unwrap_or_default();
    KernelRelease {
        version: kmem::kernel_version(&release).unwrap_or((0, 0)),
        release,
    }
}
