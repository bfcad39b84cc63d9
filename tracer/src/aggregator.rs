//! Outstanding objects, by process, by allocation site (kernel+user stack) and by
//! cgroup. Fed decoded events in ring-buffer order; asked for snapshots by views.

use std::collections::{HashMap, VecDeque};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::{
    cli::SortKey,
    decoder::{Alloc, Event, Free},
    stacks::{StackId, StackTable},
};

/// One allocation the kernel reported and we have not seen freed.
#[derive(Debug, Clone, Copy)]
/// 16 bytes, so a million outstanding objects cost ~24 MB of table: the time is
/// kept in ms since the first event and the cgroup as an index.
struct Live {
    ts_ms: u32,
    site: u32,
    bytes: u32,
    cgroup: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct SiteKey {
    tgid: u32,
    kstack: StackId,
    ustack: StackId,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub outstanding: u64,
    pub outstanding_bytes: u64,
    pub allocs: u64,
    pub frees: u64,
}

impl Counts {
    fn alloc(&mut self, bytes: u64) {
        self.outstanding += 1;
        self.outstanding_bytes += bytes;
        self.allocs += 1;
    }

    fn free(&mut self, bytes: u64) {
        self.outstanding = self.outstanding.saturating_sub(1);
        self.outstanding_bytes = self.outstanding_bytes.saturating_sub(bytes);
        self.frees += 1;
    }
}

#[derive(Debug)]
struct Site {
    key: SiteKey,
    counts: Counts,
}

#[derive(Debug)]
pub struct Process {
    pub tgid: u32,
    /// Thread name of the first allocating thread; views prefer /proc's.
    pub comm: String,
    pub last_cgroup_id: u64,
    pub counts: Counts,
    sites: Vec<u32>,
    /// (time, allocs, outstanding) at each tick inside the rate window.
    history: VecDeque<(u64, u64, u64)>,
    first_seen_ns: u64,
}

/// What an event introduced; see [`Aggregator::apply`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Novelty {
    pub process: Option<u32>,
    pub user_stack: Option<(u32, StackId)>,
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

/// How many allocations carried their own stacks and how many were attributed to
/// their (process, call site)'s last captured stack because stacks are sampled.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StackSampling {
    pub captured: u64,
    pub shared: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AgeSummary {
    pub count: u64,
    pub p50_ms: u64,
    pub p99_ms: u64,
    pub max_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SiteRow {
    #[serde(skip)]
    pub kstack: StackId,
    #[serde(skip)]
    pub ustack: StackId,
    #[serde(flatten)]
    pub counts: Counts,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProcRow {
    pub tgid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    #[serde(flatten)]
    pub counts: Counts,
    /// Allocations per second over the rate window.
    pub alloc_rate: f64,
    /// Change of outstanding objects per second over the rate window.
    pub growth_rate: f64,
    pub sites: Vec<SiteRow>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CgroupRow {
    pub cgroup_id: u64,
    #[serde(flatten)]
    pub counts: Counts,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Snapshot {
    pub totals: Counts,
    pub anomalies: Anomalies,
    pub stacks: StackSampling,
    pub age: AgeSummary,
    pub processes: Vec<ProcRow>,
    pub cgroups: Vec<CgroupRow>,
}

#[derive(Debug, Clone)]
pub struct SnapshotOptions {
    pub sort: SortKey,
    pub limit: usize,
    pub stacks: usize,
    pub comm: Option<String>,
    pub pid: Option<u32>,
}

#[derive(Debug)]
pub struct Aggregator {
    objects: HashMap<u64, Live>,
    sites: Vec<Site>,
    site_ids: HashMap<SiteKey, u32>,
    /// (tgid, kernel call site, user ip) -> the site of its last allocation with stacks.
    last_site: HashMap<(u32, u64, u64), u32>,
    sampling: StackSampling,
    procs: HashMap<u32, Process>,
    cgroups: HashMap<u64, Counts>,
    /// cgroup id by the index `Live` stores, and the reverse.
    cgroup_ids: Vec<u64>,
    cgroup_index: HashMap<u64, u32>,
    /// Kernel time of the first event: `Live::ts_ms` counts from here.
    base_ns: Option<u64>,
    pub stacks: StackTable,
    totals: Counts,
    anomalies: Anomalies,
    rate_window_ns: u64,
}

impl Aggregator {
    /// Room for `capacity` live objects is reserved up front: growing a table of
    /// a million entries briefly holds the old and the new one, a 1.5x peak in
    /// resident memory on a node that is already short of it. Untouched buckets
    /// cost address space, not RSS.
    pub fn with_capacity(rate_window_ns: u64, capacity: usize) -> Self {
        let mut agg = Self::new(rate_window_ns);
        agg.objects.reserve(capacity);
        agg
    }

    pub fn new(rate_window_ns: u64) -> Self {
        Aggregator {
            objects: HashMap::new(),
            sites: Vec::new(),
            site_ids: HashMap::new(),
            last_site: HashMap::new(),
            sampling: StackSampling::default(),
            procs: HashMap::new(),
            cgroups: HashMap::new(),
            cgroup_ids: Vec::new(),
            cgroup_index: HashMap::new(),
            base_ns: None,
            stacks: StackTable::default(),
            totals: Counts::default(),
            anomalies: Anomalies::default(),
            rate_window_ns,
        }
    }

    /// Says what this event introduced that must be looked up while the process
    /// is still alive: a new (or exec'd) process's /proc metadata, a new user
    /// stack's symbols. Short-lived processes are gone by the next refresh.
    pub fn apply(&mut self, event: &Event<'_>) -> Novelty {
        match event {
            Event::Alloc(a) => self.alloc(a),
            Event::Free(f) => {
                self.free(f);
                Novelty::default()
            }
        }
    }

    pub fn decode_error(&mut self) {
        self.anomalies.decode_errors += 1;
    }

    fn alloc(&mut self, a: &Alloc<'_>) -> Novelty {
        if a.kstack_err.is_some() {
            self.anomalies.kstack_failed += 1;
        }
        if a.ustack_err.is_some() && a.tgid != 0 {
            self.anomalies.ustack_failed += 1;
        }
        if let Some(old) = self.objects.remove(&a.ptr) {
            self.anomalies.freed_unseen += 1;
            self.release(old);
        }
        let (site, new_site) = self.site_of(a);
        let cgroup = self.cgroup_slot(a.cgroup_id);
        let ts_ms = self.ms_since_base(a.ts_ns);
        let bytes = a.bytes_alloc;
        self.sites[site as usize].counts.alloc(bytes);
        self.totals.alloc(bytes);
        self.cgroups.entry(a.cgroup_id).or_default().alloc(bytes);

        let mut new_proc = None;
        let proc = self.procs.entry(a.tgid).or_insert_with(|| {
            new_proc = Some(a.tgid);
            Process {
                tgid: a.tgid,
                comm: String::from_utf8_lossy(a.comm).into_owned(),
                last_cgroup_id: a.cgroup_id,
                counts: Counts::default(),
                sites: Vec::new(),
                history: VecDeque::new(),
                first_seen_ns: a.ts_ns,
            }
        });
        // Only the main thread's name tracks exec; other threads may carry their
        // own names and must not make us re-read /proc on every event.
        if a.pid == a.tgid && !a.sampled && proc.comm.as_bytes() != a.comm {
            proc.comm = String::from_utf8_lossy(a.comm).into_owned();
            new_proc = Some(a.tgid);
        }
        proc.counts.alloc(bytes);
        proc.last_cgroup_id = a.cgroup_id;
        if new_site {
            proc.sites.push(site);
        }
        self.objects.insert(
            a.ptr,
            Live {
                ts_ms,
                site,
                bytes: u32::try_from(bytes).unwrap_or(u32::MAX),
                cgroup,
            },
        );
        let new_user_stack = self
            .sites
            .get(site as usize)
            .filter(|s| new_site && s.key.ustack != StackId::EMPTY)
            .map(|s| (s.key.tgid, s.key.ustack));
        Novelty {
            process: new_proc,
            user_stack: new_user_stack,
        }
    }

    /// The site an allocation belongs to, and whether it is new. A sampled
    /// allocation joins its call site's last captured stack; if none was seen
    /// (its stack event was lost) it gets a site whose kernel stack is just the
    /// call site, which is still exact about the allocating function.
    fn site_of(&mut self, a: &Alloc<'_>) -> (u32, bool) {
        let site_key = (a.tgid, a.call_site, a.user_ip);
        if a.sampled {
            self.sampling.shared += 1;
            if let Some(&site) = self.last_site.get(&site_key) {
                return (site, false);
            }
        } else {
            self.sampling.captured += 1;
        }
        let kstack = if a.sampled {
            std::slice::from_ref(&a.call_site)
        } else {
            a.kstack
        };
        let key = SiteKey {
            tgid: a.tgid,
            kstack: self.stacks.intern(kstack),
            ustack: self.stacks.intern(a.ustack),
        };
        let next_id = self.sites.len() as u32;
        let site = *self.site_ids.entry(key).or_insert(next_id);
        if site == next_id {
            self.sites.push(Site {
                key,
                counts: Counts::default(),
            });
        }
        if !a.sampled {
            self.last_site.insert(site_key, site);
        }
        (site, site == next_id)
    }

    fn free(&mut self, f: &Free) {
        match self.objects.remove(&f.ptr) {
            Some(live) => self.release(live),
            None => self.anomalies.unmatched_frees += 1,
        }
    }

    fn release(&mut self, live: Live) {
        let bytes = u64::from(live.bytes);
        let Some(site) = self.sites.get_mut(live.site as usize) else {
            return;
        };
        site.counts.free(bytes);
        let tgid = site.key.tgid;
        self.totals.free(bytes);
        let cgroup_id = self.cgroup_ids.get(live.cgroup as usize).copied();
        if let Some(c) = cgroup_id.and_then(|id| self.cgroups.get_mut(&id)) {
            c.free(bytes);
        }
        if let Some(p) = self.procs.get_mut(&tgid) {
            p.counts.free(bytes);
        }
    }

    fn ms_since_base(&mut self, ts_ns: u64) -> u32 {
        let base = *self.base_ns.get_or_insert(ts_ns);
        u32::try_from(ts_ns.saturating_sub(base) / 1_000_000).unwrap_or(u32::MAX)
    }

    fn cgroup_slot(&mut self, id: u64) -> u32 {
        if let Some(&slot) = self.cgroup_index.get(&id) {
            return slot;
        }
        let slot = self.cgroup_ids.len() as u32;
        self.cgroup_ids.push(id);
        self.cgroup_index.insert(id, slot);
        slot
    }

    /// Record the per-process history that rates are computed from.
    pub fn tick(&mut self, now_ns: u64) {
        let horizon = now_ns.saturating_sub(self.rate_window_ns);
        for p in self.procs.values_mut() {
            p.history
                .push_back((now_ns, p.counts.allocs, p.counts.outstanding));
            while p.history.len() > 2 && p.history.front().is_some_and(|h| h.0 < horizon) {
                p.history.pop_front();
            }
        }
    }

    fn rates(&self, p: &Process, now_ns: u64) -> (f64, f64) {
        let (t0, allocs0, out0) = p
            .history
            .front()
            .copied()
            .unwrap_or((p.first_seen_ns, 0, 0));
        let dt = now_ns.saturating_sub(t0) as f64 / 1e9;
        if dt < 0.05 {
            return (0.0, 0.0);
        }
        let alloc_rate = p.counts.allocs.saturating_sub(allocs0) as f64 / dt;
        let growth = (p.counts.outstanding as f64 - out0 as f64) / dt;
        (alloc_rate, growth)
    }

    fn age(&self, now_ns: u64) -> AgeSummary {
        let Ok(mut h) = Histogram::<u64>::new(3) else {
            return AgeSummary::default();
        };
        for live in self.objects.values() {
            let born_ns = self.base_ns.unwrap_or(0) + u64::from(live.ts_ms) * 1_000_000;
            let ms = now_ns.saturating_sub(born_ns) / 1_000_000;
            h.saturating_record(ms);
        }
        if h.is_empty() {
            return AgeSummary::default();
        }
        AgeSummary {
            count: h.len(),
            p50_ms: h.value_at_quantile(0.50),
            p99_ms: h.value_at_quantile(0.99),
            max_ms: h.max(),
        }
    }

    pub fn snapshot(&self, now_ns: u64, opts: &SnapshotOptions) -> Snapshot {
        let mut rows: Vec<ProcRow> = self
            .procs
            .values()
            .filter(|p| opts.pid.is_none_or(|pid| pid == p.tgid))
            .filter(|p| opts.comm.as_deref().is_none_or(|c| p.comm.contains(c)))
            .map(|p| {
                let (alloc_rate, growth_rate) = self.rates(p, now_ns);
                ProcRow {
                    tgid: p.tgid,
                    comm: p.comm.clone(),
                    cgroup_id: p.last_cgroup_id,
                    counts: p.counts.clone(),
                    alloc_rate,
                    growth_rate,
                    sites: Vec::new(),
                }
            })
            .collect();
        rows.sort_by(|a, b| compare(opts.sort, b, a).then(a.tgid.cmp(&b.tgid)));
        rows.truncate(opts.limit);
        for row in &mut rows {
            let Some(p) = self.procs.get(&row.tgid) else {
                continue;
            };
            let mut sites: Vec<&Site> = p
                .sites
                .iter()
                .filter_map(|&s| self.sites.get(s as usize))
                .collect();
            sites.sort_by(|a, b| match opts.sort {
                SortKey::Outstanding => (b.counts.outstanding_bytes, b.counts.allocs)
                    .cmp(&(a.counts.outstanding_bytes, a.counts.allocs)),
                SortKey::Rate | SortKey::Allocs => b.counts.allocs.cmp(&a.counts.allocs),
            });
            row.sites = sites
                .into_iter()
                .take(opts.stacks)
                .map(|s| SiteRow {
                    kstack: s.key.kstack,
                    ustack: s.key.ustack,
                    counts: s.counts.clone(),
                })
                .collect();
        }
        let mut cgroups: Vec<CgroupRow> = self
            .cgroups
            .iter()
            .filter(|(_, c)| c.outstanding > 0)
            .map(|(&cgroup_id, c)| CgroupRow {
                cgroup_id,
                counts: c.clone(),
            })
            .collect();
        cgroups.sort_by(|a, b| {
            b.counts
                .outstanding_bytes
                .cmp(&a.counts.outstanding_bytes)
                .then(a.cgroup_id.cmp(&b.cgroup_id))
        });
        cgroups.truncate(opts.limit);
        Snapshot {
            totals: self.totals.clone(),
            anomalies: self.anomalies.clone(),
            stacks: self.sampling.clone(),
            age: self.age(now_ns),
            processes: rows,
            cgroups,
        }
    }
}

fn compare(key: SortKey, a: &ProcRow, b: &ProcRow) -> std::cmp::Ordering {
    match key {
        SortKey::Outstanding => (a.counts.outstanding_bytes, a.counts.allocs)
            .cmp(&(b.counts.outstanding_bytes, b.counts.allocs)),
        SortKey::Rate => a.alloc_rate.total_cmp(&b.alloc_rate),
        SortKey::Allocs => a.counts.allocs.cmp(&b.counts.allocs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc<'a>(
        tgid: u32,
        ptr: u64,
        ts_ns: u64,
        kstack: &'a [u64],
        ustack: &'a [u64],
    ) -> Event<'a> {
        Event::Alloc(Alloc {
            tgid,
            pid: tgid,
            source: 1,
            ptr,
            ts_ns,
            bytes_req: 400,
            bytes_alloc: 512,
            gfp_flags: 0,
            cgroup_id: 100 + u64::from(tgid),
            call_site: kstack.first().copied().unwrap_or(0),
            user_ip: 0,
            sampled: false,
            comm: b"gen",
            kstack,
            ustack,
            kstack_err: None,
            ustack_err: None,
        })
    }

    fn sampled(tgid: u32, ptr: u64, call_site: u64) -> Event<'static> {
        Event::Alloc(Alloc {
            tgid,
            pid: tgid,
            source: 1,
            ptr,
            ts_ns: 0,
            bytes_req: 400,
            bytes_alloc: 512,
            gfp_flags: 0,
            cgroup_id: 100,
            call_site,
            user_ip: 0,
            sampled: true,
            comm: b"",
            kstack: &[],
            ustack: &[],
            kstack_err: None,
            ustack_err: None,
        })
    }

    #[test]
    fn sampled_allocations_join_their_call_sites_last_stack() {
        let mut agg = Aggregator::new(10_000_000_000);
        agg.apply(&alloc(1, 0x10, 0, &[7, 8, 9], &[42]));
        agg.apply(&sampled(1, 0x20, 7));
        agg.apply(&sampled(1, 0x30, 7));
        // Never-captured call site: a site of its own with the call site as its kernel stack.
        agg.apply(&sampled(1, 0x40, 99));
        agg.apply(&free(0x20));
        let snap = agg.snapshot(0, &opts(SortKey::Outstanding));
        assert_eq!(
            snap.stacks,
            StackSampling {
                captured: 1,
                shared: 3
            }
        );
        let p = &snap.processes[0];
        assert_eq!(p.counts.outstanding, 3);
        assert_eq!(p.sites.len(), 2);
        assert_eq!(agg.stacks.frames(p.sites[0].kstack), &[7, 8, 9]);
        assert_eq!(
            (p.sites[0].counts.allocs, p.sites[0].counts.outstanding),
            (3, 2)
        );
        assert_eq!(agg.stacks.frames(p.sites[1].kstack), &[99]);
        // The process keeps the name from its captured event.
        assert_eq!(p.comm, "gen");
    }

    fn free(ptr: u64) -> Event<'static> {
        Event::Free(Free { tgid: 1, ptr })
    }

    fn opts(sort: SortKey) -> SnapshotOptions {
        SnapshotOptions {
            sort,
            limit: 10,
            stacks: 5,
            comm: None,
            pid: None,
        }
    }

    #[test]
    fn outstanding_by_process_and_site() {
        let mut agg = Aggregator::new(10_000_000_000);
        let first = agg.apply(&alloc(10, 0x1000, 0, &[1, 2], &[9]));
        assert_eq!(first.process, Some(10));
        assert!(first.user_stack.is_some_and(|(tgid, _)| tgid == 10));
        assert_eq!(
            agg.apply(&alloc(10, 0x2000, 0, &[1, 2], &[9])),
            Novelty::default()
        );
        agg.apply(&alloc(10, 0x3000, 0, &[1, 3], &[9]));
        agg.apply(&alloc(20, 0x4000, 0, &[1, 2], &[9]));
        agg.apply(&free(0x3000));
        let snap = agg.snapshot(1_000_000_000, &opts(SortKey::Outstanding));
        assert_eq!(snap.totals.outstanding, 3);
        assert_eq!(snap.totals.frees, 1);
        let p10 = &snap.processes[0];
        assert_eq!(
            (
                p10.tgid,
                p10.counts.outstanding,
                p10.counts.outstanding_bytes
            ),
            (10, 2, 1024)
        );
        assert_eq!(p10.sites.len(), 2);
        assert_eq!(p10.sites[0].counts.outstanding, 2);
        assert_eq!(agg.stacks.frames(p10.sites[0].kstack), &[1, 2]);
        assert_eq!(p10.sites[1].counts.outstanding, 0);
        // Same frames in another process are another site: user addresses are per-process.
        assert_eq!(snap.processes[1].tgid, 20);
        assert_eq!(snap.cgroups[0].cgroup_id, 110);
        assert_eq!(snap.age.count, 3);
        assert_eq!(snap.age.max_ms, 1000);
    }

    #[test]
    fn unmatched_free_and_pointer_reuse_are_counted_not_hidden() {
        let mut agg = Aggregator::new(10_000_000_000);
        agg.apply(&free(0x99));
        agg.apply(&alloc(1, 0x10, 0, &[], &[]));
        agg.apply(&alloc(2, 0x10, 5, &[], &[]));
        let snap = agg.snapshot(10, &opts(SortKey::Outstanding));
        assert_eq!(snap.anomalies.unmatched_frees, 1);
        assert_eq!(snap.anomalies.freed_unseen, 1);
        assert_eq!(snap.totals.outstanding, 1);
        assert_eq!(snap.processes[0].tgid, 2);
        assert_eq!(snap.processes[1].counts.outstanding, 0);
    }

    #[test]
    fn rates_over_window_and_sorting() {
        let mut agg = Aggregator::new(2_000_000_000);
        agg.apply(&alloc(1, 0x1, 0, &[], &[]));
        agg.tick(0);
        // Process 2 churns: 100 allocs, all freed.
        for i in 0..100u64 {
            agg.apply(&alloc(2, 0x1000 + i, 0, &[], &[]));
            agg.apply(&free(0x1000 + i));
        }
        agg.tick(0);
        for i in 0..10u64 {
            agg.apply(&alloc(1, 0x10 + i, 0, &[], &[]));
        }
        agg.tick(1_000_000_000);
        let by_out = agg.snapshot(1_000_000_000, &opts(SortKey::Outstanding));
        assert_eq!(by_out.processes[0].tgid, 1);
        assert!((by_out.processes[0].growth_rate - 10.0).abs() < 1e-9);
        let by_allocs = agg.snapshot(1_000_000_000, &opts(SortKey::Allocs));
        assert_eq!(by_allocs.processes[0].tgid, 2);
        assert_eq!(by_allocs.processes[0].counts.outstanding, 0);
        let filtered = agg.snapshot(
            1_000_000_000,
            &SnapshotOptions {
                pid: Some(2),
                ..opts(SortKey::Rate)
            },
        );
        assert_eq!(filtered.processes.len(), 1);
    }
}
