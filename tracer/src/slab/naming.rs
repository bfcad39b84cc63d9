//! A snapshot of the live table made presentable: symbolized stacks,
//! process, cgroup and pod names, beside the header the session read (the
//! node's memory picture, the cache's slabinfo line, the kernel counters).

use crate::{
    bpf::stacks::StackTable,
    kernel::meminfo::MemInfo,
    kernel::pods::PodNames,
    kernel::procinfo::{CgroupPaths, ProcMeta},
    slab::aggregator::Snapshot,
    slab::report::{
        CgroupReport, ChargedElsewhere, GroupBy, KernelCounters, Location, ProcKey, ProcessReport,
        Report, SlabPicture, StackReport, SCHEMA_VERSION,
    },
    symbolize::{tracing::strip_tracing_frames, Symbolizer},
};

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
