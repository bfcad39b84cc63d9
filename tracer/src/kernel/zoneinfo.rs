//! `/proc/zoneinfo`: the pages waiting on the per-CPU free lists (`pagesets`).
//!
//! A page freed to a CPU's list (`free_unref_page` -> `free_frozen_page_commit` in
//! mm/page_alloc.c) stays off the zone's NR_FREE_PAGES until the list is drained back to
//! the buddy allocator, so it is in neither `MemFree` nor any other `/proc/meminfo` field.
//! `zoneinfo_show_print` (mm/vmstat.c) prints each list's length as `count:` in pages
//! (high-order lists count `1 << order` each) under every zone's `pagesets`, on every
//! kernel since 2.6.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// Reads `<root>/proc/zoneinfo` and returns the per-CPU free-list pages summed over every
/// zone and CPU.
pub fn read_pcp_free_pages(root: &Path) -> Result<u64> {
    let path = root.join("proc/zoneinfo");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    parse_pcp_free_pages(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Sum of the `count:` lines under each zone's `pagesets`, in pages.
pub fn parse_pcp_free_pages(text: &str) -> Result<u64> {
    let mut in_pagesets = false;
    let mut zones = 0usize;
    let mut pages = 0u64;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if line.starts_with("Node ") {
            zones += 1;
            in_pagesets = false;
        } else if trimmed == "pagesets" {
            in_pagesets = true;
        } else if in_pagesets {
            // Only the per-CPU blocks carry a `count:`; `vm stats threshold` and
            // `node_unreclaimable` between and after them do not.
            if let Some(rest) = trimmed.strip_prefix("count:") {
                let rest = rest.trim();
                let n: u64 = rest
                    .parse()
                    .with_context(|| format!("a pageset count '{rest}' is not a number"))?;
                pages = pages.saturating_add(n);
            }
        }
    }
    if zones == 0 {
        bail!("no 'Node N, zone NAME' line: not a zoneinfo file");
    }
    Ok(pages)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/proc")).join(name)
    }

    #[test]
    fn this_hosts_fixture_sums_every_cpu_of_every_zone() {
        // ledger-6.18: Normal zone, CPU 0 6195 + CPU 1 9721; DMA and DMA32 lists empty.
        assert_eq!(
            read_pcp_free_pages(&fixture("ledger-6.18")).unwrap(),
            15_916
        );
    }

    #[test]
    fn only_pageset_counts_are_summed() {
        // The 5.10 layout: `high`/`batch` per CPU, `vm stats threshold` after each CPU.
        let text = "Node 0, zone   Normal\n  pages free     100\n        count    7\n\
                    \x20 pagesets\n    cpu: 0\n              count: 12\n              high:  378\n\
                    \x20             batch: 63\n  vm stats threshold: 24\n    cpu: 1\n\
                    \x20             count: 30\n              high:  378\n\
                    \x20 vm stats threshold: 24\n  node_unreclaimable:  0\n\
                    Node 0, zone  Movable\n  pages free     0\n  pagesets\n    cpu: 0\n\
                    \x20             count: 5\n";
        assert_eq!(parse_pcp_free_pages(text).unwrap(), 47);
    }

    #[test]
    fn errors_are_named() {
        let err = parse_pcp_free_pages("MemTotal: 1 kB\n").unwrap_err();
        assert!(err.to_string().contains("not a zoneinfo file"), "{err}");
        let err =
            parse_pcp_free_pages("Node 0, zone DMA\n  pagesets\n    cpu: 0\n      count: x\n")
                .unwrap_err();
        assert!(err.to_string().contains("'x'"), "{err}");
        let err = read_pcp_free_pages(Path::new("/nonexistent-root")).unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent-root/proc/zoneinfo"));
    }
}
