//! Adaptive zoom: where a stratum's objects outlive their siblings while none
//! of them drew a stack, draw that stratum's new allocations more often for a
//! while, so a rare path that leaks (a retry loop beside a busy path through
//! the same syscall wrapper and kernel call site) is named within seconds.
//!
//! Only the draw probability changes, and only for allocations made after the
//! kernel reads the new level: each event records the level it was drawn at,
//! so estimates stay unbiased (see `estimate.rs`); objects allocated before
//! stay where they were, under their level's exact count. The trigger reads
//! base-level objects only (a census or a zoom's own draws do not hide a
//! later unnamed path), and an episode is bounded in time, in draws per second
//! across every zoomed stratum, and in how many strata are zoomed at once.

use std::collections::{HashMap, VecDeque};

use serde::Serialize;
use tracer_common::slab::{stratum_slot, ZoomSlot};

/// When and how hard to zoom.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Objects at least this old count as surviving (a churning path frees
    /// within milliseconds; a key GC'd or an RCU-freed object within ~1 s).
    pub min_age_s: u32,
    /// Surviving base-level objects with no stack that start an episode.
    pub min_old_undrawn: u64,
    /// Surviving base-level objects with stacks that make zooming pointless:
    /// the sample already splits the stratum.
    pub enough_old_drawn: u64,
    pub episode_ns: u64,
    /// After an episode, its stratum waits this long before another.
    pub cooldown_ns: u64,
    /// Stack captures per second all zoomed strata may add together.
    pub budget_draws_per_s: f64,
    pub max_active: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            min_age_s: 1,
            min_old_undrawn: 2,
            enough_old_drawn: 8,
            episode_ns: 30_000_000_000,
            cooldown_ns: 30_000_000_000,
            budget_draws_per_s: 10_000.0,
            max_active: 16,
        }
    }
}

/// A stratum as the kernel keys it (the process by tgid).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StratumId {
    pub tgid: u32,
    pub call_site: u64,
    pub fingerprint: u64,
}

impl StratumId {
    fn slot(&self) -> u32 {
        stratum_slot(self.call_site, self.fingerprint, self.tgid)
    }
}

/// What the aggregator knows of one stratum now.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    pub id: StratumId,
    /// Base-level objects outstanding for at least [`Policy::min_age_s`],
    /// without and with stacks.
    pub old_undrawn: u64,
    pub old_drawn: u64,
    /// Every allocation of the stratum so far, and when it first allocated.
    pub allocs: u64,
    pub first_ns: u64,
    /// Its allocations drawn while zoomed, so far.
    pub zoom_drawn: u64,
}

/// One zoom episode, for `--json` and the header.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Episode {
    pub pid: u32,
    pub call_site: u64,
    /// The kernel symbol of `call_site`, filled in by the report.
    pub call_site_name: Option<String>,
    /// Its allocations were drawn 1 in this many (the base rate is
    /// [`super::aggregator::StackSampling::sample_every`]).
    pub sample_every: u64,
    /// Seconds since the run started.
    pub started_s: f64,
    /// None while it lasts.
    pub ended_s: Option<f64>,
    /// Its allocations drawn while zoomed.
    pub drawn: u64,
    /// Kernel time its stack captures took (ms): `drawn` times the mean the
    /// kernel measured over every zoomed draw of this run.
    pub stack_ms: f64,
    /// Why it started: base-level objects older than the trigger age, without
    /// and with stacks.
    pub old_undrawn: u64,
    pub old_drawn: u64,
}

/// Zoom's part of the stacks section.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ZoomReport {
    pub budget_draws_per_s: f64,
    pub episodes_started: u64,
    /// Active episodes first, then the latest ended ones.
    pub episodes: Vec<Episode>,
}

struct Active {
    id: StratumId,
    slot: u32,
    level: u8,
    started_ns: u64,
    /// Allocations and time at the last step, and the stratum's allocations
    /// per second then: what its draws cost of the budget.
    last: (u64, u64),
    rate: f64,
    drawn_at_start: u64,
    report: Episode,
}

/// Ended episodes kept for the report.
const ENDED_KEPT: usize = 32;

pub struct Zoom {
    policy: Policy,
    base_level: u8,
    started_ns: u64,
    active: Vec<Active>,
    cooling: HashMap<StratumId, u64>,
    ended: VecDeque<Episode>,
    episodes_started: u64,
}

/// A write to the kernel's `ZOOM` table: `slot` gets `entry` (cleared when
/// `entry.level_plus_one` is 0).
pub type SlotWrite = (u32, ZoomSlot);

impl Zoom {
    /// `base_level`: the level of an ordinary draw (`log2` of 1 in N); a
    /// stratum is zoomed only to a lower one. `started_ns`: the run's start,
    /// for the episodes' times.
    pub fn new(policy: Policy, base_level: u8, started_ns: u64) -> Zoom {
        Zoom {
            policy,
            base_level,
            started_ns,
            active: Vec::new(),
            cooling: HashMap::new(),
            ended: VecDeque::new(),
            episodes_started: 0,
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// One refresh: ends what has run its time (or whose process is gone),
    /// re-fits the level of the rest to the budget, and starts episodes on
    /// the strata that qualify. Returns the writes the kernel table needs.
    pub fn step(&mut self, now_ns: u64, candidates: &[Candidate]) -> Vec<SlotWrite> {
        let mut writes = Vec::new();
        if self.base_level == 0 {
            return writes;
        }
        let by_id: HashMap<StratumId, &Candidate> = candidates.iter().map(|c| (c.id, c)).collect();
        self.cooling.retain(|_, until| *until > now_ns);

        let mut kept = Vec::new();
        for mut a in std::mem::take(&mut self.active) {
            let current = by_id.get(&a.id);
            if let Some(c) = current {
                a.report.drawn = c.zoom_drawn.saturating_sub(a.drawn_at_start);
            }
            if current.is_none() || now_ns.saturating_sub(a.started_ns) >= self.policy.episode_ns {
                writes.push((a.slot, ZoomSlot::default()));
                a.report.ended_s = Some(self.secs(now_ns));
                self.cooling
                    .insert(a.id, now_ns.saturating_add(self.policy.cooldown_ns));
                self.ended.push_front(a.report);
                self.ended.truncate(ENDED_KEPT);
            } else {
                kept.push(a);
            }
        }
        // Re-fit each level to its stratum's rate since the last step, so
        // together they stay within the budget.
        let mut spent = 0.0;
        for a in &mut kept {
            let Some(c) = by_id.get(&a.id) else { continue };
            let (allocs, at) = a.last;
            let secs = now_ns.saturating_sub(at) as f64 / 1e9;
            if secs >= 0.1 {
                a.rate = c.allocs.saturating_sub(allocs) as f64 / secs;
                let room = self.policy.budget_draws_per_s - spent;
                let level = level_for(a.rate, room).min(self.base_level);
                if level != a.level {
                    a.level = level;
                    a.report.sample_every = 1 << level;
                    writes.push((a.slot, slot_entry(a.id, level)));
                }
                a.last = (c.allocs, now_ns);
            }
            spent += a.rate / f64::from(1u32 << a.level);
        }
        self.active = kept;

        let mut wanted: Vec<&Candidate> = candidates
            .iter()
            .filter(|c| {
                c.old_undrawn >= self.policy.min_old_undrawn
                    && c.old_drawn < self.policy.enough_old_drawn
                    && !self.cooling.contains_key(&c.id)
                    && !self.active.iter().any(|a| a.id == c.id)
            })
            .collect();
        wanted.sort_by_key(|c| std::cmp::Reverse(c.old_undrawn));
        for c in wanted {
            if self.active.len() >= self.policy.max_active {
                break;
            }
            let slot = c.id.slot();
            // One stratum per slot: the kernel compares the whole key.
            if self.active.iter().any(|a| a.slot == slot) {
                continue;
            }
            let rate = rate_of(c, now_ns);
            let room = self.policy.budget_draws_per_s - spent;
            let level = level_for(rate, room);
            if level >= self.base_level {
                continue;
            }
            spent += rate / f64::from(1u32 << level);
            writes.push((slot, slot_entry(c.id, level)));
            self.episodes_started += 1;
            self.active.push(Active {
                id: c.id,
                slot,
                level,
                started_ns: now_ns,
                last: (c.allocs, now_ns),
                rate,
                drawn_at_start: c.zoom_drawn,
                report: Episode {
                    pid: c.id.tgid,
                    call_site: c.id.call_site,
                    call_site_name: None,
                    sample_every: 1 << level,
                    started_s: self.secs(now_ns),
                    ended_s: None,
                    drawn: 0,
                    stack_ms: 0.0,
                    old_undrawn: c.old_undrawn,
                    old_drawn: c.old_drawn,
                },
            });
        }
        writes
    }

    /// The episodes so far, active first; `stack_ns_per_draw` is the kernel's
    /// measured mean time to capture a zoomed draw's stacks.
    pub fn report(&self, stack_ns_per_draw: f64) -> ZoomReport {
        let episodes = self
            .active
            .iter()
            .map(|a| &a.report)
            .chain(&self.ended)
            .map(|e| Episode {
                stack_ms: e.drawn as f64 * stack_ns_per_draw / 1e6,
                ..e.clone()
            })
            .collect();
        ZoomReport {
            budget_draws_per_s: self.policy.budget_draws_per_s,
            episodes_started: self.episodes_started,
            episodes,
        }
    }

    fn secs(&self, now_ns: u64) -> f64 {
        now_ns.saturating_sub(self.started_ns) as f64 / 1e9
    }
}

fn slot_entry(id: StratumId, level: u8) -> ZoomSlot {
    ZoomSlot {
        call_site: id.call_site,
        fingerprint: id.fingerprint,
        tgid: id.tgid,
        level_plus_one: u32::from(level) + 1,
    }
}

/// The stratum's allocations per second over its life (at least a second).
fn rate_of(c: &Candidate, now_ns: u64) -> f64 {
    let secs = (now_ns.saturating_sub(c.first_ns) as f64 / 1e9).max(1.0);
    c.allocs as f64 / secs
}

/// The lowest level (highest probability) at which `rate` allocations per
/// second draw within `room` draws per second; 31 when there is no room.
fn level_for(rate: f64, room: f64) -> u8 {
    if room <= 0.0 {
        return 31;
    }
    let mut level = 0u8;
    while level < 31 && rate / f64::from(1u32 << level) > room {
        level += 1;
    }
    level
}

/// Base-level objects outstanding, by the second they were allocated in: the
/// last few seconds one by one, older ones together, so "how many are at
/// least N s old" is a sum of a few counters instead of a walk of every
/// object. Times are whole seconds of the aggregator's clock.
#[derive(Debug, Clone, Default)]
pub struct AgeCohorts {
    undrawn: u64,
    drawn: u64,
    /// (second, undrawn, drawn); a slot holds the second it was last used for.
    recent: [(u32, u32, u32); COHORTS],
}

const COHORTS: usize = 4;

impl AgeCohorts {
    pub fn alloc(&mut self, sec: u32, drawn: bool) {
        let slot = &mut self.recent[sec as usize % COHORTS];
        if slot.0 != sec {
            // That second's objects are old now; they stay in the totals.
            *slot = (sec, 0, 0);
        }
        if drawn {
            self.drawn += 1;
            slot.2 += 1;
        } else {
            self.undrawn += 1;
            slot.1 += 1;
        }
    }

    pub fn free(&mut self, sec: u32, drawn: bool) {
        let slot = &mut self.recent[sec as usize % COHORTS];
        let own = slot.0 == sec;
        if drawn {
            self.drawn = self.drawn.saturating_sub(1);
            if own {
                slot.2 = slot.2.saturating_sub(1);
            }
        } else {
            self.undrawn = self.undrawn.saturating_sub(1);
            if own {
                slot.1 = slot.1.saturating_sub(1);
            }
        }
    }

    /// (undrawn, drawn) outstanding objects allocated at least `min_age_s`
    /// whole seconds before `now_sec` (born in a second `s` with
    /// `s + min_age_s < now_sec`); ages past what the cohorts tell apart
    /// (2 s) count from there.
    pub fn old(&self, now_sec: u32, min_age_s: u32) -> (u64, u64) {
        let min_age_s = min_age_s.min(COHORTS as u32 - 2);
        let (mut undrawn, mut drawn) = (self.undrawn, self.drawn);
        for &(sec, u, d) in &self.recent {
            let young = sec <= now_sec && sec.saturating_add(min_age_s) >= now_sec;
            if young && (u, d) != (0, 0) {
                undrawn = undrawn.saturating_sub(u64::from(u));
                drawn = drawn.saturating_sub(u64::from(d));
            }
        }
        (undrawn, drawn)
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.undrawn == 0 && self.drawn == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(tgid: u32, old_undrawn: u64, old_drawn: u64, allocs: u64) -> Candidate {
        Candidate {
            id: StratumId {
                tgid,
                call_site: 0xffff_ffff_8100_0000 + u64::from(tgid),
                fingerprint: 0,
            },
            old_undrawn,
            old_drawn,
            allocs,
            first_ns: 0,
            zoom_drawn: 0,
        }
    }

    #[test]
    fn cohorts_tell_old_from_young() {
        let mut c = AgeCohorts::default();
        c.alloc(0, false);
        c.alloc(1, false);
        c.alloc(2, true);
        c.alloc(3, false);
        // At second 3, with 1 s: seconds 0 and 1 are old.
        assert_eq!(c.old(3, 1), (2, 0));
        assert_eq!(c.old(4, 1), (2, 1));
        c.free(0, false);
        assert_eq!(c.old(4, 1), (1, 1));
        // Second 4 reuses second 0's slot; 0's objects stay counted as old.
        c.alloc(4, false);
        c.alloc(5, false);
        c.free(1, false);
        assert_eq!(c.old(6, 1), (2, 1));
        c.free(5, false);
        c.free(4, false);
        c.free(3, false);
        c.free(2, true);
        assert!(c.is_empty());
    }

    #[test]
    fn an_unnamed_surviving_stratum_is_zoomed_within_budget_then_let_go() {
        let policy = Policy::default();
        let mut z = Zoom::new(policy.clone(), 6, 0);
        let sec = 1_000_000_000;
        // 6,000 allocations a second: within the 10,000 budget at 1 in 1.
        let busy = candidate(1, 3, 0, 6_000 * 10);
        // Named well enough by the sample already.
        let sampled = candidate(2, 100, 20, 1_000);
        let writes = z.step(10 * sec, &[busy, sampled]);
        assert_eq!(writes.len(), 1);
        assert_eq!(writes[0].1.tgid, 1);
        assert_eq!(writes[0].1.level_plus_one, 1);
        // Nothing more while it lasts; then it ends and cools down.
        assert!(z.step(11 * sec, &[busy]).is_empty());
        let end = 10 * sec + policy.episode_ns;
        let writes = z.step(end, &[busy]);
        assert_eq!(writes, vec![(busy.id.slot(), ZoomSlot::default())]);
        assert!(z.step(end + sec, &[busy]).is_empty(), "cooling down");
        let report = z.report(1000.0);
        assert_eq!(report.episodes_started, 1);
        assert!(report.episodes[0].ended_s.is_some());
    }

    #[test]
    fn a_busier_stratum_is_zoomed_less_and_the_budget_is_shared() {
        let mut z = Zoom::new(Policy::default(), 6, 0);
        let sec = 1_000_000_000;
        // 100,000 a second: 1 in 16 stays within 10,000 draws a second.
        let hot = candidate(1, 5, 0, 100_000 * 10);
        let other = candidate(2, 4, 0, 9_000 * 10);
        let writes = z.step(10 * sec, &[hot, other]);
        let level = |tgid| {
            writes
                .iter()
                .find(|w| w.1.tgid == tgid)
                .map(|w| w.1.level_plus_one - 1)
        };
        assert_eq!(level(1), Some(4));
        // What is left (3,750 a second) takes 9,000 a second at 1 in 4.
        assert_eq!(level(2), Some(2));
    }

    #[test]
    fn a_stratum_that_holds_nothing_or_goes_away_ends_its_episode() {
        let mut z = Zoom::new(Policy::default(), 6, 0);
        let sec = 1_000_000_000;
        let c = candidate(7, 2, 0, 10);
        assert_eq!(z.step(5 * sec, &[c]).len(), 1);
        let writes = z.step(6 * sec, &[]);
        assert_eq!(writes, vec![(c.id.slot(), ZoomSlot::default())]);
    }

    #[test]
    fn exact_mode_never_zooms() {
        let mut z = Zoom::new(Policy::default(), 0, 0);
        assert!(z.step(10, &[candidate(1, 100, 0, 10)]).is_empty());
    }

    #[test]
    fn levels_fit_the_room() {
        assert_eq!(level_for(5_000.0, 10_000.0), 0);
        assert_eq!(level_for(20_000.0, 10_000.0), 1);
        assert_eq!(level_for(1.0, 0.0), 31);
    }
}
