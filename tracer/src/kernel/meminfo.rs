//! `/proc/meminfo`: the totals and every kernel bucket the kernel names
//! (fs/proc/meminfo.c, `meminfo_proc_show`). Fields that older kernels or some configs do
//! not print are `Option`: `KReclaimable` (4.20), `Percpu` (4.19), `Hugetlb` (4.16,
//! CONFIG_HUGETLB_PAGE), `SecPageTables` (6.0), `Zswap` (5.19, CONFIG_ZSWAP).

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// Memory totals in KiB, as the kernel prints them; `None` where this kernel prints no such
/// line (never invented).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct MemInfo {
    pub mem_total_kb: u64,
    pub mem_free_kb: u64,
    pub mem_available_kb: u64,
    /// `Active`, `Inactive`, `Unevictable`: the LRU lists (anon incl. shmem, and file).
    pub active_kb: u64,
    pub inactive_kb: u64,
    pub unevictable_kb: u64,
    pub slab_kb: u64,
    pub sreclaimable_kb: u64,
    pub sunreclaim_kb: u64,
    /// `SReclaimable` plus NR_KERNEL_MISC_RECLAIMABLE.
    pub kreclaimable_kb: Option<u64>,
    pub kernel_stack_kb: u64,
    pub page_tables_kb: u64,
    pub sec_page_tables_kb: Option<u64>,
    pub percpu_kb: Option<u64>,
    /// Pages vmalloc allocated (`vmalloc_nr_pages()`; 0 before 5.7).
    pub vmalloc_used_kb: u64,
    pub hugetlb_kb: Option<u64>,
    pub zswap_kb: Option<u64>,
}

/// Reads `<root>/proc/meminfo`; `root` is `/` in production and a fixture tree in tests.
pub fn read(root: &Path) -> Result<MemInfo> {
    let path = root.join("proc/meminfo");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    parse(&text).with_context(|| format!("parsing {}", path.display()))
}

pub fn parse(text: &str) -> Result<MemInfo> {
    Ok(MemInfo {
        mem_total_kb: field(text, "MemTotal")?,
        mem_free_kb: field(text, "MemFree")?,
        mem_available_kb: field(text, "MemAvailable")?,
        active_kb: field(text, "Active")?,
        inactive_kb: field(text, "Inactive")?,
        unevictable_kb: field(text, "Unevictable")?,
        slab_kb: field(text, "Slab")?,
        sreclaimable_kb: field(text, "SReclaimable")?,
        sunreclaim_kb: field(text, "SUnreclaim")?,
        kreclaimable_kb: optional(text, "KReclaimable")?,
        kernel_stack_kb: field(text, "KernelStack")?,
        page_tables_kb: field(text, "PageTables")?,
        sec_page_tables_kb: optional(text, "SecPageTables")?,
        percpu_kb: optional(text, "Percpu")?,
        vmalloc_used_kb: field(text, "VmallocUsed")?,
        hugetlb_kb: optional(text, "Hugetlb")?,
        zswap_kb: optional(text, "Zswap")?,
    })
}

/// A field only some kernels print: absent is `None`, present but malformed an error.
fn optional(text: &str, key: &str) -> Result<Option<u64>> {
    match find(text, key) {
        None => Ok(None),
        Some(rest) => value(key, rest).map(Some),
    }
}

fn field(text: &str, key: &str) -> Result<u64> {
    match find(text, key) {
        Some(rest) => value(key, rest),
        None => bail!("missing field '{key}'"),
    }
}

fn find<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|line| {
        let (name, rest) = line.split_once(':')?;
        (name.trim() == key).then_some(rest)
    })
}

fn value(key: &str, rest: &str) -> Result<u64> {
    let mut parts = rest.split_whitespace();
    let value = parts
        .next()
        .with_context(|| format!("field '{key}' has no value"))?;
    let value: u64 = value
        .parse()
        .with_context(|| format!("field '{key}' has a non-numeric value '{value}'"))?;
    // Every field we read is printed in kB; anything else means a format we do not know.
    match parts.next() {
        None | Some("kB") => Ok(value),
        Some(unit) => bail!("field '{key}' has unexpected unit '{unit}'"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/proc")).join(name)
    }

    #[test]
    fn reads_this_hosts_meminfo_fixture() {
        let m = read(&fixture("host-6.18")).unwrap();
        assert!(m.mem_total_kb > 1024 * 1024, "{m:?}");
        assert!(m.mem_available_kb <= m.mem_total_kb);
        assert_eq!(m.slab_kb, m.sreclaimable_kb + m.sunreclaim_kb);
    }

    #[test]
    fn incident_node_is_mostly_unreclaimable_slab() {
        let m = read(&fixture("incident")).unwrap();
        assert_eq!(m.mem_total_kb, 64 * 1024 * 1024);
        assert_eq!(m.slab_kb, 61 * 1024 * 1024);
        assert_eq!(m.sunreclaim_kb, 58 * 1024 * 1024);
        assert_eq!(m.sreclaimable_kb, 3 * 1024 * 1024);
    }

    /// Every required field, one per line, in meminfo's order.
    const REQUIRED: &str = "MemTotal: 100 kB\nMemFree: 10 kB\nMemAvailable: 50 kB\n\
                            Active: 20 kB\nInactive: 20 kB\nUnevictable: 0 kB\nSlab: 3 kB\n\
                            SReclaimable: 1 kB\nSUnreclaim: 2 kB\nKernelStack: 1 kB\n\
                            PageTables: 1 kB\nVmallocUsed: 4 kB\n";

    #[test]
    fn missing_field_is_named() {
        let text = REQUIRED.replace("Slab: 3 kB\n", "");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.to_string(), "missing field 'Slab'");
        // The optional ones are absent, not invented.
        let m = parse(REQUIRED).unwrap();
        assert_eq!(
            (
                m.kreclaimable_kb,
                m.sec_page_tables_kb,
                m.percpu_kb,
                m.hugetlb_kb,
                m.zswap_kb
            ),
            (None, None, None, None, None)
        );
    }

    #[test]
    fn every_bucket_of_this_hosts_snapshot() {
        let m = read(&fixture("ledger-6.18")).unwrap();
        assert_eq!(m.mem_total_kb, 24_683_784);
        assert_eq!(m.mem_free_kb, 11_054_540);
        assert_eq!(
            (m.active_kb, m.inactive_kb, m.unevictable_kb),
            (4_265_952, 8_551_724, 16_116)
        );
        assert_eq!(m.kreclaimable_kb, Some(621_176));
        assert_eq!(m.kernel_stack_kb, 2_092);
        assert_eq!(m.page_tables_kb, 2_608);
        assert_eq!(m.sec_page_tables_kb, Some(0));
        assert_eq!(m.percpu_kb, Some(1_024));
        assert_eq!(m.vmalloc_used_kb, 14_892);
        assert_eq!((m.hugetlb_kb, m.zswap_kb), (Some(0), Some(0)));
    }

    #[test]
    fn field_name_must_match_exactly() {
        // "Slab" must not be satisfied by a line that merely starts with it.
        let text = REQUIRED.replace("Slab: 3 kB", "Slabby: 7 kB");
        assert!(parse(&text).is_err());
        // Nor "Active" by "Active(anon)".
        let text = REQUIRED.replace("Active: 20 kB", "Active(anon): 7 kB");
        assert!(parse(&text).is_err());
    }

    #[test]
    fn bad_value_and_unit_are_errors() {
        let err = parse(&REQUIRED.replace("MemTotal: 100 kB", "MemTotal: lots kB")).unwrap_err();
        assert!(err.to_string().contains("MemTotal"), "{err}");
        let err = parse(&REQUIRED.replace("MemTotal: 100 kB", "MemTotal: 100 MB")).unwrap_err();
        assert!(err.to_string().contains("unit 'MB'"), "{err}");
        let err = parse(&format!("{REQUIRED}Percpu: x kB\n")).unwrap_err();
        assert!(err.to_string().contains("Percpu"), "{err}");
    }

    #[test]
    fn read_error_names_the_path() {
        let err = read(Path::new("/nonexistent-root")).unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent-root/proc/meminfo"));
    }
}
