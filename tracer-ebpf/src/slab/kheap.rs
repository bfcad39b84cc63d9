//! `--all-caches`: every slab allocation of every cache, sampled by bytes.
//!
//! Each allocation is drawn on its own with probability ≈ 1 − e^(−size/rate)
//! (a uniform 32-bit number, [`uniform`], against a fixed-point threshold by
//! size class, `KheapConfig`): no countdown, so raw_tp programs that nest on
//! 5.10 (no recursion guard before 6.1) cannot skew each other's chances. A drawn
//! allocation takes the ordinary record path (`record`: task facts, both
//! stacks, the live table); an undrawn one costs the draw, plus one load of
//! [`KHEAP_REGIONS`] to correct a stale sample.
//!
//! Stale samples: bulk frees (`kfree_bulk`, `kmem_cache_free_bulk` under
//! `kvfree_rcu`, 6.18's sheaves) fire no per-object free event, so a sample
//! there would be held forever (a phantom of ~rate/size objects). When the
//! allocator hands its address out again the old object was freed: the
//! sample is untracked and its free reported, whether or not the new
//! allocation is drawn (a drawn one re-enters `LIVE` itself, which userspace
//! reads as the old object's free).

use aya_ebpf::{
    helpers::{bpf_get_prandom_u32, bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes},
    macros::map,
    maps::{Array, PerCpuArray},
};
use aya_ebpf::{programs::TracePointContext, EbpfContext};
use tracer_common::slab::{cache_name_hash, counter, kheap_class, CACHE_NAME_LEN};
use tracer_common::slab::{AllocLayout, SOURCE_CACHE_ALLOC};
use tracer_ebpf::data_loc;

use super::{bump, classic_site, config, on_free, read, record, Site};

/// Samples held per 2 MiB region of kernel addresses, folded into
/// [`REGIONS`] slots: a free or an undrawn allocation in a region with no
/// sample returns after one load, before the live table is touched. Counted
/// up before a sample enters the live table and down after it left, so
/// never zero while a sample lies in the region (folding only adds hits).
#[map]
static KHEAP_REGIONS: Array<u64> = Array::with_max_entries(REGIONS, 0);

/// Each CPU's splitmix64 counter for [`uniform`]; 0 until its first draw.
#[map]
static KHEAP_RNG: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// A uniform 32-bit number: splitmix64 (Steele, Lea and Flood 2014) over
/// this CPU's counter, seeded from `bpf_get_prandom_u32` on first use.
/// Measured on 6.18 with bpf_stats: kmalloc_raw took 91 ns a run with the
/// helper for every draw, 69 with this (an inlined per-CPU load since 6.10;
/// a helper call before, as the draw was).
/// A run nested between the load and the store (5.10's unguarded raw_tp, or
/// a spare inside its main program) repeats the outer run's number: the two
/// draws are then equal but each is still uniform, so every allocation keeps
/// its probability and the 1/p weights stay unbiased.
#[inline(always)]
fn uniform() -> u32 {
    let Some(state) = KHEAP_RNG.get_ptr_mut(0) else {
        return unsafe { bpf_get_prandom_u32() };
    };
    let state = unsafe { &mut *state };
    if *state == 0 {
        *state = u64::from(unsafe { bpf_get_prandom_u32() }) << 32
            | u64::from(unsafe { bpf_get_prandom_u32() });
    }
    let s = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    *state = s;
    let z = (s ^ (s >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    ((z ^ (z >> 31)) >> 32) as u32
}

const REGION_SHIFT: u32 = 21;
const REGIONS: u32 = 1 << 14;

#[inline(always)]
fn region_add(ptr: u64, delta: u64) {
    let index = ((ptr >> REGION_SHIFT) as u32) & (REGIONS - 1);
    if let Some(n) = KHEAP_REGIONS.get_ptr_mut(index) {
        tracer_ebpf::atomic_add(unsafe { &mut *n }, delta);
    }
}

/// Whether a sample may lie in `ptr`'s region.
#[inline(always)]
pub(crate) fn region_tracked(ptr: u64) -> bool {
    let index = ((ptr >> REGION_SHIFT) as u32) & (REGIONS - 1);
    KHEAP_REGIONS.get(index).is_none_or(|n| *n != 0)
}

/// A sample is about to enter the live table.
#[inline(always)]
pub(crate) fn entering(ptr: u64) {
    region_add(ptr, 1);
}

/// A sample left the live table (or never entered it).
#[inline(always)]
pub(crate) fn left(ptr: u64) {
    region_add(ptr, u64::MAX);
}

/// One slab allocation under `--all-caches`, once a spare has found that
/// its main program did not see it. `cache`: the raw `kmem_cache_alloc`'s
/// `struct kmem_cache *` (its name is read for a sample only), 0 for
/// kmalloc.
#[inline(always)]
pub(crate) fn alloc<const CAS: bool>(
    ctx: *mut core::ffi::c_void,
    mut site: Site,
    cache: u64,
    spare: bool,
) {
    if !drawn(site.bytes_alloc) {
        retire_stale::<CAS>(site.ptr);
        return;
    }
    if cache != 0 {
        site.bytes_req = name_hash(cache + u64::from(config().kmem_cache_name_off));
    }
    let _ = record::<CAS>(ctx, &site, spare);
}

/// One slab allocation under `--all-caches` on a classic tracepoint
/// (`kmem:kmalloc`, `kmem:kmem_cache_alloc` and, before 6.1, their `_node`
/// twins), fields at `layout`'s tracefs offsets. The size and pointer are
/// read for every event (the draw and the stale-sample correction); the
/// rest, and the cache's name where the format has one (6.18; 0 otherwise,
/// and userspace names the sample by its object size), for a sample only.
///
/// No spare can help here: the perf path runs no BPF program on a CPU
/// where one is already running (`bpf_prog_active`), so an allocation or a
/// free nested in ours goes unseen. A missed free of a sample is corrected
/// when its address is handed out again, as bulk frees are.
#[inline(always)]
pub(crate) fn alloc_classic<const CAS: bool>(
    ctx: &TracePointContext,
    layout: &AllocLayout,
    source: u16,
) -> Option<()> {
    let bytes_alloc: u64 = read(ctx, layout.bytes_alloc)?;
    let ptr: u64 = read(ctx, layout.ptr)?;
    if !drawn(bytes_alloc) {
        retire_stale::<CAS>(ptr);
        return Some(());
    }
    // gfp_flags is 4 bytes on older kernels, 8 on newer; the low 32 hold
    // every bit.
    let gfp = u64::from(read::<u32>(ctx, layout.gfp_flags)?);
    let mut site = classic_site(ctx, layout, bytes_alloc, gfp, source)?;
    if source == SOURCE_CACHE_ALLOC {
        // The name hash travels in bytes_req, as on the raw path.
        site.bytes_req = if layout.name == 0 {
            0
        } else {
            str_hash(data_loc(ctx, read::<u32>(ctx, layout.name)?))
        };
    }
    record::<CAS>(ctx.as_ptr(), &site, false)
}

/// The draw of [`alloc`] for an allocation of `bytes_alloc` bytes: true
/// with probability ≈ 1 − e^(−size/rate).
#[inline(always)]
fn drawn(bytes_alloc: u64) -> bool {
    let k = &config().kheap;
    let threshold = k
        .thresholds
        .get(kheap_class(bytes_alloc))
        .copied()
        .unwrap_or(u32::MAX);
    uniform() < threshold
}

/// An undrawn allocation at `ptr`: a sample still held there is stale.
#[inline(always)]
fn retire_stale<const CAS: bool>(ptr: u64) {
    if ptr != 0 && region_tracked(ptr) && on_free::<CAS>(ptr) {
        bump(counter::KHEAP_STALE);
    }
}

/// [`cache_name_hash`] of the name `name_field` points to; 0 if unreadable.
#[inline(always)]
fn name_hash(name_field: u64) -> u64 {
    let Ok(name) = (unsafe { bpf_probe_read_kernel(name_field as *const *const u8) }) else {
        return 0;
    };
    str_hash(name)
}

/// [`cache_name_hash`] of the NUL-terminated string at `name` (truncated
/// and NUL padded to [`CACHE_NAME_LEN`]); 0 if unreadable.
#[inline(always)]
fn str_hash(name: *const u8) -> u64 {
    let mut words = [0u64; CACHE_NAME_LEN / 8];
    let dst =
        unsafe { core::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), CACHE_NAME_LEN) };
    if unsafe { bpf_probe_read_kernel_str_bytes(name, dst) }.is_err() {
        return 0;
    }
    cache_name_hash(&words)
}
