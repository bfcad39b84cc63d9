//! Stack interning. The kernel copies raw frames (`bpf_get_stack`) into every event
//! instead of using `bpf_get_stackid`, whose stack map merges different stacks on a
//! hash collision and silently stops recording when full. Here we dedupe by the
//! full frame list, so two stacks are one id only if every frame is equal.

use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StackId(pub u32);

impl StackId {
    /// The empty stack (capture disabled, failed, or a kernel thread's user stack).
    pub const EMPTY: StackId = StackId(0);
}

#[derive(Debug)]
pub struct StackTable {
    ids: HashMap<Box<[u64]>, StackId>,
    frames: Vec<Box<[u64]>>,
}

impl Default for StackTable {
    fn default() -> Self {
        let empty: Box<[u64]> = Box::new([]);
        StackTable {
            ids: HashMap::from([(empty.clone(), StackId::EMPTY)]),
            frames: vec![empty],
        }
    }
}

impl StackTable {
    pub fn intern(&mut self, frames: &[u64]) -> StackId {
        if let Some(&id) = self.ids.get(frames) {
            return id;
        }
        let id = StackId(self.frames.len() as u32);
        let owned: Box<[u64]> = frames.into();
        self.frames.push(owned.clone());
        self.ids.insert(owned, id);
        id
    }

    pub fn frames(&self, id: StackId) -> &[u64] {
        self.frames.get(id.0 as usize).map_or(&[], |f| f)
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
}
