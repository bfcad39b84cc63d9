//! Outstanding objects, by process, by stratum and stack, and by cgroup. Fed
//! decoded events in ring-buffer order; asked for snapshots by views.
//!
//! Attribution model. Every selected allocation is counted exactly in its
//! *stratum*: (process, kernel call site, user-path fingerprint). The fingerprint
//! is 0 unless `--user-paths` asked the kernel to hash the first user frames
//! it walked for that very allocation; sampling is unbiased either way, the
//! fingerprint only turns estimates of paths sharing a call site into counts.
//! Full stacks are captured for a random draw of allocations, each with a
//! probability `1 / 2^level` the kernel fixed before the draw from past events
//! only and recorded with the event (a census of a stratum's first
//! allocations, a zoomed stratum's level, or the base rate; see
//! `stack_draw` in the eBPF object and [`super::zoom`]). Counts are kept per
//! (stratum, level), so each level's drawn objects are a simple random sample
//! of its outstanding objects, and [`super::estimate`] splits each level's
//! exact count among its stacks, exact where everything was drawn, with a 95%
//! interval where it was sampled. What no drawn object can speak for keeps its
//! exact count under the frames all of its objects share (call site and
//! fingerprinted user frames), marked partial: never under a stack its objects
//! did not come from.

mod exited;
pub mod rows;

pub use exited::{Exited, Forgotten};

use std::collections::{HashMap, HashSet, VecDeque};

use tracer_common::slab::AllocHeader;

use crate::{
    bpf::stacks::{StackId, StackTable},
    slab::decoder::{Alloc, Event, Free, Route},
    slab::report::{Anomalies, Counts, ProcKey, StackSampling},
    slab::zoom::{AgeCohorts, Candidate, StratumId},
};

/// One allocation the kernel reported and we have not seen freed. 21 bytes,
/// within the 24 a (pointer, Live) entry pads this to anyway, so a million
/// outstanding objects cost ~32 MB of table: the time is kept in ms since the
/// first event and the cgroup as an index.
#[derive(Debug, Clone, Copy)]
struct Live {
    ts_ms: u32,
    stratum: u32,
    /// The site (full stacks) of a drawn object; [`NOT_DRAWN`] otherwise.
    site: u32,
    bytes: u32,
    cgroup: u32,
    /// Its draw level (drawn with probability `1 / 2^level`).
    level: u8,
}

const NOT_DRAWN: u32 = u32::MAX;

/// What an allocation served, where the kernel side could read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Interrupt {
    Softirq,
    Irq,
    Nmi,
}

impl Interrupt {
    /// From `tracer_common::CONTEXT_*` bits; None in process context or when
    /// unknown. The innermost context wins (an NMI can interrupt a hardirq).
    pub fn of(context: u32) -> Option<Interrupt> {
        use tracer_common::{CONTEXT_HARDIRQ, CONTEXT_KNOWN, CONTEXT_NMI, CONTEXT_SOFTIRQ};
        if context & CONTEXT_KNOWN == 0 {
            None
        } else if context & CONTEXT_NMI != 0 {
            Some(Interrupt::Nmi)
        } else if context & CONTEXT_HARDIRQ != 0 {
            Some(Interrupt::Irq)
        } else if context & CONTEXT_SOFTIRQ != 0 {
            Some(Interrupt::Softirq)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Interrupt::Softirq => "softirq",
            Interrupt::Irq => "irq",
            Interrupt::Nmi => "nmi",
        }
    }

    /// The pseudo-process its allocations are counted under: tgid 0 and a
    /// start no task has.
    pub fn key(self) -> ProcKey {
        let n = match self {
            Interrupt::Softirq => 1,
            Interrupt::Irq => 2,
            Interrupt::Nmi => 3,
        };
        ProcKey {
            tgid: 0,
            start_ns: u64::MAX - n,
        }
    }

    /// The key's interrupt, if it is a pseudo-process's.
    pub fn of_key(key: ProcKey) -> Option<Interrupt> {
        [Interrupt::Softirq, Interrupt::Irq, Interrupt::Nmi]
            .into_iter()
            .find(|i| i.key() == key)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct StratumKey {
    proc: ProcKey,
    call_site: u64,
    fingerprint: u64,
}

/// Exact counts of one draw level of a stratum, and of its drawn objects.
#[derive(Debug, Clone, Default)]
struct LevelCounts {
    level: u8,
    counts: Counts,
    drawn: Counts,
}

#[derive(Debug)]
struct Stratum {
    key: StratumKey,
    user_ip: u64,
    /// Every object, exactly.
    counts: Counts,
    /// The same, per draw level, with the drawn objects: what the per-stack
    /// split comes from.
    levels: Vec<LevelCounts>,
    sites: Vec<u32>,
    /// Stacks of the first capture: names the partial row.
    name: Option<(StackId, StackId)>,
    /// Base-level objects outstanding by age, for the zoom trigger.
    ages: AgeCohorts,
    /// When it first and last allocated (kernel clock).
    first_ns: u64,
    last_ns: u64,
    /// Its allocations drawn while zoomed.
    zoom_drawn: u64,
}

/// Full kernel and user stacks within one stratum, counted over drawn objects
/// per draw level.
#[derive(Debug)]
struct Site {
    kstack: StackId,
    ustack: StackId,
    drawn: Vec<(u8, Counts)>,
}

/// The counts of `level` in `levels`, added if missing (a stratum sees a
/// handful of levels at most: census, base, a zoom or two).
fn level_mut(levels: &mut Vec<LevelCounts>, level: u8) -> &mut LevelCounts {
    let i = match levels.iter().position(|l| l.level == level) {
        Some(i) => i,
        None => {
            levels.push(LevelCounts {
                level,
                ..LevelCounts::default()
            });
            levels.len() - 1
        }
    };
    &mut levels[i]
}

fn site_level_mut(drawn: &mut Vec<(u8, Counts)>, level: u8) -> &mut Counts {
    let i = match drawn.iter().position(|(l, _)| *l == level) {
        Some(i) => i,
        None => {
            drawn.push((level, Counts::default()));
            drawn.len() - 1
        }
    };
    &mut drawn[i].1
}

fn site_level(site: &Site, level: u8) -> Option<&Counts> {
    site.drawn.iter().find(|(l, _)| *l == level).map(|(_, c)| c)
}

#[derive(Debug)]
pub struct Process {
    pub key: ProcKey,
    /// Parent process when it first allocated (the kernel's `real_parent`
    /// then); 0 when unknown.
    pub ppid: u32,
    /// Found gone at the last [`Aggregator::forget_exited`]; kept while it
    /// holds objects.
    pub exited: bool,
    /// Thread name of the first allocating thread; views prefer /proc's.
    pub comm: String,
    pub last_cgroup_id: u64,
    /// Allocations charged to another memcg than the task's (remote charging,
    /// `active_memcg`), and the last such memcg.
    charged_elsewhere: Option<(u64, u64)>,
    pub counts: Counts,
    strata: Vec<u32>,
    /// Allocations whose fingerprint walk found no frame past the entry ip.
    shallow_allocs: u64,
    /// (time, allocs, outstanding) at each tick inside the rate window.
    history: VecDeque<(u64, u64, u64)>,
    first_seen_ns: u64,
}

/// What an event introduced; see [`Aggregator::apply`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Novelty {
    pub process: Option<ProcKey>,
    pub user_stack: Option<(u32, StackId)>,
}

/// Puts `item` in a freed slot if there is one, else at the end; returns its index.
fn reuse_or_push<T>(slots: &mut Vec<T>, free: &mut Vec<u32>, item: T) -> u32 {
    if let Some(i) = free.pop() {
        if let Some(slot) = slots.get_mut(i as usize) {
            *slot = item;
            return i;
        }
    }
    slots.push(item);
    slots.len() as u32 - 1
}

/// How an object leaves the counts ([`Aggregator::release`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leave {
    Free,
    /// Part of it freed: bytes only.
    Shrink,
    /// Taken back ([`Aggregator::exclude`]).
    Retract,
}

#[derive(Debug)]
pub struct Aggregator {
    objects: HashMap<u64, Live>,
    strata: Vec<Stratum>,
    stratum_ids: HashMap<StratumKey, u32>,
    sites: Vec<Site>,
    site_ids: HashMap<(u32, StackId, StackId), u32>,
    /// Slots of forgotten processes' strata and sites, reused before new ones.
    free_strata: Vec<u32>,
    free_sites: Vec<u32>,
    sampling: StackSampling,
    procs: HashMap<ProcKey, Process>,
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
    /// The level of an ordinary draw: its objects feed the zoom trigger.
    base_level: u8,
    /// Objects taken back by [`Aggregator::exclude`] whose kernel free is
    /// still to come: that free is expected, not an anomaly.
    excluded: HashSet<u64>,
}

impl Aggregator {
    /// Room for `capacity` live objects is reserved up front: growing a table of
    /// a million entries briefly holds the old and the new one, a 1.5x peak in
    /// resident memory on a node that is already short of it. Untouched buckets
    /// cost address space, not RSS.
    pub fn with_capacity(rate_window_ns: u64, capacity: usize, sample_every: u64) -> Self {
        let mut agg = Self::new(rate_window_ns, sample_every);
        agg.objects.reserve(capacity);
        agg
    }

    /// Whether the kernel side fingerprints user paths (`--user-paths`): only
    /// then does a process row say whether its paths could be fingerprinted.
    pub fn fingerprinting(mut self, on: bool) -> Self {
        self.sampling.user_paths = on;
        self
    }

    /// How many allocations of a new stratum the kernel draws per CPU
    /// (reported only: every event says how it was drawn).
    pub fn census(mut self, allocs: u32) -> Self {
        self.sampling.census_allocs = allocs;
        self
    }

    /// `sample_every`: the kernel draws 1 in this many allocations for stacks
    /// (1: every allocation), reported so readers can judge the estimates.
    pub fn new(rate_window_ns: u64, sample_every: u64) -> Self {
        Aggregator {
            objects: HashMap::new(),
            strata: Vec::new(),
            stratum_ids: HashMap::new(),
            sites: Vec::new(),
            site_ids: HashMap::new(),
            free_strata: Vec::new(),
            free_sites: Vec::new(),
            sampling: StackSampling {
                sample_every,
                ..StackSampling::default()
            },
            procs: HashMap::new(),
            cgroups: HashMap::new(),
            cgroup_ids: Vec::new(),
            cgroup_index: HashMap::new(),
            base_ns: None,
            stacks: StackTable::default(),
            totals: Counts::default(),
            anomalies: Anomalies::default(),
            rate_window_ns,
            base_level: sample_every.max(1).next_power_of_two().trailing_zeros() as u8,
            excluded: HashSet::new(),
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

    /// An allocation made while serving an interrupt belongs to no process:
    /// it is counted under its interrupt's pseudo-process, without the
    /// interrupted task's user stack, comm or cgroup.
    fn alloc(&mut self, a: &Alloc<'_>) -> Novelty {
        match Interrupt::of(a.context) {
            Some(irq) => {
                let key = irq.key();
                let comm = match irq {
                    Interrupt::Softirq => b"[softirq]".as_slice(),
                    Interrupt::Irq => b"[irq]".as_slice(),
                    Interrupt::Nmi => b"[nmi]".as_slice(),
                };
                self.alloc_of(&Alloc {
                    hdr: AllocHeader {
                        tgid: key.tgid,
                        pid: key.tgid,
                        start_ns: key.start_ns,
                        ppid: 0,
                        cgroup_id: 0,
                        user_ip: 0,
                        user_fingerprint: 0,
                        ..a.hdr
                    },
                    shallow: false,
                    comm,
                    ustack: &[],
                    ustack_err: None,
                    ..a.clone()
                })
            }
            None => self.alloc_of(a),
        }
    }

    fn alloc_of(&mut self, a: &Alloc<'_>) -> Novelty {
        if a.kstack_err.is_some() {
            self.anomalies.kstack_failed += 1;
        }
        if a.ustack_err.is_some() && a.tgid != 0 {
            self.anomalies.ustack_failed += 1;
        }
        if let Some(old) = self.objects.remove(&a.ptr) {
            self.anomalies.freed_unseen += 1;
            self.release(&old, Leave::Free);
        }
        self.excluded.remove(&a.ptr);
        if a.drawn {
            self.sampling.drawn += 1;
            match a.route {
                Route::Census => self.sampling.census += 1,
                Route::Zoom => self.sampling.zoom += 1,
                Route::Sampled => self.sampling.sampled += 1,
            }
        } else {
            self.sampling.without_stacks += 1;
        }
        let (stratum, new_stratum) = self.stratum_of(a);
        let mut new_stacks = None;
        let mut site = NOT_DRAWN;
        if a.has_stacks {
            let kstack = self.stacks.intern(a.kstack);
            let ustack = self.stacks.intern(a.ustack);
            let s = &mut self.strata[stratum as usize];
            if s.name.is_none() {
                s.name = Some((kstack, ustack));
                new_stacks = Some(ustack);
            }
            if a.drawn {
                let (id, new_site) = self.site_of(stratum, kstack, ustack);
                if new_site {
                    new_stacks = Some(ustack);
                }
                site = id;
            }
        }
        self.record_live(a, stratum, site);

        let mut new_proc = None;
        let key = proc_key(a);
        let proc = self.procs.entry(key).or_insert_with(|| {
            new_proc = Some(key);
            Process {
                key,
                ppid: a.ppid,
                exited: false,
                comm: String::from_utf8_lossy(a.comm).into_owned(),
                last_cgroup_id: a.cgroup_id,
                charged_elsewhere: None,
                counts: Counts::default(),
                strata: Vec::new(),
                shallow_allocs: 0,
                history: VecDeque::new(),
                first_seen_ns: a.ts_ns,
            }
        });
        // Only the main thread's name tracks exec; other threads may carry their
        // own names and must not make us re-read /proc on every event.
        if a.pid == a.tgid && a.has_stacks && proc.comm.as_bytes() != a.comm {
            proc.comm = String::from_utf8_lossy(a.comm).into_owned();
            new_proc = Some(key);
        }
        proc.counts.alloc(a.bytes_alloc);
        proc.last_cgroup_id = a.cgroup_id;
        if a.charged_cgroup_id != 0 && a.charged_cgroup_id != a.cgroup_id {
            let n = proc.charged_elsewhere.map_or(0, |(_, n)| n);
            proc.charged_elsewhere = Some((a.charged_cgroup_id, n + 1));
        }
        if a.shallow {
            proc.shallow_allocs += 1;
        }
        if new_stratum {
            proc.strata.push(stratum);
        }
        Novelty {
            process: new_proc,
            user_stack: new_stacks
                .filter(|&u| u != StackId::EMPTY)
                .map(|u| (a.tgid, u)),
        }
    }

    fn record_live(&mut self, a: &Alloc<'_>, stratum: u32, site: u32) {
        let bytes = a.bytes_alloc;
        // The memcg that pays: a remote charge's, else the task's.
        let payer = match a.charged_cgroup_id {
            0 => a.cgroup_id,
            id => id,
        };
        let cgroup = self.cgroup_slot(payer);
        let ts_ms = self.ms_since_base(a.ts_ns);
        let base_level = self.base_level;
        let s = &mut self.strata[stratum as usize];
        s.counts.alloc(bytes);
        let level = level_mut(&mut s.levels, a.level);
        level.counts.alloc(bytes);
        if let Some(site) = self.sites.get_mut(site as usize) {
            site_level_mut(&mut site.drawn, a.level).alloc(bytes);
            level.drawn.alloc(bytes);
            if a.route == Route::Zoom {
                s.zoom_drawn += 1;
            }
        }
        if a.level == base_level && base_level > 0 {
            s.ages.alloc(ts_ms / 1000);
        }
        s.last_ns = s.last_ns.max(a.ts_ns);
        self.totals.alloc(bytes);
        self.cgroups.entry(payer).or_default().alloc(bytes);
        self.objects.insert(
            a.ptr,
            Live {
                ts_ms,
                stratum,
                site,
                bytes: u32::try_from(bytes).unwrap_or(u32::MAX),
                cgroup,
                level: a.level,
            },
        );
    }

    fn stratum_of(&mut self, a: &Alloc<'_>) -> (u32, bool) {
        let key = StratumKey {
            proc: proc_key(a),
            call_site: a.call_site,
            fingerprint: a.user_fingerprint,
        };
        if let Some(&id) = self.stratum_ids.get(&key) {
            return (id, false);
        }
        let stratum = Stratum {
            key,
            user_ip: a.user_ip,
            counts: Counts::default(),
            levels: Vec::new(),
            sites: Vec::new(),
            name: None,
            ages: AgeCohorts::default(),
            first_ns: a.ts_ns,
            last_ns: a.ts_ns,
            zoom_drawn: 0,
        };
        let id = reuse_or_push(&mut self.strata, &mut self.free_strata, stratum);
        self.stratum_ids.insert(key, id);
        self.sampling.strata += 1;
        (id, true)
    }

    fn site_of(&mut self, stratum: u32, kstack: StackId, ustack: StackId) -> (u32, bool) {
        if let Some(&id) = self.site_ids.get(&(stratum, kstack, ustack)) {
            return (id, false);
        }
        let site = Site {
            kstack,
            ustack,
            drawn: Vec::new(),
        };
        let id = reuse_or_push(&mut self.sites, &mut self.free_sites, site);
        self.site_ids.insert((stratum, kstack, ustack), id);
        if let Some(s) = self.strata.get_mut(stratum as usize) {
            s.sites.push(id);
        }
        (id, true)
    }

    fn free(&mut self, f: &Free) {
        if f.bytes != 0 {
            return self.part_free(f);
        }
        match self.objects.remove(&f.ptr) {
            Some(live) => self.release(&live, Leave::Free),
            None if self.excluded.remove(&f.ptr) => {}
            None => self.anomalies.unmatched_frees += 1,
        }
    }

    /// Part of a page block freed (a block split after allocation is freed
    /// a page at a time): its bytes shrink, it stays one outstanding object
    /// until its last part goes (a whole free, `bytes` 0).
    fn part_free(&mut self, f: &Free) {
        let Some(live) = self.objects.get_mut(&f.ptr) else {
            if !self.excluded.contains(&f.ptr) {
                self.anomalies.unmatched_frees += 1;
            }
            return;
        };
        let bytes = u32::try_from(f.bytes).unwrap_or(u32::MAX).min(live.bytes);
        live.bytes -= bytes;
        let part = Live { bytes, ..*live };
        self.release(&part, Leave::Shrink);
    }

    /// Every pointer outstanding now (the page source classifies them).
    pub fn outstanding_ptrs(&self) -> Vec<u64> {
        self.objects.keys().copied().collect()
    }

    /// Takes `ptr` back as never of the traced kind (a page that turned out
    /// to be a slab or page-table page, or one already free again whose free
    /// went unseen): no longer outstanding, not counted as allocated; its
    /// kernel free, if it comes, is expected. False if it is not outstanding.
    pub fn exclude(&mut self, ptr: u64) -> bool {
        let Some(live) = self.objects.remove(&ptr) else {
            return false;
        };
        self.release(&live, Leave::Retract);
        self.excluded.insert(ptr);
        true
    }

    /// Takes `ptr` back as freed, its free unseen (a page found back in the
    /// buddy allocator or in user hands): it was allocated and is free now,
    /// so it counts as a free, and its kernel free, if it comes, is
    /// expected. False if it is not outstanding.
    pub fn free_unseen(&mut self, ptr: u64) -> bool {
        let Some(live) = self.objects.remove(&ptr) else {
            return false;
        };
        self.anomalies.freed_unseen += 1;
        self.release(&live, Leave::Free);
        self.excluded.insert(ptr);
        true
    }

    /// `live` leaves the counts as `how` says: freed, shrunk or retracted.
    fn release(&mut self, live: &Live, leave: Leave) {
        let bytes = u64::from(live.bytes);
        let whole = leave != Leave::Shrink;
        let how = match leave {
            Leave::Free => Counts::free,
            Leave::Shrink => Counts::shrink,
            Leave::Retract => Counts::retract,
        };
        let Some(stratum) = self.strata.get_mut(live.stratum as usize) else {
            return;
        };
        how(&mut stratum.counts, bytes);
        let level = level_mut(&mut stratum.levels, live.level);
        how(&mut level.counts, bytes);
        if let Some(site) = self.sites.get_mut(live.site as usize) {
            how(site_level_mut(&mut site.drawn, live.level), bytes);
            how(&mut level.drawn, bytes);
        }
        if whole && live.level == self.base_level && self.base_level > 0 {
            stratum.ages.free(live.ts_ms / 1000);
        }
        let proc = stratum.key.proc;
        how(&mut self.totals, bytes);
        let cgroup_id = self.cgroup_ids.get(live.cgroup as usize).copied();
        if let Some(c) = cgroup_id.and_then(|id| self.cgroups.get_mut(&id)) {
            how(c, bytes);
        }
        if let Some(p) = self.procs.get_mut(&proc) {
            how(&mut p.counts, bytes);
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

    /// Every stratum holding objects of a live process, with what the zoom
    /// trigger reads: its base-level objects older than `min_age_s` seconds
    /// at `now_ns`, and its allocations. Exited processes allocate no more,
    /// and interrupts' pseudo-processes are left out (the kernel keys their
    /// strata by the interrupted task).
    pub fn zoom_candidates(&mut self, now_ns: u64, min_age_s: u32) -> Vec<Candidate> {
        let now_sec = self.ms_since_base(now_ns) / 1000;
        self.procs
            .values()
            .filter(|p| p.counts.outstanding > 0 && !p.exited && Interrupt::of_key(p.key).is_none())
            .flat_map(|p| &p.strata)
            .filter_map(|&h| self.strata.get(h as usize))
            .filter(|s| s.counts.outstanding > 0)
            .map(|s| Candidate {
                id: StratumId {
                    tgid: s.key.proc.tgid,
                    start_ns: s.key.proc.start_ns,
                    call_site: s.key.call_site,
                    fingerprint: s.key.fingerprint,
                },
                old: s.ages.old(now_sec, min_age_s),
                allocs: s.counts.allocs,
                first_ns: s.first_ns,
                last_ns: s.last_ns,
                zoom_drawn: s.zoom_drawn,
            })
            .collect()
    }

    /// A stratum's allocations drawn while zoomed so far, if it is known.
    pub fn zoom_drawn(&self, id: &StratumId) -> Option<u64> {
        let key = StratumKey {
            proc: ProcKey {
                tgid: id.tgid,
                start_ns: id.start_ns,
            },
            call_site: id.call_site,
            fingerprint: id.fingerprint,
        };
        let h = *self.stratum_ids.get(&key)?;
        self.strata.get(h as usize).map(|s| s.zoom_drawn)
    }
}

fn proc_key(a: &Alloc<'_>) -> ProcKey {
    ProcKey {
        tgid: a.tgid,
        start_ns: a.start_ns,
    }
}

#[cfg(test)]
mod tests {
    use super::exited::{EXITED_HOLDERS, EXITED_KEPT};
    use super::rows::SnapshotOptions;
    use super::*;
    use crate::slab::report::SortKey;

    /// A drawn allocation with full stacks (what `--exact` sends for every one).
    fn alloc<'a>(
        tgid: u32,
        ptr: u64,
        ts_ns: u64,
        kstack: &'a [u64],
        ustack: &'a [u64],
    ) -> Event<'a> {
        Event::Alloc(Alloc {
            hdr: AllocHeader {
                kind: tracer_common::EVENT_ALLOC,
                tgid,
                pid: tgid,
                source: 1,
                flags: 0,
                ptr,
                ts_ns,
                bytes_req: 400,
                bytes_alloc: 512,
                gfp_flags: 0,
                cgroup_id: 100 + u64::from(tgid),
                call_site: kstack.first().copied().unwrap_or(0),
                user_ip: ustack.first().copied().unwrap_or(0),
                user_fingerprint: 0,
                start_ns: 7,
                ppid: 1,
                context: 0,
                charged_cgroup_id: 0,
            },
            drawn: true,
            level: 0,
            route: Route::Sampled,
            shallow: false,
            has_stacks: true,
            comm: b"gen",
            kstack,
            ustack,
            kstack_err: None,
            ustack_err: None,
        })
    }

    /// An allocation of stratum (tgid, call_site, fingerprint) that did not
    /// draw at `level`.
    fn undrawn(tgid: u32, ptr: u64, call_site: u64, fingerprint: u64, level: u8) -> Event<'static> {
        Event::Alloc(Alloc {
            hdr: AllocHeader {
                kind: tracer_common::EVENT_ALLOC_NO_STACKS,
                tgid,
                pid: tgid,
                source: 1,
                flags: 0,
                ptr,
                ts_ns: 0,
                bytes_req: 400,
                bytes_alloc: 512,
                gfp_flags: 0,
                cgroup_id: 100,
                call_site,
                user_ip: 0x40,
                user_fingerprint: fingerprint,
                start_ns: 7,
                ppid: 1,
                context: 0,
                charged_cgroup_id: 0,
            },
            drawn: false,
            level,
            route: Route::Sampled,
            shallow: false,
            has_stacks: false,
            comm: b"",
            kstack: &[],
            ustack: &[],
            kstack_err: None,
            ustack_err: None,
        })
    }

    /// `ev` in the stratum of `fingerprint`, drawn at `level`.
    fn in_stratum(ev: Event<'_>, fingerprint: u64, level: u8) -> Event<'_> {
        let Event::Alloc(mut a) = ev else { return ev };
        a.user_fingerprint = fingerprint;
        a.level = level;
        Event::Alloc(a)
    }

    fn free(ptr: u64) -> Event<'static> {
        Event::Free(Free {
            tgid: 1,
            ptr,
            bytes: 0,
        })
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
    fn strata_are_counted_exactly_and_split_only_by_drawn_objects() {
        let mut agg = Aggregator::new(10_000_000_000, 4)
            .fingerprinting(true)
            .census(32);
        // Stratum A (fingerprint 0xa): one drawn object on stack [7,8,9]/[42],
        // two undrawn: all three estimated under that stack (exact count 3).
        agg.apply(&in_stratum(
            alloc(1, 0x10, 0, &[7, 8, 9], &[42, 43]),
            0xa,
            2,
        ));
        agg.apply(&undrawn(1, 0x20, 7, 0xa, 2));
        agg.apply(&undrawn(1, 0x30, 7, 0xa, 2));
        // Stratum B: same call site, another user path, never drawn: its
        // objects stay under the shared frames only, marked partial.
        agg.apply(&undrawn(1, 0x40, 7, 0xb, 2));
        agg.apply(&undrawn(1, 0x50, 7, 0xb, 2));
        let snap = agg.snapshot(0, &opts(SortKey::Outstanding));
        assert_eq!(
            snap.stacks,
            StackSampling {
                sample_every: 4,
                census_allocs: 32,
                user_paths: true,
                drawn: 1,
                sampled: 1,
                without_stacks: 4,
                strata: 2,
                ..StackSampling::default()
            }
        );
        let p = &snap.processes[0];
        assert_eq!(p.counts.outstanding, 5);
        assert_eq!(p.stacks.len(), 2);
        let a = &p.stacks[0];
        assert_eq!(agg.stacks.frames(a.kstack), &[7, 8, 9]);
        assert_eq!(
            (a.counts.outstanding, a.estimated, a.partial),
            (3, true, false)
        );
        assert_eq!(a.stratum_outstanding, 3);
        // One drawn of three, and it is this stack: at least 1, at most 3.
        assert_eq!((a.outstanding_low, a.outstanding_high), (1, 3));
        let b = &p.stacks[1];
        assert!(b.partial && !b.estimated);
        assert_eq!(b.counts.outstanding, 2);
        assert_eq!(agg.stacks.frames(b.kstack), &[7]);
        // Never drawn, so only the entry ip the kernel reported is shared.
        assert_eq!(agg.stacks.frames(b.ustack), &[0x40]);
        // Freeing the drawn object leaves stratum A with nothing to split by.
        agg.apply(&free(0x10));
        let snap = agg.snapshot(0, &opts(SortKey::Outstanding));
        let rows = &snap.processes[0].stacks;
        let partial_a = rows
            .iter()
            .find(|r| r.partial && agg.stacks.frames(r.ustack) == [42, 43])
            .expect("stratum A's partial row");
        assert_eq!(partial_a.counts.outstanding, 2);
        let estimated_a = rows
            .iter()
            .find(|r| !r.partial && r.stratum_outstanding == 2);
        assert!(estimated_a.is_some_and(|r| r.counts.outstanding == 0 && r.counts.frees == 1));
    }

    #[test]
    fn exited_processes_that_hold_nothing_are_forgotten() {
        let mut agg = Aggregator::new(10_000_000_000, 1);
        agg.apply(&alloc(1, 0x10, 0, &[1, 2], &[9]));
        agg.apply(&alloc(2, 0x20, 0, &[1, 2], &[9]));
        agg.apply(&alloc(3, 0x30, 0, &[1, 2], &[9]));
        agg.apply(&free(0x10));
        agg.apply(&free(0x30));
        // Up to EXITED_KEPT exited, empty processes stay, the busiest first.
        for i in 0..EXITED_KEPT as u64 {
            let tgid = 1000 + i as u32;
            agg.apply(&alloc(tgid, 0x1000 + i * 0x10, 0, &[1, 2], &[9]));
            agg.apply(&alloc(tgid, 0x9000 + i * 0x10, 0, &[1, 2], &[9]));
            agg.apply(&free(0x1000 + i * 0x10));
            agg.apply(&free(0x9000 + i * 0x10));
        }
        // 1 exited holding nothing with the fewest allocations; 2 exited but
        // holds an object; 3 is alive.
        let gone = agg.forget_exited(|tgid| tgid == 3, Exited::KeepBusiest);
        assert_eq!(gone.iter().map(|f| f.key.tgid).collect::<Vec<_>>(), vec![1]);
        let all = SnapshotOptions {
            limit: usize::MAX,
            ..opts(SortKey::Outstanding)
        };
        let snap = agg.snapshot(0, &all);
        let tgids: Vec<u32> = snap.processes.iter().map(|p| p.tgid).collect();
        assert!(!tgids.contains(&1) && tgids.contains(&2) && tgids.contains(&3));
        assert_eq!(
            snap.totals.allocs,
            3 + 2 * EXITED_KEPT as u64,
            "totals keep what was seen"
        );
        // The same pid again is a new process with a new stratum.
        agg.apply(&alloc(1, 0x40, 0, &[1, 2], &[9]));
        let snap = agg.snapshot(0, &all);
        let p1 = snap
            .processes
            .iter()
            .find(|p| p.tgid == 1)
            .expect("new pid 1");
        assert_eq!((p1.counts.allocs, p1.counts.outstanding), (1, 1));
        assert_eq!(p1.stacks[0].counts.outstanding, 1);
    }

    #[test]
    fn forgotten_processes_give_back_their_strata_sites_and_stacks() {
        let mut agg = Aggregator::new(10_000_000_000, 1);
        // A daemon that holds one object under a stack it shares with the churn.
        agg.apply(&alloc(2, 0x20, 0, &[1, 2], &[9]));
        let mut peak = (0, 0, 0);
        for round in 0..20u64 {
            // Short-lived processes, each with stacks of its own, all exited.
            for i in 0..(2 * EXITED_KEPT as u64) {
                let tgid = 10_000 + (round * 1000 + i) as u32;
                let ptr = 0x100_000 + i * 0x10;
                let own = 1_000_000 + round * 10_000 + i;
                agg.apply(&alloc(tgid, ptr, 0, &[1, 2], &[9]));
                agg.apply(&free(ptr));
                agg.apply(&alloc(tgid, ptr, 0, &[1, own], &[own]));
                agg.apply(&free(ptr));
            }
            agg.forget_exited(|tgid| tgid == 2, Exited::KeepBusiest);
            agg.retain_stacks([]);
            peak = (
                peak.0.max(agg.strata.len()),
                peak.1.max(agg.sites.len()),
                peak.2.max(agg.stacks.len()),
            );
        }
        // Bounded by what is kept, not by the 20 rounds seen.
        let kept = 2 * EXITED_KEPT + 1;
        assert!(peak.0 <= 2 * kept + 2 * EXITED_KEPT, "strata {peak:?}");
        assert!(peak.1 <= 2 * kept + 2 * EXITED_KEPT, "sites {peak:?}");
        assert!(peak.2 <= 2 * kept + 2 * EXITED_KEPT + 4, "stacks {peak:?}");
        // The daemon's object and the stacks it shares are intact.
        let snap = agg.snapshot(0, &opts(SortKey::Outstanding));
        let daemon = snap.processes.iter().find(|p| p.tgid == 2).expect("daemon");
        assert_eq!(daemon.counts.outstanding, 1);
        let site = daemon.stacks.iter().find(|s| s.counts.outstanding == 1);
        let site = site.expect("its site");
        assert_eq!(agg.stacks.frames(site.kstack), &[1, 2]);
        assert_eq!(agg.stacks.frames(site.ustack), &[9]);
    }

    /// `--all-caches`: every exited process is forgotten at once, a holder's
    /// objects counted on under the exited pseudo-process with no stack, so
    /// totals and a later free still add up; a live holder stays itself.
    #[test]
    fn forgotten_holders_hand_their_objects_to_the_exited_pseudo_process() {
        let mut agg = Aggregator::new(10_000_000_000, 1);
        agg.apply(&alloc(2, 0x20, 0, &[1, 2], &[9]));
        let n = EXITED_KEPT as u64 + 1000;
        for i in 0..n {
            agg.apply(&alloc(
                10_000 + i as u32,
                0x1000 + i * 0x10,
                0,
                &[1, 2],
                &[9],
            ));
        }
        // One exited process that holds nothing.
        agg.apply(&alloc(3, 0x30, 0, &[1, 2], &[9]));
        agg.apply(&free(0x30));
        let before = agg.snapshot(0, &opts(SortKey::Outstanding)).totals;
        let kept = agg.forget_exited(|tgid| tgid == 2, Exited::KeepBusiest);
        assert!(kept.is_empty(), "holders stay, and one empty one is kept");
        let gone = agg.forget_exited(|tgid| tgid == 2, Exited::Fold);
        assert_eq!(gone.len() as u64, n + 1);
        assert!(gone.iter().all(|f| f.comm == "gen" && f.key.tgid != 2));
        assert_eq!(gone[0].key.tgid, 3, "the empty one first");
        agg.retain_stacks([]);
        let all = SnapshotOptions {
            limit: usize::MAX,
            ..opts(SortKey::Outstanding)
        };
        let snap = agg.snapshot(0, &all);
        assert_eq!(snap.totals, before, "totals unchanged");
        let exited = snap
            .processes
            .iter()
            .find(|p| p.tgid == EXITED_HOLDERS.tgid && p.start_ns == EXITED_HOLDERS.start_ns)
            .expect("the pseudo-process");
        assert_eq!(exited.counts.outstanding, n);
        assert!(exited.exited);
        assert!(exited.stacks.iter().all(|s| s.kstack == StackId::EMPTY));
        assert_eq!(snap.processes.len(), 2);
        assert!(snap.processes.iter().any(|p| p.tgid == 2 && !p.exited));
        // A later free of a forgotten holder's object leaves the pseudo-process.
        agg.apply(&free(0x1000));
        let snap = agg.snapshot(0, &all);
        assert_eq!(snap.anomalies.unmatched_frees, 0);
        let exited = snap.processes.iter().find(|p| p.comm == "(exited)");
        assert_eq!(exited.map(|p| p.counts.outstanding), Some(n - 1));
        // The pseudo-process is never forgotten itself.
        assert!(agg.forget_exited(|tgid| tgid == 2, Exited::Fold).is_empty());
    }

    #[test]
    fn exact_mode_is_not_an_estimate() {
        let mut agg = Aggregator::new(10_000_000_000, 1);
        for i in 0..10u64 {
            agg.apply(&alloc(1, 0x100 + i, 0, &[1, 2], &[9, 10]));
        }
        for i in 0..30u64 {
            agg.apply(&alloc(1, 0x1000 + i, 0, &[1, 3], &[9, 10]));
        }
        let snap = agg.snapshot(0, &opts(SortKey::Outstanding));
        let sites = &snap.processes[0].stacks;
        assert_eq!(sites.len(), 2);
        assert!(sites.iter().all(|s| !s.estimated && !s.partial));
        assert_eq!(
            (
                sites[0].counts.outstanding,
                sites[0].outstanding_low,
                sites[0].outstanding_high
            ),
            (30, 30, 30)
        );
        assert_eq!(sites[1].counts.outstanding, 10);
    }

    use crate::test_rng::Rng;

    /// One stratum, two deeper stacks: `rare` of `total` live objects from
    /// stack A, and 50 churned (freed) allocations per live one. Returns
    /// stack A's (estimate, low, high).
    fn simulate(seed: u64, total: u64, rare: u64, every: u64) -> (u64, u64, u64) {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut agg = Aggregator::new(10_000_000_000, every);
        let level = every.trailing_zeros() as u8;
        let mut ptr = 0x1000u64;
        for i in 0..total {
            let stack: &[u64] = if i % (total / rare) == 0 {
                &[7, 1]
            } else {
                &[7, 2]
            };
            for _ in 0..50 {
                ptr += 0x200;
                let drawn = rng.next().is_multiple_of(every);
                let ev = if drawn {
                    in_stratum(alloc(1, ptr, 0, &[7, 2], &[40]), 0xf, level)
                } else {
                    undrawn(1, ptr, 7, 0xf, level)
                };
                agg.apply(&ev);
                agg.apply(&free(ptr));
            }
            ptr += 0x200;
            let drawn = rng.next().is_multiple_of(every);
            let ev = if drawn {
                in_stratum(alloc(1, ptr, 0, stack, &[40]), 0xf, level)
            } else {
                undrawn(1, ptr, 7, 0xf, level)
            };
            agg.apply(&ev);
        }
        let snap = agg.snapshot(
            0,
            &SnapshotOptions {
                stacks: 10,
                ..opts(SortKey::Outstanding)
            },
        );
        let rows = &snap.processes[0].stacks;
        let a = rows.iter().find(|r| agg.stacks.frames(r.kstack) == [7, 1]);
        match a {
            Some(r) => (r.counts.outstanding, r.outstanding_low, r.outstanding_high),
            None => {
                // Never drawn: A is whatever B is not.
                let b = rows
                    .iter()
                    .find(|r| agg.stacks.frames(r.kstack) == [7, 2])
                    .expect("the common stack is drawn");
                (0, total - b.outstanding_high, total - b.outstanding_low)
            }
        }
    }

    #[test]
    fn estimates_are_unbiased_and_the_95_interval_covers_the_truth() {
        // 1 object in 20 from the rare stack, stacks drawn for 1 in 16: 200 seeds.
        let (total, rare, every, seeds) = (2_000, 100, 16, 200u64);
        let mut sum = 0u64;
        let mut covered = 0;
        for seed in 0..seeds {
            let (est, low, high) = simulate(seed, total, rare, every);
            sum += est;
            if (low..=high).contains(&rare) {
                covered += 1;
            }
        }
        let mean = sum as f64 / seeds as f64;
        // Unbiased: the mean of 200 estimates is within 3 standard errors
        // (sd of one estimate ~ sqrt(2000·16·0.05·0.95) / ... ≈ 37 objects).
        assert!(
            (mean - rare as f64).abs() < 3.0 * 37.0 / (seeds as f64).sqrt(),
            "mean {mean}"
        );
        // The interval is a 95% one: at least 90% of 200 seeds cover the truth.
        assert!(covered >= 180, "covered {covered} of {seeds}");
    }

    /// The kernel's draw (`stack_draw` in the eBPF object) for one CPU: a
    /// census of each stratum's first allocations, the zoom table userspace
    /// writes with the kernel's budget cap, and the base rate otherwise.
    struct SimKernel {
        rng: Rng,
        census: u32,
        base_level: u8,
        seen: HashMap<u64, u32>,
        zoom: HashMap<u32, tracer_common::slab::ZoomSlot>,
        zoom_cap: u64,
        zoom_spent: (u64, u64),
    }

    impl SimKernel {
        fn draw(&mut self, tgid: u32, call_site: u64, ts: u64) -> (bool, u8, Route) {
            use tracer_common::slab::{BUDGET_WINDOW_SHIFT, ZOOM_COST_SHIFT};
            let seen = self.seen.entry(call_site).or_default();
            *seen += 1;
            if *seen <= self.census {
                return (true, 0, Route::Census);
            }
            let slot = tracer_common::slab::stratum_slot(call_site, 0, tgid);
            let window = ts >> BUDGET_WINDOW_SHIFT;
            if self.zoom_spent.0 != window {
                self.zoom_spent = (window, 0);
            }
            let (level, route) = match self.zoom.get(&slot) {
                Some(z)
                    if z.level_plus_one != 0
                        && z.tgid == tgid
                        && z.call_site == call_site
                        && self.zoom_spent.1 < self.zoom_cap =>
                {
                    let level = (z.level_plus_one - 1) as u8;
                    self.zoom_spent.1 += 1 << (ZOOM_COST_SHIFT - u32::from(level));
                    (level, Route::Zoom)
                }
                _ => (self.base_level, Route::Sampled),
            };
            let drawn = self.rng.next() & ((1u64 << level) - 1) == 0;
            (drawn, level, route)
        }
    }

    /// What one seed of the mixed design gives for one stack: its estimate
    /// and interval, the truth the estimate is for (its objects at levels
    /// that drew any outstanding object) and the whole truth.
    #[derive(Debug, Default, Clone, Copy)]
    struct Outcome {
        estimate: u64,
        low: u64,
        high: u64,
        truth_drawn_levels: u64,
        truth: u64,
    }

    /// One path of a simulated stratum: `per_s` allocations a second from
    /// `start_s` to `end_s` under stack [7, 1 + its index], 1 in `kept_one_in`
    /// kept for good and the rest freed 50-350 ms later.
    #[derive(Clone, Copy)]
    struct SimPath {
        per_s: u64,
        kept_one_in: u64,
        start_s: u64,
        end_s: u64,
    }

    struct Shape {
        paths: [SimPath; 2],
        base_level: u8,
        /// Zoom's draws per second for all strata.
        budget: f64,
        /// Path 0's objects that must be under its own stack in every seed.
        named: u64,
    }

    /// Two paths through one stratum (one process, one call site), the real
    /// aggregator and zoom controller stepping every 250 ms as in a run, the
    /// kernel's draw simulated; the report is read 3 s after the last path
    /// stops.
    fn mixed_design(seed: u64, shape: &Shape) -> [Outcome; 2] {
        use std::collections::{BTreeMap, HashMap};
        const MS: u64 = 1_000_000;
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let policy = crate::slab::zoom::Policy {
            budget_draws_per_s: shape.budget,
            ..crate::slab::zoom::Policy::default()
        };
        let mut kernel = SimKernel {
            rng: Rng(seed.wrapping_mul(0xd1b5_4a32_d192_ed03) | 1),
            census: 8,
            base_level: shape.base_level,
            seen: HashMap::new(),
            zoom: HashMap::new(),
            zoom_cap: policy.kernel_window_cap(),
            zoom_spent: (0, 0),
        };
        let mut agg = Aggregator::new(10_000_000_000, 1 << shape.base_level).census(8);
        let mut zoom = crate::slab::zoom::Zoom::new(policy, shape.base_level, 0);
        let stacks: [&[u64]; 2] = [&[7, 1], &[7, 2]];
        // Outstanding objects: ptr -> (path, level). Frees due, by time.
        let mut live: HashMap<u64, (usize, u8)> = HashMap::new();
        let mut frees: BTreeMap<(u64, u64), ()> = BTreeMap::new();
        let mut next: Vec<u64> = shape.paths.iter().map(|p| p.start_s * 1000 * MS).collect();
        let mut ptr = 0x10_000u64;
        let tick = 250 * MS;
        let end = shape.paths.iter().map(|p| p.end_s).max().unwrap_or(0) * 1000 * MS;
        let mut t = 0;
        while t < end + 3000 * MS {
            let until = t + tick;
            // This tick's allocations, in time order.
            let mut due: Vec<(u64, usize)> = Vec::new();
            for (i, p) in shape.paths.iter().enumerate() {
                while next[i] < until && next[i] < p.end_s * 1000 * MS {
                    due.push((next[i], i));
                    next[i] += 1000 * MS / p.per_s;
                }
            }
            due.sort_unstable();
            fn free_until(
                agg: &mut Aggregator,
                live: &mut HashMap<u64, (usize, u8)>,
                frees: &mut BTreeMap<(u64, u64), ()>,
                at: u64,
            ) {
                while let Some((&(when, p), _)) = frees.first_key_value() {
                    if when > at {
                        break;
                    }
                    frees.remove(&(when, p));
                    live.remove(&p);
                    agg.apply(&free(p));
                }
            }
            for (ts, path) in due {
                free_until(&mut agg, &mut live, &mut frees, ts);
                ptr += 0x200;
                let (drawn, level, route) = kernel.draw(1, 7, ts);
                let a = match if drawn {
                    alloc(1, ptr, 0, stacks[path], &[40])
                } else {
                    undrawn(1, ptr, 7, 0, level)
                } {
                    Event::Alloc(a) => a,
                    Event::Free(_) => unreachable!(),
                };
                agg.apply(&Event::Alloc(Alloc {
                    hdr: AllocHeader { ts_ns: ts, ..a.hdr },
                    level,
                    route,
                    ..a
                }));
                live.insert(ptr, (path, level));
                if !rng.next().is_multiple_of(shape.paths[path].kept_one_in) {
                    frees.insert((ts + 50 * MS + rng.next() % (300 * MS), ptr), ());
                }
            }
            free_until(&mut agg, &mut live, &mut frees, until);
            t = until;
            agg.tick(t);
            let candidates = agg.zoom_candidates(t, zoom.policy().min_age_s);
            for (slot, entry) in zoom.step(t, &candidates) {
                kernel.zoom.insert(slot, entry);
            }
        }
        let snap = agg.snapshot(
            t,
            &SnapshotOptions {
                stacks: usize::MAX,
                ..opts(SortKey::Outstanding)
            },
        );
        // Levels whose drawn objects can speak for them.
        let drawn_levels: HashSet<u8> = agg.strata[0]
            .levels
            .iter()
            .filter(|l| l.drawn.outstanding > 0)
            .map(|l| l.level)
            .collect();
        let mut out = [Outcome::default(); 2];
        for (path, o) in out.iter_mut().enumerate() {
            o.truth = live.values().filter(|(p, _)| *p == path).count() as u64;
            o.truth_drawn_levels = live
                .values()
                .filter(|(p, l)| *p == path && drawn_levels.contains(l))
                .count() as u64;
            let rows = &snap.processes[0].stacks;
            match rows
                .iter()
                .find(|r| !r.partial && agg.stacks.frames(r.kstack) == stacks[path])
            {
                Some(r) => {
                    o.estimate = r.counts.outstanding;
                    o.low = r.outstanding_low;
                    o.high = r.outstanding_high;
                }
                // Never drawn: between nothing and all that nothing names.
                None => {
                    o.high = rows
                        .iter()
                        .filter(|r| r.partial)
                        .map(|r| r.counts.outstanding)
                        .sum();
                }
            }
        }
        out
    }

    /// Issue 23's check of the mixed design (census + sampled + zoom, the
    /// zoom's trigger, budget and kernel cap included): over 200 seeds, each
    /// stack's estimate is unbiased for what it estimates (its objects at
    /// levels that drew) within 3 standard errors, and its 95% interval
    /// covers the whole truth in at least 90% of seeds (the bar; the
    /// intervals are conservative, and every shape here covers in 95% or more).
    /// Shapes: the (a rare path beside one that frees all it
    /// allocates; zoomed at 1 in 1), beside one that keeps 1 in 200; one where
    /// every level is an estimate (base 1 in 8, a zoom held to 1 in 4 by its
    /// budget); and review's stopping-rule case (one long-lived path for 62 s,
    /// then another until 180 s), where a trigger that read the draws biased
    /// the second path's estimate by 5 standard errors.
    #[test]
    fn the_mixed_design_is_unbiased_and_its_intervals_cover() {
        let path = |per_s, kept_one_in, start_s, end_s| SimPath {
            per_s,
            kept_one_in,
            start_s,
            end_s,
        };
        let rare = path(1, 1, 0, 40);
        let shapes = [
            Shape {
                paths: [rare, path(400, u64::MAX, 0, 40)],
                base_level: 6,
                budget: 10_000.0,
                named: 30,
            },
            Shape {
                paths: [rare, path(400, 200, 0, 40)],
                base_level: 6,
                budget: 10_000.0,
                named: 30,
            },
            Shape {
                paths: [rare, path(400, 50, 0, 40)],
                base_level: 3,
                budget: 100.0,
                named: 0,
            },
            Shape {
                paths: [path(16, 1, 0, 62), path(16, 1, 62, 180)],
                base_level: 6,
                budget: 10_000.0,
                named: 0,
            },
        ];
        for (n, shape) in shapes.iter().enumerate() {
            let seeds = 200;
            let outcomes: Vec<[Outcome; 2]> =
                (0..seeds).map(|seed| mixed_design(seed, shape)).collect();
            for path in 0..2 {
                let what = format!("shape {n}, path {path}");
                let diffs: Vec<f64> = outcomes
                    .iter()
                    .map(|o| o[path].estimate as f64 - o[path].truth_drawn_levels as f64)
                    .collect();
                let count = diffs.len() as f64;
                let mean = diffs.iter().sum::<f64>() / count;
                let var = diffs.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (count - 1.0);
                let se = (var / count).sqrt();
                // A shape whose draws leave nothing to chance has se 0 and
                // must then be exact.
                assert!(
                    mean.abs() <= 3.0 * se + 1e-9,
                    "{what}: mean error {mean:.3}, se {se:.3}"
                );
                let covered = outcomes
                    .iter()
                    .filter(|o| (o[path].low..=o[path].high).contains(&o[path].truth))
                    .count();
                assert!(
                    covered * 10 >= seeds as usize * 9,
                    "{what}: covered {covered} of {seeds}"
                );
            }
            let worst = outcomes.iter().map(|o| o[0].estimate).min().unwrap_or(0);
            assert!(
                worst >= shape.named,
                "shape {n}: path 0's estimate fell to {worst}"
            );
        }
    }

    #[test]
    fn a_rare_path_1_in_500_is_covered_by_its_interval() {
        let mut covered = 0;
        for seed in 0..40 {
            let (_, low, high) = simulate(seed, 5_000, 10, 64);
            if (low..=high).contains(&10) {
                covered += 1;
            }
        }
        assert!(covered >= 36, "covered {covered} of 40");
    }

    #[test]
    fn interrupt_allocations_go_to_a_pseudo_process_not_the_interrupted_one() {
        use tracer_common::{CONTEXT_KNOWN, CONTEXT_SOFTIRQ};
        let mut agg = Aggregator::new(10_000_000_000, 1);
        let in_softirq = |ptr: u64, context: u32| {
            let Event::Alloc(mut a) = alloc(42, ptr, 0, &[1, 2], &[9]) else {
                unreachable!()
            };
            a.context = context;
            Event::Alloc(a)
        };
        for i in 0..3 {
            agg.apply(&in_softirq(
                0x1000 + i * 0x10,
                CONTEXT_KNOWN | CONTEXT_SOFTIRQ,
            ));
        }
        // Bottom halves disabled is process context; unknown is too.
        agg.apply(&in_softirq(0x2000, CONTEXT_KNOWN));
        agg.apply(&in_softirq(0x3000, CONTEXT_SOFTIRQ));
        let all = SnapshotOptions {
            limit: usize::MAX,
            ..opts(SortKey::Outstanding)
        };
        let snap = agg.snapshot(0, &all);
        let softirq = snap
            .processes
            .iter()
            .find(|p| p.context == Some("softirq"))
            .expect("pseudo-process");
        assert_eq!((softirq.tgid, softirq.comm.as_str()), (0, "[softirq]"));
        assert_eq!((softirq.counts.outstanding, softirq.cgroup_id), (3, 0));
        assert!(softirq
            .stacks
            .iter()
            .all(|s| agg.stacks.frames(s.ustack).is_empty()));
        let task = snap.processes.iter().find(|p| p.tgid == 42).expect("task");
        assert_eq!((task.counts.outstanding, task.context), (2, None));
    }

    #[test]
    fn outstanding_by_process_and_site() {
        let mut agg = Aggregator::new(10_000_000_000, 1);
        let first = agg.apply(&alloc(10, 0x1000, 0, &[1, 2], &[9]));
        assert_eq!(first.process.map(|k| (k.tgid, k.start_ns)), Some((10, 7)));
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
        assert_eq!(p10.stacks.len(), 2);
        assert_eq!(p10.stacks[0].counts.outstanding, 2);
        assert_eq!(agg.stacks.frames(p10.stacks[0].kstack), &[1, 2]);
        assert_eq!(p10.stacks[1].counts.outstanding, 0);
        // Same frames in another process are another site: user addresses are per-process.
        assert_eq!(snap.processes[1].tgid, 20);
        assert_eq!(snap.cgroups[0].cgroup_id, 110);
        assert_eq!(snap.age.count, 3);
        assert_eq!(snap.age.max_ms, 1000);
        // An hour later: ages past the histogram's first 2,047 ms are kept.
        let hour = 3_600_000_000_000;
        let snap = agg.snapshot(1_000_000_000 + hour, &opts(SortKey::Outstanding));
        let max = snap.age.max_ms;
        assert!(
            (3_600_000 + 1000..=3_600_000 + 1000 + 3_601).contains(&max),
            "{max}"
        );
        assert!(snap.age.p50_ms >= 3_600_000, "{:?}", snap.age);
    }

    #[test]
    fn unmatched_free_and_pointer_reuse_are_counted_not_hidden() {
        let mut agg = Aggregator::new(10_000_000_000, 1);
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
    fn a_split_block_shrinks_by_its_parts_and_a_taken_back_one_is_not_counted() {
        let mut agg = Aggregator::new(10_000_000_000, 1);
        let block = |ptr| {
            let Event::Alloc(mut a) = alloc(1, ptr, 0, &[], &[]) else {
                unreachable!()
            };
            a.hdr.bytes_alloc = 16384;
            Event::Alloc(a)
        };
        let part = |ptr, bytes| {
            Event::Free(Free {
                tgid: 1,
                ptr,
                bytes,
            })
        };
        agg.apply(&block(0x10));
        agg.apply(&part(0x10, 4096));
        let snap = agg.snapshot(10, &opts(SortKey::Outstanding));
        assert_eq!(
            (snap.totals.outstanding, snap.totals.outstanding_bytes),
            (1, 12288)
        );
        agg.apply(&part(0x10, 4096));
        agg.apply(&free(0x10));
        agg.apply(&block(0x20));
        assert!(agg.exclude(0x20));
        assert!(!agg.exclude(0x20));
        // The taken-back block's kernel free is expected, not an anomaly.
        agg.apply(&free(0x20));
        let snap = agg.snapshot(20, &opts(SortKey::Outstanding));
        assert_eq!(
            (snap.totals.outstanding, snap.totals.outstanding_bytes),
            (0, 0)
        );
        assert_eq!((snap.totals.allocs, snap.totals.frees), (1, 1));
        assert_eq!(snap.anomalies.unmatched_frees, 0);
    }

    #[test]
    fn rates_over_window_and_sorting() {
        let mut agg = Aggregator::new(2_000_000_000, 1);
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
