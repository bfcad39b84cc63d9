//! `leaktrace memcg`: memory-cgroup lifetimes from the `cgroup:*` tracepoints
//! (they exist on every kernel, unlike kprobes on `mem_cgroup_css_*`), and the
//! charged slab objects allocated inside each memcg, keyed by pointer so their
//! frees are seen. Its own object (`leaktrace-memcg`) with its own maps and
//! config: a memcg run creates none of the slab tracer's maps, and the slab
//! object holds none of these. The helpers both share are in `lib.rs`.
#![no_std]
#![no_main]

use core::mem::size_of;

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task, bpf_get_stack,
        bpf_ktime_get_ns, bpf_probe_read_kernel_str_bytes,
    },
    macros::{kprobe, map, raw_tracepoint, tracepoint},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::{ProbeContext, RawTracePointContext, TracePointContext},
    EbpfContext,
};
use tracer_common::{
    memcg::{
        counter, CgroupEvent, ChargeEvent, CssEvent, KreadBatch, MemcgConfig, PercpuAllocEvent,
        PercpuFreeEvent, UnchargeEvent, CACHE_LEN, KREAD_FOLLOW, KREAD_SLOTS, KREAD_SLOT_BYTES,
        KSTACK, PATH_LEN,
    },
    EVENT_CHARGE, EVENT_CSS_FREE, EVENT_CSS_OFFLINE, EVENT_MKDIR, EVENT_PERCPU_ALLOC,
    EVENT_PERCPU_FREE, EVENT_PERCPU_OTHER_MKDIR, EVENT_RELEASE, EVENT_RMDIR, EVENT_UNCHARGE,
};
use tracer_ebpf::{
    data_loc,
    task::{css_cgroup_id, current_memcg, parent_tgid},
    BPF_ANY,
};

#[no_mangle]
static MEMCG_CONFIG: MemcgConfig = MemcgConfig::zeroed();

/// Sized by userspace before load.
#[map]
static MEMCG_EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

/// Pointer of a charged object -> memcg id it was allocated in. Not LRU: an
/// eviction would turn a pinned object into a silently forgotten one.
#[map]
static MEMCG_LIVE: HashMap<u64, u64> = HashMap::with_max_entries(1 << 18, 0);

#[map]
static MEMCG_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

// This object's maps under the shared helpers (`lib.rs`).

/// Charges can come by the thousand per second: wake the reader in batches.
#[inline(always)]
fn wakeup_flags(cfg: &MemcgConfig) -> u64 {
    tracer_ebpf::wakeup_flags(&MEMCG_EVENTS, cfg.wakeup_bytes)
}

tracer_ebpf::object_maps!(MEMCG_CONFIG: MemcgConfig, MEMCG_COUNTERS);

#[tracepoint]
pub fn memcg_mkdir(ctx: TracePointContext) -> u32 {
    let _ = on_cgroup(&ctx, EVENT_MKDIR);
    0
}

#[tracepoint]
pub fn memcg_rmdir(ctx: TracePointContext) -> u32 {
    let _ = on_cgroup(&ctx, EVENT_RMDIR);
    0
}

/// Runs from a workqueue after the last reference is gone: the task is a
/// kworker and means nothing; only the id matters.
#[tracepoint]
pub fn memcg_release(ctx: TracePointContext) -> u32 {
    let _ = on_cgroup(&ctx, EVENT_RELEASE);
    0
}

#[inline(always)]
fn on_cgroup(ctx: &TracePointContext, kind: u32) -> Option<()> {
    let cfg = config();
    let root: u32 = read(ctx, cfg.cgroup.root)?;
    if cfg.filter_hierarchy != 0 && root != cfg.hierarchy {
        if kind == EVENT_MKDIR && cfg.percpu.enabled != 0 {
            // The task's per-CPU allocations so far were for this cgroup.
            percpu_record(
                EVENT_PERCPU_OTHER_MKDIR,
                bpf_get_current_pid_tgid() as u32,
                0,
            );
        }
        return None;
    }
    let Some(mut entry) = MEMCG_EVENTS.reserve::<CgroupEvent>(0) else {
        bump(counter::CGROUP_LOST);
        return None;
    };
    let ev = entry.as_mut_ptr();
    let pid_tgid = bpf_get_current_pid_tgid();
    unsafe {
        (*ev).kind = kind;
        (*ev).root = root;
        (*ev).level = read(ctx, cfg.cgroup.level).unwrap_or(0);
        (*ev).id = read(ctx, cfg.cgroup.id).unwrap_or(0);
        (*ev).tgid = (pid_tgid >> 32) as u32;
        (*ev).pid = pid_tgid as u32;
        (*ev).ppid = parent_tgid(&cfg.task);
        (*ev).ts_ns = bpf_ktime_get_ns();
        (*ev).comm = bpf_get_current_comm().unwrap_or([0; 16]);
        (*ev).path[0] = 0;
        if let Some(loc) = read::<u32>(ctx, cfg.cgroup.path) {
            let src = data_loc(ctx, loc);
            let dst = core::slice::from_raw_parts_mut((*ev).path.as_mut_ptr(), PATH_LEN);
            if bpf_probe_read_kernel_str_bytes(src, dst).is_err() {
                (*ev).path[0] = 0;
            }
        }
    }
    // Lifetime events are rare and a user watches for them: wake at once.
    entry.submit(0);
    Some(())
}

// Where the kernel has kprobes: the memcg css itself going offline and being
// freed. cgroup_release says when the cgroup goes; these say when the memcg
// (what holds the memory and the per-cpu stats) does.

#[kprobe]
pub fn memcg_css_offline(ctx: ProbeContext) -> u32 {
    let _ = on_css(&ctx, EVENT_CSS_OFFLINE);
    0
}

#[kprobe]
pub fn memcg_css_free(ctx: ProbeContext) -> u32 {
    let _ = on_css(&ctx, EVENT_CSS_FREE);
    0
}

#[inline(always)]
fn on_css(ctx: &ProbeContext, kind: u32) -> Option<()> {
    let cfg = config();
    let css: u64 = ctx.arg(0)?;
    let id = css_cgroup_id(&cfg.task, css);
    let Some(mut entry) = MEMCG_EVENTS.reserve::<CssEvent>(0) else {
        bump(counter::CGROUP_LOST);
        return None;
    };
    let ev = entry.as_mut_ptr();
    unsafe {
        (*ev).kind = kind;
        (*ev)._pad = 0;
        (*ev).id = id;
        (*ev).ts_ns = bpf_ktime_get_ns();
    }
    entry.submit(0);
    Some(())
}

#[tracepoint]
pub fn memcg_kmalloc(ctx: TracePointContext) -> u32 {
    let cfg = config();
    if cfg.pins != 0 {
        let _ = on_charge(&ctx, cfg, false);
    }
    0
}

#[tracepoint]
pub fn memcg_cache_alloc(ctx: TracePointContext) -> u32 {
    let cfg = config();
    if cfg.pins != 0 {
        let _ = on_charge(&ctx, cfg, true);
    }
    0
}

#[tracepoint]
pub fn memcg_kfree(ctx: TracePointContext) -> u32 {
    let cfg = config();
    if let Some(ptr) = read(&ctx, cfg.kfree_ptr) {
        on_uncharge(ptr);
    }
    0
}

#[tracepoint]
pub fn memcg_cache_free(ctx: TracePointContext) -> u32 {
    let cfg = config();
    if let Some(ptr) = read(&ctx, cfg.cache_free_ptr) {
        on_uncharge(ptr);
    }
    0
}

#[inline(always)]
fn on_charge(ctx: &TracePointContext, cfg: &MemcgConfig, cache: bool) -> Option<()> {
    let layout = if cache {
        &cfg.cache_alloc
    } else {
        &cfg.kmalloc
    };
    // Accounted is the cheap filter: most allocations are not charged.
    let accounted = if layout.accounted != 0 {
        read::<u8>(ctx, layout.accounted)? != 0
    } else {
        // gfp_flags is 4 or 8 bytes; every GFP bit is in the low 32.
        (read::<u32>(ctx, layout.gfp_flags)? as u64) & cfg.gfp_account != 0
    };
    if !accounted {
        return None;
    }
    let memcg_id = current_memcg(&cfg.task);
    if memcg_id == 0 {
        bump(counter::MEMCG_UNKNOWN);
        return None;
    }
    if memcg_id == cfg.root_memcg_id {
        return None;
    }
    let ptr: u64 = read(ctx, layout.ptr)?;
    if ptr == 0 {
        return None;
    }
    let Some(mut entry) = MEMCG_EVENTS.reserve::<ChargeEvent>(0) else {
        bump(counter::CHARGE_LOST_RINGBUF);
        return None;
    };
    let ev = entry.as_mut_ptr();
    let pid_tgid = bpf_get_current_pid_tgid();
    unsafe {
        (*ev).kind = EVENT_CHARGE;
        (*ev).tgid = (pid_tgid >> 32) as u32;
        (*ev).pid = pid_tgid as u32;
        (*ev).ptr = ptr;
        (*ev).memcg_id = memcg_id;
        (*ev).ts_ns = bpf_ktime_get_ns();
        (*ev).bytes_alloc = read(ctx, layout.bytes_alloc).unwrap_or(0);
        (*ev).call_site = read(ctx, layout.call_site).unwrap_or(0);
        (*ev).comm = bpf_get_current_comm().unwrap_or([0; 16]);
        (*ev).cache[0] = 0;
        if layout.name != 0 {
            if let Some(loc) = read::<u32>(ctx, layout.name) {
                let src = data_loc(ctx, loc);
                let dst = core::slice::from_raw_parts_mut((*ev).cache.as_mut_ptr(), CACHE_LEN);
                if bpf_probe_read_kernel_str_bytes(src, dst).is_err() {
                    (*ev).cache[0] = 0;
                }
            }
        }
        (*ev).kstack_bytes = 0;
        if cfg.stacks != 0 {
            (*ev).kstack_bytes = bpf_get_stack(
                ctx.as_ptr(),
                (*ev).kstack.as_mut_ptr().cast(),
                (KSTACK * size_of::<u64>()) as u32,
                0,
            ) as i32;
        }
    }
    // Insert before submit: once userspace sees the charge, its free must be forwarded.
    if MEMCG_LIVE.insert(ptr, memcg_id, BPF_ANY).is_err() {
        entry.discard(0);
        bump(counter::CHARGE_LOST_MAP_FULL);
        return None;
    }
    entry.submit(wakeup_flags(cfg));
    Some(())
}

#[inline(always)]
fn on_uncharge(ptr: u64) {
    if unsafe { MEMCG_LIVE.get(ptr) }.is_none() {
        return;
    }
    // Reserve before deleting: if the ring is full the object stays tracked
    // (kernel and userspace agree it is outstanding) and the loss is counted.
    let Some(mut entry) = MEMCG_EVENTS.reserve::<UnchargeEvent>(0) else {
        bump(counter::UNCHARGE_LOST);
        return;
    };
    if MEMCG_LIVE.remove(ptr).is_err() {
        entry.discard(0);
        return;
    }
    let ev = entry.as_mut_ptr();
    unsafe {
        (*ev).kind = EVENT_UNCHARGE;
        (*ev)._pad = 0;
        (*ev).ptr = ptr;
    }
    entry.submit(wakeup_flags(config()));
}

// Per-CPU allocations and frees, every one: they are rare (each takes the
// per-CPU allocator's mutex) and which belong to a memcg is known only when
// the same task's cgroup_mkdir fires, after them; userspace decides.

#[tracepoint]
pub fn memcg_percpu_alloc(ctx: TracePointContext) -> u32 {
    let cfg = config();
    if let (Some(ptr), Some(size)) = (
        read::<u64>(&ctx, cfg.percpu.alloc_ptr),
        read::<u64>(&ctx, cfg.percpu.alloc_size),
    ) {
        let _ = on_percpu_alloc(ctx.as_ptr(), ptr, size);
    }
    0
}

#[tracepoint]
pub fn memcg_percpu_free(ctx: TracePointContext) -> u32 {
    let cfg = config();
    if let Some(ptr) = read::<u64>(&ctx, cfg.percpu.free_ptr) {
        percpu_record(EVENT_PERCPU_FREE, 0, ptr);
    }
    0
}

// Raw tracepoints read arguments at constant context offsets only (the
// verifier refuses a computed one): one program per argument layout, picked
// by userspace from BTF. `size`, `ptr` at 2, 6 before 5.19 and at 3, 7 after
// (call_site came first); the free's `ptr` is at 2 on every kernel.

#[raw_tracepoint]
pub fn memcg_percpu_alloc_raw26(ctx: RawTracePointContext) -> i32 {
    let _ = on_percpu_alloc(ctx.as_ptr(), ctx.arg(6), ctx.arg(2));
    0
}

#[raw_tracepoint]
pub fn memcg_percpu_alloc_raw37(ctx: RawTracePointContext) -> i32 {
    let _ = on_percpu_alloc(ctx.as_ptr(), ctx.arg(7), ctx.arg(3));
    0
}

#[raw_tracepoint]
pub fn memcg_percpu_free_raw(ctx: RawTracePointContext) -> i32 {
    percpu_record(EVENT_PERCPU_FREE, 0, ctx.arg(2));
    0
}

#[inline(always)]
fn on_percpu_alloc(ctx: *mut core::ffi::c_void, ptr: u64, size: u64) -> Option<()> {
    if ptr == 0 {
        return None;
    }
    let Some(mut entry) = MEMCG_EVENTS.reserve::<PercpuAllocEvent>(0) else {
        bump(counter::PERCPU_LOST);
        return None;
    };
    let ev = entry.as_mut_ptr();
    let pid_tgid = bpf_get_current_pid_tgid();
    unsafe {
        (*ev).kind = EVENT_PERCPU_ALLOC;
        (*ev).pid = pid_tgid as u32;
        (*ev).tgid = (pid_tgid >> 32) as u32;
        (*ev).ptr = ptr;
        (*ev).size = size;
        (*ev).ts_ns = bpf_ktime_get_ns();
        (*ev).kstack_bytes = bpf_get_stack(
            ctx,
            (*ev).kstack.as_mut_ptr().cast(),
            (KSTACK * size_of::<u64>()) as u32,
            0,
        ) as i32;
    }
    entry.submit(0);
    Some(())
}

#[inline(always)]
fn percpu_record(kind: u32, pid: u32, ptr: u64) {
    let Some(mut entry) = MEMCG_EVENTS.reserve::<PercpuFreeEvent>(0) else {
        bump(counter::PERCPU_LOST);
        return;
    };
    let ev = entry.as_mut_ptr();
    unsafe {
        (*ev).kind = kind;
        (*ev).pid = pid;
        (*ev).ptr = ptr;
    }
    entry.submit(0);
}

/// One batch of kernel reads asked for by userspace (the memcg walk).
#[map]
static MEMCG_KREAD: Array<KreadBatch> = Array::with_max_entries(1, 0);

/// Never attached: userspace fills `MEMCG_KREAD` and runs this once with
/// `BPF_PROG_TEST_RUN` (raw_tp test runs exist since 5.10), then reads the
/// bytes back. This is how the walk reaches dying memcgs, which no BPF
/// iterator visits, on kernels built without /proc/kcore.
#[raw_tracepoint]
pub fn memcg_kread(_ctx: RawTracePointContext) -> i32 {
    let Some(batch) = MEMCG_KREAD.get_ptr_mut(0) else {
        return 0;
    };
    let batch = unsafe { &mut *batch };
    batch.task = unsafe { bpf_get_current_task() };
    let n = batch.n as usize;
    for i in 0..KREAD_SLOTS {
        if i >= n {
            break;
        }
        if batch.follow[i] != 0 {
            // A list's next chain: up to KREAD_FOLLOW pointers, ending at the
            // head (`stop`), a failed read, or a value that is no kernel address.
            let stop = batch.stop[i];
            let mut p = batch.addr[i];
            let mut got: i32 = 0;
            for j in 0..KREAD_FOLLOW {
                let mut v: u64 = 0;
                let r = unsafe {
                    aya_ebpf::helpers::generated::bpf_probe_read_kernel(
                        (&mut v as *mut u64).cast(),
                        8,
                        p as *const core::ffi::c_void,
                    )
                };
                if r != 0 {
                    break;
                }
                // j < KREAD_FOLLOW: inside the slot.
                unsafe {
                    let dst = batch.data[i].as_mut_ptr().add(j * 8).cast::<u64>();
                    core::ptr::write_unaligned(dst, v);
                }
                got += 1;
                if v == stop || v >> 56 != 0xff {
                    break;
                }
                p = v;
            }
            batch.status[i] = got;
            continue;
        }
        // 1..=KREAD_SLOT_BYTES whatever userspace wrote: a range the verifier can prove.
        let len = (batch.len[i].wrapping_sub(1) & (KREAD_SLOT_BYTES as u32 - 1)) + 1;
        let dst = batch.data[i].as_mut_ptr();
        let src = batch.addr[i] as *const core::ffi::c_void;
        let r =
            unsafe { aya_ebpf::helpers::generated::bpf_probe_read_kernel(dst.cast(), len, src) };
        batch.status[i] = r as i32;
    }
    0
}
