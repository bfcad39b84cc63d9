//! The page source (`leaktrace --pages`): blocks the page allocator hands
//! out, selected by migratetype, order and gfp flags, through the slab
//! object's record path (`record`, `LIVE`, `on_free`) with the block's first
//! pfn as the pointer.
//!
//! A block of order > 0 may be split after allocation (`split_page`,
//! `alloc_pages_exact`) and then freed a page at a time at order 0, so its
//! frees are matched by pfn range: such blocks are also kept in `BLOCKS`
//! with the pages still allocated, asked only while any is tracked. Blocks
//! are naturally aligned (buddy allocator), so the block holding a pfn
//! starts at `pfn & !(2^k - 1)` for its order `k`: one lookup per order
//! that has tracked blocks.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
    programs::{RawTracePointContext, TracePointContext},
    EbpfContext,
};
use tracer_common::{
    slab::{counter, FreeEvent, PageCalibration, PAGE_ORDERS, PAGE_SPAN, SOURCE_PAGE},
    EVENT_FREE,
};

use super::{
    bump, config, on_free, read, record, take_up, taken_up_by_main, wakeup_flags, Site, EVENTS,
};

/// A tracked block of order > 0, by its first pfn.
#[repr(C)]
#[derive(Clone, Copy)]
struct Block {
    order: u64,
    /// Pages of it not yet freed.
    left: u64,
}

/// Sized by userspace with the live table.
#[map]
static BLOCKS: HashMap<u64, Block> = HashMap::with_max_entries(1 << 16, 0);

/// Tracked blocks per order (index 0: of every order), so a free asks
/// `BLOCKS` only at orders that have any, and not at all while it is empty:
/// the usual case, as compound blocks (slab pages, large kmallocs, page
/// frags) never enter it.
#[map]
static BLOCK_ORDERS: Array<u64> = Array::with_max_entries(PAGE_ORDERS, 0);

/// Tracked pages by region of 2^[`REGION_SHIFT`] pfns (a 2 MiB pageblock,
/// the unit the allocator assigns a migratetype to), folded into
/// [`REGIONS`] slots: a free in a region with nothing tracked returns after
/// one load, before the live table (megabytes, out of cache) is touched.
/// Unmovable blocks come from unmovable pageblocks, so the page-cache and
/// user frees that make up most page frees land in empty regions. Counted
/// up when an object is tracked, down when it is untracked: never zero
/// while a tracked page lies in the region (folded regions only add hits).
#[map]
static REGION_COUNTS: Array<u64> = Array::with_max_entries(REGIONS, 0);

const REGION_SHIFT: u32 = 9;
const REGIONS: u32 = 1 << 14;

#[inline(always)]
fn region_add(pfn: u64, delta: u64) {
    let index = ((pfn >> REGION_SHIFT) as u32) & (REGIONS - 1);
    if let Some(n) = REGION_COUNTS.get_ptr_mut(index) {
        tracer_ebpf::atomic_add(unsafe { &mut *n }, delta);
    }
}

#[inline(always)]
fn region_tracked(pfn: u64) -> bool {
    let index = ((pfn >> REGION_SHIFT) as u32) & (REGIONS - 1);
    REGION_COUNTS.get(index).is_none_or(|n| *n != 0)
}

/// The last pfn of a block of `order` at `pfn` when it lies in another
/// region (blocks larger than a region), so both regions count it.
#[inline(always)]
fn other_region_pfn(pfn: u64, order: u32) -> Option<u64> {
    let last = pfn + (1u64 << (order & 31)) - 1;
    (last >> REGION_SHIFT != pfn >> REGION_SHIFT).then_some(last)
}

/// The last block of order > 0 this CPU recorded, for [`page_kmalloc`].
#[repr(C)]
#[derive(Clone, Copy)]
struct LastBlock {
    pid_tgid: u64,
    /// 0: none (or already taken back).
    pfn: u64,
    order: u32,
    _pad: u32,
}

#[map]
static LAST_BLOCK: PerCpuArray<LastBlock> = PerCpuArray::with_max_entries(1, 0);

/// The direct map's base is aligned to at least this (x86-64 KASLR moves it
/// in 1 GiB steps; other architectures fix it higher).
const DIRECT_MAP_ALIGN: u64 = 1 << 30;

/// `kmem:kmalloc` of more than the largest kmalloc cache: a large kmalloc,
/// whose block `mm_page_alloc` reported just before on this CPU for this
/// task. Those pages are counted in `Slab` (`SUnreclaim`), so the block is
/// taken back, as a whole free. Its `ptr` is the block's direct-map
/// address, `page_offset_base + (pfn << PAGE_SHIFT)`: the base is unknown
/// (KASLR) but aligned, which a wrong block fails but for 1 in 2^18.
#[inline(always)]
pub(crate) fn page_kmalloc<const CAS: bool>(ptr: u64, bytes_alloc: u64) {
    let cfg = &config().pages;
    if cfg.kmalloc_max == 0 || bytes_alloc <= cfg.kmalloc_max || !bytes_alloc.is_power_of_two() {
        return;
    }
    let Some(last) = LAST_BLOCK.get_ptr_mut(0) else {
        return;
    };
    let last = unsafe { &mut *last };
    let shift = u64::from(cfg.page_shift);
    let matched = last.pfn != 0
        && last.pid_tgid == aya_ebpf::helpers::bpf_get_current_pid_tgid()
        && 1u64 << ((shift + u64::from(last.order)) & 63) == bytes_alloc
        && ptr.wrapping_sub(last.pfn << shift) & (DIRECT_MAP_ALIGN - 1) == 0;
    if !matched {
        bump(counter::PAGE_KMALLOC_UNMATCHED);
        return;
    }
    let (pfn, order) = (last.pfn, last.order);
    last.pfn = 0;
    if block_free::<CAS>(pfn, order).is_none() {
        untrack::<CAS>(pfn);
    }
    bump(counter::PAGE_KMALLOC_LARGE);
}

/// [`PAGE_SPAN`] bytes of a classic record, read with one helper call.
struct Span([u64; PAGE_SPAN / 8]);

impl Span {
    #[inline(always)]
    fn read(ctx: &TracePointContext, start: u16) -> Option<Span> {
        read::<[u64; PAGE_SPAN / 8]>(ctx, start).map(Span)
    }

    /// The field at record offset `offset`; userspace checked that it lies
    /// inside the span.
    #[inline(always)]
    fn field<T: Copy>(&self, offset: u16, start: u16) -> T {
        let at = (offset.wrapping_sub(start) as usize).min(PAGE_SPAN - core::mem::size_of::<T>());
        unsafe { core::ptr::read_unaligned(self.0.as_ptr().cast::<u8>().add(at).cast::<T>()) }
    }
}

/// `kmem:mm_page_alloc`, classic: selection first, on the record's own fields.
#[inline(always)]
pub(crate) fn page_alloc<const CAS: bool>(ctx: &TracePointContext) -> Option<()> {
    let cfg = &config().pages;
    if cfg.orders == 0 {
        return None;
    }
    let span = Span::read(ctx, cfg.alloc_span)?;
    let migratetype: i32 = span.field(cfg.alloc_migratetype, cfg.alloc_span);
    let order: u32 = span.field(cfg.alloc_order, cfg.alloc_span);
    // 4 bytes before 5.11's `unsigned long`; every gfp bit is in the low 32.
    let gfp = span.field::<u32>(cfg.alloc_gfp, cfg.alloc_span) as u64;
    if !selected(migratetype, order, gfp) {
        return None;
    }
    let pfn: u64 = span.field(cfg.alloc_pfn, cfg.alloc_span);
    // -1: the allocation failed.
    if pfn == u64::MAX {
        return None;
    }
    track::<CAS>(ctx.as_ptr(), pfn, order, gfp)
}

/// `mm_page_alloc(struct page *page, unsigned int order, gfp_t gfp_flags,
/// int migratetype)`, raw (userspace checked the order against BTF): the
/// selection reads the arguments alone, no helper call, so the movable
/// and page-cache traffic that makes up most allocations costs a few loads.
#[inline(always)]
pub(crate) fn page_alloc_raw<const CAS: bool>(ctx: &RawTracePointContext) -> Option<()> {
    let migratetype = ctx.arg::<u64>(3) as i32;
    let order = ctx.arg::<u64>(1) as u32;
    let gfp = ctx.arg::<u64>(2) & 0xffff_ffff;
    if !selected(migratetype, order, gfp) {
        return None;
    }
    // NULL: the allocation failed.
    let pfn = pfn_of(ctx.arg(0))?;
    track::<CAS>(ctx.as_ptr(), pfn, order, gfp)
}

/// Whether an allocation of `migratetype`, `order` and `gfp` is selected.
#[inline(always)]
fn selected(migratetype: i32, order: u32, gfp: u64) -> bool {
    let cfg = &config().pages;
    (0..64).contains(&migratetype)
        && (cfg.migratetypes >> migratetype) & 1 != 0
        && order < PAGE_ORDERS
        && (cfg.orders >> order) & 1 != 0
        && gfp & cfg.gfp_all == cfg.gfp_all
        && gfp & cfg.gfp_none == 0
}

/// The address of pfn 0's `struct page`: written by userspace from the
/// calibration ([`PAGE_CALIB`]) before the raw page hooks attach.
#[map]
static PAGE_BASE: Array<u64> = Array::with_max_entries(1, 0);

/// The pfn of `page`; None for NULL or before the base is known.
#[inline(always)]
fn pfn_of(page: u64) -> Option<u64> {
    let cfg = &config().pages;
    let base = *PAGE_BASE.get(0)?;
    if cfg.struct_page_size == 0 || base == 0 || page < base {
        return None;
    }
    // The frozen config leaves one of the two in the program.
    if cfg.struct_page_shift != 0 {
        return Some((page - base) >> (cfg.struct_page_shift & 63));
    }
    Some((page - base) / cfg.struct_page_size)
}

/// Filled by `page_calibrate` for userspace (`slab/page_base.rs`).
#[map]
static PAGE_CALIB: Array<PageCalibration> = Array::with_max_entries(1, 0);

/// `mm_page_free(struct page *page, unsigned int order)`, raw, while
/// userspace calibrates: the frees of the calibrating thread.
#[inline(always)]
pub(crate) fn page_calibrate(page: u64, order: u64) {
    let Some(c) = PAGE_CALIB.get_ptr_mut(0) else {
        return;
    };
    let c = unsafe { &mut *c };
    if c.pid_tgid == 0 || c.pid_tgid != aya_ebpf::helpers::bpf_get_current_pid_tgid() {
        return;
    }
    let n = c.n as usize;
    if let (Some(p), Some(o)) = (c.pages.get_mut(n), c.orders.get_mut(n)) {
        *p = page;
        *o = order;
        c.n = n as u64 + 1;
    }
}

/// A selected block: recorded, and counted by region (and, split-able, in
/// the block table).
#[inline(always)]
fn track<const CAS: bool>(
    ctx: *mut core::ffi::c_void,
    pfn: u64,
    order: u32,
    gfp: u64,
) -> Option<()> {
    let bytes = 1u64 << ((u32::from(config().pages.page_shift) + order) & 63);
    let site = Site {
        call_site: 0,
        ptr: pfn,
        bytes_req: bytes,
        bytes_alloc: bytes,
        gfp,
        source: SOURCE_PAGE,
    };
    record::<CAS>(ctx, &site, false)?;
    region_add(pfn, 1);
    if order > 0 && config().pages.kmalloc_max != 0 {
        if let Some(last) = LAST_BLOCK.get_ptr_mut(0) {
            unsafe {
                *last = LastBlock {
                    pid_tgid: aya_ebpf::helpers::bpf_get_current_pid_tgid(),
                    pfn,
                    order,
                    _pad: 0,
                }
            };
        }
    }
    // A compound block is freed whole, at its first pfn: `LIVE` finds it.
    if order > 0 && gfp & config().pages.gfp_comp == 0 {
        // Before alloc_pages returns: nobody can free the block yet.
        let block = Block {
            order: u64::from(order),
            left: 1 << order,
        };
        // A stale entry (its free went unseen) is replaced: this block is real.
        let stale = unsafe { BLOCKS.get(pfn) }.map(|b| b.order as u32);
        if BLOCKS.insert(pfn, block, 0).is_ok() {
            if let Some(old) = stale {
                count_order(old, u64::MAX);
            }
            count_order(order, 1);
            // Its parts are freed at their own pfns, past the first region.
            if let Some(last) = other_region_pfn(pfn, order) {
                region_add(last, 1);
            }
        }
    }
    Some(())
}

/// `kmem:mm_page_free`, classic: a whole block or, of a split block, one part.
#[inline(always)]
pub(crate) fn page_free<const CAS: bool>(ctx: &TracePointContext) -> Option<()> {
    let cfg = &config().pages;
    let span = Span::read(ctx, cfg.free_span)?;
    let pfn: u64 = span.field(cfg.free_pfn, cfg.free_span);
    if !region_tracked(pfn) {
        return None;
    }
    free::<CAS>(pfn, span.field(cfg.free_order, cfg.free_span));
    Some(())
}

/// `mm_page_free(struct page *page, unsigned int order)`, raw: the region
/// test first, after nothing but the pfn's arithmetic. A free nested in the
/// main program's run (an interrupt freeing pages while it runs) skips the
/// main program, and the spare takes it: a missed free of a tracked page
/// would be a phantom.
#[inline(always)]
pub(crate) fn page_free_raw<const CAS: bool>(
    ctx: &RawTracePointContext,
    seen: u32,
    spare: bool,
) -> Option<()> {
    let page: u64 = ctx.arg(0);
    if !spare {
        take_up(seen, page);
    }
    let pfn = pfn_of(page)?;
    if !region_tracked(pfn) || spare && taken_up_by_main(seen, page) {
        return None;
    }
    free::<CAS>(pfn, ctx.arg::<u64>(1) as u32);
    Some(())
}

#[inline(always)]
fn free<const CAS: bool>(pfn: u64, order: u32) {
    if block_free::<CAS>(pfn, order).is_none() {
        untrack::<CAS>(pfn);
    }
}

/// `on_free` and the region count with it.
#[inline(always)]
fn untrack<const CAS: bool>(pfn: u64) {
    if on_free::<CAS>(pfn) {
        region_add(pfn, u64::MAX);
    }
}

#[inline(always)]
fn count_order(order: u32, delta: u64) {
    for index in [0, order] {
        if let Some(n) = BLOCK_ORDERS.get_ptr_mut(index) {
            tracer_ebpf::atomic_add(unsafe { &mut *n }, delta);
        }
    }
}

/// The free of `2^order` pages at `pfn` against the tracked blocks of order
/// > 0; None: no tracked block holds it.
#[inline(always)]
fn block_free<const CAS: bool>(pfn: u64, order: u32) -> Option<()> {
    if BLOCK_ORDERS.get(0).is_none_or(|n| *n == 0) {
        return None;
    }
    let freed = 1u64 << (order & 31);
    let mut k: u32 = 1;
    while k < PAGE_ORDERS {
        if BLOCK_ORDERS.get(k).is_some_and(|n| *n != 0) {
            let first = pfn & !((1u64 << k) - 1);
            if let Some(block) = BLOCKS.get_ptr_mut(first) {
                let block = unsafe { &mut *block };
                if block.order == u64::from(k) && pfn + freed <= first + (1 << k) {
                    part_free::<CAS>(block, first, k, freed);
                    return Some(());
                }
            }
        }
        k += 1;
    }
    None
}

#[inline(always)]
fn part_free<const CAS: bool>(block: &mut Block, first: u64, order: u32, freed: u64) {
    // Two CPUs may free two parts at once: exactly one sees the last.
    let before = if CAS {
        // Eight lost races in a row: as the race below, left to kpageflags.
        let Some(before) = tracer_ebpf::fetch_sub(&mut block.left, freed) else {
            return;
        };
        before
    } else {
        // 5.10/5.11 (no fetch-add): a race between two parts' frees can
        // leave the block counted; userspace's /proc/kpageflags check drops
        // it once its first page is back in the buddy allocator.
        let before = block.left;
        block.left = before.wrapping_sub(freed);
        before
    };
    if before <= freed {
        if BLOCKS.remove(first).is_ok() {
            count_order(order, u64::MAX);
            if let Some(last) = other_region_pfn(first, order) {
                region_add(last, u64::MAX);
            }
        }
        untrack::<CAS>(first);
        return;
    }
    bump(counter::PAGE_PART_FREES);
    let Some(mut entry) = EVENTS.reserve::<FreeEvent>(0) else {
        bump(counter::FREES_LOST_RINGBUF);
        return;
    };
    let ev = entry.as_mut_ptr();
    unsafe {
        (*ev).kind = EVENT_FREE;
        (*ev).tgid = (aya_ebpf::helpers::bpf_get_current_pid_tgid() >> 32) as u32;
        (*ev).ptr = first;
        (*ev).bytes = freed << config().pages.page_shift;
    }
    entry.submit(wakeup_flags());
}
