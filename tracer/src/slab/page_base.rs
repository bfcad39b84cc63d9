//! The address of pfn 0's `struct page`, which the raw page hooks need to
//! turn their `struct page *` argument into a pfn: `page = base + pfn ×
//! sizeof(struct page)` with `CONFIG_SPARSEMEM_VMEMMAP` (the plan checks it
//! in BTF). On x86-64 the base is `vmemmap_base`, moved by KASLR and in
//! `/proc/kallsyms` only with `CONFIG_KALLSYMS_ALL` (not on this host's
//! 6.18), so it is measured instead: this thread faults in [`PAGES`] pages,
//! reads their pfns from `/proc/self/pagemap` (root), unmaps them, and the
//! kernel side (`page_calibrate` on raw `mm_page_free`) records the
//! `struct page *` of every free this thread makes. Exactly one base must map
//! every known pfn onto a recorded free, or the calibration fails and the
//! caller falls back to the classic hooks, which carry the pfn.

use std::collections::BTreeSet;

use anyhow::{bail, Context, Result};
use aya::{
    maps::{Array, MapData},
    programs::RawTracePoint,
    Ebpf,
};
use tracer_common::slab::{programs::name as program, PageCalibration, CALIB_FREES};

use crate::bpf::load::{loaded, program};
use crate::slab::plan::{program_variant, Attachment, Hook};

/// Pages the calibration frees: enough that no base but the true one maps
/// them all onto recorded frees, few enough that their frees (and the page
/// tables' around them) fit [`CALIB_FREES`].
const PAGES: usize = 16;

/// Tries before giving up (a free can be made by another context, say a
/// per-CPU list drained elsewhere).
const TRIES: usize = 3;

/// Measures the base with the object's `page_calibrate_raw` and hands it to
/// the raw page hooks (`PAGE_BASE`). Errors say why it could not.
pub fn calibrate(ebpf: &mut Ebpf, struct_page: u64, live_slots: bool) -> Result<u64> {
    if struct_page == 0 {
        bail!("sizeof(struct page) is 0");
    }
    let name = program_variant(program::page_calibrate_raw, live_slots);
    let prog: &mut RawTracePoint = program(ebpf, name, "raw tracepoint")?;
    loaded(name, prog.load())?;
    prog.attach("mm_page_free")
        .context("attaching the calibration to raw tracepoint mm_page_free")?;
    let base = solve_with_retries(ebpf, struct_page);
    // Detaches it: nothing of the calibration runs during the trace.
    let prog: &mut RawTracePoint = program(ebpf, name, "raw tracepoint")?;
    prog.unload().context("unloading the page calibration")?;
    let base = base?;
    let mut out: Array<&mut MapData, u64> = Array::try_from(
        ebpf.map_mut("PAGE_BASE")
            .context("eBPF object has no PAGE_BASE map")?,
    )
    .context("PAGE_BASE is not an array")?;
    out.set(0, base, 0).context("writing PAGE_BASE")?;
    Ok(base)
}

fn solve_with_retries(ebpf: &mut Ebpf, struct_page: u64) -> Result<u64> {
    let mut last = None;
    for _ in 0..TRIES {
        let (pfns, frees) = record(ebpf)?;
        match solve(&pfns, &frees, struct_page) {
            Some(base) => return Ok(base),
            None => last = Some((pfns.len(), frees.len())),
        }
    }
    let (pfns, frees) = last.unwrap_or_default();
    bail!(
        "no single struct page base maps the {pfns} pfns this thread freed onto the {frees} \
         frees raw mm_page_free saw from it ({TRIES} tries)"
    )
}

/// `(struct page *, order)` of each free the kernel side recorded.
type Frees = Vec<(u64, u64)>;

/// One round: the pfns of [`PAGES`] freed pages and the frees this thread
/// made meanwhile.
fn record(ebpf: &mut Ebpf) -> Result<(Vec<u64>, Frees)> {
    let mut calib: Array<&mut MapData, PageCalibration> = Array::try_from(
        ebpf.map_mut("PAGE_CALIB")
            .context("eBPF object has no PAGE_CALIB map")?,
    )
    .context("PAGE_CALIB is not an array")?;
    // SAFETY: getpid/gettid have no memory effects.
    let (tgid, tid) = unsafe { (libc::getpid(), libc::gettid()) };
    let start = PageCalibration {
        pid_tgid: (u64::from(tgid as u32) << 32) | u64::from(tid as u32),
        n: 0,
        pages: [0; CALIB_FREES],
        orders: [0; CALIB_FREES],
    };
    calib.set(0, start, 0).context("writing PAGE_CALIB")?;
    // On one CPU: the unmap drains this CPU's LRU batch, which holds the
    // faulted pages, so their frees are this thread's.
    let pinned = OnThisCpu::pin();
    let pfns = fault_and_unmap();
    drop(pinned);
    let stop = PageCalibration {
        pid_tgid: 0,
        ..start
    };
    let seen = calib.get(&0, 0).context("reading PAGE_CALIB")?;
    calib.set(0, stop, 0).context("writing PAGE_CALIB")?;
    let n = (seen.n as usize).min(CALIB_FREES);
    let frees = seen.pages[..n]
        .iter()
        .copied()
        .zip(seen.orders[..n].iter().copied())
        .collect();
    Ok((pfns?, frees))
}

/// The pfns of [`PAGES`] anonymous pages, read before they are unmapped
/// (and so freed).
fn fault_and_unmap() -> Result<Vec<u64>> {
    // SAFETY: sysconf has no memory effects.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    let len = page * PAGES;
    // SAFETY: a fresh private anonymous mapping; checked for MAP_FAILED.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        bail!("mmap of {len} bytes: {}", std::io::Error::last_os_error());
    }
    // SAFETY: the mapping is ours, `len` bytes, writable; advice only.
    unsafe {
        libc::madvise(addr, len, libc::MADV_NOHUGEPAGE);
        for i in 0..PAGES {
            // Written, so each is a page of its own rather than the zero page.
            *addr.cast::<u8>().add(i * page) = 1 + i as u8;
        }
    }
    let pfns = pagemap_pfns(addr as usize / page, PAGES);
    // SAFETY: unmapping exactly what was mapped above.
    unsafe { libc::munmap(addr, len) };
    pfns
}

/// The pfns of `count` present pages from virtual page number `first`.
fn pagemap_pfns(first: usize, count: usize) -> Result<Vec<u64>> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open("/proc/self/pagemap").context("opening /proc/self/pagemap")?;
    let mut buf = vec![0u8; count * 8];
    file.read_exact_at(&mut buf, (first * 8) as u64)
        .context("reading /proc/self/pagemap")?;
    let mut out = Vec::with_capacity(count);
    for entry in buf.chunks_exact(8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(entry);
        let entry = u64::from_le_bytes(word);
        // Bit 63: present; bits 0-54: the pfn, zero without CAP_SYS_ADMIN.
        let pfn = entry & ((1 << 55) - 1);
        if entry >> 63 == 0 || pfn == 0 {
            bail!("/proc/self/pagemap shows no pfn for a faulted page (CAP_SYS_ADMIN needed)");
        }
        out.push(pfn);
    }
    Ok(out)
}

/// The base for which every pfn in `pfns` lies in a recorded free, `(page,
/// order)`, of `2^order` pages at pfn `(page - base) / struct_page`; None
/// unless exactly one base does. Other frees (page tables, an interrupt's)
/// may be among `frees`.
pub fn solve(pfns: &[u64], frees: &[(u64, u64)], struct_page: u64) -> Option<u64> {
    let known: BTreeSet<u64> = pfns.iter().copied().collect();
    let candidates: BTreeSet<u64> = frees
        .iter()
        .flat_map(|&(page, _)| {
            known
                .iter()
                .filter_map(move |&pfn| page.checked_sub(pfn.checked_mul(struct_page)?))
        })
        .collect();
    let covers = |base: u64| {
        known.iter().all(|&pfn| {
            frees.iter().any(|&(page, order)| {
                let Some(off) = page.checked_sub(base) else {
                    return false;
                };
                let first = off / struct_page;
                off % struct_page == 0 && order < 16 && (first..first + (1 << order)).contains(&pfn)
            })
        })
    };
    let mut fits = candidates.into_iter().filter(|&b| b != 0 && covers(b));
    match (fits.next(), fits.next()) {
        (Some(base), None) if !known.is_empty() => Some(base),
        _ => None,
    }
}

/// The raw page hooks' classic twins, for a run whose calibration failed:
/// the classic tracepoints carry the pfn itself.
pub fn to_classic(attachments: &mut Vec<Attachment>) {
    // Classic tracepoints have no recursion guard to make up for.
    attachments.retain(|a| a.program != program::page_free_raw_spare);
    for a in attachments.iter_mut() {
        let twin = match a.program {
            program::page_alloc_raw => program::page_alloc,
            program::page_free_raw => program::page_free,
            _ => continue,
        };
        *a = Attachment {
            program: twin,
            hook: Hook::Classic,
            system: "kmem",
            event: a.event,
        };
    }
}

/// This thread on the CPU it runs on until dropped, then on its old CPUs.
struct OnThisCpu(Option<libc::cpu_set_t>);

impl OnThisCpu {
    fn pin() -> OnThisCpu {
        // SAFETY: cpu_set_t is plain data; the calls write at most its size.
        unsafe {
            let mut old: libc::cpu_set_t = std::mem::zeroed();
            let size = std::mem::size_of::<libc::cpu_set_t>();
            let cpu = libc::sched_getcpu();
            if cpu < 0 || libc::sched_getaffinity(0, size, &mut old) != 0 {
                return OnThisCpu(None);
            }
            let mut one: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu as usize, &mut one);
            if libc::sched_setaffinity(0, size, &one) != 0 {
                return OnThisCpu(None);
            }
            OnThisCpu(Some(old))
        }
    }
}

impl Drop for OnThisCpu {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            // SAFETY: restores the mask read in `pin`.
            unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), old) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{solve, to_classic};
    use crate::slab::plan::{Attachment, Hook};
    use tracer_common::slab::programs::name as program;

    /// A failed calibration moves both page hooks, and nothing else, to
    /// their classic twins on the same events; the free's spare goes.
    #[test]
    fn the_fallback_swaps_only_the_raw_page_hooks() {
        let raw = |program, event| Attachment {
            program,
            hook: Hook::Raw,
            system: "kmem",
            event,
        };
        let mut a = vec![
            raw(program::page_alloc_raw, "mm_page_alloc"),
            raw(program::page_free_raw, "mm_page_free"),
            raw(program::page_free_raw_spare, "mm_page_free"),
            raw(program::page_kmalloc_raw, "kmalloc"),
        ];
        to_classic(&mut a);
        let got: Vec<_> = a.iter().map(|a| (a.program, a.hook, a.event)).collect();
        assert_eq!(
            got,
            [
                (program::page_alloc, Hook::Classic, "mm_page_alloc"),
                (program::page_free, Hook::Classic, "mm_page_free"),
                (program::page_kmalloc_raw, Hook::Raw, "kmalloc"),
            ]
        );
    }

    const BASE: u64 = 0xffff_ea00_0000_0000;

    /// Contiguous pfns (as a per-CPU list hands them out) with a page
    /// table's free among them: only the true base covers all 16, not one
    /// shifted by a page.
    #[test]
    fn the_one_base_that_maps_every_pfn_onto_a_free() {
        let pfns: Vec<u64> = (0x12340..0x12350).collect();
        let mut frees: Vec<(u64, u64)> = pfns.iter().rev().map(|p| (BASE + p * 64, 0)).collect();
        frees.push((BASE + 0x999 * 64, 0));
        assert_eq!(solve(&pfns, &frees, 64), Some(BASE));
    }

    #[test]
    fn a_missing_free_or_a_large_folio() {
        let pfns: Vec<u64> = (0x12340..0x12350).collect();
        // One free went unseen: no base covers every pfn.
        let frees: Vec<(u64, u64)> = pfns[1..].iter().map(|p| (BASE + p * 64, 0)).collect();
        assert_eq!(solve(&pfns, &frees, 64), None);
        // Four 16 KiB folios (mTHP) free the same pages at order 2.
        let frees: Vec<(u64, u64)> = (0..4).map(|i| (BASE + (0x12340 + 4 * i) * 64, 2)).collect();
        assert_eq!(solve(&pfns, &frees, 64), Some(BASE));
        // Nothing recorded.
        assert_eq!(solve(&pfns, &[], 64), None);
    }
}
