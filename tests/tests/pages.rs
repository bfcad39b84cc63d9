//! `leaktrace --pages`: pages the kernel takes straight from the page
//! allocator (a pipe's buffers) are attributed to the process and the pipe
//! write path that took them, while page-cache writes and a slab-heavy churn
//! running at the same time add nothing; released pages are seen freed; bad
//! page filters fail before anything is attached. Needs root; CI is root.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use leaktrace_tests::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);
/// 20 pipes of 1 MiB: 5,120 pages of 4 KiB (`leakgen pipe-pages 20`).
const PIPES: u64 = 20;
const PAGES: u64 = PIPES * 256;

fn page_tracepoints() -> bool {
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .any(|t| {
            Path::new(t)
                .join("events/kmem/mm_page_alloc/format")
                .exists()
        })
}

/// Pages of `pid` on stacks through the pipe write path (`pipe_write`, or
/// `anon_pipe_write` since 6.15: the substring matches both).
fn on_pipe_write(report: &Value, pid: u32) -> u64 {
    outstanding_on(report, pid, "pipe_write", "")
}

fn held(report: &Value, pid: u32) -> u64 {
    process(report, pid).map_or(0, |p| count(p, "outstanding"))
}

#[test]
fn held_pipe_pages_are_named_and_page_cache_and_slab_churn_add_nothing() {
    skip_unless!(
        page_tracepoints(),
        "this kernel has no kmem:mm_page_alloc tracepoint"
    );
    skip_unless!(
        std::fs::metadata("/proc/kpageflags").is_ok(),
        "this kernel has no /proc/kpageflags (CONFIG_PROC_PAGE_MONITOR)"
    );
    let mut tracer = Tracer::start(&[
        "--pages",
        "--top",
        "--interval",
        "250ms",
        "--stacks",
        "20",
        "--ringbuf-mib",
        "64",
    ])
    .expect("start leaktrace --pages");
    // Noise while the pipes fill: 256 MiB of page cache on tmpfs (movable,
    // dropped in the kernel) and 5 s of transient kmalloc-512 (slab pages,
    // taken back by /proc/kpageflags).
    // A tmpfs of the test's own: the vm-test guests have no /dev/shm.
    let fs = Tmpfs::mount_sized("pages", 300);
    let file = fs.0.join("page-cache.dat").display().to_string();
    let mut dd = Command::new("dd")
        .args(["if=/dev/zero", &format!("of={file}"), "bs=1M", "count=256"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn dd");
    let churn = Generator::start("writev", "5").expect("leakgen writev 5");
    let mut gen = Generator::start("pipe-pages", &PIPES.to_string()).expect("leakgen pipe-pages");
    let pid = gen.pid;
    let report = tracer
        .wait_for("the held pipe pages", WAIT, |r| {
            on_pipe_write(r, pid) * 10 >= PAGES * 9
        })
        .expect("pipe pages under pipe_write");
    let p = process(&report, pid).expect("generator listed");
    assert!(
        count(p, "outstanding_bytes") >= 18 << 20,
        "≥ 18 MiB held: {p:#}"
    );
    let dd_pid = dd.id();
    let dd_ok = dd.wait().expect("dd").success();
    let _ = std::fs::remove_file(&file);
    assert!(dd_ok, "dd to {file} failed");
    let churn_pid = churn.pid;
    churn.finish().expect("leakgen writev");
    // Both have exited: whatever they still "held" would be a false leak.
    let report = tracer
        .wait_for(
            "page-cache writes (dd) and slab churn (leakgen writev) to hold nothing",
            Duration::from_secs(10),
            |r| held(r, dd_pid) == 0 && held(r, churn_pid) == 0,
        )
        .expect("the noise adds nothing");
    assert!(on_pipe_write(&report, pid) * 10 >= PAGES * 9);

    gen.release().expect("release the pipes");
    let report = tracer
        .wait_for("the pipe pages freed", WAIT, |r| {
            process(r, pid).is_some_and(|p| count(p, "frees") * 10 >= PAGES * 9)
                && on_pipe_write(r, pid) * 20 <= PAGES
        })
        .expect("pipe pages seen freed");
    let p = process(&report, pid).expect("generator listed");
    assert!(held(&report, pid) * 20 <= PAGES, "{p:#}");
    gen.finish().expect("leakgen pipe-pages");
    let ids = tracer.prog_ids.clone();
    let (code, _last) = tracer.stop(libc::SIGINT).expect("stop");
    assert_eq!(code, 0);
    assert_detached(&ids);
}

#[test]
fn bad_page_filters_fail_before_attaching() {
    let (code, _, err) =
        run_leaktrace(&["--pages", "--gfp", "__GFP_NO_SUCH_FLAG", "--duration", "1s"]).unwrap();
    assert_ne!(code, 0);
    assert!(
        err.contains("__GFP_NO_SUCH_FLAG") && err.contains("known:"),
        "{err}"
    );
    assert!(!err.contains("attached to"), "{err}");
    let (code, _, err) = run_leaktrace(&["--pages", "--order", "16"]).unwrap();
    assert_ne!(code, 0);
    assert!(err.contains("--order"), "{err}");
    let (code, _, err) = run_leaktrace(&["--order", "2", "--duration", "1s"]).unwrap();
    assert_ne!(code, 0);
    assert!(err.contains("--pages"), "{err}");
    let (code, _, err) = run_leaktrace(&["--pages", "--cache", "kmalloc-512"]).unwrap();
    assert_ne!(code, 0);
    assert!(err.contains("--cache"), "{err}");
}
