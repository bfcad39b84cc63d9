//! The slab tracer's run loop: preflight, attach, then
//! ring buffer -> decoder -> aggregator -> report -> view, until Ctrl-C, SIGTERM
//! or --duration; then detach and print the final report.

use std::{
    collections::{HashMap, VecDeque},
    io::IsTerminal,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};

use crate::{
    bpf::stacks::StackId,
    kernel::btf::Btf,
    kernel::clock::monotonic_ns,
    kernel::facts::KernelFacts,
    kernel::features,
    kernel::meminfo,
    kernel::own_memory,
    kernel::pods::PodNames,
    kernel::procinfo::{self, CgroupPaths, ProcMeta, TracedProcess},
    kernel::slabinfo::{self, SlabLine},
    kernel::tracefs::Tracefs,
    output,
    output::folded::Weight,
    output::stdout::{self, Printed},
    pipeline::event_loop::{self, Flow, Signals, Sources, Tool},
    pipeline::RunOptions,
    present::tui::{self, Tui},
    present::view::{self, TextOptions},
    slab::aggregator::{Aggregator, Interrupt, ProcKey, SnapshotOptions, SortKey},
    slab::caches::{self, Catalogue},
    slab::grouping::{self, GroupBy},
    slab::plan::{self, HookMode},
    slab::probes::{Floor, Probes},
    slab::report::{self, Header, Naming, Report, SlabPicture, TracedPid},
    slab::source::{AllocSource, SlabCaches},
    slab::zoom::{self, Zoom},
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
    // Without BTF the raw tracepoints' argument layout cannot be checked; the
    // classic tracepoints still work.
    let btf = Btf::from_sys_fs().ok();
    let facts = KernelFacts::probe(root, Some(tracefs.root()), btf.as_ref());
    let catalogue = Catalogue::read(root).context("reading the slab cache catalogue")?;
    let selection = caches::select(&catalogue, cache)?;
    // What slabinfo said before attaching, and how the tracked objects are sized.
    let slab_baseline = slab_line(root, &selection.cache, &selection.aliases_included);
    let ringbuf_bytes = crate::pipeline::event_loop::ringbuf_bytes(args.run.ringbuf_mib)?;
    let zoom_policy = zoom::Policy::default();
    let mut plan = SlabCaches {
        tracefs: &tracefs,
        btf: btf.as_ref(),
        root,
        catalogue: &catalogue,
        selection: &selection,
        options: plan::PlanOptions {
            pid: args.pid,
            kernel_stacks: !args.no_kernel_stacks,
            user_stacks: !args.no_user_stacks,
            hooks: args.hooks,
            stack_sample: if args.exact { 1 } else { args.stack_sample },
            on_demand_maps: facts.on_demand_maps,
        },
        finish: plan::Finish {
            ringbuf_bytes,
            user_paths: args.user_paths && !args.no_user_stacks,
            max_objects: args.max_objects,
            active_objs: slab_baseline.as_ref().map(|l| l.active_objs),
            zoom_window_cap: zoom_policy.kernel_window_cap(),
        },
    }
    .plan(&facts)?;
    let max_objects = plan.max_objects;
    // The parsed BTF (~17 MB on 6.18) has done its work: freed before kallsyms
    // is loaded, its pages are reused instead of pinned under it in the heap.
    let have_btf = btf.is_some();
    drop(btf);
    // Before attaching: parsing kallsyms later would stall the first drains.
    let mut symbols = Symbolizer::new();
    symbols.warm_kernel();
    own_memory::return_freed_memory();
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
        plan::hooks_note(&facts.features, &plan.attachments, have_btf)
    );
    eprintln!(
        "leaktrace: attached to {} (bpf prog ids {:?}); Ctrl-C to stop",
        plan.cache,
        probes.program_ids()
    );

    let mut state = State {
        pending_stacks: VecDeque::new(),
        // The kernel map cannot hold more than --max-objects, so neither can we.
        agg: Aggregator::with_capacity(
            args.rate_window.as_nanos() as u64,
            max_objects as usize,
            plan.config.stack_sample_mask + 1,
        )
        .fingerprinting(plan.config.user_fingerprint != 0)
        .census(plan.config.census_allocs),
        // No stacks at all: nothing to zoom into.
        zoom: Zoom::new(
            zoom_policy,
            if plan.config.stack_flags == 0 {
                0
            } else {
                plan.config.base_level as u8
            },
            monotonic_ns(),
        ),
        symbols,
        procs: HashMap::new(),
        cgroups: CgroupPaths::at(plan.cgroup_mount.clone()),
        pods: PodNames::new(&args.pods_root),
        slab_baseline: slab_baseline.map(|l| (l, Instant::now())),
        cache: SlabCaches::name(&plan).to_string(),
        aliases: selection.aliases_included.clone(),
        started_ns: monotonic_ns(),
        snapshot_opts: SnapshotOptions {
            sort: args.sort,
            limit: args.limit,
            stacks: args.stacks,
            comm: args.comm.clone(),
            pid: args.pid,
        },
        traced: checked.traced,
        group_by: args.group_by,
    };

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
            drain(&mut state, &mut ring);
            None
        }
        Err(e) => Some(e),
    };
    symbolize_pending(&mut state, Duration::MAX);
    // Files and JSON hold everything tracked; --limit/--stacks/--comm cut the text view only.
    state.snapshot_opts = SnapshotOptions {
        limit: usize::MAX,
        stacks: usize::MAX,
        comm: None,
        ..state.snapshot_opts.clone()
    };
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

/// Share of each poll period that may go to symbolization.
const SYMBOLIZE_BUDGET: Duration = Duration::from_millis(5);

struct State {
    agg: Aggregator,
    /// Steers the kernel's draw rate per stratum (its `ZOOM` table).
    zoom: Zoom,
    /// New user stacks (tgid, stack) not yet symbolized.
    pending_stacks: VecDeque<(u32, StackId)>,
    symbols: Symbolizer,
    procs: HashMap<ProcKey, ProcMeta>,
    cgroups: CgroupPaths,
    pods: PodNames,
    slab_baseline: Option<(SlabLine, Instant)>,
    cache: String,
    aliases: Vec<String>,
    started_ns: u64,
    snapshot_opts: SnapshotOptions,
    traced: Option<TracedProcess>,
    /// The live view may change it (key `G`).
    group_by: GroupBy,
}

impl State {
    fn report(
        &mut self,
        kind: &'static str,
        kernel: crate::slab::report::KernelCounters,
    ) -> Report {
        let root = Path::new("/");
        let now = monotonic_ns();
        let slab = slab_line(root, &self.cache, &self.aliases)
            .map(|now| slab_picture(&now, self.slab_baseline.as_ref()));
        let header = Header {
            cache: self.cache.clone(),
            aliases: self.aliases.clone(),
            elapsed_s: now.saturating_sub(self.started_ns) as f64 / 1e9,
            rss_bytes: own_memory::own_rss_bytes(),
            meminfo: meminfo::read(root).ok(),
            slab,
            kernel,
        };
        // Groups and stacks across processes sum every process, not the top ones.
        let opts = if self.group_by == GroupBy::Process && kind != "final" {
            self.snapshot_opts.clone()
        } else {
            SnapshotOptions {
                limit: usize::MAX,
                stacks: usize::MAX,
                ..self.snapshot_opts.clone()
            }
        };
        let snap = self.agg.snapshot(now, &opts);
        let mut names = Naming {
            symbols: &mut self.symbols,
            stacks: &self.agg.stacks,
            procs: &self.procs,
            cgroups: &mut self.cgroups,
            pods: &mut self.pods,
        };
        let mut report = report::build(kind, header, snap, &mut names);
        let k = &report.kernel;
        let ns_per_draw = if k.zoom_drawn == 0 {
            0.0
        } else {
            k.zoom_stack_ns as f64 / k.zoom_drawn as f64
        };
        report.stacks.zoom_episodes = self.zoom.report(ns_per_draw, |id| self.agg.zoom_drawn(id));
        for e in &mut report.stacks.zoom_episodes.episodes {
            e.call_site_name = self.symbols.kernel_frames(&[e.call_site]).pop();
        }
        report.group_by = self.group_by;
        report.groups = grouping::group(&report.processes, self.group_by, opts.sort);
        if kind == "final" {
            report.top_stacks = grouping::top_stacks(&report.processes);
        }
        report.traced = self.watch_traced(root, now);
        self.symbols.trim();
        // Next refresh re-walks cgroupfs on a miss: new containers appear mid-incident.
        self.cgroups.invalidate();
        report
    }
}

impl State {
    fn watch_traced(&mut self, root: &Path, now: u64) -> Option<TracedPid> {
        let elapsed_s = now.saturating_sub(self.started_ns) as f64 / 1e9;
        self.traced.as_mut().map(|t| {
            t.watch(root, elapsed_s);
            TracedPid {
                pid: t.pid,
                exited_after_s: t.exited_after_s,
            }
        })
    }
}

async fn event_loop(
    args: &TraceOptions,
    ring: RingBuf<MapData>,
    probes: &mut Probes,
    state: &mut State,
    metrics: Option<tokio::net::TcpListener>,
    signals: Signals,
) -> Result<RingBuf<MapData>> {
    let src = Sources::with_signals(ring, args.run.interval, args.run.duration, signals)?;
    let tty = std::io::stdout().is_terminal();
    // The interactive view only where a person watches; JSON and pipes get lines.
    let tui = if args.run.top && tty && !args.run.json {
        Some(Tui::start(tui_column(args.sort), args.frames)?)
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
    state: &'a mut State,
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
        drain(self.state, ring);
    }

    fn poll(&mut self) {
        symbolize_pending(self.state, SYMBOLIZE_BUDGET);
        // The zoom keeps its own pace, whatever the refresh interval: its
        // budget and episodes are held to a quarter second.
        let state = &mut *self.state;
        let now = monotonic_ns();
        if state.zoom.due(now) {
            let candidates = state
                .agg
                .zoom_candidates(now, state.zoom.policy().min_age_s);
            let writes = state.zoom.step(now, &candidates);
            let failed = self.probes.set_zoom(&writes);
            state.zoom.retry(failed);
        }
    }

    fn tick(&mut self) -> Result<()> {
        let (args, state) = (self.args, &mut *self.state);
        state.agg.tick(monotonic_ns());
        // The --pid process keeps its row after exit: the header says it exited.
        let gone = state.agg.forget_exited(|tgid| {
            Some(tgid) == args.pid || Path::new("/proc").join(tgid.to_string()).exists()
        });
        for key in &gone {
            state.procs.remove(key);
        }
        // A reused PID's live process keeps the mappings read for it.
        let gone_tgids: Vec<u32> = gone
            .iter()
            .map(|k| k.tgid)
            .filter(|&t| !state.procs.keys().any(|k| k.tgid == t))
            .collect();
        state.symbols.forget(&gone_tgids);
        // Their stack ids may be reused from now on.
        state
            .pending_stacks
            .retain(|(t, _)| !gone.iter().any(|k| k.tgid == *t));
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
            action = next_action(self.tui.as_mut()) => SlabInput::Key(action),
            conn = accept(self.metrics.as_ref()) => SlabInput::Scrape(conn),
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

/// Keys from the TUI; never ready without one, so select! ignores the branch.
async fn next_action(tui: Option<&mut Tui>) -> tui::Action {
    match tui {
        Some(t) => t.next_action().await,
        None => std::future::pending().await,
    }
}

async fn accept(
    listener: Option<&tokio::net::TcpListener>,
) -> std::io::Result<(tokio::net::TcpStream, std::net::SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

fn tui_column(sort: SortKey) -> tui::Column {
    match sort {
        SortKey::Outstanding => tui::Column::Outstanding,
        SortKey::Rate => tui::Column::AllocRate,
        SortKey::Allocs => tui::Column::Allocs,
    }
}

/// Symbolize new user stacks while their processes are likely alive, but never
/// for long at a time: parsing a binary takes milliseconds, and a burst of new
/// processes must not keep the ring buffer from being drained.
fn symbolize_pending(state: &mut State, budget: Duration) {
    let start = Instant::now();
    while let Some((tgid, ustack)) = state.pending_stacks.pop_front() {
        state
            .symbols
            .user_frames(tgid, state.agg.stacks.frames(ustack));
        if start.elapsed() >= budget {
            break;
        }
    }
}

fn drain(state: &mut State, ring: &mut RingBuf<MapData>) {
    // New stacks are symbolized on the spot while this drain has spent little
    // time (the process may exit any moment, and a slow guest may not reach the
    // next poll in time); past the budget they wait in the queue.
    let start = Instant::now();
    while let Some(item) = ring.next() {
        match SlabCaches::decode(&item) {
            Ok(event) => {
                let new = state.agg.apply(&event);
                if let Some(key) = new.process.filter(|k| Interrupt::of_key(*k).is_none()) {
                    // Mappings first: of all a short-lived process leaves, they
                    // are what naming its frames cannot do without.
                    state.symbols.snapshot(key.tgid);
                    let ppid = match &event {
                        crate::slab::decoder::Event::Alloc(a) => a.ppid,
                        crate::slab::decoder::Event::Free(_) => 0,
                    };
                    state
                        .procs
                        .insert(key, procinfo::read_proc(Path::new("/"), key.tgid, ppid));
                }
                if let Some((tgid, ustack)) = new.user_stack {
                    state
                        .symbols
                        .snapshot_covering(tgid, state.agg.stacks.frames(ustack));
                    if start.elapsed() < SYMBOLIZE_BUDGET {
                        state
                            .symbols
                            .user_frames(tgid, state.agg.stacks.frames(ustack));
                    } else {
                        state.pending_stacks.push_back((tgid, ustack));
                    }
                }
            }
            Err(_) => state.agg.decode_error(),
        }
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
        sort_label: match args.sort {
            SortKey::Outstanding => "outstanding",
            SortKey::Rate => "rate",
            SortKey::Allocs => "allocs",
        },
        interval_s: args.run.interval.as_secs_f64(),
    }
}

/// The cache and everything merged into it as one /proc/slabinfo line: slabinfo
/// lists a merged group once, under one name, and kmalloc-rnd copies separately.
fn slab_line(root: &Path, cache: &str, aliases: &[String]) -> Option<SlabLine> {
    let lines = slabinfo::read(root).ok()?;
    let mut parts = lines
        .into_iter()
        .filter(|l| l.name == cache || aliases.contains(&l.name));
    let mut sum = parts.next()?;
    for l in parts {
        sum.active_objs += l.active_objs;
        sum.num_objs += l.num_objs;
        sum.active_slabs += l.active_slabs;
        sum.num_slabs += l.num_slabs;
    }
    sum.name = cache.to_string();
    Some(sum)
}

fn slab_picture(now: &SlabLine, baseline: Option<&(SlabLine, Instant)>) -> SlabPicture {
    let growth = baseline.and_then(|(before, at)| slabinfo::growth(before, now, at.elapsed()).ok());
    SlabPicture {
        active_objs: now.active_objs,
        num_objs: now.num_objs,
        objsize: now.objsize,
        active_objs_delta: growth.as_ref().map_or(0, |g| g.objs_delta),
        active_objs_per_sec: growth.as_ref().map_or(0.0, |g| g.objs_per_sec),
    }
}
