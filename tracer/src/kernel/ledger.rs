//! The kernel-memory ledger: every kernel bucket `/proc/meminfo` names, and the kernel
//! memory no field explains, at one instant and as growth between two instants.
//!
//! ```text
//! unexplained = MemTotal − MemFree − pcp free pages − (Active + Inactive + Unevictable)
//!             − Slab − (KReclaimable − SReclaimable) − PageTables − SecPageTables − Percpu
//!             − VmallocUsed − Hugetlb − Zswap − (KernelStack only without CONFIG_VMAP_STACK)
//! ```
//!
//! Why each term (fs/proc/meminfo.c, mm/page_alloc.c, mm/vmalloc.c, mm/percpu.c):
//! * `MemFree` is NR_FREE_PAGES, buddy pages only; pages on the per-CPU free lists are not
//!   in it, so they come from /proc/zoneinfo ([`super::zoneinfo`]).
//! * `Active`/`Inactive`/`Unevictable` are the LRU lists, anon (shmem/tmpfs included: it is
//!   swap-backed and lives on the anon lists) and file (`Buffers` and `Cached` are on them).
//! * `Slab` is SReclaimable + SUnreclaim; large kmalloc (`__kmalloc_large_node`) is charged
//!   to SUnreclaim. `KReclaimable` adds NR_KERNEL_MISC_RECLAIMABLE to SReclaimable.
//! * `VmallocUsed` is `vmalloc_nr_pages()`: pages vmalloc took, vmap stacks included, so
//!   with CONFIG_VMAP_STACK `KernelStack` is already inside it and is not subtracted again.
//! * `Hugetlb` is every hstate's pool (free huge pages too): taken from the buddy, not free.
//! * `Zswap` is the compressed pool's pages (zsmalloc/zpool pages from the page allocator).
//!
//! What stays in `unexplained`: pages pipes, sockets (skb frags, page_pool), drivers and
//! bulk allocations take straight from the page allocator, pages in transit (isolated for
//! migration or reclaim, in per-CPU LRU batches), balloon pages where the balloon leaves
//! MemTotal unchanged. Its level also carries boot-time offsets (Percpu counts its first
//! chunk, which memblock gave outside MemTotal; on kernels that defer struct-page init
//! MemTotal grows as deferred pages are freed): only its deltas are meaningful.

use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use crate::kernel::meminfo::{self, MemInfo};
use crate::kernel::zoneinfo;

/// Page size of the running kernel in KiB: zoneinfo counts pages.
fn page_kb() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let bytes = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(bytes).map_or(4, |b| (b / 1024).max(1))
}

/// One kernel bucket: a `/proc/meminfo` figure (or the residual), KiB.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Bucket {
    /// Stable key: the `bucket` label of `/metrics` and doctor's JSON.
    pub name: &'static str,
    /// The `/proc/meminfo` line(s) it comes from.
    pub field: &'static str,
    /// None when this kernel prints no such line.
    pub kb: Option<i64>,
}

/// Every kernel bucket at one instant. `buckets` holds the named ones, then
/// `unexplained` last.
#[derive(Debug, Clone, Serialize)]
pub struct Ledger {
    pub mem_total_kb: u64,
    pub mem_free_kb: u64,
    /// Pages on the per-CPU free lists, the mean of a zoneinfo read before and after the
    /// meminfo read; None when /proc/zoneinfo could not be read.
    pub pcp_free_kb: Option<u64>,
    /// How much the per-CPU lists moved between those two reads: the residual's
    /// uncertainty from not reading both files at one instant.
    pub pcp_spread_kb: u64,
    /// Active + Inactive + Unevictable.
    pub lru_kb: u64,
    /// CONFIG_VMAP_STACK: Some(true) puts KernelStack inside VmallocUsed; None unknown
    /// (then KernelStack is not subtracted and the residual may hold it).
    pub vmap_stack: Option<bool>,
    pub buckets: Vec<Bucket>,
    /// Terms of the formula this kernel does not print (taken as 0).
    pub missing: Vec<&'static str>,
}

/// The residual's key in [`Ledger::buckets`].
pub const UNEXPLAINED: &str = "unexplained";

impl Ledger {
    /// Builds the ledger from one meminfo read and the per-CPU free pages around it.
    pub fn from_parts(
        m: &MemInfo,
        pcp_pages: Option<(u64, u64)>,
        vmap_stack: Option<bool>,
    ) -> Ledger {
        let mut missing = Vec::new();
        let mut opt = |v: Option<u64>, field: &'static str| {
            if v.is_none() {
                missing.push(field);
            }
            v.map(|v| v as i64)
        };
        let kreclaimable_other = opt(m.kreclaimable_kb, "KReclaimable")
            .map(|k| k.saturating_sub(m.sreclaimable_kb as i64));
        let sec_page_tables = opt(m.sec_page_tables_kb, "SecPageTables");
        let percpu = opt(m.percpu_kb, "Percpu");
        let hugetlb = opt(m.hugetlb_kb, "Hugetlb");
        let zswap = opt(m.zswap_kb, "Zswap");
        let page_kb = page_kb();
        let pcp_free_kb = pcp_pages.map(|(a, b)| (a + b) / 2 * page_kb);
        let pcp_spread_kb = pcp_pages.map_or(0, |(a, b)| a.abs_diff(b) * page_kb);
        if pcp_pages.is_none() {
            missing.push("zoneinfo pagesets");
        }
        let lru_kb = m.active_kb + m.inactive_kb + m.unevictable_kb;
        let k = |v: u64| Some(v as i64);
        let mut buckets = vec![
            bucket("slab_unreclaimable", "SUnreclaim", k(m.sunreclaim_kb)),
            bucket("slab_reclaimable", "SReclaimable", k(m.sreclaimable_kb)),
            bucket(
                "kreclaimable_other",
                "KReclaimable - SReclaimable",
                kreclaimable_other,
            ),
            bucket("kernel_stack", "KernelStack", k(m.kernel_stack_kb)),
            bucket("page_tables", "PageTables", k(m.page_tables_kb)),
            bucket("sec_page_tables", "SecPageTables", sec_page_tables),
            bucket("percpu", "Percpu", percpu),
            bucket("vmalloc", "VmallocUsed", k(m.vmalloc_used_kb)),
            bucket("hugetlb", "Hugetlb", hugetlb),
            bucket("zswap", "Zswap", zswap),
        ];
        let explained: i64 = buckets
            .iter()
            .filter(|b| b.name != "kernel_stack" || vmap_stack == Some(false))
            .filter_map(|b| b.kb)
            .sum();
        let unexplained = m.mem_total_kb as i64
            - m.mem_free_kb as i64
            - pcp_free_kb.unwrap_or(0) as i64
            - lru_kb as i64
            - explained;
        buckets.push(bucket(UNEXPLAINED, "the residual", Some(unexplained)));
        Ledger {
            mem_total_kb: m.mem_total_kb,
            mem_free_kb: m.mem_free_kb,
            pcp_free_kb,
            pcp_spread_kb,
            lru_kb,
            vmap_stack,
            buckets,
            missing,
        }
    }

    /// Reads /proc/zoneinfo, /proc/meminfo, /proc/zoneinfo under `root`; a zoneinfo that
    /// cannot be read leaves the per-CPU lists out (named in `missing`).
    pub fn read(root: &Path, vmap_stack: Option<bool>) -> Result<Ledger> {
        let first = zoneinfo::read_pcp_free_pages(root);
        let m = meminfo::read(root)?;
        let second = zoneinfo::read_pcp_free_pages(root);
        let pcp = first.ok().zip(second.ok());
        Ok(Ledger::from_parts(&m, pcp, vmap_stack))
    }

    pub fn bucket(&self, name: &str) -> Option<&Bucket> {
        self.buckets.iter().find(|b| b.name == name)
    }

    /// The residual, KiB (negative when boot-time offsets outweigh it).
    #[cfg(test)]
    pub fn unexplained_kb(&self) -> i64 {
        self.bucket(UNEXPLAINED).and_then(|b| b.kb).unwrap_or(0)
    }
}

fn bucket(name: &'static str, field: &'static str, kb: Option<i64>) -> Bucket {
    Bucket { name, field, kb }
}

/// One bucket at both ends of a sample.
#[derive(Debug, Clone, Serialize)]
pub struct BucketGrowth {
    pub name: &'static str,
    pub field: &'static str,
    pub before_kb: Option<i64>,
    pub after_kb: Option<i64>,
    /// after − before; None when either end lacks the field.
    pub growth_kb: Option<i64>,
}

/// Every bucket's growth from `before` to `after`, in `after`'s order.
pub fn growth(before: &Ledger, after: &Ledger) -> Vec<BucketGrowth> {
    after
        .buckets
        .iter()
        .map(|a| {
            let before_kb = before.bucket(a.name).and_then(|b| b.kb);
            BucketGrowth {
                name: a.name,
                field: a.field,
                before_kb,
                after_kb: a.kb,
                growth_kb: before_kb.zip(a.kb).map(|(b, a)| a - b),
            }
        })
        .collect()
}

/// The ledger now and each bucket's growth since a baseline (the live header's
/// "since attach").
#[derive(Debug, Clone, Serialize)]
pub struct LedgerPicture {
    pub now: Ledger,
    pub since_s: f64,
    pub growth: Vec<BucketGrowth>,
}

impl LedgerPicture {
    pub fn new(now: Ledger, baseline: &Ledger, since_s: f64) -> LedgerPicture {
        let growth = growth(baseline, &now);
        LedgerPicture {
            now,
            since_s,
            growth,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/proc")).join(name)
    }

    fn kb(l: &Ledger, name: &str) -> Option<i64> {
        l.bucket(name).and_then(|b| b.kb)
    }

    #[test]
    fn residual_of_this_hosts_snapshot() {
        // ledger-6.18 (zoneinfo then meminfo, read together on this host):
        // 24683784 − 11054540 − 15916×4 − (4265952 + 8551724 + 16116) − 696712
        // − (621176 − 621176) − 2608 − 0 − 1024 − 14892 − 0 − 0 (KernelStack is in VmallocUsed).
        let l = Ledger::read(&fixture("ledger-6.18"), Some(true)).unwrap();
        assert_eq!(l.pcp_free_kb, Some(15_916 * 4));
        assert_eq!(l.pcp_spread_kb, 0);
        assert!(l.missing.is_empty(), "{:?}", l.missing);
        let m = meminfo::read(&fixture("ledger-6.18")).unwrap();
        let by_hand = m.mem_total_kb as i64
            - m.mem_free_kb as i64
            - 15_916 * 4
            - (m.active_kb + m.inactive_kb + m.unevictable_kb) as i64
            - m.slab_kb as i64
            - (m.kreclaimable_kb.unwrap() - m.sreclaimable_kb) as i64
            - m.page_tables_kb as i64
            - m.sec_page_tables_kb.unwrap() as i64
            - m.percpu_kb.unwrap() as i64
            - m.vmalloc_used_kb as i64
            - m.hugetlb_kb.unwrap() as i64
            - m.zswap_kb.unwrap() as i64;
        assert_eq!(l.unexplained_kb(), by_hand);
        assert_eq!(by_hand, 16_552);
        // Without VMAP_STACK the stacks are their own pages: subtracted once more.
        let separate = Ledger::read(&fixture("ledger-6.18"), Some(false)).unwrap();
        assert_eq!(
            separate.unexplained_kb(),
            by_hand - m.kernel_stack_kb as i64
        );
    }

    #[test]
    fn named_buckets_are_the_meminfo_figures() {
        let l = Ledger::read(&fixture("ledger-6.18"), Some(true)).unwrap();
        let m = meminfo::read(&fixture("ledger-6.18")).unwrap();
        let u = |v: u64| Some(v as i64);
        assert_eq!(kb(&l, "slab_unreclaimable"), u(m.sunreclaim_kb));
        assert_eq!(kb(&l, "slab_reclaimable"), u(m.sreclaimable_kb));
        assert_eq!(kb(&l, "kernel_stack"), u(m.kernel_stack_kb));
        assert_eq!(kb(&l, "page_tables"), u(m.page_tables_kb));
        assert_eq!(kb(&l, "percpu"), m.percpu_kb.map(|v| v as i64));
        assert_eq!(kb(&l, "vmalloc"), u(m.vmalloc_used_kb));
        assert_eq!(l.buckets.last().map(|b| b.name), Some(UNEXPLAINED));
    }

    #[test]
    fn old_kernel_lacks_fields_and_they_stay_absent() {
        // debian-5.10: no SecPageTables (6.0) nor Zswap (5.19) lines.
        let l = Ledger::read(&fixture("debian-5.10"), Some(true)).unwrap();
        assert_eq!(kb(&l, "sec_page_tables"), None);
        assert_eq!(kb(&l, "zswap"), None);
        assert_eq!(l.missing, ["SecPageTables", "Zswap", "zoneinfo pagesets"]);
        assert!(kb(&l, "percpu").is_some());
        let m = meminfo::read(&fixture("debian-5.10")).unwrap();
        assert_eq!(m.sec_page_tables_kb, None);
        assert_eq!(m.zswap_kb, None);
    }

    #[test]
    fn growth_is_after_minus_before() {
        let m = meminfo::read(&fixture("ledger-6.18")).unwrap();
        let before = Ledger::from_parts(&m, Some((1000, 1000)), Some(true));
        // 200 MiB of pipe pages: MemFree falls, no named bucket moves.
        let grown = MemInfo {
            mem_free_kb: m.mem_free_kb - 200 * 1024,
            percpu_kb: None,
            ..m
        };
        let after = Ledger::from_parts(&grown, Some((1000, 1010)), Some(true));
        assert_eq!(after.pcp_spread_kb, 40);
        let g = growth(&before, &after);
        let of = |name: &str| g.iter().find(|b| b.name == name).unwrap();
        assert_eq!(of(UNEXPLAINED).growth_kb, Some(200 * 1024 + 1024 - 20));
        assert_eq!(of("slab_unreclaimable").growth_kb, Some(0));
        // A field that vanished has no growth, not a fall to zero.
        assert_eq!(of("percpu").growth_kb, None);
    }
}
