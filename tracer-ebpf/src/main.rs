//! leaktrace's kernel side: select slab allocations, remember their pointers, and
//! forward only selected allocations and the frees of those same objects.
//!
//! Policy (which cache, which offsets) arrives in the read-only `CONFIG` global that
//! userspace fills from the running kernel's tracefs `format` files. The verifier
//! sees those values as constants, so disabled branches are pruned at load time.
#![no_std]
#![no_main]

use core::mem::size_of;

use aya_ebpf::{
    bindings::BPF_F_USER_STACK,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_stack,
        bpf_ktime_get_ns, bpf_probe_read_kernel_str_bytes,
    },
    macros::{map, tracepoint},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
    EbpfContext,
};
use tracer_common::{
    counter, kmalloc_class, AllocEvent, AllocLayout, Config, FreeEvent, CACHE_NAME_LEN,
    EVENT_ALLOC, EVENT_FREE, MAX_CACHE_NAMES, MAX_KSTACK, MAX_USTACK, SOURCE_CACHE_ALLOC,
    SOURCE_KMALLOC, STACK_KERNEL, STACK_USER,
};

#[no_mangle]
static CONFIG: Config = Config::zeroed();

/// Sized by userspace (`set_max_entries`) before load.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

/// Pointer -> allocation timestamp of every object we reported and have not seen
/// freed. Not LRU: an eviction would silently turn a live object into a lie.
#[map]
static LIVE: HashMap<u64, u64> = HashMap::with_max_entries(1 << 20, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

const BPF_ANY: u64 = 0;

#[inline(always)]
fn config() -> &'static Config {
    // The volatile read keeps rustc from folding the zeroed initializer into the code;
    // the verifier then sees the real, frozen values.
    unsafe { core::ptr::read_volatile(&&CONFIG) }
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn read<T>(ctx: &TracePointContext, offset: u16) -> Option<T> {
    unsafe { ctx.read_at::<T>(offset as usize).ok() }
}

#[tracepoint]
pub fn kmalloc(ctx: TracePointContext) -> u32 {
    let _ = on_kmalloc(&ctx);
    0
}

#[tracepoint]
pub fn kmem_cache_alloc(ctx: TracePointContext) -> u32 {
    let _ = on_cache_alloc(&ctx);
    0
}

#[tracepoint]
pub fn kfree(ctx: TracePointContext) -> u32 {
    let _ = on_free(&ctx, config().kfree_ptr);
    0
}

#[tracepoint]
pub fn kmem_cache_free(ctx: TracePointContext) -> u32 {
    let _ = on_free(&ctx, config().cache_free_ptr);
    0
}

#[inline(always)]
fn on_kmalloc(ctx: &TracePointContext) -> Option<()> {
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
    record(ctx, &cfg.kmalloc, SOURCE_KMALLOC, bytes_alloc, gfp)
}

#[inline(always)]
fn on_cache_alloc(ctx: &TracePointContext) -> Option<()> {
    let cfg = config();
    if cfg.cache_size == 0 {
        return None;
    }
    let bytes_alloc: u64 = read(ctx, cfg.cache_alloc.bytes_alloc)?;
    if bytes_alloc != cfg.cache_size {
        return None;
    }
    if !name_selected(ctx, cfg) {
        return None;
    }
    let gfp = read::<u32>(ctx, cfg.cache_alloc.gfp_flags)? as u64;
    record(ctx, &cfg.cache_alloc, SOURCE_CACHE_ALLOC, bytes_alloc, gfp)
}

#[inline(always)]
fn name_selected(ctx: &TracePointContext, cfg: &Config) -> bool {
    // __data_loc: low 16 bits are the string's offset in the record, high 16 its length.
    let Some(loc) = read::<u32>(ctx, cfg.cache_alloc.name) else {
        return false;
    };
    // Compared as words: byte-wise slice equality would pull in memcmp/memset
    // as BPF subprograms.
    let mut name = [0u64; CACHE_NAME_LEN / 8];
    let src = unsafe { ctx.as_ptr().add((loc & 0xffff) as usize) } as *const u8;
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

#[inline(always)]
fn record(
    ctx: &TracePointContext,
    layout: &AllocLayout,
    source: u16,
    bytes_alloc: u64,
    gfp: u64,
) -> Option<()> {
    let cfg = config();
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if cfg.target_tgid != 0 && cfg.target_tgid != tgid {
        return None;
    }
    let ptr: u64 = read(ctx, layout.ptr)?;
    if ptr == 0 {
        return None;
    }
    let Some(mut entry) = EVENTS.reserve::<AllocEvent>(0) else {
        bump(counter::ALLOCS_LOST_RINGBUF);
        return None;
    };
    let ts = unsafe { bpf_ktime_get_ns() };
    let ev = entry.as_mut_ptr();
    unsafe {
        (*ev).kind = EVENT_ALLOC;
        (*ev).tgid = tgid;
        (*ev).pid = pid_tgid as u32;
        (*ev).source = source;
        (*ev)._pad = 0;
        (*ev).ptr = ptr;
        (*ev).ts_ns = ts;
        (*ev).bytes_req = read(ctx, layout.bytes_req).unwrap_or(0);
        (*ev).bytes_alloc = bytes_alloc;
        (*ev).gfp_flags = gfp;
        (*ev).cgroup_id = bpf_get_current_cgroup_id();
        (*ev).comm = bpf_get_current_comm().unwrap_or([0; 16]);
        (*ev).kstack_bytes = 0;
        (*ev).ustack_bytes = 0;
        if cfg.stack_flags & STACK_KERNEL != 0 {
            let n = bpf_get_stack(
                ctx.as_ptr(),
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
                ctx.as_ptr(),
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
    // Insert before submit: once userspace can see the alloc, the kernel must
    // already forward its free.
    if LIVE.insert(ptr, ts, BPF_ANY).is_err() {
        entry.discard(0);
        bump(counter::ALLOCS_LOST_MAP_FULL);
        return None;
    }
    entry.submit(0);
    bump(counter::ALLOCS_MATCHED);
    Some(())
}

#[inline(always)]
fn on_free(ctx: &TracePointContext, ptr_offset: u16) -> Option<()> {
    let ptr: u64 = read(ctx, ptr_offset)?;
    // A lockless lookup rules out the overwhelming majority of frees (objects we
    // never selected) before we touch the bucket lock that delete takes.
    unsafe { LIVE.get(ptr) }?;
    // Reserve before deleting: if the ring is full the entry stays, kernel and
    // userspace keep agreeing the object is live, and the loss is counted.
    let Some(mut entry) = EVENTS.reserve::<FreeEvent>(0) else {
        bump(counter::FREES_LOST_RINGBUF);
        return None;
    };
    if LIVE.remove(ptr).is_err() {
        // Another CPU removed it first; nothing to report.
        entry.discard(0);
        return None;
    }
    let ev = entry.as_mut_ptr();
    unsafe {
        (*ev).kind = EVENT_FREE;
        (*ev).tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        (*ev).ptr = ptr;
        (*ev).ts_ns = bpf_ktime_get_ns();
    }
    entry.submit(0);
    bump(counter::FREES_MATCHED);
    Some(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
