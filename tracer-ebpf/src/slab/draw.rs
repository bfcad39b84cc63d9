//! The slab object's stack draw: which allocations get their stacks taken
//! (census, zoom, base level, see [`stack_draw`]), with the per-stratum
//! counts and budgets it keeps, and the user-frame fingerprint that keys a
//! stratum ([`user_path`]).

use core::mem::size_of;

use aya_ebpf::{
    bindings::BPF_F_USER_STACK,
    helpers::{bpf_get_prandom_u32, bpf_get_stack},
    macros::map,
    maps::{Array, PerCpuArray},
};
use tracer_common::slab::{
    stratum_slot, Config, ZoomSlot, BUDGET_WINDOW_SHIFT, DRAW_LEVEL_SHIFT, FINGERPRINT_FRAMES,
    FLAG_CENSUS, FLAG_SAMPLED, FLAG_SHALLOW, FLAG_ZOOM, STRATUM_SLOTS, ZOOM_COST_SHIFT,
};

/// Strata seen lately, with how many allocations each made on this CPU: a
/// per-CPU, direct-mapped table of (process, kernel call site, user
/// fingerprint) at [`stratum_slot`]. A slot that holds another stratum is
/// simply taken over, which only means that stratum's next allocations are
/// taken into the census again: collisions cost extra stacks, never lose
/// objects, and every draw's probability is recorded with its event. Cheaper
/// than a shared hash map on the hottest path we have.
#[map]
static SITES: PerCpuArray<SiteSlot> = PerCpuArray::with_max_entries(STRATUM_SLOTS, 0);

#[repr(C)]
#[derive(Clone, Copy)]
struct SiteSlot {
    call_site: u64,
    fingerprint: u64,
    tgid: u32,
    /// Allocations of this stratum seen here since the slot was taken (saturating).
    allocs: u32,
}

/// Strata whose draw probability userspace raised for a while ("zoom"): where
/// old objects of a stratum outlive their undrawn siblings, new ones are drawn
/// more often until their stacks are known. Indexed like `SITES`; written by
/// userspace only, read here with one array load.
#[map]
static ZOOM: Array<ZoomSlot> = Array::with_max_entries(STRATUM_SLOTS, 0);

/// What the draws of the current budget window have spent: census draws per
/// CPU ([`CENSUS_SPENT`]), expected zoomed draws of all CPUs ([`ZOOM_SPENT`]).
#[repr(C)]
#[derive(Clone, Copy)]
struct Spent {
    window: u64,
    spent: u64,
}

#[map]
static CENSUS_SPENT: PerCpuArray<Spent> = PerCpuArray::with_max_entries(1, 0);

/// Shared by every CPU: the window is restarted without a lock and the spend
/// added atomically, so a race at a window's turn lets a few allocations more
/// through, never fewer.
#[map]
static ZOOM_SPENT: Array<Spent> = Array::with_max_entries(1, 0);

/// How an allocation's stacks were drawn, and whether its event wakes the reader.
pub(crate) struct Draw {
    /// [`FLAG_SAMPLED`] when drawn, the route ([`FLAG_CENSUS`], [`FLAG_ZOOM`])
    /// and the draw level; [`FLAG_SHALLOW`].
    pub(crate) flags: u16,
    /// The stratum is new on this CPU: often a new process, whose mappings
    /// the reader should take before a short-lived one exits.
    pub(crate) wake: bool,
}

/// Stack capture costs most of a matched event, so by default it is sampled,
/// each allocation with a probability `1 / 2^level` fixed before its draw by
/// past events only and recorded with it, so userspace keeps exact counts per
/// (stratum, level) and every level's drawn objects are an independent
/// Bernoulli sample of it (unbiased per-stack estimates):
/// - census: a stratum's first `census_allocs` allocations on this CPU, level 0,
///   within `census_window_cap` a window on this CPU;
/// - zoom: a stratum userspace put in `ZOOM`, at the level it chose, within
///   `zoom_window_cap` a window for all CPUs;
/// - otherwise `base_level`.
///
/// Both caps count allocations, not draws, so no allocation's level depends
/// on how earlier draws fell.
#[inline(always)]
pub(crate) fn stack_draw(
    call_site: u64,
    tgid: u32,
    path: &UserPath,
    cfg: &Config,
    ts: u64,
) -> Draw {
    let shallow = if path.shallow { FLAG_SHALLOW } else { 0 };
    if cfg.stack_flags == 0 {
        return Draw {
            flags: shallow,
            wake: false,
        };
    }
    if cfg.stack_sample_mask == 0 {
        return Draw {
            flags: FLAG_SAMPLED | shallow,
            wake: false,
        };
    }
    let index = stratum_slot(call_site, path.fingerprint, tgid);
    // Allocations of this stratum seen on this CPU before this one.
    let mut seen: u32 = 0;
    if let Some(slot) = SITES.get_ptr_mut(index) {
        unsafe {
            if (*slot).call_site == call_site
                && (*slot).fingerprint == path.fingerprint
                && (*slot).tgid == tgid
            {
                seen = (*slot).allocs;
                (*slot).allocs = seen.saturating_add(1);
            } else {
                (*slot).call_site = call_site;
                (*slot).fingerprint = path.fingerprint;
                (*slot).tgid = tgid;
                (*slot).allocs = 1;
            }
        }
    }
    let wake = seen == 0;
    let window = ts >> BUDGET_WINDOW_SHIFT;
    if seen < cfg.census_allocs && census_budget(window, cfg.census_window_cap) {
        return Draw {
            flags: FLAG_SAMPLED | FLAG_CENSUS | shallow,
            wake,
        };
    }
    let (level, route) = match ZOOM.get(index) {
        Some(z)
            if z.level_plus_one != 0
                && z.call_site == call_site
                && z.fingerprint == path.fingerprint
                && z.tgid == tgid
                && zoom_budget(window, z.level_plus_one - 1, cfg.zoom_window_cap) =>
        {
            (z.level_plus_one - 1, FLAG_ZOOM)
        }
        _ => (cfg.base_level, 0),
    };
    let level = level & 31;
    let mask = (1u64 << level) - 1;
    let drawn = u64::from(unsafe { bpf_get_prandom_u32() }) & mask == 0;
    let flags = ((level as u16) << DRAW_LEVEL_SHIFT)
        | route
        | shallow
        | if drawn { FLAG_SAMPLED } else { 0 };
    Draw { flags, wake }
}

impl Spent {
    /// Starts `window` if it is a new one; whether `cap` is not reached yet.
    #[inline(always)]
    fn room(&mut self, window: u64, cap: u64) -> bool {
        if self.window != window {
            self.window = window;
            self.spent = 0;
        }
        self.spent < cap
    }
}

/// Whether this CPU may draw one more census allocation in `window`.
#[inline(always)]
fn census_budget(window: u64, cap: u64) -> bool {
    let Some(slot) = CENSUS_SPENT.get_ptr_mut(0) else {
        return false;
    };
    let slot = unsafe { &mut *slot };
    if !slot.room(window, cap) {
        return false;
    }
    slot.spent += 1;
    true
}

/// Whether an allocation may be zoomed to `level` in `window`, spending its
/// expected draws (`2^-level`) from the budget all CPUs share.
#[inline(always)]
fn zoom_budget(window: u64, level: u32, cap: u64) -> bool {
    let Some(slot) = ZOOM_SPENT.get_ptr_mut(0) else {
        return false;
    };
    let slot = unsafe { &mut *slot };
    if !slot.room(window, cap) {
        return false;
    }
    tracer_ebpf::atomic_add(&mut slot.spent, 1 << (ZOOM_COST_SHIFT - (level & 15)));
    true
}

/// Where user space entered the kernel and a hash of the frames that led there.
pub(crate) struct UserPath {
    pub(crate) ip: u64,
    pub(crate) fingerprint: u64,
    shallow: bool,
}

impl UserPath {
    pub(crate) const NONE: UserPath = UserPath {
        ip: 0,
        fingerprint: 0,
        shallow: false,
    };
}

/// The first [`FINGERPRINT_FRAMES`] user frames, by the kernel's own
/// frame-pointer walk (`bpf_get_stack` stops after as many frames as the buffer
/// holds), hashed. Two paths through one syscall wrapper differ in a return
/// address here, so they land in different strata and each is counted exactly.
/// (A walk here with `bpf_task_pt_regs` and a `bpf_probe_read_user` a frame
/// was measured at ~250 ns more per allocation on 6.18: the helper's checks
/// cost more than perf's `__get_user` loop.)
#[inline(always)]
pub(crate) fn user_path(ctx: *mut core::ffi::c_void) -> UserPath {
    let mut frames = [0u64; FINGERPRINT_FRAMES];
    let n = unsafe {
        bpf_get_stack(
            ctx,
            frames.as_mut_ptr().cast(),
            (FINGERPRINT_FRAMES * size_of::<u64>()) as u32,
            BPF_F_USER_STACK as u64,
        )
    };
    if n <= 0 {
        return UserPath {
            ip: 0,
            fingerprint: 0,
            shallow: true,
        };
    }
    let mut h: u64 = 0;
    let mut i = 0;
    while i < FINGERPRINT_FRAMES {
        h = (h ^ frames[i]).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        h ^= h >> 29;
        i += 1;
    }
    UserPath {
        ip: frames[0],
        // 0 means "no fingerprint" to userspace.
        fingerprint: h | 1,
        shallow: n as usize <= size_of::<u64>(),
    }
}
