//! The slab tracer's half of the contract: what its eBPF object selects
//! ([`Config`], filled by userspace before load) and the records it writes
//! ([`AllocHeader`], [`AllocEvent`], [`FreeEvent`]; their kinds are in the
//! crate root's one event-kind space).

use crate::{IrqContext, TaskOffsets};

pub mod programs;
#[cfg(feature = "user")]
pub mod user;

/// Deepest kernel stack we copy per allocation. 32 frames reach well past the
/// slab entry points into the syscall layer on every kernel we test.
pub const MAX_KSTACK: usize = 32;
/// Deepest user stack we copy per allocation (frame-pointer walk by the kernel).
pub const MAX_USTACK: usize = 32;
/// User frames (the entry ip and the first return addresses) hashed into every
/// selected allocation's user-path fingerprint. Deep enough to tell a retry loop
/// from a busy path that share a syscall wrapper (Go: `syscall.Syscall6` ->
/// `syscall.write` -> `os.(*File).Write` -> caller).
pub const FINGERPRINT_FRAMES: usize = 8;
/// Pointer slots per bucket of the slab object's lock-free live-object table:
/// one 32-byte bucket, so an insert or a free touches one cache line.
pub const LIVE_WAYS: usize = 4;
/// Named caches (slab aliases) the kernel side compares against `kmem_cache_alloc`'s `name`.
pub const MAX_CACHE_NAMES: usize = 8;
/// Bytes of a cache name we compare; slab names are far shorter than this.
pub const CACHE_NAME_LEN: usize = 32;

/// Which tracepoint produced an allocation.
pub const SOURCE_KMALLOC: u16 = 1;
pub const SOURCE_CACHE_ALLOC: u16 = 2;
/// `percpu:percpu_alloc_percpu` (the per-CPU source, `leaktrace --percpu`).
pub const SOURCE_PERCPU: u16 = 3;
/// `kmem:mm_page_alloc`, the page source (`leaktrace --pages`): the record's
/// `ptr` is the block's first pfn, `bytes_alloc` `PAGE_SIZE << order`.
pub const SOURCE_PAGE: u16 = 4;
/// Bytes of a page tracepoint's record read at once ([`PageConfig::alloc_span`]).
pub const PAGE_SPAN: usize = 40;
/// Block orders the page source keeps count of (`MAX_PAGE_ORDER` is 10 on
/// x86-64 and at most 15 on any architecture Linux has).
pub const PAGE_ORDERS: u32 = 16;

/// [`AllocHeader::flags`]: this allocation's stacks were drawn (captured) and
/// it may stand for its stratum in unbiased per-stack estimates. Whether or
/// not it was drawn, the header carries the probability it was drawn with
/// ([`draw_level`]), so userspace keeps exact counts per (stratum, level).
pub const FLAG_SAMPLED: u16 = 1;
/// The allocation was one of its stratum's first [`Config::census_allocs`] on
/// this CPU and so was drawn with probability 1 (level 0): a census of new
/// strata, so a path that allocates rarely is named by its first allocations.
pub const FLAG_CENSUS: u16 = 2;
/// The user fingerprint walk found no frame beyond the entry ip (no frame
/// pointers, or a kernel thread): the stratum cannot tell user paths apart.
pub const FLAG_SHALLOW: u16 = 4;
/// The stratum was being zoomed ([`ZoomSlot`]): userspace had raised its draw
/// probability, and the level in the flags is the zoomed one.
pub const FLAG_ZOOM: u16 = 8;
/// Bits 8..13 of [`AllocHeader::flags`]: the draw level `k`, the allocation
/// having been drawn with probability `1 / 2^k` (0: certainly).
pub const DRAW_LEVEL_SHIFT: u16 = 8;
pub const DRAW_LEVEL_MASK: u16 = 0x1f;

/// Budget windows of the census and zoom caps: `ts_ns >> BUDGET_WINDOW_SHIFT`
/// (2^27 ns, ~134 ms).
pub const BUDGET_WINDOW_SHIFT: u32 = 27;
/// Fixed point of [`Config::zoom_window_cap`].
pub const ZOOM_COST_SHIFT: u32 = 16;

/// The draw level carried in an allocation's flags; see [`DRAW_LEVEL_SHIFT`].
#[inline(always)]
pub const fn draw_level(flags: u16) -> u8 {
    ((flags >> DRAW_LEVEL_SHIFT) & DRAW_LEVEL_MASK) as u8
}

/// Slots of the per-CPU `SITES` table (strata seen lately, with their
/// census counts) and of the `ZOOM` table, both indexed by [`stratum_slot`].
pub const STRATUM_SLOTS: u32 = 1024;

/// The slot of a stratum (process, kernel call site, user fingerprint) in the
/// `SITES` and `ZOOM` tables: the kernel and userspace (which writes `ZOOM`)
/// must compute the same one.
#[inline(always)]
pub const fn stratum_slot(call_site: u64, fingerprint: u64, tgid: u32) -> u32 {
    let h = (call_site ^ fingerprint.rotate_left(21) ^ ((tgid as u64) << 40))
        .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (h >> 54) as u32 & (STRATUM_SLOTS - 1)
}

/// One entry of the slab object's `ZOOM` array, written by userspace only: while
/// `level_plus_one != 0`, allocations of this stratum are drawn with
/// probability `1 / 2^(level_plus_one - 1)` instead of the base rate. The
/// kernel records the level it used in each event, so a torn or stale entry
/// changes how often a stratum is drawn, never what an estimate means.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZoomSlot {
    pub call_site: u64,
    pub fingerprint: u64,
    pub tgid: u32,
    pub level_plus_one: u32,
}

/// Indexes into the slab object's per-CPU `COUNTERS` array.
pub mod counter {
    crate::counters! {
        /// Allocations that matched the selection.
        ALLOCS_MATCHED,
        /// Matched allocations dropped because the ring buffer was full.
        ALLOCS_LOST_RINGBUF,
        /// Matched allocations dropped because the live-object map was full.
        ALLOCS_LOST_MAP_FULL,
        /// Frees of tracked objects.
        FREES_MATCHED,
        /// Frees of tracked objects whose event could not be sent: userspace will
        /// over-report outstanding objects by this many.
        FREES_LOST_RINGBUF,
        /// Kernel stack capture failed (event still sent, with an empty stack).
        KSTACK_FAILED,
        /// User stack capture failed for a task that has a user address space.
        USTACK_FAILED,
        /// A selected object whose pointer fails `free_align_mask`: its free would be
        /// filtered out. Should be 0; nonzero means the alignment assumption is wrong.
        MISALIGNED,
        /// Drawn allocations of zoomed strata ([`super::FLAG_ZOOM`]), and the
        /// kernel time (ns) their stack captures took: what a zoom costs.
        ZOOM_DRAWN,
        ZOOM_STACK_NS,
        /// Page source: pages of a tracked block of order > 0 freed one part
        /// at a time (a split block: `split_page`, `alloc_pages_exact`).
        PAGE_PART_FREES,
        /// Page source: blocks taken back as a large kmalloc's (`kmem:kmalloc`
        /// right after their allocation, same task, same size).
        PAGE_KMALLOC_LARGE,
        /// Large kmallocs whose block could not be told (another block
        /// allocated in between on the CPU): each may leave one block counted.
        PAGE_KMALLOC_UNMATCHED,
        /// `--all-caches`: samples found still held at an address the
        /// allocator handed out again (their free fired no per-object event:
        /// bulk frees, sheaves), untracked then.
        KHEAP_STALE,
    }
}

/// Tracepoint field offsets for one kernel, read from tracefs `format` files.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocLayout {
    pub ptr: u16,
    pub bytes_req: u16,
    pub bytes_alloc: u16,
    pub gfp_flags: u16,
    /// `__data_loc char[] name`, or 0 when the kernel's record has no name.
    pub name: u16,
    pub call_site: u16,
    pub _pad: [u16; 2],
}

/// `percpu:percpu_alloc_percpu` and `percpu:percpu_free_percpu` field
/// offsets, from tracefs. The per-CPU source is on when `possible_cpus` is
/// not 0; an offset of 0 is a field this kernel's record lacks (the common
/// header occupies offset 0 of every record, so no real field sits there).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PercpuLayout {
    /// `size`: bytes of one CPU's copy.
    pub size: u16,
    /// `ptr`: the `__percpu` address the allocation returns and its free takes.
    pub ptr: u16,
    /// `call_site`, `gfp_flags`: 5.19+ (f67bed134a05); 0 before.
    pub call_site: u16,
    pub gfp_flags: u16,
    /// `ptr` in `percpu_free_percpu`.
    pub free_ptr: u16,
    pub _pad: [u16; 3],
    /// `num_possible_cpus()` (`/sys/devices/system/cpu/possible`): an
    /// allocation's bytes are `size` times this, on every kernel.
    pub possible_cpus: u64,
}

/// Class index of a kmalloc from its gfp flags; see [`Config::kmalloc_classes`].
#[inline(always)]
pub fn kmalloc_class(gfp: u64, cfg: &Config) -> u64 {
    ((gfp & cfg.gfp_dma != 0) as u64)
        | (((gfp & cfg.gfp_reclaimable != 0) as u64) << 1)
        | (((gfp & cfg.gfp_account != 0) as u64) << 2)
}

/// What the kernel side selects and how it reads records. Filled by userspace.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub kmalloc: AllocLayout,
    pub cache_alloc: AllocLayout,
    /// Offset of `ptr` in `kmem:kfree`.
    pub kfree_ptr: u16,
    /// Offset of `ptr` in `kmem:kmem_cache_free`.
    pub cache_free_ptr: u16,
    pub n_cache_names: u16,
    pub _pad: u16,
    /// kmalloc selection: `bytes_alloc == kmalloc_size` (0 disables kmalloc matching)
    /// and the allocation's kmalloc class is set in `kmalloc_classes`. The class index
    /// is `dma | reclaimable << 1 | account << 2`, from the gfp bits below; userspace
    /// decides which classes land in the selected cache on this kernel.
    pub kmalloc_size: u64,
    pub gfp_dma: u64,
    pub gfp_reclaimable: u64,
    pub gfp_account: u64,
    pub kmalloc_classes: u64,
    /// Named-cache selection on `kmem_cache_alloc`: `bytes_alloc == cache_size`
    /// first (cheap), then the name. 0 disables it.
    pub cache_size: u64,
    /// Frees whose pointer has any of these bits set cannot be a selected object
    /// (power-of-two caches align objects to their size), so they skip the map
    /// lookup. 0 disables the test.
    pub free_align_mask: u64,
    /// Offsets in `struct kmem_cache` (from BTF) for the raw `kmem_cache_alloc`
    /// program, whose arguments carry the cache pointer instead of size and name.
    pub kmem_cache_size_off: u16,
    pub kmem_cache_name_off: u16,
    /// 1: hash the first [`FINGERPRINT_FRAMES`] user frames of every selected
    /// allocation into its stratum key (`bpf_get_stack` with a short buffer).
    pub user_fingerprint: u32,
    /// Submit without waking the reader until this many bytes are waiting;
    /// userspace also polls on a short timer. 0 wakes on every event.
    pub wakeup_bytes: u64,
    /// Stack sampling within each stratum (process, kernel call site, user-path
    /// fingerprint): past its census, an allocation captures stacks when a
    /// fresh random draw `& mask == 0` ([`FLAG_SAMPLED`]); the mask is
    /// `2^base_level - 1`. 0 captures every allocation's stacks (`--exact`).
    pub stack_sample_mask: u64,
    /// `log2(stack_sample_mask + 1)`: the level of an ordinary draw.
    pub base_level: u32,
    /// The first this many allocations of a stratum on a CPU are drawn with
    /// probability 1 ([`FLAG_CENSUS`]); 0 turns the census off.
    pub census_allocs: u32,
    /// Census draws a CPU may make per budget window (`ts >> BUDGET_WINDOW_SHIFT`,
    /// ~134 ms); past it, census candidates are drawn as any other allocation.
    pub census_window_cap: u64,
    /// Expected zoomed draws all CPUs may make per budget window, in units of
    /// `2^-ZOOM_COST_SHIFT` draws (an allocation zoomed to level `k` costs
    /// `2^(ZOOM_COST_SHIFT - k)`); past it, zoomed strata fall back to the
    /// base level. Counted by allocation, not by draw, so which level an
    /// allocation gets never depends on earlier draws.
    pub zoom_window_cap: u64,
    /// Buckets in the slab object's `LIVE_SLOTS` table minus one (a power of
    /// two minus one, at least 1), or 0 where the kernel lacks BPF
    /// compare-and-swap (5.12+): then every live pointer goes to the `LIVE`
    /// hash map, through the `_nocas` programs.
    pub live_bucket_mask: u64,
    /// Only this tgid (0 = every process).
    pub target_tgid: u32,
    /// Bit 0: capture kernel stacks. Bit 1: capture user stacks.
    pub stack_flags: u32,
    /// NUL-padded names, as little-endian words so the kernel compares 8 bytes at a time.
    pub cache_names: [[u64; CACHE_NAME_LEN / 8]; MAX_CACHE_NAMES],
    /// How [`AllocHeader::cgroup_id`], `ppid` and `start_ns` are read. With
    /// `task_cgroups == 0` and `memcg_from_cgroup2 == 1` the cgroup is the
    /// cgroup2 id; with the walk it is the memory cgroup's kernfs id (v1).
    pub task: TaskOffsets,
    /// How the interrupt context of an allocation is read ([`AllocHeader::context`]).
    pub irq: IrqContext,
    /// The per-CPU source's fields; all 0 when it is off.
    pub percpu: PercpuLayout,
    /// The page source's selection and tracepoint layout; all zero (no
    /// order selected) when it is not the run's source.
    pub pages: PageConfig,
    /// `--all-caches`: every slab allocation drawn by its size; all zero
    /// (rate 0) otherwise.
    pub kheap: KheapConfig,
}

/// Size classes of [`KheapConfig::thresholds`]: sizes below
/// [`KHEAP_SMALL_LIMIT`] by 8 bytes, larger ones by 4 KiB.
pub const KHEAP_CLASSES: usize = 2048;
/// Below this, classes are 8 bytes wide (slab objects are 8-byte aligned).
pub const KHEAP_SMALL_LIMIT: u64 = 8192;

/// The byte sampler of `--all-caches`: an allocation of `size` bytes is
/// sampled when a fresh `bpf_get_prandom_u32()` is below
/// `thresholds[kheap_class(size)]`, i.e. with probability
/// `threshold / 2^32` ≈ 1 − e^(−size/rate) (BPF has no floating point;
/// userspace weighs each sample by the inverse of that same threshold, so
/// the estimate is unbiased whatever the rounding).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KheapConfig {
    /// Mean bytes between samples (`--sample-bytes`); 0: off.
    pub rate: u64,
    pub thresholds: [u32; KHEAP_CLASSES],
}

/// The class of an allocation of `size` bytes in [`KheapConfig::thresholds`]
/// (sizes past the last class share it).
#[inline(always)]
pub fn kheap_class(size: u64) -> usize {
    if size < KHEAP_SMALL_LIMIT {
        (size >> 3) as usize
    } else {
        let c = 1024 + (size >> 12);
        if c >= KHEAP_CLASSES as u64 {
            KHEAP_CLASSES - 1
        } else {
            c as usize
        }
    }
}

/// What the kernel stores for a sampled `kmem_cache_alloc`'s cache: a hash
/// of the first [`CACHE_NAME_LEN`] bytes of its name (NUL-padded, as
/// `bpf_probe_read_kernel_str` leaves them), which userspace matches against
/// /proc/slabinfo's names hashed the same way.
#[inline(always)]
pub fn cache_name_hash(words: &[u64; CACHE_NAME_LEN / 8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < CACHE_NAME_LEN / 8 {
        h = (h ^ words[i]).wrapping_mul(0x0000_0100_0000_01b3);
        h ^= h >> 29;
        i += 1;
    }
    h | 1
}

/// What the page source selects, filled from `kmem:mm_page_alloc`'s and
/// `kmem:mm_page_free`'s tracefs formats and the command line. Every test
/// here runs before any map or ring-buffer work: page traffic is mostly
/// movable (user, page cache) and is dropped at the cost of a few loads.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageConfig {
    /// Field offsets in `kmem:mm_page_alloc`.
    pub alloc_pfn: u16,
    pub alloc_order: u16,
    pub alloc_gfp: u16,
    pub alloc_migratetype: u16,
    /// Field offsets in `kmem:mm_page_free`.
    pub free_pfn: u16,
    pub free_order: u16,
    /// `PAGE_SHIFT` of the running kernel: a block is `1 << (page_shift + order)` bytes.
    pub page_shift: u16,
    /// Where the one read of each record starts ([`PAGE_SPAN`] bytes from
    /// it hold every field above): one helper call a record instead of one
    /// a field, on hooks that fire for every page the kernel allocates.
    pub alloc_span: u16,
    /// Bit `m` set: allocations of migratetype `m` are selected (the
    /// tracepoint's `migratetype`, from the gfp flags: 0 unmovable, 1
    /// movable, 2 reclaimable).
    pub migratetypes: u64,
    /// Bit `o` set: blocks of order `o` are selected. 0: the page source is off.
    pub orders: u64,
    /// Every one of these gfp bits must be set...
    pub gfp_all: u64,
    /// ...and none of these.
    pub gfp_none: u64,
    /// The largest kmalloc cache's object size: a `kmem:kmalloc` of more,
    /// a power of two, is a large kmalloc whose block is taken back. 0: off.
    pub kmalloc_max: u64,
    /// `kmem:kmalloc`'s `ptr` and `bytes_alloc` offsets (classic hook).
    pub kmalloc_ptr: u16,
    pub kmalloc_bytes_alloc: u16,
    pub free_span: u16,
    pub _pad2: u16,
    /// `__GFP_COMP`: a compound block is freed whole (`split_page` refuses
    /// compound pages), so only blocks without it need the block table.
    pub gfp_comp: u64,
    /// `sizeof(struct page)` from BTF when the raw page hooks run (their
    /// argument is `struct page *`: pfn = (page - [`PageCalibration`]'s
    /// base) / this); 0 with the classic hooks.
    pub struct_page_size: u64,
    /// log2 of [`Self::struct_page_size`] when a power of two (64 bytes on
    /// most configurations), so the pfn is a shift rather than a division on
    /// every page freed; 0 otherwise.
    pub struct_page_shift: u64,
}

/// Frees the calibration of the raw page hooks records ([`PageCalibration`]).
pub const CALIB_FREES: usize = 64;

/// The calibration of the raw page hooks: userspace frees pages whose pfns it
/// read from `/proc/self/pagemap`, the kernel records the `struct page *` of
/// each free made by the thread `pid_tgid`, and userspace solves for the
/// address of pfn 0's `struct page` (x86-64's `vmemmap_base`, moved by
/// KASLR and, without `CONFIG_KALLSYMS_ALL`, in no symbol table).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PageCalibration {
    /// The calibrating thread (`bpf_get_current_pid_tgid`); 0: record nothing.
    pub pid_tgid: u64,
    /// Frees recorded so far (at most [`CALIB_FREES`]).
    pub n: u64,
    pub pages: [u64; CALIB_FREES],
    pub orders: [u64; CALIB_FREES],
}

pub const STACK_KERNEL: u32 = 1;
pub const STACK_USER: u32 = 2;

impl Config {
    pub const fn zeroed() -> Self {
        const EMPTY: AllocLayout = AllocLayout {
            ptr: 0,
            bytes_req: 0,
            bytes_alloc: 0,
            gfp_flags: 0,
            name: 0,
            call_site: 0,
            _pad: [0; 2],
        };
        Config {
            kmalloc: EMPTY,
            cache_alloc: EMPTY,
            kfree_ptr: 0,
            cache_free_ptr: 0,
            n_cache_names: 0,
            _pad: 0,
            kmalloc_size: 0,
            gfp_dma: 0,
            gfp_reclaimable: 0,
            gfp_account: 0,
            kmalloc_classes: 0,
            cache_size: 0,
            free_align_mask: 0,
            kmem_cache_size_off: 0,
            kmem_cache_name_off: 0,
            user_fingerprint: 0,
            wakeup_bytes: 0,
            stack_sample_mask: 0,
            base_level: 0,
            census_allocs: 0,
            census_window_cap: 0,
            zoom_window_cap: 0,
            live_bucket_mask: 0,
            target_tgid: 0,
            stack_flags: 0,
            cache_names: [[0; CACHE_NAME_LEN / 8]; MAX_CACHE_NAMES],
            task: TaskOffsets::zeroed(),
            irq: IrqContext {
                task_cfs_rq: 0,
                cfs_rq_rq: 0,
                rq_cpu: 0,
                _pad: 0,
                preempt_delta: 0,
            },
            percpu: PercpuLayout {
                size: 0,
                ptr: 0,
                call_site: 0,
                gfp_flags: 0,
                free_ptr: 0,
                _pad: [0; 3],
                possible_cpus: 0,
            },
            pages: PageConfig {
                alloc_pfn: 0,
                alloc_order: 0,
                alloc_gfp: 0,
                alloc_migratetype: 0,
                free_pfn: 0,
                free_order: 0,
                page_shift: 0,
                alloc_span: 0,
                migratetypes: 0,
                orders: 0,
                gfp_all: 0,
                gfp_none: 0,
                kmalloc_max: 0,
                kmalloc_ptr: 0,
                kmalloc_bytes_alloc: 0,
                free_span: 0,
                _pad2: 0,
                gfp_comp: 0,
                struct_page_size: 0,
                struct_page_shift: 0,
            },
            kheap: KheapConfig {
                rate: 0,
                thresholds: [0; KHEAP_CLASSES],
            },
        }
    }
}

/// Fields every selected allocation carries across the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllocHeader {
    /// [`EVENT_ALLOC`](crate::EVENT_ALLOC) when stacks follow ([`AllocEvent`]),
    /// [`EVENT_ALLOC_NO_STACKS`](crate::EVENT_ALLOC_NO_STACKS) when they were
    /// not captured for this allocation (header only).
    pub kind: u32,
    pub tgid: u32,
    pub pid: u32,
    pub source: u16,
    /// [`FLAG_SAMPLED`], [`FLAG_CENSUS`], [`FLAG_ZOOM`], [`FLAG_SHALLOW`], and
    /// the draw level in bits [`DRAW_LEVEL_SHIFT`]..
    pub flags: u16,
    pub ptr: u64,
    pub ts_ns: u64,
    /// The requested size; for `--all-caches` samples from `kmem_cache_alloc`
    /// (whose raw arguments carry no requested size) the cache's
    /// [`cache_name_hash`] instead.
    pub bytes_req: u64,
    pub bytes_alloc: u64,
    pub gfp_flags: u64,
    pub cgroup_id: u64,
    /// The allocator's caller (`_RET_IP_`), part of the stratum key.
    pub call_site: u64,
    /// The user instruction pointer that entered the kernel, when fingerprints
    /// are on ([`Config::user_fingerprint`]); otherwise 0.
    pub user_ip: u64,
    /// Hash of the first [`FINGERPRINT_FRAMES`] user frames (0: none): with
    /// `tgid` and `call_site` it keys the stratum whose every object is counted.
    pub user_fingerprint: u64,
    /// The allocating process's start (`group_leader->start_time`, ns): with
    /// `tgid` it names one process even when its PID is reused. 0: unknown.
    pub start_ns: u64,
    /// The allocating task's parent process (`real_parent->tgid`) when this
    /// CPU last refreshed the task's facts (a new task on the CPU, not every
    /// allocation); 0 when unknown.
    pub ppid: u32,
    /// [`CONTEXT_KNOWN`](crate::CONTEXT_KNOWN) with
    /// [`CONTEXT_HARDIRQ`](crate::CONTEXT_HARDIRQ),
    /// [`CONTEXT_SOFTIRQ`](crate::CONTEXT_SOFTIRQ),
    /// [`CONTEXT_NMI`](crate::CONTEXT_NMI); 0 when the preempt count could not
    /// be read.
    pub context: u32,
    /// The memcg the task had set to be charged instead of its own
    /// (`current->active_memcg`, e.g. inotify charging an event to the
    /// watcher's group), as a cgroup id; 0 when none was set or unknown.
    pub charged_cgroup_id: u64,
}

/// A selected allocation with its stacks.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct AllocEvent {
    pub hdr: AllocHeader,
    /// `bpf_get_stack` results: bytes written, or a negative errno.
    pub kstack_bytes: i32,
    pub ustack_bytes: i32,
    pub comm: [u8; 16],
    pub kstack: [u64; MAX_KSTACK],
    pub ustack: [u64; MAX_USTACK],
}

/// The free of a tracked object.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FreeEvent {
    pub kind: u32,
    pub tgid: u32,
    pub ptr: u64,
    /// 0: the whole object is freed. Otherwise the bytes of a page block
    /// (the block whose first pfn is `ptr`) freed while the rest of it stays
    /// allocated: a block split after allocation is freed a page at a time.
    pub bytes: u64,
}
