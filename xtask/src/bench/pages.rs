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
const CONFIGS: [(&str, &str, Option<&[&str]>); 6] = [
    ("tmpfs-churn", "untraced", None),
    (
        "tmpfs-churn",
        "floor (empty progs)",
        Some(&["--pages", "--floor"]),
    ),
    ("tmpfs-churn", "leaktrace --pages", Some(&["--pages"])),
    ("pipe-churn", "untraced", None),
    (
        "pipe-churn",
        "floor (empty progs)",
        Some(&["--pages", "--floor"]),
    ),
    ("pipe-churn", "leaktrace --pages", Some(&["--pages"])),
];

/// ops/s of each configuration in each round.
pub struct PageRows {
    rounds: Vec<[f64; CONFIGS.len()]>,
}

pub fn measure(bins: &Bins, rounds: usize, secs: f64) -> Result<PageRows> {
    let mut out = Vec::new();
    for round in 0..rounds {
        let mut row = [0.0; CONFIGS.len()];
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
            row[i] = sample?.ops_per_sec;
            eprintln!(
                "xtask bench: pages round {} {mode}: {name} {:.0} ops/s",
                round + 1,
                row[i]
            );
        }
        out.push(row);
    }
    Ok(PageRows { rounds: out })
}

impl PageRows {
    /// Median over rounds of `traced / untraced` in the same round.
    fn ratio(&self, traced: usize, untraced: usize) -> f64 {
        let mut v: Vec<f64> = self
            .rounds
            .iter()
            .filter(|r| r[untraced] > 0.0)
            .map(|r| r[traced] / r[untraced])
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
            "| workload | configuration | median ops/s | kept (median ratio) |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|");
        for (i, (mode, name, _)) in CONFIGS.iter().enumerate() {
            let mut ops: Vec<f64> = self.rounds.iter().map(|r| r[i]).collect();
            let untraced = if i < 3 { 0 } else { 3 };
            let _ = writeln!(
                s,
                "| {mode} | {name} | {:.0} | {:.2} |",
                median(&mut ops),
                self.ratio(i, untraced)
            );
        }
        let tmpfs = self.ratio(2, 0);
        let (floor, traced) = (self.ratio(4, 3), self.ratio(5, 3));
        let _ = writeln!(
            s,
            "\n- tmpfs writes keep ≥ 0.9 of untraced under --pages: {tmpfs:.2} {}",
            met(Some(tmpfs >= 0.9))
        );
        let _ = writeln!(
            s,
            "- pipe loop keeps ≥ 0.8 × the floor's ratio under --pages: {traced:.2} vs 0.8 × {floor:.2} = {:.2} {}\n",
            0.8 * floor,
            met(Some(traced >= 0.8 * floor))
        );
    }
}

/// For reports built without a run (the renderer's tests): nothing measured.
#[cfg(test)]
pub fn unmeasured() -> PageRows {
    PageRows { rounds: Vec::new() }
}
