//! What the page tracepoints cannot tell at allocation time, settled at each
//! report by `/proc/kpageflags` (one u64 of `KPF_*` bits per pfn,
//! `include/uapi/linux/kernel-page-flags.h`): an unmovable block that became
//! a slab page or a page table is not the kernel's loose memory (`Slab` and
//! `PageTables` count it; `--cache` traces slab), and a tracked block found
//! in the buddy allocator or on an LRU list was freed without our seeing it
//! (a classic tracepoint program is skipped while another BPF program runs
//! on the CPU) and is in other hands now. Each is taken back from the counts
//! and said in the report's header.
//!
//! A pipe's or a socket's page carries none of these bits while held.

use std::{fs::File, os::unix::fs::FileExt, path::Path};

use crate::slab::{aggregator::Aggregator, report::PageClasses, session::Settle};

/// `KPF_*` bit numbers (stable ABI since 2.6.31; `KPF_PGTABLE` since 4.13).
const KPF_LRU: u32 = 5;
const KPF_SLAB: u32 = 7;
const KPF_BUDDY: u32 = 10;
const KPF_ANON: u32 = 12;
const KPF_PGTABLE: u32 = 26;

/// Why a tracked page leaves the counts; None: it stays.
fn classify(flags: u64) -> Option<fn(&mut PageClasses) -> &mut u64> {
    let has = |bit: u32| flags & (1 << bit) != 0;
    if has(KPF_SLAB) {
        Some(|c| &mut c.slab)
    } else if has(KPF_PGTABLE) {
        Some(|c| &mut c.page_table)
    } else if has(KPF_BUDDY) {
        Some(|c| &mut c.free_unseen)
    } else if has(KPF_LRU) || has(KPF_ANON) {
        Some(|c| &mut c.user)
    } else {
        None
    }
}

/// `/proc/kpageflags`, open for the run (root only).
pub struct PageFlags {
    file: File,
    classes: PageClasses,
}

impl PageFlags {
    pub fn open(root: &Path) -> std::io::Result<PageFlags> {
        Ok(PageFlags {
            file: File::open(root.join("proc/kpageflags"))?,
            classes: PageClasses::default(),
        })
    }

    /// Classifies every outstanding block by its first page and takes back
    /// those that are not the kernel's loose pages. Nearby pfns are read
    /// together (sorted, one read per 512-pfn run).
    fn sweep(&mut self, agg: &mut Aggregator) {
        let mut pfns = agg.outstanding_ptrs();
        pfns.sort_unstable();
        let mut unreadable = 0;
        let mut i = 0;
        while i < pfns.len() {
            let first = pfns[i];
            let mut end = i + 1;
            while end < pfns.len() && pfns[end] - first < 512 {
                end += 1;
            }
            let span = (pfns[end - 1] - first + 1) as usize;
            let mut buf = vec![0u8; span * 8];
            let read = first
                .checked_mul(8)
                .map(|off| self.file.read_exact_at(&mut buf, off));
            for &pfn in &pfns[i..end] {
                if !matches!(read, Some(Ok(()))) {
                    unreadable += 1;
                    continue;
                }
                let at = (pfn - first) as usize * 8;
                let mut word = [0u8; 8];
                word.copy_from_slice(&buf[at..at + 8]);
                if let Some(class) = classify(u64::from_ne_bytes(word)) {
                    if agg.exclude(pfn) {
                        *class(&mut self.classes) += 1;
                    }
                }
            }
            i = end;
        }
        self.classes.unreadable = unreadable;
    }
}

impl Settle for PageFlags {
    fn settle(&mut self, agg: &mut Aggregator) -> PageClasses {
        self.sweep(agg);
        self.classes.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slab_page_tables_free_and_user_pages_leave_held_pages_stay() {
        let mut c = PageClasses::default();
        for (flags, _) in [
            (1u64 << KPF_SLAB, "slab"),
            (1 << KPF_PGTABLE, "pgtable"),
            (1 << KPF_BUDDY, "buddy"),
            (1 << KPF_LRU | 1 << KPF_ANON, "anon"),
        ] {
            *classify(flags).expect("leaves")(&mut c) += 1;
        }
        assert_eq!((c.slab, c.page_table, c.free_unseen, c.user), (1, 1, 1, 1));
        // A held pipe page: no flag at all; a compound head alone (bit 15) neither.
        assert!(classify(0).is_none());
        assert!(classify(1 << 15).is_none());
    }
}
