//! The kernel-memory ledger over doctor's sample: every `/proc/meminfo` kernel bucket and
//! the residual no field explains (`kernel::ledger`), read at both ends of the window, and
//! the source that explains the bucket that grew.

use super::*;
use crate::kernel::ledger::{self, BucketGrowth, Ledger, UNEXPLAINED};

/// A named bucket must grow by this much over the window: the meminfo counters are
/// per-CPU-batched (vmstat drift is at most `stat_threshold` (≤ 125) pages per CPU per
/// counter, ~1 MiB on 2 CPUs), so 4 MiB is never drift alone.
pub(super) const BUCKET_MIN_GROWTH_KB: i64 = 4 * 1024;
/// The residual also moves with pages in transit (isolated for migration and reclaim,
/// per-CPU LRU batches) and with the per-CPU free lists racing our two files; it must grow
/// by this much plus the measured pcp spread of both reads.
pub(super) const UNEXPLAINED_MIN_GROWTH_KB: i64 = 32 * 1024;

#[derive(Debug, Clone, Serialize)]
pub struct LedgerData {
    pub elapsed_seconds: f64,
    /// Every bucket, unexplained last, at both ends of the window.
    pub buckets: Vec<BucketGrowth>,
    /// The bucket that grew past its threshold the most; None when none did.
    pub growing: Option<&'static str>,
    /// What a growing bucket must exceed (KiB): named buckets, and the residual (its
    /// floor plus both reads' per-CPU list spread). Both also need the slab check's rate
    /// (`growth_threshold_bytes_per_sec`).
    pub growth_threshold_kb: i64,
    pub unexplained_threshold_kb: i64,
    pub growth_threshold_bytes_per_sec: f64,
    /// The command that traces the growing bucket's source, when there is one.
    pub next_command: Option<String>,
    pub before: Ledger,
    pub after: Ledger,
}

/// What traces the allocations behind `bucket`. Slab names the cache doctor found
/// growing; vmalloc's bulk page allocation fires no allocation event, so its callers
/// come from /proc/vmallocinfo.
pub(super) fn source_for(bucket: &str, cache: Option<&str>) -> Option<String> {
    match bucket {
        "slab_unreclaimable" | "slab_reclaimable" => {
            cache.map(|c| format!("leaktrace --cache {c} --top"))
        }
        "percpu" => Some("leaktrace --percpu".to_string()),
        UNEXPLAINED | "page_tables" => Some("leaktrace --pages".to_string()),
        // Every kernel stack comes with a task_struct: trace who makes the tasks.
        "kernel_stack" => Some("leaktrace --cache task_struct --top".to_string()),
        "vmalloc" => Some("sort -k2 -n /proc/vmallocinfo | tail".to_string()),
        _ => None,
    }
}

pub fn ledger_finding(
    before: &Ledger,
    after: &Ledger,
    elapsed: Duration,
    cache: Option<&str>,
    rate_threshold_bytes_per_sec: f64,
) -> Finding {
    let secs = elapsed.as_secs_f64();
    let buckets = ledger::growth(before, after);
    let unexplained_threshold_kb =
        UNEXPLAINED_MIN_GROWTH_KB + (before.pcp_spread_kb + after.pcp_spread_kb) as i64;
    let threshold = |b: &BucketGrowth| {
        if b.name == UNEXPLAINED {
            unexplained_threshold_kb
        } else {
            BUCKET_MIN_GROWTH_KB
        }
    };
    let fast_enough =
        |kb: i64| secs > 0.0 && kb as f64 * 1024.0 / secs >= rate_threshold_bytes_per_sec;
    let grower = buckets
        .iter()
        .filter(|b| {
            b.growth_kb
                .is_some_and(|g| g >= threshold(b) && fast_enough(g))
        })
        .max_by_key(|b| b.growth_kb);
    let next_command = grower.and_then(|b| source_for(b.name, cache));
    let now = |name: &str| {
        buckets
            .iter()
            .find(|b| b.name == name)
            .and_then(|b| b.after_kb)
    };
    let summary = match grower {
        Some(b) => format!(
            "{} ({}) grew {} over {secs:.1}s to {}{}",
            label(b.name),
            b.field,
            delta_kb(b.growth_kb.unwrap_or(0)),
            signed_kb(b.after_kb.unwrap_or(0)),
            next_command
                .as_deref()
                .map(|c| format!(": {c}"))
                .unwrap_or_default()
        ),
        None => format!(
            "no kernel bucket grew by {} over {secs:.1}s (the residual by {}); unexplained {}, \
             SUnreclaim {}, Percpu {}",
            kb(BUCKET_MIN_GROWTH_KB as u64),
            kb(unexplained_threshold_kb as u64),
            signed_kb(now(UNEXPLAINED).unwrap_or(0)),
            now("slab_unreclaimable").map_or("?".to_string(), signed_kb),
            now("percpu").map_or("absent".to_string(), signed_kb),
        ),
    };
    let mut details = vec![format!(
        "{:<26} {:<28} {:>10} {:>11}",
        "kernel bucket", "/proc/meminfo", "now", "growth"
    )];
    for b in &buckets {
        let line = format!(
            "{:<26} {:<28} {:>10} {:>11}",
            label(b.name),
            b.field,
            b.after_kb.map_or("absent".to_string(), signed_kb),
            b.growth_kb.map_or("-".to_string(), delta_kb),
        );
        details.push(line.trim_end().to_string());
    }
    details.push(format!(
        "unexplained = MemTotal {} − MemFree {} − per-CPU free lists {} − LRU {} − the buckets above{}",
        kb(after.mem_total_kb),
        kb(after.mem_free_kb),
        after
            .pcp_free_kb
            .map_or("(unread)".to_string(), |p| format!("{} (±{})", kb(p), kb(after.pcp_spread_kb))),
        kb(after.lru_kb),
        match after.vmap_stack {
            Some(true) => " but KernelStack (inside VmallocUsed: CONFIG_VMAP_STACK)",
            Some(false) => "",
            None => " but KernelStack (CONFIG_VMAP_STACK unknown: it may be in the residual)",
        }
    ));
    if !after.missing.is_empty() {
        details.push(format!(
            "not printed by this kernel (taken as 0): {}",
            after.missing.join(", ")
        ));
    }
    details.push(
        "only the residual's growth is meaningful: its level carries boot-time offsets".to_string(),
    );
    Finding {
        check: "ledger",
        severity: if grower.is_some() {
            Severity::Warning
        } else {
            Severity::Ok
        },
        summary,
        details,
        data: Some(Data::Ledger(Box::new(LedgerData {
            elapsed_seconds: secs,
            growing: grower.map(|b| b.name),
            buckets,
            growth_threshold_kb: BUCKET_MIN_GROWTH_KB,
            unexplained_threshold_kb,
            growth_threshold_bytes_per_sec: rate_threshold_bytes_per_sec,
            next_command,
            before: before.clone(),
            after: after.clone(),
        }))),
    }
}

pub(super) fn label(bucket: &str) -> &'static str {
    match bucket {
        "slab_unreclaimable" => "slab, unreclaimable",
        "slab_reclaimable" => "slab, reclaimable",
        "kreclaimable_other" => "other reclaimable kernel",
        "kernel_stack" => "kernel stacks",
        "page_tables" => "page tables",
        "sec_page_tables" => "secondary page tables",
        "percpu" => "per-CPU",
        "vmalloc" => "vmalloc",
        "hugetlb" => "hugetlb pool",
        "zswap" => "zswap pool",
        UNEXPLAINED => "unexplained",
        _ => "other",
    }
}

pub(super) fn delta_kb(v: i64) -> String {
    if v < 0 {
        signed_kb(v)
    } else {
        format!("+{}", kb(v as u64))
    }
}

pub(super) fn signed_kb(v: i64) -> String {
    if v < 0 {
        format!("-{}", kb(v.unsigned_abs()))
    } else {
        kb(v as u64)
    }
}
