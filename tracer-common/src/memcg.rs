//! `leaktrace memcg`: memory-cgroup lifetimes (cgroup tracepoints) and the
//! charged slab objects allocated inside each memcg. Separate maps and config
//! from the slab tracer so the two can evolve independently; its record kinds
//! (`EVENT_MKDIR`...) are in the crate root's one event-kind space.

use crate::TaskOffsets;

#[cfg(feature = "user")]
pub mod user;

/// Bytes of a cgroup path we copy (relative to its hierarchy's root).
/// Kubernetes paths are ~150 bytes; longer ones arrive truncated.
pub const PATH_LEN: usize = 256;
/// Bytes of a slab cache name we copy from `kmem_cache_alloc`.
pub const CACHE_LEN: usize = 32;
/// Kernel frames per charged allocation.
pub const KSTACK: usize = 24;

/// Indexes into the memcg object's per-CPU `MEMCG_COUNTERS` array.
pub mod counter {
    crate::counters! {
        /// Cgroup events lost because the ring buffer was full.
        CGROUP_LOST,
        /// Charged allocations not tracked: ring buffer full.
        CHARGE_LOST_RINGBUF,
        /// Charged allocations not tracked: live map full.
        CHARGE_LOST_MAP_FULL,
        /// Frees of tracked objects whose event was lost (the object stays tracked).
        UNCHARGE_LOST,
        /// Charged allocations whose memcg could not be read from the task.
        MEMCG_UNKNOWN,
        /// Per-CPU allocation/free records lost because the ring buffer was full.
        PERCPU_LOST,
    }
}

/// Offsets in the classic `cgroup:cgroup_{mkdir,rmdir,release}` records
/// (identical for the three events on every kernel we know, checked at load).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupLayout {
    pub root: u16,
    pub level: u16,
    pub id: u16,
    /// `__data_loc char[] path`.
    pub path: u16,
}

/// Offsets in a classic kmem allocation record; 0 = field absent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KmemLayout {
    pub ptr: u16,
    pub bytes_alloc: u16,
    pub gfp_flags: u16,
    pub call_site: u16,
    /// `__data_loc char[] name` (kmem_cache_alloc on 6.18+).
    pub name: u16,
    /// `bool accounted` (kmem_cache_alloc on 6.0+): covers SLAB_ACCOUNT caches,
    /// whose allocations carry no __GFP_ACCOUNT.
    pub accounted: u16,
    pub _pad: [u16; 2],
}

/// Offsets in the classic `percpu:*` records (`size`, `ptr` exist on every
/// kernel; `call_site` and `bytes_alloc` only from 5.19, so neither is used).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PercpuLayout {
    /// 1: the per-CPU programs are attached and forward their records.
    pub enabled: u16,
    pub alloc_size: u16,
    pub alloc_ptr: u16,
    pub free_ptr: u16,
    pub _pad: u64,
}

/// Filled by userspace from tracefs formats and BTF; frozen at load.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemcgConfig {
    pub cgroup: CgroupLayout,
    /// Keep only cgroup events of this hierarchy id (the memory controller's).
    pub hierarchy: u32,
    /// 1: filter on `hierarchy`; 0: keep every hierarchy.
    pub filter_hierarchy: u32,
    /// The charging task's memcg and the acting task's parent.
    pub task: TaskOffsets,
    /// Charges to this memcg (the root: never charged) are ignored.
    pub root_memcg_id: u64,
    /// 1: track charged slab allocations.
    pub pins: u32,
    /// 1: capture a kernel stack per charged allocation.
    pub stacks: u32,
    pub kmalloc: KmemLayout,
    pub cache_alloc: KmemLayout,
    pub kfree_ptr: u16,
    pub cache_free_ptr: u16,
    pub _pad1: u32,
    pub gfp_account: u64,
    /// Charge events wake the reader only once this many bytes wait
    /// (userspace also polls); 0 wakes on every event.
    pub wakeup_bytes: u64,
    pub percpu: PercpuLayout,
}

impl MemcgConfig {
    pub const fn zeroed() -> Self {
        const K: KmemLayout = KmemLayout {
            ptr: 0,
            bytes_alloc: 0,
            gfp_flags: 0,
            call_site: 0,
            name: 0,
            accounted: 0,
            _pad: [0; 2],
        };
        MemcgConfig {
            cgroup: CgroupLayout {
                root: 0,
                level: 0,
                id: 0,
                path: 0,
            },
            hierarchy: 0,
            filter_hierarchy: 0,
            task: TaskOffsets::zeroed(),
            root_memcg_id: 0,
            pins: 0,
            stacks: 0,
            kmalloc: K,
            cache_alloc: K,
            kfree_ptr: 0,
            cache_free_ptr: 0,
            _pad1: 0,
            gfp_account: 0,
            wakeup_bytes: 0,
            percpu: PercpuLayout {
                enabled: 0,
                alloc_size: 0,
                alloc_ptr: 0,
                free_ptr: 0,
                _pad: 0,
            },
        }
    }
}

/// mkdir / rmdir / release of a cgroup in the watched hierarchy.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CgroupEvent {
    pub kind: u32,
    pub root: u32,
    pub level: u32,
    pub tgid: u32,
    pub pid: u32,
    /// The acting task's parent tgid (0 when unknown).
    pub ppid: u32,
    pub id: u64,
    pub ts_ns: u64,
    pub comm: [u8; 16],
    pub path: [u8; PATH_LEN],
}

/// A charged (accounted) slab allocation by a task in a non-root memcg.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ChargeEvent {
    pub kind: u32,
    pub tgid: u32,
    pub pid: u32,
    /// `bpf_get_stack` result: bytes written or a negative errno.
    pub kstack_bytes: i32,
    pub ptr: u64,
    pub memcg_id: u64,
    pub ts_ns: u64,
    pub bytes_alloc: u64,
    pub call_site: u64,
    pub comm: [u8; 16],
    /// Cache name for kmem_cache_alloc where the record has one; empty for kmalloc.
    pub cache: [u8; CACHE_LEN],
    pub kstack: [u64; KSTACK],
}

/// A memcg css lifetime step seen by a kprobe (kernels that have kprobes).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CssEvent {
    pub kind: u32,
    pub _pad: u32,
    /// Id of the css's cgroup (kernfs id, as in the cgroup tracepoints).
    pub id: u64,
    pub ts_ns: u64,
}

/// The free of a tracked charged object.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct UnchargeEvent {
    pub kind: u32,
    pub _pad: u32,
    pub ptr: u64,
}

/// A per-CPU allocation with the kernel stack that made it: userspace keeps
/// those made inside `cgroup_mkdir` (the stack says so) for the cgroup the
/// same task's mkdir event names next.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PercpuAllocEvent {
    pub kind: u32,
    /// `bpf_get_stack` result: bytes written or a negative errno.
    pub kstack_bytes: i32,
    pub pid: u32,
    pub tgid: u32,
    pub ptr: u64,
    /// Bytes asked per CPU (`size`); the allocation costs this times the
    /// possible CPUs.
    pub size: u64,
    pub ts_ns: u64,
    pub kstack: [u64; KSTACK],
}

/// A per-CPU free (`EVENT_PERCPU_FREE`, `ptr`), or a mkdir in another
/// hierarchy (`EVENT_PERCPU_OTHER_MKDIR`, `pid`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PercpuFreeEvent {
    pub kind: u32,
    pub pid: u32,
    pub ptr: u64,
}

/// Reads of kernel memory asked for by userspace, run by `memcg_kread`
/// through `BPF_PROG_TEST_RUN` (the memcg walk: dying memcgs are on no
/// iterator, and this kernel may have no /proc/kcore).
pub const KREAD_SLOTS: usize = 64;
/// Bytes one slot reads at most (a power of two: the program masks lengths).
pub const KREAD_SLOT_BYTES: usize = 256;
/// Pointers a "follow" slot collects: it reads the u64 at `addr`, then at
/// that value, and so on (a list's `next` chain), stopping at `stop`.
pub const KREAD_FOLLOW: usize = KREAD_SLOT_BYTES / 8;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct KreadBatch {
    /// Requests in use (<= KREAD_SLOTS).
    pub n: u32,
    pub _pad: u32,
    /// Out: the running task (`bpf_get_current_task`): the reader itself.
    pub task: u64,
    pub addr: [u64; KREAD_SLOTS],
    /// 1..=KREAD_SLOT_BYTES.
    pub len: [u32; KREAD_SLOTS],
    /// Out: `bpf_probe_read_kernel` result per slot (0 or a negative errno);
    /// for a follow slot, the number of pointers collected.
    pub status: [i32; KREAD_SLOTS],
    /// 1: follow a `next` chain from `addr` instead of reading `len` bytes.
    pub follow: [u32; KREAD_SLOTS],
    /// Follow slots end when they read this value (the list head).
    pub stop: [u64; KREAD_SLOTS],
    pub data: [[u8; KREAD_SLOT_BYTES]; KREAD_SLOTS],
}

impl KreadBatch {
    pub const fn zeroed() -> Self {
        KreadBatch {
            n: 0,
            _pad: 0,
            task: 0,
            addr: [0; KREAD_SLOTS],
            len: [0; KREAD_SLOTS],
            status: [0; KREAD_SLOTS],
            follow: [0; KREAD_SLOTS],
            stop: [0; KREAD_SLOTS],
            data: [[0; KREAD_SLOT_BYTES]; KREAD_SLOTS],
        }
    }
}
