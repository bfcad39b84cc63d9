//! Attribution truth: the default (sampled) mode names the code path that really
//! holds the objects, where a busier path reaches the same kernel call site
//! through the same syscall wrapper (the kubelet retry-loop shape), and where
//! only the kernel path differs below one call site. Needs root; CI is root.

use std::{process::Command, time::Duration};

use leaktrace_tests::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

/// These tests measure attribution under controlled load: one at a time, so
/// one test's generators are not another's noise.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn twopath(n: u64, ratio: u64) -> Generator {
    let mut cmd = Command::new(leakgen_bin());
    cmd.args(["twopath", &n.to_string(), &ratio.to_string()]);
    Generator::start_command(cmd).expect("leakgen twopath")
}

/// Stacks of user_preparse's own kmalloc (the payload), not of allocations
/// made on its way (a new slab page's obj_exts vector under user_preparse is
/// another kmalloc-512 object, held as long as the slab page lives).
fn payload_stacks<'a>(
    report: &'a Value,
    pid: u32,
    frame: &'a str,
) -> impl Iterator<Item = &'a Value> + 'a {
    stacks_matching(report, pid, "user_preparse", frame)
        .filter(|s| called_the_allocator(s, "user_preparse"))
}

/// Outstanding (and the 95% interval) on user_preparse stacks under `frame`.
fn held_under(report: &Value, pid: u32, frame: &str) -> (u64, u64, u64) {
    payload_stacks(report, pid, frame).fold((0, 0, 0), |acc, s| {
        (
            acc.0 + count(s, "outstanding"),
            acc.1 + count(s, "outstanding_low"),
            acc.2 + count(s, "outstanding_high"),
        )
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Stacks of a random 1 in 64 allocations.
    Sampled,
    /// Every allocation's stacks.
    Exact,
    /// Sampled, with strata keyed by the first user frames.
    UserPaths,
}

/// 1,000 held keys from `hold_key`, 50 transient ones per held key from
/// `busy_add_key`; both through `sys_add_key` into `user_preparse`. 1,000 so
/// that the sampled mode draws none of the held objects with probability
/// (63/64)^1000 ≈ 1.5e-7 (at 200 it was 4%).
fn holding_path_is_named(mode: Mode) {
    const N: u64 = 1000;
    // 64 MiB of ring: 51,000 allocations in a burst, and a 1-vCPU emulated
    // guest runs the generator long before the reader (8 MiB lost 11,898
    // there, counted as allocs_lost_ringbuf, but then the held keys are short).
    let mut args = vec!["--stacks", "20", "--ringbuf-mib", "64"];
    match mode {
        Mode::Sampled => {}
        Mode::Exact => args.push("--exact"),
        Mode::UserPaths => args.push("--user-paths"),
    }
    let mut tracer = Tracer::top("kmalloc-512", &args).expect("start");
    let mut gen = twopath(N, 50);
    let pid = gen.pid;
    let report = tracer
        .wait_for("the held keys under some user_preparse stack", WAIT, |r| {
            process(r, pid).is_some_and(|p| count(p, "outstanding") >= N)
                && held_under(r, pid, "").0 >= N
        })
        .expect("held keys");
    let (hold, low, high) = held_under(&report, pid, "hold_key");
    let (busy, ..) = held_under(&report, pid, "busy_add_key");
    let p = process(&report, pid).expect("generator listed");
    assert!(
        hold * 100 >= N * 95,
        "≥95% of the {N} held keys must be under hold_key, got {hold} (busy_add_key: {busy}): {p:#}"
    );
    assert!(
        busy <= N / 50,
        "busy_add_key frees what it allocates, got {busy}: {p:#}"
    );
    assert!(
        low <= N && N <= high.max(hold),
        "interval {low}-{high} must cover {N}"
    );
    if mode == Mode::UserPaths {
        assert_eq!(p["fingerprinted"], true, "{p:#}");
    } else {
        // Said only where the kernel fingerprints user paths.
        assert!(p.get("fingerprinted").is_none(), "{p:#}");
    }
    // user_preparse's own kmalloc: a slab page allocated on the way
    // (alloc_slab_obj_exts under user_preparse) is another allocation.
    let busy_allocs: u64 = stacks_matching(&report, pid, "user_preparse", "busy_add_key")
        .filter(|s| called_the_allocator(s, "user_preparse"))
        .map(|s| count(s, "allocs"))
        .sum();
    if mode == Mode::Exact {
        assert_eq!(hold, N, "--exact counts every object: {p:#}");
        assert_eq!(busy_allocs, 50 * N, "{p:#}");
        assert!(stacks_matching(&report, pid, "", "")
            .all(|s| s["estimated"] == false && s["partial"] == false));
    } else {
        // Allocation counts are estimated too, from the same draw: 50,000 true.
        assert!(
            (busy_allocs as f64 - 50.0 * N as f64).abs() < 0.2 * 50.0 * N as f64,
            "busy allocs estimate {busy_allocs}: {p:#}"
        );
    }
    gen.release().expect("release");
    gen.finish().expect("leakgen exits");
    let ids = tracer.prog_ids.clone();
    let (code, _) = tracer.stop(libc::SIGINT).expect("stop");
    assert_eq!(code, 0);
    assert_detached(&ids);
}

#[test]
fn default_mode_names_the_holding_path_not_the_busy_one() {
    let _serial = serial();
    holding_path_is_named(Mode::Sampled);
}

#[test]
fn exact_mode_agrees_with_the_default_on_the_holding_path() {
    let _serial = serial();
    holding_path_is_named(Mode::Exact);
}

#[test]
fn user_paths_mode_counts_the_holding_path_apart() {
    let _serial = serial();
    holding_path_is_named(Mode::UserPaths);
}

/// 1 held key per 500 transient ones: the estimate under the holding path
/// and its 95% interval must cover the truth, and the busy path, which frees
/// everything, must hold at most a few (keys in flight at the snapshot).
/// Stacks of 1 in 4: (3/4)^100 ≈ 3e-13 that no held key is drawn. 50,000
/// add_key calls in all, which a 1-vCPU emulated guest makes within the
/// generator's 30 s.
#[test]
fn a_rare_holding_path_is_estimated_with_an_interval_covering_the_truth() {
    let _serial = serial();
    const N: u64 = 100;
    let mut tracer = Tracer::top(
        "kmalloc-512",
        &[
            "--stack-sample",
            "4",
            "--stacks",
            "20",
            "--ringbuf-mib",
            "64",
        ],
    )
    .expect("start");
    let mut gen = twopath(N, 500);
    let pid = gen.pid;
    let report = tracer
        .wait_for("the held keys", Duration::from_secs(120), |r| {
            process(r, pid).is_some_and(|p| count(p, "outstanding") >= N)
                && held_under(r, pid, "").0 >= N
        })
        .expect("held keys");
    let (hold, low, high) = held_under(&report, pid, "hold_key");
    let (busy, ..) = held_under(&report, pid, "busy_add_key");
    let p = process(&report, pid).expect("listed");
    assert!(
        low <= N && N <= high,
        "the interval {low}-{high} (estimate {hold}) must cover the {N} held keys: {p:#}"
    );
    assert!(hold * 100 >= N * 95, "estimate {hold} of {N}: {p:#}");
    assert!(
        busy <= N / 50,
        "busy_add_key holds nothing, got {busy}: {p:#}"
    );
    let drawn_note = &report["stacks"];
    assert_eq!(drawn_note["sample_every"], 4, "{drawn_note:#}");
    gen.release().expect("release");
    gen.finish().expect("leakgen exits");
    let (code, _) = tracer.stop(libc::SIGINT).expect("stop");
    assert_eq!(code, 0);
}

/// Issue 23's kubelet shape at a low rate: one key held a second from
/// `retry_hold_key` beside 6,000 a second added and unlinked by
/// `serve_traffic_key` (freed later by the key GC), through the same syscall
/// wrapper into `user_preparse`, for 20 s; then the busy loop stops and the
/// process holds the 20. One stratum holds both paths, so a census of new
/// strata alone cannot name them: the default mode must zoom on the stratum
/// once its surviving objects drew no stack. A few seconds after the busy loop
/// stopped, at least 14 of the 20 are under `retry_hold_key`'s full stack,
/// the busy path's stacks hold at most 2, and the stratum's rows add up to
/// exactly the 20 held.
#[test]
fn a_rare_path_beside_a_busy_one_is_named_within_seconds() {
    let _serial = serial();
    const SECS: u64 = 20;
    let mut tracer =
        Tracer::top("kmalloc-512", &["--stacks", "20", "--ringbuf-mib", "64"]).expect("start");
    let mut cmd = Command::new(leakgen_bin());
    cmd.args(["rarepath", &SECS.to_string(), "6000"]);
    let mut gen = Generator::start_command(cmd).expect("leakgen rarepath");
    let pid = gen.pid;
    let ready = std::time::Instant::now();
    let report = tracer
        .wait_for(
            "the held keys, 3 s after the busy loop stopped",
            WAIT,
            |r| ready.elapsed() >= Duration::from_secs(3) && held_under(r, pid, "").0 == SECS,
        )
        .expect("held keys");
    let (rare, rare_low, _) = held_under(&report, pid, "retry_hold_key");
    let (busy, ..) = held_under(&report, pid, "serve_traffic_key");
    let p = process(&report, pid).expect("listed");
    // Shown, not guessed: the interval's low end is what the drawn objects
    // prove (one lucky 1-in-64 draw would estimate all 20, from 1).
    assert!(
        rare >= 14 && rare_low >= 14,
        "≥14 of the {SECS} held keys must be under retry_hold_key, got {rare} (at least \
         {rare_low}; serve_traffic_key: {busy}): {p:#}\nstacks: {:#}",
        report["stacks"]
    );
    assert!(busy <= 2, "serve_traffic_key holds {busy}: {p:#}");
    // Exact per process: every row of the stratum, partial ones included,
    // adds up to the 20 held.
    assert!(count(p, "outstanding") >= SECS, "{p:#}");
    let stacks = &report["stacks"];
    assert!(count(stacks, "zoom") > 0, "no zoomed draws: {stacks:#}");
    let episode = stacks["zoom_episodes"]["episodes"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["pid"].as_u64() == Some(u64::from(pid))))
        .unwrap_or_else(|| panic!("no zoom episode for {pid}: {stacks:#}"));
    assert!(
        episode["call_site_name"]
            .as_str()
            .is_some_and(|n| n.starts_with("user_preparse+")),
        "{episode:#}"
    );
    gen.release().expect("release");
    gen.finish().expect("leakgen exits");
    let ids = tracer.prog_ids.clone();
    let (code, _) = tracer.stop(libc::SIGINT).expect("stop");
    assert_eq!(code, 0);
    assert_detached(&ids);
}

/// One `mkdir` of a cgroup (v1 memory, or v2) makes one kernfs directory node and many
/// file nodes through one kernel call site (`__kernfs_new_node`) from one user
/// path: the user fingerprint cannot tell them apart, so only the random draw
/// can, and it must put the file nodes under `__kernfs_create_file` in their
/// true proportion.
#[test]
fn kernel_paths_below_one_call_site_are_split_in_true_proportion() {
    let _serial = serial();
    // The v1 memory hierarchy where it is mounted (this host), else cgroup2
    // (the vm-test guests): either way one mkdir makes a directory node and
    // its interface files' nodes from the same call site.
    let root = [
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup",
    ]
    .into_iter()
    .map(std::path::Path::new)
    .find(|p| p.join("cgroup.procs").exists());
    skip_unless!(
        root.is_some(),
        "no cgroup hierarchy mounted under /sys/fs/cgroup"
    );
    let Some(root) = root else { return };
    // A named cache needs kmem_cache_alloc's name (6.2+ format, or the raw
    // tracepoint's cache pointer); slab.rs checks the refusal elsewhere.
    skip_unless!(
        tracepoint_has_field("kmem", "kmem_cache_alloc", "name")
            || raw_tracepoint_described("kmem_cache_alloc"),
        "kmem:kmem_cache_alloc names no cache on this kernel, so --cache kernfs_node_cache is \
         refused (checked in slab::named_cache_filp_follows_open_files)"
    );
    let base = root.join(format!("leaktrace-kernfs-{}", std::process::id()));
    std::fs::create_dir(&base).expect("mkdir base memcg");
    let mut tracer = Tracer::top(
        "kernfs_node_cache",
        &[
            "--stack-sample",
            "16",
            "--pid",
            &std::process::id().to_string(),
            "--stacks",
            "20",
        ],
    )
    .expect("start");
    const DIRS: usize = 60;
    let dirs: Vec<_> = (0..DIRS).map(|i| base.join(format!("c{i}"))).collect();
    for d in &dirs {
        std::fs::create_dir(d).expect("mkdir memcg");
    }
    let files_per_dir = std::fs::read_dir(&dirs[0]).expect("ls memcg").count() as u64;
    let pid = std::process::id();
    let want_files = DIRS as u64 * files_per_dir;
    let report = tracer
        .wait_for("every kernfs node of the new memcgs", WAIT, |r| {
            process(r, pid).is_some_and(|p| count(p, "outstanding") >= want_files + DIRS as u64)
        })
        .expect("kernfs nodes");
    for d in dirs.iter().rev() {
        let _ = std::fs::remove_dir(d);
    }
    let _ = std::fs::remove_dir(&base);
    let file_nodes: u64 = stacks_matching(&report, pid, "__kernfs_create_file", "")
        .map(|s| count(s, "outstanding"))
        .sum();
    let dir_nodes: u64 = stacks_matching(&report, pid, "kernfs_create_dir", "")
        .map(|s| count(s, "outstanding"))
        .sum();
    let p = process(&report, pid).expect("listed");
    assert!(
        file_nodes * 10 >= want_files * 9,
        "≥90% of the {want_files} file nodes must be under __kernfs_create_file, got {file_nodes} \
         (directory path: {dir_nodes}): {p:#}"
    );
    assert!(
        dir_nodes <= (DIRS as u64) * 3,
        "the directory path holds {DIRS} nodes, not {dir_nodes}: {p:#}"
    );
    let ids = tracer.prog_ids.clone();
    let (code, _) = tracer.stop(libc::SIGINT).expect("stop");
    assert_eq!(code, 0);
    assert_detached(&ids);
}

/// tests/c/twopath_nofp.c built the way Debian builds C (-O2, no frame
/// pointers), under target/c-test. None where no C compiler exists (vm-test
/// guests).
fn c_twopath_binary() -> Option<std::path::PathBuf> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = root.join("target/c-test");
    std::fs::create_dir_all(&out).ok()?;
    let bin = out.join("twopath_nofp");
    let status = Command::new("cc")
        .args(["-O2", "-fomit-frame-pointer", "-o"])
        .arg(&bin)
        .arg(root.join("tests/c/twopath_nofp.c"))
        .status()
        .ok()?;
    assert!(
        status.success(),
        "cc of tests/c/twopath_nofp.c failed: {status}"
    );
    Some(bin)
}

/// Without frame pointers the user path cannot be fingerprinted: with
/// `--user-paths` the report must say so for the process, keep its total exact, and put the held
/// objects only under estimates whose interval is stated (never a stack
/// chosen by "last seen").
#[test]
fn without_frame_pointers_the_split_is_an_estimate_and_says_so() {
    let _serial = serial();
    const N: u64 = 200;
    let bin = c_twopath_binary();
    skip_unless!(bin.is_some(), "no C compiler (cc) on this machine");
    let Some(bin) = bin else { return };
    let mut tracer =
        Tracer::top("kmalloc-512", &["--stacks", "50", "--user-paths"]).expect("start");
    let mut cmd = Command::new(&bin);
    cmd.args([N.to_string(), "50".to_string()]);
    let mut gen = Generator::start_command(cmd).expect("twopath_nofp");
    let pid = gen.pid;
    let report = tracer
        .wait_for("the held keys", WAIT, |r| held_under(r, pid, "").0 >= N)
        .expect("held keys");
    let p = process(&report, pid).expect("listed");
    assert!(count(p, "outstanding") >= N, "the process total: {p:#}");
    assert_eq!(p["fingerprinted"], false, "{p:#}");
    let rows: Vec<&Value> = payload_stacks(&report, pid, "").collect();
    let held: u64 = rows.iter().map(|s| count(s, "outstanding")).sum();
    assert!(
        held.abs_diff(N) <= rows.len() as u64,
        "user_preparse rows hold {held}, truth {N} (rounding at most 1 a row): {p:#}"
    );
    for s in rows.iter().filter(|s| count(s, "outstanding") > 0) {
        let (est, low, high) = (
            count(s, "outstanding"),
            count(s, "outstanding_low"),
            count(s, "outstanding_high"),
        );
        assert!(
            s["partial"] == true || (low <= est && est <= high && high <= N),
            "every held row is an estimate with its interval, or partial: {s:#}"
        );
    }
    gen.release().expect("release");
    gen.finish().expect("exits");
    let (code, _) = tracer.stop(libc::SIGINT).expect("stop");
    assert_eq!(code, 0);
}

/// Frees from RCU callbacks in softirq, while another process churns the same
/// cache on the same CPUs: a softirq kfree that interrupts our own kfree
/// program is skipped by the kernel's recursion guard, and the spare program
/// must see it. After the frees nothing may stay "outstanding" beyond the
/// uncertain count the report states.
#[test]
fn rcu_softirq_frees_under_churn_leave_no_phantom_leak() {
    let _serial = serial();
    const N: u64 = 2000;
    let mut tracer = Tracer::top("kmalloc-512", &[]).expect("start");
    let mut churn = Command::new(leakgen_bin())
        .args(["writev", "20"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("writev churn");
    let mut gen = Generator::start("keys-rcu", &N.to_string()).expect("leakgen keys-rcu");
    let pid = gen.pid;
    tracer
        .wait_for("the held keys", WAIT, |r| {
            // Allocations both hook programs missed are stated, not hidden
            // (seen in 1-vCPU 7.x guests, where tracepoint programs run
            // preemptibly); they are never counted as held.
            let missed = r["kernel"]["allocs_maybe_missed"].as_u64().unwrap_or(0);
            held_under(r, pid, "leak_keys").0 + missed >= N
        })
        .expect("held");
    gen.release().expect("revoke");
    // RELEASED comes after rcu_barrier(): every payload's kfree has run.
    let report = tracer
        .wait_for("the RCU-freed payloads seen freed", WAIT, |r| {
            let left = held_under(r, pid, "leak_keys").0;
            match r["kernel"]["frees_maybe_missed"].as_u64() {
                Some(uncertain) => left <= uncertain,
                // Before 5.12 the kernel does not count skipped runs: wait
                // for the frees to drain, then report what could not be known.
                None => process(r, pid).is_some_and(|p| count(p, "frees") + left >= N),
            }
        })
        .expect("no phantom leak");
    let left = held_under(&report, pid, "leak_keys").0;
    let _ = churn.kill();
    let _ = churn.wait();
    gen.finish().expect("exits");
    let (code, fin) = tracer.stop(libc::SIGINT).expect("stop");
    assert_eq!(code, 0);
    println!(
        "after the RCU frees: {left} left, recursion misses {}, frees_maybe_missed {}",
        fin["kernel"]["recursion_misses"], fin["kernel"]["frees_maybe_missed"]
    );
    skip_unless!(
        !fin["kernel"]["frees_maybe_missed"].is_null(),
        "before Linux 5.12 the kernel counts no skipped program runs, and classic tracepoints \
         share one guard per CPU: {left} of {N} RCU-freed objects stayed outstanding, and the \
         report says the uncertainty is unknown rather than bounding it"
    );
    assert!(
        left <= fin["kernel"]["frees_maybe_missed"].as_u64().unwrap_or(0),
        "phantom leak: {left} left"
    );
}

/// Processes that allocate and exit within about ten milliseconds: the
/// report must still name their user frames. leaktrace wakes up for the first
/// event of a new stratum and takes the process's mappings (holding the mapped
/// files open) at once, so names survive the exit; a process gone before that
/// wake-up is handled (bare addresses) but is a race the host wins nearly
/// always: 8 of 10 must be named here (10 of 10 on an idle host). A 1-vCPU TCG guest shares its only CPU
/// with the generator, which then usually finishes first: host only.
#[test]
fn short_lived_processes_keep_their_names() {
    let _serial = serial();
    skip_unless!(
        std::env::var_os("LEAKTRACE_VM_GUEST").is_none(),
        "a 1-vCPU guest runs the generator to its exit before the tracer wakes"
    );
    let tracer = Tracer::start(&[
        "--cache",
        "kmalloc-512",
        "--comm",
        "leakgen",
        "--limit",
        "50",
    ])
    .expect("start");
    let mut pids = Vec::new();
    for _ in 0..10 {
        let mut child = Command::new(leakgen_bin())
            .args(["writev", "0.01"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("leakgen writev");
        pids.push(child.id());
        assert!(child.wait().expect("wait").success());
    }
    let (code, report) = tracer.stop(libc::SIGINT).expect("stop");
    assert_eq!(code, 0);
    let named = pids
        .iter()
        .filter(|&&pid| {
            let p = process(&report, pid).unwrap_or_else(|| panic!("pid {pid} not in {report:#}"));
            assert!(count(p, "allocs") >= 1, "{p:#}");
            stacks_matching(&report, pid, "iovec_from_user", "churn_writev").count() > 0
        })
        .count();
    let unnamed: Vec<&Value> = pids
        .iter()
        .filter_map(|&pid| process(&report, pid))
        .filter(|p| {
            p["stacks"].as_array().is_none_or(|s| {
                !s.iter()
                    .any(|s| s["user"].to_string().contains("churn_writev"))
            })
        })
        .collect();
    assert!(
        named >= 8,
        "only {named} of 10 exited processes had their user frames named (churn_writev): {unnamed:#?}"
    );
}
