//! What `leaktrace memcg` reports: one [`Report`] per snapshot, final report
//! or list, and the model types the views and the pprof profile read from it
//! (re-exported here so readers need no other memcg module).

use anyhow::{Context, Result};
use serde::Serialize;

pub use super::hooks::Counters;
pub use super::kmem::Accounting;
pub use super::state::{Actor, Group, MemcgReport, Phase, Snapshot};
pub use super::walk::{KMemcg, KernelWalk};
use super::{kread, pins, walk};
pub use crate::kernel::memcg_percpu::Estimate;
use crate::kernel::{btf::Btf, cgroupfs::Hierarchy};

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema_version: u32,
    pub report: &'static str,
    /// "snapshot", "final", or "list".
    pub kind: &'static str,
    pub elapsed_s: f64,
    /// The one line saying which hooks are active.
    pub mode: String,
    pub attribution: String,
    pub hierarchy: Hierarchy,
    pub zombie_after_s: f64,
    pub preexisting_dying: Preexisting,
    #[serde(flatten)]
    pub snapshot: Snapshot,
    /// Per-CPU memory of the memcgs: measured, estimated, the dying total.
    pub percpu: PercpuSummary,
    pub kernel: Counters,
    /// Events the decoder could not read (should be 0).
    pub decode_errors: u64,
    /// Every memcg the kernel still holds, read from kernel memory (list and
    /// final reports; None in snapshots).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_memcgs: Option<KernelMemcgs>,
    /// Whether kernel memory is charged to memcgs here, as the kernel defines it.
    pub kmem_accounting: Accounting,
}

impl Report {
    /// Whether memcg `id` is in this report: traced, listed, or in the
    /// kernel's walk of every memcg it still holds. None where there is no
    /// walk (not root, no BTF) to tell "no such memcg" from "not looked at".
    pub fn finds_memcg(&self, id: u64) -> Option<bool> {
        if self.snapshot.memcgs.iter().any(|m| m.id == id) {
            return Some(true);
        }
        let walk = self.kernel_memcgs.as_ref()?.walk.as_ref()?;
        Some(walk.memcgs.iter().any(|m| m.id == id))
    }
}

/// The per-CPU memory memcgs hold (`Percpu` in /proc/meminfo): measured for
/// those made under tracing, estimated (BTF sizes × possible CPUs) for the
/// rest. Bytes are per-CPU `size` × possible CPUs, as on every kernel.
#[derive(Debug, Clone, Serialize)]
pub struct PercpuSummary {
    /// The percpu tracepoints are attached and `cgroup_mkdir`'s text known.
    pub measuring: bool,
    pub possible_cpus: u64,
    /// One memcg, from BTF.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimate: Option<Estimate>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimate_unavailable: Option<String>,
    pub dying: DyingPercpu,
    /// Per-CPU allocations seen outside any cgroup mkdir (not counted).
    pub other_allocations: u64,
    /// cgroup v2: the kernel's charged figure under the top-level memcgs
    /// (`kernel::memcg_percpu::memory_stat_percpu`), a cross-check.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_stat_percpu: Option<u64>,
}

/// The dying memcgs the kernel holds now and what they hold per CPU.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DyingPercpu {
    pub memcgs: u64,
    /// Dying memcgs made under tracing, measured.
    pub measured_memcgs: u64,
    pub measured_bytes: u64,
    /// The others (made before tracing): `estimate.dying_bytes` each.
    pub estimated_memcgs: u64,
    pub estimated_bytes: u64,
    /// measured + estimated; None without an estimate for the others.
    pub total_bytes: Option<u64>,
}

impl PercpuSummary {
    pub fn new(
        measuring: bool,
        possible_cpus: u64,
        estimate: Result<Estimate, String>,
        snapshot: &Snapshot,
        kernel_dying: u64,
        other_allocations: u64,
    ) -> PercpuSummary {
        let (estimate, estimate_unavailable) = match estimate {
            Ok(e) => (Some(e), None),
            Err(why) => (None, Some(why)),
        };
        let mut dying = DyingPercpu {
            memcgs: kernel_dying,
            ..DyingPercpu::default()
        };
        let is_dying = |p: Phase| matches!(p, Phase::Dying | Phase::Zombie);
        for m in snapshot.memcgs.iter().filter(|m| is_dying(m.state)) {
            if let Some(p) = m.percpu.as_ref().filter(|p| p.kind == "measured") {
                dying.measured_memcgs += 1;
                dying.measured_bytes += p.bytes;
            }
        }
        dying.estimated_memcgs = kernel_dying.saturating_sub(dying.measured_memcgs);
        if let Some(e) = &estimate {
            dying.estimated_bytes = dying.estimated_memcgs * e.dying_bytes;
            dying.total_bytes = Some(dying.measured_bytes + dying.estimated_bytes);
        } else if dying.estimated_memcgs == 0 {
            dying.total_bytes = Some(dying.measured_bytes);
        }
        PercpuSummary {
            measuring,
            possible_cpus,
            estimate,
            estimate_unavailable,
            dying,
            other_allocations,
            memory_stat_percpu: None,
        }
    }
}

/// The kernel walk's result, or why there is none.
#[derive(Debug, Clone, Serialize)]
pub struct KernelMemcgs {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub walk: Option<KernelWalk>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unknown: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aggregate: Option<DyingAggregate>,
}

/// "N dying: M hold file pages, X GiB".
#[derive(Debug, Clone, Default, Serialize)]
pub struct DyingAggregate {
    pub dying: u64,
    pub holding_file_pages: u64,
    pub holding_pages: u64,
    /// Sum of the dying memcgs' memory page counters, in bytes.
    pub charged_bytes: u64,
    pub file_bytes: u64,
    pub shmem_bytes: u64,
    pub anon_bytes: u64,
    pub swap_bytes: u64,
    pub kernel_bytes: u64,
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(p).ok().filter(|&p| p > 0).unwrap_or(4096)
}

impl KernelMemcgs {
    /// Walks the kernel's memcgs now (root and BPF needed); a failure is
    /// kept as the reason in `unknown` rather than failing the report.
    pub fn read() -> KernelMemcgs {
        match Self::try_read() {
            Ok(w) => {
                let page = page_size();
                let mut a = DyingAggregate::default();
                let b = |v: Option<i64>| u64::try_from(v.unwrap_or(0)).unwrap_or(0) * page;
                for m in w.dying() {
                    a.dying += 1;
                    if m.file.unwrap_or(0) > 0 {
                        a.holding_file_pages += 1;
                    }
                    if m.usage_pages.unwrap_or(0) > 0 {
                        a.holding_pages += 1;
                    }
                    a.charged_bytes += m.usage_pages.unwrap_or(0) * page;
                    a.file_bytes += b(m.file);
                    a.shmem_bytes += b(m.shmem);
                    a.anon_bytes += b(m.anon);
                    a.swap_bytes += b(m.swap);
                    a.kernel_bytes += b(m.kernel);
                }
                KernelMemcgs {
                    walk: Some(w),
                    unknown: None,
                    aggregate: Some(a),
                }
            }
            Err(e) => KernelMemcgs {
                walk: None,
                unknown: Some(format!("{e:#}")),
                aggregate: None,
            },
        }
    }

    fn try_read() -> Result<KernelWalk> {
        // SAFETY: geteuid has no memory effects.
        if unsafe { libc::geteuid() } != 0 {
            anyhow::bail!("not root: reading kernel memory (BPF) needs root");
        }
        let btf = Btf::from_sys_fs().context("reading /sys/kernel/btf/vmlinux")?;
        let mut k = kread::Kread::open()?;
        let mut w = walk::walk(&btf, &mut k)?;
        let t = std::time::Instant::now();
        let (runs, reads) = (k.runs, k.slots);
        let dying: Vec<usize> = (0..w.memcgs.len()).filter(|&i| w.memcgs[i].dying).collect();
        let addrs: Vec<u64> = dying.iter().map(|&i| w.memcgs[i].addr).collect();
        match pins::page_pins(&btf, &mut k, &addrs)? {
            Ok(pins) => {
                for (i, p) in dying.into_iter().zip(pins) {
                    w.memcgs[i].page_pins = Some(p);
                }
            }
            Err(e) => w.page_pins_unknown = Some(format!("unknown on this kernel: {e}")),
        }
        w.page_pins_ms = walk::duration_ms(t.elapsed());
        w.page_pins_runs = k.runs - runs;
        w.page_pins_reads = k.slots - reads;
        Ok(w)
    }
}

/// Dying memcgs that predate tracing: unattributable, counted separately.
#[derive(Debug, Clone, Serialize)]
pub struct Preexisting {
    pub at_start: u64,
    /// The kernel's dying count now minus the dying memcgs we saw removed.
    pub now: u64,
    pub kernel_dying_now: u64,
    pub source: String,
}
