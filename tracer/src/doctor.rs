//! `leaktrace doctor`: the first command on a sick node. It automates the manual triage
//! every slab incident starts with (meminfo, a two-shot slabtop, memcg counts, kmem
//! accounting, kernel version, can BPF attach) and ends with the exact next command.
//!
//! No check may fail the report: each one either yields a finding or says
//! `unknown: <reason>`, because the node this runs on is by definition unhealthy and
//! often locked down (non-root, no BPF, no tracefs).

mod cgroups;
mod kernel;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;

use crate::caches::{self, human_bytes, Catalogue, SelectError};
use crate::features::Features;
use crate::meminfo::{self, MemInfo};
use crate::slabinfo::{self, SlabLine};

use cgroups::{CgroupVersion, KmemState, MemcgCounts, StatTiming};
use kernel::KnownIssue;

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Window between the two /proc/slabinfo samples that measure cache growth.
    #[arg(long, value_parser = crate::cli::parse_duration, default_value = "10s", value_name = "DURATION")]
    pub watch: Duration,

    /// Print the diagnosis as one JSON object.
    #[arg(long)]
    pub json: bool,

    /// Read /proc and /sys under this directory instead of / (fixture trees in tests).
    #[arg(long, hide = true, default_value = "/")]
    pub root: PathBuf,
}

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

// ---- 1. memory picture ----

/// SUnreclaim as a share of RAM. Healthy nodes sit at a few percent; the seed incident
/// was at 90%. Unreclaimable slab cannot be given back under pressure, so a tenth of RAM
/// is already worth a look and a quarter means the node is being eaten.
const SUNRECLAIM_WARN_PCT: f64 = 10.0;
const SUNRECLAIM_CRIT_PCT: f64 = 25.0;

#[derive(Debug, Clone, Serialize)]
pub struct MemoryData {
    #[serde(flatten)]
    pub meminfo: MemInfo,
    pub slab_pct: f64,
    pub sreclaimable_pct: f64,
    pub sunreclaim_pct: f64,
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

fn kb(kb: u64) -> String {
    human_bytes(kb.saturating_mul(1024))
}

pub fn memory_finding(m: &MemInfo) -> Finding {
    let total = m.mem_total_kb;
    let data = MemoryData {
        meminfo: *m,
        slab_pct: pct(m.slab_kb, total),
        sreclaimable_pct: pct(m.sreclaimable_kb, total),
        sunreclaim_pct: pct(m.sunreclaim_kb, total),
    };
    let severity = if data.sunreclaim_pct >= SUNRECLAIM_CRIT_PCT {
        Severity::Critical
    } else if data.sunreclaim_pct >= SUNRECLAIM_WARN_PCT {
        Severity::Warning
    } else {
        Severity::Ok
    };
    let band = match severity {
        Severity::Critical => format!(" (critical above {SUNRECLAIM_CRIT_PCT}%)"),
        Severity::Warning => format!(" (warning above {SUNRECLAIM_WARN_PCT}%)"),
        _ => String::new(),
    };
    Finding {
        check: "memory",
        severity,
        summary: format!(
            "SUnreclaim {} is {:.1}% of RAM{band}",
            kb(m.sunreclaim_kb),
            data.sunreclaim_pct
        ),
        details: vec![format!(
            "MemTotal {}   MemAvailable {}   Slab {} ({:.1}%)   SReclaimable {} ({:.1}%)   SUnreclaim {} ({:.1}%)",
            kb(total),
            kb(m.mem_available_kb),
            kb(m.slab_kb),
            data.slab_pct,
            kb(m.sreclaimable_kb),
            data.sreclaimable_pct,
            kb(m.sunreclaim_kb),
            data.sunreclaim_pct
        )],
        data: Some(Data::Memory(data)),
    }
}

// ---- 2. slab growth ----

const TOP_CACHES: usize = 5;
/// A cache growing this fast for the whole window is worth tracing whatever the node size.
const GROWTH_FLOOR_BYTES_PER_SEC: f64 = 64.0 * 1024.0;
/// ... or fast enough to eat 1% of RAM in an hour.
const GROWTH_RAM_PCT_PER_HOUR: f64 = 1.0;
/// ... and by at least this much in all: a short window otherwise flags one burst of
/// process start-up (filp, pid, vma caches) as a leak.
const GROWTH_MIN_BYTES: f64 = 256.0 * 1024.0;
/// One cache holding this much of RAM is a leak suspect even when it is not growing now.
const CACHE_WARN_PCT: f64 = 10.0;
const CACHE_CRIT_PCT: f64 = 25.0;

#[derive(Debug, Clone, Serialize)]
pub struct CacheRow {
    pub name: String,
    /// Other names SLUB merged into this cache (their objects are counted here).
    pub aliases: Vec<String>,
    pub objsize: u64,
    pub active_objs: u64,
    pub total_bytes: u64,
    pub objs_per_sec: f64,
    pub bytes_per_sec: f64,
    pub pct_of_ram: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SlabData {
    pub elapsed_seconds: f64,
    pub growth_threshold_bytes_per_sec: f64,
    /// Caches that grew, fastest first.
    pub top_growth: Vec<CacheRow>,
    /// Caches by size (objects the cache has room for), largest first.
    pub top_size: Vec<CacheRow>,
    /// The cache to trace next, under the name `--cache` accepts.
    pub suggested_cache: Option<String>,
}

pub fn slab_finding(
    before: &[SlabLine],
    after: &[SlabLine],
    elapsed: Duration,
    catalogue: Option<&Catalogue>,
    mem_total_kb: Option<u64>,
) -> Result<Finding> {
    let ram = mem_total_kb.map(|k| k.saturating_mul(1024));
    let threshold = ram.map_or(GROWTH_FLOOR_BYTES_PER_SEC, |r| {
        (r as f64 * GROWTH_RAM_PCT_PER_HOUR / 100.0 / 3600.0).max(GROWTH_FLOOR_BYTES_PER_SEC)
    });
    let mut rows = Vec::new();
    for now in after {
        // A cache created during the window grew from nothing.
        let empty = SlabLine {
            active_objs: 0,
            num_objs: 0,
            ..now.clone()
        };
        let then = before.iter().find(|b| b.name == now.name).unwrap_or(&empty);
        let g = slabinfo::growth(then, now, elapsed)?;
        let aliases = catalogue
            .and_then(|c| c.get(&now.name))
            .map(|c| c.aliases.clone())
            .unwrap_or_default();
        rows.push(CacheRow {
            name: now.name.clone(),
            aliases,
            objsize: now.objsize,
            active_objs: now.active_objs,
            total_bytes: now.total_bytes(),
            objs_per_sec: g.objs_per_sec,
            bytes_per_sec: g.bytes_per_sec,
            pct_of_ram: ram.map(|r| pct(now.total_bytes(), r)),
        });
    }
    let mut growth: Vec<CacheRow> = rows
        .iter()
        .filter(|r| r.bytes_per_sec > 0.0)
        .cloned()
        .collect();
    growth.sort_by(|a, b| {
        b.bytes_per_sec
            .total_cmp(&a.bytes_per_sec)
            .then(a.name.cmp(&b.name))
    });
    growth.truncate(TOP_CACHES);
    let mut size = rows;
    size.sort_by(|a, b| b.total_bytes.cmp(&a.total_bytes).then(a.name.cmp(&b.name)));
    size.truncate(TOP_CACHES);

    let fastest = growth.first().filter(|r| {
        r.bytes_per_sec >= threshold && r.bytes_per_sec * elapsed.as_secs_f64() >= GROWTH_MIN_BYTES
    });
    let largest = size.first();
    let largest_pct = largest.and_then(|r| r.pct_of_ram).unwrap_or(0.0);
    let mut severity = Severity::Ok;
    if fastest.is_some() || largest_pct >= CACHE_WARN_PCT {
        severity = Severity::Warning;
    }
    if largest_pct >= CACHE_CRIT_PCT {
        severity = Severity::Critical;
    }
    // A leak that is fast now is the one a trace can catch in the act; a big cache that has
    // stopped growing still holds the culprit's objects, but only new ones can be attributed.
    let pick = fastest
        .or(largest.filter(|_| largest_pct >= CACHE_WARN_PCT))
        .or(growth.first())
        .or(largest);
    let suggested_cache = pick.map(|r| traceable_name(catalogue, &r.name));

    let secs = elapsed.as_secs_f64();
    let mut parts = Vec::new();
    match (fastest, growth.first()) {
        (Some(r), _) => parts.push(format!("{} grows {}", with_aliases(r), rate(r))),
        (None, Some(r)) => parts.push(format!(
            "no cache grew faster than {}/s over {secs:.1}s (fastest {} {})",
            human_bytes(threshold as u64),
            r.name,
            rate(r)
        )),
        (None, None) => parts.push(format!("no cache grew over {secs:.1}s")),
    }
    if let Some(r) = largest {
        let share = r
            .pct_of_ram
            .map(|p| format!(" = {p:.1}% of RAM"))
            .unwrap_or_default();
        parts.push(format!(
            "largest {} {}{share}",
            r.name,
            human_bytes(r.total_bytes)
        ));
    }
    let mut details = vec![format!(
        "growth over {secs:.1}s (/proc/slabinfo active objects):"
    )];
    if growth.is_empty() {
        details.push("  (none)".to_string());
    }
    for r in &growth {
        let line = format!("  {:<24} {:>12}  {}", r.name, rate(r), alias_note(r));
        details.push(line.trim_end().to_string());
    }
    details.push("largest caches:".to_string());
    for r in &size {
        let share = r
            .pct_of_ram
            .map(|p| format!("{p:5.1}%"))
            .unwrap_or_default();
        let line = format!(
            "  {:<24} {:>8} {share}  {} objs of {}B  {}",
            r.name,
            human_bytes(r.total_bytes),
            r.active_objs,
            r.objsize,
            alias_note(r)
        );
        details.push(line.trim_end().to_string());
    }
    Ok(Finding {
        check: "slab",
        severity,
        summary: parts.join("; "),
        details,
        data: Some(Data::Slab(SlabData {
            elapsed_seconds: secs,
            growth_threshold_bytes_per_sec: threshold,
            top_growth: growth,
            top_size: size,
            suggested_cache,
        })),
    })
}

fn rate(r: &CacheRow) -> String {
    format!(
        "+{}/s ({:+.0} objs/s)",
        human_bytes(r.bytes_per_sec.max(0.0) as u64),
        r.objs_per_sec
    )
}

fn with_aliases(r: &CacheRow) -> String {
    if r.aliases.is_empty() {
        r.name.clone()
    } else {
        format!("{} (merged: {})", r.name, r.aliases.join(", "))
    }
}

fn alias_note(r: &CacheRow) -> String {
    if r.aliases.is_empty() {
        String::new()
    } else {
        format!("merged: {}", r.aliases.join(", "))
    }
}

/// The name `leaktrace --cache` accepts for a slabinfo line: random-kmalloc copies and
/// dedicated buckets can only be traced through their kmalloc cache.
fn traceable_name(catalogue: Option<&Catalogue>, name: &str) -> String {
    let Some(cat) = catalogue else {
        return name.to_string();
    };
    match caches::select(cat, name) {
        Ok(s) => s.cache,
        Err(SelectError::RandomKmalloc { base, .. }) => base,
        Err(SelectError::KmallocBucket { kmalloc, .. }) => kmalloc,
        Err(SelectError::KmallocKindAbsent { served_by, .. }) => served_by,
        Err(_) => name.to_string(),
    }
}

// ---- 3. memory cgroups ----

/// Dying memcgs are normal in small numbers (page cache keeps a removed memcg around until
/// it is reclaimed); many times more dying than live means something pins them.
const DYING_WARN_RATIO: u64 = 2;
const DYING_WARN_MIN: u64 = 50;
const DYING_CRIT_RATIO: u64 = 10;
const DYING_CRIT_MIN: u64 = 1000;
/// memory.stat read time; the seed node took 9 s.
const STAT_WARN: Duration = Duration::from_secs(1);
const STAT_CRIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Serialize)]
pub struct MemcgData {
    pub version: CgroupVersion,
    pub mount: String,
    #[serde(flatten)]
    pub counts: MemcgCounts,
    pub memory_stat: Vec<StatTiming>,
    /// Why memory.stat could not be timed.
    pub memory_stat_unknown: Option<String>,
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
fn seconds(s: f64) -> String {
    if s < 0.001 {
        format!("{:.0}µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.1}ms", s * 1000.0)
    } else {
        format!("{s:.1}s")
    }
}

fn memcg_finding(
    h: &cgroups::MemoryHierarchy,
    counts: MemcgCounts,
    timings: Result<Vec<StatTiming>>,
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
        match h.version {
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
    Finding {
        check: "memcgs",
        severity,
        summary,
        details,
        data: Some(Data::Memcgs(MemcgData {
            version: h.version,
            mount: h.mount.clone(),
            counts,
            memory_stat,
            memory_stat_unknown,
        })),
    }
}

// ---- 4. kmem accounting and kernel version ----

#[derive(Debug, Clone, Serialize)]
pub struct KmemData {
    pub kernel_release: String,
    pub known_issues: Vec<KnownIssue>,
    pub cgroup_version: Option<CgroupVersion>,
    /// cgroup v1 only.
    pub kmem: Option<KmemState>,
    pub cgroups_unknown: Option<String>,
}

pub fn kmem_finding(
    release: &str,
    version: Result<CgroupVersion, String>,
    kmem: Option<KmemState>,
) -> Finding {
    let known_issues = kernel::known_issues(release);
    let active = kmem
        .as_ref()
        .is_some_and(|k| k.with_kmem_limit > 0 || k.with_kmem_usage > 0);
    let severity = if known_issues.iter().any(|i| i.needs_kmem_active) && active {
        Severity::Critical
    } else if !known_issues.is_empty() {
        Severity::Warning
    } else {
        Severity::Ok
    };
    let mut parts = Vec::new();
    let mut details = Vec::new();
    match (&version, &kmem) {
        (Ok(CgroupVersion::V1), Some(k)) => {
            let state = if k.nokmem {
                "off (cgroup.memory=nokmem)".to_string()
            } else if !k.kmem_files {
                "interface absent (no memory.kmem.* files)".to_string()
            } else {
                let usage = k
                    .root_kmem_usage_bytes
                    .map(|u| format!(", root kmem usage {}", human_bytes(u)))
                    .unwrap_or_default();
                format!("on{usage}")
            };
            parts.push(format!("cgroup v1 kmem accounting {state}"));
            parts.push(format!(
                "{} kubepods/docker cgroups, {} charging kmem, {} with a kmem limit",
                k.container_cgroups, k.with_kmem_usage, k.with_kmem_limit
            ));
            details.push(format!(
                "memory.kmem.slabinfo {}",
                if k.slabinfo_readable {
                    "readable"
                } else {
                    "not readable"
                }
            ));
            for e in &k.examples {
                details.push(format!("  e.g. {e}"));
            }
        }
        (Ok(CgroupVersion::V2), _) => parts.push(
            "cgroup v2: kernel memory is always accounted (no memory.kmem.* knobs)".to_string(),
        ),
        (Ok(CgroupVersion::V1), None) => {}
        (Err(why), _) => parts.push(format!("kmem accounting unknown: {why}")),
    }
    if known_issues.is_empty() {
        parts.push(format!("kernel {release}: no known memcg/kmem leak range"));
    } else {
        parts.push(format!(
            "kernel {release} is in {} known-affected range(s)",
            known_issues.len()
        ));
        for i in &known_issues {
            details.push(format!("{}: {}", i.id, i.summary));
        }
    }
    let (cgroup_version, cgroups_unknown) = match version {
        Ok(v) => (Some(v), None),
        Err(why) => (None, Some(why)),
    };
    Finding {
        check: "kmem",
        severity,
        summary: parts.join("; "),
        details,
        data: Some(Data::Kmem(KmemData {
            kernel_release: release.to_string(),
            known_issues,
            cgroup_version,
            kmem,
            cgroups_unknown,
        })),
    }
}

// ---- 5. BPF capability ----

#[derive(Debug, Clone, Serialize)]
pub struct BpfData {
    pub root: bool,
    pub btf: bool,
    pub kprobes: bool,
    /// The tracefs directory with kmem events, when one was found.
    pub tracefs: Option<String>,
    pub tracefs_note: Option<String>,
    pub kmem_tracepoints: bool,
    pub ring_buffer: Option<bool>,
    pub can_attach: bool,
    pub blockers: Vec<String>,
    pub next_command: String,
}

/// What is known about tracefs without mounting it (doctor changes nothing on the node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TracefsState {
    Found { path: String, kmem_events: bool },
    NotReadable(String),
    NotMounted,
}

pub fn probe_tracefs(root: &Path) -> TracefsState {
    let mut unreadable = None;
    for rel in ["sys/kernel/tracing", "sys/kernel/debug/tracing"] {
        let dir = root.join(rel);
        match std::fs::read_dir(&dir) {
            Ok(mut entries) => {
                // An unmounted mount point is an empty directory.
                if entries.next().is_none() {
                    continue;
                }
                return TracefsState::Found {
                    path: format!("/{rel}"),
                    kmem_events: dir.join("events/kmem/kmalloc").exists(),
                };
            }
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                unreadable.get_or_insert(format!("/{rel} is not readable ({e}); it needs root"));
            }
            Err(_) => {}
        }
    }
    unreadable.map_or(TracefsState::NotMounted, TracefsState::NotReadable)
}

/// The kernel's BPF ring buffer, which leaktrace needs, arrived in 5.8. RHEL 8 backported
/// it into 4.18 builds, so there the version cannot answer and the load will.
fn has_ring_buffer(release: &str) -> Option<bool> {
    let v = kernel::parse_version(release)?;
    if (v.major, v.minor) >= (5, 8) {
        return Some(true);
    }
    if kernel::rhel_build(release).is_some() && (v.major, v.minor) == (4, 18) {
        return None;
    }
    Some(false)
}

pub fn bpf_finding(
    root_user: bool,
    features: &Features,
    tracefs: &TracefsState,
    cache: Option<&str>,
) -> Finding {
    let ring_buffer = has_ring_buffer(&features.kernel_release);
    let mut blockers = Vec::new();
    if ring_buffer == Some(false) {
        blockers.push(format!(
            "kernel {} has no BPF ring buffer (needs 5.8+)",
            features.kernel_release
        ));
    }
    let (tracefs_path, tracefs_note, kmem_tracepoints) = match tracefs {
        TracefsState::Found { path, kmem_events } => {
            if !kmem_events {
                blockers.push(format!("{path}/events/kmem has no kmalloc tracepoint"));
            }
            (Some(path.clone()), None, *kmem_events)
        }
        TracefsState::NotReadable(why) => (None, Some(why.clone()), false),
        TracefsState::NotMounted => (
            None,
            Some("tracefs is not mounted; leaktrace mounts it at /sys/kernel/tracing when run as root".to_string()),
            false,
        ),
    };
    let can_attach = blockers.is_empty() && ring_buffer != Some(false);
    // Without a cache to name, the catalogue is where to pick one.
    let command = cache.map_or_else(
        || "leaktrace caches".to_string(),
        |c| format!("leaktrace --cache {c} --top"),
    );
    let next_command = match (can_attach, root_user) {
        (true, true) => command,
        (true, false) => format!("sudo {command}"),
        // Without BPF the best leaktrace-free step is watching the suspect grow.
        (false, _) => cache.map_or_else(
            || "slabtop -s c".to_string(),
            |c| format!("watch -n 1 \"grep -E '^{c} ' /proc/slabinfo\""),
        ),
    };
    let yes = |b: bool| if b { "yes" } else { "no" };
    let tracefs_word = match tracefs {
        TracefsState::Found { .. } => "yes",
        TracefsState::NotReadable(_) => "unknown",
        TracefsState::NotMounted => "not mounted",
    };
    let mut summary = if !can_attach {
        format!("leaktrace cannot attach here: {}", blockers.join("; "))
    } else if root_user {
        "leaktrace can attach here".to_string()
    } else {
        "leaktrace can attach here as root (this user is not root)".to_string()
    };
    summary.push_str(&format!(
        " (root {}, BTF {}, tracefs {}, kprobes {})",
        yes(root_user),
        yes(features.btf),
        tracefs_word,
        yes(features.kprobes)
    ));
    let mut details = Vec::new();
    if ring_buffer.is_none() {
        details.push(format!(
            "BPF ring buffer: unknown on {} (backports); loading leaktrace will tell",
            features.kernel_release
        ));
    }
    if !features.btf {
        details.push(
            "no BTF: classic kmem tracepoints are used (layouts from tracefs format files)"
                .to_string(),
        );
    }
    if let Some(note) = &tracefs_note {
        details.push(note.clone());
    }
    if !features.kprobes {
        details.push(
            "no kprobes on this kernel: not needed, slab tracing uses tracepoints".to_string(),
        );
    }
    Finding {
        check: "bpf",
        severity: if can_attach {
            Severity::Ok
        } else {
            Severity::Warning
        },
        summary,
        details,
        data: Some(Data::Bpf(BpfData {
            root: root_user,
            btf: features.btf,
            kprobes: features.kprobes,
            tracefs: tracefs_path,
            tracefs_note,
            kmem_tracepoints,
            ring_buffer,
            can_attach,
            blockers,
            next_command,
        })),
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
    let before = slabinfo::read(root);
    let sampled_at = Instant::now();
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
    let hierarchy = cgroups::locate(root);
    let walked = hierarchy
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e:#}"))
        .and_then(|h| cgroups::walk(h).map(|dirs| (h, dirs)));
    findings.push(match &walked {
        Ok((h, dirs)) => match cgroups::count(root, h, dirs) {
            Ok(counts) => memcg_finding(h, counts, cgroups::time_memory_stat(h, dirs)),
            Err(e) => Finding::unknown("memcgs", &e),
        },
        Err(e) => Finding::unknown("memcgs", e),
    });
    let (version, kmem) = match &walked {
        Ok((h, dirs)) => (
            Ok(h.version),
            (h.version == CgroupVersion::V1).then(|| cgroups::kmem_state(root, h, dirs)),
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
    let slab = slab.unwrap_or_else(|e| Finding::unknown("slab", &e));
    let cache = match &slab.data {
        Some(Data::Slab(s)) => s.suggested_cache.clone(),
        _ => None,
    };
    findings.push(slab);
    let bpf = bpf_finding(root_user, &features, &tracefs, cache.as_deref());
    let mut next_command = match &bpf.data {
        Some(Data::Bpf(b)) => Some(b.next_command.clone()),
        _ => None,
    };
    // Without slabinfo there is no cache to name; the useful next step is root.
    if cache.is_none() && !root_user {
        next_command = Some("sudo leaktrace doctor".to_string());
    }
    findings.push(bpf);
    // Stable: equal severities keep the issue's order (memory, memcgs, kmem, slab, bpf).
    findings.sort_by_key(|f| f.severity);
    Report {
        schema_version: 1,
        kernel_release: features.kernel_release,
        watch_seconds: start.elapsed().as_secs_f64(),
        findings,
        next_command,
    }
}

pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "leaktrace doctor — kernel {}, slab sampled over {:.1}s",
        report.kernel_release, report.watch_seconds
    );
    for f in &report.findings {
        let _ = writeln!(
            out,
            "{:<8} {:<7} {}",
            f.severity.label(),
            f.check,
            f.summary
        );
        for d in &f.details {
            let _ = writeln!(out, "{:17}{d}", "");
        }
    }
    match &report.next_command {
        Some(cmd) => {
            let _ = writeln!(out, "next: {cmd}");
        }
        None => {
            let _ = writeln!(
                out,
                "next: leaktrace cannot attach on this node; see the bpf line"
            );
        }
    }
    out
}

pub fn run(args: &DoctorArgs) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    let root_user = unsafe { libc::geteuid() } == 0;
    let watch = args.watch;
    let report = diagnose(&args.root, watch, root_user, || {
        eprintln!(
            "leaktrace doctor: sampling slab caches for {:.1}s ...",
            watch.as_secs_f64()
        );
    });
    if args.json {
        let line = serde_json::to_string(&report).context("serializing the diagnosis")?;
        println!("{line}");
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
