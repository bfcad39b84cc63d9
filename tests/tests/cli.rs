//! Bad input and lifecycle: one clear line, a non-zero exit, nothing left attached.

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use leaktrace_tests::*;

// Tests here that look for a held object's user frames in the default mode
// pass `--stack-sample 4`: their subject is not the sampling, and at 1 in 4 the
// chance that none of 150 held objects is drawn (leaving them under the call
// site only, marked partial) is (3/4)^150 ≈ 2e-19.

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
    assert_eq!(report["schema_version"], 3);
    assert_eq!(report["cache"], "kmalloc-512");
    assert!(report["elapsed_s"].as_f64().is_some_and(|s| s >= 0.9));
    assert!(report["meminfo"]["slab_kb"]
        .as_u64()
        .is_some_and(|kb| kb > 0));
    assert!(report["slab"]["objsize"].as_u64() == Some(512), "{report}");
    // The ledger's last bucket is the residual, with its growth since attach.
    let growth = report["ledger"]["growth"]
        .as_array()
        .expect("ledger growth");
    assert_eq!(
        growth.last().map(|b| &b["name"]),
        Some(&"unexplained".into())
    );
    assert!(growth.iter().all(|b| b["name"] == "unexplained"
        || b["after_kb"].is_null()
        || b["after_kb"].as_i64().is_some_and(|kb| kb >= 0)));
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
        "kernel memory (growth since attach",
        "unexplained",
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

/// Exit 1, the message, one line, nothing attached, and no bpf() needed to
/// get there (see `run_leaktrace_without_bpf`).
fn refused_before_loading(args: &[&str], wants: &[&str]) {
    let (code, stdout, stderr) = run_leaktrace_without_bpf(args).expect("run");
    assert_eq!(code, 1, "{args:?}: {stderr}");
    for want in wants {
        assert!(
            stderr.contains(want),
            "{args:?}: missing {want:?} in {stderr}"
        );
    }
    assert_eq!(stderr.lines().count(), 1, "one clear line: {stderr}");
    assert!(!stderr.contains("attached"), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
}

#[test]
fn unwritable_outputs_are_refused_before_anything_is_loaded() {
    for flag in ["--pprof", "--folded", "--flamegraph"] {
        refused_before_loading(
            &[
                "--cache",
                "kmalloc-512",
                "--duration",
                "2s",
                flag,
                "/nonexistent/x.out",
            ],
            &[
                flag,
                "/nonexistent/x.out",
                "cannot create files in /nonexistent",
            ],
        );
    }
    refused_before_loading(
        &["--cache", "kmalloc-512", "--json", "--folded", "/proc/x"],
        &["--folded /proc/x", "cannot create files in /proc"],
    );
    refused_before_loading(
        &["--cache", "kmalloc-512", "--pprof", "/tmp"],
        &["--pprof /tmp", "is a directory"],
    );
    let same = std::env::temp_dir().join(format!("leaktrace-same-{}", std::process::id()));
    let same = same.to_str().expect("utf-8");
    refused_before_loading(
        &["--cache", "kmalloc-512", "--pprof", same, "--folded", same],
        &["--pprof and --folded both name"],
    );
    // The control: with outputs that are fine, the same filter stops the run at
    // its first bpf() call, so the refusals above happened before any.
    let (code, _, stderr) =
        run_leaktrace_without_bpf(&["--cache", "kmalloc-512", "--duration", "1s"]).expect("run");
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("failed to create map") && stderr.contains("bpf() was refused"),
        "the filter should stop a valid run at its first map: {stderr}"
    );
}

#[test]
fn metrics_address_is_checked_and_bound_before_anything_is_loaded() {
    let (code, _, stderr) =
        run_leaktrace(&["--cache", "kmalloc-512", "--metrics", "999.1.1.1:80"]).expect("run");
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("--metrics") && stderr.contains("IP:PORT"),
        "{stderr}"
    );
    let busy = std::net::TcpListener::bind("127.0.0.1:0");
    // vm-test guests boot without bringing the loopback interface up.
    skip_unless!(
        busy.is_ok() || std::env::var_os("LEAKTRACE_VM_GUEST").is_none(),
        "no loopback interface in this vm-test guest to hold a port busy"
    );
    let busy = busy.expect("a port on loopback");
    let addr = busy.local_addr().expect("addr").to_string();
    refused_before_loading(
        &["--cache", "kmalloc-512", "--metrics", &addr],
        &["--metrics", &addr, "in use"],
    );
}

#[test]
fn numeric_options_have_ranges_with_clear_messages() {
    let cases: &[(&[&str], &str)] = &[
        (&["--max-objects", "0"], "1..=67108864"),
        (&["--max-objects", "99999999999"], "--max-objects"),
        (&["--ringbuf-mib", "0"], "1..=1024"),
        (&["--ringbuf-mib", "4096"], "1..=1024"),
        (&["--interval", "1ms"], "use 50ms to 1h"),
        (&["--interval", "2h"], "use 50ms to 1h"),
        (&["--stack-sample", "3"], "not a power of two"),
        (&["--stack-sample", "1048576"], "more than 65536"),
        (&["--pid", "0"], "--pid"),
    ];
    for (bad, want) in cases {
        let args = [&["--cache", "kmalloc-512"][..], bad].concat();
        let (code, _, stderr) = run_leaktrace(&args).expect("run");
        assert_eq!(code, 2, "{bad:?}: {stderr}");
        assert!(stderr.contains(bad[0]), "{bad:?}: {stderr}");
        assert!(
            stderr.contains(want),
            "{bad:?}: missing {want:?} in {stderr}"
        );
    }
    let memcg: &[(&[&str], &str)] = &[
        (&["--zombie-after", "10ms"], "use 100ms to 168h"),
        (&["--max-objects", "0"], "1..=67108864"),
        (&["--ringbuf-mib", "0"], "1..=1024"),
        (&["--interval", "1ms"], "use 50ms to 1h"),
    ];
    for (bad, want) in memcg {
        let args = [&["memcg"][..], bad].concat();
        let (code, _, stderr) = run_leaktrace(&args).expect("run");
        assert_eq!(code, 2, "memcg {bad:?}: {stderr}");
        assert!(
            stderr.contains(want),
            "memcg {bad:?}: missing {want:?} in {stderr}"
        );
    }
}

/// A PID no process has now: above every live one and below pid_max.
fn unused_pid() -> u32 {
    let max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .expect("pid_max")
        .trim()
        .parse()
        .expect("pid_max number");
    (2..max)
        .rev()
        .find(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
        .expect("a free pid")
}

#[test]
fn pid_of_no_process_is_refused_saying_pids_are_the_hosts() {
    let pid = unused_pid().to_string();
    refused_before_loading(
        &["--cache", "kmalloc-512", "--pid", &pid],
        &[&format!("--pid {pid}: no such process"), "host"],
    );
}

#[test]
fn pid_in_a_pid_namespace_of_its_own_is_said_not_guessed() {
    let have_unshare = Command::new("unshare").arg("--help").output().is_ok();
    skip_unless!(
        have_unshare || std::env::var_os("LEAKTRACE_VM_GUEST").is_none(),
        "this vm-test guest's busybox has no unshare"
    );
    // A container without hostPID: its /proc has no host PIDs to check.
    let out = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc"])
        .arg(leaktrace_bin())
        .args([
            "--cache",
            "kmalloc-512",
            "--duration",
            "1s",
            "--json",
            "--pid",
            "1",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("unshare (util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot check --pid 1") && stderr.contains("PID namespace of its own"),
        "{stderr}"
    );
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}

#[test]
fn traced_process_that_exits_is_said_in_the_header_and_its_counts_kept() {
    use std::io::{BufRead, BufReader, Write};
    const N: u64 = 200;
    // --pid needs the process before leaktrace starts, and its allocations
    // after: a shell waits for a gate file, then execs leakgen (same PID).
    let gate = std::env::temp_dir().join(format!("leaktrace-gate-{}", std::process::id()));
    let _ = std::fs::remove_file(&gate);
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "while [ ! -e '{}' ]; do sleep 0.05 || sleep 1; done; exec '{}' keys {N}",
            gate.display(),
            leakgen_bin().display()
        ))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sh");
    let pid = child.id();
    let mut tracer = Tracer::top(
        "kmalloc-512",
        &["--pid", &pid.to_string(), "--stack-sample", "4"],
    )
    .expect("start");
    std::fs::write(&gate, "").expect("gate");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut stdin = child.stdin.take().expect("stdin");
    assert_eq!(
        lines.next().expect("READY").expect("line"),
        format!("READY {pid}")
    );
    let running = tracer
        .wait_for("the held keys", Duration::from_secs(20), |r| {
            outstanding_on(r, pid, "user_preparse", "leak_keys") >= N
        })
        .expect("attribution");
    assert_eq!(running["traced"]["pid"], pid, "{running}");
    assert!(running["traced"]["exited_after_s"].is_null(), "{running}");
    writeln!(stdin, "release").expect("release");
    assert_eq!(
        lines.next().expect("RELEASED").expect("line"),
        format!("RELEASED {pid}")
    );
    drop(stdin);
    assert!(child.wait().expect("leakgen exits").success());
    let _ = std::fs::remove_file(&gate);
    let exited = tracer
        .wait_for("the exit in the header", Duration::from_secs(10), |r| {
            r["traced"]["exited_after_s"].as_f64().is_some()
        })
        .expect("exit noticed");
    assert_eq!(exited["traced"]["pid"], pid);
    let (code, report) = tracer.stop(libc::SIGINT).expect("stop");
    assert_eq!(code, 0);
    assert!(
        report["traced"]["exited_after_s"].as_f64().is_some(),
        "{report}"
    );
    // What it did while traced is still the report's: N allocated, N freed.
    assert!(count(&report["totals"], "allocs") >= N, "{report}");
    assert!(count(&report["totals"], "frees") >= N, "{report}");
    let (code, stdout, stderr) = run_leaktrace(&[
        "--cache",
        "kmalloc-512",
        "--duration",
        "1s",
        "--pid",
        &std::process::id().to_string(),
    ])
    .expect("text run");
    assert_eq!(code, 0, "{stderr}");
    assert!(
        !stdout.contains("exited"),
        "a live process is not said to exit: {stdout}"
    );
}

#[test]
fn an_output_directory_removed_mid_run_still_gets_the_report_and_a_fallback() {
    let dir = std::env::temp_dir().join(format!("leaktrace-gone-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let pprof = dir.join("keys.pb.gz");
    let tracer = Tracer::start(&[
        "--cache",
        "kmalloc-512",
        "--pprof",
        pprof.to_str().expect("utf-8"),
    ])
    .expect("start");
    let ids = tracer.prog_ids.clone();
    let gen = Generator::start("keys", "50").expect("leakgen keys");
    std::fs::remove_dir_all(&dir).expect("removing the output directory");
    std::thread::sleep(Duration::from_millis(300));
    let (code, report, stderr) = tracer.stop_with_stderr(libc::SIGTERM).expect("stop");
    drop(gen);
    assert_eq!(code, 1, "a lost output is a failed run: {stderr:?}");
    assert_eq!(report["kind"], "final", "the report is printed anyway");
    let bytes = fallback_bytes(&stderr, "--pprof");
    assert!(
        stderr
            .iter()
            .any(|l| l.contains("saved to ") && l.contains("keys.pb.gz")),
        "{stderr:?}"
    );
    let text = gunzip(&bytes);
    assert!(
        text.contains("outstanding_objects") && text.contains("[kernel.kallsyms]"),
        "not a leaktrace pprof profile"
    );
    assert_detached(&ids);
}

/// The bytes of the fallback file stderr names for `flag` (`saved to PATH
/// instead`); the file is removed.
fn fallback_bytes(stderr: &[String], flag: &str) -> Vec<u8> {
    let line = stderr
        .iter()
        .find(|l| l.contains("saved to ") && l.contains(flag))
        .unwrap_or_else(|| panic!("no fallback named for {flag}: {stderr:?}"));
    let fallback = line
        .split("saved to ")
        .nth(1)
        .and_then(|r| r.split(" instead").next())
        .expect("fallback path");
    let bytes = std::fs::read(fallback).expect("the fallback file exists");
    let _ = std::fs::remove_file(fallback);
    bytes
}

fn gunzip(bytes: &[u8]) -> String {
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(bytes), &mut out).expect("gzip");
    String::from_utf8_lossy(&out).into_owned()
}

/// Program ids from the attach line, and the maps those programs use.
fn loaded_objects(tracer: &Tracer) -> (Vec<u32>, Vec<u32>) {
    let progs = tracer.prog_ids.clone();
    let mut maps: Vec<u32> = progs
        .iter()
        .flat_map(|&p| prog_map_ids(p).expect("map ids of a running program"))
        .collect();
    maps.sort_unstable();
    maps.dedup();
    (progs, maps)
}

#[test]
fn sigint_sigterm_and_sighup_end_with_one_report_one_write_and_nothing_loaded() {
    for (name, sig) in [
        ("SIGINT", libc::SIGINT),
        ("SIGTERM", libc::SIGTERM),
        ("SIGHUP", libc::SIGHUP),
    ] {
        let dir = std::env::temp_dir().join(format!("leaktrace-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let folded = dir.join("out.folded");
        // An existing profile is replaced whole, never truncated first.
        std::fs::write(&folded, "old 1\n").expect("old profile");
        let tracer = Tracer::start(&[
            "--cache",
            "kmalloc-512",
            "--folded",
            folded.to_str().expect("utf-8"),
        ])
        .expect("start");
        let (progs, maps) = loaded_objects(&tracer);
        let (code, report, stderr) = tracer.stop_with_stderr(sig).expect("stop");
        assert_eq!(code, 0, "{name}: {stderr:?}");
        assert_eq!(report["kind"], "final", "{name}");
        let writes = stderr
            .iter()
            .filter(|l| l.contains("wrote folded stacks"))
            .count();
        assert_eq!(writes, 1, "{name}: written once: {stderr:?}");
        let text = std::fs::read_to_string(&folded).expect("the profile");
        assert!(!text.contains("old 1"), "{name}: not replaced: {text}");
        let left: Vec<_> = std::fs::read_dir(&dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left.len(), 1, "{name}: temp files left: {left:?}");
        assert_freed(&progs, &maps);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn sigkill_leaves_no_program_map_or_temp_file() {
    let dir = std::env::temp_dir().join(format!("leaktrace-kill-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let tracer = Tracer::start(&[
        "--cache",
        "kmalloc-512",
        "--pprof",
        dir.join("p.pb.gz").to_str().expect("utf-8"),
    ])
    .expect("start");
    let (progs, maps) = loaded_objects(&tracer);
    assert!(
        progs.iter().all(|&p| prog_exists(p)) && maps.iter().all(|&m| map_exists(m)),
        "the objects are there while it runs"
    );
    tracer.kill().expect("SIGKILL");
    assert_freed(&progs, &maps);
    let left: Vec<_> = std::fs::read_dir(&dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(left.is_empty(), "a killed run left {left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// (fd, flags) of every open descriptor of `pid`, from /proc/PID/fdinfo.
fn fd_flags(pid: u32) -> Vec<(u32, u32)> {
    std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .expect("fdinfo")
        .filter_map(|e| {
            let e = e.ok()?;
            let fd = e.file_name().to_string_lossy().parse().ok()?;
            let info = std::fs::read_to_string(e.path()).ok()?;
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())?;
            Some((fd, flags))
        })
        .collect()
}

#[test]
fn no_descriptor_would_leak_into_a_child() {
    // Descriptors this test process would pass to any child (a shell or CI
    // runner may hand some down) are leaktrace's inheritance, not its making.
    let inherited: Vec<u32> = fd_flags(std::process::id())
        .into_iter()
        .filter(|&(_, flags)| flags & libc::O_CLOEXEC as u32 == 0)
        .map(|(fd, _)| fd)
        .collect();
    let tracer = Tracer::start(&["--cache", "kmalloc-512"]).expect("start");
    let pid = tracer.pid();
    let mut seen = 0;
    for (fd, flags) in fd_flags(pid) {
        if fd <= 2 || inherited.contains(&fd) {
            continue;
        }
        let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap_or_default();
        assert!(
            flags & libc::O_CLOEXEC as u32 != 0,
            "fd {fd} ({}) has no O_CLOEXEC: a child would inherit it",
            target.display()
        );
        seen += 1;
    }
    // Programs, maps, perf events or links, the ring buffer's epoll.
    assert!(
        seen >= 5,
        "only {seen} descriptors: not the running tracer?"
    );
    tracer.stop(libc::SIGINT).expect("stop");
}

#[test]
fn two_instances_on_one_cache_are_independent_and_both_right() {
    const N: u64 = 150;
    let mut a = Tracer::top("kmalloc-512", &["--stack-sample", "4"]).expect("first");
    let mut b = Tracer::top("kmalloc-512", &["--stack-sample", "4"]).expect("second");
    let mut gen = Generator::start("keys", &N.to_string()).expect("leakgen keys");
    let pid = gen.pid;
    let held = |r: &serde_json::Value| outstanding_on(r, pid, "user_preparse", "leak_keys");
    for t in [&mut a, &mut b] {
        t.wait_for("the held keys", Duration::from_secs(20), |r| held(r) >= N)
            .expect("both see them");
    }
    // Stopping one leaves the other attached and counting.
    let a_ids = a.prog_ids.clone();
    let (code, report) = a.stop(libc::SIGINT).expect("stop first");
    assert_eq!(code, 0);
    assert!(held(&report) >= N, "{report}");
    assert_detached(&a_ids);
    gen.release().expect("release");
    b.wait_for("the keys freed", Duration::from_secs(20), |r| held(r) == 0)
        .expect("the second sees the frees");
    gen.finish().expect("leakgen");
    let b_ids = b.prog_ids.clone();
    let (code, report) = b.stop(libc::SIGTERM).expect("stop second");
    assert_eq!(code, 0);
    assert_eq!(
        count(&report["anomalies"], "unmatched_frees"),
        0,
        "{report}"
    );
    assert_detached(&b_ids);
}

#[test]
fn a_closed_stdout_still_gets_the_files_written() {
    use std::io::{BufRead, BufReader};
    let dir = std::env::temp_dir().join(format!("leaktrace-head-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let pprof = dir.join("p.pb.gz");
    // `leaktrace --top --pprof p.pb.gz | head -1`
    let mut child = Command::new(leaktrace_bin())
        .args([
            "--cache",
            "kmalloc-512",
            "--top",
            "--json",
            "--interval",
            "250ms",
            "--pprof",
        ])
        .arg(&pprof)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut first = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("one line");
    assert!(first.contains("\"kind\":\"snapshot\""), "{first}");
    let out = child.wait_with_output().expect("exits once stdout is gone");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("wrote pprof profile"), "{stderr}");
    assert!(
        std::fs::metadata(&pprof).is_ok_and(|m| m.len() > 0),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_panic_mid_run_exits_non_zero_with_nothing_left_loaded() {
    let tracer = Tracer::start_with_env(
        &["--cache", "kmalloc-512", "--top", "--interval", "1s"],
        &[("LEAKTRACE_FAULT", "panic-on-second-refresh")],
    )
    .expect("start");
    let (progs, maps) = loaded_objects(&tracer);
    assert!(!progs.is_empty() && !maps.is_empty());
    let (code, stderr) = tracer.wait_exit(Duration::from_secs(20)).expect("exit");
    assert_eq!(code, 101, "a panic's exit code: {stderr:?}");
    assert!(
        stderr.iter().any(|l| l.contains("an injected panic")),
        "{stderr:?}"
    );
    assert_freed(&progs, &maps);
}

/// `--top` in a real terminal (a tmux pane): a panic leaves the terminal as it
/// found it (main screen, cursor shown, cooked mode) and nothing loaded.
#[test]
fn a_panic_under_top_restores_the_terminal() {
    // The terminal's state does not depend on the kernel; tmux is a host tool.
    skip_unless!(
        std::env::var_os("LEAKTRACE_VM_GUEST").is_none(),
        "tmux is a host tool (cargo xtask setup installs it); a vm-test guest has none"
    );
    let dir = std::env::temp_dir().join(format!("leaktrace-panic-tty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let socket = format!("leaktrace-test-{}", std::process::id());
    let tmux = |args: &[&str]| {
        Command::new("tmux")
            .args(["-L", &socket])
            .args(args)
            .output()
            .expect("tmux (installed by cargo xtask setup)")
    };
    let d = dir.to_str().expect("utf-8");
    let script = format!(
        "stty -g > {d}/before; \
         LEAKTRACE_FAULT=panic-on-second-refresh {bin} --cache kmalloc-512 --top --interval 2s \
           --folded {d}/marker.folded 2> {d}/stderr; \
         echo $? > {d}/code.tmp; stty -g > {d}/after; \
         tmux display -p '#{{alternate_on}} #{{cursor_flag}}' > {d}/screen; \
         mv {d}/code.tmp {d}/code; sleep 60",
        bin = leaktrace_bin().display()
    );
    let out = tmux(&[
        "new-session",
        "-d",
        "-x",
        "120",
        "-y",
        "40",
        "sh",
        "-c",
        &script,
    ]);
    assert!(out.status.success(), "{out:?}");
    // Its programs, read from its descriptors while the screen is up.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (mut pid, mut progs) = (None, Vec::new());
    while std::time::Instant::now() < deadline && !dir.join("code").exists() {
        pid = pid.or_else(|| {
            std::fs::read_dir("/proc").ok()?.find_map(|e| {
                let e = e.ok()?;
                let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
                // leaktrace's own argv, not the shell's script that names it.
                let marker = format!("{d}/marker.folded");
                let argv0 = cmd.split(|&b| b == 0).next().unwrap_or_default();
                let has = argv0.ends_with(b"leaktrace")
                    && String::from_utf8_lossy(&cmd).contains(&marker);
                (has && e.file_name().to_str()?.parse::<u32>().is_ok())
                    .then(|| e.file_name().to_str()?.parse().ok())?
            })
        });
        if let Some(p) = pid {
            let now = prog_ids_held_by(p);
            if now.len() > progs.len() {
                progs = now;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    let _ = tmux(&["kill-server"]);
    assert_eq!(read("code").trim(), "101", "stderr: {}", read("stderr"));
    assert!(
        read("stderr").contains("an injected panic"),
        "{}",
        read("stderr")
    );
    assert!(!progs.is_empty(), "its programs were seen while it ran");
    assert_eq!(read("before"), read("after"), "terminal modes restored");
    assert_eq!(read("screen").trim(), "0 1", "main screen, cursor shown");
    assert_detached(&progs);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- Issue 24: hostile inputs and endings found by a break-it pass ----

/// A scratch directory of this test process, empty.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("leaktrace-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().expect("utf-8")).expect("path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// A FIFO no process has open for reading, in a scratch directory of its own.
fn deaf_fifo(name: &str) -> (PathBuf, PathBuf) {
    let dir = scratch(name);
    let fifo = dir.join("nobody-reads");
    mkfifo(&fifo);
    (dir, fifo)
}

/// `--pprof FIFO` with nobody reading used to sit in the kernel's fifo_open
/// for good, deaf to Ctrl-C and SIGTERM, with the final report unprinted.
/// Ended by --duration: a bounded wait for a reader, then the report, the
/// profile in the fallback file, exit 1.
#[test]
fn a_pprof_fifo_nobody_reads_is_waited_for_a_bounded_time() {
    let (dir, fifo) = deaf_fifo("fifo-pprof");
    let f = fifo.to_str().expect("utf-8");
    let tracer = Tracer::start(&["--cache", "kmalloc-512", "--duration", "1s", "--pprof", f])
        .expect("start");
    let attached = Instant::now();
    let ids = tracer.prog_ids.clone();
    let (code, report, stderr) = tracer
        .finish(Duration::from_secs(60))
        .expect("the run ends by itself");
    assert_eq!(code, 1, "a lost output is a failed run: {stderr:?}");
    assert_eq!(report["kind"], "final", "the report is printed anyway");
    assert!(
        attached.elapsed() < Duration::from_secs(40),
        "{:?}",
        attached.elapsed()
    );
    assert!(
        gunzip(&fallback_bytes(&stderr, "--pprof")).contains("outstanding_objects"),
        "not the profile"
    );
    assert_detached(&ids);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Ended by SIGTERM, a run waiting for a FIFO's reader gives up at once on
/// a second SIGTERM.
#[test]
fn a_second_sigterm_ends_the_wait_for_a_fifo_reader() {
    let (dir, fifo) = deaf_fifo("fifo-folded");
    let f = fifo.to_str().expect("utf-8");
    let mut tracer = Tracer::start(&["--cache", "kmalloc-512", "--folded", f]).expect("start");
    tracer.signal(libc::SIGTERM);
    tracer
        .wait_stderr(
            |l| l.contains("no reader has the FIFO open"),
            Duration::from_secs(30),
        )
        .expect("it says it waits for a reader");
    let asked = Instant::now();
    tracer.signal(libc::SIGTERM);
    let (code, report, stderr) = tracer
        .finish(Duration::from_secs(20))
        .expect("the second SIGTERM ends it");
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(code, 1, "{stderr:?}");
    assert_eq!(report["kind"], "final");
    fallback_bytes(&stderr, "--folded");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `leaktrace memcg --pprof FIFO` ends the same way.
#[test]
fn a_memcg_pprof_fifo_nobody_reads_is_waited_for_a_bounded_time() {
    let (dir, fifo) = deaf_fifo("fifo-memcg");
    let f = fifo.to_str().expect("utf-8");
    let (code, stdout, stderr) = run_leaktrace_within(
        &["memcg", "--duration", "1s", "--json", "--pprof", f],
        Duration::from_secs(90),
    )
    .expect("memcg ends by itself");
    assert_eq!(code, 1, "{stderr}");
    assert!(stdout.contains("\"report\":\"memcg\""), "{stdout}");
    let lines: Vec<String> = stderr.lines().map(str::to_string).collect();
    assert!(
        gunzip(&fallback_bytes(&lines, "--pprof")).contains("dying_memcgs"),
        "not memcg's profile"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// stdout as `| true` leaves it: a pipe whose reader is gone (EPIPE).
fn closed_pipe() -> Stdio {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    Stdio::from(writer)
}

/// stdout as `> /dev/full` leaves it (ENOSPC).
fn full_disk() -> Stdio {
    Stdio::from(
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("/dev/full"),
    )
}

#[test]
fn a_failed_stdout_is_a_clean_exit_1_in_every_subcommand() {
    let runs: &[&[&str]] = &[
        &["caches"],
        &["doctor", "--watch", "100ms"],
        &["doctor", "--watch", "100ms", "--json"],
        &["memcg", "--list"],
        &["--cache", "kmalloc-512", "--duration", "1s", "--json"],
    ];
    for args in runs {
        for (how, stdout) in [
            ("| true", closed_pipe as fn() -> Stdio),
            ("> /dev/full", full_disk),
        ] {
            let out = Command::new(leaktrace_bin())
                .args(*args)
                .stdin(Stdio::null())
                .stdout(stdout())
                .output()
                .expect("run");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{args:?} {how}: {stderr}");
            assert!(
                !stderr.contains("panicked") && !stderr.contains("backtrace"),
                "{args:?} {how}: {stderr}"
            );
            let last = stderr.lines().last().unwrap_or_default();
            assert!(
                last.starts_with("leaktrace: error: ") && last.contains("writing to stdout"),
                "{args:?} {how}: {stderr}"
            );
        }
    }
}

/// The ids of `pid`'s threads other than its leader.
fn other_threads(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("task dir")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&tid| tid != pid)
        .collect()
}

/// `/proc/TID` exists for every thread, but the kernel filters by thread
/// group: a thread id given as it is used to match nothing, silently.
#[test]
fn pid_of_a_thread_traces_its_process_and_says_so() {
    const N: u64 = 100;
    let mut gen = Generator::start("keys-thread", &N.to_string()).expect("leakgen keys-thread");
    let pid = gen.pid;
    let threads = other_threads(pid);
    assert_eq!(threads.len(), 1, "leakgen's key thread: {threads:?}");
    let tid = threads[0].to_string();
    let mut tracer =
        Tracer::top("kmalloc-512", &["--pid", &tid, "--stack-sample", "4"]).expect("start");
    assert!(
        tracer
            .stderr_seen
            .iter()
            .any(|l| l.contains(&format!("--pid {tid} is a thread of process {pid}"))),
        "{:?}",
        tracer.stderr_seen
    );
    gen.advance("MORE").expect("the thread makes its keys");
    let report = tracer
        .wait_for("the thread's keys", Duration::from_secs(20), |r| {
            outstanding_on(r, pid, "user_preparse", "leak_keys") >= N
        })
        .expect("the thread's allocations are the process's");
    assert_eq!(report["traced"]["pid"], pid, "{report}");
    gen.release().expect("release");
    gen.finish().expect("leakgen");
    let (code, _) = tracer.stop(libc::SIGINT).expect("stop");
    assert_eq!(code, 0);
}

#[test]
fn one_output_file_under_two_spellings_is_refused_before_anything_is_loaded() {
    let dir = scratch("alias");
    std::fs::create_dir(dir.join("sub")).expect("sub");
    std::fs::write(dir.join("y"), "old").expect("y");
    std::os::unix::fs::symlink(dir.join("y"), dir.join("link")).expect("symlink");
    std::fs::hard_link(dir.join("y"), dir.join("hard")).expect("hard link");
    let d = dir.to_str().expect("utf-8");
    for (a, x, b, y) in [
        // A new file: the same name in the same directory.
        (
            "--pprof",
            format!("{d}/x"),
            "--folded",
            format!("{d}/sub/../x"),
        ),
        (
            "--pprof",
            format!("{d}/x"),
            "--flamegraph",
            format!("{d}/./x"),
        ),
        // An existing one: a symlink and a hard link are the file they name.
        ("--pprof", format!("{d}/y"), "--folded", format!("{d}/link")),
        (
            "--folded",
            format!("{d}/y"),
            "--flamegraph",
            format!("{d}/hard"),
        ),
    ] {
        refused_before_loading(
            &["--cache", "kmalloc-512", a, &x, b, &y],
            &[&format!("{a} and {b} both name {x}")],
        );
    }
    assert_eq!(std::fs::read(dir.join("y")).expect("y"), b"old");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_directory_name_is_refused_and_a_dangling_symlink_followed() {
    let dir = scratch("slash");
    let d = dir.to_str().expect("utf-8");
    refused_before_loading(
        &[
            "--cache",
            "kmalloc-512",
            "--pprof",
            &format!("{d}/newfile/"),
        ],
        &["--pprof", "names a directory"],
    );
    // The README promises a symlink is followed, not replaced: a dangling one too.
    let link = dir.join("link.folded");
    std::os::unix::fs::symlink("target.folded", &link).expect("symlink");
    let (code, _, stderr) = run_leaktrace(&[
        "--cache",
        "kmalloc-512",
        "--duration",
        "1s",
        "--folded",
        link.to_str().expect("utf-8"),
    ])
    .expect("run");
    assert_eq!(code, 0, "{stderr}");
    assert!(
        std::fs::symlink_metadata(&link)
            .expect("link")
            .file_type()
            .is_symlink(),
        "the symlink was replaced by a file"
    );
    assert!(dir.join("target.folded").is_file(), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn zero_rows_or_frames_are_refused_by_the_parser() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--cache", "kmalloc-512", "--duration", "1s", "--limit", "0"],
            "--limit",
        ),
        (
            &[
                "--cache",
                "kmalloc-512",
                "--duration",
                "1s",
                "--frames",
                "0",
            ],
            "--frames",
        ),
        (&["memcg", "--list", "--limit", "0"], "--limit"),
    ];
    for (args, flag) in cases {
        let (code, stdout, stderr) = run_leaktrace(args).expect("run");
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(
            stderr.contains(flag) && stderr.contains("give 1 or more"),
            "{args:?}: {stderr}"
        );
        assert!(stdout.is_empty(), "{stdout}");
    }
}

#[test]
fn memcg_why_of_an_id_no_memcg_has_exits_non_zero() {
    let (code, stdout, stderr) = run_leaktrace(&["memcg", "--list", "--json"]).expect("list");
    assert_eq!(code, 0, "{stderr}");
    let list: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON report");
    let walked = list["kernel_memcgs"]["walk"]["memcgs"].as_array();
    skip_unless!(
        walked.is_some(),
        "no kernel walk of memcgs here ({}), so an unknown id cannot be told from an unseen one",
        list["kernel_memcgs"]["unknown"]
    );
    let known = walked
        .and_then(|w| w.first())
        .and_then(|m| m["id"].as_u64())
        .expect("a walked memcg");
    let (code, _, stderr) = run_leaktrace(&["memcg", "--why", &known.to_string()]).expect("why");
    assert_eq!(code, 0, "a memcg that exists: {stderr}");
    let unknown = "999999999999";
    let (code, stdout, stderr) = run_leaktrace(&["memcg", "--why", unknown]).expect("why");
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!("--why {unknown}: no memory cgroup has this id"))
            && stderr.contains("--list"),
        "{stderr}"
    );
    assert!(stdout.contains("(not found)"), "{stdout}");
}
