//! One slab-tracer run's state from attach to the final report: the live
//! table, the zoom controller, the names of processes, cgroups and frames, and
//! the cache's slabinfo line at attach. The pipeline drives it (drain, poll,
//! tick, report); this file owns what each of those does to the model.

use std::{
    collections::{HashMap, VecDeque},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use tracer_common::slab::Config;

use crate::{
    bpf::stacks::StackId,
    kernel::clock::monotonic_ns,
    kernel::ledger::{Ledger, LedgerPicture},
    kernel::meminfo,
    kernel::own_memory,
    kernel::pods::PodNames,
    kernel::procinfo::{self, CgroupPaths, ProcMeta, TracedProcess},
    kernel::slabinfo::{self, SlabLine},
    slab::aggregator::{rows::SnapshotOptions, Aggregator, Exited, Forgotten, Interrupt},
    slab::counters::KernelCounters,
    slab::decoder::Event,
    slab::grouping,
    slab::kheap::{self, Kheap, Sample},
    slab::naming::{self, Header, Naming},
    slab::probes::Probes,
    slab::report::{
        GroupBy, MemorySource, PageClasses, ProcKey, ProcessReport, Report, SlabPicture, TracedPid,
    },
    slab::source::{AllocSource, SlabCaches},
    slab::zoom::{self, Zoom},
    symbolize::Symbolizer,
};

/// Share of each poll period that may go to symbolization.
pub const SYMBOLIZE_BUDGET: Duration = Duration::from_millis(5);

/// What a session starts from, once the plan is final: the kernel side's
/// configuration fixes the aggregator's sampling and the zoom's base level.
pub struct Setup<'a> {
    pub config: &'a Config,
    /// Objects the kernel tracks at once: the table never needs more.
    pub max_objects: u32,
    /// Window of growth and allocation rates.
    pub rate_window: Duration,
    pub zoom_policy: zoom::Policy,
    /// Kallsyms already loaded (parsing it later would stall the first drains).
    pub symbols: Symbolizer,
    /// The hierarchy whose directories the kernel's cgroup ids are.
    pub cgroup_mount: Option<PathBuf>,
    pub pods_root: PathBuf,
    /// The cache's slabinfo line when attached.
    pub slab_baseline: Option<SlabLine>,
    /// CONFIG_VMAP_STACK, from the kernel facts (the ledger's KernelStack term).
    pub vmap_stack: Option<bool>,
    pub cache: String,
    pub source: MemorySource,
    pub aliases: Vec<String>,
    pub snapshot_opts: SnapshotOptions,
    pub traced: Option<TracedProcess>,
    pub group_by: GroupBy,
    /// What the source settles at each report; None for a slab cache.
    pub settle: Option<Box<dyn Settle>>,
    /// `--all-caches`: the samples' estimates.
    pub kheap: Option<Kheap>,
}

/// What a source learns about its outstanding objects only after their
/// allocation (the page source: `/proc/kpageflags`), settled before each
/// report: objects it takes back from `agg` leave the counts, and the
/// classes it returns go in the report's header.
pub trait Settle {
    /// `drained`: the ring buffer has been read to its end (the final
    /// report), so no event of what the kernel did before now is on its way.
    fn settle(&mut self, agg: &mut Aggregator, drained: bool) -> PageClasses;
}

/// The slab tracer's model during one run; see the module's docs.
pub struct Session {
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
    /// CONFIG_VMAP_STACK and the ledger at attach: the header's growth since attach.
    vmap_stack: Option<bool>,
    ledger_baseline: Option<(Ledger, Instant)>,
    cache: String,
    source: MemorySource,
    aliases: Vec<String>,
    started_ns: u64,
    snapshot_opts: SnapshotOptions,
    traced: Option<TracedProcess>,
    /// The live view may change it (key `G`).
    pub group_by: GroupBy,
    settle: Option<Box<dyn Settle>>,
    kheap: Option<Kheap>,
    config: Config,
}

impl Session {
    pub fn new(s: Setup<'_>) -> Session {
        let c = s.config;
        let vmap_stack = s.vmap_stack;
        Session {
            // The kernel map cannot hold more than --max-objects, so neither can we.
            agg: Aggregator::with_capacity(
                s.rate_window.as_nanos() as u64,
                s.max_objects as usize,
                c.stack_sample_mask + 1,
            )
            .fingerprinting(c.user_fingerprint != 0)
            .census(c.census_allocs),
            // No stacks at all: nothing to zoom into.
            zoom: Zoom::new(
                s.zoom_policy,
                if c.stack_flags == 0 {
                    0
                } else {
                    c.base_level as u8
                },
                monotonic_ns(),
            ),
            pending_stacks: VecDeque::new(),
            symbols: s.symbols,
            procs: HashMap::new(),
            cgroups: CgroupPaths::at(s.cgroup_mount),
            pods: PodNames::new(&s.pods_root),
            slab_baseline: s.slab_baseline.map(|l| (l, Instant::now())),
            vmap_stack,
            ledger_baseline: Ledger::read(Path::new("/"), vmap_stack)
                .ok()
                .map(|l| (l, Instant::now())),
            cache: s.cache,
            source: s.source,
            aliases: s.aliases,
            started_ns: monotonic_ns(),
            snapshot_opts: s.snapshot_opts,
            traced: s.traced,
            group_by: s.group_by,
            settle: s.settle,
            kheap: s.kheap,
            config: *s.config,
        }
    }

    /// The final report, once detached: what is left in `ring` (None when
    /// the loop failed and took it), every queued stack symbolized, and
    /// nothing cut: files and JSON hold everything tracked, --limit,
    /// --stacks and --comm cut the text view only.
    pub fn finish(
        &mut self,
        ring: Option<&mut RingBuf<MapData>>,
        kernel: KernelCounters,
    ) -> Report {
        if let Some(ring) = ring {
            self.drain(ring);
        }
        self.symbolize_pending(Duration::MAX);
        self.snapshot_opts = SnapshotOptions {
            limit: usize::MAX,
            stacks: usize::MAX,
            comm: None,
            ..self.snapshot_opts.clone()
        };
        self.report("final", kernel)
    }

    /// The report of everything counted so far: `kind` is "snapshot" or
    /// "final" (the final one also merges stacks across processes).
    /// The kernel's mean bytes between samples (`--all-caches`), if set.
    pub fn kheap_rate(&self) -> Option<u64> {
        Some(self.config.kheap.rate).filter(|&r| r > 0)
    }

    pub fn report(&mut self, kind: &'static str, kernel: KernelCounters) -> Report {
        let root = Path::new("/");
        let now = monotonic_ns();
        // Per-CPU allocations have no slabinfo line.
        // `--all-caches` names no one cache for a slabinfo line (and
        // slabinfo walks every cache, each refresh).
        let slab = (self.source == MemorySource::Slab && self.kheap.is_none())
            .then(|| slab_line(root, &self.cache, &self.aliases))
            .flatten()
            .map(|now| slab_picture(&now, self.slab_baseline.as_ref()));
        let header = Header {
            cache: self.cache.clone(),
            source: self.source,
            aliases: self.aliases.clone(),
            elapsed_s: now.saturating_sub(self.started_ns) as f64 / 1e9,
            rss_bytes: own_memory::own_rss_bytes_recent(),
            meminfo: meminfo::read(root).ok(),
            ledger: self.ledger_baseline.as_ref().and_then(|(base, at)| {
                Ledger::read(root, self.vmap_stack)
                    .ok()
                    .map(|now| LedgerPicture::new(now, base, at.elapsed().as_secs_f64()))
            }),
            slab,
            kernel,
        };
        // Groups and stacks across processes sum every process, not the top ones.
        // Periodic snapshots are cut for the screen; the final report and
        // `--all-caches` profiles ("profile") keep every row.
        let opts = if self.group_by == GroupBy::Process && kind == "snapshot" {
            self.snapshot_opts.clone()
        } else {
            SnapshotOptions {
                limit: usize::MAX,
                stacks: usize::MAX,
                ..self.snapshot_opts.clone()
            }
        };
        let pages = self
            .settle
            .as_mut()
            .map(|s| s.settle(&mut self.agg, kind == "final"));
        let snap = self.agg.snapshot(now, &opts);
        let mut names = Naming {
            symbols: &mut self.symbols,
            stacks: &self.agg.stacks,
            procs: &self.procs,
            cgroups: &mut self.cgroups,
            pods: &mut self.pods,
        };
        let mut report = naming::build(kind, header, snap, &mut names);
        let k = &report.kernel;
        let ns_per_draw = if k.zoom_drawn == 0 {
            0.0
        } else {
            k.zoom_stack_ns as f64 / k.zoom_drawn as f64
        };
        report.stacks.zoom_episodes = self.zoom.report(ns_per_draw, |id| self.agg.zoom_drawn(id));
        for e in &mut report.stacks.zoom_episodes.episodes {
            e.call_site_name = if e.call_site == 0 {
                Some("(no call site: the hook gives none)".to_string())
            } else {
                self.symbols.kernel_frames(&[e.call_site]).pop()
            };
        }
        report.group_by = self.group_by;
        report.groups = grouping::group(&report.processes, self.group_by, opts.sort);
        if kind == "final" {
            report.top_stacks = grouping::top_stacks(&report.processes);
        }
        report.traced = self.watch_traced(root, now);
        report.pages = pages;
        report.kheap = self.kheap.as_ref().map(|k| {
            let procs: HashMap<ProcKey, &ProcessReport> = report
                .processes
                .iter()
                .map(|p| {
                    let key = ProcKey {
                        tgid: p.tgid,
                        start_ns: p.start_ns,
                    };
                    (key, p)
                })
                .collect();
            let c = &report.kernel;
            let mut summary = k.summary(kheap::KheapLosses {
                dropped: c.allocs_lost_map_full,
                samples: c.allocs_lost_ringbuf,
                sample_frees: c.frees_lost_ringbuf,
            });
            for row in &mut summary.rows {
                let key = ProcKey {
                    tgid: row.tgid,
                    start_ns: row.start_ns,
                };
                let stack = procs.get(&key).and_then(|p| {
                    p.stacks
                        .iter()
                        .find(|s| s.kstack == row.kstack && s.ustack == row.ustack)
                });
                if let Some(s) = stack {
                    row.kernel = s.kernel.clone();
                    row.user = s.user.clone();
                }
            }
            summary.group_by = self.group_by;
            summary.groups =
                k.groups(|who, cache| kheap::group_key(self.group_by, who, cache, &procs));
            summary
        });
        if report.kheap.is_some() {
            report.counts_are = Some("samples");
        }
        self.symbols.trim();
        // Next refresh re-walks cgroupfs on a miss: new containers appear mid-incident.
        self.cgroups.invalidate();
        report
    }

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

    /// Each poll: symbolizes queued stacks within `SYMBOLIZE_BUDGET`, and
    /// steps the zoom at its own pace (a quarter second, whatever the refresh
    /// interval), writing its draw rates to the kernel.
    pub fn poll(&mut self, probes: &mut Probes) {
        self.symbolize_pending(SYMBOLIZE_BUDGET);
        let now = monotonic_ns();
        if self.zoom.due(now) {
            let candidates = self.agg.zoom_candidates(now, self.zoom.policy().min_age_s);
            let writes = self.zoom.step(now, &candidates);
            let failed = probes.set_zoom(&writes);
            self.zoom.retry(failed);
        }
    }

    /// Each refresh: rates advance, and exited processes that hold nothing
    /// (under --all-caches, every exited process: its estimates' rows fold,
    /// named first) are forgotten with their names and queued stacks. `kept`
    /// (the --pid process) keeps its row after exit: the header says it exited.
    pub fn tick(&mut self, kept: Option<u32>) {
        self.agg.tick(monotonic_ns());
        // Under --all-caches every exited process goes: its rows fold.
        let how = match self.kheap {
            Some(_) => Exited::Fold,
            None => Exited::KeepBusiest,
        };
        let gone = self.agg.forget_exited(
            |tgid| Some(tgid) == kept || Path::new("/proc").join(tgid.to_string()).exists(),
            how,
        );
        if let Some(k) = self.kheap.as_mut() {
            // Before their names, mappings and stacks go: folded rows keep them.
            let mut names = Naming {
                symbols: &mut self.symbols,
                stacks: &self.agg.stacks,
                procs: &self.procs,
                cgroups: &mut self.cgroups,
                pods: &mut self.pods,
            };
            let by_key: HashMap<ProcKey, &Forgotten> = gone.iter().map(|f| (f.key, f)).collect();
            let keys: Vec<ProcKey> = gone.iter().map(|f| f.key).collect();
            k.forget(&keys, |key, kstack, ustack| {
                let f = by_key.get(&key);
                // /proc's name where it was read, as the report prefers.
                let comm = names
                    .procs
                    .get(&key)
                    .and_then(|m| m.comm.clone())
                    .or_else(|| f.map(|f| f.comm.clone()))
                    .unwrap_or_default();
                let cgroup_id = f.map_or(0, |f| f.cgroup_id);
                naming::exited_row(key.tgid, &comm, cgroup_id, (kstack, ustack), &mut names)
            });
        }
        for f in &gone {
            self.procs.remove(&f.key);
        }
        // A reused PID's live process keeps the mappings read for it.
        let gone_tgids: Vec<u32> = gone
            .iter()
            .map(|f| f.key.tgid)
            .filter(|&t| !self.procs.keys().any(|k| k.tgid == t))
            .collect();
        self.symbols.forget(&gone_tgids);
        if !gone.is_empty() {
            let rows: Vec<StackId> = self
                .kheap
                .as_ref()
                .map(|k| k.stacks_in_use().collect())
                .unwrap_or_default();
            self.agg.retain_stacks(rows);
        }
        // Their stack ids may be reused from now on.
        self.pending_stacks
            .retain(|(t, _)| !gone.iter().any(|f| f.key.tgid == *t));
    }

    /// Symbolize new user stacks while their processes are likely alive, but never
    /// for long at a time: parsing a binary takes milliseconds, and a burst of new
    /// processes must not keep the ring buffer from being drained.
    fn symbolize_pending(&mut self, budget: Duration) {
        let start = Instant::now();
        while let Some((tgid, ustack)) = self.pending_stacks.pop_front() {
            self.symbols
                .user_frames(tgid, self.agg.stacks.frames(ustack));
            if start.elapsed() >= budget {
                break;
            }
        }
    }

    /// Counts every record in `ring`, naming new processes and user stacks
    /// as they appear; an undecodable record is counted as a decode error.
    pub fn drain(&mut self, ring: &mut RingBuf<MapData>) {
        // New stacks are symbolized on the spot while this drain has spent little
        // time (the process may exit any moment, and a slow guest may not reach the
        // next poll in time); past the budget they wait in the queue.
        let start = Instant::now();
        while let Some(item) = ring.next() {
            match SlabCaches::decode(&item) {
                Ok(event) => {
                    let new = self.agg.apply(&event);
                    if let Some(k) = self.kheap.as_mut() {
                        match &event {
                            Event::Alloc(a) => {
                                // As the aggregator counts it: an allocation
                                // serving an interrupt is its pseudo-process's,
                                // without the interrupted task's user stack.
                                let (proc, ustack) = match Interrupt::of(a.context) {
                                    Some(irq) => (irq.key(), StackId::EMPTY),
                                    None => (
                                        ProcKey {
                                            tgid: a.tgid,
                                            start_ns: a.start_ns,
                                        },
                                        self.agg.stacks.intern(a.ustack),
                                    ),
                                };
                                k.alloc(
                                    &self.config,
                                    &Sample {
                                        ptr: a.ptr,
                                        tgid: proc.tgid,
                                        start_ns: proc.start_ns,
                                        kstack: self.agg.stacks.intern(a.kstack),
                                        ustack,
                                        source: a.source,
                                        bytes_alloc: a.bytes_alloc,
                                        gfp: a.gfp_flags,
                                        name_hash: a.bytes_req,
                                    },
                                )
                            }
                            Event::Free(f) => k.free(f.ptr),
                        }
                    }
                    if let Some(key) = new.process.filter(|k| Interrupt::of_key(*k).is_none()) {
                        // Mappings first: of all a short-lived process leaves, they
                        // are what naming its frames cannot do without.
                        self.symbols.snapshot(key.tgid);
                        let ppid = match &event {
                            Event::Alloc(a) => a.ppid,
                            Event::Free(_) => 0,
                        };
                        self.procs
                            .insert(key, procinfo::read_proc(Path::new("/"), key.tgid, ppid));
                    }
                    if let Some((tgid, ustack)) = new.user_stack {
                        self.symbols
                            .snapshot_covering(tgid, self.agg.stacks.frames(ustack));
                        if start.elapsed() < SYMBOLIZE_BUDGET {
                            self.symbols
                                .user_frames(tgid, self.agg.stacks.frames(ustack));
                        } else {
                            self.pending_stacks.push_back((tgid, ustack));
                        }
                    }
                }
                Err(_) => self.agg.decode_error(),
            }
        }
    }
}

/// What the counts and per-stack estimates mean under `config` (its census
/// and fingerprinting), with `stack_sample` the base rate asked for.
pub fn sampling_note(config: &Config, stack_sample: u64) -> String {
    format!(
        "every object is counted exactly per (process, kernel call site{}); full stacks are \
         captured for each new stratum's first {} allocations per CPU, for a random 1 in {} \
         of the rest, and more often for a while where a stratum's surviving objects are too \
         few for that rate to name (zoom); each draw's probability is recorded, and the drawn \
         objects split those \
         counts into unbiased per-stack estimates with a 95% interval (--exact captures \
         every stack)",
        if config.user_fingerprint != 0 {
            ", first user frames"
        } else {
            ""
        },
        config.census_allocs,
        stack_sample.max(1).next_power_of_two()
    )
}

/// The cache and everything merged into it as one /proc/slabinfo line: slabinfo
/// lists a merged group once, under one name, and kmalloc-rnd copies separately.
/// None where /proc/slabinfo is unreadable or lists none of them.
pub fn slab_line(root: &Path, cache: &str, aliases: &[String]) -> Option<SlabLine> {
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
