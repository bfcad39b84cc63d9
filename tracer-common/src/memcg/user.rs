//! `leaktrace memcg`'s types on the user side: what userspace needs to fill
//! [`MemcgConfig`] and the [`KreadBatch`] requests the way its eBPF object
//! reads them.

use super::{KreadBatch, MemcgConfig};

// SAFETY: plain-old-data, repr(C), every bit pattern valid.
unsafe impl aya::Pod for MemcgConfig {}
// SAFETY: as above; no padding (sizes are multiples of 8).
unsafe impl aya::Pod for KreadBatch {}

impl KreadBatch {
    /// Slot `slot` reads `len` bytes (1..=`KREAD_SLOT_BYTES`) at `addr`.
    pub fn set_read(&mut self, slot: usize, addr: u64, len: u32) {
        self.addr[slot] = addr;
        self.len[slot] = len;
        self.status[slot] = 0;
        self.follow[slot] = 0;
    }

    /// Slot `slot` follows a `next` chain from `addr`, one pointer after
    /// another, until it reads `stop` (the list head) or `KREAD_FOLLOW`
    /// pointers.
    pub fn set_follow(&mut self, slot: usize, addr: u64, stop: u64) {
        self.addr[slot] = addr;
        self.len[slot] = 8;
        self.status[slot] = 0;
        self.follow[slot] = 1;
        self.stop[slot] = stop;
    }
}
