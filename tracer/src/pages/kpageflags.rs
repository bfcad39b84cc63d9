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
fn classify(flags: u64) -> Option<Leaves> {
    let has = |bit: u32| flags & (1 << bit) != 0;
    if has(KPF_SLAB) {
        Some(Leaves::NotOurs(|c| &mut c.slab))
    } else if has(KPF_PGTABLE) {
        Some(Leaves::NotOurs(|c| &mut c.page_table))
    } else if has(KPF_BUDDY) {
        Some(Leaves::Freed(|c| &mut c.free_unseen))
    } else if has(KPF_LRU) || has(KPF_ANON) {
        Some(Leaves::Freed(|c| &mut c.user))
    } else {
        None
    }
}

/// How a page leaves, with the header's counter it adds to.
#[derive(Clone, Copy)]
enum Leaves {
    /// A slab or page-table page: never the kernel's loose memory, retracted
    /// from the allocations as well.
    NotOurs(fn(&mut PageClasses) -> &mut u64),
    /// Back in the buddy allocator or in user hands: it was ours, and was
    /// freed. Its free event may still be in the ring buffer (the tracepoint
    /// fires before the page reaches the buddy lists), so it is taken back
    /// only if a second sweep finds it so again.
    Freed(fn(&mut PageClasses) -> &mut u64),
}

/// `/proc/kpageflags`, open for the run (root only).
pub struct PageFlags {
    file: File,
    classes: PageClasses,
    /// Blocks the last sweep found freed: taken back if this one does too.
    freed_last: std::collections::HashSet<u64>,
}

impl PageFlags {
    pub fn open(root: &Path) -> std::io::Result<PageFlags> {
        Ok(PageFlags {
            file: File::open(root.join("proc/kpageflags"))?,
            classes: PageClasses::default(),
            freed_last: std::collections::HashSet::new(),
        })
    }

    /// Classifies every outstanding block by its first page and takes back
    /// those that are not the kernel's loose pages. Nearby pfns are read
    /// together (sorted, one read per 512-pfn run).
    /// `drained`: every event the kernel sent has been read (the final
    /// report), so a freed block's free cannot still be on its way.
    fn sweep(&mut self, agg: &mut Aggregator, drained: bool) {
        let mut pfns = agg.outstanding_ptrs();
        pfns.sort_unstable();
        let mut unreadable = 0;
        let mut freed_now = std::collections::HashSet::new();
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
                match classify(u64::from_ne_bytes(word)) {
                    Some(Leaves::NotOurs(class)) if agg.exclude(pfn) => {
                        *class(&mut self.classes) += 1;
                    }
                    Some(Leaves::Freed(class))
                        if (drained || self.freed_last.contains(&pfn)) && agg.free_unseen(pfn) =>
                    {
                        *class(&mut self.classes) += 1;
                    }
                    Some(Leaves::Freed(_)) if !drained && !self.freed_last.contains(&pfn) => {
                        freed_now.insert(pfn);
                    }
                    _ => {}
                }
            }
            i = end;
        }
        self.classes.unreadable = unreadable;
        self.freed_last = freed_now;
    }
}

impl Settle for PageFlags {
    fn settle(&mut self, agg: &mut Aggregator, drained: bool) -> PageClasses {
        self.sweep(agg, drained);
        self.classes.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slab::decoder::Event;

    /// A /proc/kpageflags under a scratch root: `flags` by pfn, every other
    /// pfn up to `len` clear (a held page).
    struct FakeFlags {
        root: std::path::PathBuf,
        file: File,
    }

    impl FakeFlags {
        fn new(tag: &str, len: u64) -> FakeFlags {
            let root = std::env::temp_dir()
                .join(format!("leaktrace-kpageflags-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(root.join("proc")).expect("scratch root");
            let file = File::create(root.join("proc/kpageflags")).expect("kpageflags");
            file.set_len(len * 8).expect("length");
            FakeFlags { root, file }
        }

        fn set(&self, pfn: u64, flags: u64) {
            self.file
                .write_all_at(&flags.to_ne_bytes(), pfn * 8)
                .expect("write flags");
        }
    }

    impl Drop for FakeFlags {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }

    /// An aggregator holding one outstanding block at each of `pfns`.
    fn holding(pfns: &[u64]) -> Aggregator {
        use crate::slab::decoder::{
            decode,
            tests::{alloc_event, bytes, record_of},
        };
        let mut agg = Aggregator::new(10_000_000_000, 1);
        for &pfn in pfns {
            let ev = alloc_event(1, pfn, &[1, 2], &[3]);
            let words = record_of(&ev);
            let event = decode(bytes(&words, size_of_val(&ev))).expect("an allocation");
            agg.apply(&event);
        }
        agg
    }

    fn outstanding(agg: &Aggregator) -> Vec<u64> {
        let mut p = agg.outstanding_ptrs();
        p.sort_unstable();
        p
    }

    /// A block found free (buddy) or in user hands by one sweep may have
    /// its free event still in the ring buffer: it stays counted. Found so by
    /// two consecutive sweeps it is taken back as freed unseen; a sweep in
    /// between that finds it held again starts the count over. A slab page
    /// leaves at once. At the final report (everything drained) one sweep
    /// suffices.
    #[test]
    fn freed_blocks_leave_after_two_consecutive_sweeps_or_one_when_drained() {
        let (buddy, user, slab) = (
            1u64 << KPF_BUDDY,
            1u64 << KPF_LRU | 1 << KPF_ANON,
            1 << KPF_SLAB,
        );
        let fake = FakeFlags::new("sweeps", 4096);
        // 100: buddy; 101: user; 102: held; 103: slab; 104: buddy, held, buddy
        // again; 3000: buddy, in another 512-pfn read.
        for (pfn, flags) in [
            (100, buddy),
            (101, user),
            (103, slab),
            (104, buddy),
            (3000, buddy),
        ] {
            fake.set(pfn, flags);
        }
        let mut agg = holding(&[100, 101, 102, 103, 104, 3000]);
        let mut flags = PageFlags::open(&fake.root).expect("open");

        let c = flags.settle(&mut agg, false);
        assert_eq!((c.free_unseen, c.user, c.slab, c.unreadable), (0, 0, 1, 0));
        assert_eq!(
            outstanding(&agg),
            [100, 101, 102, 104, 3000],
            "one sweep: freed blocks stay"
        );

        fake.set(104, 0);
        let c = flags.settle(&mut agg, false);
        assert_eq!((c.free_unseen, c.user, c.slab), (2, 1, 1));
        assert_eq!(outstanding(&agg), [102, 104], "two sweeps: taken back");

        fake.set(104, buddy);
        let c = flags.settle(&mut agg, false);
        assert_eq!(
            c.free_unseen, 2,
            "free, held, free: not two consecutive sweeps"
        );
        assert_eq!(outstanding(&agg), [102, 104]);
        let c = flags.settle(&mut agg, false);
        assert_eq!(c.free_unseen, 3);
        assert_eq!(outstanding(&agg), [102]);

        // The final report: drained, one sweep takes a freed block back.
        let mut agg = holding(&[100, 101, 102]);
        let mut flags = PageFlags::open(&fake.root).expect("open");
        let c = flags.settle(&mut agg, true);
        assert_eq!((c.free_unseen, c.user), (1, 1));
        assert_eq!(outstanding(&agg), [102]);
        // Their kernel frees, if they come, are expected, not anomalies.
        let free = Event::Free(crate::slab::decoder::Free {
            tgid: 1,
            ptr: 100,
            bytes: 0,
        });
        agg.apply(&free);
        let opts = crate::slab::aggregator::rows::SnapshotOptions {
            sort: crate::slab::report::SortKey::Outstanding,
            limit: 10,
            stacks: 5,
            comm: None,
            pid: None,
        };
        let snap = agg.snapshot(0, &opts);
        assert_eq!(snap.anomalies.unmatched_frees, 0);
        assert_eq!(snap.anomalies.freed_unseen, 2);
    }

    #[test]
    fn slab_page_tables_free_and_user_pages_leave_held_pages_stay() {
        let mut c = PageClasses::default();
        for (flags, _) in [
            (1u64 << KPF_SLAB, "slab"),
            (1 << KPF_PGTABLE, "pgtable"),
            (1 << KPF_BUDDY, "buddy"),
            (1 << KPF_LRU | 1 << KPF_ANON, "anon"),
        ] {
            match classify(flags).expect("leaves") {
                Leaves::NotOurs(class) | Leaves::Freed(class) => *class(&mut c) += 1,
            }
        }
        assert_eq!((c.slab, c.page_table, c.free_unseen, c.user), (1, 1, 1, 1));
        // A held pipe page: no flag at all; a compound head alone (bit 15) neither.
        assert!(classify(0).is_none());
        assert!(classify(1 << 15).is_none());
    }
}
