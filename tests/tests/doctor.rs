//! `leaktrace doctor` on the running kernel: the memcg check must see zombie memcgs this
//! test makes, the slab-growth check must name the cache a generator grows, and the
//! ledger must see the pages pipes take straight from the page allocator.

use std::{
    fs,
    io::{BufRead, BufReader, Lines},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{ChildStderr, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use leaktrace_tests::*;
use serde_json::Value;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `leaktrace doctor --json ARGS`, parsed; panics with stderr when it does not exit 0.
fn doctor(args: &[&str]) -> Value {
    let mut all = vec!["doctor", "--json"];
    all.extend_from_slice(args);
    let (code, stdout, stderr) = run_leaktrace(&all).expect("run leaktrace doctor");
    assert_eq!(code, 0, "doctor failed: {stderr}");
    assert_eq!(stdout.lines().count(), 1, "one JSON object: {stdout}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn finding<'a>(report: &'a Value, check: &str) -> &'a Value {
    report["findings"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["check"] == check))
        .unwrap_or_else(|| panic!("no {check} finding in {report}"))
}

fn dying(report: &Value) -> u64 {
    let memcgs = finding(report, "memcgs");
    memcgs["data"]["dying"]
        .as_u64()
        .unwrap_or_else(|| panic!("no dying count: {memcgs}"))
}

/// A cgroup this test made; removed (after its zombie children's files) on drop.
struct TestCgroup {
    dir: PathBuf,
    scratch: PathBuf,
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Dropping the page cache lets the kernel free the zombies this test made.
        let _ = fs::remove_dir_all(&self.scratch);
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = fs::remove_dir(e.path());
                }
            }
        }
        let _ = fs::remove_dir(&self.dir);
    }
}

/// rmdir of a cgroup whose last task just exited can briefly fail with EBUSY.
fn rmdir_retrying(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return,
            Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("rmdir {}: {e}", dir.display()),
        }
    }
}

/// Makes a memcg, runs a short-lived process in it that charges page cache and dentries
/// (which keep the memcg from being freed after rmdir), waits for it, removes the memcg.
fn make_zombie(parent: &Path, scratch: &Path, i: usize) {
    let cg = parent.join(format!("z{i}"));
    fs::create_dir(&cg).unwrap_or_else(|e| panic!("mkdir {}: {e}", cg.display()));
    let procs = cg.join("cgroup.procs");
    let file = scratch.join(format!("z{i}.data"));
    let dir = scratch.join(format!("z{i}.d"));
    let script = format!(
        "echo $$ > '{}' && head -c 262144 /dev/urandom > '{}' && mkdir '{}' && touch '{}/a' '{}/b'",
        procs.display(),
        file.display(),
        dir.display(),
        dir.display(),
        dir.display()
    );
    let status = Command::new("sh")
        .args(["-c", &script])
        .status()
        .expect("run the charging child");
    assert!(status.success(), "charging child failed: {script}");
    rmdir_retrying(&cg);
}

#[test]
fn zombie_memcgs_raise_the_dying_count() {
    skip_unless!(is_root(), "making memory cgroups needs root");
    let before = doctor(&["--watch", "100ms"]);
    let memcgs = finding(&before, "memcgs");
    let data = &memcgs["data"];
    skip_unless!(
        data.is_object(),
        "no memory cgroup hierarchy here: {}",
        memcgs["summary"]
    );
    let mount = PathBuf::from(data["mount"].as_str().expect("mount"));
    let version = data["version"].as_str().expect("version");
    if version == "v2" {
        // Children get a memcg only when the parent delegates the controller.
        let delegated = fs::read_to_string(mount.join("cgroup.subtree_control"))
            .is_ok_and(|c| c.split_whitespace().any(|x| x == "memory"));
        skip_unless!(
            delegated,
            "memory is not enabled in {}/cgroup.subtree_control",
            mount.display()
        );
    }
    let tag = format!("leaktrace-doctor-test-{}", std::process::id());
    let parent = TestCgroup {
        dir: mount.join(&tag),
        scratch: std::env::temp_dir().join(&tag),
    };
    fs::create_dir(&parent.dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", parent.dir.display()));
    if version == "v2" {
        fs::write(parent.dir.join("cgroup.subtree_control"), "+memory").expect("delegate memory");
    }
    fs::create_dir_all(&parent.scratch).expect("scratch dir");

    // Counted with our (live) parent in place, so only the zombies differ.
    let baseline = dying(&doctor(&["--watch", "100ms"]));
    const ZOMBIES: usize = 12;
    for i in 0..ZOMBIES {
        make_zombie(&parent.dir, &parent.scratch, i);
    }
    let after = doctor(&["--watch", "100ms"]);
    let now = dying(&after);
    println!("dying memcgs: {baseline} before, {now} after {ZOMBIES} zombies");
    assert!(
        now >= baseline + ZOMBIES as u64,
        "dying memcgs went from {baseline} to {now} after making {ZOMBIES} zombies: {}",
        finding(&after, "memcgs")
    );
    let live = finding(&after, "memcgs")["data"]["live"]
        .as_u64()
        .expect("live");
    assert!(
        live >= 2,
        "our parent cgroup is live: {}",
        finding(&after, "memcgs")
    );
}

/// The tests that grow kernel memory inside a doctor window take turns: each one's
/// growth would otherwise be the other's verdict.
static WINDOW: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn window() -> std::sync::MutexGuard<'static, ()> {
    WINDOW.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn slab_growth_names_the_cache_a_generator_grows() {
    skip_unless!(is_root(), "/proc/slabinfo needs root");
    let _window = window();
    skip_unless!(slab_cache_exists("kmalloc-512"), "no kmalloc-512 cache");
    // The generator must allocate after the first sample, inside the window.
    let (mut child, lines, first) = doctor_sampling("2s");
    assert!(first.contains("sampling slab caches for 2.0s"), "{first}");

    const KEYS: u64 = 2000;
    let mut gen = Generator::start("keys", &KEYS.to_string()).expect("leakgen keys");
    let out = child.0.wait_with_output_timeout(Duration::from_secs(30));
    gen.release().expect("release keys");
    gen.finish().expect("leakgen exit");
    let report = doctor_report(out, lines);

    let slab = finding(&report, "slab");
    let grown = slab["data"]["top_growth"]
        .as_array()
        .expect("top_growth")
        .iter()
        .find(|r| {
            r["name"] == "kmalloc-512"
                || r["aliases"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|n| n == "kmalloc-512"))
        })
        .unwrap_or_else(|| panic!("kmalloc-512 is not among the growing caches: {slab}"));
    let secs = slab["data"]["elapsed_seconds"].as_f64().expect("elapsed");
    let objs = grown["objs_per_sec"].as_f64().expect("objs/s") * secs;
    // Other kmalloc-512 users come and go during the window; most of the keys must show.
    assert!(
        objs >= KEYS as f64 / 2.0,
        "kmalloc-512 grew by {objs:.0} objects while {KEYS} keys were held: {slab}"
    );
    // A bigger growth elsewhere in kernel memory (another test's pipes) is named instead.
    let ledger_grower = &finding(&report, "ledger")["data"]["growing"];
    let slab_or_none = ledger_grower.is_null()
        || ledger_grower
            .as_str()
            .is_some_and(|b| b.starts_with("slab_"));
    if slab["data"]["top_growth"][0]["name"] == grown["name"] && slab_or_none {
        let next = report["next_command"].as_str().expect("next_command");
        assert!(next.contains("--cache kmalloc-512 --top"), "{next}");
        assert!(
            slab["summary"]
                .as_str()
                .is_some_and(|s| s.starts_with("kmalloc-512")),
            "{slab}"
        );
    }
}

#[test]
fn text_report_is_ranked_and_ends_with_the_next_command() {
    let (code, stdout, stderr) =
        run_leaktrace(&["doctor", "--watch", "200ms"]).expect("run leaktrace doctor");
    assert_eq!(code, 0, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].starts_with("leaktrace doctor — kernel "),
        "{stdout}"
    );
    let rank = |label: &str| {
        ["CRIT", "WARN", "UNKNOWN", "ok"]
            .iter()
            .position(|l| *l == label)
    };
    let ranks: Vec<usize> = lines
        .iter()
        .filter_map(|l| l.split_whitespace().next().and_then(rank))
        .collect();
    assert_eq!(ranks.len(), 6, "one line per check: {stdout}");
    assert!(
        ranks.windows(2).all(|w| w[0] <= w[1]),
        "not ranked: {stdout}"
    );
    for check in ["memory", "slab", "memcgs", "kmem", "ledger", "bpf"] {
        assert!(
            lines
                .iter()
                .any(|l| l.split_whitespace().nth(1) == Some(check)),
            "{check} missing: {stdout}"
        );
    }
    assert!(
        lines.last().is_some_and(|l| l.starts_with("next: ")),
        "{stdout}"
    );
}

#[test]
fn works_without_root() {
    skip_unless!(is_root(), "needs root to drop to an unprivileged user");
    // The pipes of the ledger test would make its next command `sudo leaktrace --pages`.
    let _window = window();
    let out = Command::new(leaktrace_bin())
        .args(["doctor", "--json", "--watch", "100ms"])
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run as nobody");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    // /proc/slabinfo is root-only: the slab check degrades, the rest still answers.
    let slab = finding(&report, "slab");
    assert_eq!(slab["severity"], "unknown", "{slab}");
    assert!(
        slab["summary"]
            .as_str()
            .is_some_and(|s| s.contains("/proc/slabinfo")),
        "{slab}"
    );
    let memory = finding(&report, "memory");
    assert!(
        memory["data"]["mem_total_kb"]
            .as_u64()
            .is_some_and(|k| k > 0),
        "{memory}"
    );
    assert_eq!(finding(&report, "bpf")["data"]["root"], false);
    assert_eq!(report["next_command"], "sudo leaktrace doctor");
}

/// `/proc/meminfo` as field -> KiB.
fn meminfo() -> std::collections::HashMap<String, i64> {
    fs::read_to_string("/proc/meminfo")
        .expect("read /proc/meminfo")
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            Some((
                name.to_string(),
                rest.split_whitespace().next()?.parse().ok()?,
            ))
        })
        .collect()
}

#[test]
fn ledger_names_the_pages_pipes_take() {
    skip_unless!(
        is_root(),
        "200 MiB of pipes pass the per-user soft limit only as root"
    );
    let _window = window();
    // Read just before doctor's first ledger read and just after it (doctor reports the
    // sample open on stderr after that read): the named buckets must lie between.
    let opened = meminfo();
    // Long enough for 200 MiB of pipe writes under TCG in the vm-test guests.
    let (mut child, lines, first) = doctor_sampling("10s");
    let sampled = meminfo();
    assert!(first.contains("sampling"), "{first}");

    const PIPES: u64 = 200;
    let mut gen = Generator::start("pipe-pages", &PIPES.to_string()).expect("leakgen pipe-pages");
    assert!(
        child.0.try_wait().expect("doctor status").is_none(),
        "the pipes filled after doctor's window closed: the growth cannot be inside it"
    );
    let out = child.0.wait_with_output_timeout(Duration::from_secs(60));
    gen.release().expect("release the pipes");
    gen.finish().expect("leakgen exit");
    let report = doctor_report(out, lines);
    let ledger = finding(&report, "ledger");
    let data = &ledger["data"];
    let bucket = |name: &str| {
        data["buckets"]
            .as_array()
            .expect("buckets")
            .iter()
            .find(|b| b["name"] == name)
            .unwrap_or_else(|| panic!("no {name} bucket: {ledger}"))
    };

    // 200 pipes x 256 pages, none on an LRU list nor in any meminfo bucket: the residual
    // must show at least half of them, whatever else the machine does meanwhile.
    let grown = bucket("unexplained")["growth_kb"]
        .as_i64()
        .expect("unexplained growth");
    println!(
        "unexplained grew {} MiB while {PIPES} MiB of pipes filled",
        grown / 1024
    );
    assert!(
        grown >= 100 * 1024,
        "the residual grew {grown} KiB while {PIPES} MiB of pipe pages were held: {ledger}"
    );
    assert_eq!(data["growing"], "unexplained", "{ledger}");
    assert_eq!(data["next_command"], "leaktrace --pages", "{ledger}");
    assert_eq!(report["next_command"], "leaktrace --pages", "{report}");
    assert!(
        ledger["summary"]
            .as_str()
            .is_some_and(|s| s.starts_with("unexplained")),
        "{ledger}"
    );

    // The named buckets at the window's start are what /proc/meminfo said then: between
    // our two reads, widened by how far the field moved between them (0 for a still one).
    for (name, field) in [
        ("slab_unreclaimable", "SUnreclaim"),
        ("slab_reclaimable", "SReclaimable"),
        ("kernel_stack", "KernelStack"),
        ("page_tables", "PageTables"),
        ("sec_page_tables", "SecPageTables"),
        ("percpu", "Percpu"),
        ("vmalloc", "VmallocUsed"),
        ("hugetlb", "Hugetlb"),
        ("zswap", "Zswap"),
    ] {
        let at_start = bucket(name)["before_kb"].as_i64();
        match (opened.get(field), sampled.get(field)) {
            (Some(&a), Some(&b)) => {
                let v = at_start.unwrap_or_else(|| panic!("{name} absent, meminfo has {field}"));
                let moved = (a - b).abs();
                assert!(
                    a.min(b) - moved <= v && v <= a.max(b) + moved,
                    "{name} {v} KiB at doctor's first read, /proc/meminfo {field} {a} then {b}"
                );
            }
            _ => assert_eq!(at_start, None, "{field} is not in /proc/meminfo: {ledger}"),
        }
    }
    // Fields nothing here changes must be equal exactly.
    assert_eq!(
        data["before"]["mem_total_kb"].as_i64(),
        opened.get("MemTotal").copied()
    );
    for (name, field) in [("hugetlb", "Hugetlb"), ("sec_page_tables", "SecPageTables")] {
        assert_eq!(
            bucket(name)["after_kb"].as_i64(),
            opened.get(field).copied(),
            "{ledger}"
        );
    }
}

/// `leaktrace doctor --json --watch WATCH`, its stderr, and the first line
/// of it, which doctor writes once its first sample is taken: what a test
/// starts after reading it grows inside the window.
fn doctor_sampling(watch: &str) -> (KillOnDrop, Lines<BufReader<ChildStderr>>, String) {
    let child = Command::new(leaktrace_bin())
        .args(["doctor", "--json", "--watch", watch])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn doctor");
    let mut child = KillOnDrop(child);
    let stderr = child.0.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let first = lines
        .next()
        .expect("doctor wrote nothing to stderr")
        .expect("read stderr");
    (child, lines, first)
}

/// The JSON report of a doctor that exited (status, stdout), its stderr's
/// remaining lines shown if it failed.
fn doctor_report(
    out: (std::process::ExitStatus, String),
    lines: Lines<BufReader<ChildStderr>>,
) -> Value {
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(out.0.success(), "doctor failed: {rest:?}");
    serde_json::from_str(&out.1).unwrap_or_else(|e| panic!("{e}: {}", out.1))
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

trait WaitTimeout {
    fn wait_with_output_timeout(&mut self, timeout: Duration)
        -> (std::process::ExitStatus, String);
}

impl WaitTimeout for std::process::Child {
    /// Waits for exit and returns stdout; stderr is read by the caller.
    fn wait_with_output_timeout(
        &mut self,
        timeout: Duration,
    ) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.try_wait().expect("wait for doctor") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "doctor did not exit within {timeout:?}"
            );
            thread::sleep(Duration::from_millis(20));
        };
        let mut stdout = String::new();
        if let Some(mut out) = self.stdout.take() {
            use std::io::Read;
            out.read_to_string(&mut stdout).expect("read doctor stdout");
        }
        (status, stdout)
    }
}
