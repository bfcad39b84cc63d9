//! Stack interning. The kernel copies raw frames (`bpf_get_stack`) into every event
//! instead of using `bpf_get_stackid`, whose stack map merges different stacks on a
//! hash collision and silently stops recording when full. Here we dedupe by the
//! full frame list, so two stacks are one id only if every frame is equal.

use std::{
    collections::{HashMap, HashSet},
    rc::Rc,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StackId(pub u32);

impl StackId {
    /// The empty stack (capture disabled, failed, or a kernel thread's user stack).
    pub const EMPTY: StackId = StackId(0);
}

/// Interned stacks. One allocation per stack, shared by the lookup key and the
/// id's slot. Slots of stacks nobody refers to any more are reused
/// ([`StackTable::retain`]): a node that runs thousands of short-lived
/// processes must not grow leaktrace by every stack they ever had.
#[derive(Debug)]
pub struct StackTable {
    ids: HashMap<Rc<[u64]>, StackId>,
    frames: Vec<Rc<[u64]>>,
    free: Vec<StackId>,
}

impl Default for StackTable {
    fn default() -> Self {
        let empty: Rc<[u64]> = Rc::from(Vec::new());
        StackTable {
            ids: HashMap::from([(empty.clone(), StackId::EMPTY)]),
            frames: vec![empty],
            free: Vec::new(),
        }
    }
}

impl StackTable {
    pub fn intern(&mut self, frames: &[u64]) -> StackId {
        if let Some(&id) = self.ids.get(frames) {
            return id;
        }
        let owned: Rc<[u64]> = Rc::from(frames);
        let id = match self.free.pop() {
            Some(id) => {
                if let Some(slot) = self.frames.get_mut(id.0 as usize) {
                    *slot = owned.clone();
                }
                id
            }
            None => {
                self.frames.push(owned.clone());
                StackId(self.frames.len() as u32 - 1)
            }
        };
        self.ids.insert(owned, id);
        id
    }

    pub fn frames(&self, id: StackId) -> &[u64] {
        self.frames.get(id.0 as usize).map_or(&[], |f| f)
    }

    /// Drops every stack not in `keep` (the empty stack always stays); their
    /// ids may then name other stacks, so `keep` must hold every id still in use.
    pub fn retain(&mut self, keep: &HashSet<StackId>) {
        let empty = self.frames[StackId::EMPTY.0 as usize].clone();
        self.ids
            .retain(|_, id| *id == StackId::EMPTY || keep.contains(id));
        // Slot 0 is the one empty stack, so an empty slot past it is a free one.
        for (i, slot) in self.frames.iter_mut().enumerate().skip(1) {
            let id = StackId(i as u32);
            if !slot.is_empty() && !keep.contains(&id) {
                *slot = empty.clone();
                self.free.push(id);
            }
        }
    }

    /// Stacks held (the empty one included).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.ids.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_frames_share_an_id_and_different_ones_never_do() {
        let mut t = StackTable::default();
        let a = t.intern(&[1, 2, 3]);
        let b = t.intern(&[1, 2, 3]);
        let c = t.intern(&[1, 2, 4]);
        let d = t.intern(&[1, 2]);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
        assert_eq!(t.frames(c), &[1, 2, 4]);
        assert_eq!(t.intern(&[]), StackId::EMPTY);
        assert_eq!(t.frames.len(), 4);
    }

    #[test]
    fn retained_stacks_keep_their_ids_and_dropped_slots_are_reused() {
        let mut t = StackTable::default();
        let a = t.intern(&[1, 2, 3]);
        let b = t.intern(&[4, 5]);
        let c = t.intern(&[6]);
        t.retain(&HashSet::from([b]));
        assert_eq!(t.len(), 2, "the empty stack and b");
        assert_eq!(t.frames(b), &[4, 5]);
        assert_eq!(t.intern(&[4, 5]), b);
        assert_eq!(t.intern(&[]), StackId::EMPTY);
        // A dropped stack interned again is a new stack, in a reused slot.
        let a2 = t.intern(&[1, 2, 3]);
        let d = t.intern(&[7, 8]);
        let e = t.intern(&[9]);
        assert!([a, c].contains(&a2) && [a, c].contains(&d) && a2 != d);
        assert_eq!(t.frames(a2), &[1, 2, 3]);
        assert_eq!(t.frames(d), &[7, 8]);
        assert_eq!(e, StackId(4), "a new slot once the free ones are used");
        // Retaining twice never frees a slot twice.
        t.retain(&HashSet::from([b]));
        t.retain(&HashSet::from([b]));
        assert_eq!(t.free.len(), 3);
        assert_eq!(t.frames.len(), 5);
    }
}
