//! The page source's rows (issue 26): `leaktrace --pages` on (a) page-cache
//! writes to tmpfs (`leakgen tmpfs-churn`: movable pages, which the kernel
//! side drops on their first field) against the untraced run, and (b) a pipe
//! write/read loop (`leakgen pipe-churn`: 12 KiB through a pipe an op, one
//! page allocated and one freed an op on 6.15+, whose pipes keep two
//! released pages for reuse; two on older kernels, which keep one) against
//! the floor (empty programs on the same hooks). Rounds interleave the
//! configurations as the main table's do.

use std::{fmt::Write as _, process::Command};

use anyhow::Result;

use super::{generate, median, met, proc::Running, prog_ids, wait_progs_gone, Bins, READY_TIMEOUT};

/// (generator mode, configuration, leaktrace arguments; None: untraced).
/// Each mode's configurations in this order: untraced, floor, floor +
/// spares, leaktrace.
const CONFIGS: [(&str, &str, Option<&[&str]>); 8] = [
    ("tmpfs-churn", "untraced", None),
    (
        "tmpfs-churn",
        "floor (empty progs)",
        Some(&["--pages", "--floor"]),
    ),
    (
        "tmpfs-churn",
        "floor + spares (empty progs)",
        Some(&["--pages", "--floor-spares"]),
    ),
    ("tmpfs-churn", "leaktrace --pages", Some(&["--pages"])),
    ("pipe-churn", "untraced", None),
    (
        "pipe-churn",
        "floor (empty progs)",
        Some(&["--pages", "--floor"]),
    ),
    (
        "pipe-churn",
        "floor + spares (empty progs)",
        Some(&["--pages", "--floor-spares"]),
    ),
    ("pipe-churn", "leaktrace --pages", Some(&["--pages"])),
];

/// Configurations per mode (see [`CONFIGS`]).
const PER_MODE: usize = 4;

/// (ops/s, generator CPU-s per s) of each configuration in each round.
pub struct PageRows {
    rounds: Vec<[(f64, f64); CONFIGS.len()]>,
}

pub fn measure(bins: &Bins, rounds: usize, secs: f64) -> Result<PageRows> {
    let mut out = Vec::new();
    for round in 0..rounds {
        let mut row = [(0.0, 0.0); CONFIGS.len()];
        for (i, (mode, name, args)) in CONFIGS.iter().enumerate() {
            let before = prog_ids()?;
            let tracer = match args {
                Some(args) => {
                    let mut cmd = Command::new(&bins.leaktrace);
                    cmd.args(*args);
                    let mut t = Running::spawn(cmd, "leaktrace")?;
                    t.wait_for(|l| l.text.contains("attached to"), READY_TIMEOUT)?;
                    Some(t)
                }
                None => None,
            };
            let sample = generate(bins, mode, secs, &[]);
            if let Some(t) = tracer {
                t.stop()?;
            }
            wait_progs_gone(&before);
            let sample = sample?;
            row[i] = (sample.ops_per_sec, sample.cpu);
            eprintln!(
                "xtask bench: pages round {} {mode}: {name} {:.0} ops/s (generator cpu {:.2})",
                round + 1,
                sample.ops_per_sec,
                sample.cpu
            );
        }
        out.push(row);
    }
    Ok(PageRows { rounds: out })
}

impl PageRows {
    /// Median over rounds of `traced / untraced` in the same round: of
    /// ops/s, or (`per_cpu`) of ops per generator CPU-s, which leaves out
    /// the time other processes took the generator's CPU (the BPF programs
    /// run in the generator's context and stay counted).
    fn ratio(&self, traced: usize, untraced: usize, per_cpu: bool) -> f64 {
        let rate = |(ops, cpu): (f64, f64)| {
            if !per_cpu {
                ops
            } else if cpu > 0.0 {
                ops / cpu
            } else {
                0.0
            }
        };
        let mut v: Vec<f64> = self
            .rounds
            .iter()
            .filter(|r| rate(r[untraced]) > 0.0)
            .map(|r| rate(r[traced]) / rate(r[untraced]))
            .collect();
        median(&mut v)
    }

    pub fn render(&self, s: &mut String) {
        let _ = writeln!(s, "## Page source (`--pages`)\n");
        if self.rounds.is_empty() {
            let _ = writeln!(s, "not measured (--rounds 0)\n");
            return;
        }
        let _ = writeln!(
            s,
            "| workload | configuration | median ops/s | median generator cpu | kept (median ratio) | kept per generator CPU-s |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|---:|---:|");
        for (i, (mode, name, _)) in CONFIGS.iter().enumerate() {
            let mut ops: Vec<f64> = self.rounds.iter().map(|r| r[i].0).collect();
            let mut cpu: Vec<f64> = self.rounds.iter().map(|r| r[i].1).collect();
            let untraced = i - i % PER_MODE;
            let _ = writeln!(
                s,
                "| {mode} | {name} | {:.0} | {:.2} | {:.2} | {:.2} |",
                median(&mut ops),
                median(&mut cpu),
                self.ratio(i, untraced, false),
                self.ratio(i, untraced, true)
            );
        }
        let (tmpfs, tmpfs_cpu) = (self.ratio(3, 0, false), self.ratio(3, 0, true));
        let _ = writeln!(
            s,
            "\n- tmpfs writes keep ≥ 0.9 of untraced under --pages: {tmpfs:.2} {} (per generator CPU-s {tmpfs_cpu:.2} {})",
            met(Some(tmpfs >= 0.9)),
            met(Some(tmpfs_cpu >= 0.9))
        );
        for (floor, what) in [(5, "the floor's"), (6, "floor + spares'")] {
            for per_cpu in [false, true] {
                let (f, t) = (self.ratio(floor, 4, per_cpu), self.ratio(7, 4, per_cpu));
                let _ = writeln!(
                    s,
                    "- pipe loop keeps ≥ 0.8 × {what} ratio under --pages{}: {t:.2} vs 0.8 × {f:.2} = {:.2} {}",
                    if per_cpu { " (per generator CPU-s)" } else { "" },
                    0.8 * f,
                    met(Some(t >= 0.8 * f))
                );
            }
        }
        let _ = writeln!(s);
    }
}

/// For reports built without a run (the renderer's tests): nothing measured.
#[cfg(test)]
pub fn unmeasured() -> PageRows {
    PageRows { rounds: Vec::new() }
}
