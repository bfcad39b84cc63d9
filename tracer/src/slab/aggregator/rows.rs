//! A snapshot of the live table, built straight into the report's rows:
//! each process's counts and rates, each stratum's stacks with their shares
//! (exact, or estimated level by level by `estimate.rs`), each cgroup's
//! counts, and the age of outstanding objects.

use hdrhistogram::Histogram;
use tracer_common::slab::FINGERPRINT_FRAMES;

use super::{site_level, Aggregator, Interrupt, Process, Site};
use crate::{
    bpf::stacks::StackId,
    slab::estimate::{self, Level},
    slab::report::{
        AgeSummary, Anomalies, CgroupReport, ChargedElsewhere, Counts, ProcKey, ProcessReport,
        SortKey, StackReport, StackSampling,
    },
};

/// The live table at one moment, as the report's rows (unnamed: `naming.rs`
/// adds symbols, process and cgroup names).
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub totals: Counts,
    pub anomalies: Anomalies,
    pub stacks: StackSampling,
    pub age: AgeSummary,
    pub processes: Vec<ProcessReport>,
    pub cgroups: Vec<CgroupReport>,
}

/// What a snapshot holds: processes in `sort` order, the first `limit`
/// (those of `pid`, or whose comm contains `comm`), each with its first
/// `stacks` stacks.
#[derive(Debug, Clone)]
pub struct SnapshotOptions {
    pub sort: SortKey,
    pub limit: usize,
    pub stacks: usize,
    pub comm: Option<String>,
    pub pid: Option<u32>,
}

impl Aggregator {
    fn rates(&self, p: &Process, now_ns: u64) -> (f64, f64) {
        let (t0, allocs0, out0) = p
            .history
            .front()
            .copied()
            .unwrap_or((p.first_seen_ns, 0, 0));
        let dt = now_ns.saturating_sub(t0) as f64 / 1e9;
        if dt < 0.05 {
            return (0.0, 0.0);
        }
        let alloc_rate = p.counts.allocs.saturating_sub(allocs0) as f64 / dt;
        let growth = (p.counts.outstanding as f64 - out0 as f64) / dt;
        (alloc_rate, growth)
    }

    fn age(&self, now_ns: u64) -> AgeSummary {
        let Ok(mut h) = Histogram::<u64>::new(3) else {
            return AgeSummary::default();
        };
        for live in self.objects.values() {
            let born_ns = self.base_ns.unwrap_or(0) + u64::from(live.ts_ms) * 1_000_000;
            let ms = now_ns.saturating_sub(born_ns) / 1_000_000;
            // `record` grows the histogram; `saturating_record` never does, and
            // clamped every age past the initial 2,047 ms to the initial
            // highest trackable value, 2 ms.
            if h.record(ms).is_err() {
                h.saturating_record(ms);
            }
        }
        if h.is_empty() {
            return AgeSummary::default();
        }
        AgeSummary {
            count: h.len(),
            p50_ms: h.value_at_quantile(0.50),
            p99_ms: h.value_at_quantile(0.99),
            max_ms: h.max(),
        }
    }

    /// Every stack row of one stratum: the drawn sites with their shares,
    /// exact or estimated level by level, plus a partial row for whatever no
    /// drawn object can speak for.
    fn stratum_rows(&mut self, stratum: u32) -> Vec<StackReport> {
        let Some(h) = self.strata.get(stratum as usize) else {
            return Vec::new();
        };
        let sites: Vec<&Site> = h
            .sites
            .iter()
            .filter_map(|&s| self.sites.get(s as usize))
            .collect();
        // Each quantity split level by level; shares are apportioned so a
        // stratum's rows add up to its exact counts (every export's total
        // equals the header's).
        let split = |part: fn(&Counts) -> u64| {
            let hits: Vec<Vec<u64>> = h
                .levels
                .iter()
                .map(|l| {
                    sites
                        .iter()
                        .map(|s| site_level(s, l.level).map_or(0, part))
                        .collect()
                })
                .collect();
            let levels: Vec<Level<'_>> = h
                .levels
                .iter()
                .zip(&hits)
                .map(|(l, hits)| Level {
                    total: part(&l.counts),
                    drawn: part(&l.drawn),
                    hits,
                })
                .collect();
            estimate::split(&levels, sites.len())
        };
        let outstanding = split(|c| c.outstanding);
        let bytes = split(|c| c.outstanding_bytes);
        let allocs = split(|c| c.allocs);
        let frees = split(|c| c.frees);
        let estimated =
            outstanding.estimated || bytes.estimated || allocs.estimated || frees.estimated;
        let total = h.counts.outstanding;
        let mut rows: Vec<StackReport> = sites
            .iter()
            .enumerate()
            .map(|(i, site)| {
                let (low, high) = (outstanding.low[i], outstanding.high[i]);
                StackReport {
                    kstack: site.kstack,
                    ustack: site.ustack,
                    counts: Counts {
                        outstanding: outstanding.per_stack[i],
                        outstanding_bytes: bytes.per_stack[i],
                        allocs: allocs.per_stack[i],
                        frees: frees.per_stack[i],
                    },
                    // Unsplit objects widen an exact part's interval too.
                    estimated: estimated || low != high,
                    outstanding_low: low,
                    outstanding_high: high,
                    partial: false,
                    stratum_outstanding: total,
                    kernel: Vec::new(),
                    user: Vec::new(),
                    kernel_locations: Vec::new(),
                    user_locations: Vec::new(),
                }
            })
            .collect();
        let rest = Counts {
            outstanding: outstanding.undrawn,
            outstanding_bytes: bytes.undrawn,
            allocs: allocs.undrawn,
            frees: frees.undrawn,
        };
        if rest != Counts::default() {
            let (call_site, user_ip, name) = (h.key.call_site, h.user_ip, h.name);
            let fingerprinted = h.key.fingerprint != 0;
            // The page source's hook has no call site: no frame is better
            // than a made-up `[kernel] 0x0`.
            let kstack = if call_site == 0 {
                StackId::EMPTY
            } else {
                self.stacks.intern(&[call_site])
            };
            let ustack = match name {
                Some((_, u)) if fingerprinted => {
                    let frames = self.stacks.frames(u);
                    let shared: Vec<u64> = frames[..frames.len().min(FINGERPRINT_FRAMES)].to_vec();
                    self.stacks.intern(&shared)
                }
                _ if user_ip != 0 => self.stacks.intern(&[user_ip]),
                _ => StackId::EMPTY,
            };
            rows.push(StackReport {
                kstack,
                ustack,
                outstanding_low: rest.outstanding,
                outstanding_high: rest.outstanding,
                counts: rest,
                estimated: false,
                partial: true,
                stratum_outstanding: total,
                kernel: Vec::new(),
                user: Vec::new(),
                kernel_locations: Vec::new(),
                user_locations: Vec::new(),
            });
        }
        rows
    }

    pub fn snapshot(&mut self, now_ns: u64, opts: &SnapshotOptions) -> Snapshot {
        let mut rows: Vec<ProcessReport> = self
            .procs
            .values()
            .filter(|p| opts.pid.is_none_or(|pid| pid == p.key.tgid))
            .filter(|p| opts.comm.as_deref().is_none_or(|c| p.comm.contains(c)))
            .map(|p| {
                let (alloc_rate, growth_rate) = self.rates(p, now_ns);
                ProcessReport {
                    tgid: p.key.tgid,
                    start_ns: p.key.start_ns,
                    ppid: p.ppid,
                    parent_comm: None,
                    exited: p.exited,
                    context: Interrupt::of_key(p.key).map(Interrupt::name),
                    comm: p.comm.clone(),
                    cmdline: None,
                    cgroup_id: p.last_cgroup_id,
                    cgroup: None,
                    pod: None,
                    charged_elsewhere: p.charged_elsewhere.map(|(cgroup_id, allocs)| {
                        ChargedElsewhere {
                            cgroup_id,
                            cgroup: None,
                            allocs,
                        }
                    }),
                    counts: p.counts.clone(),
                    alloc_rate,
                    growth_rate,
                    fingerprinted: self
                        .sampling
                        .user_paths
                        .then(|| p.shallow_allocs.saturating_mul(2) <= p.counts.allocs),
                    unfingerprinted_allocs: p.shallow_allocs,
                    stacks: Vec::new(),
                }
            })
            .collect();
        rows.sort_by(|a, b| {
            opts.sort
                .compare((&b.counts, b.alloc_rate), (&a.counts, a.alloc_rate))
                .then(a.tgid.cmp(&b.tgid))
                .then(a.start_ns.cmp(&b.start_ns))
        });
        rows.truncate(opts.limit);
        for row in &mut rows {
            let strata = self
                .procs
                .get(&ProcKey {
                    tgid: row.tgid,
                    start_ns: row.start_ns,
                })
                .map(|p| p.strata.clone())
                .unwrap_or_default();
            let mut sites: Vec<StackReport> = strata
                .into_iter()
                .flat_map(|h| self.stratum_rows(h))
                .collect();
            sites.sort_by(|a, b| match opts.sort {
                SortKey::Outstanding => (b.counts.outstanding_bytes, b.counts.allocs)
                    .cmp(&(a.counts.outstanding_bytes, a.counts.allocs)),
                SortKey::Rate | SortKey::Allocs => b.counts.allocs.cmp(&a.counts.allocs),
            });
            sites.truncate(opts.stacks);
            row.stacks = sites;
        }
        let mut cgroups: Vec<CgroupReport> = self
            .cgroups
            .iter()
            .filter(|(_, c)| c.outstanding > 0)
            .map(|(&cgroup_id, c)| CgroupReport {
                cgroup_id,
                path: None,
                pod: None,
                counts: c.clone(),
            })
            .collect();
        cgroups.sort_by(|a, b| {
            b.counts
                .outstanding_bytes
                .cmp(&a.counts.outstanding_bytes)
                .then(a.cgroup_id.cmp(&b.cgroup_id))
        });
        cgroups.truncate(opts.limit);
        Snapshot {
            totals: self.totals.clone(),
            anomalies: self.anomalies.clone(),
            stacks: self.sampling.clone(),
            age: self.age(now_ns),
            processes: rows,
            cgroups,
        }
    }
}
