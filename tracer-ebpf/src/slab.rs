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
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_stack, bpf_ktime_get_ns,
        bpf_probe_read_kernel_str_bytes,
    },
    macros::{btf_tracepoint, map, raw_tracepoint, tracepoint},
    maps::{ring_buf::RingBufEntry, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, RawTracePointContext, TracePointContext},
    EbpfContext,
};
use tracer_common::{
    slab::{
        counter, kmalloc_class, AllocEvent, AllocHeader, AllocLayout, Config, FreeEvent,
        CACHE_NAME_LEN, FLAG_SAMPLED, FLAG_ZOOM, MAX_CACHE_NAMES, MAX_KSTACK, MAX_USTACK,
        SOURCE_CACHE_ALLOC, SOURCE_KMALLOC, SOURCE_PERCPU, STACK_KERNEL, STACK_USER,
    },
    CONTEXT_INTERRUPT, EVENT_ALLOC, EVENT_ALLOC_NO_STACKS, EVENT_FREE,
};
use tracer_ebpf::{data_loc, task};

#[path = "slab/draw.rs"]
mod draw;
#[path = "slab/kheap.rs"]
mod kheap;
#[path = "slab/live.rs"]
mod live;
#[path = "slab/pages.rs"]
mod pages;
#[path = "slab/percpu.rs"]
mod percpu;

use draw::{stack_draw, user_path, UserPath};
use live::{live_find, live_insert, live_remove};

#[no_mangle]
static CONFIG: Config = Config::zeroed();

/// Sized by userspace (`set_max_entries`) before load.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

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
/// `SEEN_PERCPU_FREE`/`SEEN_PAGE_FREE` for the raw free hooks.
#[map]
static SEEN: PerCpuArray<u64> = PerCpuArray::with_max_entries(6, 0);

const SEEN_KFREE: u32 = 2;
const SEEN_CACHE_FREE: u32 = 3;
const SEEN_PERCPU_FREE: u32 = 4;
const SEEN_PAGE_FREE: u32 = 5;

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
    // Userspace names the target at load (`btf_trace_<event>`); the section's
    // is the one event these programs are written for.
    (btf_tracepoint $what:ident $role:ident $name:ident $cas:literal) => {
        #[btf_tracepoint(function = "kmem_cache_alloc")]
        pub fn $name(ctx: BtfTracePointContext) -> i32 {
            handle!(btf_tracepoint $what $role ctx $cas);
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
        let _ = raw_cache_alloc::<$cas, false>($ctx.as_ptr(), config(), spare!($role));
    };
    (btf_tracepoint cache_alloc $role:ident $ctx:ident $cas:literal) => {
        let _ = raw_cache_alloc::<$cas, true>($ctx.as_ptr(), config(), spare!($role));
    };
    (raw_tracepoint kfree $role:ident $ctx:ident $cas:literal) => {
        raw_free::<$cas>($ctx.arg(1), SEEN_KFREE, spare!($role))
    };
    (raw_tracepoint cache_free $role:ident $ctx:ident $cas:literal) => {
        raw_free::<$cas>($ctx.arg(1), SEEN_CACHE_FREE, spare!($role))
    };
    (tracepoint percpu_alloc main $ctx:ident $cas:literal) => {
        let _ = percpu::tp_percpu_alloc::<$cas>(&$ctx);
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
    (raw_tracepoint page_alloc main $ctx:ident $cas:literal) => {
        let _ = pages::page_alloc_raw::<$cas>(&$ctx);
    };
    (raw_tracepoint page_free $role:ident $ctx:ident $cas:literal) => {
        let _ = pages::page_free_raw::<$cas>(&$ctx, SEEN_PAGE_FREE, spare!($role));
    };
    // On raw mm_page_free, while userspace calibrates (before the others attach).
    (raw_tracepoint page_calibrate main $ctx:ident $cas:literal) => {
        pages::page_calibrate($ctx.arg(0), $ctx.arg(1))
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

#[inline(always)]
fn raw_kmalloc<const CAS: bool>(ctx: &RawTracePointContext, spare: bool) {
    // (call_site, ptr, bytes_req, bytes_alloc, gfp_flags[, node])
    let slot = program_slot(SOURCE_KMALLOC, false);
    if !spare {
        take_up(slot, ctx.arg(1));
    }
    let cfg = config();
    let bytes_alloc: u64 = ctx.arg(3);
    if cfg.kheap.rate != 0 {
        if spare && taken_up_by_main(slot, ctx.arg(1)) {
            return;
        }
        let site = Site {
            call_site: ctx.arg(0),
            ptr: ctx.arg(1),
            bytes_req: ctx.arg(2),
            bytes_alloc,
            gfp: ctx.arg::<u64>(4) & 0xffff_ffff,
            source: SOURCE_KMALLOC,
        };
        kheap::alloc::<CAS>(ctx.as_ptr(), site, 0, spare);
        return;
    }
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

/// The floor's programs where leaktrace hooks `kmem_cache_alloc` as a BTF
/// tracepoint (one program per target, as the kernel loads them).
#[btf_tracepoint(function = "kmem_cache_alloc")]
pub fn floor_btf(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[btf_tracepoint(function = "kmem_cache_alloc")]
pub fn floor_btf_spare(_ctx: BtfTracePointContext) -> i32 {
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
    ptr & config().free_align_mask == 0
        && ptr != 0
        && (config().kheap.rate == 0 || kheap::region_tracked(ptr))
}

#[inline(always)]
fn tp_kmalloc<const CAS: bool>(ctx: &TracePointContext) -> Option<()> {
    let cfg = config();
    if cfg.kheap.rate != 0 {
        return kheap::alloc_classic::<CAS>(ctx, &cfg.kmalloc, SOURCE_KMALLOC);
    }
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
    if cfg.kheap.rate != 0 {
        return kheap::alloc_classic::<CAS>(ctx, &cfg.cache_alloc, SOURCE_CACHE_ALLOC);
    }
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

/// TP_PROTO argument `n`: a raw and a BTF tracepoint program's context are
/// both the arguments as an array of u64. In a BTF program the verifier types
/// a pointer argument by the kernel's BTF, so its fields are plain loads.
#[inline(always)]
fn tp_arg(ctx: *mut core::ffi::c_void, n: usize) -> u64 {
    unsafe { *(ctx as *const u64).add(n) }
}

/// `kmem_cache_alloc(call_site, ptr, struct kmem_cache *s, gfp_flags, node)`,
/// the raw tracepoint's arguments (userspace uses the classic tracepoint
/// instead on kernels whose arguments differ). `DIRECT`: a BTF tracepoint,
/// which reads `s->size` with one load instead of `bpf_probe_read_kernel`
/// (~30 ns a call on 6.18, paid by every allocation under `--all-caches`).
#[inline(always)]
fn raw_cache_alloc<const CAS: bool, const DIRECT: bool>(
    ctx: *mut core::ffi::c_void,
    cfg: &Config,
    spare: bool,
) -> Option<()> {
    let ptr = tp_arg(ctx, 1);
    let slot = program_slot(SOURCE_CACHE_ALLOC, false);
    if !spare {
        take_up(slot, ptr);
    }
    if cfg.cache_size == 0 && cfg.kheap.rate == 0 {
        return None;
    }
    // Every sampled allocation passes selection, so a spare asks first whether
    // its main program saw the event, before the cache's size is read.
    if spare && cfg.kheap.rate != 0 && taken_up_by_main(slot, ptr) {
        return None;
    }
    let cache = tp_arg(ctx, 2);
    let size_ptr = (cache + cfg.kmem_cache_size_off as u64) as *const u32;
    let bytes_alloc = if DIRECT {
        u64::from(unsafe { core::ptr::read_volatile(size_ptr) })
    } else {
        u64::from(unsafe { bpf_probe_read_kernel(size_ptr) }.ok()?)
    };
    if cfg.kheap.rate != 0 {
        let site = Site {
            call_site: tp_arg(ctx, 0),
            ptr,
            bytes_req: 0,
            bytes_alloc,
            gfp: tp_arg(ctx, 3) & 0xffff_ffff,
            source: SOURCE_CACHE_ALLOC,
        };
        kheap::alloc::<CAS>(ctx, site, cache, spare);
        return Some(());
    }
    if bytes_alloc != cfg.cache_size {
        return None;
    }
    let name_ptr = (cache + cfg.kmem_cache_name_off as u64) as *const *const u8;
    let name = unsafe { bpf_probe_read_kernel(name_ptr) }.ok()?;
    if !name_selected(name, cfg) {
        return None;
    }
    if spare && taken_up_by_main(slot, ptr) {
        return None;
    }
    let site = Site {
        call_site: tp_arg(ctx, 0),
        ptr,
        // The raw arguments carry no requested size on these kernels.
        bytes_req: 0,
        bytes_alloc,
        gfp: tp_arg(ctx, 3) & 0xffff_ffff,
        source: SOURCE_CACHE_ALLOC,
    };
    record::<CAS>(ctx, &site, spare)
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
#[derive(Clone, Copy)]
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
    // Counted before it can be found, so a free never skips a held sample.
    let kheap = config().kheap.rate != 0;
    if kheap {
        kheap::entering(ptr);
    }
    if !live_insert::<CAS>(ptr, ts) {
        if kheap {
            kheap::left(ptr);
        }
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
    if config().kheap.rate != 0 {
        kheap::left(ptr);
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
