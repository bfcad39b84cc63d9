//! A snapshot of the live table made presentable: symbolized stacks,
//! process, cgroup and pod names, beside the header the session read (the
//! node's memory picture, the cache's slabinfo line, the kernel counters).

use crate::{
    bpf::stacks::{StackId, StackTable},
    kernel::ledger::LedgerPicture,
    kernel::meminfo::MemInfo,
    kernel::pods::PodNames,
    kernel::procinfo::{CgroupPaths, ProcMeta},
    slab::aggregator::rows::Snapshot,
    slab::report::{
        ExitedRow, GroupBy, KernelCounters, Location, MemorySource, ProcKey, Report, SlabPicture,
        StackReport, SCHEMA_VERSION,
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
    pub source: MemorySource,
    pub aliases: Vec<String>,
    pub elapsed_s: f64,
    pub rss_bytes: Option<u64>,
    pub meminfo: Option<MemInfo>,
    pub ledger: Option<LedgerPicture>,
    pub slab: Option<SlabPicture>,
    pub kernel: KernelCounters,
}

/// The report of `snap`: its rows named in place (symbolized stacks,
/// process command lines and parents, cgroup paths and pods) under `header`.
pub fn build(kind: &'static str, header: Header, snap: Snapshot, names: &mut Naming<'_>) -> Report {
    let mut processes = snap.processes;
    for p in &mut processes {
        let meta = names.procs.get(&ProcKey {
            tgid: p.tgid,
            start_ns: p.start_ns,
        });
        if let Some(m) = meta {
            p.parent_comm = m.parent_comm.clone();
            if let Some(comm) = &m.comm {
                p.comm = comm.clone();
            }
            p.cmdline = m.cmdline.clone();
        }
        p.cgroup = names.cgroups.path(p.cgroup_id).map(str::to_string);
        p.pod = pod_of(names.pods, p.cgroup.as_deref());
        if let Some(c) = &mut p.charged_elsewhere {
            c.cgroup = names.cgroups.path(c.cgroup_id).map(str::to_string);
        }
        for s in &mut p.stacks {
            name_stack(s, p.tgid, names);
        }
    }
    let mut cgroups = snap.cgroups;
    for c in &mut cgroups {
        c.path = names.cgroups.path(c.cgroup_id).map(str::to_string);
        c.pod = pod_of(names.pods, c.path.as_deref());
    }
    Report {
        schema_version: SCHEMA_VERSION,
        kind,
        cache: header.cache,
        source: header.source,
        aliases: header.aliases,
        elapsed_s: header.elapsed_s,
        rss_bytes: header.rss_bytes,
        meminfo: header.meminfo,
        ledger: header.ledger,
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
        pages: None,
        kheap: None,
        counts_are: None,
    }
}

/// Names `s`'s frames: the kernel stack without the tracing frames above the
/// allocator, the user stack of process `tgid`, and both by address.
fn name_stack(s: &mut StackReport, tgid: u32, names: &mut Naming<'_>) {
    let n = named_stacks(tgid, s.kstack, s.ustack, names);
    (s.kernel, s.kernel_locations, s.user, s.user_locations) = n;
}

/// What `--all-caches` keeps of a process it forgets while its samples are
/// held (`slab/kheap.rs`): comm, cgroup and pod, and its stacks named now,
/// while its mappings are still at hand.
pub fn exited_row(
    tgid: u32,
    comm: &str,
    cgroup_id: u64,
    (kstack, ustack): (StackId, StackId),
    names: &mut Naming<'_>,
) -> ExitedRow {
    let cgroup = names.cgroups.path(cgroup_id).map(str::to_string);
    let pod = pod_of(names.pods, cgroup.as_deref());
    let (kernel, kernel_locations, user, user_locations) =
        named_stacks(tgid, kstack, ustack, names);
    ExitedRow {
        comm: comm.to_string(),
        cgroup_id,
        cgroup,
        pod,
        processes: 1,
        kernel,
        user,
        kernel_locations,
        user_locations,
    }
}

type Named = (Vec<String>, Vec<Location>, Vec<String>, Vec<Location>);

/// Kernel frames and locations, user frames and locations.
fn named_stacks(tgid: u32, kstack: StackId, ustack: StackId, names: &mut Naming<'_>) -> Named {
    let kaddrs = names.stacks.frames(kstack);
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
    let uaddrs = names.stacks.frames(ustack);
    let user = names.symbols.user_frames(tgid, uaddrs);
    // Per address after the whole stack: every lookup is now a
    // cache hit, and an address's inlined frames stay together.
    let user_locations = uaddrs
        .iter()
        .map(|&addr| Location {
            addr,
            frames: names.symbols.user_frames(tgid, &[addr]),
            module: names.symbols.user_file(tgid, addr),
        })
        .collect();
    (kernel, kernel_locations, user, user_locations)
}
