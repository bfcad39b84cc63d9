//! `leaktrace memcg`: who creates memory cgroups, which never die, and what
//! pins them. cgroup tracepoints -> ring buffer -> [`state::Tracker`] ->
//! [`Report`] -> [`view`] / JSON, with the same conventions as the slab tracer.

mod ancestry;
mod hooks;
mod kmem;
mod kread;
mod pins;
mod pprof;
pub mod state;
mod view;
mod walk;

use std::{
    io::{IsTerminal, Write},
    path::Path,
};

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use serde::Serialize;
use tracer_common::memcg::{
    CgroupEvent, ChargeEvent, CssEvent, UnchargeEvent, EVENT_CHARGE, EVENT_CSS_FREE,
    EVENT_CSS_OFFLINE, EVENT_MKDIR, EVENT_RELEASE, EVENT_RMDIR, EVENT_UNCHARGE,
};

use self::{
    hooks::{Counters, Hooks},
    state::{ChargeInput, Snapshot, SnapshotOptions, Tracker},
};
use crate::{
    cli::MemcgArgs,
    kernel::btf::Btf,
    kernel::cgroupfs::{Dying, Hierarchy},
    kernel::clock::monotonic_ns,
    kernel::features::{self, Features},
    kernel::tracefs::Tracefs,
    output::files::Destination,
    pipeline::{
        self,
        event_loop::{Flow, Sources, Tool},
    },
    present::screen::TextScreen,
    present::tui::Action,
    symbolize::Symbolizer,
};

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema_version: u32,
    pub report: &'static str,
    /// "snapshot", "final", or "list".
    pub kind: &'static str,
    pub elapsed_s: f64,
    /// The one line saying which hooks are active.
    pub mode: String,
    pub attribution: String,
    pub hierarchy: Hierarchy,
    pub zombie_after_s: f64,
    pub preexisting_dying: Preexisting,
    #[serde(flatten)]
    pub snapshot: Snapshot,
    pub kernel: Counters,
    /// Events the decoder could not read (should be 0).
    pub decode_errors: u64,
    /// Every memcg the kernel still holds, read from kernel memory (list and
    /// final reports; None in snapshots).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_memcgs: Option<KernelMemcgs>,
    /// Whether kernel memory is charged to memcgs here, as the kernel defines it.
    pub kmem_accounting: kmem::Accounting,
}

/// The kernel walk's result, or why there is none.
#[derive(Debug, Clone, Serialize)]
pub struct KernelMemcgs {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub walk: Option<walk::KernelWalk>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unknown: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aggregate: Option<DyingAggregate>,
}

/// "N dying: M hold file pages, X GiB".
#[derive(Debug, Clone, Default, Serialize)]
pub struct DyingAggregate {
    pub dying: u64,
    pub holding_file_pages: u64,
    pub holding_pages: u64,
    /// Sum of the dying memcgs' memory page counters, in bytes.
    pub charged_bytes: u64,
    pub file_bytes: u64,
    pub shmem_bytes: u64,
    pub anon_bytes: u64,
    pub swap_bytes: u64,
    pub kernel_bytes: u64,
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(p).ok().filter(|&p| p > 0).unwrap_or(4096)
}

impl KernelMemcgs {
    fn read() -> KernelMemcgs {
        match Self::try_read() {
            Ok(w) => {
                let page = page_size();
                let mut a = DyingAggregate::default();
                let b = |v: Option<i64>| u64::try_from(v.unwrap_or(0)).unwrap_or(0) * page;
                for m in w.dying() {
                    a.dying += 1;
                    if m.file.unwrap_or(0) > 0 {
                        a.holding_file_pages += 1;
                    }
                    if m.usage_pages.unwrap_or(0) > 0 {
                        a.holding_pages += 1;
                    }
                    a.charged_bytes += m.usage_pages.unwrap_or(0) * page;
                    a.file_bytes += b(m.file);
                    a.shmem_bytes += b(m.shmem);
                    a.anon_bytes += b(m.anon);
                    a.swap_bytes += b(m.swap);
                    a.kernel_bytes += b(m.kernel);
                }
                KernelMemcgs {
                    walk: Some(w),
                    unknown: None,
                    aggregate: Some(a),
                }
            }
            Err(e) => KernelMemcgs {
                walk: None,
                unknown: Some(format!("{e:#}")),
                aggregate: None,
            },
        }
    }

    fn try_read() -> Result<walk::KernelWalk> {
        // SAFETY: geteuid has no memory effects.
        if unsafe { libc::geteuid() } != 0 {
            anyhow::bail!("not root: reading kernel memory (BPF) needs root");
        }
        let btf = Btf::from_sys_fs().context("reading /sys/kernel/btf/vmlinux")?;
        let mut k = kread::Kread::open()?;
        let mut w = walk::walk(&btf, &mut k)?;
        let t = std::time::Instant::now();
        let (runs, reads) = (k.runs, k.slots);
        let dying: Vec<usize> = (0..w.memcgs.len()).filter(|&i| w.memcgs[i].dying).collect();
        let addrs: Vec<u64> = dying.iter().map(|&i| w.memcgs[i].addr).collect();
        match pins::page_pins(&btf, &mut k, &addrs)? {
            Ok(pins) => {
                for (i, p) in dying.into_iter().zip(pins) {
                    w.memcgs[i].page_pins = Some(p);
                }
            }
            Err(e) => w.page_pins_unknown = Some(format!("unknown on this kernel: {e}")),
        }
        w.page_pins_ms = walk::duration_ms(t.elapsed());
        w.page_pins_runs = k.runs - runs;
        w.page_pins_reads = k.slots - reads;
        Ok(w)
    }
}

/// Dying memcgs that predate tracing: unattributable, counted separately.
#[derive(Debug, Clone, Serialize)]
pub struct Preexisting {
    pub at_start: u64,
    /// The kernel's dying count now minus the dying memcgs we saw removed.
    pub now: u64,
    pub kernel_dying_now: u64,
    pub source: String,
}

struct Run {
    hierarchy: Hierarchy,
    tracker: Tracker,
    symbols: Symbolizer,
    mode: String,
    attribution: String,
    dying_at_start: Dying,
    started_ns: u64,
    opts: SnapshotOptions,
    decode_errors: u64,
    kmalloc_cg: bool,
}

pub fn run(args: MemcgArgs) -> Result<()> {
    // One thread: bound by the kernel's event rate; small footprint on a sick node.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: MemcgArgs) -> Result<()> {
    let root = Path::new("/");
    // Checked before anything is attached: a profile asked for is never lost
    // to an unwritable path at the end.
    let pprof = args
        .pprof
        .as_deref()
        .map(|p| Destination::check("--pprof", p))
        .transpose()?;
    let hierarchy = Hierarchy::detect(root, args.cgroup_version)?;
    let dying_at_start = hierarchy.dying_now(root)?;
    let mut run = Run {
        tracker: Tracker::new(hierarchy.live()?),
        hierarchy,
        symbols: Symbolizer::new(),
        mode: String::new(),
        attribution: String::new(),
        dying_at_start,
        started_ns: monotonic_ns(),
        opts: SnapshotOptions {
            zombie_after_ns: args.zombie_after.as_nanos() as u64,
            rate_window_ns: args.rate_window.as_nanos() as u64,
            include_preexisting_live: args.list,
            stacks: args.stacks,
        },
        decode_errors: 0,
        kmalloc_cg: root.join("sys/kernel/slab/kmalloc-cg-8").exists(),
    };
    // A plain --list is a look at cgroupfs and /proc/cgroups: no BPF, no root.
    if (args.list || args.why.is_some()) && args.duration.is_none() {
        run.mode = "none (one-shot list from cgroupfs; --duration traces first)".into();
        let report = run.report("list", Counters::default());
        return emit_final(&args, &report, pprof.as_ref());
    }

    features::require_root()?;
    let tracefs = Tracefs::locate_or_mount()?;
    let features = Features::detect(root, Some(tracefs.root()));
    let btf = Btf::from_sys_fs().ok();
    let plan = hooks::build(
        &tracefs,
        btf.as_ref(),
        &run.hierarchy,
        &hooks::PlanOptions {
            pins: !args.no_pins,
            stacks: !args.no_kernel_stacks,
            all_hierarchies: false,
            kprobes: features.kprobes
                && ["mem_cgroup_css_offline", "mem_cgroup_css_free"]
                    .iter()
                    .all(|f| crate::kernel::features::kernel_has_symbol(f)),
        },
    )?;
    let ringbuf_bytes = pipeline::event_loop::ringbuf_bytes(args.ringbuf_mib)?;
    let (hooks, ring) = Hooks::attach(&plan, args.max_objects, ringbuf_bytes)?;
    run.mode = mode_line(&plan, &features);
    run.attribution = plan.attribution.clone();
    // Take the walk again now that the hooks see every change: a memcg made
    // between the first walk and attach would otherwise be unknown.
    for (id, (path, level)) in run.hierarchy.live()? {
        run.tracker.seed_live(id, path, level);
    }
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
    let counters = hooks.counters();
    drop(hooks);
    let mut ring = outcome?;
    drain(&mut run, &mut ring);
    let kind = if args.list || args.why.is_some() {
        "list"
    } else {
        "final"
    };
    let report = run.report(kind, counters);
    emit_final(&args, &report, pprof.as_ref())
}

fn mode_line(plan: &hooks::Plan, features: &Features) -> String {
    let events: Vec<String> = plan
        .attachments
        .iter()
        .map(|(_, s, e)| format!("{s}:{e}"))
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
    args: &MemcgArgs,
    ring: RingBuf<MapData>,
    hooks: &Hooks,
    run: &mut Run,
) -> Result<RingBuf<MapData>> {
    // Charge events wake the reader in batches; the poll timer drains the rest.
    let src = Sources::new(ring, args.interval, args.duration)?;
    // On a terminal the text view is a live screen (the slab tracer's ratatui
    // machinery); piped, or as JSON, snapshots are printed one after another.
    let screen = if args.top && !args.json && std::io::stdout().is_terminal() {
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
    let ring = pipeline::event_loop::run(src, &mut tool).await;
    // Leave the alternate screen before the final report prints.
    drop(tool);
    ring
}

/// `memcg` on the shared loop.
struct MemcgTool<'a> {
    args: &'a MemcgArgs,
    hooks: &'a Hooks,
    run: &'a mut Run,
    screen: Option<TextScreen>,
}

impl Tool for MemcgTool<'_> {
    type Input = Action;

    fn drain(&mut self, ring: &mut RingBuf<MapData>) {
        drain(self.run, ring);
    }

    fn tick(&mut self) -> Result<()> {
        if self.args.top {
            let report = self.run.report("snapshot", self.hooks.counters());
            match self.screen.as_mut() {
                Some(s) => s.show(view::render(&report, self.args, false))?,
                None => emit_snapshot(self.args, &report)?,
            }
        }
        Ok(())
    }

    async fn input(&mut self) -> Action {
        screen_action(self.screen.as_mut()).await
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

/// Keys from the live screen; never ready without one, so select! ignores the branch.
async fn screen_action(screen: Option<&mut TextScreen>) -> Action {
    match screen {
        Some(s) => s.next_action().await,
        None => std::future::pending().await,
    }
}

fn read_event<T: Copy>(bytes: &[u8]) -> Option<T> {
    (bytes.len() >= std::mem::size_of::<T>())
        // SAFETY: length checked; T is a repr(C) POD type from tracer-common.
        .then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

fn cstr(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

fn drain(run: &mut Run, ring: &mut RingBuf<MapData>) {
    let root = Path::new("/");
    while let Some(item) = ring.next() {
        let kind = item
            .get(..4)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
        match kind {
            Some(EVENT_MKDIR | EVENT_RMDIR | EVENT_RELEASE) => {
                let Some(ev) = read_event::<CgroupEvent>(&item) else {
                    run.decode_errors += 1;
                    continue;
                };
                let path = cstr(&ev.path);
                match ev.kind {
                    EVENT_MKDIR => {
                        let who = ancestry::actor(root, ev.pid, ev.tgid, &cstr(&ev.comm), ev.ppid);
                        run.tracker.mkdir(ev.id, &path, ev.level, ev.ts_ns, who);
                    }
                    EVENT_RMDIR => {
                        let who = ancestry::actor(root, ev.pid, ev.tgid, &cstr(&ev.comm), ev.ppid);
                        run.tracker.rmdir(ev.id, &path, ev.level, ev.ts_ns, who);
                    }
                    _ => run.tracker.release(ev.id, ev.ts_ns),
                }
            }
            Some(EVENT_CHARGE) => {
                let Some(ev) = read_event::<ChargeEvent>(&item) else {
                    run.decode_errors += 1;
                    continue;
                };
                let frames = usize::try_from(ev.kstack_bytes).unwrap_or(0) / 8;
                let kstack = &ev.kstack[..frames.min(ev.kstack.len())];
                let named = cstr(&ev.cache);
                let cache = if !named.is_empty() {
                    named
                } else {
                    kmalloc_name(ev.bytes_alloc, run.kmalloc_cg)
                };
                run.tracker.charge(ChargeInput {
                    ptr: ev.ptr,
                    memcg_id: ev.memcg_id,
                    bytes: ev.bytes_alloc,
                    cache,
                    tgid: ev.tgid,
                    comm: &cstr(&ev.comm),
                    kstack,
                });
            }
            Some(EVENT_CSS_OFFLINE | EVENT_CSS_FREE) => match read_event::<CssEvent>(&item) {
                Some(ev) if ev.kind == EVENT_CSS_OFFLINE => {
                    run.tracker.css_offline(ev.id, ev.ts_ns)
                }
                Some(ev) => run.tracker.css_free(ev.id, ev.ts_ns),
                None => run.decode_errors += 1,
            },
            Some(EVENT_UNCHARGE) => match read_event::<UnchargeEvent>(&item) {
                Some(ev) => {
                    run.tracker.uncharge(ev.ptr);
                }
                None => run.decode_errors += 1,
            },
            _ => run.decode_errors += 1,
        }
    }
}

/// kmalloc records carry no cache name; the size class and the kernel's
/// separate charged caches (5.14+) name it.
fn kmalloc_name(bytes: u64, kmalloc_cg: bool) -> String {
    match (bytes, kmalloc_cg) {
        (0, _) => "kmalloc-?".into(),
        (b, _) if b > 8192 => "kmalloc-large (pages)".into(),
        (b, true) => format!("kmalloc-cg-{}", kmalloc_class(b)),
        (b, false) => format!("kmalloc-{}", kmalloc_class(b)),
    }
}

fn kmalloc_class(bytes: u64) -> String {
    if bytes >= 1024 && bytes.is_multiple_of(1024) {
        format!("{}k", bytes / 1024)
    } else {
        bytes.to_string()
    }
}

impl Run {
    fn report(&mut self, kind: &'static str, kernel: Counters) -> Report {
        let now = monotonic_ns();
        let mut snapshot = self.tracker.snapshot(now, &self.opts);
        for m in &mut snapshot.memcgs {
            for s in &mut m.pinned_stacks {
                let frames = self.tracker.stacks.frames(s.stack);
                s.kernel = crate::symbolize::tracing::strip_tracing_frames(
                    self.symbols.kernel_frames(frames),
                );
            }
        }
        self.symbols.trim();
        let kernel_dying = self
            .hierarchy
            .dying_now(Path::new("/"))
            .map_or(self.dying_at_start.count, |d| d.count);
        Report {
            schema_version: SCHEMA_VERSION,
            report: "memcg",
            kind,
            elapsed_s: now.saturating_sub(self.started_ns) as f64 / 1e9,
            mode: self.mode.clone(),
            attribution: self.attribution.clone(),
            hierarchy: self.hierarchy.clone(),
            zombie_after_s: self.opts.zombie_after_ns as f64 / 1e9,
            preexisting_dying: Preexisting {
                at_start: self.dying_at_start.count,
                now: kernel_dying.saturating_sub(self.tracker.tracked_dying()),
                kernel_dying_now: kernel_dying,
                source: self.dying_at_start.source.clone(),
            },
            snapshot,
            kernel,
            decode_errors: self.decode_errors,
            kernel_memcgs: matches!(kind, "list" | "final").then(KernelMemcgs::read),
            kmem_accounting: kmem::Accounting::detect(Path::new("/"), &self.hierarchy),
        }
    }
}

fn emit_snapshot(args: &MemcgArgs, report: &Report) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if args.json {
        let line = serde_json::to_string(report).context("encoding JSON snapshot")?;
        writeln!(out, "{line}")?;
    } else {
        let text = view::render(report, args, false);
        writeln!(out, "{text}---")?;
    }
    out.flush()?;
    Ok(())
}

fn emit_final(args: &MemcgArgs, report: &Report, pprof: Option<&Destination>) -> Result<()> {
    // The profile first: a closed stdout must not cost the file.
    if let Some(dest) = pprof {
        dest.write(&pprof::profile(report)?)?;
        eprintln!("leaktrace: wrote pprof profile {}", dest.path.display());
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        let line = serde_json::to_string(report).context("encoding JSON report")?;
        writeln!(out, "{line}")?;
    } else if let Some(id) = args.why {
        writeln!(out, "{}", view::why(report, id))?;
    } else {
        writeln!(out, "{}", view::render(report, args, true))?;
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kmalloc_names() {
        assert_eq!(kmalloc_name(512, true), "kmalloc-cg-512");
        assert_eq!(kmalloc_name(2048, true), "kmalloc-cg-2k");
        assert_eq!(kmalloc_name(96, false), "kmalloc-96");
        assert_eq!(kmalloc_name(16384, true), "kmalloc-large (pages)");
    }

    #[test]
    fn short_events_are_refused() {
        assert!(read_event::<UnchargeEvent>(&[0u8; 8]).is_none());
        assert!(read_event::<UnchargeEvent>(&[0u8; 16]).is_some());
        assert_eq!(cstr(b"abc\0def"), "abc");
    }
}
