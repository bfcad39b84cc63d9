//! The userspace side of leaktrace: CPU at a given event rate, RSS with 1 M
//! outstanding objects, a known leak found, loss at the highest rate two
//! generators drive, and attach latency.

use std::{collections::BTreeSet, fmt::Write as _, process::Command, time::Duration};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::{
    generate, json_u64, median, met, proc::cpu_secs, proc::rss_kib, proc::rss_outside_bpf_maps_kib,
    proc::Running, proc::Stream, prog_ids, wait_progs_gone, Bins, READY_TIMEOUT,
};

const RATE_SECS: f64 = 5.0;
/// alloc + free = 2 events an op: 50 k ops/s is the 100 k events/s.
const PACED_OPS: &str = "50000";
/// Issue 27: `--all-caches` at 100 k slab allocations/s (one a writev).
const ALL_CACHES_OPS: &str = "100000";
/// Issue 27's bounds for `--all-caches` at the default rate.
const ALL_CACHES_CPU_PCT: f64 = 0.5;
const ALL_CACHES_RSS_KIB: u64 = 32 * 1024;
const HELD_OBJECTS: u64 = 1_000_000;
const KNOWN_LEAK: u64 = 1000;
const ATTACH_RUNS: usize = 5;
const HOLD_TIMEOUT: Duration = Duration::from_secs(120);
/// Three snapshot intervals: enough for a tracer that keeps up.
const CATCH_UP_TIMEOUT: Duration = Duration::from_millis(1500);

pub struct CpuAt {
    events_per_sec: f64,
    pct: f64,
    /// leaktrace's resident memory outside its mapped BPF maps (which are
    /// kernel memory, counted with the maps) at the end of the run.
    rss_kib: u64,
}

pub struct Rss {
    hwm_kib: u64,
    rss_kib: u64,
    outstanding: u64,
    generators: u64,
    allocs_lost_ringbuf: Option<u64>,
}

pub struct Loss {
    label: &'static str,
    matched_per_sec: f64,
    allocs_lost_ringbuf: u64,
    frees_lost_ringbuf: u64,
    allocs_lost_map_full: u64,
}

pub struct Attach {
    attached_ms: Vec<f64>,
    first_screen_ms: Vec<f64>,
}

/// BPF run time per program run (kernel.bpf_stats_enabled on only while
/// measuring), and the kernel memory of leaktrace's maps while it runs.
pub struct BpfCost {
    label: &'static str,
    /// (program name, runs, ns per run)
    programs: Vec<(String, u64, f64)>,
    allocs_matched: Option<u64>,
    /// Total ns of every program / matched allocations.
    ns_per_matched_alloc: Option<f64>,
    /// `--all-caches`, where every slab allocation runs the programs but only
    /// samples are matched: total ns / slab allocations (each allocation hook
    /// runs its main program and its spare, so half their runs).
    ns_per_alloc: Option<f64>,
    map_bytes: u64,
}

pub struct Extras {
    bpf_cost: Vec<Result<BpfCost>>,
    cpu_paced: Result<CpuAt>,
    cpu_max: Result<CpuAt>,
    cpu_all_caches: Result<CpuAt>,
    rss: Result<Rss>,
    leak: Result<u64>,
    loss: Vec<Result<Loss>>,
    attach: Result<Attach>,
}

pub fn measure(bins: &Bins) -> Result<Extras> {
    let step = |what: &str| eprintln!("xtask bench: measuring {what}");
    step("userspace CPU at 100k events/s");
    let one_cache = ["--cache", "kmalloc-512"];
    let cpu_paced = cpu_at(bins, &one_cache, Some(PACED_OPS), 2.0);
    step("userspace CPU at the max rate");
    let cpu_max = cpu_at(bins, &one_cache, None, 2.0);
    step("userspace CPU under --all-caches at 100k allocations/s");
    let cpu_all_caches = cpu_at(bins, &["--all-caches"], Some(ALL_CACHES_OPS), 1.0);
    step("RSS at 1M outstanding");
    let rss = rss_at_million(bins);
    step("a known leak");
    let leak = known_leak(bins);
    step("loss at the highest rate");
    let loss = vec![
        loss(bins, "default", &[]),
        loss(bins, "--exact", &["--exact"]),
    ];
    step("attach latency");
    let attach = attach(bins);
    step("BPF run time per event and map memory");
    let bpf_cost = vec![
        bpf_cost(bins, "default", &["--cache", "kmalloc-512"]),
        bpf_cost(bins, "--exact", &["--cache", "kmalloc-512", "--exact"]),
        bpf_cost(bins, "--all-caches", &["--all-caches"]),
    ];
    Ok(Extras {
        bpf_cost,
        cpu_paced,
        cpu_max,
        cpu_all_caches,
        rss,
        leak,
        loss,
        attach,
    })
}

fn leaktrace(bins: &Bins, args: &[&str]) -> Result<Running> {
    let mut cmd = Command::new(&bins.leaktrace);
    cmd.args(args);
    let mut t = Running::spawn(cmd, "leaktrace")?;
    t.wait_for(|l| l.text.contains("attached to"), READY_TIMEOUT)?;
    Ok(t)
}

/// leaktrace's own CPU while one writev generator runs (paced or flat out);
/// `events_per_op`: what one writev counts as (an allocation and its free
/// are 2 events of a traced cache, 1 slab allocation under --all-caches).
fn cpu_at(bins: &Bins, args: &[&str], rate: Option<&str>, events_per_op: f64) -> Result<CpuAt> {
    let before = prog_ids()?;
    let t = leaktrace(bins, args)?;
    let cpu0 = cpu_secs(t.pid())?;
    let extra: Vec<&str> = rate.map(|r| vec!["--rate", r]).unwrap_or_default();
    let gen = generate(bins, "writev", RATE_SECS, &extra);
    let cpu1 = cpu_secs(t.pid());
    let rss = rss_outside_bpf_maps_kib(t.pid()).context("reading leaktrace's smaps");
    t.stop()?;
    wait_progs_gone(&before);
    let gen = gen?;
    Ok(CpuAt {
        events_per_sec: events_per_op * gen.ops_per_sec,
        pct: 100.0 * (cpu1? - cpu0) / gen.secs,
        rss_kib: rss?,
    })
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// One writev generator under leaktrace with BPF run-time stats on: ns per
/// program run and per matched allocation, and the bytes of its maps
/// (bpftool's bytes_memlock, which is what the kernel charges).
fn bpf_cost(bins: &Bins, label: &'static str, args: &[&str]) -> Result<BpfCost> {
    let before = prog_ids()?;
    let old = std::fs::read_to_string(BPF_STATS).unwrap_or_else(|_| "0".into());
    std::fs::write(BPF_STATS, "1").with_context(|| format!("enabling {BPF_STATS}"))?;
    let result = (|| {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let t = leaktrace(bins, &all)?;
        let gen = generate(bins, "writev", RATE_SECS, &[]);
        let ids: Vec<u32> = prog_ids()?.difference(&before).copied().collect();
        let mut programs = Vec::new();
        let mut map_ids = BTreeSet::new();
        for id in &ids {
            let v = bpftool(&["prog", "show", "id", &id.to_string()])?;
            let name = v["name"].as_str().unwrap_or("?").to_string();
            let runs = v["run_cnt"].as_u64().unwrap_or(0);
            let ns = v["run_time_ns"].as_u64().unwrap_or(0);
            programs.push((
                name,
                runs,
                if runs > 0 {
                    ns as f64 / runs as f64
                } else {
                    0.0
                },
            ));
            for m in v["map_ids"].as_array().into_iter().flatten() {
                map_ids.extend(m.as_u64());
            }
        }
        let mut map_bytes = 0;
        for id in &map_ids {
            let v = bpftool(&["map", "show", "id", &id.to_string()])?;
            map_bytes += v["bytes_memlock"].as_u64().unwrap_or(0);
        }
        let total_ns: f64 = programs.iter().map(|(_, r, ns)| *r as f64 * ns).sum();
        // Names are cut at 15 characters: kmalloc_raw(_spare), kmem_cache_alloc_{raw,btf}(_spare).
        let alloc_runs: u64 = programs
            .iter()
            .filter(|(n, ..)| n.starts_with("kmalloc_raw") || n.starts_with("kmem_cache_allo"))
            .map(|(_, r, _)| r)
            .sum::<u64>()
            / 2;
        let ns_per_alloc = (args.contains(&"--all-caches") && alloc_runs > 0)
            .then(|| total_ns / alloc_runs as f64);
        let lines = t.stop()?;
        gen?;
        let allocs_matched = lines
            .iter()
            .filter(|l| l.stream == Stream::Out && l.text.starts_with('{'))
            .filter_map(|l| serde_json::from_str::<Value>(&l.text).ok())
            .next_back()
            .and_then(|v| json_u64(&v, "kernel.allocs_matched"));
        Ok(BpfCost {
            label,
            programs,
            ns_per_matched_alloc: allocs_matched
                .filter(|&n| n > 0)
                .map(|n| total_ns / n as f64),
            ns_per_alloc,
            allocs_matched,
            map_bytes,
        })
    })();
    let _ = std::fs::write(BPF_STATS, old.trim());
    wait_progs_gone(&before);
    result
}

fn bpftool(args: &[&str]) -> Result<Value> {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .context("running bpftool (cargo xtask setup installs it)")?;
    if !out.status.success() {
        bail!(
            "bpftool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("parsing bpftool's JSON")
}

/// JSON lines on stdout so far, parsed.
fn json_lines(t: &Running) -> impl Iterator<Item = Value> + '_ {
    t.lines
        .iter()
        .filter(|l| l.stream == Stream::Out && l.text.starts_with('{'))
        .filter_map(|l| serde_json::from_str(&l.text).ok())
}

/// Outstanding objects of process `pid` in a JSON report.
fn outstanding_of(v: &Value, pid: u32) -> Option<u64> {
    v.get("processes")?
        .as_array()?
        .iter()
        .find(|p| p.get("tgid").and_then(Value::as_u64) == Some(u64::from(pid)))
        .and_then(|p| json_u64(p, "outstanding"))
}

/// Outstanding objects of the processes `pids` in the newest JSON snapshot
/// that lists any of them.
fn outstanding_of_all(t: &Running, pids: &[u32]) -> Option<u64> {
    json_lines(t)
        .filter_map(|v| {
            let found: Vec<u64> = pids.iter().filter_map(|&p| outstanding_of(&v, p)).collect();
            (!found.is_empty()).then(|| found.iter().sum())
        })
        .last()
}

/// RLIMIT_NOFILE's hard limit: without CAP_SYS_RESOURCE (containers) it cannot
/// be raised, so 1 M files are spread over as many generators as needed.
fn nofile_hard() -> Result<u64> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: rl is a valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    Ok(rl.rlim_max)
}

/// Room leakgen needs beside its held fds (stdio, /proc reads, fd table slack).
const FD_HEADROOM: u64 = 64;

fn rss_at_million(bins: &Bins) -> Result<Rss> {
    let per_gen = nofile_hard()?.saturating_sub(FD_HEADROOM).min(HELD_OBJECTS);
    if per_gen < 1000 {
        bail!("RLIMIT_NOFILE's hard limit is too low to hold files");
    }
    let n_gens = HELD_OBJECTS.div_ceil(per_gen);
    let before = prog_ids()?;
    let limit = (n_gens + 10).to_string();
    let mut t = leaktrace(
        bins,
        &[
            "--cache",
            "filp",
            "--json",
            "--top",
            "--interval",
            "500ms",
            "--limit",
            &limit,
            // Sized for the million held (the default follows the cache's size).
            "--max-objects",
            "1048576",
        ],
    )?;
    let mut gens = Vec::new();
    let seen = hold_files(bins, &mut t, &mut gens, per_gen);
    let rss = rss_kib(t.pid());
    for g in gens {
        release(g)?;
    }
    let lines = t.stop()?;
    wait_progs_gone(&before);
    let outstanding = seen?;
    let (hwm_kib, rss_kib) = rss?;
    let lost = lines
        .iter()
        .rev()
        .filter(|l| l.stream == Stream::Out)
        .find_map(|l| serde_json::from_str::<Value>(&l.text).ok())
        .and_then(|v| json_u64(&v, "kernel.allocs_lost_ringbuf"));
    Ok(Rss {
        hwm_kib,
        rss_kib,
        outstanding,
        generators: n_gens,
        allocs_lost_ringbuf: lost,
    })
}

/// Starts generators one at a time until HELD_OBJECTS files are held, each
/// after the tracer has caught up with the previous ones: 1 M opens at once
/// overrun the default ring buffer, which would measure loss, not memory.
/// Returns the last outstanding count seen for all of them.
fn hold_files(bins: &Bins, t: &mut Running, gens: &mut Vec<Running>, per_gen: u64) -> Result<u64> {
    let mut held = 0;
    let mut pids = Vec::new();
    let mut seen = None;
    while held < HELD_OBJECTS {
        let n = per_gen.min(HELD_OBJECTS - held);
        let mut cmd = Command::new(&bins.leakgen);
        cmd.args(["files", &n.to_string()]);
        let mut g = Running::spawn(cmd, "leakgen files")?;
        g.wait_for(|l| l.text.starts_with("READY "), HOLD_TIMEOUT)?;
        pids.push(g.pid());
        gens.push(g);
        held += n;
        seen = wait_seen(t, &pids, held, CATCH_UP_TIMEOUT);
    }
    seen.context("no JSON snapshot mentioned the generators")
}

/// Polls the tracer's snapshots until `pids` hold `want` objects or `timeout`
/// passes; returns the last count seen.
fn wait_seen(t: &mut Running, pids: &[u32], want: u64, timeout: Duration) -> Option<u64> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        std::thread::sleep(Duration::from_millis(100));
        t.drain();
        let seen = outstanding_of_all(t, pids);
        if seen.is_some_and(|n| n >= want) || std::time::Instant::now() >= deadline {
            return seen;
        }
    }
}

/// Lets a hold-mode generator release its objects and exit.
fn release(mut gen: Running) -> Result<()> {
    gen.send_line()?;
    gen.wait_for(|l| l.text.starts_with("RELEASED "), HOLD_TIMEOUT)?;
    gen.wait()?;
    Ok(())
}

/// N held keys (kmalloc-512) under default settings: how many are reported.
/// The count is taken from a snapshot at least two intervals after READY, so
/// it is what an on-call engineer would read, not the best of many.
fn known_leak(bins: &Bins) -> Result<u64> {
    let before = prog_ids()?;
    let mut t = leaktrace(
        bins,
        &[
            "--cache",
            "kmalloc-512",
            "--json",
            "--top",
            "--interval",
            "500ms",
        ],
    )?;
    let mut cmd = Command::new(&bins.leakgen);
    cmd.args(["keys", &KNOWN_LEAK.to_string()]);
    let mut gen = Running::spawn(cmd, "leakgen keys")?;
    let ready = gen.wait_for(|l| l.text.starts_with("READY "), HOLD_TIMEOUT)?;
    std::thread::sleep(Duration::from_millis(1700));
    t.drain();
    let pid = gen.pid();
    let reported = t
        .lines
        .iter()
        .filter(|l| l.at >= ready.at + Duration::from_millis(1000))
        .filter_map(|l| serde_json::from_str::<Value>(&l.text).ok())
        .find_map(|v| outstanding_of(&v, pid));
    release(gen)?;
    t.stop()?;
    wait_progs_gone(&before);
    reported.context("no JSON snapshot after READY mentioned the generator")
}

/// Two flat-out writev generators (one per core) under leaktrace, and its
/// final report's loss counters.
fn loss(bins: &Bins, label: &'static str, extra: &[&str]) -> Result<Loss> {
    let before = prog_ids()?;
    let args: Vec<&str> = ["--cache", "kmalloc-512", "--json"]
        .iter()
        .chain(extra)
        .copied()
        .collect();
    let t = leaktrace(bins, &args)?;
    let gens = std::thread::scope(|s| {
        let a = s.spawn(|| generate(bins, "writev", RATE_SECS, &[]));
        let b = s.spawn(|| generate(bins, "writev", RATE_SECS, &[]));
        [a.join(), b.join()]
    });
    let lines = t.stop()?;
    wait_progs_gone(&before);
    let mut secs: f64 = 0.0;
    for g in gens {
        let g = g.map_err(|_| anyhow::anyhow!("a generator thread panicked"))??;
        secs = secs.max(g.secs);
    }
    let last = lines
        .iter()
        .rev()
        .filter(|l| l.stream == Stream::Out)
        .find_map(|l| serde_json::from_str::<Value>(&l.text).ok())
        .context("leaktrace printed no final JSON report")?;
    let k = |f: &str| {
        json_u64(&last, &format!("kernel.{f}"))
            .with_context(|| format!("no kernel.{f} in the final report"))
    };
    Ok(Loss {
        label,
        // Events during the generators' window; the little traffic before and
        // after it is counted too, which is noise at these rates.
        matched_per_sec: (k("allocs_matched")? + k("frees_matched")?) as f64 / secs,
        allocs_lost_ringbuf: k("allocs_lost_ringbuf")?,
        frees_lost_ringbuf: k("frees_lost_ringbuf")?,
        allocs_lost_map_full: k("allocs_lost_map_full")?,
    })
}

/// spawn -> `attached` on stderr, and spawn -> first JSON screen on stdout.
fn attach(bins: &Bins) -> Result<Attach> {
    let mut a = Attach {
        attached_ms: vec![],
        first_screen_ms: vec![],
    };
    for _ in 0..ATTACH_RUNS {
        let before = prog_ids()?;
        let mut t = leaktrace(
            bins,
            &[
                "--cache",
                "kmalloc-512",
                "--top",
                "--json",
                "--interval",
                "200ms",
            ],
        )?;
        let attached = t.wait_for(|l| l.text.contains("attached to"), READY_TIMEOUT)?;
        let screen = t.wait_for(
            |l| l.stream == Stream::Out && l.text.starts_with('{'),
            READY_TIMEOUT,
        )?;
        let ms = |at: std::time::Instant| (at - t.spawned).as_secs_f64() * 1000.0;
        a.attached_ms.push(ms(attached.at));
        a.first_screen_ms.push(ms(screen.at));
        t.stop()?;
        wait_progs_gone(&before);
    }
    Ok(a)
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

impl Extras {
    /// Nothing measured, for tests of the report.
    #[cfg(test)]
    pub fn empty() -> Self {
        fn none<T>() -> Result<T> {
            Err(anyhow::anyhow!("not measured"))
        }
        Extras {
            bpf_cost: vec![],
            cpu_paced: none(),
            cpu_max: none(),
            cpu_all_caches: none(),
            rss: none(),
            leak: none(),
            loss: vec![],
            attach: none(),
        }
    }

    pub fn render(&self, s: &mut String) {
        let _ = writeln!(s, "## leaktrace's own costs\n");
        for c in &self.bpf_cost {
            match c {
                Ok(c) => {
                    let progs: Vec<String> = c
                        .programs
                        .iter()
                        .map(|(n, r, ns)| format!("{n} {ns:.0} ns x {r}"))
                        .collect();
                    let _ = writeln!(
                        s,
                        "- BPF run time, {} (`kernel.bpf_stats_enabled=1` only for this run, one writev \
                         generator for {RATE_SECS} s): {} ns of BPF per matched allocation ({} matched); \
                         per program run: {}; leaktrace's BPF maps: {:.1} MiB (bytes_memlock)",
                        c.label,
                        c.ns_per_matched_alloc
                            .map_or_else(|| "?".to_string(), |n| format!("{n:.0}")),
                        c.allocs_matched.map_or_else(|| "?".to_string(), |n| n.to_string()),
                        progs.join(", "),
                        c.map_bytes as f64 / (1024.0 * 1024.0)
                    );
                    if let Some(ns) = c.ns_per_alloc {
                        let _ = writeln!(
                            s,
                            "- {}: {ns:.0} ns of BPF per slab allocation (its free included), i.e. \
                             {:.2} CPU-s per million allocations, whatever the cache: a node allocating \
                             N per second pays N × {ns:.0} ns of CPU each second",
                            c.label,
                            ns / 1000.0
                        );
                    }
                }
                Err(e) => {
                    let _ = writeln!(s, "- BPF run time: failed: {e:#}");
                }
            }
        }
        let cpu = |r: &Result<CpuAt>| match r {
            Ok(c) => format!(
                "{:.1}% of one core at {:.0} events/s",
                c.pct, c.events_per_sec
            ),
            Err(e) => format!("failed: {e:#}"),
        };
        let _ = writeln!(
            s,
            "- userspace CPU (utime+stime from /proc/PID/stat over the generator's {RATE_SECS} s; \
             `leakgen writev --rate {PACED_OPS}`): {}",
            cpu(&self.cpu_paced)
        );
        let _ = writeln!(
            s,
            "- userspace CPU, one unpaced writev generator: {}",
            cpu(&self.cpu_max)
        );
        let _ = writeln!(
            s,
            "- userspace CPU under `--all-caches` (default --sample-bytes; \
             `leakgen writev --rate {ALL_CACHES_OPS}`, one kmalloc-512 allocation an op; \
             events here are slab allocations): {}{}",
            cpu(&self.cpu_all_caches),
            self.cpu_all_caches
                .as_ref()
                .map_or(String::new(), |c| format!(
                    "; RSS outside its mapped BPF maps {:.1} MiB at the end (the maps: the \
                     --all-caches BPF run time line)",
                    c.rss_kib as f64 / 1024.0
                ))
        );
        match &self.rss {
            Ok(r) => {
                let _ = writeln!(
                    s,
                    "- memory with {} outstanding `filp` objects seen in a JSON snapshot \
                     ({} `leakgen files` processes holding {HELD_OBJECTS} in all, as \
                     RLIMIT_NOFILE's hard limit cannot be raised without CAP_SYS_RESOURCE; \
                     `--cache filp --json --top --interval 500ms`, each started once the previous ones \
                     showed up): VmHWM {:.1} MiB, VmRSS {:.1} MiB; allocs_lost_ringbuf {}",
                    r.outstanding,
                    r.generators,
                    r.hwm_kib as f64 / 1024.0,
                    r.rss_kib as f64 / 1024.0,
                    r.allocs_lost_ringbuf
                        .map_or("not in the final report".into(), |n| n.to_string())
                );
            }
            Err(e) => {
                let _ = writeln!(s, "- memory at 1 M outstanding: failed: {e:#}");
            }
        }
        match &self.leak {
            Ok(n) => {
                let _ = writeln!(
                    s,
                    "- known leak: `leakgen keys {KNOWN_LEAK}` holds {KNOWN_LEAK} kmalloc-512 \
                     payloads; the snapshot 1 s after READY reported {n}"
                );
            }
            Err(e) => {
                let _ = writeln!(s, "- known leak: failed: {e:#}");
            }
        }
        for l in &self.loss {
            match l {
                Ok(l) => {
                    let _ = writeln!(
                        s,
                        "- loss, two unpaced writev generators, leaktrace {}: {:.0} matched \
                         events/s; allocs_lost_ringbuf {}, frees_lost_ringbuf {}, \
                         allocs_lost_map_full {}",
                        l.label,
                        l.matched_per_sec,
                        l.allocs_lost_ringbuf,
                        l.frees_lost_ringbuf,
                        l.allocs_lost_map_full
                    );
                }
                Err(e) => {
                    let _ = writeln!(s, "- loss: failed: {e:#}");
                }
            }
        }
        match &self.attach {
            Ok(a) => {
                let mut att = a.attached_ms.clone();
                let mut scr = a.first_screen_ms.clone();
                let _ = writeln!(
                    s,
                    "- attach latency over {ATTACH_RUNS} runs (min / median): spawn -> `attached` \
                     {:.0} / {:.0} ms; spawn -> first `--top --json --interval 200ms` line \
                     {:.0} / {:.0} ms",
                    min(&att),
                    median(&mut att),
                    min(&scr),
                    median(&mut scr)
                );
            }
            Err(e) => {
                let _ = writeln!(s, "- attach latency: failed: {e:#}");
            }
        }
        s.push('\n');
    }

    pub fn render_targets(&self, s: &mut String) {
        let row = |s: &mut String, target: &str, measured: String, ok: Option<bool>| {
            let _ = writeln!(s, "| {target} | {measured} | {} |", met(ok));
        };
        match &self.leak {
            Ok(n) => row(
                s,
                "100% of a known leak found",
                format!("{n} of {KNOWN_LEAK}"),
                Some(*n == KNOWN_LEAK),
            ),
            Err(e) => row(s, "100% of a known leak found", format!("{e:#}"), None),
        }
        if let Some(Ok(l)) = self.loss.first() {
            let lost = l.allocs_lost_ringbuf + l.frees_lost_ringbuf + l.allocs_lost_map_full;
            row(
                s,
                "0 lost at 1 M matched events/s, or an exact loss count",
                format!(
                    "{lost} lost at {:.2} M matched events/s (exact counters)",
                    l.matched_per_sec / 1e6
                ),
                Some(true),
            );
        }
        match &self.cpu_paced {
            Ok(c) => row(
                s,
                "userspace <= 10% of a core at 100 k events/s",
                format!("{:.1}%", c.pct),
                Some(c.pct <= 10.0),
            ),
            Err(e) => row(s, "userspace <= 10% of a core", format!("{e:#}"), None),
        }
        let all_caches_cpu = "--all-caches: userspace <= 0.5% of a core at 100 k allocations/s";
        match &self.cpu_all_caches {
            Ok(c) => {
                row(
                    s,
                    all_caches_cpu,
                    format!("{:.2}% at {:.0} allocations/s", c.pct, c.events_per_sec),
                    Some(c.pct <= ALL_CACHES_CPU_PCT),
                );
                row(
                    s,
                    "--all-caches: RSS (outside mapped BPF maps) <= 32 MiB at the default rate",
                    format!("{:.1} MiB", c.rss_kib as f64 / 1024.0),
                    Some(c.rss_kib <= ALL_CACHES_RSS_KIB),
                );
            }
            Err(e) => row(s, all_caches_cpu, format!("{e:#}"), None),
        }
        if let Some(Ok(c)) = self
            .bpf_cost
            .iter()
            .find(|c| c.as_ref().is_ok_and(|c| c.label == "--all-caches"))
        {
            row(
                s,
                "--all-caches: BPF maps <= 16 MiB at the default rate",
                format!(
                    "{:.1} MiB (bytes_memlock)",
                    c.map_bytes as f64 / (1 << 20) as f64
                ),
                Some(c.map_bytes <= 16 << 20),
            );
        }
        match &self.rss {
            Ok(r) => row(
                s,
                "RSS <= 150 MB at 1 M outstanding",
                format!(
                    "VmHWM {:.1} MiB ({} outstanding seen)",
                    r.hwm_kib as f64 / 1024.0,
                    r.outstanding
                ),
                Some(r.hwm_kib <= 150 * 1000 * 1000 / 1024 && r.outstanding >= HELD_OBJECTS),
            ),
            Err(e) => row(s, "RSS <= 150 MB", format!("{e:#}"), None),
        }
        match &self.attach {
            Ok(a) => {
                let mut scr = a.first_screen_ms.clone();
                let m = median(&mut scr);
                row(
                    s,
                    "attach to first screen < 1 s",
                    format!("{m:.0} ms median"),
                    Some(m < 1000.0),
                )
            }
            Err(e) => row(s, "attach to first screen < 1 s", format!("{e:#}"), None),
        }
    }
}
