//! What the aggregator does with processes found gone: forgets them (their
//! strata, sites and names) once they hold nothing, or under `--all-caches`
//! at once, handing what they still hold to one pseudo-process.

use std::collections::{HashSet, VecDeque};

use super::{
    level_mut, reuse_or_push, Aggregator, Interrupt, Process, Stratum, StratumKey, NOT_DRAWN,
};
use crate::{
    bpf::stacks::StackId,
    slab::report::{Counts, ProcKey},
    slab::zoom::AgeCohorts,
};

/// Exited processes that hold nothing kept for the report; see
/// [`Aggregator::forget_exited`].
pub const EXITED_KEPT: usize = 256;

/// A process [`Aggregator::forget_exited`] let go of: its key, and the
/// names it had (the kernel's comm of its main thread, its last cgroup).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forgotten {
    pub key: ProcKey,
    pub comm: String,
    pub cgroup_id: u64,
}

/// What [`Aggregator::forget_exited`] does with the processes found gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exited {
    /// Forget those that hold nothing past the [`EXITED_KEPT`] busiest: the
    /// report lists what a process that exited still holds, by its pid.
    KeepBusiest,
    /// `--all-caches`: forget every one at once, holders too. Its rows count
    /// samples, and the estimates (`slab/kheap.rs`) fold what exited
    /// processes still hold by comm, cgroup, stacks and cache, so they stay
    /// as many as the live processes and what exited ones hold, however
    /// many processes come and go.
    Fold,
}

/// The pseudo-process the objects of forgotten exited holders are counted
/// under (`--all-caches` only; [`Aggregator::forget_exited`]): tgid 0 and
/// a start no task has, beside the interrupts' ones.
pub const EXITED_HOLDERS: ProcKey = ProcKey {
    tgid: 0,
    start_ns: u64::MAX - 4,
};

impl Aggregator {
    /// Forget processes that are gone (`alive` says no) and hold nothing,
    /// beyond the [`EXITED_KEPT`] with the most allocations: a node running
    /// exec probes or cron jobs starts thousands of them an hour, and their rows
    /// would grow the table without end, while a busy one that exited is still
    /// worth its row in the report. A process that holds objects stays. So
    /// [`Exited::KeepBusiest`]; under [`Exited::Fold`] every gone process is
    /// forgotten at once, and a holder's objects stay counted under
    /// [`EXITED_HOLDERS`], with no stack. Every other gone process is marked
    /// exited. Returns the processes forgotten, so callers can drop what they
    /// keep per process; their stacks stay until [`Aggregator::retain_stacks`].
    pub fn forget_exited(&mut self, alive: impl Fn(u32) -> bool, how: Exited) -> Vec<Forgotten> {
        let (holders, kept) = match how {
            Exited::KeepBusiest => (false, EXITED_KEPT),
            Exited::Fold => (true, 0),
        };
        for p in self.procs.values_mut() {
            if p.key != EXITED_HOLDERS {
                p.exited = Interrupt::of_key(p.key).is_none() && !alive(p.key.tgid);
            }
        }
        let mut exited: Vec<(bool, u64, ProcKey)> = self
            .procs
            .values()
            .filter(|p| p.exited && p.key != EXITED_HOLDERS)
            .filter(|p| holders || p.counts.outstanding == 0)
            .map(|p| (p.counts.outstanding > 0, p.counts.allocs, p.key))
            .collect();
        if exited.len() <= kept {
            return Vec::new();
        }
        exited.sort_unstable();
        let excess = exited.len() - kept;
        let gone = &exited[..excess];
        // The holders' objects move before their strata's slots are freed
        // (the pseudo-process's stratum must not take one of them).
        if gone.iter().any(|&(holds, _, _)| holds) {
            let into = self.holders_stratum();
            let moved: HashSet<u32> = gone
                .iter()
                .filter_map(|(_, _, k)| self.procs.get(k))
                .flat_map(|p| p.strata.iter().copied())
                .collect();
            self.hand_over(&moved, into);
        }
        let mut forgotten = Vec::with_capacity(gone.len());
        for &(_, _, key) in gone {
            let Some(p) = self.procs.remove(&key) else {
                continue;
            };
            // Nothing outstanding refers to these slots any more, so they
            // are free for the next new stratum or site.
            for h in p.strata {
                let Some(stratum) = self.strata.get_mut(h as usize) else {
                    continue;
                };
                self.stratum_ids.remove(&stratum.key);
                for site in std::mem::take(&mut stratum.sites) {
                    if let Some(s) = self.sites.get(site as usize) {
                        self.site_ids.remove(&(h, s.kstack, s.ustack));
                        self.free_sites.push(site);
                    }
                }
                stratum.name = None;
                self.free_strata.push(h);
            }
            forgotten.push(Forgotten {
                key,
                comm: p.comm,
                cgroup_id: p.last_cgroup_id,
            });
        }
        forgotten
    }

    /// Drops every stack no process still known refers to, nor `also` (what
    /// other tables keep by id); their ids may then name other stacks.
    pub fn retain_stacks(&mut self, also: impl IntoIterator<Item = StackId>) {
        let mut keep = self.stacks_in_use();
        keep.extend(also);
        self.stacks.retain(&keep);
    }

    /// The stratum of [`EXITED_HOLDERS`], made on first use.
    fn holders_stratum(&mut self) -> u32 {
        let key = StratumKey {
            proc: EXITED_HOLDERS,
            call_site: 0,
            fingerprint: 0,
        };
        if let Some(&id) = self.stratum_ids.get(&key) {
            return id;
        }
        let stratum = Stratum {
            key,
            user_ip: 0,
            counts: Counts::default(),
            levels: Vec::new(),
            sites: Vec::new(),
            name: None,
            ages: AgeCohorts::default(),
            first_ns: 0,
            last_ns: 0,
            zoom_drawn: 0,
        };
        let id = reuse_or_push(&mut self.strata, &mut self.free_strata, stratum);
        self.stratum_ids.insert(key, id);
        let p = self.procs.entry(EXITED_HOLDERS).or_insert_with(|| Process {
            key: EXITED_HOLDERS,
            ppid: 0,
            exited: true,
            comm: "(exited)".to_string(),
            last_cgroup_id: 0,
            charged_elsewhere: None,
            counts: Counts::default(),
            strata: Vec::new(),
            shallow_allocs: 0,
            history: VecDeque::new(),
            first_seen_ns: 0,
        });
        p.strata.push(id);
        id
    }

    /// The outstanding objects of the strata `from` move to stratum `into`
    /// (of [`EXITED_HOLDERS`]) as undrawn: still outstanding, with their
    /// size, age, level and memcg, but no stack. Totals and memcgs do not
    /// change; the old strata are discarded by the caller.
    fn hand_over(&mut self, from: &HashSet<u32>, into: u32) {
        let base_level = self.base_level;
        let Some(s) = self.strata.get_mut(into as usize) else {
            return;
        };
        let mut moved = Counts::default();
        for live in self.objects.values_mut() {
            if !from.contains(&live.stratum) {
                continue;
            }
            let bytes = u64::from(live.bytes);
            live.stratum = into;
            live.site = NOT_DRAWN;
            s.counts.alloc(bytes);
            level_mut(&mut s.levels, live.level).counts.alloc(bytes);
            if live.level == base_level && base_level > 0 {
                s.ages.alloc(live.ts_ms / 1000);
            }
            moved.alloc(bytes);
        }
        if let Some(p) = self.procs.get_mut(&EXITED_HOLDERS) {
            p.counts.outstanding += moved.outstanding;
            p.counts.outstanding_bytes += moved.outstanding_bytes;
            p.counts.allocs += moved.allocs;
        }
    }

    /// Every stack a process still known refers to.
    fn stacks_in_use(&self) -> HashSet<StackId> {
        let mut used = HashSet::new();
        for h in self.procs.values().flat_map(|p| &p.strata) {
            let Some(stratum) = self.strata.get(*h as usize) else {
                continue;
            };
            if let Some((k, u)) = stratum.name {
                used.extend([k, u]);
            }
            for site in &stratum.sites {
                if let Some(s) = self.sites.get(*site as usize) {
                    used.extend([s.kstack, s.ustack]);
                }
            }
        }
        used
    }
}
