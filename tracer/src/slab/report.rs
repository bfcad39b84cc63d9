//! The slab tracer's report model, which is the JSON schema
//! (docs/json-schema.md): the report, its rows (processes, stacks, cgroups,
//! groups) and their counts, sort and grouping keys. The live table builds
//! the rows (`aggregator.rs`), `naming.rs` names them, `grouping.rs` sums
//! them; the text views, `--json` and every output render this one model,
//! so they can never disagree.

use serde::Serialize;

/// The report holds the kernel-memory ledger; views read it from here.
pub use crate::kernel::ledger::LedgerPicture;
use crate::{kernel::meminfo::MemInfo, slab::zoom::ZoomReport};

/// Rows name their stacks by id in the run's stack table (see [`StackReport`]).
pub use crate::bpf::stacks::StackId;

pub use crate::slab::counters::KernelCounters;

pub const SCHEMA_VERSION: u32 = 3;

/// The memcg that paid for allocations the task made on another's behalf.
#[derive(Debug, Clone, Serialize)]
pub struct ChargedElsewhere {
    pub cgroup_id: u64,
    pub cgroup: Option<String>,
    pub allocs: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema_version: u32,
    /// "snapshot" for periodic output, "final" for the report at exit.
    pub kind: &'static str,
    /// The traced slab cache, or `percpu` ([`MemorySource::Percpu`]).
    pub cache: String,
    /// Which kind of kernel memory the report counts.
    pub source: MemorySource,
    pub aliases: Vec<String>,
    pub elapsed_s: f64,
    /// leaktrace's own resident memory (VmRSS); its kernel side is `kernel.map_bytes`.
    pub rss_bytes: Option<u64>,
    pub meminfo: Option<MemInfo>,
    /// Every kernel bucket of /proc/meminfo and the residual, with growth since attach.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ledger: Option<LedgerPicture>,
    pub slab: Option<SlabPicture>,
    pub totals: Counts,
    pub kernel: KernelCounters,
    pub anomalies: Anomalies,
    pub stacks: StackSampling,
    pub age: AgeSummary,
    pub processes: Vec<ProcessReport>,
    pub cgroups: Vec<CgroupReport>,
    /// What `groups` aggregates processes by (`--group-by`).
    pub group_by: GroupBy,
    /// Processes aggregated by `group_by`; absent when grouping by process.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<GroupReport>,
    /// The final report's stacks merged across all processes (same kernel and
    /// user frames), largest first; absent from snapshots.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub top_stacks: Vec<MergedStack>,
    /// The `--pid` process; absent without --pid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traced: Option<TracedPid>,
    /// `--pages`: the pages /proc/kpageflags took back from the counts
    /// (`pages/kpageflags.rs`); absent for a slab cache.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pages: Option<PageClasses>,
    /// `--all-caches`: estimates from the byte-sampled allocations of every
    /// cache, with their coverage; absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kheap: Option<KheapSummary>,
    /// What `totals` and the processes' stack counts count: "samples"
    /// under `--all-caches` (sampled allocations, not objects: the
    /// estimates are `kheap`'s); absent where they count objects.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counts_are: Option<&'static str>,
}

/// Pages taken back from the counts since attach, by why.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PageClasses {
    /// Became slab pages (`Slab` counts them; trace with `--cache`).
    pub slab: u64,
    /// Became page tables (`PageTables` counts them).
    pub page_table: u64,
    /// Found free in the buddy allocator: their free was not seen.
    pub free_unseen: u64,
    /// Found on an LRU list or anonymous: freed unseen and reused for user
    /// or page-cache memory.
    pub user: u64,
    /// Outstanding pfns that /proc/kpageflags could not be read for (left counted).
    pub unreadable: u64,
}

/// The kind of kernel memory a report counts: a slab cache (`--cache`),
/// per-CPU allocations (`--percpu`, bytes = size x possible CPUs) or the page
/// allocator's unmovable blocks (`--pages`, bytes = PAGE_SIZE << order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MemorySource {
    Slab,
    Percpu,
    Pages,
}

impl MemorySource {
    /// What headers, titles and comments call the traced memory, `cache`
    /// being the report's.
    pub fn describe(self, cache: &str) -> String {
        match self {
            MemorySource::Slab => format!("cache {cache}"),
            MemorySource::Percpu => "per-CPU allocations".to_string(),
            MemorySource::Pages => "unmovable page blocks".to_string(),
        }
    }
}

impl Report {
    /// [`MemorySource::describe`] of this report.
    pub fn traced(&self) -> String {
        self.source.describe(&self.cache)
    }

    /// The traced memory by its bare name: the cache's, or "per-CPU allocations".
    pub fn memory(&self) -> String {
        match self.source {
            MemorySource::Slab => self.cache.clone(),
            MemorySource::Percpu | MemorySource::Pages => self.traced(),
        }
    }
}

/// `--pid`'s process and whether it is still there: objects it allocated stay
/// counted after it exits, and the header says why they no longer grow.
#[derive(Debug, Clone, Serialize)]
pub struct TracedPid {
    pub pid: u32,
    /// Seconds after attach at which it was found gone; null while it runs.
    pub exited_after_s: Option<f64>,
}

/// The cache as /proc/slabinfo sees it: every object, not only those allocated
/// since attach, so the tracked count can be compared with real growth.
#[derive(Debug, Clone, Serialize)]
pub struct SlabPicture {
    pub active_objs: u64,
    pub num_objs: u64,
    pub objsize: u64,
    /// Change of active objects since attach (all caches merged into this one).
    pub active_objs_delta: i64,
    pub active_objs_per_sec: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProcessReport {
    pub tgid: u32,
    /// The process's start (ns, CLOCK_MONOTONIC, `group_leader->start_time`):
    /// with `tgid` it names one process; 0 where the kernel could not read it.
    pub start_ns: u64,
    /// Parent process at its first allocation (`real_parent->tgid` read by
    /// the kernel then); 0 when unknown.
    pub ppid: u32,
    /// The parent's comm as /proc showed it when the process was first seen.
    pub parent_comm: Option<String>,
    /// Gone (it still holds the objects counted here).
    pub exited: bool,
    /// `softirq`, `irq` or `nmi`: not a process but the allocations made
    /// while serving that kind of interrupt, whoever was interrupted (`tgid` 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<&'static str>,
    pub comm: String,
    pub cmdline: Option<String>,
    pub cgroup_id: u64,
    pub cgroup: Option<String>,
    /// `namespace/pod[/container]` where the cgroup path carries a pod UID
    /// that kubelet's /var/log/pods names (`kernel/pods.rs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// Remote charging: allocations of this process that another memcg paid
    /// for (`current->active_memcg`, e.g. inotify events charged to the
    /// watcher), and that memcg (the last one seen).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub charged_elsewhere: Option<ChargedElsewhere>,
    #[serde(flatten)]
    pub counts: Counts,
    pub alloc_rate: f64,
    pub growth_rate: f64,
    /// With `--user-paths` only: false when some allocation's user path could
    /// not be fingerprinted (no frame pointers past the syscall's entry), so its
    /// stacks are split by random sampling only, still unbiased but with wider
    /// intervals.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fingerprinted: Option<bool>,
    pub unfingerprinted_allocs: u64,
    pub stacks: Vec<StackReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StackReport {
    /// The stacks in the run's stack table, for `naming.rs` to symbolize;
    /// meaningless outside the run that built the row.
    #[serde(skip)]
    pub kstack: StackId,
    #[serde(skip)]
    pub ustack: StackId,
    /// Exact, or unbiased estimates when `estimated` (see the aggregator).
    #[serde(flatten)]
    pub counts: Counts,
    pub estimated: bool,
    /// 95% interval for `outstanding`; equal to it when exact.
    pub outstanding_low: u64,
    pub outstanding_high: u64,
    /// Only the frames all of this stratum's objects share are known.
    pub partial: bool,
    /// Exact outstanding count of the stratum (process, call site, user path)
    /// this stack's estimate is a share of.
    pub stratum_outstanding: u64,
    pub kernel: Vec<String>,
    pub user: Vec<String>,
    /// The same stacks by return address, for outputs that carry addresses
    /// (pprof). Kept out of JSON so schema_version 1 stays as documented.
    #[serde(skip)]
    pub kernel_locations: Vec<Location>,
    #[serde(skip)]
    pub user_locations: Vec<Location>,
}

impl Report {
    /// What a view shows of a complete report: the first `limit` processes
    /// whose comm contains `comm`, each with its first `stacks` stacks (both
    /// lists are already in `--sort` order).
    pub fn cut(&self, limit: usize, stacks: usize, comm: Option<&str>) -> Report {
        let mut cut = self.clone();
        cut.processes = self
            .processes
            .iter()
            .filter(|p| comm.is_none_or(|c| p.comm.contains(c)))
            .take(limit)
            .cloned()
            .map(|mut p| {
                p.stacks.truncate(stacks);
                p
            })
            .collect();
        cut.cgroups.truncate(limit);
        cut.groups.truncate(limit);
        for g in &mut cut.groups {
            g.stacks.truncate(stacks);
        }
        cut.top_stacks.truncate(limit);
        cut
    }
}

impl StackReport {
    /// `1,234` when exact, `~1,234 (95%: 1,100-1,300)` when estimated.
    pub fn outstanding_label(&self, group: impl Fn(u64) -> String) -> String {
        if self.estimated && self.stratum_outstanding > 0 {
            format!(
                "~{} (95%: {}-{})",
                group(self.counts.outstanding),
                group(self.outstanding_low),
                group(self.outstanding_high)
            )
        } else {
            group(self.counts.outstanding)
        }
    }
}

/// One return address and the frames it names: several for inlined Go calls,
/// which pprof represents as one location with several lines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Location {
    pub addr: u64,
    pub frames: Vec<String>,
    /// The user file the address lies in (None for kernel frames and where
    /// unknown): pprof's Mapping, so an unnamed frame still says which
    /// library and build it is in.
    pub module: Option<std::sync::Arc<MappedFile>>,
}

/// Outputs name a user frame's file through the report (pprof's Mapping).
pub use crate::symbolize::MappedFile;

#[derive(Debug, Clone, Serialize)]
pub struct CgroupReport {
    pub cgroup_id: u64,
    pub path: Option<String>,
    /// As [`ProcessReport::pod`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(flatten)]
    pub counts: Counts,
}

/// How rows are ordered: `--sort`'s values, the model's and the live view's
/// starting column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SortKey {
    /// Objects allocated and not yet freed.
    #[default]
    Outstanding,
    /// Allocations per second over --rate-window: a retry loop shows up here before it leaks.
    Rate,
    /// Allocations since attach.
    Allocs,
}

impl SortKey {
    /// The flag's spelling, as the text view's header names the order.
    pub fn name(self) -> &'static str {
        match self {
            SortKey::Outstanding => "outstanding",
            SortKey::Rate => "rate",
            SortKey::Allocs => "allocs",
        }
    }

    /// Ascending order of two rows, each given as (counts, allocations per second).
    pub fn compare(self, a: (&Counts, f64), b: (&Counts, f64)) -> std::cmp::Ordering {
        match self {
            SortKey::Outstanding => {
                (a.0.outstanding_bytes, a.0.allocs).cmp(&(b.0.outstanding_bytes, b.0.allocs))
            }
            SortKey::Rate => a.1.total_cmp(&b.1),
            SortKey::Allocs => a.0.allocs.cmp(&b.0.allocs),
        }
    }
}

/// One process: its tgid and its start (`group_leader->start_time`, ns; 0
/// where the kernel side could not read it). A reused PID is another key, so
/// two processes are never merged into one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ProcKey {
    pub tgid: u32,
    pub start_ns: u64,
}

/// Objects and bytes outstanding (allocated since attach, not yet freed),
/// and the allocations and frees counted since attach.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub outstanding: u64,
    pub outstanding_bytes: u64,
    pub allocs: u64,
    pub frees: u64,
}

impl Counts {
    /// One more allocation of `bytes`, outstanding.
    pub(super) fn alloc(&mut self, bytes: u64) {
        self.outstanding += 1;
        self.outstanding_bytes += bytes;
        self.allocs += 1;
    }

    /// One of them freed.
    pub(super) fn free(&mut self, bytes: u64) {
        self.outstanding = self.outstanding.saturating_sub(1);
        self.outstanding_bytes = self.outstanding_bytes.saturating_sub(bytes);
        self.frees += 1;
    }

    /// Part of one freed (a split page block), the rest still outstanding.
    pub(super) fn shrink(&mut self, bytes: u64) {
        self.outstanding_bytes = self.outstanding_bytes.saturating_sub(bytes);
    }

    /// One taken back: it turned out not to be of the traced kind (a page
    /// found to be a slab page), so it is neither outstanding nor an allocation.
    pub(super) fn retract(&mut self, bytes: u64) {
        self.outstanding = self.outstanding.saturating_sub(1);
        self.outstanding_bytes = self.outstanding_bytes.saturating_sub(bytes);
        self.allocs = self.allocs.saturating_sub(1);
    }
}

/// Everything userspace noticed that makes a number less than exact.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Anomalies {
    /// A free for a pointer we do not hold: an alloc event was lost or arrived
    /// before we attached to the ring. Should be 0.
    pub unmatched_frees: u64,
    /// A new allocation at a pointer we still held: its free was never reported
    /// (bulk/RCU free paths without a tracepoint). Counted as freed.
    pub freed_unseen: u64,
    pub kstack_failed: u64,
    pub ustack_failed: u64,
    pub decode_errors: u64,
}

/// How stacks were drawn, by route: `census` (a stratum's first
/// `census_allocs` allocations on a CPU, all drawn), `zoom` (strata whose
/// draw probability was raised for a while) and `sampled` (1 in
/// `sample_every`); `drawn` is their sum. The rest carried no stacks.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StackSampling {
    pub sample_every: u64,
    pub census_allocs: u32,
    /// Strata are keyed by the first user frames too (`--user-paths`).
    pub user_paths: bool,
    pub drawn: u64,
    pub census: u64,
    pub zoom: u64,
    pub sampled: u64,
    pub without_stacks: u64,
    pub strata: u64,
    /// Zoom episodes (filled by the run, which steers them).
    pub zoom_episodes: ZoomReport,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AgeSummary {
    pub count: u64,
    pub p50_ms: u64,
    pub p99_ms: u64,
    pub max_ms: u64,
}

/// What rows aggregate processes by: `--group-by`'s values, the report's
/// `group_by` and the live view's key `G`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    /// One row per process (tgid and start time: a reused PID is another row).
    #[default]
    Process,
    /// Processes with the same command name.
    Comm,
    /// Processes with the same parent when they allocated.
    Parent,
    /// Processes in the same cgroup (the memory cgroup on cgroup v1).
    Cgroup,
    /// Processes in the same container (id decoded from the cgroup path).
    Container,
    /// Processes in the same Kubernetes pod (UID decoded from the cgroup path).
    Pod,
    /// Identical kernel and user stacks, across processes.
    Stack,
    /// The slab cache (`--all-caches` only: a traced run sees one cache).
    Cache,
}

impl GroupBy {
    /// Every grouping, in the order the live view's key `G` steps through them.
    pub const CYCLE: [GroupBy; 7] = [
        GroupBy::Process,
        GroupBy::Comm,
        GroupBy::Parent,
        GroupBy::Cgroup,
        GroupBy::Container,
        GroupBy::Pod,
        GroupBy::Stack,
    ];

    pub fn name(self) -> &'static str {
        match self {
            GroupBy::Process => "process",
            GroupBy::Comm => "comm",
            GroupBy::Parent => "parent",
            GroupBy::Cgroup => "cgroup",
            GroupBy::Container => "container",
            GroupBy::Pod => "pod",
            GroupBy::Stack => "stack",
            GroupBy::Cache => "cache",
        }
    }

    /// The next grouping, for the live view's key.
    pub fn next(self) -> GroupBy {
        let i = Self::CYCLE.iter().position(|&g| g == self).unwrap_or(0);
        Self::CYCLE[(i + 1) % Self::CYCLE.len()]
    }
}

/// One stack summed over the processes that allocated through it.
#[derive(Debug, Clone, Serialize)]
pub struct MergedStack {
    /// Sums of the processes' rows: counts, and the 95% bounds summed (each
    /// process's interval holds with 95%; the sum is a looser bound).
    #[serde(flatten)]
    pub stack: StackReport,
    /// Processes whose rows were summed.
    pub processes: u64,
    /// Of `processes`, those gone (their objects are still counted).
    pub exited: u64,
}

/// Processes that share one key.
#[derive(Debug, Clone, Serialize)]
pub struct GroupReport {
    /// The shared value: a comm, `PPID (parent comm)`, a cgroup path, a
    /// container id, a pod UID, or a stack's innermost frames.
    pub key: String,
    pub processes: u64,
    /// Of `processes`, those gone that still hold objects here.
    pub exited: u64,
    #[serde(flatten)]
    pub counts: Counts,
    /// Sums of the processes' rates (per second, over --rate-window).
    pub alloc_rate: f64,
    pub growth_rate: f64,
    /// The group's stacks merged across its processes, in `--sort` order.
    pub stacks: Vec<MergedStack>,
}

/// A small report with one leaking process and one stack, for the renderers' tests.
#[cfg(test)]
pub(crate) fn test_report() -> Report {
    use crate::slab::report::{Location, ProcessReport, StackReport};
    let loc = |addr: u64, f: &[&str]| Location {
        addr,
        frames: f.iter().map(|s| s.to_string()).collect(),
        module: None,
    };
    Report {
        schema_version: crate::slab::report::SCHEMA_VERSION,
        kind: "final",
        cache: "kmalloc-512".to_string(),
        source: crate::slab::report::MemorySource::Slab,
        aliases: Vec::new(),
        elapsed_s: 2.5,
        rss_bytes: None,
        meminfo: None,
        ledger: None,
        slab: None,
        totals: Counts {
            outstanding: 4,
            outstanding_bytes: 2048,
            allocs: 10,
            frees: 6,
        },
        kernel: Default::default(),
        anomalies: Default::default(),
        stacks: Default::default(),
        age: Default::default(),
        processes: vec![ProcessReport {
            tgid: 42,
            start_ns: 0,
            ppid: 0,
            parent_comm: None,
            exited: false,
            context: None,
            comm: "leak;er".to_string(),
            cmdline: Some("/usr/bin/leaker --fast".to_string()),
            cgroup_id: 9,
            cgroup: Some("/pods/a".to_string()),
            pod: None,
            charged_elsewhere: None,
            counts: Counts {
                outstanding: 4,
                outstanding_bytes: 2048,
                allocs: 10,
                frees: 6,
            },
            alloc_rate: 0.0,
            growth_rate: 0.0,
            fingerprinted: Some(true),
            unfingerprinted_allocs: 0,
            stacks: vec![StackReport {
                kstack: StackId::EMPTY,
                ustack: StackId::EMPTY,
                counts: Counts {
                    outstanding: 4,
                    outstanding_bytes: 2048,
                    allocs: 10,
                    frees: 6,
                },
                estimated: false,
                outstanding_low: 4,
                outstanding_high: 4,
                partial: false,
                stratum_outstanding: 4,
                kernel: vec!["__kmalloc+0x10".into(), "user_preparse+0x2f".into()],
                user: vec!["inlined+0x1".into(), "outer+0x5".into(), "main+0x9".into()],
                kernel_locations: vec![
                    loc(0xffff_0010, &["__kmalloc+0x10"]),
                    loc(0xffff_0020, &["user_preparse+0x2f"]),
                ],
                user_locations: vec![
                    loc(0x1000, &["inlined+0x1", "outer+0x5"]),
                    loc(0x2000, &["main+0x9"]),
                ],
            }],
        }],
        cgroups: Vec::new(),
        group_by: Default::default(),
        groups: Vec::new(),
        top_stacks: Vec::new(),
        traced: None,
        pages: None,
        kheap: None,
        counts_are: None,
    }
}

/// [`test_report`] as an `--all-caches` run: its one stack holds 4
/// samples of 512 B at a 64 KiB rate, estimated ~257 KiB in use in one row,
/// with the row's frames; nothing dropped or lost.
#[cfg(test)]
pub(crate) fn test_kheap_report() -> Report {
    let mut r = test_report();
    let s = &r.processes[0].stacks[0];
    r.counts_are = Some("samples");
    r.kheap = Some(KheapSummary {
        sample_bytes: 65_536,
        since_unix_s: 1_700_000_000,
        samples: 10,
        samples_held: 4,
        inuse_bytes: 263_170,
        caches: vec![KheapCache {
            name: "kmalloc-512".into(),
            samples: 4,
            inuse_objects: 514,
            inuse_bytes: 263_170,
            inuse_bytes_low: 71_700,
            inuse_bytes_high: 673_800,
        }],
        rows: vec![KheapRow {
            tgid: 42,
            start_ns: 0,
            kstack: s.kstack,
            ustack: s.ustack,
            cache: "kmalloc-512".into(),
            samples: 4,
            inuse_objects: 514,
            inuse_bytes: 263_170,
            inuse_bytes_low: 71_700,
            inuse_bytes_high: 673_800,
            alloc_objects: 1_285,
            alloc_bytes: 657_925,
            kernel: s.kernel.clone(),
            user: s.user.clone(),
            exited: None,
        }],
        ..KheapSummary::default()
    });
    r
}

/// A [`KheapRow`]'s `tgid` for the allocations of exited processes whose
/// rows were forgotten (`slab/kheap.rs`): not a process id (0 is interrupts').
pub const FORGOTTEN: u32 = u32::MAX;

/// `--all-caches`: estimates from byte-sampled allocations, with coverage.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct KheapSummary {
    /// Mean bytes between samples (`--sample-bytes`).
    pub sample_bytes: u64,
    /// Unix time (s) the sampling began: only allocations since count.
    pub since_unix_s: u64,
    /// Samples taken since, and still held.
    pub samples: u64,
    pub samples_held: u64,
    /// Samples found held at an address allocated again (freed unseen).
    pub stale: u64,
    /// Samples the live table had no room for (`dropped`) and samples the
    /// ring buffer had no room for (`lost_samples`): in-use estimates are
    /// low by at least `low_by_at_least_bytes` (each stood for at least
    /// `sample_bytes`; for objects larger than the rate, about their size).
    pub dropped: u64,
    pub lost_samples: u64,
    pub low_by_at_least_bytes: u64,
    /// Frees of held samples the ring buffer had no room for: those
    /// samples stay held (until their address is allocated again), so
    /// in-use estimates may be high, by at most `high_by_at_most_bytes`
    /// (the largest that many held samples' weights).
    pub lost_sample_frees: u64,
    pub high_by_at_most_bytes: u64,
    /// Estimated bytes in use, every cache.
    pub inuse_bytes: u64,
    /// By cache, largest first.
    pub caches: Vec<KheapCache>,
    /// By (process, stacks, cache), largest in use first.
    pub rows: Vec<KheapRow>,
    /// The same estimates summed by `--group-by`, largest in use first.
    pub group_by: GroupBy,
    pub groups: Vec<KheapGroup>,
}

impl KheapSummary {
    /// What the samples missed and what that does to the estimates, for
    /// every answer's coverage line (text, pprof comment): "none dropped or
    /// lost" when nothing was; `bytes` writes a byte count.
    pub fn losses(&self, bytes: impl Fn(u64) -> String) -> String {
        let mut parts = Vec::new();
        if self.dropped + self.lost_samples > 0 {
            parts.push(format!(
                "{} samples dropped (table full) and {} lost (ring buffer full): in-use estimates \
                 are low by at least {} (each stood for at least {}; for objects larger than that, \
                 about their size)",
                self.dropped,
                self.lost_samples,
                bytes(self.low_by_at_least_bytes),
                bytes(self.sample_bytes),
            ));
        }
        if self.lost_sample_frees > 0 {
            parts.push(format!(
                "{} frees of samples lost (ring buffer full): in-use estimates may be high by up \
                 to {} (those samples stay held until their address is allocated again)",
                self.lost_sample_frees,
                bytes(self.high_by_at_most_bytes),
            ));
        }
        if parts.is_empty() {
            "none dropped or lost".to_string()
        } else {
            parts.join("; ")
        }
    }
}

/// The in-use estimate of every row whose process, stacks or cache
/// `--group-by` maps to `key`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct KheapGroup {
    pub key: String,
    pub samples: u64,
    pub inuse_objects: u64,
    pub inuse_bytes: u64,
    pub inuse_bytes_low: u64,
    pub inuse_bytes_high: u64,
    pub alloc_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct KheapCache {
    pub name: String,
    pub samples: u64,
    pub inuse_objects: u64,
    pub inuse_bytes: u64,
    pub inuse_bytes_low: u64,
    pub inuse_bytes_high: u64,
}

/// A [`KheapRow`] of processes forgotten after they exited while their
/// sampled objects lived on, folded by what repeats across churn: their
/// comm, cgroup, stacks (by content) and cache. Its pid is shown as
/// exited; its names were read while the processes were alive.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExitedRow {
    pub comm: String,
    pub cgroup_id: u64,
    pub cgroup: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// Processes whose samples were folded into the row.
    pub processes: u64,
    pub kernel: Vec<String>,
    pub user: Vec<String>,
    /// The same by return address (pprof): the first folded process's
    /// addresses of these frames.
    #[serde(skip)]
    pub kernel_locations: Vec<Location>,
    #[serde(skip)]
    pub user_locations: Vec<Location>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KheapRow {
    /// [`FORGOTTEN`] for the rows of forgotten processes (`exited` says
    /// what a folded one kept).
    pub tgid: u32,
    /// With `tgid`, one process (0 for forgotten rows).
    pub start_ns: u64,
    #[serde(skip)]
    pub kstack: StackId,
    #[serde(skip)]
    pub ustack: StackId,
    pub cache: String,
    pub samples: u64,
    pub inuse_objects: u64,
    pub inuse_bytes: u64,
    pub inuse_bytes_low: u64,
    pub inuse_bytes_high: u64,
    pub alloc_objects: u64,
    pub alloc_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exited: Option<ExitedRow>,
    /// The row's stacks, symbolized (allocator first; user innermost
    /// first); empty for exited processes' rows, which keep no stack.
    pub kernel: Vec<String>,
    pub user: Vec<String>,
}

#[cfg(test)]
mod kheap_tests {
    use super::*;

    #[test]
    fn losses_say_none_or_which_way_each_loss_moves_the_estimates() {
        let mut k = test_kheap_report().kheap.expect("kheap");
        let b = |n: u64| format!("{n} B");
        assert_eq!(k.losses(b), "none dropped or lost");
        k.dropped = 2;
        k.lost_samples = 3;
        k.low_by_at_least_bytes = 5 * 65_536;
        let low = k.losses(b);
        assert!(
            low.starts_with("2 samples dropped (table full) and 3 lost (ring buffer full): in-use estimates are low by at least 327680 B (each stood for at least 65536 B"),
            "{low}"
        );
        assert!(!low.contains("high"), "{low}");
        k.lost_sample_frees = 1;
        k.high_by_at_most_bytes = 131_072;
        let both = k.losses(b);
        assert!(
            both.contains("; 1 frees of samples lost (ring buffer full): in-use estimates may be high by up to 131072 B"),
            "{both}"
        );
    }
}
