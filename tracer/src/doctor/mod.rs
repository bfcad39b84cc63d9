//! `leaktrace doctor`: the first command on a sick node. It automates the manual triage
//! every slab incident starts with (meminfo, a two-shot slabtop, memcg counts, kmem
//! accounting, kernel version, can BPF attach) and ends with the exact next command.
//!
//! No check may fail the report: each one either yields a finding or says
//! `unknown: <reason>`, because the node this runs on is by definition unhealthy and
//! often locked down (non-root, no BPF, no tracefs).

mod bpf;
pub(crate) mod cgroups;
mod kernel;
mod kmem;
mod ledger;
mod memcg;
mod memory;
mod render;
mod slab;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::kernel::facts::detect_vmap_stack;
use crate::kernel::facts::Features;
use crate::kernel::ledger::Ledger;
use crate::kernel::meminfo::{self, MemInfo};
use crate::kernel::slabinfo::{self, SlabLine};
use crate::present::units::human_bytes;
use crate::slab::caches::{self, Catalogue, SelectError};

use crate::kernel::cgroupfs::{self, CgroupVersion, Hierarchy, MemcgCounts};
use crate::kernel::memory_stat::{self, StatTiming};
use cgroups::KmemState;
use kernel::KnownIssue;

use bpf::*;
use kmem::*;
use ledger::*;
use memcg::*;
use memory::*;
use render::*;
use slab::*;

/// Most severe first; the report is sorted by this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Critical,
    Warning,
    Unknown,
    Ok,
}

impl Severity {
    fn label(self) -> &'static str {
        match self {
            Severity::Critical => "CRIT",
            Severity::Warning => "WARN",
            Severity::Unknown => "UNKNOWN",
            Severity::Ok => "ok",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub check: &'static str,
    pub severity: Severity,
    pub summary: String,
    pub details: Vec<String>,
    /// The figures behind the summary; absent when the check is unknown.
    pub data: Option<Data>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Data {
    Memory(MemoryData),
    Slab(SlabData),
    Memcgs(MemcgData),
    Kmem(KmemData),
    Bpf(BpfData),
    Ledger(Box<LedgerData>),
}

impl Finding {
    fn unknown(check: &'static str, err: &anyhow::Error) -> Finding {
        Finding {
            check,
            severity: Severity::Unknown,
            summary: format!("unknown: {err:#}"),
            details: Vec::new(),
            data: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema_version: u32,
    pub kernel_release: String,
    pub watch_seconds: f64,
    /// Most severe first.
    pub findings: Vec<Finding>,
    pub next_command: Option<String>,
}

impl Report {
    #[cfg(test)]
    pub fn finding(&self, check: &str) -> Option<&Finding> {
        self.findings.iter().find(|f| f.check == check)
    }
}

// ---- the whole diagnosis ----

/// Runs every check under `root`. `on_first_sample` is called once the first slab sample
/// is taken (the CLI says it is watching; tests start their generator then).
pub fn diagnose(
    root: &Path,
    watch: Duration,
    root_user: bool,
    on_first_sample: impl FnOnce(),
) -> Report {
    let start = Instant::now();
    // Read the kernel's own description once, before the window opens.
    let vmap_stack = detect_vmap_stack(root, None);
    let before = slabinfo::read(root);
    let sampled_at = Instant::now();
    let ledger_before = Ledger::read(root, vmap_stack).map(|l| (l, Instant::now()));
    on_first_sample();

    // The other checks run inside the watch window so the window costs no extra time.
    let meminfo = meminfo::read(root);
    let mut findings = vec![match &meminfo {
        Ok(m) => memory_finding(m),
        Err(e) => Finding::unknown("memory", e),
    }];
    let tracefs = probe_tracefs(root);
    // tracefs' kprobe_events answers for kprobes where the PMU directory is absent.
    let tracefs_dir = match &tracefs {
        TracefsState::Found { path, .. } => Some(root.join(path.trim_start_matches('/'))),
        _ => None,
    };
    let features = Features::detect(root, tracefs_dir.as_deref());
    let hierarchy = Hierarchy::bound(root);
    let walked = hierarchy
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e:#}"))
        .and_then(|h| h.dirs(true).map(|dirs| (h, dirs)));
    findings.push(match &walked {
        Ok((h, dirs)) => match cgroupfs::count(root, h, dirs) {
            Ok(counts) => memcg_finding(
                h,
                counts,
                memory_stat::time_memory_stat(h, dirs),
                percpu_estimate(root, h),
            ),
            Err(e) => Finding::unknown("memcgs", &e),
        },
        Err(e) => Finding::unknown("memcgs", e),
    });
    let (version, kmem) = match &walked {
        Ok((h, dirs)) => (
            Ok(h.cgroup_version()),
            (h.cgroup_version() == CgroupVersion::V1).then(|| cgroups::kmem_state(root, h, dirs)),
        ),
        Err(e) => (Err(format!("{e:#}")), None),
    };
    findings.push(kmem_finding(&features.kernel_release, version, kmem));
    let catalogue = Catalogue::read(root).ok();

    let slab = match before {
        Ok(before) => {
            if let Some(left) = watch.checked_sub(sampled_at.elapsed()) {
                std::thread::sleep(left);
            }
            slabinfo::read(root).and_then(|after| {
                slab_finding(
                    &before,
                    &after,
                    sampled_at.elapsed(),
                    catalogue.as_ref(),
                    meminfo.as_ref().ok().map(|m| m.mem_total_kb),
                )
            })
        }
        Err(e) => Err(e).context("slab growth needs /proc/slabinfo, which only root can read"),
    };
    let ledger_after = Ledger::read(root, vmap_stack);
    let slab = slab.unwrap_or_else(|e| Finding::unknown("slab", &e));
    let (cache, rate_threshold) = match &slab.data {
        Some(Data::Slab(s)) => (s.suggested_cache.clone(), s.growth_threshold_bytes_per_sec),
        _ => (None, GROWTH_FLOOR_BYTES_PER_SEC),
    };
    findings.push(slab);
    let ledger = match (ledger_before, ledger_after) {
        (Ok((before, at)), Ok(after)) => ledger_finding(
            &before,
            &after,
            at.elapsed(),
            cache.as_deref(),
            rate_threshold,
        ),
        (Err(e), _) | (_, Err(e)) => Finding::unknown("ledger", &e),
    };
    let ledger_next = match &ledger.data {
        Some(Data::Ledger(l)) => l.next_command.clone(),
        _ => None,
    };
    findings.push(ledger);
    let bpf = bpf_finding(root_user, &features, &tracefs, cache.as_deref());
    let mut next_command = match &bpf.data {
        Some(Data::Bpf(b)) => Some(b.next_command.clone()),
        _ => None,
    };
    // Without slabinfo there is no cache to name; the useful next step is root.
    if cache.is_none() && !root_user {
        next_command = Some("sudo leaktrace doctor".to_string());
    }
    // A growing bucket other than slab is traced by its own source (the slab one is
    // already the bpf check's `--cache` command).
    if let (Some(cmd), Some(Data::Bpf(b))) = (ledger_next, &bpf.data) {
        let leaktrace = cmd.starts_with("leaktrace ");
        next_command = Some(match (leaktrace, b.can_attach, root_user) {
            (false, _, _) => cmd,
            (true, true, true) => cmd,
            (true, true, false) => format!("sudo {cmd}"),
            (true, false, _) => next_command.unwrap_or(cmd),
        });
    }
    findings.push(bpf);
    // Stable: equal severities keep the issue's order (memory, memcgs, kmem, slab, ledger, bpf).
    findings.sort_by_key(|f| f.severity);
    Report {
        schema_version: 1,
        kernel_release: features.kernel_release,
        watch_seconds: start.elapsed().as_secs_f64(),
        findings,
        next_command,
    }
}

/// What `leaktrace doctor` is asked for (main.rs fills it from the command line).
#[derive(Debug, Clone)]
pub struct DoctorOptions {
    /// Window between the two /proc/slabinfo samples that measure cache growth.
    pub watch: Duration,
    /// The diagnosis as one JSON object.
    pub json: bool,
    /// /proc and /sys are read under this directory (fixture trees in tests).
    pub root: PathBuf,
}

pub fn run(args: &DoctorOptions) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    let root_user = unsafe { libc::geteuid() } == 0;
    let watch = args.watch;
    let report = diagnose(&args.root, watch, root_user, || {
        eprintln!(
            "leaktrace doctor: sampling slab caches for {:.1}s ...",
            watch.as_secs_f64()
        );
    });
    let text = if args.json {
        let line = serde_json::to_string(&report).context("serializing the diagnosis")?;
        format!("{line}\n")
    } else {
        render(&report)
    };
    crate::output::stdout::write_text(&text).context("printing the diagnosis")
}

#[cfg(test)]
mod tests;
