//! `--metrics ADDR`: the latest report in Prometheus' text exposition format,
//! served by a minimal HTTP responder on the run's own tokio loop. Labels are
//! bounded: the cache (one per run), and pid/comm only for the report's top
//! processes (at most --limit, capped at [`MAX_PROCESSES`]), so a fork bomb
//! cannot blow up the scraper's series count.

use std::{fmt::Write as _, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::slab::report::{ProcessReport, Report};

/// Upper bound on per-process series whatever --limit says.
pub const MAX_PROCESSES: usize = 50;

struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// Label values: backslash, double quote and newline are the only escapes.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let mut f = Family { out: &mut out };
    let cache = report.cache.as_str();
    let c = [("cache", cache)];
    let t = &report.totals;

    f.head(
        "leaktrace_outstanding_objects",
        "gauge",
        "Objects of the cache allocated since attach and not yet freed.",
    );
    f.sample("leaktrace_outstanding_objects", &c, t.outstanding);
    f.head(
        "leaktrace_outstanding_bytes",
        "gauge",
        "Bytes of the cache allocated since attach and not yet freed.",
    );
    f.sample("leaktrace_outstanding_bytes", &c, t.outstanding_bytes);
    f.head(
        "leaktrace_allocations_total",
        "counter",
        "Allocations from the cache seen since attach.",
    );
    f.sample("leaktrace_allocations_total", &c, t.allocs);
    f.head(
        "leaktrace_frees_total",
        "counter",
        "Frees of tracked objects seen since attach.",
    );
    f.sample("leaktrace_frees_total", &c, t.frees);

    if let Some(s) = &report.slab {
        f.head(
            "leaktrace_slab_active_objects",
            "gauge",
            "Active objects of the cache (and caches merged into it) per /proc/slabinfo, attributed or not.",
        );
        f.sample("leaktrace_slab_active_objects", &c, s.active_objs);
        f.head(
            "leaktrace_slab_objects",
            "gauge",
            "Allocated object slots of the cache per /proc/slabinfo.",
        );
        f.sample("leaktrace_slab_objects", &c, s.num_objs);
        f.head(
            "leaktrace_slab_object_size_bytes",
            "gauge",
            "Object size of the cache per /proc/slabinfo.",
        );
        f.sample("leaktrace_slab_object_size_bytes", &c, s.objsize);
    }

    let top: Vec<_> = report.processes.iter().take(MAX_PROCESSES).collect();
    type PerProcess = fn(&ProcessReport) -> f64;
    let per_process: [(&str, &str, PerProcess); 3] = [
        (
            "leaktrace_process_outstanding_objects",
            "Outstanding objects of the top processes (bounded by --limit; pid=\"other\" is the rest).",
            |p| p.counts.outstanding as f64,
        ),
        (
            "leaktrace_process_outstanding_bytes",
            "Outstanding bytes of the top processes (bounded by --limit; pid=\"other\" is the rest).",
            |p| p.counts.outstanding_bytes as f64,
        ),
        (
            "leaktrace_process_allocations_per_second",
            "Allocation rate of the top processes over --rate-window.",
            |p| p.alloc_rate,
        ),
    ];
    // Every process beyond the top ones, as one series, so the per-process
    // series add up to the tracked totals.
    let shown = |v: fn(&ProcessReport) -> f64| top.iter().map(|p| v(p)).sum::<f64>();
    let totals = &report.totals;
    let other: [f64; 3] = [
        (totals.outstanding as f64 - shown(|p| p.counts.outstanding as f64)).max(0.0),
        (totals.outstanding_bytes as f64 - shown(|p| p.counts.outstanding_bytes as f64)).max(0.0),
        report
            .processes
            .iter()
            .skip(top.len())
            .map(|p| p.alloc_rate)
            .sum(),
    ];
    for ((name, help, value), other) in per_process.into_iter().zip(other) {
        f.head(name, "gauge", help);
        for p in &top {
            let pid = p.tgid.to_string();
            let labels = [
                ("cache", cache),
                ("pid", pid.as_str()),
                ("comm", p.comm.as_str()),
            ];
            f.sample(name, &labels, value(p));
        }
        f.sample(
            name,
            &[("cache", cache), ("pid", "other"), ("comm", "other")],
            other,
        );
    }

    f.head(
        "leaktrace_cgroup_outstanding_bytes",
        "gauge",
        "Outstanding bytes by the cgroup that pays: the allocating task's, or the memcg a remote charge went to (top --limit cgroups).",
    );
    for cg in report.cgroups.iter().take(MAX_PROCESSES) {
        let id = cg.cgroup_id.to_string();
        let path = cg.path.as_deref().unwrap_or("");
        let labels = [
            ("cache", cache),
            ("cgroup", path),
            ("cgroup_id", id.as_str()),
        ];
        f.sample(
            "leaktrace_cgroup_outstanding_bytes",
            &labels,
            cg.counts.outstanding_bytes,
        );
    }

    let k = &report.kernel;
    f.head(
        "leaktrace_lost_events_total",
        "counter",
        "Events the kernel side could not deliver; the counts above miss these.",
    );
    for (reason, v) in [
        ("alloc_ringbuf_full", k.allocs_lost_ringbuf),
        ("alloc_live_map_full", k.allocs_lost_map_full),
        ("free_ringbuf_full", k.frees_lost_ringbuf),
    ] {
        f.sample(
            "leaktrace_lost_events_total",
            &[("cache", cache), ("reason", reason)],
            v,
        );
    }
    f.head(
        "leaktrace_stack_failures_total",
        "counter",
        "Stacks the kernel could not capture.",
    );
    for (kind, v) in [("kernel", k.kstack_failed), ("user", k.ustack_failed)] {
        f.sample(
            "leaktrace_stack_failures_total",
            &[("cache", cache), ("stack", kind)],
            v,
        );
    }
    let a = &report.anomalies;
    f.head(
        "leaktrace_anomalies_total",
        "counter",
        "Userspace inconsistencies that make counts less than exact (should stay 0).",
    );
    for (kind, v) in [
        ("unmatched_free", a.unmatched_frees),
        ("freed_unseen", a.freed_unseen),
        ("decode_error", a.decode_errors),
        ("misaligned", k.misaligned),
    ] {
        f.sample(
            "leaktrace_anomalies_total",
            &[("cache", cache), ("kind", kind)],
            v,
        );
    }
    if let Some(misses) = k.recursion_misses {
        f.head(
            "leaktrace_bpf_recursion_misses_total",
            "counter",
            "Runs of leaktrace's BPF programs the kernel skipped (another BPF program was running on the CPU).",
        );
        f.sample("leaktrace_bpf_recursion_misses_total", &c, misses);
    }
    f.head(
        "leaktrace_uptime_seconds",
        "gauge",
        "Seconds since leaktrace attached.",
    );
    f.sample("leaktrace_uptime_seconds", &c, report.elapsed_s);
    out
}

pub async fn bind(addr: std::net::SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("--metrics: listening on {addr}"))
}

/// Answers one connection with the exposition rendered at the last refresh.
/// Runs as its own task so a slow or silent client never holds up the loop
/// that drains the ring buffer; the timeout bounds how long it can linger.
pub async fn serve(mut conn: TcpStream, body: Arc<str>) {
    let _ = tokio::time::timeout(Duration::from_secs(5), async move {
        // Only the request line matters; read until the header ends or 8 KiB.
        let mut req = Vec::with_capacity(1024);
        let mut buf = [0u8; 1024];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => req.extend_from_slice(&buf[..n]),
            }
        }
        let line = String::from_utf8_lossy(&req);
        let path = line.split_whitespace().nth(1).unwrap_or("");
        let (status, ctype, payload): (&str, &str, &str) = match path {
            "/metrics" => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", &body),
            "/" => ("200 OK", "text/plain; charset=utf-8", "leaktrace: metrics at /metrics\n"),
            _ => ("404 Not Found", "text/plain; charset=utf-8", "not found\n"),
        };
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            payload.len()
        );
        if conn.write_all(head.as_bytes()).await.is_ok() {
            let _ = conn.write_all(payload.as_bytes()).await;
        }
        let _ = conn.shutdown().await;
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    fn report(processes: usize) -> Report {
        let p = |i: usize| crate::slab::report::ProcessReport {
            tgid: 1000 + i as u32,
            start_ns: 0,
            ppid: 0,
            parent_comm: None,
            exited: false,
            context: None,
            comm: format!("w\"{i}"),
            cmdline: None,
            cgroup_id: 7,
            cgroup: Some("/kubepods/pod1".to_string()),
            pod: None,
            charged_elsewhere: None,
            counts: crate::slab::report::Counts {
                outstanding: i as u64,
                outstanding_bytes: 512 * i as u64,
                allocs: i as u64,
                frees: 0,
            },
            alloc_rate: 1.5,
            growth_rate: 0.0,
            fingerprinted: Some(true),
            unfingerprinted_allocs: 0,
            stacks: Vec::new(),
        };
        Report {
            schema_version: crate::slab::report::SCHEMA_VERSION,
            kind: "snapshot",
            cache: "kmalloc-512".to_string(),
            source: crate::slab::report::MemorySource::Slab,
            aliases: Vec::new(),
            elapsed_s: 2.0,
            rss_bytes: None,
            meminfo: None,
            ledger: None,
            slab: None,
            totals: crate::slab::report::Counts {
                outstanding: 3,
                outstanding_bytes: 1536,
                allocs: 9,
                frees: 6,
            },
            kernel: Default::default(),
            anomalies: Default::default(),
            stacks: Default::default(),
            age: Default::default(),
            processes: (0..processes).map(p).collect(),
            cgroups: Vec::new(),
            group_by: Default::default(),
            groups: Vec::new(),
            top_stacks: Vec::new(),
            traced: None,
            pages: None,
            kheap: None,
            counts_are: None,
        }
    }

    #[test]
    fn per_process_series_add_up_to_the_totals() {
        let mut r = report(MAX_PROCESSES + 20);
        r.totals.outstanding = r.processes.iter().map(|p| p.counts.outstanding).sum();
        let text = render(&r);
        let sum: f64 = text
            .lines()
            .filter(|l| l.starts_with("leaktrace_process_outstanding_objects{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert_eq!(sum, r.totals.outstanding as f64, "{text}");
    }

    #[test]
    fn per_process_series_are_capped_and_every_family_is_typed() {
        let text = render(&report(MAX_PROCESSES + 20));
        let series = text
            .lines()
            .filter(|l| l.starts_with("leaktrace_process_outstanding_objects{"))
            .count();
        // The top ones and one "other" series for the rest.
        assert_eq!(series, MAX_PROCESSES + 1);
        assert!(text.contains("leaktrace_outstanding_objects{cache=\"kmalloc-512\"} 3\n"));
        assert!(text.contains("pid=\"other\",comm=\"other\"}"), "{text}");
        assert!(text.contains("comm=\"w\\\"1\""), "{text}");
        // Every sample belongs to a family announced with HELP and TYPE.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} untyped");
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name} without help"
            );
        }
        assert!(!text.contains("leaktrace_memcg_cgroups"));
    }
}
