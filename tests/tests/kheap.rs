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

/// One at a time: each test's leak would be the other's noise.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The raw kmem tracepoints, where BTF describes them (not on 5.10, which
/// defines them through shared classes BTF does not name per event):
/// `--all-caches` takes them there and the classic ones elsewhere.
fn raw_hooks() -> bool {
    KMEM_EVENTS.iter().all(|e| raw_tracepoint_described(e))
}

const KMEM_EVENTS: [&str; 4] = ["kmalloc", "kmem_cache_alloc", "kfree", "kmem_cache_free"];

/// What `--all-caches` hooks on any kernel: the classic kmem tracepoints.
fn kmem_tracepoints() -> bool {
    KMEM_EVENTS
        .iter()
        .all(|e| tracepoint_has_field("kmem", e, "ptr"))
}

const NO_KMEM: &str =
    "--all-caches needs the kmem tracepoints (kmalloc, kmem_cache_alloc, kfree, kmem_cache_free)";

/// The run's hooks line says which hooks it took: the classic ones where
/// asked for or where the raw ones are not described.
fn assert_hooks(stderr: &[String], classic: bool) {
    let hooks = stderr
        .iter()
        .find(|l| l.contains("hooks: "))
        .unwrap_or_else(|| panic!("no hooks line: {stderr:?}"));
    assert_eq!(
        hooks.contains("raw tracepoints"),
        !classic,
        "classic hooks expected: {classic}; {hooks}"
    );
    assert_eq!(
        hooks.contains("tracepoints kmem:"),
        classic,
        "classic hooks expected: {classic}; {hooks}"
    );
    if classic {
        assert!(
            stderr
                .iter()
                .any(|l| l.contains("all caches on the classic kmem tracepoints")),
            "the classic hooks' cost is stated: {stderr:?}"
        );
    }
}

fn kheap(report: &Value) -> &Value {
    &report["kheap"]
}

#[test]
fn all_caches_names_a_leak_made_during_the_run_and_estimates_it() {
    let _serial = serial();
    skip_unless!(kmem_tracepoints(), "{NO_KMEM}");
    names_a_leak_made_during_the_run(&[]);
}

/// The same leak through the classic kmem tracepoints, which 5.10 (and
/// any kernel without BTF) takes: forced here, so the host runs them too.
#[test]
fn all_caches_on_classic_hooks_names_a_leak_made_during_the_run() {
    let _serial = serial();
    skip_unless!(kmem_tracepoints(), "{NO_KMEM}");
    names_a_leak_made_during_the_run(&["--hooks", "classic"]);
}

fn names_a_leak_made_during_the_run(hooks: &[&str]) {
    let classic = !hooks.is_empty() || !raw_hooks();
    let folded = std::env::temp_dir().join(format!(
        "leaktrace-kheap-{}-{}.folded",
        std::process::id(),
        hooks.len()
    ));
    let folded_arg = folded.to_str().expect("utf-8 temp path").to_string();
    let args = [
        "--folded",
        folded_arg.as_str(),
        "--all-caches",
        "--sample-bytes",
        SAMPLE_BYTES,
        "--duration",
        "8s",
        "--group-by",
        "comm",
    ];
    let args: Vec<&str> = args.iter().chain(hooks).copied().collect();
    let tracer = Tracer::start(&args).expect("start leaktrace --all-caches");
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
    assert_hooks(&stderr, classic);
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
         churn {churned} B; {} samples, {} stale; kernel {}",
        caches[0], k["samples"], k["stale"], report["kernel"]
    );
    assert!(
        churned <= 1 << 20,
        "the churn's short-lived allocations add {churned} bytes in use (≤ 1 MiB)"
    );
    assert_eq!(k["dropped"].as_u64(), Some(0), "{k}");
    assert_coverage(&report);
    assert_rows_carry_their_stacks(rows, &pids);
    assert_folded_weighs_estimates(&folded, &pids, estimate);
    let _ = std::fs::remove_file(&folded);
    assert_unnamed_caches_labelled_by_size(rows, &pids, classic);
    // --group-by sums the same estimates: leakgen's group is its processes'
    // rows of every cache (each rounded to a byte), and holds the leak.
    assert_eq!(k["group_by"], "comm", "{k}");
    let groups = k["groups"].as_array().expect("groups");
    let leakgen = groups
        .iter()
        .find(|g| g["key"] == "leakgen")
        .map_or(0, |g| count(g, "inuse_bytes"));
    let leakgen_pids: Vec<u32> = pids.iter().copied().chain([churn.id()]).collect();
    let leakgen_rows: Vec<&Value> = rows
        .iter()
        .filter(|r| leakgen_pids.contains(&(r["tgid"].as_u64().unwrap_or(0) as u32)))
        .collect();
    let rows_sum: u64 = leakgen_rows.iter().map(|r| count(r, "inuse_bytes")).sum();
    assert!(
        leakgen.abs_diff(rows_sum) <= leakgen_rows.len() as u64 && leakgen >= estimate,
        "leakgen's group {leakgen} B vs its rows' {rows_sum} B (kmalloc-512: {estimate} B): {:?}",
        &groups[..groups.len().min(5)]
    );
    drop(holders);
}

/// The sample counts are labelled as such, and the coverage states every
/// loss the kernel counted: samples it could not hand over put the
/// estimates low by at least the rate each; lost frees of samples, high by
/// at most what that many held samples weigh.
fn assert_coverage(report: &Value) {
    let k = kheap(report);
    assert_eq!(report["counts_are"], "samples", "{}", report["totals"]);
    let kernel = &report["kernel"];
    assert_eq!(k["lost_samples"], kernel["allocs_lost_ringbuf"], "{k}");
    assert_eq!(k["lost_sample_frees"], kernel["frees_lost_ringbuf"], "{k}");
    let unseen = count(k, "dropped") + count(k, "lost_samples");
    assert_eq!(
        count(k, "low_by_at_least_bytes"),
        unseen * count(k, "sample_bytes"),
        "{k}"
    );
    let high = count(k, "high_by_at_most_bytes");
    assert_eq!(high == 0, count(k, "lost_sample_frees") == 0, "{k}");
    assert!(high <= count(k, "inuse_bytes"), "{k}");
}

/// Each row names the stack its samples came from: a holder's row ends in
/// the kernel's key code and leakgen's own frames.
fn assert_rows_carry_their_stacks(rows: &[Value], pids: &[u32]) {
    let frames = |r: &Value, side: &str| -> Vec<String> {
        r[side]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|f| f.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let holder = rows
        .iter()
        .find(|r| {
            pids.contains(&(r["tgid"].as_u64().unwrap_or(0) as u32)) && r["cache"] == "kmalloc-512"
        })
        .expect("a holder's kmalloc-512 row");
    let (kernel, user) = (frames(holder, "kernel"), frames(holder, "user"));
    assert!(
        kernel.iter().any(|f| f.contains("key")),
        "the key code in the holder's kernel stack: {kernel:?}"
    );
    assert!(
        user.iter()
            .any(|f| f.contains("leakgen") || f.contains("add_key")),
        "leakgen's frames in the holder's user stack: {user:?}"
    );
}

/// `--folded` weighs each stack by its in-use estimate, as the JSON rows
/// do: the holders' kmalloc-512 lines sum to their estimate (each row
/// rounded to a byte), not to their samples' raw bytes.
fn assert_folded_weighs_estimates(path: &std::path::Path, pids: &[u32], estimate: u64) {
    let text = std::fs::read_to_string(path).expect("the folded file");
    let mut sum = 0u64;
    let mut lines = 0u64;
    for line in text.lines() {
        let Some((stack, weight)) = line.rsplit_once(' ') else {
            continue;
        };
        let holder = pids
            .iter()
            .any(|p| stack.starts_with(&format!("leakgen [{p}];")));
        if holder && stack.ends_with(";[kmalloc-512]") {
            sum += weight.parse::<u64>().expect("a weight");
            lines += 1;
        }
    }
    assert!(
        lines > 0 && sum.abs_diff(estimate) <= lines,
        "folded holders' kmalloc-512 weights {sum} B over {lines} lines vs the estimate {estimate} B:\n{text}"
    );
}

/// Each key the holders add is also a `struct key` from `key_jar`
/// (kmem_cache_alloc). Where the hook carries no cache name (the classic
/// one before 6.18) its samples are labelled by object size with every
/// cache of that size, all of them real caches; elsewhere by name.
fn assert_unnamed_caches_labelled_by_size(rows: &[Value], pids: &[u32], classic: bool) {
    let unnamed = classic && !tracepoint_has_field("kmem", "kmem_cache_alloc", "name");
    let holders: Vec<&str> = rows
        .iter()
        .filter(|r| pids.contains(&(r["tgid"].as_u64().unwrap_or(0) as u32)))
        .filter_map(|r| r["cache"].as_str())
        .collect();
    let by_size: Vec<&str> = holders
        .iter()
        .copied()
        .filter(|c| c.starts_with("cache of "))
        .collect();
    eprintln!("holders' caches: {holders:?}");
    if !unnamed {
        assert!(
            by_size.is_empty(),
            "named hooks name every cache: {holders:?}"
        );
        return;
    }
    let key_jar = std::fs::read_to_string("/sys/kernel/slab/key_jar/slab_size")
        .expect("key_jar's slab_size")
        .trim()
        .to_string();
    let label = by_size
        .iter()
        .find(|c| c.starts_with(&format!("cache of {key_jar} B (")))
        .unwrap_or_else(|| panic!("no key_jar row of {key_jar} B: {holders:?}"));
    let listed = label
        .split_once('(')
        .and_then(|(_, l)| l.strip_suffix(')'))
        .expect("a list of caches");
    for name in listed.split('|').filter(|n| !n.starts_with('+')) {
        assert!(slab_cache_exists(name), "{name} in {label} is no cache");
    }
}

/// The interface `serve` reads: with `--pprof-snapshots`, each `snapshot`
/// line on stdin writes one gzipped Go heap profile to fd 3, its length
/// first (8 bytes, little-endian), and the run goes on; EOF on stdin ends
/// it cleanly. The profile holds a leak made before the request.
#[test]
fn pprof_snapshots_answer_each_request_on_fd_3() {
    let _serial = serial();
    use std::io::{Read, Write};
    use std::os::fd::FromRawFd;
    use std::os::unix::process::CommandExt;

    skip_unless!(kmem_tracepoints(), "{NO_KMEM}");
    let mut fds = [0i32; 2];
    // SAFETY: pipe writes two descriptors into the array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0, "pipe");
    let (read_end, write_end) = (fds[0], fds[1]);
    let mut cmd = Command::new(leaktrace_bin());
    cmd.args([
        "--all-caches",
        "--sample-bytes",
        SAMPLE_BYTES,
        "--pprof-snapshots",
    ])
    .stdin(std::process::Stdio::piped())
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped());
    // SAFETY: dup2 and close are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(write_end, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // When the read end was fd 3, dup2 replaced it already.
            if read_end != 3 {
                libc::close(read_end);
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn leaktrace");
    // SAFETY: both ends are ours; the child has its copy of the write end.
    unsafe { libc::close(write_end) };
    let mut profiles = unsafe { std::fs::File::from_raw_fd(read_end) };
    let mut stderr = std::io::BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    while !line.contains("attached to") {
        line.clear();
        let n = std::io::BufRead::read_line(&mut stderr, &mut line).expect("stderr");
        assert!(n > 0, "leaktrace ended before attaching: {line}");
    }
    let mut gen = Generator::start("keys", "4000").expect("leakgen keys");
    let mut stdin = child.stdin.take().expect("stdin");
    for _ in 0..2 {
        let asked = std::time::Instant::now();
        writeln!(stdin, "snapshot").expect("request");
        stdin.flush().expect("request");
        let mut len = [0u8; 8];
        profiles.read_exact(&mut len).expect("length");
        let mut gz = vec![0u8; u64::from_le_bytes(len) as usize];
        profiles.read_exact(&mut gz).expect("profile");
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "answer in {:?}",
            asked.elapsed()
        );
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut raw)
            .expect("gzip");
        let at = |s: &str| {
            raw.windows(s.len())
                .position(|w| w == s.as_bytes())
                .unwrap_or_else(|| panic!("no {s:?} in the profile"))
        };
        // The string table starts with the sample types, in Go's order.
        assert!(at("alloc_objects") < at("alloc_space"));
        assert!(at("alloc_space") < at("inuse_objects"));
        assert!(at("inuse_objects") < at("inuse_space"));
        for label in ["cache", "pid", "comm", "cgroup", "kmalloc-512", "sampled"] {
            at(label);
        }
    }
    gen.release().expect("release");
    drop(stdin);
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status:?}");
}
