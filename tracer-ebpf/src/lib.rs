//! What leaktrace's two eBPF objects share: reading the frozen config global,
//! bumping a counter, batching ring-buffer wake-ups, reading a classic
//! tracepoint's record, and the task walk ([`task`]). Each object
//! (`slab.rs`, `memcg.rs`, one `[[bin]]` each) declares only its own maps and
//! programs and wraps these in three-line functions over them, so a slab run
//! never creates memcg's maps and the reverse.
#![no_std]
// BPF compare-and-swap (see `compare_exchange`).
#![allow(internal_features)]
#![feature(core_intrinsics)]

pub mod task;

use core::intrinsics::{atomic_cxchg, atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    maps::{PerCpuArray, RingBuf},
    programs::TracePointContext,
    EbpfContext,
};

/// `bpf_map_update_elem`'s "create or replace", as the helpers take it.
pub const BPF_ANY: u64 = aya_ebpf::bindings::BPF_ANY as u64;

/// `bpf_map_update_elem`'s "create only".
pub const BPF_NOEXIST: u64 = aya_ebpf::bindings::BPF_NOEXIST as u64;

/// `*p = new` if `*p == old`, atomically across CPUs (BPF `cmpxchg`, 5.12+;
/// older verifiers reject the instruction even in dead code, so programs for
/// them are built without it: the `_nocas` programs in slab.rs). Whether it
/// swapped. An intrinsic: the BPF target's atomic types offer no
/// compare-and-swap, as v1 BPF has none.
#[inline(always)]
pub fn compare_exchange(p: &mut u64, old: u64, new: u64) -> bool {
    let p: *mut u64 = p;
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(p, old, new)
    }
    .1
}

/// `*p += n` atomically, result unused (BPF `xadd`, every kernel we support).
#[inline(always)]
pub fn atomic_add(p: &mut u64, n: u64) {
    let p: *mut u64 = p;
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, n) };
}

/// `*p -= n` atomically by compare-and-swap (so only in programs built with
/// it), retried a bounded number of times; the value before, or None when
/// every try lost a race (the objects are built for BPF v1, which has no
/// fetch-add).
#[inline(always)]
pub fn fetch_sub(p: &mut u64, n: u64) -> Option<u64> {
    let mut tries = 0;
    while tries < 8 {
        let before = unsafe { core::ptr::read_volatile(p) };
        if compare_exchange(p, before, before.wrapping_sub(n)) {
            return Some(before);
        }
        tries += 1;
    }
    None
}

/// Binds the shared helpers to one object's own maps, so each object's code
/// says `config()`, `bump(i)` and `read(ctx, offset)`:
/// `object_maps!(CONFIG: Config, COUNTERS)`.
#[macro_export]
macro_rules! object_maps {
    ($config:ident: $ty:ty, $counters:ident) => {
        #[inline(always)]
        fn config() -> &'static $ty {
            $crate::frozen(&$config)
        }

        #[inline(always)]
        fn bump(index: u32) {
            $crate::add(&$counters, index, 1)
        }

        #[allow(dead_code)]
        #[inline(always)]
        fn add(index: u32, n: u64) {
            $crate::add(&$counters, index, n)
        }

        #[inline(always)]
        fn read<T>(ctx: &aya_ebpf::programs::TracePointContext, offset: u16) -> Option<T> {
            $crate::read(ctx, offset)
        }
    };
}

/// The values userspace wrote into a read-only global before load. The
/// volatile read keeps rustc from folding the zeroed initializer into the
/// code; the verifier then sees the real, frozen values and prunes disabled
/// branches.
#[inline(always)]
pub fn frozen<T>(global: &'static T) -> &'static T {
    unsafe { core::ptr::read_volatile(&global) }
}

/// `n` more at `index` of a per-CPU counter array (summed by userspace).
#[inline(always)]
pub fn add(counters: &PerCpuArray<u64>, index: u32, n: u64) {
    if let Some(slot) = counters.get_ptr_mut(index) {
        unsafe { *slot += n };
    }
}

/// A wake-up per event costs an irq_work and a context switch on a busy path;
/// batch them: wake only when `threshold` bytes wait (userspace polls
/// meanwhile). 0 leaves the choice to the kernel (a wake-up per event).
#[inline(always)]
pub fn wakeup_flags(ring: &RingBuf, threshold: u64) -> u64 {
    if threshold == 0 {
        0
    } else if ring.query(BPF_RB_AVAIL_DATA.into()) >= threshold {
        BPF_RB_FORCE_WAKEUP.into()
    } else {
        BPF_RB_NO_WAKEUP.into()
    }
}

/// A field of a classic tracepoint's record, at an offset taken from the
/// running kernel's tracefs `format` file.
#[inline(always)]
pub fn read<T>(ctx: &TracePointContext, offset: u16) -> Option<T> {
    unsafe { ctx.read_at::<T>(offset as usize).ok() }
}

/// The start of a `__data_loc` string field: the low 16 bits of its u32 are
/// the string's offset in the record (the high 16 its length).
#[inline(always)]
pub fn data_loc(ctx: &TracePointContext, loc: u32) -> *const u8 {
    unsafe { ctx.as_ptr().cast::<u8>().add((loc & 0xffff) as usize) }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
