//! `cargo xtask bench`: what leaktrace costs the kernel's allocator, next to an
//! empty-program floor and the peers installed on this machine, plus the
//! userspace side (CPU, RSS, loss, attach latency). Writes
//! `bench/results/<date>.md`.
//!
//! The machine is noisy (other builds, QEMU guests), so configurations run in
//! interleaved rounds and every traced run is compared with the untraced run of
//! the same round; the generator reports its thread's CPU fraction so a run
//! that was preempted rather than slowed by tracing is repeated.

mod extras;
mod pages;
mod peers;
pub(crate) mod proc;

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use extras::Extras;
use proc::{prog_ids, Running, Stream};

/// A run whose generator thread got less CPU than this was preempted.
const MIN_CPU: f64 = 0.9;
/// A stopped tracer's programs normally vanish within milliseconds; past this
/// something else (another engineer's tracer) is loading programs too.
const PROGS_GONE_TIMEOUT: Duration = Duration::from_secs(10);
const READY_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Options {
    pub rounds: usize,
    pub secs: f64,
    /// Another leaktrace binary (e.g. built at an issue's start) run in the
    /// same rounds as [`BASELINE`], so a change's cost is read side by side.
    pub baseline: Option<PathBuf>,
    /// Only the page source's rows (`bench/pages.rs`), printed and written
    /// to bench/results/pages-<date>.md.
    pub pages_only: bool,
}

/// The configuration that runs `--baseline`'s binary in its default mode.
const BASELINE: &str = "leaktrace (baseline)";

#[derive(Clone, Copy, PartialEq)]
pub enum Workload {
    Writev,
    Writev256,
    Inotify,
}

impl Workload {
    const ALL: [Workload; 3] = [Workload::Writev, Workload::Writev256, Workload::Inotify];

    fn mode(self) -> &'static str {
        match self {
            Workload::Writev => "writev",
            Workload::Writev256 => "writev256",
            Workload::Inotify => "inotify-churn",
        }
    }

    /// The cache a leak hunter would trace for this workload: writev256 is the
    /// filter-miss twin of writev, so it is traced as kmalloc-512 too.
    fn cache(self) -> &'static str {
        match self {
            Workload::Writev | Workload::Writev256 => "kmalloc-512",
            Workload::Inotify => "kmalloc-cg-512",
        }
    }

    /// Issue 11's targets for the default mode: the share of untraced
    /// throughput kept (writev, inotify-churn), or for the filter miss
    /// (writev256) the most its overhead may be as a multiple of the
    /// empty-program floor's.
    fn target(self) -> Target {
        match self {
            Workload::Writev => Target::Keeps(0.30),
            Workload::Writev256 => Target::FloorMultiple(1.1),
            Workload::Inotify => Target::Keeps(0.60),
        }
    }
}

#[derive(Clone, Copy)]
enum Target {
    Keeps(f64),
    FloorMultiple(f64),
}

/// How to tell that a tracer is attached.
#[derive(Clone)]
pub enum Ready {
    /// A line on stdout or stderr containing this.
    Line(&'static str),
    /// A line, then this long for attachments the tool makes after saying so.
    LineThenSettle(&'static str, Duration),
    /// No readiness line: wait this long.
    Settle(Duration),
}

/// One traced configuration: a command line per workload.
#[derive(Clone)]
pub struct Tracer {
    pub name: String,
    pub program: PathBuf,
    /// `{cache}` is replaced by the workload's cache.
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub ready: Ready,
}

impl Tracer {
    fn command(&self, w: Workload) -> std::process::Command {
        let mut cmd = std::process::Command::new(&self.program);
        cmd.args(self.args.iter().map(|a| a.replace("{cache}", w.cache())));
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }
}

struct Bins {
    leaktrace: PathBuf,
    leakgen: PathBuf,
}

/// One generator run.
#[derive(Clone, Copy, Debug)]
struct Sample {
    ops_per_sec: f64,
    secs: f64,
    cpu: f64,
}

struct Cell {
    workload: Workload,
    config: String,
    round: usize,
    sample: Sample,
}

pub fn run(root: &Path, opts: &Options) -> Result<()> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("cargo xtask bench loads BPF programs and must run as root");
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
    let bins = Bins {
        leaktrace: root.join("target/release/leaktrace"),
        leakgen: root.join("target/release/leakgen"),
    };
    if opts.pages_only {
        let started = SystemTime::now();
        let rows = pages::measure(&bins, opts.rounds, opts.secs)?;
        let mut md = format!(
            "# leaktrace page-source benchmark, {}\n\n- command: `cargo xtask bench --pages-only --rounds {} --secs {}`\n- code: {}\n- load average at end {}\n\n",
            utc_date(started),
            opts.rounds,
            opts.secs,
            git_state(root),
            loadavg()
        );
        rows.render(&mut md);
        let dir = root.join("bench/results");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(format!("pages-{}.md", utc_date(started)));
        std::fs::write(&path, &md).with_context(|| format!("writing {}", path.display()))?;
        println!("{md}");
        eprintln!("xtask bench: wrote {}", path.display());
        return Ok(());
    }
    let work = root.join("target/bench");
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;

    let started = SystemTime::now();
    let load_before = loadavg();
    let foreign = prog_ids()?.len();
    let (peer_tracers, mut skipped) = peers::prepare(&work);
    let mut configs = leaktrace_configs(&bins);
    if let Some(program) = &opts.baseline {
        if !program.is_file() {
            bail!("--baseline {}: no such file", program.display());
        }
        configs.push(Tracer {
            name: BASELINE.into(),
            program: program.clone(),
            args: vec!["--cache".into(), "{cache}".into()],
            env: vec![],
            ready: Ready::Line("attached to"),
        });
    }
    configs.extend(peer_tracers);

    let hooks = hooks_line(&bins)?;
    let cells = run_rounds(&bins, &configs, opts, &mut skipped)?;
    let page_rows = pages::measure(&bins, opts.rounds, opts.secs)?;
    let extras = extras::measure(&bins)?;
    let load_after = loadavg();

    let report = Report {
        command: format!(
            "cargo xtask bench --rounds {} --secs {}{}",
            opts.rounds,
            opts.secs,
            opts.baseline
                .as_ref()
                .map_or_else(String::new, |b| format!(" --baseline {}", b.display()))
        ),
        date: utc_date(started),
        hooks,
        load_before,
        load_after,
        foreign_progs: foreign,
        opts,
        configs: configs.iter().map(|c| c.name.clone()).collect(),
        cells,
        skipped,
        extras,
        page_rows,
        tree: git_state(root),
    };
    let md = report.render();
    let dir = root.join("bench/results");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{}.md", report.date));
    std::fs::write(&path, &md).with_context(|| format!("writing {}", path.display()))?;
    println!("{md}");
    eprintln!("xtask bench: wrote {}", path.display());
    Ok(())
}

/// One empty program per hook leaktrace attaches: what observing the hooks
/// at all costs.
const FLOOR: &str = "floor (empty progs)";

/// The floor plus a second empty program wherever leaktrace runs a spare (the
/// programs that catch events the kernel skips for recursion): the least a
/// tracer costs that may not miss a free nested in its own program.
const FLOOR_SPARES: &str = "floor + spares (empty progs)";

fn leaktrace_configs(bins: &Bins) -> Vec<Tracer> {
    let lt = |name: &str, extra: &[&str]| Tracer {
        name: name.into(),
        program: bins.leaktrace.clone(),
        args: ["--cache", "{cache}"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect(),
        env: vec![],
        ready: Ready::Line("attached to"),
    };
    vec![
        lt(FLOOR, &["--floor"]),
        lt(FLOOR_SPARES, &["--floor-spares"]),
        lt("leaktrace", &[]),
        lt("leaktrace --exact", &["--exact"]),
        // The per-CPU source beside a slab workload: it hooks per-CPU
        // allocations only, so the slab path must not notice it.
        Tracer {
            name: PERCPU.into(),
            program: bins.leaktrace.clone(),
            args: vec!["--percpu".into()],
            env: vec![],
            ready: Ready::Line("attached to"),
        },
        // The floor + spares on --all-caches's own hooks: it hooks
        // kmem_cache_alloc too, which a kmalloc cache's run does not.
        Tracer {
            name: FLOOR_ALL_CACHES.into(),
            program: bins.leaktrace.clone(),
            args: vec!["--all-caches".into(), "--floor-spares".into()],
            env: vec![],
            ready: Ready::Line("attached to"),
        },
        // Every cache sampled at the default rate (issue 27): the always-on
        // profile.
        Tracer {
            name: ALL_CACHES.into(),
            program: bins.leaktrace.clone(),
            args: vec!["--all-caches".into()],
            env: vec![],
            ready: Ready::Line("attached to"),
        },
    ]
}

/// `leaktrace --all-caches` at the default --sample-bytes (issue 27).
const ALL_CACHES: &str = "leaktrace --all-caches";

/// Empty programs on every hook `--all-caches` attaches, spares included:
/// what dispatching its programs at all costs, which issue 27 bounds it by.
const FLOOR_ALL_CACHES: &str = "floor + spares, --all-caches hooks (empty progs)";

/// Issue 27's bound: the always-on profile keeps at least this share of
/// what the floor + spares configuration keeps.
const ALL_CACHES_OF_FLOOR: f64 = 0.9;

/// `leaktrace --percpu` run beside the slab workloads (issue 26).
const PERCPU: &str = "leaktrace --percpu";

/// What "adds nothing measurable" means for [`PERCPU`]: its median run keeps
/// this much of the untraced throughput per generator CPU-s (the figure that
/// takes out preemption by unrelated load).
const PERCPU_KEEPS: f64 = 0.97;

/// leaktrace's `hooks:` line, from a short attach.
fn hooks_line(bins: &Bins) -> Result<String> {
    let before = prog_ids()?;
    let mut cmd = std::process::Command::new(&bins.leaktrace);
    cmd.args(["--cache", "kmalloc-512"]);
    let mut t = Running::spawn(cmd, "leaktrace")?;
    t.wait_for(|l| l.text.contains("attached to"), READY_TIMEOUT)?;
    let lines = t.stop()?;
    wait_progs_gone(&before);
    Ok(lines
        .iter()
        .find(|l| l.stream == Stream::Err && l.text.contains("hooks:"))
        .map(|l| l.text.trim_start_matches("leaktrace: ").to_string())
        .unwrap_or_else(|| "(no hooks: line on stderr)".into()))
}

fn run_rounds(
    bins: &Bins,
    configs: &[Tracer],
    opts: &Options,
    skipped: &mut Vec<(String, String)>,
) -> Result<Vec<Cell>> {
    let mut cells = Vec::new();
    let mut dropped: BTreeSet<String> = BTreeSet::new();
    for round in 0..opts.rounds {
        for w in Workload::ALL {
            let base = measure(bins, w, None, opts.secs)?;
            eprintln!(
                "xtask bench: round {} {}: untraced {:.0} ops/s",
                round + 1,
                w.mode(),
                base.ops_per_sec
            );
            cells.push(Cell {
                workload: w,
                config: "untraced".into(),
                round,
                sample: base,
            });
            // Rotating the order keeps a slow drift from always hitting the
            // same configuration.
            let n = configs.len();
            for i in 0..n {
                let c = &configs[(i + round) % n];
                if dropped.contains(&c.name) {
                    continue;
                }
                match measure(bins, w, Some(c), opts.secs) {
                    Ok(s) => {
                        eprintln!(
                            "xtask bench: round {} {}: {} {:.0} ops/s ({:.2}), cpu {:.2}",
                            round + 1,
                            w.mode(),
                            c.name,
                            s.ops_per_sec,
                            s.ops_per_sec / base.ops_per_sec,
                            s.cpu
                        );
                        cells.push(Cell {
                            workload: w,
                            config: c.name.clone(),
                            round,
                            sample: s,
                        });
                    }
                    Err(e) if !c.name.starts_with("leaktrace") && !c.name.starts_with("floor") => {
                        eprintln!("xtask bench: {} failed, skipping it: {e:#}", c.name);
                        skipped.push((c.name.clone(), format!("failed during the run: {e:#}")));
                        dropped.insert(c.name.clone());
                    }
                    Err(e) => return Err(e.context(format!("measuring {}", c.name))),
                }
            }
        }
    }
    Ok(cells)
}

/// One measurement, repeated once if the generator was preempted; a second
/// preempted run is kept (its cpu shows in the table).
fn measure(bins: &Bins, w: Workload, tracer: Option<&Tracer>, secs: f64) -> Result<Sample> {
    let first = measure_once(bins, w, tracer, secs)?;
    if first.cpu >= MIN_CPU {
        return Ok(first);
    }
    eprintln!(
        "xtask bench: generator cpu {:.2} < {MIN_CPU}: preempted, running once more",
        first.cpu
    );
    measure_once(bins, w, tracer, secs)
}

fn measure_once(bins: &Bins, w: Workload, tracer: Option<&Tracer>, secs: f64) -> Result<Sample> {
    let before = prog_ids()?;
    let running = match tracer {
        Some(t) => Some(start_tracer(t, w)?),
        None => None,
    };
    let sample = generate(bins, w.mode(), secs, &[]);
    if let Some(t) = running {
        t.stop()?;
    }
    wait_progs_gone(&before);
    sample
}

fn start_tracer(t: &Tracer, w: Workload) -> Result<Running> {
    let mut r = Running::spawn(t.command(w), &t.name)?;
    match &t.ready {
        Ready::Line(s) => {
            r.wait_for(|l| l.text.contains(s), READY_TIMEOUT)?;
        }
        Ready::LineThenSettle(s, d) => {
            r.wait_for(|l| l.text.contains(s), READY_TIMEOUT)?;
            std::thread::sleep(*d);
        }
        Ready::Settle(d) => {
            std::thread::sleep(*d);
            r.check_alive()?;
        }
    }
    Ok(r)
}

/// Runs `leakgen <mode> <secs> <extra>` and parses its DONE line.
fn generate(bins: &Bins, mode: &str, secs: f64, extra: &[&str]) -> Result<Sample> {
    let mut cmd = std::process::Command::new(&bins.leakgen);
    cmd.arg(mode).arg(format!("{secs}")).args(extra);
    let mut g = Running::spawn(cmd, "leakgen")?;
    let timeout = Duration::from_secs_f64(secs) + Duration::from_secs(30);
    let done = g.wait_for(|l| l.text.starts_with("DONE "), timeout)?;
    g.wait()?;
    parse_done(&done.text)
}

/// `DONE <pid> ops=<n> secs=<f> ops_per_sec=<f> cpu=<f>`.
fn parse_done(line: &str) -> Result<Sample> {
    let field = |k: &str| -> Result<f64> {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(k)?.strip_prefix('='))
            .with_context(|| format!("no {k}= in leakgen's {line:?}"))?
            .parse()
            .with_context(|| format!("bad {k}= in leakgen's {line:?}"))
    };
    Ok(Sample {
        ops_per_sec: field("ops_per_sec")?,
        secs: field("secs")?,
        cpu: field("cpu")?,
    })
}

/// Waits until every BPF program that was not loaded in `before` is gone, so a
/// stopped tracer's programs cannot tax the next run. Programs loaded by
/// someone else meanwhile only cost the timeout, with a warning.
fn wait_progs_gone(before: &BTreeSet<u32>) {
    let start = Instant::now();
    loop {
        match prog_ids() {
            Ok(now) if now.is_subset(before) => return,
            Ok(now) if start.elapsed() >= PROGS_GONE_TIMEOUT => {
                let extra: Vec<_> = now.difference(before).collect();
                eprintln!(
                    "xtask bench: warning: BPF programs {extra:?} still loaded {PROGS_GONE_TIMEOUT:?} \
                     after the tracer stopped (someone else's tracer?); going on"
                );
                return;
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                eprintln!("xtask bench: warning: cannot list BPF programs: {e:#}");
                return;
            }
        }
    }
}

pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|e| format!("unreadable ({e})"))
}

pub(crate) fn git_state(root: &Path) -> String {
    let out = |args: &[&str]| {
        std::process::Command::new("git")
            .current_dir(root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let head = out(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty = out(&["status", "--porcelain", "--untracked-files=no"])
        .map(|s| s.lines().count())
        .unwrap_or(0);
    if dirty == 0 {
        head
    } else {
        format!("{head} + {dirty} modified files in the work tree")
    }
}

/// YYYY-MM-DD in UTC (Howard Hinnant's civil_from_days).
pub(crate) fn utc_date(t: SystemTime) -> String {
    let days = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() / 86_400)
        .unwrap_or(0) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

struct Report<'a> {
    command: String,
    date: String,
    hooks: String,
    load_before: String,
    load_after: String,
    foreign_progs: usize,
    opts: &'a Options,
    configs: Vec<String>,
    cells: Vec<Cell>,
    skipped: Vec<(String, String)>,
    extras: Extras,
    page_rows: pages::PageRows,
    tree: String,
}

/// min / median / max of a configuration's ratios to the same round's untraced run.
struct Ratios {
    min: f64,
    med: f64,
    max: f64,
    low_cpu: usize,
    /// Median of the same ratio per generator CPU-second instead of per wall
    /// second: the generator's thread time includes the tracing it pays for
    /// in the syscall, but not the time it sat preempted by other work.
    cpu_med: f64,
}

impl Report<'_> {
    fn ratios(&self, w: Workload, config: &str) -> Option<Ratios> {
        let base = |round| {
            self.cells
                .iter()
                .find(|c| c.workload == w && c.round == round && c.config == "untraced")
                .map(|c| c.sample)
        };
        let mut low_cpu = 0;
        let mut wall = Vec::new();
        let mut per_cpu = Vec::new();
        for c in self
            .cells
            .iter()
            .filter(|c| c.workload == w && c.config == config)
        {
            low_cpu += usize::from(c.sample.cpu < MIN_CPU);
            let Some(b) = base(c.round) else { continue };
            wall.push(c.sample.ops_per_sec / b.ops_per_sec);
            if c.sample.cpu > 0.0 && b.cpu > 0.0 {
                per_cpu.push((c.sample.ops_per_sec / c.sample.cpu) / (b.ops_per_sec / b.cpu));
            }
        }
        if wall.is_empty() {
            return None;
        }
        let med = median(&mut wall);
        Some(Ratios {
            min: wall[0],
            med,
            max: wall[wall.len() - 1],
            low_cpu,
            cpu_med: median(&mut per_cpu),
        })
    }

    fn untraced_median(&self, w: Workload) -> f64 {
        let mut v: Vec<f64> = self
            .cells
            .iter()
            .filter(|c| c.workload == w && c.config == "untraced")
            .map(|c| c.sample.ops_per_sec)
            .collect();
        median(&mut v)
    }

    fn render(&self) -> String {
        let mut s = String::new();
        self.render_header(&mut s);
        self.render_ratios(&mut s);
        self.render_targets(&mut s);
        self.extras.render(&mut s);
        self.page_rows.render(&mut s);
        self.render_skipped(&mut s);
        s
    }

    fn render_header(&self, s: &mut String) {
        let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|k| k.trim().to_string())
            .unwrap_or_else(|e| format!("unknown ({e})"));
        let _ = writeln!(s, "# leaktrace benchmark, {}\n", self.date);
        let _ = writeln!(s, "- command: `{}`", self.command);
        let _ = writeln!(s, "- code: {}", self.tree);
        let _ = writeln!(
            s,
            "- machine: {nproc} CPUs, kernel {kernel}; leaktrace `{}`",
            self.hooks
        );
        let _ = writeln!(
            s,
            "- load average (1/5/15 min) at start {}, at end {}; {} BPF programs of others loaded at start",
            self.load_before, self.load_after, self.foreign_progs
        );
        let _ = writeln!(
            s,
            "- {} interleaved rounds, {} s of generator time per run; a run whose generator thread \
             had < {MIN_CPU} of a CPU was repeated once (`low cpu` counts runs still below it); \
             `median per generator CPU-s` divides each run's ops/s by its generator thread's \
             CPU fraction first, which takes out preemption by unrelated load but keeps the \
             tracing cost (paid inside the generator's syscalls); it is the better number \
             when `low cpu` is high\n",
            self.opts.rounds, self.opts.secs
        );
    }

    fn render_ratios(&self, s: &mut String) {
        let _ = writeln!(
            s,
            "## Throughput kept: ops/s traced / untraced in the same round\n"
        );
        if self.cells.is_empty() {
            let _ = writeln!(s, "not measured (--rounds 0)\n");
            return;
        }
        let _ = writeln!(
            s,
            "| workload (cache) | configuration | min | median | max | low cpu | median per generator CPU-s | overhead / floor's |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
        for w in Workload::ALL {
            let _ = writeln!(
                s,
                "| {} ({}) | untraced | {:.0} ops/s median | | | | | |",
                w.mode(),
                w.cache(),
                self.untraced_median(w)
            );
            let floor = self.ratios(w, FLOOR).map(|r| r.med);
            let floor_spares = self.ratios(w, FLOOR_SPARES).map(|r| r.med);
            let multiple_of = |kept: f64, floor: Option<f64>| match floor {
                Some(f) if f < 1.0 => format!("{:.1}x", (1.0 - kept) / (1.0 - f)),
                Some(_) => "n/a (floor >= 1)".into(),
                None => "n/a".into(),
            };
            for c in &self.configs {
                let Some(r) = self.ratios(w, c) else { continue };
                let multiple = if c.starts_with("leaktrace") {
                    let (one, both) = (multiple_of(r.med, floor), multiple_of(r.med, floor_spares));
                    if both.starts_with("n/a") {
                        one
                    } else {
                        format!("{one} ({both} of floor + spares')")
                    }
                } else {
                    String::new()
                };
                let _ = writeln!(
                    s,
                    "| {} | {c} | {:.2} | **{:.2}** | {:.2} | {} | {:.2} | {multiple} |",
                    w.mode(),
                    r.min,
                    r.med,
                    r.max,
                    r.low_cpu,
                    r.cpu_med
                );
            }
        }
        s.push('\n');
    }

    fn render_targets(&self, s: &mut String) {
        let _ = writeln!(s, "## Targets (issue 11)\n");
        let _ = writeln!(s, "| target | measured | met? |");
        let _ = writeln!(s, "|---|---|---|");
        for w in Workload::ALL {
            let r = self.ratios(w, "leaktrace");
            let rows: Vec<(String, Option<String>, Option<bool>)> = match w.target() {
                Target::Keeps(t) => vec![(
                    format!("keeps >= {t:.2} (leaktrace default, median)"),
                    r.as_ref()
                        .map(|r| format!("{:.2} (per generator CPU-s: {:.2})", r.med, r.cpu_med)),
                    r.as_ref().map(|r| r.med >= t),
                )],
                // The bound against the floor, then against the floor
                // that pays for the spares: what is left is leaktrace's own
                // work on a miss.
                Target::FloorMultiple(m) => {
                    [(FLOOR, "the floor's"), (FLOOR_SPARES, "floor + spares'")]
                        .into_iter()
                        .map(|(config, whose)| {
                            // Overhead = 1 - kept; per generator CPU-s, which the
                            // miss's small differences need.
                            let floor = self.ratios(w, config);
                            let multiple = r.as_ref().zip(floor.as_ref()).and_then(|(r, f)| {
                                (f.cpu_med < 1.0).then(|| (1.0 - r.cpu_med) / (1.0 - f.cpu_med))
                            });
                            (
                                format!("overhead <= {m:.1}x {whose} (per generator CPU-s)"),
                                multiple.map(|x| format!("{x:.2}x")),
                                multiple.map(|x| x <= m),
                            )
                        })
                        .collect()
                }
            };
            for (what, measured, ok) in rows {
                let _ = writeln!(
                    s,
                    "| {} {what} | {} | {} |",
                    w.mode(),
                    measured.unwrap_or_else(|| "not measured".into()),
                    met(ok)
                );
            }
        }
        for w in Workload::ALL {
            let r = self.ratios(w, PERCPU);
            let _ = writeln!(
                s,
                "| {}: --percpu adds nothing measurable (keeps >= {PERCPU_KEEPS:.2} per generator CPU-s) | {} | {} |",
                w.mode(),
                r.as_ref().map_or_else(
                    || "not measured".into(),
                    |r| format!("{:.2} (median {:.2})", r.cpu_med, r.med)
                ),
                met(r.as_ref().map(|r| r.cpu_med >= PERCPU_KEEPS))
            );
        }
        // Against the floor on its own hooks (the bound), then against the
        // one-cache floor + spares, which lacks the kmem_cache_alloc hook a
        // kmalloc cache's run does not attach (shown, not bounded).
        for (floor, what, bounded) in [
            (
                FLOOR_ALL_CACHES,
                "floor + spares' ratio on its own hooks",
                true,
            ),
            (FLOOR_SPARES, "the one-cache floor + spares' ratio", false),
        ] {
            for w in Workload::ALL {
                let (r, f) = (self.ratios(w, ALL_CACHES), self.ratios(w, floor));
                let share = r.as_ref().zip(f.as_ref()).map(|(r, f)| {
                    (
                        r.med / f.med.max(f64::MIN_POSITIVE),
                        r.cpu_med / f.cpu_med.max(f64::MIN_POSITIVE),
                    )
                });
                let verdict = if bounded {
                    met(share.map(|(med, _)| med >= ALL_CACHES_OF_FLOOR))
                } else {
                    "(for reference)"
                };
                let _ = writeln!(
                    s,
                    "| {}: --all-caches keeps >= {ALL_CACHES_OF_FLOOR:.1} x {what} (median) | {} | {verdict} |",
                    w.mode(),
                    share.map_or_else(
                        || "not measured".into(),
                        |(med, cpu)| format!("{med:.2}x (per generator CPU-s: {cpu:.2}x)")
                    ),
                );
            }
        }
        // Issue 23: the default mode's ratios keep within 0.01 of the
        // baseline's, both measured in the same rounds.
        for w in Workload::ALL {
            let (Some(now), Some(base)) = (self.ratios(w, "leaktrace"), self.ratios(w, BASELINE))
            else {
                continue;
            };
            let drop = base.med - now.med;
            let _ = writeln!(
                s,
                "| {}: default keeps within 0.01 of the baseline's (median) | {:.2} vs {:.2} (drop {drop:+.2}) | {} |",
                w.mode(),
                now.med,
                base.med,
                met(Some(drop <= 0.01))
            );
        }
        self.extras.render_targets(s);
        s.push('\n');
    }

    fn render_skipped(&self, s: &mut String) {
        let _ = writeln!(s, "## Peers skipped\n");
        if self.skipped.is_empty() {
            let _ = writeln!(s, "none\n");
        }
        for (name, why) in &self.skipped {
            let _ = writeln!(s, "- {name}: {why}");
        }
    }
}

fn met(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "yes",
        Some(false) => "**no**",
        None => "not measured",
    }
}

/// The value at `path` (dot-separated) of a JSON report as u64.
fn json_u64(v: &Value, path: &str) -> Option<u64> {
    path.split('.')
        .try_fold(v, |v, k| v.get(k))
        .and_then(Value::as_u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_done_line() {
        let s = parse_done("DONE 12 ops=100 secs=2.000 ops_per_sec=50 cpu=0.950").unwrap();
        assert_eq!((s.ops_per_sec, s.secs, s.cpu), (50.0, 2.0, 0.95));
        assert!(parse_done("DONE 12 ops=100 secs=2.000 ops_per_sec=50").is_err());
    }

    #[test]
    fn dates_and_medians() {
        assert_eq!(utc_date(UNIX_EPOCH), "1970-01-01");
        let t = UNIX_EPOCH + Duration::from_secs(1_709_210_096); // 2024-02-29 12:34:56
        assert_eq!(utc_date(t), "2024-02-29");
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn ratios_use_the_same_round() {
        let opts = Options {
            rounds: 2,
            secs: 1.0,
            baseline: None,
            pages_only: false,
        };
        let cell = |config: &str, round, ops_per_sec, cpu| Cell {
            workload: Workload::Writev,
            config: config.into(),
            round,
            sample: Sample {
                ops_per_sec,
                secs: 1.0,
                cpu,
            },
        };
        let r = Report {
            command: String::new(),
            date: String::new(),
            hooks: String::new(),
            load_before: String::new(),
            load_after: String::new(),
            foreign_progs: 0,
            opts: &opts,
            configs: vec!["x".into()],
            cells: vec![
                cell("untraced", 0, 100.0, 1.0),
                cell("x", 0, 50.0, 1.0),
                cell("untraced", 1, 200.0, 0.5),
                cell("x", 1, 50.0, 0.5),
            ],
            skipped: vec![],
            extras: extras::Extras::empty(),
            page_rows: pages::unmeasured(),
            tree: String::new(),
        };
        let x = r.ratios(Workload::Writev, "x").unwrap();
        assert_eq!((x.min, x.max, x.low_cpu), (0.25, 0.5, 1));
        assert_eq!(x.cpu_med, 0.375);
        assert!(r.ratios(Workload::Inotify, "x").is_none());
    }

    #[test]
    fn the_miss_bound_is_checked_against_both_floors() {
        let opts = Options {
            rounds: 1,
            secs: 1.0,
            baseline: None,
            pages_only: false,
        };
        let cell = |config: &str, ops_per_sec| Cell {
            workload: Workload::Writev256,
            config: config.into(),
            round: 0,
            sample: Sample {
                ops_per_sec,
                secs: 1.0,
                cpu: 1.0,
            },
        };
        let r = Report {
            command: String::new(),
            date: String::new(),
            hooks: String::new(),
            load_before: String::new(),
            load_after: String::new(),
            foreign_progs: 0,
            opts: &opts,
            configs: vec![FLOOR.into(), FLOOR_SPARES.into(), "leaktrace".into()],
            cells: vec![
                cell("untraced", 100.0),
                cell(FLOOR, 74.0),
                cell(FLOOR_SPARES, 54.0),
                cell("leaktrace", 52.0),
            ],
            skipped: vec![],
            extras: extras::Extras::empty(),
            page_rows: pages::unmeasured(),
            tree: String::new(),
        };
        let mut s = String::new();
        r.render_targets(&mut s);
        assert!(
            s.contains(
                "| writev256 overhead <= 1.1x the floor's (per generator CPU-s) | 1.85x | **no** |"
            ),
            "{s}"
        );
        assert!(
            s.contains(
                "| writev256 overhead <= 1.1x floor + spares' (per generator CPU-s) | 1.04x | yes |"
            ),
            "{s}"
        );
    }
}
