//! A snapshot made presentable: symbolized stacks, process and cgroup names, the
//! node's memory picture and the cache's slabinfo line. Both the text views and
//! `--json` render this one model, so they can never disagree.

use serde::Serialize;

use crate::{
    bpf::stacks::StackTable,
    kernel::meminfo::MemInfo,
    kernel::pods::PodNames,
    kernel::procinfo::{CgroupPaths, ProcMeta},
    slab::aggregator::{AgeSummary, Anomalies, Counts, ProcKey, Snapshot, StackSampling},
    slab::grouping::{GroupBy, GroupReport, MergedStack},
    symbolize::{tracing::strip_tracing_frames, Symbolizer},
};

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
    pub cache: String,
    pub aliases: Vec<String>,
    pub elapsed_s: f64,
    /// leaktrace's own resident memory (VmRSS); its kernel side is `kernel.map_bytes`.
    pub rss_bytes: Option<u64>,
    pub meminfo: Option<MemInfo>,
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

/// Where names come from; borrowed from the run loop's caches.
pub struct Naming<'a> {
    pub symbols: &'a mut Symbolizer,
    pub stacks: &'a StackTable,
    pub procs: &'a std::collections::HashMap<ProcKey, ProcMeta>,
    pub cgroups: &'a mut CgroupPaths,
    pub pods: &'a mut PodNames,
}

/// `namespace/pod[/container]` of a cgroup path, where kubelet names it.
fn pod_of(pods: &mut PodNames, path: Option<&str>) -> Option<String> {
    let p = pods.resolve(path?)?;
    Some(match p.container {
        Some(c) => format!("{}/{}/{c}", p.namespace, p.pod),
        None => format!("{}/{}", p.namespace, p.pod),
    })
}

pub struct Header {
    pub cache: String,
    pub aliases: Vec<String>,
    pub elapsed_s: f64,
    pub rss_bytes: Option<u64>,
    pub meminfo: Option<MemInfo>,
    pub slab: Option<SlabPicture>,
    pub kernel: KernelCounters,
}

pub fn build(kind: &'static str, header: Header, snap: Snapshot, names: &mut Naming<'_>) -> Report {
    let processes = snap
        .processes
        .into_iter()
        .map(|p| {
            let meta = names.procs.get(&ProcKey {
                tgid: p.tgid,
                start_ns: p.start_ns,
            });
            let cgroup = names.cgroups.path(p.cgroup_id).map(str::to_string);
            ProcessReport {
                tgid: p.tgid,
                start_ns: p.start_ns,
                ppid: p.ppid,
                parent_comm: meta.and_then(|m| m.parent_comm.clone()),
                exited: p.exited,
                context: p.context,
                comm: meta.and_then(|m| m.comm.clone()).unwrap_or(p.comm),
                cmdline: meta.and_then(|m| m.cmdline.clone()),
                cgroup_id: p.cgroup_id,
                pod: pod_of(names.pods, cgroup.as_deref()),
                cgroup,
                charged_elsewhere: p.charged_elsewhere.map(|(id, allocs)| ChargedElsewhere {
                    cgroup_id: id,
                    cgroup: names.cgroups.path(id).map(str::to_string),
                    allocs,
                }),
                counts: p.counts,
                alloc_rate: p.alloc_rate,
                growth_rate: p.growth_rate,
                fingerprinted: p.fingerprinted,
                unfingerprinted_allocs: p.unfingerprinted_allocs,
                stacks: p
                    .sites
                    .into_iter()
                    .map(|s| {
                        let kaddrs = names.stacks.frames(s.kstack);
                        let kall = names.symbols.kernel_frames(kaddrs);
                        let kernel = strip_tracing_frames(kall.clone());
                        let dropped = kall.len() - kernel.len();
                        let kernel_locations = kaddrs
                            .iter()
                            .zip(kall)
                            .skip(dropped)
                            .map(|(&addr, name)| Location {
                                addr,
                                frames: vec![name],
                                module: None,
                            })
                            .collect();
                        let uaddrs = names.stacks.frames(s.ustack);
                        let user = names.symbols.user_frames(p.tgid, uaddrs);
                        // Per address after the whole stack: every lookup is now a
                        // cache hit, and an address's inlined frames stay together.
                        let user_locations = uaddrs
                            .iter()
                            .map(|&addr| Location {
                                addr,
                                frames: names.symbols.user_frames(p.tgid, &[addr]),
                                module: names.symbols.user_file(p.tgid, addr),
                            })
                            .collect();
                        StackReport {
                            counts: s.counts,
                            estimated: s.estimated,
                            outstanding_low: s.outstanding_low,
                            outstanding_high: s.outstanding_high,
                            partial: s.partial,
                            stratum_outstanding: s.stratum_outstanding,
                            kernel,
                            user,
                            kernel_locations,
                            user_locations,
                        }
                    })
                    .collect(),
            }
        })
        .collect();
    let cgroups = snap
        .cgroups
        .into_iter()
        .map(|c| {
            let path = names.cgroups.path(c.cgroup_id).map(str::to_string);
            CgroupReport {
                cgroup_id: c.cgroup_id,
                pod: pod_of(names.pods, path.as_deref()),
                path,
                counts: c.counts,
            }
        })
        .collect();
    Report {
        schema_version: SCHEMA_VERSION,
        kind,
        cache: header.cache,
        aliases: header.aliases,
        elapsed_s: header.elapsed_s,
        rss_bytes: header.rss_bytes,
        meminfo: header.meminfo,
        slab: header.slab,
        totals: snap.totals,
        kernel: header.kernel,
        anomalies: snap.anomalies,
        stacks: snap.stacks,
        age: snap.age,
        processes,
        cgroups,
        group_by: GroupBy::Process,
        groups: Vec::new(),
        top_stacks: Vec::new(),
        traced: None,
    }
}

/// A small report with one leaking process and one stack, for the renderers' tests.
#[cfg(test)]
pub(crate) fn test_report() -> Report {
    use crate::{
        slab::aggregator::Counts,
        slab::report::{Location, ProcessReport, StackReport},
    };
    let loc = |addr: u64, f: &[&str]| Location {
        addr,
        frames: f.iter().map(|s| s.to_string()).collect(),
        module: None,
    };
    Report {
        schema_version: crate::slab::report::SCHEMA_VERSION,
        kind: "final",
        cache: "kmalloc-512".to_string(),
        aliases: Vec::new(),
        elapsed_s: 2.5,
        rss_bytes: None,
        meminfo: None,
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
    }
}
