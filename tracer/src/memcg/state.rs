//! Every memcg we know of and where it is in its life: live -> removed (dying)
//! -> released; a dying memcg older than `--zombie-after` is a zombie. Also the
//! charged objects outstanding per memcg, which is what keeps a zombie alive.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::Serialize;

use crate::bpf::stacks::{StackId, StackTable};
use crate::kernel::cgroup_paths::{self as paths, ContainerInfo};
use crate::memcg::percpu::PercpuTracker;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Live,
    Dying,
    Zombie,
    Released,
}

/// A task that created or removed a memcg.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Actor {
    pub pid: u32,
    pub tgid: u32,
    pub comm: String,
    pub cmdline: Option<String>,
    /// Parents from the nearest up to the first recognizable one (kubelet,
    /// containerd-shim, runc, systemd...) or init.
    pub ancestry: Vec<Ancestor>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ancestor {
    pub pid: u32,
    pub comm: String,
}

#[derive(Debug, Clone)]
pub struct Memcg {
    pub id: u64,
    pub path: String,
    pub level: u32,
    pub created_ns: Option<u64>,
    pub removed_ns: Option<u64>,
    pub released_ns: Option<u64>,
    /// kprobes only: the memcg css went offline / was freed.
    pub css_offline_ns: Option<u64>,
    pub css_freed_ns: Option<u64>,
    pub creator: Option<Actor>,
    pub remover: Option<Actor>,
    /// Existed when tracing started (its creator is unknown).
    pub preexisting: bool,
    pub container: ContainerInfo,
}

impl Memcg {
    fn phase(&self, now_ns: u64, zombie_after_ns: u64) -> Phase {
        match (self.removed_ns, self.released_ns) {
            (_, Some(_)) => Phase::Released,
            (Some(r), None) if now_ns.saturating_sub(r) >= zombie_after_ns => Phase::Zombie,
            (Some(_), None) => Phase::Dying,
            (None, None) => Phase::Live,
        }
    }
}

/// One place charged objects come from: cache, process and kernel stack.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PinSite {
    cache: String,
    tgid: u32,
    comm: String,
    stack: StackId,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PinCount {
    pub objects: u64,
    pub bytes: u64,
}

#[derive(Default)]
struct Pins {
    sites: Vec<PinSite>,
    site_ids: HashMap<PinSite, u32>,
    /// ptr -> (memcg, site, bytes)
    objects: HashMap<u64, (u64, u32, u64)>,
    /// memcg -> site -> outstanding
    per_memcg: HashMap<u64, HashMap<u32, PinCount>>,
    charges: u64,
    uncharges: u64,
    /// A pointer charged again before its free was seen (a free path without a tracepoint).
    recharged: u64,
}

pub struct ChargeInput<'a> {
    pub ptr: u64,
    pub memcg_id: u64,
    pub bytes: u64,
    pub cache: String,
    pub tgid: u32,
    pub comm: &'a str,
    pub kstack: &'a [u64],
}

/// Rates over a sliding window of event timestamps.
#[derive(Default)]
struct Window(VecDeque<u64>);

impl Window {
    fn push(&mut self, ts: u64) {
        self.0.push_back(ts);
    }
    fn rate(&mut self, now_ns: u64, window_ns: u64) -> f64 {
        while self
            .0
            .front()
            .is_some_and(|&t| now_ns.saturating_sub(t) > window_ns)
        {
            self.0.pop_front();
        }
        self.0.len() as f64 / (window_ns as f64 / 1e9)
    }
}

/// Released memcgs kept for the report (the most recent); counts are exact regardless.
const KEEP_RELEASED: usize = 1000;

pub struct Tracker {
    memcgs: HashMap<u64, Memcg>,
    released_order: VecDeque<u64>,
    pub stacks: StackTable,
    pins: Pins,
    created: u64,
    removed: u64,
    released: u64,
    /// Releases of memcgs removed before we started: the pre-existing dying pool shrinking.
    released_preexisting_dying: u64,
    creations: Window,
    releases: Window,
    /// Per-CPU allocations of the memcgs made under tracing (`percpu.rs`).
    pub percpu: PercpuTracker,
}

impl Tracker {
    /// Start from the live directories of the hierarchy (id -> (path, level)).
    pub fn new(live: HashMap<u64, (String, u32)>) -> Tracker {
        let memcgs = live
            .into_iter()
            .map(|(id, (path, level))| {
                let container = paths::decode(&path);
                (
                    id,
                    Memcg {
                        id,
                        path,
                        level,
                        created_ns: None,
                        removed_ns: None,
                        released_ns: None,
                        css_offline_ns: None,
                        css_freed_ns: None,
                        creator: None,
                        remover: None,
                        preexisting: true,
                        container,
                    },
                )
            })
            .collect();
        Tracker {
            memcgs,
            released_order: VecDeque::new(),
            stacks: StackTable::default(),
            pins: Pins::default(),
            created: 0,
            removed: 0,
            released: 0,
            released_preexisting_dying: 0,
            creations: Window::default(),
            releases: Window::default(),
            percpu: PercpuTracker::default(),
        }
    }

    /// A live directory seen by a later walk; known ids keep what we learnt.
    pub fn seed_live(&mut self, id: u64, path: String, level: u32) {
        self.memcgs.entry(id).or_insert_with(|| Memcg {
            id,
            container: paths::decode(&path),
            path,
            level,
            created_ns: None,
            removed_ns: None,
            released_ns: None,
            css_offline_ns: None,
            css_freed_ns: None,
            creator: None,
            remover: None,
            preexisting: true,
        });
    }

    pub fn mkdir(&mut self, id: u64, path: &str, level: u32, ts: u64, creator: Actor) {
        self.created += 1;
        self.creations.push(ts);
        // Ids are not reused while a cgroup exists, so a known id here is a
        // stale released entry (kernfs ids are 64-bit and only grow).
        self.memcgs.insert(
            id,
            Memcg {
                id,
                path: path.to_string(),
                level,
                created_ns: Some(ts),
                removed_ns: None,
                released_ns: None,
                css_offline_ns: None,
                css_freed_ns: None,
                creator: Some(creator),
                remover: None,
                preexisting: false,
                container: paths::decode(path),
            },
        );
    }

    pub fn rmdir(&mut self, id: u64, path: &str, level: u32, ts: u64, remover: Actor) {
        self.removed += 1;
        let m = self.memcgs.entry(id).or_insert_with(|| Memcg {
            // Created before we started and missed by the start-up walk (a race).
            id,
            path: path.to_string(),
            level,
            created_ns: None,
            removed_ns: None,
            released_ns: None,
            css_offline_ns: None,
            css_freed_ns: None,
            creator: None,
            remover: None,
            preexisting: true,
            container: paths::decode(path),
        });
        m.removed_ns = Some(ts);
        m.remover = Some(remover);
    }

    pub fn release(&mut self, id: u64, ts: u64) {
        self.released += 1;
        self.releases.push(ts);
        match self.memcgs.get_mut(&id) {
            Some(m) => {
                m.released_ns = Some(ts);
                self.released_order.push_back(id);
                while self.released_order.len() > KEEP_RELEASED {
                    if let Some(old) = self.released_order.pop_front() {
                        self.memcgs.remove(&old);
                        self.percpu.forget(old);
                    }
                }
            }
            None => self.released_preexisting_dying += 1,
        }
    }

    /// kprobe mem_cgroup_css_offline: only recorded on memcgs we know.
    pub fn css_offline(&mut self, id: u64, ts: u64) {
        if let Some(m) = self.memcgs.get_mut(&id) {
            m.css_offline_ns = Some(ts);
        }
    }

    /// kprobe mem_cgroup_css_free: the memcg is gone, whatever cgroup_release says.
    pub fn css_free(&mut self, id: u64, ts: u64) {
        if let Some(m) = self.memcgs.get_mut(&id) {
            m.css_freed_ns = Some(ts);
        }
    }

    pub fn charge(&mut self, c: ChargeInput<'_>) {
        self.pins.charges += 1;
        if self.pins.objects.contains_key(&c.ptr) {
            self.pins.recharged += 1;
            self.uncharge(c.ptr);
        }
        let site = PinSite {
            cache: c.cache,
            tgid: c.tgid,
            comm: c.comm.to_string(),
            stack: self.stacks.intern(c.kstack),
        };
        let next = self.pins.sites.len() as u32;
        let sid = *self.pins.site_ids.entry(site.clone()).or_insert(next);
        if sid == next {
            self.pins.sites.push(site);
        }
        self.pins.objects.insert(c.ptr, (c.memcg_id, sid, c.bytes));
        let count = self
            .pins
            .per_memcg
            .entry(c.memcg_id)
            .or_default()
            .entry(sid)
            .or_default();
        count.objects += 1;
        count.bytes += c.bytes;
    }

    /// Returns false for a pointer we never saw charged (should not happen).
    pub fn uncharge(&mut self, ptr: u64) -> bool {
        let Some((memcg, sid, bytes)) = self.pins.objects.remove(&ptr) else {
            return false;
        };
        self.pins.uncharges += 1;
        if let Some(sites) = self.pins.per_memcg.get_mut(&memcg) {
            if let Some(c) = sites.get_mut(&sid) {
                c.objects = c.objects.saturating_sub(1);
                c.bytes = c.bytes.saturating_sub(bytes);
                if c.objects == 0 {
                    sites.remove(&sid);
                }
            }
            if sites.is_empty() {
                self.pins.per_memcg.remove(&memcg);
            }
        }
        true
    }

    /// Dying memcgs we saw removed and not yet released.
    pub fn tracked_dying(&self) -> u64 {
        self.memcgs
            .values()
            .filter(|m| m.removed_ns.is_some() && m.released_ns.is_none())
            .count() as u64
    }

    pub fn snapshot(&mut self, now_ns: u64, opts: &SnapshotOptions) -> Snapshot {
        let za = opts.zombie_after_ns;
        let mut counts = Counts {
            created: self.created,
            removed: self.removed,
            released: self.released,
            released_preexisting_dying: self.released_preexisting_dying,
            ..Counts::default()
        };
        let mut shown = Vec::new();
        for m in self.memcgs.values() {
            let phase = m.phase(now_ns, za);
            match phase {
                Phase::Live => counts.live += 1,
                Phase::Dying => counts.dying += 1,
                Phase::Zombie => {
                    counts.dying += 1;
                    counts.zombie += 1;
                }
                Phase::Released => {}
            }
            let interesting = !m.preexisting || m.removed_ns.is_some();
            if interesting || opts.include_preexisting_live {
                shown.push(self.memcg_report(m, phase, now_ns, opts));
            }
        }
        // Zombies first, oldest removal first; then dying, live (newest first), released (newest first).
        shown.sort_by(|a, b| {
            let rank = |p: Phase| match p {
                Phase::Zombie => 0,
                Phase::Dying => 1,
                Phase::Live => 2,
                Phase::Released => 3,
            };
            rank(a.state)
                .cmp(&rank(b.state))
                .then(
                    b.dying_s
                        .partial_cmp(&a.dying_s)
                        .unwrap_or(std::cmp::Ordering::Equal),
                )
                .then(
                    a.age_s
                        .partial_cmp(&b.age_s)
                        .unwrap_or(std::cmp::Ordering::Equal),
                )
                .then(a.id.cmp(&b.id))
        });
        let mut by_comm: BTreeMap<String, Group> = BTreeMap::new();
        let mut by_pod: BTreeMap<String, Group> = BTreeMap::new();
        for m in shown.iter().filter(|m| m.state == Phase::Zombie) {
            let comm = m
                .creator
                .as_ref()
                .map_or_else(|| "(before tracing)".to_string(), |c| c.comm.clone());
            add_group(&mut by_comm, comm, m);
            let pod = m
                .container
                .pod_uid
                .clone()
                .unwrap_or_else(|| "(no pod)".to_string());
            add_group(&mut by_pod, pod, m);
        }
        let sorted = |g: BTreeMap<String, Group>| {
            let mut v: Vec<Group> = g.into_values().collect();
            v.sort_by(|a, b| {
                b.zombies.cmp(&a.zombies).then(
                    b.oldest_dying_s
                        .partial_cmp(&a.oldest_dying_s)
                        .unwrap_or(std::cmp::Ordering::Equal),
                )
            });
            v
        };
        let window = opts.rate_window_ns.max(1);
        Snapshot {
            counts,
            created_per_s: self.creations.rate(now_ns, window),
            released_per_s: self.releases.rate(now_ns, window),
            zombies_by_creator: sorted(by_comm),
            zombies_by_pod: sorted(by_pod),
            memcgs: shown,
            pins: PinTotals {
                charges: self.pins.charges,
                uncharges: self.pins.uncharges,
                outstanding: self.pins.objects.len() as u64,
                recharged: self.pins.recharged,
            },
        }
    }

    fn memcg_report(
        &self,
        m: &Memcg,
        state: Phase,
        now_ns: u64,
        opts: &SnapshotOptions,
    ) -> MemcgReport {
        let secs = |from: Option<u64>, to: u64| from.map(|t| to.saturating_sub(t) as f64 / 1e9);
        let after_rmdir = |t: Option<u64>| Some(t?.saturating_sub(m.removed_ns?) as f64 / 1e9);
        let end = m.released_ns.unwrap_or(now_ns);
        let pinned = self.pins.per_memcg.get(&m.id);
        let total = pinned.map_or_else(PinCount::default, |s| {
            s.values().fold(PinCount::default(), |a, c| PinCount {
                objects: a.objects + c.objects,
                bytes: a.bytes + c.bytes,
            })
        });
        // Detail only where it answers "what pins it": removed, not released.
        let detail = matches!(state, Phase::Dying | Phase::Zombie);
        let mut sites: Vec<(&PinSite, PinCount)> = if detail {
            pinned
                .into_iter()
                .flatten()
                .filter_map(|(&sid, &c)| Some((self.pins.sites.get(sid as usize)?, c)))
                .collect()
        } else {
            Vec::new()
        };
        sites.sort_by_key(|s| std::cmp::Reverse(s.1.objects));
        let mut by_cache: BTreeMap<&str, PinCount> = BTreeMap::new();
        let mut by_process: BTreeMap<(u32, &str), PinCount> = BTreeMap::new();
        for (s, c) in &sites {
            let e = by_cache.entry(&s.cache).or_default();
            e.objects += c.objects;
            e.bytes += c.bytes;
            let e = by_process.entry((s.tgid, &s.comm)).or_default();
            e.objects += c.objects;
            e.bytes += c.bytes;
        }
        let mut by_cache: Vec<CachePins> = by_cache
            .into_iter()
            .map(|(cache, count)| CachePins {
                cache: cache.to_string(),
                count,
            })
            .collect();
        by_cache.sort_by_key(|c| std::cmp::Reverse(c.count.objects));
        let mut by_process: Vec<ProcessPins> = by_process
            .into_iter()
            .map(|((tgid, comm), count)| ProcessPins {
                tgid,
                comm: comm.to_string(),
                count,
            })
            .collect();
        by_process.sort_by_key(|p| std::cmp::Reverse(p.count.objects));
        let stacks = sites
            .iter()
            .take(opts.stacks)
            .map(|(s, c)| PinStack {
                cache: s.cache.clone(),
                tgid: s.tgid,
                comm: s.comm.clone(),
                count: *c,
                stack: s.stack,
                kernel: Vec::new(),
            })
            .collect();
        MemcgReport {
            id: m.id,
            path: m.path.clone(),
            level: m.level,
            state,
            preexisting: m.preexisting,
            age_s: secs(m.created_ns, end),
            dying_s: secs(m.removed_ns, end),
            released_after_rmdir_s: match (m.removed_ns, m.released_ns) {
                (Some(r), Some(f)) => Some(f.saturating_sub(r) as f64 / 1e9),
                _ => None,
            },
            css_offline_after_rmdir_s: after_rmdir(m.css_offline_ns),
            css_freed_after_rmdir_s: after_rmdir(m.css_freed_ns),
            creator: m.creator.clone(),
            remover: m.remover.clone(),
            container: m.container.clone(),
            pinned: total,
            pinned_by_cache: by_cache,
            pinned_by_process: by_process,
            pinned_stacks: stacks,
            percpu: None,
        }
    }
}

fn add_group(groups: &mut BTreeMap<String, Group>, key: String, m: &MemcgReport) {
    let g = groups.entry(key.clone()).or_insert_with(|| Group {
        key,
        zombies: 0,
        oldest_dying_s: 0.0,
        pinned: PinCount::default(),
    });
    g.zombies += 1;
    g.oldest_dying_s = g.oldest_dying_s.max(m.dying_s.unwrap_or(0.0));
    g.pinned.objects += m.pinned.objects;
    g.pinned.bytes += m.pinned.bytes;
}

pub struct SnapshotOptions {
    pub zombie_after_ns: u64,
    pub rate_window_ns: u64,
    /// Also list memcgs that were live before we started and still are (`--list`).
    pub include_preexisting_live: bool,
    /// Pinning stacks per dying memcg.
    pub stacks: usize,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Counts {
    pub live: u64,
    /// Removed and not yet released, zombies included.
    pub dying: u64,
    pub zombie: u64,
    /// Since tracing started.
    pub created: u64,
    pub removed: u64,
    pub released: u64,
    /// Releases of memcgs that were already dying when tracing started.
    pub released_preexisting_dying: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Group {
    pub key: String,
    pub zombies: u64,
    pub oldest_dying_s: f64,
    pub pinned: PinCount,
}

#[derive(Debug, Clone, Serialize)]
pub struct CachePins {
    pub cache: String,
    #[serde(flatten)]
    pub count: PinCount,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProcessPins {
    pub tgid: u32,
    pub comm: String,
    #[serde(flatten)]
    pub count: PinCount,
}

#[derive(Debug, Clone, Serialize)]
pub struct PinStack {
    pub cache: String,
    pub tgid: u32,
    pub comm: String,
    #[serde(flatten)]
    pub count: PinCount,
    #[serde(skip)]
    pub stack: StackId,
    /// Filled by the report with symbolized frames.
    pub kernel: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemcgReport {
    pub id: u64,
    pub path: String,
    pub level: u32,
    pub state: Phase,
    pub preexisting: bool,
    /// Since mkdir (None when created before tracing), until release if released.
    pub age_s: Option<f64>,
    /// Since rmdir, until release if released.
    pub dying_s: Option<f64>,
    pub released_after_rmdir_s: Option<f64>,
    /// kprobes only: when the memcg css went offline and was freed, after rmdir.
    pub css_offline_after_rmdir_s: Option<f64>,
    pub css_freed_after_rmdir_s: Option<f64>,
    pub creator: Option<Actor>,
    pub remover: Option<Actor>,
    pub container: ContainerInfo,
    /// Charged objects allocated inside it since tracing started and not freed.
    pub pinned: PinCount,
    pub pinned_by_cache: Vec<CachePins>,
    pub pinned_by_process: Vec<ProcessPins>,
    pub pinned_stacks: Vec<PinStack>,
    /// Per-CPU memory it holds, measured or estimated (set by the session).
    pub percpu: Option<MemcgPercpu>,
}

/// A memcg's per-CPU memory: `kind` "measured" (its mkdir's per-CPU
/// allocations not yet freed, seen by the percpu tracepoints), "estimated"
/// (BTF sizes of what a memcg allocates, `kernel::memcg_percpu`) or
/// "released" (the kernel freed it all). Bytes: size × possible CPUs.
#[derive(Debug, Clone, Serialize)]
pub struct MemcgPercpu {
    pub bytes: u64,
    pub kind: &'static str,
    /// Measured only: what its mkdir allocated, freed since or not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at_creation_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocations: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PinTotals {
    pub charges: u64,
    pub uncharges: u64,
    pub outstanding: u64,
    pub recharged: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub counts: Counts,
    pub created_per_s: f64,
    pub released_per_s: f64,
    pub zombies_by_creator: Vec<Group>,
    pub zombies_by_pod: Vec<Group>,
    pub memcgs: Vec<MemcgReport>,
    pub pins: PinTotals,
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn opts() -> SnapshotOptions {
        SnapshotOptions {
            zombie_after_ns: 30 * S,
            rate_window_ns: 10 * S,
            include_preexisting_live: false,
            stacks: 3,
        }
    }

    fn actor(pid: u32, comm: &str) -> Actor {
        Actor {
            pid,
            tgid: pid,
            comm: comm.into(),
            ..Actor::default()
        }
    }

    #[test]
    fn lifecycle_live_dying_zombie_released() {
        let mut t = Tracker::new(HashMap::from([(1, (String::new(), 0))]));
        t.mkdir(10, "/a", 1, S, actor(7, "runc"));
        let s = t.snapshot(2 * S, &opts());
        assert_eq!((s.counts.live, s.counts.dying), (2, 0));
        assert_eq!(
            s.memcgs.len(),
            1,
            "pre-existing live memcgs are counted, not listed"
        );
        t.rmdir(10, "/a", 1, 3 * S, actor(8, "kubelet"));
        let s = t.snapshot(4 * S, &opts());
        assert_eq!((s.counts.live, s.counts.dying, s.counts.zombie), (1, 1, 0));
        assert_eq!(s.memcgs[0].state, Phase::Dying);
        let s = t.snapshot(40 * S, &opts());
        assert_eq!(s.counts.zombie, 1);
        assert_eq!(s.memcgs[0].state, Phase::Zombie);
        assert_eq!(s.zombies_by_creator[0].key, "runc");
        assert_eq!(s.memcgs[0].dying_s, Some(37.0));
        assert_eq!(t.tracked_dying(), 1);
        t.release(10, 41 * S);
        t.release(99, 41 * S);
        let s = t.snapshot(42 * S, &opts());
        assert_eq!((s.counts.dying, s.counts.released), (0, 2));
        assert_eq!(s.counts.released_preexisting_dying, 1);
        assert_eq!(s.memcgs[0].state, Phase::Released);
        assert_eq!(s.memcgs[0].released_after_rmdir_s, Some(38.0));
        assert_eq!(s.memcgs[0].creator.as_ref().map(|c| c.pid), Some(7));
        assert_eq!(s.memcgs[0].remover.as_ref().map(|c| c.pid), Some(8));
    }

    #[test]
    fn pins_follow_charges_and_frees_per_memcg() {
        let mut t = Tracker::new(HashMap::new());
        t.mkdir(10, "/a", 1, S, actor(7, "mkdir"));
        for ptr in 0..5u64 {
            t.charge(ChargeInput {
                ptr: 0x1000 + ptr * 512,
                memcg_id: 10,
                bytes: 512,
                cache: "kmalloc-cg-512".into(),
                tgid: 9,
                comm: "leakgen",
                kstack: &[1, 2, 3],
            });
        }
        assert!(t.uncharge(0x1000));
        assert!(
            !t.uncharge(0x1000),
            "a second free of the same object is not counted"
        );
        t.rmdir(10, "/a", 1, 2 * S, actor(7, "rmdir"));
        let s = t.snapshot(3 * S, &opts());
        let m = &s.memcgs[0];
        assert_eq!(
            m.pinned,
            PinCount {
                objects: 4,
                bytes: 2048
            }
        );
        assert_eq!(m.pinned_by_cache[0].cache, "kmalloc-cg-512");
        assert_eq!(m.pinned_by_process[0].tgid, 9);
        assert_eq!(m.pinned_stacks[0].count.objects, 4);
        assert_eq!(s.pins.outstanding, 4);
    }
}
