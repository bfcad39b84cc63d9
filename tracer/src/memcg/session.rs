//! One `leaktrace memcg` run's state from the first walk to the final report:
//! the hierarchy, the tracker fed by the ring buffer, the dying memcgs the
//! kernel held before tracing, and the report they add up to. The pipeline
//! drives it (drain, report) and shows what it returns.

use std::path::Path;

use anyhow::Result;
use aya::maps::{MapData, RingBuf};

use crate::{
    kernel::cgroupfs::{Dying, Hierarchy},
    kernel::clock::monotonic_ns,
    kernel::facts,
    kernel::{btf::Btf, memcg_percpu},
    memcg::{
        decode,
        hooks::Counters,
        kmem,
        percpu::{PercpuTracker, TextRange},
        report::{KernelMemcgs, PercpuSummary, Preexisting, Report, SCHEMA_VERSION},
        state::{MemcgPercpu, Phase, SnapshotOptions, Tracker},
    },
    symbolize::{tracing::strip_tracing_frames, Symbolizer},
};

/// What a memcg run keeps from attach to the final report.
pub struct Session {
    pub hierarchy: Hierarchy,
    tracker: Tracker,
    symbols: Symbolizer,
    /// How the run follows memcgs (its hooks), and how charges are
    /// attributed: lines of the report's header, set once attached.
    pub mode: String,
    pub attribution: String,
    pub dying_at_start: Dying,
    started_ns: u64,
    opts: SnapshotOptions,
    decode_errors: u64,
    /// The kernel keeps charged kmalloc objects in their own caches
    /// (`kmalloc-cg-*`, 5.14+): the decoder names the cache by it.
    kmalloc_cg: bool,
    /// The running kernel's release, read once at start (`kernel::facts`).
    release: String,
    /// One memcg's per-CPU memory from BTF, or why there is no estimate.
    percpu_estimate: Result<memcg_percpu::Estimate, String>,
    possible_cpus: u64,
}

impl Session {
    /// A session over the memcgs `hierarchy` holds now. Errors: its live
    /// memcgs or the dying count cannot be read from cgroupfs.
    pub fn start(root: &Path, hierarchy: Hierarchy, opts: SnapshotOptions) -> Result<Session> {
        let dying_at_start = hierarchy.dying_now(root)?;
        Ok(Session {
            tracker: Tracker::new(hierarchy.live()?),
            hierarchy,
            symbols: Symbolizer::new(),
            mode: String::new(),
            attribution: String::new(),
            dying_at_start,
            started_ns: monotonic_ns(),
            opts,
            decode_errors: 0,
            kmalloc_cg: root.join("sys/kernel/slab/kmalloc-cg-8").exists(),
            release: facts::read_release(root).unwrap_or_default(),
            percpu_estimate: Err(String::new()),
            possible_cpus: 0,
        }
        .with_percpu_estimate(root))
    }

    fn with_percpu_estimate(mut self, root: &Path) -> Session {
        let v1 = self.hierarchy.version == 1;
        self.percpu_estimate = match memcg_percpu::Host::read(root, v1) {
            Err(e) => Err(format!("reading the possible CPUs: {e}")),
            Ok(host) => {
                self.possible_cpus = host.possible_cpus;
                match Btf::from_sys_fs() {
                    Err(e) => Err(format!("no BTF: {e}")),
                    Ok(btf) => memcg_percpu::estimate(&btf, host).ok_or_else(|| {
                        "BTF has no struct mem_cgroup with per-CPU statistics".to_string()
                    }),
                }
            }
        };
        self
    }

    /// Measures the memcgs made from now on: finds `cgroup_mkdir`'s text,
    /// which the stacks of their per-CPU allocations pass through. False:
    /// kallsyms does not name it (or hides addresses); nothing is measured.
    pub fn measure_percpu(&mut self) -> bool {
        let text = std::fs::read_to_string("/proc/kallsyms").unwrap_or_default();
        let range = TextRange::of(&text, "cgroup_mkdir");
        self.tracker.percpu = PercpuTracker::new(range);
        range.is_some()
    }

    /// Each shown memcg's per-CPU memory, and the dying ones' total.
    fn percpu(
        &self,
        snapshot: &mut crate::memcg::state::Snapshot,
        kernel_dying: u64,
    ) -> PercpuSummary {
        let cpus = self.possible_cpus;
        let estimate = self.percpu_estimate.as_ref().ok();
        for m in &mut snapshot.memcgs {
            m.percpu = match self.tracker.percpu.get(m.id) {
                Some(x) => Some(MemcgPercpu {
                    bytes: x.outstanding_size * cpus,
                    kind: "measured",
                    at_creation_bytes: Some(x.created_size * cpus),
                    allocations: Some(x.created_allocations),
                }),
                None if m.state == Phase::Released => Some(MemcgPercpu {
                    bytes: 0,
                    kind: "released",
                    at_creation_bytes: None,
                    allocations: None,
                }),
                None => estimate.map(|e| MemcgPercpu {
                    bytes: if m.state == Phase::Live {
                        e.bytes
                    } else {
                        e.dying_bytes
                    },
                    kind: "estimated",
                    at_creation_bytes: None,
                    allocations: None,
                }),
            };
        }
        let mut summary = PercpuSummary::new(
            self.tracker.percpu.measuring(),
            cpus,
            self.percpu_estimate.clone(),
            snapshot,
            kernel_dying,
            self.tracker.percpu.other_allocations,
        );
        if self.hierarchy.version == 2 {
            summary.memory_stat_percpu = memcg_percpu::memory_stat_percpu(&self.hierarchy.mount);
        }
        summary
    }

    /// Takes the walk again once the hooks see every change: a memcg made
    /// between the first walk and attach would otherwise be unknown.
    /// Errors: cgroupfs cannot be walked.
    pub fn reseed(&mut self) -> Result<()> {
        for (id, (path, level)) in self.hierarchy.live()? {
            self.tracker.seed_live(id, path, level);
        }
        Ok(())
    }

    /// Applies every record in `ring`; an undecodable one is counted.
    pub fn drain(&mut self, ring: &mut RingBuf<MapData>) {
        while let Some(item) = ring.next() {
            if decode::apply(&mut self.tracker, &item, self.kmalloc_cg).is_err() {
                self.decode_errors += 1;
            }
        }
    }

    /// The report of everything seen so far: `kind` is "snapshot", "list"
    /// or "final" (the last two also walk the kernel's own memcgs).
    pub fn report(&mut self, kind: &'static str, kernel: Counters) -> Report {
        let now = monotonic_ns();
        let mut snapshot = self.tracker.snapshot(now, &self.opts);
        for m in &mut snapshot.memcgs {
            for s in &mut m.pinned_stacks {
                let frames = self.tracker.stacks.frames(s.stack);
                s.kernel = strip_tracing_frames(self.symbols.kernel_frames(frames));
            }
        }
        self.symbols.trim();
        let kernel_dying = self
            .hierarchy
            .dying_now(Path::new("/"))
            .map_or(self.dying_at_start.count, |d| d.count);
        let percpu = self.percpu(&mut snapshot, kernel_dying);
        Report {
            schema_version: SCHEMA_VERSION,
            report: "memcg",
            kind,
            elapsed_s: now.saturating_sub(self.started_ns) as f64 / 1e9,
            mode: self.mode.clone(),
            attribution: self.attribution.clone(),
            hierarchy: self.hierarchy.clone(),
            zombie_after_s: self.opts.zombie_after_ns as f64 / 1e9,
            preexisting_dying: Preexisting {
                at_start: self.dying_at_start.count,
                now: kernel_dying.saturating_sub(self.tracker.tracked_dying()),
                kernel_dying_now: kernel_dying,
                source: self.dying_at_start.source.clone(),
            },
            snapshot,
            percpu,
            kernel,
            decode_errors: self.decode_errors,
            kernel_memcgs: matches!(kind, "list" | "final").then(KernelMemcgs::read),
            kmem_accounting: kmem::Accounting::detect(
                Path::new("/"),
                &self.hierarchy,
                &self.release,
            ),
        }
    }
}
