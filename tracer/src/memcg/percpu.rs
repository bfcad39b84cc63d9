//! The per-CPU memory each memcg made under tracing holds, measured: the
//! per-CPU allocations a task makes inside `cgroup_mkdir` (its kernel stack
//! passes through that function) belong to the cgroup that task's next
//! `cgroup:cgroup_mkdir` event names (the event fires at the end of the
//! mkdir, after the css are allocated and online, on the same task). Frees
//! are matched by pointer, so a released memcg drops to 0.
//!
//! What counts is everything that mkdir allocates per CPU: on cgroup v1 the
//! memory hierarchy's cgroup is the memcg's own (cgroup core's percpu_ref,
//! rstat and PSI structures included); on v2 the css of other controllers
//! the parent enables for its children too, which rmdir frees (so a dying
//! memcg's figure no longer has them). Bytes are `size` × possible CPUs.

use std::collections::HashMap;

/// A kernel function's text: [start, end) from /proc/kallsyms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextRange {
    pub start: u64,
    pub end: u64,
}

impl TextRange {
    /// `name`'s text in a kallsyms listing: from its address to the next
    /// higher text symbol's. None: not there (or addresses hidden: all 0).
    pub fn of(kallsyms: &str, name: &str) -> Option<TextRange> {
        let mut start = None;
        let mut text: Vec<u64> = Vec::new();
        for line in kallsyms.lines() {
            let mut f = line.split_whitespace();
            let (Some(addr), Some(kind), Some(sym)) = (f.next(), f.next(), f.next()) else {
                continue;
            };
            if !matches!(kind, "t" | "T") {
                continue;
            }
            let Ok(addr) = u64::from_str_radix(addr, 16) else {
                continue;
            };
            if sym == name && f.next().is_none() {
                start = Some(addr);
            }
            text.push(addr);
        }
        let start = start.filter(|&a| a != 0)?;
        let end = text.into_iter().filter(|&a| a > start).min()?;
        Some(TextRange { start, end })
    }

    fn holds(&self, addr: u64) -> bool {
        (self.start..self.end).contains(&addr)
    }
}

/// One memcg's measured per-CPU allocations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Measured {
    /// Σ size of the allocations its mkdir made.
    pub created_size: u64,
    pub created_allocations: u64,
    /// Σ size of those not freed yet.
    pub outstanding_size: u64,
}

#[derive(Debug, Default)]
pub struct PercpuTracker {
    mkdir: Option<TextRange>,
    /// Per task: (ptr, size) allocated inside cgroup_mkdir, awaiting its event.
    pending: HashMap<u32, Vec<(u64, u64)>>,
    /// ptr -> (memcg id, size) of every attributed allocation not yet freed.
    owner: HashMap<u64, (u64, u64)>,
    memcgs: HashMap<u64, Measured>,
    /// Allocations outside any cgroup_mkdir (dropped).
    pub other_allocations: u64,
}

impl PercpuTracker {
    /// `mkdir`: `cgroup_mkdir`'s text; None measures nothing.
    pub fn new(mkdir: Option<TextRange>) -> PercpuTracker {
        PercpuTracker {
            mkdir,
            ..PercpuTracker::default()
        }
    }

    pub fn measuring(&self) -> bool {
        self.mkdir.is_some()
    }

    pub fn alloc(&mut self, pid: u32, ptr: u64, size: u64, kstack: &[u64]) {
        let inside = self
            .mkdir
            .is_some_and(|r| kstack.iter().any(|&a| r.holds(a)));
        if inside {
            self.pending.entry(pid).or_default().push((ptr, size));
        } else {
            self.other_allocations += 1;
        }
    }

    pub fn free(&mut self, ptr: u64) {
        if let Some((id, size)) = self.owner.remove(&ptr) {
            if let Some(m) = self.memcgs.get_mut(&id) {
                m.outstanding_size = m.outstanding_size.saturating_sub(size);
            }
            return;
        }
        // A mkdir that failed after some allocations frees them before any event.
        for list in self.pending.values_mut() {
            list.retain(|&(p, _)| p != ptr);
        }
        self.pending.retain(|_, l| !l.is_empty());
    }

    /// `pid`'s cgroup_mkdir event for memcg `id`: its pending allocations are this memcg's.
    pub fn mkdir(&mut self, pid: u32, id: u64) {
        let Some(list) = self.pending.remove(&pid) else {
            return;
        };
        let m = self.memcgs.entry(id).or_default();
        for (ptr, size) in list {
            m.created_size += size;
            m.created_allocations += 1;
            m.outstanding_size += size;
            self.owner.insert(ptr, (id, size));
        }
    }

    /// `pid` made a cgroup in another hierarchy: its pending allocations were for that one.
    pub fn other_mkdir(&mut self, pid: u32) {
        self.pending.remove(&pid);
    }

    pub fn get(&self, id: u64) -> Option<Measured> {
        self.memcgs.get(&id).copied()
    }

    /// The memcg is gone from the report: forget it (its frees came already).
    pub fn forget(&mut self, id: u64) {
        self.memcgs.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KALLSYMS: &str = "\
ffffffff81100000 T cgroup_rmdir
ffffffff81100400 T cgroup_mkdir
ffffffff81100300 d some_data
ffffffff81100900 t cgroup_destroy_locked
ffffffff81200000 T other [mod]
";

    #[test]
    fn text_range_ends_at_the_next_text_symbol() {
        let r = TextRange::of(KALLSYMS, "cgroup_mkdir").expect("found");
        assert_eq!((r.start, r.end), (0xffffffff81100400, 0xffffffff81100900));
        assert_eq!(TextRange::of(KALLSYMS, "nope"), None);
        assert_eq!(
            TextRange::of("0000000000000000 T cgroup_mkdir\n", "cgroup_mkdir"),
            None
        );
    }

    #[test]
    fn mkdir_allocations_go_to_the_next_mkdir_of_the_same_task_and_frees_drop_them() {
        let r = TextRange::of(KALLSYMS, "cgroup_mkdir");
        let mut t = PercpuTracker::new(r);
        let inside = [0xffffffff81000000, 0xffffffff81100410];
        let outside = [0xffffffff81000000, 0xffffffff81100910];
        t.alloc(7, 0x10, 8, &outside); // exec's mm counters, say
        t.alloc(7, 0x20, 1216, &inside);
        t.alloc(7, 0x30, 24, &inside);
        t.alloc(8, 0x40, 32, &inside); // another task's mkdir
        t.mkdir(7, 100);
        assert_eq!(
            t.get(100),
            Some(Measured {
                created_size: 1240,
                created_allocations: 2,
                outstanding_size: 1240
            })
        );
        assert_eq!(t.other_allocations, 1);
        t.free(0x30);
        t.free(0x10);
        assert_eq!(t.get(100).map(|m| m.outstanding_size), Some(1216));
        // Task 8's mkdir was in another hierarchy: nothing for its next memcg.
        t.other_mkdir(8);
        t.mkdir(8, 101);
        assert_eq!(t.get(101), None);
        // A failed mkdir's frees leave nothing pending.
        t.alloc(9, 0x50, 64, &inside);
        t.free(0x50);
        t.mkdir(9, 102);
        assert_eq!(t.get(102), None);
    }
}
