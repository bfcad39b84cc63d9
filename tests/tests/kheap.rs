//! `leaktrace --all-caches`: every slab cache at once, sampled by bytes. A
//! leak made during the run, in a cache nobody named, comes out first with
//! its holders, and its in-use estimate is the truth within its error; a
//! churn of short-lived allocations in the same cache adds little. Needs
//! root; CI is root.

use std::{process::Command, time::Duration};

use leaktrace_tests::*;
use serde_json::Value;

/// 40,002 held 400-byte key payloads (kmalloc-512), three holders: one
/// process keyring holds at most 16,382 (see leakgen's MAX_KEYS).
const HOLDERS: usize = 3;
const KEYS_EACH: u64 = 13_334;
/// What the tool counts per object: `bytes_alloc`, the cache's object size.
const OBJECT_BYTES: u64 = 512;
/// 64 KiB between samples: ~8 samples per MB of 512-byte objects, ~320 on
/// the leak, so ±25% is more than 4 standard errors (the default 512 KiB
/// would give ~40, ±25% only ~1.6 of them).
const SAMPLE_BYTES: &str = "65536";

fn kheap(report: &Value) -> &Value {
    &report["kheap"]
}

#[test]
fn all_caches_names_a_leak_made_during_the_run_and_estimates_it() {
    if !kernel_has_btf() || !raw_tracepoint_described("kmem_cache_alloc") {
        eprintln!("skip: --all-caches needs the raw kmem tracepoints (BTF)");
        return;
    }
    let tracer = Tracer::start(&[
        "--all-caches",
        "--sample-bytes",
        SAMPLE_BYTES,
        "--duration",
        "8s",
    ])
    .expect("start leaktrace --all-caches");
    let mut churn = Command::new(leakgen_bin())
        .args(["writev", "6"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("writev churn");
    let holders: Vec<Generator> = (0..HOLDERS)
        .map(|_| Generator::start("keys", &KEYS_EACH.to_string()).expect("leakgen keys"))
        .collect();
    let pids: Vec<u32> = holders.iter().map(|g| g.pid).collect();
    let (code, report, stderr) = tracer.finish(Duration::from_secs(60)).expect("final");
    let _ = churn.wait();
    assert_eq!(code, 0, "{stderr:?}");
    let k = kheap(&report);
    assert_eq!(k["sample_bytes"].as_u64(), Some(65536), "{k}");
    let caches = k["caches"].as_array().expect("caches");
    assert_eq!(
        caches.first().and_then(|c| c["name"].as_str()),
        Some("kmalloc-512"),
        "the leak's cache first: {:?}",
        &caches[..caches.len().min(5)]
    );
    let rows = k["rows"].as_array().expect("rows");
    let first = rows.first().expect("a row");
    assert!(
        pids.contains(&(first["tgid"].as_u64().unwrap_or(0) as u32))
            && first["cache"] == "kmalloc-512",
        "a holder first: {first}, holders {pids:?}"
    );
    let held = |pid: u32| -> u64 {
        rows.iter()
            .filter(|r| r["tgid"].as_u64() == Some(u64::from(pid)) && r["cache"] == "kmalloc-512")
            .map(|r| count(r, "inuse_bytes"))
            .sum()
    };
    let estimate: u64 = pids.iter().map(|&p| held(p)).sum();
    let truth = HOLDERS as u64 * KEYS_EACH * OBJECT_BYTES;
    assert!(
        estimate.abs_diff(truth) * 4 <= truth,
        "in-use estimate {estimate} vs truth {truth} (±25%)"
    );
    let churned = held(churn.id());
    eprintln!(
        "kmalloc-512 first ({}); holders' in-use estimate {estimate} B vs {truth} B; \
         churn {churned} B; {} samples",
        caches[0], k["samples"]
    );
    assert!(
        churned <= 1 << 20,
        "the churn's short-lived allocations add {churned} bytes in use (≤ 1 MiB)"
    );
    assert_eq!(k["dropped"].as_u64(), Some(0), "{k}");
    drop(holders);
}
