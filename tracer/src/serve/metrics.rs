//! The always-on metrics: `leaktrace doctor`'s picture (slab caches, meminfo,
//! live and dying memcgs, memory.stat latency) in Prometheus' text format.
//!
//! Reads are lazy and rate-limited: nothing is read while nobody scrapes, and
//! however many scrapers there are, /proc/slabinfo (which walks every cache's
//! partial slabs with interrupts off) and the cgroup tree are read at most once
//! per --refresh, memory.stat (which forces a stats flush) at most once per
//! [`STAT_PERIOD`]. The reads run on tokio's blocking pool: on a sick node a
//! memory.stat read can take seconds, and the server must keep answering.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::kernel::cgroupfs::{self, CgroupDir, Hierarchy};
use crate::kernel::ledger::Ledger;
use crate::kernel::memory_stat::{self, StatTiming};
use crate::kernel::{meminfo, slabinfo};
use crate::slab::caches::Catalogue;

use super::kheap::{Estimates, Kheap};
use super::profile::Profiles;

/// Series per cache metric at most: a kernel has a few hundred caches, and a
/// bound keeps a pathological one (thousands of per-module caches) from
/// flooding the scraper. The largest caches by bytes are kept.
pub const MAX_CACHES: usize = 1000;
/// memory.stat forces an rstat flush: timing it more often would be part of the problem.
pub const STAT_PERIOD: Duration = Duration::from_secs(60);
/// Merged-cache aliases change only when modules load; /sys/kernel/slab is re-read this often.
const ALIAS_PERIOD: Duration = Duration::from_secs(600);

pub struct Collector {
    refresh: Duration,
    cached: tokio::sync::Mutex<Option<(Instant, Arc<str>)>>,
    state: Arc<Mutex<ReadState>>,
}

struct ReadState {
    root: PathBuf,
    /// slabinfo name -> the other names merged into it.
    aliases: Option<(Instant, BTreeMap<String, Vec<String>>)>,
    stat: Option<(Instant, Result<Vec<StatTiming>, String>)>,
    /// CONFIG_VMAP_STACK, read from BTF at the first scrape: it cannot change.
    vmap_stack: Option<Option<bool>>,
}

impl Collector {
    pub fn new(root: PathBuf, refresh: Duration) -> Collector {
        Collector {
            refresh,
            cached: tokio::sync::Mutex::new(None),
            state: Arc::new(Mutex::new(ReadState {
                root,
                aliases: None,
                stat: None,
                vmap_stack: None,
            })),
        }
    }

    /// The exposition: cached kernel reads, then the live serve/trace figures.
    pub async fn render(&self, profiles: &Profiles, kheap: &Kheap) -> String {
        let kernel = {
            // Held across the read, so concurrent scrapes share one read.
            let mut cached = self.cached.lock().await;
            match cached.as_ref() {
                Some((at, body)) if at.elapsed() < self.refresh => body.clone(),
                _ => {
                    let state = self.state.clone();
                    let body: Arc<str> = tokio::task::spawn_blocking(move || {
                        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                        read_kernel(&mut s)
                    })
                    .await
                    .unwrap_or_else(|e| format!("# kernel reads failed: {e}\n"))
                    .into();
                    *cached = Some((Instant::now(), body.clone()));
                    body
                }
            }
        };
        let mut out = String::with_capacity(kernel.len() + 2048);
        out.push_str(&kernel);
        render_serve(&mut out, profiles);
        let estimates = kheap.estimates().await;
        render_kheap(&mut out, kheap, estimates);
        out
    }
}

/// The continuous heap sampler: its state, and the in-use estimate by cache
/// from its latest snapshot (top caches and `other`).
fn render_kheap(out: &mut String, kheap: &Kheap, estimates: Option<Result<Estimates, String>>) {
    if !kheap.continuous.enabled() {
        return;
    }
    let st = kheap.continuous.status();
    head(
        out,
        "leaktrace_kheap_sampler_up",
        "gauge",
        "1 while the continuous heap sampler (serve's child for /debug/pprof/kheap) runs; 0 while it is down \
         or restarting; absent with --no-continuous.",
    );
    sample(
        out,
        "leaktrace_kheap_sampler_up",
        &[],
        u8::from(st.running_since.is_some()),
    );
    head(
        out,
        "leaktrace_kheap_sampler_start_time_seconds",
        "gauge",
        "Unix time the running heap sampler started: its profile covers allocations since then.",
    );
    if let Some(since) = st.running_since {
        let secs = since
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        sample(out, "leaktrace_kheap_sampler_start_time_seconds", &[], secs);
    }
    head(
        out,
        "leaktrace_kheap_sampler_restarts_total",
        "counter",
        "Times the heap sampler died or was stuck and was started again (its last error is in serve's log).",
    );
    sample(
        out,
        "leaktrace_kheap_sampler_restarts_total",
        &[],
        st.restarts,
    );
    head(
        out,
        "leaktrace_kheap_sampler_sample_bytes",
        "gauge",
        "The sampler's mean bytes allocated between samples (--sample-bytes).",
    );
    sample(
        out,
        "leaktrace_kheap_sampler_sample_bytes",
        &[],
        kheap.continuous.sample_bytes(),
    );
    head(
        out,
        "leaktrace_kheap_snapshots_total",
        "counter",
        "Heap profiles taken from the sampler (for /debug/pprof/kheap and these metrics), by result.",
    );
    sample(
        out,
        "leaktrace_kheap_snapshots_total",
        &[("result", "ok")],
        st.snapshots_ok,
    );
    sample(
        out,
        "leaktrace_kheap_snapshots_total",
        &[("result", "failed")],
        st.snapshots_failed,
    );
    let Some(Ok(e)) = estimates else {
        return;
    };
    head(
        out,
        "leaktrace_kheap_inuse_bytes",
        "gauge",
        "Sampled estimate (not a count) of slab bytes allocated since the sampler started and still in use, by cache: \
         each sample stands for 1/(1 - e^(-size/sample_bytes)) objects, so the estimate is unbiased and its relative \
         error about 1/sqrt(samples); the largest caches by name, the rest summed as cache=\"other\". \
         Low by up to the dropped samples' share when the sampler's table was full.",
    );
    for (cache, bytes) in &e.caches.inuse_bytes {
        sample(
            out,
            "leaktrace_kheap_inuse_bytes",
            &[("cache", cache)],
            bytes,
        );
    }
    head(
        out,
        "leaktrace_kheap_inuse_objects",
        "gauge",
        "Sampled estimate of slab objects allocated since the sampler started and still in use, all caches.",
    );
    sample(
        out,
        "leaktrace_kheap_inuse_objects",
        &[],
        e.caches.inuse_objects,
    );
    for (name, kind, help, value) in [
        (
            "leaktrace_kheap_samples_total",
            "counter",
            "Allocations the heap sampler has sampled since it started (resets when it restarts).",
            e.samples,
        ),
        (
            "leaktrace_kheap_samples_held",
            "gauge",
            "Samples still live in the sampler's table: the in-use estimates stand on these \
             (relative error about 1/sqrt of a cache's share).",
            e.held,
        ),
        (
            "leaktrace_kheap_dropped_samples_total",
            "counter",
            "Samples the sampler could not keep because its table was full: in-use estimates are low by their weight.",
            e.dropped,
        ),
    ] {
        if let Some(n) = value {
            head(out, name, kind, help);
            sample(out, name, &[], n);
        }
    }
}

/// Every kernel bucket of the ledger (`kernel::ledger`) as one gauge; buckets this kernel
/// does not print are left out rather than reported as 0.
fn render_ledger(out: &mut String, l: &Ledger) {
    const NAME: &str = "leaktrace_kernel_memory_bytes";
    head(
        out,
        NAME,
        "gauge",
        "Kernel memory by /proc/meminfo bucket: slab_unreclaimable (SUnreclaim), slab_reclaimable (SReclaimable), \
         kreclaimable_other (KReclaimable - SReclaimable), kernel_stack (KernelStack; inside vmalloc with CONFIG_VMAP_STACK), \
         page_tables (PageTables), sec_page_tables (SecPageTables), percpu (Percpu), vmalloc (VmallocUsed), hugetlb (Hugetlb), \
         zswap (Zswap), and unexplained: MemTotal - MemFree - per-CPU free lists - LRU - the buckets above, the pages the kernel \
         took straight from the page allocator (pipes, sockets, drivers); only its changes are meaningful (may be negative).",
    );
    for b in &l.buckets {
        if let Some(kb) = b.kb {
            sample(out, NAME, &[("bucket", b.name)], kb.saturating_mul(1024));
        }
    }
    head(
        out,
        "leaktrace_pcp_free_bytes",
        "gauge",
        "Pages on the per-CPU free lists (/proc/zoneinfo pagesets count): free, but not in MemFree.",
    );
    if let Some(kb) = l.pcp_free_kb {
        sample(
            out,
            "leaktrace_pcp_free_bytes",
            &[],
            kb.saturating_mul(1024),
        );
    }
}

fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{}\"", escape(v));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn read_kernel(s: &mut ReadState) -> String {
    let mut out = String::with_capacity(64 * 1024);
    let root = s.root.clone();
    let mut up: Vec<(&str, bool, f64)> = Vec::new();

    let start = Instant::now();
    let slab = slabinfo::read(&root);
    up.push(("slabinfo", slab.is_ok(), start.elapsed().as_secs_f64()));
    if let Ok(mut lines) = slab {
        if s.aliases
            .as_ref()
            .is_none_or(|(at, _)| at.elapsed() >= ALIAS_PERIOD)
        {
            s.aliases = Some((Instant::now(), read_aliases(&root)));
        }
        let aliases = s.aliases.as_ref().map(|(_, a)| a);
        render_slab(&mut out, &mut lines, aliases);
    }

    let start = Instant::now();
    let mem = meminfo::read(&root);
    up.push(("meminfo", mem.is_ok(), start.elapsed().as_secs_f64()));
    if let Ok(m) = mem {
        for (name, kb, help) in [
            ("leaktrace_meminfo_slab_bytes", m.slab_kb, "Slab in /proc/meminfo: all slab memory."),
            (
                "leaktrace_meminfo_sunreclaim_bytes",
                m.sunreclaim_kb,
                "SUnreclaim in /proc/meminfo: slab memory the kernel cannot reclaim under pressure; a leak grows this.",
            ),
            (
                "leaktrace_meminfo_sreclaimable_bytes",
                m.sreclaimable_kb,
                "SReclaimable in /proc/meminfo: slab memory reclaimable under pressure (dentries, inodes).",
            ),
            ("leaktrace_meminfo_memtotal_bytes", m.mem_total_kb, "MemTotal in /proc/meminfo."),
            (
                "leaktrace_meminfo_memavailable_bytes",
                m.mem_available_kb,
                "MemAvailable in /proc/meminfo.",
            ),
        ] {
            head(&mut out, name, "gauge", help);
            sample(&mut out, name, &[], kb.saturating_mul(1024));
        }
    }

    let start = Instant::now();
    let vmap_stack = *s
        .vmap_stack
        .get_or_insert_with(|| crate::kernel::facts::detect_vmap_stack(&root, None));
    let ledger = Ledger::read(&root, vmap_stack);
    up.push(("ledger", ledger.is_ok(), start.elapsed().as_secs_f64()));
    if let Ok(l) = ledger {
        render_ledger(&mut out, &l);
    }

    let start = Instant::now();
    let memcg = Hierarchy::bound(&root).and_then(|h| {
        let dirs = h.dirs(true)?;
        let counts = cgroupfs::count(&root, &h, &dirs)?;
        Ok((h, dirs, counts))
    });
    up.push(("memcg", memcg.is_ok(), start.elapsed().as_secs_f64()));
    if let Ok((h, dirs, counts)) = memcg {
        head(
            &mut out,
            "leaktrace_memcg_live",
            "gauge",
            "Memory cgroups with a directory (not removed).",
        );
        sample(&mut out, "leaktrace_memcg_live", &[], counts.live);
        head(
            &mut out,
            "leaktrace_memcg_dying",
            "gauge",
            "Memory cgroups removed but still held by the kernel (dying, zombie memcgs): each pins its per-CPU stats and the charged objects that keep it alive.",
        );
        sample(&mut out, "leaktrace_memcg_dying", &[], counts.dying);
        render_stat_timing(&mut out, s, &h, &dirs);
    }

    head(
        &mut out,
        "leaktrace_serve_source_up",
        "gauge",
        "Whether the last read of this kernel source succeeded (slabinfo needs root).",
    );
    for (source, ok, _) in &up {
        sample(
            &mut out,
            "leaktrace_serve_source_up",
            &[("source", source)],
            u8::from(*ok),
        );
    }
    head(
        &mut out,
        "leaktrace_serve_read_seconds",
        "gauge",
        "How long the last read of this kernel source took.",
    );
    for (source, _, secs) in &up {
        sample(
            &mut out,
            "leaktrace_serve_read_seconds",
            &[("source", source)],
            secs,
        );
    }
    out
}

fn render_stat_timing(out: &mut String, s: &mut ReadState, h: &Hierarchy, dirs: &[CgroupDir]) {
    if s.stat
        .as_ref()
        .is_none_or(|(at, _)| at.elapsed() >= STAT_PERIOD)
    {
        let timing = memory_stat::time_memory_stat(h, dirs).map_err(|e| format!("{e:#}"));
        s.stat = Some((Instant::now(), timing));
    }
    let Some((_, Ok(timings))) = &s.stat else {
        return;
    };
    head(
        out,
        "leaktrace_memcg_stat_read_seconds",
        "gauge",
        "Time to read memory.stat of the root memcg and of the memcg using the most memory (read at most once a minute: each read forces a stats flush). Seconds here mean every monitoring agent on the node is stalling.",
    );
    for (i, t) in timings.iter().enumerate() {
        let which = if i == 0 { "root" } else { "largest" };
        sample(
            out,
            "leaktrace_memcg_stat_read_seconds",
            &[("memcg", which)],
            t.seconds,
        );
    }
}

fn read_aliases(root: &Path) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let Ok(catalogue) = Catalogue::read(root) else {
        return out;
    };
    for info in catalogue.iter() {
        if let Some(kernel) = &info.kernel_name {
            if *kernel != info.name {
                out.entry(kernel.clone())
                    .or_default()
                    .push(info.name.clone());
            }
        }
    }
    out
}

/// How one per-cache family reads its value from the slabinfo line.
type SlabValue = fn(&slabinfo::SlabLine) -> u64;

fn render_slab(
    out: &mut String,
    lines: &mut Vec<slabinfo::SlabLine>,
    aliases: Option<&BTreeMap<String, Vec<String>>>,
) {
    // Largest first, so the bound drops the smallest caches.
    lines.sort_by(|a, b| {
        b.total_bytes()
            .cmp(&a.total_bytes())
            .then(a.name.cmp(&b.name))
    });
    let omitted = lines.len().saturating_sub(MAX_CACHES);
    lines.truncate(MAX_CACHES);
    lines.sort_by(|a, b| a.name.cmp(&b.name));
    let families: [(&str, &str, SlabValue); 4] = [
        (
            "leaktrace_slab_active_objects",
            "Objects in use in the slab cache (/proc/slabinfo active_objs; merged caches count under the name slabinfo shows, see leaktrace_slab_merged_cache). Growth: deriv() of this.",
            |l| l.active_objs,
        ),
        (
            "leaktrace_slab_active_bytes",
            "Bytes of objects in use in the slab cache (active_objs x objsize).",
            |l| l.active_bytes(),
        ),
        (
            "leaktrace_slab_total_bytes",
            "Bytes of all objects the cache's slabs have room for (num_objs x objsize, slabtop's CACHE SIZE).",
            |l| l.total_bytes(),
        ),
        (
            "leaktrace_slab_object_size_bytes",
            "Size of one object including alignment and metadata (slabinfo objsize).",
            |l| l.objsize,
        ),
    ];
    for (name, help, value) in families {
        head(out, name, "gauge", help);
        for l in lines.iter() {
            sample(out, name, &[("cache", &l.name)], value(l));
        }
    }
    if let Some(aliases) = aliases {
        head(
            out,
            "leaktrace_slab_merged_cache",
            "gauge",
            "1 for each cache merged into another (SLUB cache merging): its objects are counted in the series of `cache`, the name /proc/slabinfo shows.",
        );
        for l in lines.iter() {
            for alias in aliases.get(&l.name).into_iter().flatten() {
                sample(
                    out,
                    "leaktrace_slab_merged_cache",
                    &[("cache", &l.name), ("alias", alias)],
                    1,
                );
            }
        }
    }
    head(
        out,
        "leaktrace_slab_caches_omitted",
        "gauge",
        "Smallest caches left out of the per-cache series to bound cardinality.",
    );
    sample(out, "leaktrace_slab_caches_omitted", &[], omitted);
}

fn render_serve(out: &mut String, profiles: &Profiles) {
    let st = profiles.status();
    head(
        out,
        "leaktrace_serve_trace_active",
        "gauge",
        "1 while a /debug/pprof/kmem deep trace runs (at most one at a time).",
    );
    sample(
        out,
        "leaktrace_serve_trace_active",
        &[],
        u8::from(st.active),
    );
    head(
        out,
        "leaktrace_serve_trace_attached",
        "gauge",
        "1 while the deep trace's BPF programs are attached to the kmem tracepoints.",
    );
    sample(
        out,
        "leaktrace_serve_trace_attached",
        &[],
        u8::from(st.attached),
    );
    head(
        out,
        "leaktrace_serve_trace_attached_seconds_total",
        "counter",
        "Seconds deep traces have had programs attached: the time the kernel paid per-allocation tracing.",
    );
    sample(
        out,
        "leaktrace_serve_trace_attached_seconds_total",
        &[],
        st.attached_seconds,
    );
    head(
        out,
        "leaktrace_serve_traces_total",
        "counter",
        "Deep traces run, by result.",
    );
    sample(
        out,
        "leaktrace_serve_traces_total",
        &[("result", "ok")],
        st.ok,
    );
    sample(
        out,
        "leaktrace_serve_traces_total",
        &[("result", "failed")],
        st.failed,
    );
    head(
        out,
        "leaktrace_serve_trace_rejections_total",
        "counter",
        "Profile requests refused before anything attached, by reason.",
    );
    for (reason, n) in st.rejected {
        sample(
            out,
            "leaktrace_serve_trace_rejections_total",
            &[("reason", reason)],
            n,
        );
    }
    if let Some(pid) = st.child_pid {
        let (rss, memlock) = child_cost(pid);
        head(
            out,
            "leaktrace_serve_trace_rss_bytes",
            "gauge",
            "Resident memory of the running deep trace's process.",
        );
        sample(out, "leaktrace_serve_trace_rss_bytes", &[], rss);
        head(
            out,
            "leaktrace_serve_trace_bpf_map_bytes",
            "gauge",
            "Kernel memory of the running deep trace's BPF maps (memlock in their fdinfo); charged to serve's memcg.",
        );
        sample(out, "leaktrace_serve_trace_bpf_map_bytes", &[], memlock);
    }
    head(
        out,
        "leaktrace_serve_rss_bytes",
        "gauge",
        "Resident memory of the serve process itself.",
    );
    sample(
        out,
        "leaktrace_serve_rss_bytes",
        &[],
        crate::kernel::own_memory::own_rss_bytes().unwrap_or(0),
    );
}

/// The child's VmRSS and the memlock of its BPF map fds, from /proc.
fn child_cost(pid: u32) -> (u64, u64) {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let rss = std::fs::read_to_string(proc.join("status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024);
    let mut memlock = 0u64;
    if let Ok(entries) = std::fs::read_dir(proc.join("fdinfo")) {
        for e in entries.flatten() {
            let Ok(text) = std::fs::read_to_string(e.path()) else {
                continue;
            };
            // Only BPF maps have map_type; programs have memlock too but are small.
            if !text.lines().any(|l| l.starts_with("map_type:")) {
                continue;
            }
            memlock += text
                .lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    (rss, memlock)
}
