//! leaktrace's kernel side: select slab allocations, remember their pointers, and
//! forward only selected allocations and the frees of those same objects.
//!
//! Policy (which cache, which offsets) arrives in the read-only `CONFIG` global that
//! userspace fills from the running kernel's tracefs `format` files. The verifier
//! sees those values as constants, so disabled branches are pruned at load time.
//!
//! This object holds the slab tracer's maps and programs only (`memcg.rs` is
//! the other tool's object); the helpers both share are in `lib.rs`.
#![no_std]
#![no_main]

use core::mem::size_of;

use aya_ebpf::{
    bindings::{BPF_F_USER_STACK, BPF_RB_FORCE_WAKEUP},
    helpers::bpf_probe_read_kernel,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_get_stack,
        bpf_ktime_get_ns, bpf_probe_read_kernel_str_bytes,
    },
    macros::{map, raw_tracepoint, tracepoint},
    maps::{ring_buf::RingBufEntry, Array, HashMap, PerCpuArray, RingBuf},
    programs::{RawTracePointContext, TracePointContext},
    EbpfContext,
};
use tracer_common::{
    slab::{
        counter, kmalloc_class, stratum_slot, AllocEvent, AllocHeader, AllocLayout, Config,
        FreeEvent, ZoomSlot, BUDGET_WINDOW_SHIFT, CACHE_NAME_LEN, DRAW_LEVEL_SHIFT,
        FINGERPRINT_FRAMES, FLAG_CENSUS, FLAG_SAMPLED, FLAG_SHALLOW, FLAG_ZOOM, LIVE_WAYS,
        MAX_CACHE_NAMES, MAX_KSTACK, MAX_USTACK, SOURCE_CACHE_ALLOC, SOURCE_KMALLOC, SOURCE_PERCPU,
        STACK_KERNEL, STACK_USER, STRATUM_SLOTS, ZOOM_COST_SHIFT,
    },
    CONTEXT_INTERRUPT, EVENT_ALLOC, EVENT_ALLOC_NO_STACKS, EVENT_FREE,
};
use tracer_ebpf::{data_loc, task, BPF_NOEXIST};

#[path = "slab/pages.rs"]
mod pages;

#[no_mangle]
static CONFIG: Config = Config::zeroed();

/// Sized by userspace (`set_max_entries`) before load.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

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

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// The allocating task's facts per CPU, one slot per allocation program (see
/// [`task::TaskFacts`]); index [`program_slot`].
#[map]
static TASK_FACTS: PerCpuArray<task::TaskFacts> = PerCpuArray::with_max_entries(5, 0);

/// The pointer of the event each main program took up last on this CPU,
/// written first thing for every event, selected or not: while a main program
/// runs for one event, a nested event on the same hook skips it (raw_tp
/// recursion guard) and only its spare runs. So a spare that finds its event's
/// pointer here knows the main program saw the event, and returns after one
/// per-CPU load instead of a table lookup. (Written only for selected events,
/// it would keep a selected pointer while main runs for a miss, and SLUB's
/// last-in-first-out freelists hand that very address to the next nested
/// allocation.) The spare tests selection first, and so pays nothing on a
/// miss. Index:
/// [`program_slot`] for the allocation hooks, `SEEN_KFREE`/`SEEN_CACHE_FREE`/
/// `SEEN_PERCPU_FREE` for the raw free hooks.
#[map]
static SEEN: PerCpuArray<u64> = PerCpuArray::with_max_entries(5, 0);

const SEEN_KFREE: u32 = 2;
const SEEN_CACHE_FREE: u32 = 3;
const SEEN_PERCPU_FREE: u32 = 4;

/// A slot per allocation program and role, so a nested run never shares one
/// with the run it interrupted: 0 kmalloc, 1 kmem_cache_alloc, +2 for spares
/// (`TASK_FACTS` only; `SEEN` holds main programs alone); 4 the per-CPU
/// source's one program.
#[inline(always)]
fn program_slot(source: u16, spare: bool) -> u32 {
    if source == SOURCE_PERCPU {
        return 4;
    }
    let base = if source == SOURCE_KMALLOC { 0 } else { 1 };
    if spare {
        base + 2
    } else {
        base
    }
}

/// Main programs, first thing: note the event's `ptr` as taken up.
#[inline(always)]
fn take_up(index: u32, ptr: u64) {
    if let Some(slot) = SEEN.get_ptr_mut(index) {
        unsafe { *slot = ptr };
    }
}

/// Spares, once the event passed selection: whether the main program took up
/// `ptr`, i.e. there is nothing left for the spare to do.
#[inline(always)]
fn taken_up_by_main(index: u32, ptr: u64) -> bool {
    SEEN.get(index).is_some_and(|p| *p == ptr)
}

// This object's maps under the shared helpers (`lib.rs`).

#[inline(always)]
fn wakeup_flags() -> u64 {
    tracer_ebpf::wakeup_flags(&EVENTS, config().wakeup_bytes)
}

tracer_ebpf::object_maps!(CONFIG: Config, COUNTERS);

// The entry points, generated from the slab object's one program table
// (`tracer_common::slab_programs!`, whose names userspace loads), each calling
// its handler built with compare-and-swap and, under the `_nocas` name,
// without it.
//
// Classic tracepoints: fields read from the perf record at offsets taken from
// the running kernel's tracefs format files. Used where BTF is missing.
//
// Raw tracepoints: the TP_PROTO arguments themselves, no perf record is built,
// which is most of a classic tracepoint's cost on a filter miss. Argument
// positions are constants here; userspace attaches these only after checking
// them against the running kernel's BTF (`__bpf_trace_<event>` parameters).
//
// Spares on the raw free hooks: a raw tracepoint skips a program that is
// already running on this CPU (`prog->active`, 6.1+): a kfree from a softirq
// that interrupts our kfree program would go unseen and its object would look
// leaked forever. The spare is a different program, so it runs exactly then;
// in the common case it finds the object already gone and returns. Spares on
// the allocation hooks, for the same reason: they record an allocation only
// if the main program did not (its pointer is not in LIVE), i.e. when the
// kernel skipped the main program because it was already running on this CPU
// (interrupted or, where tracepoint programs run preemptibly, preempted by
// another task).
//
// The `_nocas` builds are for kernels without BPF compare-and-swap (before
// 5.12, `BPF_CMPXCHG`): their verifier rejects the instruction anywhere in a
// program, even where the frozen config makes it unreachable, so these are
// built without the live-object slots and keep every pointer in `LIVE`.
// Userspace loads them instead (`plan::program_variant`) where
// `live_bucket_mask` is 0.

macro_rules! entry_points {
    ($($hook:ident $what:ident $role:ident: $name:ident, $nocas:ident;)*) => {
        $(
            entry_point!($hook $what $role $name true);
            entry_point!($hook $what $role $nocas false);
        )*
    };
}

macro_rules! entry_point {
    (tracepoint $what:ident $role:ident $name:ident $cas:literal) => {
        #[tracepoint]
        pub fn $name(ctx: TracePointContext) -> u32 {
            handle!(tracepoint $what $role ctx $cas);
            0
        }
    };
    (raw_tracepoint $what:ident $role:ident $name:ident $cas:literal) => {
        #[raw_tracepoint]
        pub fn $name(ctx: RawTracePointContext) -> i32 {
            handle!(raw_tracepoint $what $role ctx $cas);
            0
        }
    };
}

macro_rules! spare {
    (main) => {
        false
    };
    (spare) => {
        true
    };
}

/// What each row of the table does with its event.
macro_rules! handle {
    (tracepoint kmalloc main $ctx:ident $cas:literal) => {
        let _ = tp_kmalloc::<$cas>(&$ctx);
    };
    (tracepoint cache_alloc main $ctx:ident $cas:literal) => {
        let _ = tp_cache_alloc::<$cas>(&$ctx);
    };
    (tracepoint kfree main $ctx:ident $cas:literal) => {
        tp_free::<$cas>(&$ctx, config().kfree_ptr)
    };
    (tracepoint cache_free main $ctx:ident $cas:literal) => {
        tp_free::<$cas>(&$ctx, config().cache_free_ptr)
    };
    (raw_tracepoint kmalloc $role:ident $ctx:ident $cas:literal) => {
        raw_kmalloc::<$cas>(&$ctx, spare!($role))
    };
    (raw_tracepoint cache_alloc $role:ident $ctx:ident $cas:literal) => {
        let _ = raw_cache_alloc::<$cas>(&$ctx, config(), spare!($role));
    };
    (raw_tracepoint kfree $role:ident $ctx:ident $cas:literal) => {
        raw_free::<$cas>($ctx.arg(1), SEEN_KFREE, spare!($role))
    };
    (raw_tracepoint cache_free $role:ident $ctx:ident $cas:literal) => {
        raw_free::<$cas>($ctx.arg(1), SEEN_CACHE_FREE, spare!($role))
    };
    (tracepoint percpu_alloc main $ctx:ident $cas:literal) => {
        let _ = tp_percpu_alloc::<$cas>(&$ctx);
    };
    (tracepoint percpu_free main $ctx:ident $cas:literal) => {
        tp_free::<$cas>(&$ctx, config().percpu.free_ptr)
    };
    // (base_addr, off, ptr) on every kernel since 3.18; userspace checks BTF.
    (raw_tracepoint percpu_free $role:ident $ctx:ident $cas:literal) => {
        raw_free::<$cas>($ctx.arg(2), SEEN_PERCPU_FREE, spare!($role))
    };
    (tracepoint page_alloc main $ctx:ident $cas:literal) => {
        let _ = pages::page_alloc::<$cas>(&$ctx);
    };
    (tracepoint page_free main $ctx:ident $cas:literal) => {
        let _ = pages::page_free::<$cas>(&$ctx);
    };
    (tracepoint page_kmalloc main $ctx:ident $cas:literal) => {
        let p = &config().pages;
        if let (Some(ptr), Some(bytes)) = (
            read(&$ctx, p.kmalloc_ptr),
            read(&$ctx, p.kmalloc_bytes_alloc),
        ) {
            pages::page_kmalloc::<$cas>(ptr, bytes)
        }
    };
    (raw_tracepoint page_kmalloc main $ctx:ident $cas:literal) => {
        // (call_site, ptr, bytes_req, bytes_alloc, ...)
        pages::page_kmalloc::<$cas>($ctx.arg(1), $ctx.arg(3))
    };
}

tracer_common::slab_programs!(entry_points);
tracer_common::page_programs!(entry_points);

#[inline(always)]
fn raw_kmalloc<const CAS: bool>(ctx: &RawTracePointContext, spare: bool) {
    // (call_site, ptr, bytes_req, bytes_alloc, gfp_flags[, node])
    let slot = program_slot(SOURCE_KMALLOC, false);
    if !spare {
        take_up(slot, ctx.arg(1));
    }
    let cfg = config();
    let bytes_alloc: u64 = ctx.arg(3);
    if cfg.kmalloc_size == 0 || bytes_alloc != cfg.kmalloc_size {
        return;
    }
    let gfp = ctx.arg::<u64>(4) & 0xffff_ffff;
    if (cfg.kmalloc_classes >> kmalloc_class(gfp, cfg)) & 1 == 0 {
        return;
    }
    if spare && taken_up_by_main(slot, ctx.arg(1)) {
        return;
    }
    let site = Site {
        call_site: ctx.arg(0),
        ptr: ctx.arg(1),
        bytes_req: ctx.arg(2),
        bytes_alloc,
        gfp,
        source: SOURCE_KMALLOC,
    };
    let _ = record::<CAS>(ctx.as_ptr(), &site, spare);
}

#[inline(always)]
fn raw_free<const CAS: bool>(ptr: u64, seen: u32, spare: bool) {
    if !spare {
        take_up(seen, ptr);
    }
    if !free_candidate(ptr) || spare && taken_up_by_main(seen, ptr) {
        return;
    }
    on_free::<CAS>(ptr);
}

// Empty programs on the same hooks: the floor `cargo xtask bench` measures
// leaktrace's overhead against.

#[tracepoint]
pub fn floor_tp(_ctx: TracePointContext) -> u32 {
    0
}

#[raw_tracepoint]
pub fn floor_raw(_ctx: RawTracePointContext) -> i32 {
    0
}

/// A second empty program where leaktrace runs a spare: its own program, as a
/// spare is, so the kernel dispatches it separately.
#[raw_tracepoint]
pub fn floor_raw_spare(_ctx: RawTracePointContext) -> i32 {
    0
}

#[inline(always)]
fn tp_free<const CAS: bool>(ctx: &TracePointContext, ptr_offset: u16) {
    if let Some(ptr) = read(ctx, ptr_offset) {
        if free_candidate(ptr) {
            on_free::<CAS>(ptr);
        }
    }
}

/// The cheap test that rules out most frees (objects we never selected): the
/// selected cache's alignment. kfree(NULL) is common and would match an empty
/// slot.
#[inline(always)]
fn free_candidate(ptr: u64) -> bool {
    ptr & config().free_align_mask == 0 && ptr != 0
}

#[inline(always)]
fn tp_kmalloc<const CAS: bool>(ctx: &TracePointContext) -> Option<()> {
    let cfg = config();
    if cfg.kmalloc_size == 0 {
        return None;
    }
    // Size first: it rejects nearly every event with one read and one compare.
    let bytes_alloc: u64 = read(ctx, cfg.kmalloc.bytes_alloc)?;
    if bytes_alloc != cfg.kmalloc_size {
        return None;
    }
    // gfp_flags is 4 bytes on older kernels, 8 on newer; every GFP bit lives in
    // the low 32, which a little-endian 4-byte read returns for either.
    let gfp = read::<u32>(ctx, cfg.kmalloc.gfp_flags)? as u64;
    if (cfg.kmalloc_classes >> kmalloc_class(gfp, cfg)) & 1 == 0 {
        return None;
    }
    let site = classic_site(ctx, &cfg.kmalloc, bytes_alloc, gfp, SOURCE_KMALLOC)?;
    record::<CAS>(ctx.as_ptr(), &site, false)
}

#[inline(always)]
fn tp_cache_alloc<const CAS: bool>(ctx: &TracePointContext) -> Option<()> {
    let cfg = config();
    if cfg.cache_size == 0 {
        return None;
    }
    let bytes_alloc: u64 = read(ctx, cfg.cache_alloc.bytes_alloc)?;
    if bytes_alloc != cfg.cache_size {
        return None;
    }
    let name = data_loc(ctx, read::<u32>(ctx, cfg.cache_alloc.name)?);
    if !name_selected(name, cfg) {
        return None;
    }
    let gfp = read::<u32>(ctx, cfg.cache_alloc.gfp_flags)? as u64;
    let site = classic_site(ctx, &cfg.cache_alloc, bytes_alloc, gfp, SOURCE_CACHE_ALLOC)?;
    record::<CAS>(ctx.as_ptr(), &site, false)
}

/// The per-CPU source (`percpu:percpu_alloc_percpu`, classic: per-CPU
/// allocations are rare, so the perf record's cost does not matter, and its
/// fields are the same on every kernel while the raw arguments are not).
/// Every allocation is selected; its bytes are `size` times the possible
/// CPUs, the same unit on every kernel (`bytes_alloc`, 5.19+, adds the memcg
/// bookkeeping `pcpu_obj_full_size` charges). `call_site` and `gfp_flags`
/// exist from 5.19; before, the stratum is the process alone and the stack
/// names the caller.
#[inline(always)]
fn tp_percpu_alloc<const CAS: bool>(ctx: &TracePointContext) -> Option<()> {
    let l = &config().percpu;
    if l.possible_cpus == 0 {
        return None;
    }
    let size: u64 = read(ctx, l.size)?;
    let call_site = if l.call_site != 0 {
        read(ctx, l.call_site).unwrap_or(0)
    } else {
        0
    };
    let gfp = if l.gfp_flags != 0 {
        read::<u32>(ctx, l.gfp_flags).unwrap_or(0) as u64
    } else {
        0
    };
    let site = Site {
        call_site,
        ptr: read(ctx, l.ptr)?,
        bytes_req: size,
        bytes_alloc: size.wrapping_mul(l.possible_cpus),
        gfp,
        source: SOURCE_PERCPU,
    };
    record::<CAS>(ctx.as_ptr(), &site, false)
}

/// The rest of a selected classic record, read once selection has passed.
#[inline(always)]
fn classic_site(
    ctx: &TracePointContext,
    layout: &AllocLayout,
    bytes_alloc: u64,
    gfp: u64,
    source: u16,
) -> Option<Site> {
    Some(Site {
        call_site: read(ctx, layout.call_site).unwrap_or(0),
        ptr: read(ctx, layout.ptr)?,
        bytes_req: read(ctx, layout.bytes_req).unwrap_or(0),
        bytes_alloc,
        gfp,
        source,
    })
}

#[inline(always)]
fn raw_cache_alloc<const CAS: bool>(
    ctx: &RawTracePointContext,
    cfg: &Config,
    spare: bool,
) -> Option<()> {
    let slot = program_slot(SOURCE_CACHE_ALLOC, false);
    if !spare {
        take_up(slot, ctx.arg(1));
    }
    if cfg.cache_size == 0 {
        return None;
    }
    // (call_site, ptr, struct kmem_cache *s, gfp_flags, node): userspace uses the
    // classic tracepoint instead on kernels whose arguments differ.
    let cache: u64 = ctx.arg(2);
    let size_ptr = (cache + cfg.kmem_cache_size_off as u64) as *const u32;
    let bytes_alloc = unsafe { bpf_probe_read_kernel(size_ptr) }.ok()? as u64;
    if bytes_alloc != cfg.cache_size {
        return None;
    }
    let name_ptr = (cache + cfg.kmem_cache_name_off as u64) as *const *const u8;
    let name = unsafe { bpf_probe_read_kernel(name_ptr) }.ok()?;
    if !name_selected(name, cfg) {
        return None;
    }
    if spare && taken_up_by_main(slot, ctx.arg(1)) {
        return None;
    }
    let gfp = ctx.arg::<u64>(3) & 0xffff_ffff;
    let site = Site {
        call_site: ctx.arg(0),
        ptr: ctx.arg(1),
        // The raw arguments carry no requested size on these kernels.
        bytes_req: 0,
        bytes_alloc,
        gfp,
        source: SOURCE_CACHE_ALLOC,
    };
    record::<CAS>(ctx.as_ptr(), &site, spare)
}

#[inline(always)]
fn name_selected(src: *const u8, cfg: &Config) -> bool {
    // Compared as words: byte-wise slice equality would pull in memcmp/memset
    // as BPF subprograms.
    let mut name = [0u64; CACHE_NAME_LEN / 8];
    let dst =
        unsafe { core::slice::from_raw_parts_mut(name.as_mut_ptr().cast::<u8>(), CACHE_NAME_LEN) };
    if unsafe { bpf_probe_read_kernel_str_bytes(src, dst) }.is_err() {
        return false;
    }
    let n = cfg.n_cache_names as usize;
    let mut i = 0;
    while i < MAX_CACHE_NAMES {
        if i >= n {
            return false;
        }
        let want = &cfg.cache_names[i];
        if want[0] == name[0] && want[1] == name[1] && want[2] == name[2] && want[3] == name[3] {
            return true;
        }
        i += 1;
    }
    false
}

/// One selected allocation as the hook saw it.
struct Site {
    call_site: u64,
    ptr: u64,
    bytes_req: u64,
    bytes_alloc: u64,
    gfp: u64,
    source: u16,
}

#[inline(always)]
fn record<const CAS: bool>(ctx: *mut core::ffi::c_void, site: &Site, spare: bool) -> Option<()> {
    let cfg = config();
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if cfg.target_tgid != 0 && cfg.target_tgid != tgid {
        return None;
    }
    if site.ptr == 0 {
        return None;
    }
    // The main program ran for this event and recorded it.
    if spare && live_find::<CAS>(site.ptr).is_some() {
        return None;
    }
    if site.ptr & cfg.free_align_mask != 0 {
        bump(counter::MISALIGNED);
    }
    let facts = TASK_FACTS.get_ptr_mut(program_slot(site.source, spare))?;
    let facts = unsafe { &mut *facts };
    task::refresh_facts(&cfg.task, facts, pid_tgid);
    let context = task::interrupt_context(&cfg.irq, &mut facts.preempt_at);
    // `_nocas` builds also serve 5.8, whose tracing programs may not call
    // bpf_jiffies64 (5.9): they keep the precise clock. Slot builds load on
    // 5.12+ only.
    let ts = if CAS {
        task::tick_clock(facts)
    } else {
        unsafe { bpf_ktime_get_ns() }
    };
    let who = Who {
        pid_tgid,
        ts,
        facts,
        context,
    };
    // In an interrupt the user frames are the interrupted task's, not the
    // allocation's: no fingerprint (userspace counts it under the interrupt).
    let path = if cfg.user_fingerprint != 0 && context & CONTEXT_INTERRUPT == 0 {
        user_path(ctx)
    } else {
        UserPath::NONE
    };
    let draw = stack_draw(site.call_site, tgid, &path, cfg, ts);
    let flags = draw.flags;
    if flags & FLAG_SAMPLED != 0 {
        let Some(mut entry) = EVENTS.reserve::<AllocEvent>(0) else {
            bump(counter::ALLOCS_LOST_RINGBUF);
            return None;
        };
        // A zoom's cost is measured where it is paid, on its draws only.
        let zoom_start = if flags & FLAG_ZOOM != 0 {
            unsafe { bpf_ktime_get_ns() }
        } else {
            0
        };
        let ev = entry.as_mut_ptr();
        unsafe {
            fill_header(&mut (*ev).hdr, EVENT_ALLOC, &who, &path, flags, site);
            (*ev).comm = bpf_get_current_comm().unwrap_or([0; 16]);
            (*ev).kstack_bytes = 0;
            (*ev).ustack_bytes = 0;
            if cfg.stack_flags & STACK_KERNEL != 0 {
                let n = bpf_get_stack(
                    ctx,
                    (*ev).kstack.as_mut_ptr().cast(),
                    (MAX_KSTACK * size_of::<u64>()) as u32,
                    0,
                );
                (*ev).kstack_bytes = n as i32;
                if n < 0 {
                    bump(counter::KSTACK_FAILED);
                }
            }
            if cfg.stack_flags & STACK_USER != 0 {
                let n = bpf_get_stack(
                    ctx,
                    (*ev).ustack.as_mut_ptr().cast(),
                    (MAX_USTACK * size_of::<u64>()) as u32,
                    BPF_F_USER_STACK as u64,
                );
                (*ev).ustack_bytes = n as i32;
                if n < 0 && tgid != 0 {
                    bump(counter::USTACK_FAILED);
                }
            }
        }
        if zoom_start != 0 {
            bump(counter::ZOOM_DRAWN);
            add(
                counter::ZOOM_STACK_NS,
                unsafe { bpf_ktime_get_ns() }.wrapping_sub(zoom_start),
            );
        }
        commit::<CAS, _>(entry, site.ptr, ts, draw.wake)
    } else {
        let Some(mut entry) = EVENTS.reserve::<AllocHeader>(0) else {
            bump(counter::ALLOCS_LOST_RINGBUF);
            return None;
        };
        unsafe {
            fill_header(
                &mut *entry.as_mut_ptr(),
                EVENT_ALLOC_NO_STACKS,
                &who,
                &path,
                flags,
                site,
            )
        };
        commit::<CAS, _>(entry, site.ptr, ts, draw.wake)
    }
}

/// The task an allocation is made for, and when.
struct Who<'a> {
    pid_tgid: u64,
    ts: u64,
    facts: &'a task::TaskFacts,
    context: u32,
}

/// Where user space entered the kernel and a hash of the frames that led there.
struct UserPath {
    ip: u64,
    fingerprint: u64,
    shallow: bool,
}

impl UserPath {
    const NONE: UserPath = UserPath {
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
fn user_path(ctx: *mut core::ffi::c_void) -> UserPath {
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

/// How an allocation's stacks were drawn, and whether its event wakes the reader.
struct Draw {
    /// [`FLAG_SAMPLED`] when drawn, the route ([`FLAG_CENSUS`], [`FLAG_ZOOM`])
    /// and the draw level; [`FLAG_SHALLOW`].
    flags: u16,
    /// The stratum is new on this CPU: often a new process, whose mappings
    /// the reader should take before a short-lived one exits.
    wake: bool,
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
fn stack_draw(call_site: u64, tgid: u32, path: &UserPath, cfg: &Config, ts: u64) -> Draw {
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

#[inline(always)]
fn fill_header(
    hdr: &mut AllocHeader,
    kind: u32,
    who: &Who,
    path: &UserPath,
    flags: u16,
    site: &Site,
) {
    let (pid_tgid, ts, facts) = (who.pid_tgid, who.ts, who.facts);
    hdr.kind = kind;
    hdr.tgid = (pid_tgid >> 32) as u32;
    hdr.pid = pid_tgid as u32;
    hdr.source = site.source;
    hdr.flags = flags;
    hdr.ptr = site.ptr;
    hdr.ts_ns = ts;
    hdr.bytes_req = site.bytes_req;
    hdr.bytes_alloc = site.bytes_alloc;
    hdr.gfp_flags = site.gfp;
    let task = &config().task;
    hdr.cgroup_id = facts.memcg;
    hdr.call_site = site.call_site;
    hdr.user_ip = path.ip;
    hdr.user_fingerprint = path.fingerprint;
    hdr.start_ns = facts.start_ns;
    hdr.ppid = facts.ppid;
    hdr.context = who.context;
    // Only an accounted allocation is charged at all (caches created with
    // SLAB_ACCOUNT carry no __GFP_ACCOUNT and are left out here). In an
    // interrupt the kernel charges `int_active_memcg`, not the interrupted
    // task's: say nothing rather than the wrong one.
    let accounted = site.gfp & config().gfp_account != 0;
    hdr.charged_cgroup_id = if accounted && hdr.context & CONTEXT_INTERRUPT == 0 {
        task::active_memcg(task)
    } else {
        0
    };
}

/// Insert before submit: once userspace can see the alloc, the kernel must
/// already forward its free.
#[inline(always)]
fn commit<const CAS: bool, T>(entry: RingBufEntry<T>, ptr: u64, ts: u64, wake: bool) -> Option<()> {
    if !live_insert::<CAS>(ptr, ts) {
        entry.discard(0);
        bump(counter::ALLOCS_LOST_MAP_FULL);
        return None;
    }
    let wake = if wake {
        BPF_RB_FORCE_WAKEUP.into()
    } else {
        wakeup_flags()
    };
    entry.submit(wake);
    bump(counter::ALLOCS_MATCHED);
    Some(())
}

/// Where a live pointer is kept.
enum Held {
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
fn live_insert<const CAS: bool>(ptr: u64, ts: u64) -> bool {
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
fn live_find<const CAS: bool>(ptr: u64) -> Option<Held> {
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
fn live_remove<const CAS: bool>(ptr: u64, held: Held) -> bool {
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

/// The free of a [`free_candidate`]: one bucket of slots rules out nearly
/// every object we never selected (and `LIVE` is asked only while it holds
/// anything). Whether it untracked `ptr` (the page source counts by region).
#[inline(always)]
fn on_free<const CAS: bool>(ptr: u64) -> bool {
    let Some(held) = live_find::<CAS>(ptr) else {
        return false;
    };
    // Reserve before untracking: if the ring is full the entry stays, kernel and
    // userspace keep agreeing the object is live, and the loss is counted.
    let Some(mut entry) = EVENTS.reserve::<FreeEvent>(0) else {
        bump(counter::FREES_LOST_RINGBUF);
        return false;
    };
    if !live_remove::<CAS>(ptr, held) {
        // Another CPU removed it first; nothing to report.
        entry.discard(0);
        return false;
    }
    let ev = entry.as_mut_ptr();
    unsafe {
        (*ev).kind = EVENT_FREE;
        (*ev).tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        (*ev).ptr = ptr;
        (*ev).bytes = 0;
    }
    entry.submit(wakeup_flags());
    bump(counter::FREES_MATCHED);
    true
}
