//! The slab object's live-object table: every pointer we reported and have
//! not seen freed, in lock-free slots (`LIVE_SLOTS`) with the hash map
//! `LIVE` behind them. An allocation's event is submitted only once its pointer
//! is in (`commit`), and a free is reported only for a pointer found here
//! (`on_free`), so the kernel forwards exactly the frees of reported objects.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap},
};
use tracer_common::slab::LIVE_WAYS;
use tracer_ebpf::BPF_NOEXIST;

use super::config;

/// Pointer -> allocation timestamp of every object we reported and have not seen
/// freed. Not LRU: an eviction would silently turn a live object into a lie.
#[map]
static LIVE: HashMap<u64, u64> = HashMap::with_max_entries(1 << 20, 0);

/// The live-object table's fast path: `live_bucket_mask + 1` buckets of
/// [`LIVE_WAYS`] pointer slots, a bucket chosen by a hash of the pointer. An
/// allocation claims an empty slot with a compare-and-swap and its free clears
/// it, so neither takes a lock or allocates: a hash-map insert and delete cost
/// ~450 ns per object pair on 6.18 (bucket lock, element allocation), this
/// costs a few loads. A pointer finds no empty slot only when its bucket holds
/// [`LIVE_WAYS`] other live objects; it then goes to `LIVE`. Sized by userspace.
#[map]
static LIVE_SLOTS: Array<[u64; LIVE_WAYS]> = Array::with_max_entries(1, 0);

/// How many pointers `LIVE` holds (index 0), kept so the frees of objects we
/// never selected skip the hash lookup while `LIVE` is empty, as it nearly
/// always is when the slots have room.
#[map]
static LIVE_OVERFLOW: Array<u64> = Array::with_max_entries(1, 0);

/// Where a live pointer is kept.
pub(crate) enum Held {
    Slot(*mut u64),
    Overflow,
}

#[inline(always)]
fn live_bucket<const CAS: bool>(ptr: u64) -> Option<*mut [u64; LIVE_WAYS]> {
    let mask = config().live_bucket_mask;
    if !CAS || mask == 0 {
        return None;
    }
    let index = (ptr.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) & mask;
    LIVE_SLOTS.get_ptr_mut(index as u32)
}

/// The slot of `bucket` that holds `ptr`, if any.
#[inline(always)]
fn slot_holding(bucket: &mut [u64; LIVE_WAYS], ptr: u64) -> Option<*mut u64> {
    let mut i = 0;
    while i < LIVE_WAYS {
        if bucket[i] == ptr {
            return Some(&mut bucket[i]);
        }
        i += 1;
    }
    None
}

/// `LIVE` gained (`delta` 1) or lost (`u64::MAX`) a pointer. Slot builds
/// only: nothing else reads the count, and it is one shared cache line.
#[inline(always)]
fn count_overflow<const CAS: bool>(delta: u64) {
    if CAS {
        if let Some(n) = LIVE_OVERFLOW.get_ptr_mut(0) {
            tracer_ebpf::atomic_add(unsafe { &mut *n }, delta);
        }
    }
}

/// Whether `LIVE` holds any pointer (slot builds only): one object that
/// overflowed keeps every later lookup going to the hash too, which costs
/// time, never correctness.
#[inline(always)]
fn overflow_in_use() -> bool {
    LIVE_OVERFLOW.get(0).copied().unwrap_or(1) != 0
}

/// Track `ptr`; false only when both the slots and `LIVE` are full. A pointer
/// already tracked (its free escaped us) stays tracked: userspace reads the
/// new allocation as proof of the missed free.
#[inline(always)]
pub(crate) fn live_insert<const CAS: bool>(ptr: u64, ts: u64) -> bool {
    if let Some(bucket) = live_bucket::<CAS>(ptr) {
        let slots = unsafe { &mut *bucket };
        if slot_holding(slots, ptr).is_some() {
            return true;
        }
        // Tracked in `LIVE` since its bucket was full: a slot freed since must
        // not take it a second time, or its free would clear one copy only.
        if overflow_in_use() && unsafe { LIVE.get(ptr) }.is_some() {
            return true;
        }
        let mut i = 0;
        while i < LIVE_WAYS {
            if CAS && slots[i] == 0 && tracer_ebpf::compare_exchange(&mut slots[i], 0, ptr) {
                return true;
            }
            i += 1;
        }
    }
    match LIVE.insert(ptr, ts, BPF_NOEXIST) {
        Ok(()) => {
            count_overflow::<CAS>(1);
            true
        }
        // EEXIST: already tracked there.
        Err(e) => e == -17,
    }
}

#[inline(always)]
pub(crate) fn live_find<const CAS: bool>(ptr: u64) -> Option<Held> {
    if let Some(bucket) = live_bucket::<CAS>(ptr) {
        if let Some(slot) = slot_holding(unsafe { &mut *bucket }, ptr) {
            return Some(Held::Slot(slot));
        }
        if !overflow_in_use() {
            return None;
        }
    }
    unsafe { LIVE.get(ptr) }.map(|_| Held::Overflow)
}

/// Untrack `ptr`; false if another CPU untracked it first. A `LIVE` entry
/// whose removal the hash refused stays behind (see below) and true is
/// returned: the free itself is real.
#[inline(always)]
pub(crate) fn live_remove<const CAS: bool>(ptr: u64, held: Held) -> bool {
    match held {
        Held::Slot(slot) => CAS && tracer_ebpf::compare_exchange(unsafe { &mut *slot }, ptr, 0),
        Held::Overflow => match LIVE.remove(ptr) {
            Ok(()) => {
                count_overflow::<CAS>(u64::MAX);
                true
            }
            // ENOENT: another CPU untracked it first.
            Err(-2) => false,
            // The bucket lock was busy on this CPU: EBUSY (5.11+; EDEADLK or
            // ETIMEDOUT where it is an rqspinlock). Bucket locks are held with
            // interrupts off, so only an NMI-time program or a tracepoint inside
            // the locked section meets this, rarely. The lookup just found the
            // object and this free is real, so it is reported; the entry stays
            // behind, and the next allocation at this address finds it tracked
            // already (a spare's nested allocation there is then taken as
            // recorded and goes uncounted). Dropping the free would leave a
            // phantom leak instead, which is worse.
            Err(_) => true,
        },
    }
}
