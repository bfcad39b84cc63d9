//! Memory cgroups: live and dying counts and how long a `memory.stat` read takes.

use super::*;
use crate::kernel::{
    btf::Btf,
    memcg_percpu::{self, Estimate},
};

/// Dying memcgs are normal in small numbers (page cache keeps a removed memcg around until
/// it is reclaimed); many times more dying than live means something pins them.
pub(super) const DYING_WARN_RATIO: u64 = 2;
pub(super) const DYING_WARN_MIN: u64 = 50;
pub(super) const DYING_CRIT_RATIO: u64 = 10;
pub(super) const DYING_CRIT_MIN: u64 = 1000;
/// memory.stat read time; the seed node took 9 s.
pub(super) const STAT_WARN: Duration = Duration::from_secs(1);
pub(super) const STAT_CRIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Serialize)]
pub struct MemcgData {
    pub version: CgroupVersion,
    pub mount: String,
    #[serde(flatten)]
    pub counts: MemcgCounts,
    pub memory_stat: Vec<StatTiming>,
    /// Why memory.stat could not be timed.
    pub memory_stat_unknown: Option<String>,
    /// What one memcg holds per CPU here (BTF sizes x possible CPUs), and so
    /// what the dying ones hold: estimated, doctor traces nothing.
    pub percpu_per_memcg: Option<Estimate>,
    pub percpu_dying_bytes: Option<u64>,
    pub percpu_unknown: Option<String>,
}

pub fn memcg_severity(counts: &MemcgCounts, timings: &[StatTiming]) -> Severity {
    let slowest = timings.iter().map(|t| t.seconds).fold(0.0, f64::max);
    let many = |ratio: u64, min: u64| {
        counts.dying >= min && counts.dying >= counts.live.saturating_mul(ratio)
    };
    if many(DYING_CRIT_RATIO, DYING_CRIT_MIN) || slowest >= STAT_CRIT.as_secs_f64() {
        Severity::Critical
    } else if many(DYING_WARN_RATIO, DYING_WARN_MIN) || slowest >= STAT_WARN.as_secs_f64() {
        Severity::Warning
    } else {
        Severity::Ok
    }
}

/// Read times span microseconds (healthy) to seconds (the seed's 9 s).
pub(super) fn seconds(s: f64) -> String {
    if s < 0.001 {
        format!("{:.0}µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.1}ms", s * 1000.0)
    } else {
        format!("{s:.1}s")
    }
}

/// One memcg's per-CPU memory on the kernel at `root`, or why unknown.
pub(super) fn percpu_estimate(root: &Path, h: &Hierarchy) -> Result<Estimate, String> {
    let v1 = h.cgroup_version() == CgroupVersion::V1;
    let host = memcg_percpu::Host::read(root, v1)
        .map_err(|e| format!("reading the possible CPUs: {e}"))?;
    let btf =
        Btf::read(&root.join("sys/kernel/btf/vmlinux")).map_err(|e| format!("no BTF: {e}"))?;
    memcg_percpu::estimate(&btf, host)
        .ok_or_else(|| "BTF has no struct mem_cgroup with per-CPU statistics".to_string())
}

pub(super) fn memcg_finding(
    h: &Hierarchy,
    counts: MemcgCounts,
    timings: Result<Vec<StatTiming>>,
    percpu: Result<Estimate, String>,
) -> Finding {
    let (memory_stat, memory_stat_unknown) = match timings {
        Ok(t) => (t, None),
        Err(e) => (Vec::new(), Some(format!("{e:#}"))),
    };
    let severity = memcg_severity(&counts, &memory_stat);
    let mut summary = format!(
        "{} live, {} dying memcgs (cgroup {})",
        counts.live,
        counts.dying,
        match h.cgroup_version() {
            CgroupVersion::V1 => "v1",
            CgroupVersion::V2 => "v2",
        }
    );
    if counts.dying >= DYING_WARN_MIN
        && counts.dying >= counts.live.saturating_mul(DYING_WARN_RATIO)
    {
        summary.push_str(": dying >> live, removed cgroups are pinned by charged memory");
    }
    let mut details = vec![format!("counted from {}", counts.method)];
    for t in &memory_stat {
        let usage = t
            .usage_bytes
            .map(|u| format!(", usage {}", human_bytes(u)))
            .unwrap_or_default();
        details.push(format!(
            "memory.stat of {}{usage}: read in {}",
            t.cgroup,
            seconds(t.seconds)
        ));
    }
    if let Some(why) = &memory_stat_unknown {
        details.push(format!("memory.stat read time: unknown: {why}"));
    }
    let dying_bytes = percpu.as_ref().ok().map(|e| e.dying_bytes * counts.dying);
    match &percpu {
        Ok(e) => {
            let line = format!(
                "{} dying memcgs hold ~{} of Percpu (estimated: {} each = {} B of per-CPU structures x {} possible CPUs, from BTF; a live one {}; `leaktrace memcg` measures the memcgs made while it runs)",
                counts.dying,
                human_bytes(e.dying_bytes * counts.dying),
                human_bytes(e.dying_bytes),
                e.dying_per_cpu_bytes,
                e.possible_cpus,
                human_bytes(e.bytes),
            );
            if counts.dying > 0 {
                summary.push_str(&format!(
                    "; ~{} of Percpu in dying memcgs (estimated)",
                    human_bytes(e.dying_bytes * counts.dying)
                ));
            }
            details.push(line);
        }
        Err(why) => details.push(format!("per-CPU memory of a memcg: unknown: {why}")),
    }
    if h.cgroup_version() == CgroupVersion::V2 {
        if let Some(b) = memcg_percpu::memory_stat_percpu(&h.mount) {
            details.push(format!(
                "memory.stat percpu under the top-level memcgs: {} (the kernel's charged part of every memcg below them, dying included)",
                human_bytes(b)
            ));
        }
    }
    let (percpu_per_memcg, percpu_unknown) = match percpu {
        Ok(e) => (Some(e), None),
        Err(why) => (None, Some(why)),
    };
    Finding {
        check: "memcgs",
        severity,
        summary,
        details,
        data: Some(Data::Memcgs(MemcgData {
            version: h.cgroup_version(),
            mount: h.seen_as.clone(),
            counts,
            memory_stat,
            memory_stat_unknown,
            percpu_per_memcg,
            percpu_dying_bytes: dying_bytes,
            percpu_unknown,
        })),
    }
}
