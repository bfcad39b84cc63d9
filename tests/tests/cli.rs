//! Bad input and lifecycle: one clear line, a non-zero exit, nothing left attached.

use std::{os::unix::process::CommandExt, process::Command, time::Duration};

use leaktrace_tests::*;

#[test]
fn unknown_cache_suggests_near_names() {
    let (code, _, stderr) =
        run_leaktrace(&["--cache", "kmallok-512", "--duration", "1s"]).expect("run");
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("unknown slab cache 'kmallok-512'"),
        "{stderr}"
    );
    assert!(
        stderr.contains("kmalloc-512"),
        "suggestion missing: {stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "one clear line: {stderr}");
}

#[test]
fn bad_durations_are_refused_before_attaching() {
    for bad in ["10x", "0s", "-5s", "soon"] {
        let arg = format!("--duration={bad}");
        let (code, _, stderr) = run_leaktrace(&["--cache", "kmalloc-512", &arg]).expect("run");
        assert_eq!(code, 2, "{bad}: {stderr}");
        assert!(stderr.contains("--duration"), "{bad}: {stderr}");
        assert!(!stderr.contains("attached"), "{stderr}");
    }
    let (code, _, stderr) =
        run_leaktrace(&["--cache", "kmalloc-512", "--interval", "0ms"]).expect("run");
    assert_eq!(code, 2, "{stderr}");
}

#[test]
fn missing_cache_argument_says_what_to_do() {
    let (code, _, stderr) = run_leaktrace(&[]).expect("run");
    assert_eq!(code, 1);
    assert!(
        stderr.contains("--cache") && stderr.contains("leaktrace caches"),
        "{stderr}"
    );
}

#[test]
fn not_root_is_a_clear_error() {
    let out = Command::new(leaktrace_bin())
        .args(["--cache", "kmalloc-512", "--duration", "1s"])
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run as nobody");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("needs root"), "{stderr}");
}

#[test]
fn duration_ends_the_run_with_a_final_report_and_detaches() {
    let mut tracer = Tracer::start(&["--cache", "kmalloc-512", "--duration", "1s"]).expect("start");
    let ids = tracer.prog_ids.clone();
    let report = tracer
        .wait_for("the final report", Duration::from_secs(10), |r| {
            r["kind"] == "final"
        })
        .expect("final report");
    assert_eq!(report["schema_version"], 2);
    assert_eq!(report["cache"], "kmalloc-512");
    assert!(report["elapsed_s"].as_f64().is_some_and(|s| s >= 0.9));
    assert!(report["meminfo"]["slab_kb"]
        .as_u64()
        .is_some_and(|kb| kb > 0));
    assert!(report["slab"]["objsize"].as_u64() == Some(512), "{report}");
    assert_detached(&ids);
}

#[test]
fn plain_text_top_prints_the_header_and_columns() {
    let (code, stdout, stderr) = run_leaktrace(&[
        "--cache",
        "kmalloc-512",
        "--top",
        "--duration",
        "1500ms",
        "--interval",
        "500ms",
    ])
    .expect("run");
    assert_eq!(code, 0, "{stderr}");
    for want in [
        "cache kmalloc-512",
        "MemTotal",
        "SUnreclaim",
        "slabinfo kmalloc-512",
        "tracked since attach",
        "OUTSTANDING",
        "final report",
    ] {
        assert!(stdout.contains(want), "missing {want:?} in:\n{stdout}");
    }
    // Periodic snapshots are separated when stdout is not a terminal.
    assert!(stdout.matches("\n---\n").count() >= 2, "{stdout}");
    assert!(
        stderr.contains("hooks: ") && stderr.contains("kmalloc"),
        "{stderr}"
    );
}

#[test]
fn caches_lists_sizes_and_aliases() {
    let (code, stdout, stderr) = run_leaktrace(&["caches"]).expect("run");
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("kmalloc-512 ") || l.contains(" kmalloc-512 ")),
        "{stdout}"
    );
    // Before 5.14 (or with kmem accounting off) there are no kmalloc-cg-* caches
    // to list; listing one there would be a lie.
    assert_eq!(
        stdout.contains("kmalloc-cg-512"),
        slab_cache_exists("kmalloc-cg-512"),
        "{stdout}"
    );
}
