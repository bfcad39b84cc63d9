//! `cargo xtask soak`: leaktrace under an hour-like load for `--secs` (600 by
//! default), as on a node where exec probes and cron jobs churn processes:
//!
//! * a churn generator (`leakgen writev --rate`: transient kmalloc-512),
//! * process churn (`--execs` short-lived `leakgen writev --ops 4` a second,
//!   each allocating and freeing in the traced cache, then exiting),
//! * a slowly growing holder (one more `leakgen keys 100` every minute, held
//!   to the end),
//!
//! under `leaktrace --cache kmalloc-512 --top --json` piped to a file. Every
//! 10 s it records leaktrace's RSS and the memory of its BPF maps; at the end
//! it checks numeric bounds, writes `bench/results/soak-<date>.md` and exits
//! non-zero if a bound failed:
//!
//! * RSS growth after warm-up <= 5 MiB plus the held objects' share (256 B per
//!   object outstanding beyond warm-up): exited processes that hold nothing
//!   must not accumulate. Map memory is reported, not bounded: a preallocated
//!   map proves nothing by staying flat.
//! * no lost events (ring buffer, map full, lost frees, decode errors);
//! * the holders' keys counted exactly at the end.

use std::{
    fmt::Write as _,
    fs::File,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::bench::proc::{rss_kib, Running};

pub struct Options {
    pub secs: u64,
    pub execs: u32,
    /// `leaktrace serve`'s continuous heap sampler instead of `--cache kmalloc-512 --top`.
    pub continuous: bool,
}

const SAMPLE: Duration = Duration::from_secs(10);
const WARM_UP: Duration = Duration::from_secs(60);
const HOLDER_EVERY: Duration = Duration::from_secs(60);
const KEYS_PER_HOLDER: u64 = 100;
const RSS_SLACK_KIB: u64 = 5 * 1024;
const BYTES_PER_HELD_OBJECT: u64 = 256;

struct Sample {
    at_s: u64,
    rss_kib: u64,
    map_kib: u64,
    outstanding: u64,
    processes_exited: u64,
    lost: u64,
}

pub fn run(root: &Path, opts: &Options) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("cargo xtask soak loads BPF programs and must run as root");
    }
    if opts.secs < 2 * WARM_UP.as_secs() {
        bail!(
            "--secs must be at least {} (warm-up is {WARM_UP:?})",
            2 * WARM_UP.as_secs()
        );
    }
    super::cargo(
        root,
        &[
            "build",
            "--release",
            "-p",
            "leaktrace",
            "-p",
            "leaktrace-tests",
            "--bins",
        ],
    )?;
    if opts.continuous {
        return crate::soak_continuous::run(root, opts);
    }
    let leaktrace = root.join("target/release/leaktrace");
    let leakgen = root.join("target/release/leakgen");
    let work = root.join("target/soak");
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let top = work.join("top.jsonl");
    let started = SystemTime::now();
    let load_before = crate::bench::loadavg();

    let mut tracer = Running::spawn(
        {
            let mut c = Command::new(&leaktrace);
            c.args(["--cache", "kmalloc-512", "--top", "--json", "--limit", "30"]);
            c
        },
        "leaktrace",
    )?;
    // --top's output goes to a file, as `leaktrace --top > file` would; the
    // harness reads it back from there rather than through a pipe it must drain.
    let tracer_pid = tracer.pid();
    tracer.wait_for(|l| l.text.contains("attached to"), Duration::from_secs(60))?;
    let out = File::create(&top).with_context(|| format!("creating {}", top.display()))?;
    let copier = spawn_copier(tracer, out);

    let mut load = Load::start(&leakgen, opts, KEYS_PER_HOLDER)?;
    let mut samples = Vec::new();
    let mut next_sample = Instant::now() + SAMPLE;
    while load.running() {
        load.step()?;
        if Instant::now() >= next_sample {
            let last = last_report(&top)?;
            let (_, rss) = rss_kib(tracer_pid)?;
            samples.push(Sample {
                at_s: load.elapsed().as_secs(),
                rss_kib: rss,
                map_kib: map_memlock_kib(tracer_pid),
                outstanding: last
                    .as_ref()
                    .map_or(0, |r| r["totals"]["outstanding"].as_u64().unwrap_or(0)),
                processes_exited: load.execs(),
                lost: last.as_ref().map_or(0, lost_events),
            });
            next_sample += SAMPLE;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let (holders, exec_failures) = load.stop()?;

    // Held keys, as leaktrace's final report (every process, not the
    // `--limit` cut of the live snapshots) saw them while they were still held.
    std::thread::sleep(Duration::from_secs(3));
    let held_expected = KEYS_PER_HOLDER * holders.len() as u64;
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(tracer_pid as i32, libc::SIGINT) };
    let tracer_exit = copier
        .join()
        .map_err(|_| anyhow::anyhow!("output copier panicked"))??;
    let final_report = last_report(&top)?.context("no final report")?;
    let held_seen: u64 = holders
        .iter()
        .map(|h| outstanding_of(&final_report, h.pid()))
        .sum();
    for mut h in holders {
        h.send_line()?;
        h.wait_for(|l| l.text.starts_with("RELEASED"), Duration::from_secs(60))?;
        h.wait()?;
    }

    let verdict = judge(&samples, &final_report, held_expected, held_seen);
    let md = render(
        opts,
        &crate::bench::utc_date(started),
        &load_before,
        &crate::bench::loadavg(),
        &samples,
        &final_report,
        held_expected,
        held_seen,
        exec_failures,
        &tracer_exit,
        &verdict,
        &crate::bench::git_state(root),
    );
    let dir = root.join("bench/results");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("soak-{}.md", crate::bench::utc_date(started)));
    std::fs::write(&path, &md).with_context(|| format!("writing {}", path.display()))?;
    println!("{md}");
    eprintln!("xtask soak: wrote {}", path.display());
    let failed: Vec<&str> = verdict
        .iter()
        .filter(|v| !v.ok)
        .map(|v| v.what.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("soak bounds failed: {}", failed.join("; "));
    }
    Ok(())
}

/// Copies leaktrace's stdout into the file line by line (so the file always
/// ends in a whole JSON line) until it exits; returns its exit status.
fn spawn_copier(mut tracer: Running, mut out: File) -> std::thread::JoinHandle<Result<String>> {
    use std::io::Write;
    std::thread::spawn(move || -> Result<String> {
        loop {
            let done = tracer.check_alive().is_err();
            tracer.drain();
            for l in tracer.lines.drain(..) {
                if l.stream == crate::bench::proc::Stream::Out {
                    writeln!(out, "{}", l.text).context("writing top.jsonl")?;
                }
            }
            if done {
                // The reader threads may still hold the last lines (the final report).
                std::thread::sleep(Duration::from_millis(500));
                tracer.drain();
                for l in tracer.lines.drain(..) {
                    if l.stream == crate::bench::proc::Stream::Out {
                        writeln!(out, "{}", l.text).context("writing top.jsonl")?;
                    }
                }
                return Ok("exited after SIGINT".to_string());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}
/// The load both soaks run: a paced writev churn for `--secs`, `--execs`
/// short-lived processes a second, and one more holder of `keys` keys every
/// [`HOLDER_EVERY`].
pub(crate) struct Load {
    leakgen: PathBuf,
    keys: u64,
    secs: u64,
    begin: Instant,
    churn: Running,
    stop: Arc<AtomicBool>,
    execs: Arc<AtomicU64>,
    exec_thread: std::thread::JoinHandle<u64>,
    pub holders: Vec<Running>,
    next_holder: Instant,
}

impl Load {
    pub fn start(leakgen: &Path, opts: &Options, keys: u64) -> Result<Load> {
        let churn = Running::spawn(
            {
                let mut c = Command::new(leakgen);
                c.args(["writev", &opts.secs.to_string(), "--rate", "20000"]);
                c
            },
            "leakgen writev",
        )?;
        let stop = Arc::new(AtomicBool::new(false));
        let execs = Arc::new(AtomicU64::new(0));
        let exec_thread = spawn_exec_churn(leakgen, opts.execs, stop.clone(), execs.clone());
        Ok(Load {
            leakgen: leakgen.to_path_buf(),
            keys,
            secs: opts.secs,
            begin: Instant::now(),
            churn,
            stop,
            execs,
            exec_thread,
            holders: Vec::new(),
            next_holder: Instant::now(),
        })
    }

    /// Seconds since the load started.
    pub fn elapsed(&self) -> Duration {
        self.begin.elapsed()
    }

    pub fn running(&self) -> bool {
        self.begin.elapsed() < Duration::from_secs(self.secs)
    }

    /// Short-lived processes started so far.
    pub fn execs(&self) -> u64 {
        self.execs.load(Ordering::Relaxed)
    }

    /// Starts the next holder when one is due, and checks the churn (which
    /// ends by itself at `--secs`).
    pub fn step(&mut self) -> Result<()> {
        if Instant::now() >= self.next_holder {
            let mut c = Command::new(&self.leakgen);
            c.args(["keys", &self.keys.to_string()]);
            let mut h = Running::spawn(c, "leakgen keys")?;
            h.wait_for(|l| l.text.starts_with("READY"), Duration::from_secs(60))?;
            self.holders.push(h);
            self.next_holder += HOLDER_EVERY;
        }
        let near_end =
            self.begin.elapsed() + Duration::from_secs(2) >= Duration::from_secs(self.secs);
        self.churn
            .check_alive()
            .or_else(|e| if near_end { Ok(()) } else { Err(e) })
    }

    /// Stops the churn and the short-lived processes; the holders stay.
    /// Returns the holders and how many short-lived processes failed.
    pub fn stop(self) -> Result<(Vec<Running>, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        let exec_failures = self
            .exec_thread
            .join()
            .map_err(|_| anyhow::anyhow!("exec churn thread panicked"))?;
        self.churn.wait().context("the churn generator")?;
        Ok((self.holders, exec_failures))
    }
}

/// Starts `per_sec` short-lived `leakgen writev --ops 4` a second until
/// `stop`; returns how many failed to start or exited non-zero.
pub(crate) fn spawn_exec_churn(
    leakgen: &Path,
    per_sec: u32,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
) -> std::thread::JoinHandle<u64> {
    let leakgen = leakgen.to_owned();
    std::thread::spawn(move || {
        let period = Duration::from_secs_f64(1.0 / f64::from(per_sec.max(1)));
        let mut next = Instant::now();
        let mut children = Vec::new();
        let mut failures = 0;
        while !stop.load(Ordering::Relaxed) {
            match Command::new(&leakgen)
                .args(["writev", "--ops", "4"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
            {
                Ok(c) => children.push(c),
                Err(_) => failures += 1,
            }
            children.retain_mut(|c| match c.try_wait() {
                Ok(Some(st)) => {
                    count.fetch_add(1, Ordering::Relaxed);
                    if !st.success() {
                        failures += 1;
                    }
                    false
                }
                Ok(None) => true,
                Err(_) => false,
            });
            next += period;
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        for mut c in children {
            if !c.wait().is_ok_and(|s| s.success()) {
                failures += 1;
            }
            count.fetch_add(1, Ordering::Relaxed);
        }
        failures
    })
}

/// The last whole JSON line of the file.
fn last_report(path: &Path) -> Result<Option<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok()))
}

/// The key payloads `pid` holds: user_preparse's own kmallocs, not what was
/// allocated on the way (a new slab page's obj_exts vector, RCU-pending
/// keyring edits), which the process total also counts.
fn outstanding_of(report: &Value, pid: u32) -> u64 {
    report["processes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["tgid"].as_u64() == Some(u64::from(pid)))
        .and_then(|p| p["stacks"].as_array())
        .into_iter()
        .flatten()
        // A stratum none of whose objects drew a full stack is a partial row
        // whose kernel stack is its call site alone: user_preparse first.
        .filter(|s| {
            (0..2).any(|i| {
                s["kernel"][i]
                    .as_str()
                    .is_some_and(|f| f.starts_with("user_preparse+"))
            })
        })
        .filter_map(|s| s["outstanding"].as_u64())
        .sum()
}

fn lost_events(r: &Value) -> u64 {
    let k = &r["kernel"];
    [
        &k["allocs_lost_ringbuf"],
        &k["allocs_lost_map_full"],
        &k["frees_lost_ringbuf"],
        &r["anomalies"]["decode_errors"],
        &r["anomalies"]["unmatched_frees"],
    ]
    .iter()
    .map(|v| v.as_u64().unwrap_or(0))
    .sum()
}

/// Sum of `memlock:` over leaktrace's BPF map descriptors (/proc/PID/fdinfo).
pub(crate) fn map_memlock_kib(pid: u32) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0;
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter(|info| info.contains("map_type:"))
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .sum::<u64>()
        / 1024
}

struct Verdict {
    what: String,
    ok: bool,
}

fn judge(samples: &[Sample], report: &Value, held_expected: u64, held_seen: u64) -> Vec<Verdict> {
    let mut v = Vec::new();
    let warm = samples.iter().find(|s| s.at_s >= WARM_UP.as_secs());
    if let (Some(w), Some(end)) = (warm, samples.last()) {
        let share = end.outstanding.saturating_sub(w.outstanding) * BYTES_PER_HELD_OBJECT / 1024;
        let growth = end.rss_kib.saturating_sub(w.rss_kib);
        v.push(Verdict {
            what: format!(
                "RSS growth after warm-up {growth} KiB <= {RSS_SLACK_KIB} KiB + held share {share} KiB"
            ),
            ok: growth <= RSS_SLACK_KIB + share,
        });
    } else {
        v.push(Verdict {
            what: "RSS samples before and after warm-up".into(),
            ok: false,
        });
    }
    let lost = lost_events(report);
    v.push(Verdict {
        what: format!("lost events and anomalies {lost} == 0"),
        ok: lost == 0,
    });
    v.push(Verdict {
        what: format!("held keys seen {held_seen} == {held_expected}"),
        ok: held_seen == held_expected,
    });
    v
}

#[allow(clippy::too_many_arguments)]
fn render(
    opts: &Options,
    date: &str,
    load_before: &str,
    load_after: &str,
    samples: &[Sample],
    report: &Value,
    held_expected: u64,
    held_seen: u64,
    exec_failures: u64,
    tracer_exit: &str,
    verdict: &[Verdict],
    tree: &str,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# leaktrace soak {date}\n");
    let _ = writeln!(
        s,
        "`cargo xtask soak --secs {} --execs {}`: `leakgen writev --rate 20000`, {} short-lived \
         `leakgen writev --ops 4` a second, one more `leakgen keys {KEYS_PER_HOLDER}` held every \
         {}s, under `leaktrace --cache kmalloc-512 --top --json --limit 30` piped to a file.\n",
        opts.secs,
        opts.execs,
        opts.execs,
        HOLDER_EVERY.as_secs()
    );
    let _ = writeln!(s, "tree: {tree}  \nload average before: {load_before}; after: {load_after}  \nleaktrace: {tracer_exit}; exec churn failures: {exec_failures}\n");
    let _ = writeln!(
        s,
        "| t (s) | RSS (KiB) | BPF map memlock (KiB) | outstanding | processes exited |"
    );
    let _ = writeln!(s, "| ---: | ---: | ---: | ---: | ---: |");
    for x in samples {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            x.at_s, x.rss_kib, x.map_kib, x.outstanding, x.processes_exited
        );
    }
    let _ = writeln!(s, "\nlost per sample (sum of ring-buffer/map-full/free losses, decode errors, unmatched frees): {:?}\n", samples.iter().map(|x| x.lost).collect::<Vec<_>>());
    let _ = writeln!(
        s,
        "final report: totals {}, kernel {}, anomalies {}  \nheld keys: expected {held_expected}, seen {held_seen}\n",
        report["totals"], report["kernel"], report["anomalies"]
    );
    let _ = writeln!(s, "| bound | result |\n| --- | --- |");
    for x in verdict {
        let _ = writeln!(s, "| {} | {} |", x.what, if x.ok { "ok" } else { "FAILED" });
    }
    s
}
