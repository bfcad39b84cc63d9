//! `--all-caches` as an [`AllocSource`]: the slab hooks' raw tracepoints
//! (or, where those cannot be used, the classic ones) with no cache
//! selected, every allocation drawn by its size (`slab/kheap.rs`,
//! `tracer-ebpf/src/slab/kheap.rs`).

use anyhow::{Context, Result};
use tracer_common::slab::programs::name as program;

use crate::{
    kernel::btf::Btf,
    kernel::facts::KernelFacts,
    kernel::tracefs::Tracefs,
    slab::caches::{Catalogue, KmallocKind, Selection},
    slab::kheap,
    slab::plan::{self, program_variant, Attachment, Finish, Hook, HookMode, Plan, PlanOptions},
    slab::source::AllocSource,
};

/// The report's name for the traced memory.
pub const NAME: &str = "all slab caches (sampled)";

/// Samples the kernel's live table holds at least and at most.
const MIN_SAMPLES: u32 = 1 << 16;
const MAX_SAMPLES: u32 = 1 << 20;

/// Every slab cache at once, sampled every `rate` bytes on average.
pub struct AllCaches<'a> {
    pub tracefs: &'a Tracefs,
    pub btf: Option<&'a Btf>,
    pub root: &'a std::path::Path,
    pub catalogue: &'a Catalogue,
    pub rate: u64,
    pub options: PlanOptions,
    pub finish: Finish,
    /// The per-CPU source's plan (`percpu::source::build`, unfinished), whose
    /// layout and hooks are merged in so per-CPU memory is sampled beside
    /// the caches; or why this kernel has none (then a note says so).
    pub percpu: Result<Plan>,
}

/// The live table's size for `rate`: four times the samples the node's
/// whole slab (`slab_bytes`) would hold, a power of two within
/// 65,536..1,048,576. The table is a preallocated BPF hash: each entry costs
/// ~88 B of kernel memory, not its 24 B of key and value (65,536 entries:
/// 5,768,224 B of memlock on 6.18), so 5.5 MiB at least and ~88 MiB at most;
/// at the default rate it stays at the minimum up to 8 GiB of slab.
pub fn table_size(rate: u64, slab_bytes: Option<u64>) -> u32 {
    let want = slab_bytes.map_or(0, |b| b / rate.max(1)).saturating_mul(4);
    let want = u32::try_from(want).unwrap_or(MAX_SAMPLES);
    want.clamp(MIN_SAMPLES, MAX_SAMPLES).next_power_of_two()
}

/// Every allocation reads its cache's size here, so `kmem_cache_alloc`'s
/// raw hooks become BTF tracepoints, which read it with one load instead of
/// a `bpf_probe_read_kernel` call (~30 ns of ~100 per allocation on 6.18).
/// Where the kernel refuses them, `Probes::attach` puts the raw ones back.
fn to_btf(attachments: &mut [Attachment]) {
    let twins = [
        (program::kmem_cache_alloc_raw, program::kmem_cache_alloc_btf),
        (
            program::kmem_cache_alloc_raw_spare,
            program::kmem_cache_alloc_btf_spare,
        ),
    ];
    // A spare may be named by its build without compare-and-swap already.
    let twins = twins.into_iter().flat_map(|(raw, btf)| {
        [
            (raw, btf),
            (program_variant(raw, false), program_variant(btf, false)),
        ]
    });
    let twins: Vec<_> = twins.collect();
    for a in attachments.iter_mut().filter(|a| a.hook == Hook::Raw) {
        if let Some(&(_, btf)) = twins.iter().find(|(raw, _)| *raw == a.program) {
            a.program = btf;
            a.hook = Hook::Btf;
        }
    }
}

/// The ring buffer in MiB for sampling every `rate` bytes, unless the user
/// sizes it: 2 at the default 512 KiB rate, more for denser sampling, at
/// most 8 (a traced cache's default). Only samples and their frees cross
/// it (~660 B an allocation with both stacks), so 2 MiB holds the samples of
/// ~1.5 GB of slab allocation between two drains; an 8 MiB ring, sized for
/// exact tracing, would be most of the sampler's BPF memory (issue 27 bounds
/// it at 16 MiB).
pub fn ring_mib(rate: u64) -> u32 {
    (2 * (512 << 10) / rate.max(1)).clamp(2, 8) as u32
}

/// Both allocation hooks, as a selection naming a kmalloc and a named
/// cache would; the kernel side ignores the selection itself once
/// `kheap.rate` is set.
pub fn selection() -> Selection {
    Selection {
        cache: NAME.to_string(),
        object_size: 8,
        kmalloc: Some((8, KmallocKind::Normal)),
        also_kmalloc: vec![
            (8, KmallocKind::Cgroup),
            (8, KmallocKind::Reclaimable),
            (8, KmallocKind::Dma),
        ],
        named: vec!["all".to_string()],
        aliases_included: Vec::new(),
        notes: Vec::new(),
        every_cache: true,
    }
}

/// What the classic hooks cost in truth, `why` they were taken (empty:
/// asked for). The perf path runs no BPF program on a CPU where one already
/// runs (`bpf_prog_active`, every program at once), so no spare can catch
/// what nests in ours (see `spare_program`).
fn classic_cost(plan: &Plan, why: &str) -> String {
    let unnamed = plan.config.cache_alloc.name == 0;
    format!(
        "all caches on the classic kmem tracepoints{why}: an allocation or free made in an \
         interrupt while our program runs on that CPU is not seen (no spare programs there), so \
         such allocations go undrawn and a sample whose free is missed stays in use until its \
         address is allocated again (then retired as stale){}",
        if unnamed {
            "; kmem_cache_alloc carries no cache name on this kernel: named caches' samples \
             are labelled by object size with every cache of that size"
        } else {
            ""
        }
    )
}

impl AllocSource for AllCaches<'_> {
    type Plan = Plan;

    fn plan(&self, facts: &KernelFacts) -> Result<Plan> {
        let options = PlanOptions {
            // Every sample carries its stacks.
            stack_sample: 1,
            ..self.options.with_facts(facts)
        };
        let build = |hooks| {
            let options = PlanOptions {
                hooks,
                ..options.clone()
            };
            plan::build(
                self.tracefs,
                self.btf,
                self.catalogue,
                &selection(),
                &options,
            )
        };
        // All raw or all classic: one source's truth, stated in one note.
        let (mut plan, classic_note) = match self.options.hooks {
            HookMode::Raw => (build(HookMode::Raw)?, None),
            HookMode::Classic => (build(HookMode::Classic)?, Some(String::new())),
            HookMode::Auto => match build(HookMode::Raw) {
                Ok(plan) => (plan, None),
                Err(_) => (
                    build(HookMode::Classic).context("--all-caches")?,
                    Some(if self.btf.is_none() {
                        " (no BTF at /sys/kernel/btf/vmlinux)".to_string()
                    } else {
                        " (this kernel's BTF does not describe the raw ones' arguments)".to_string()
                    }),
                ),
            },
        };
        to_btf(&mut plan.attachments);
        let cfg = &mut plan.config;
        cfg.kheap = kheap::config(self.rate);
        // Slab objects are at least 8-byte aligned; a region count rules
        // out nearly every other free.
        cfg.free_align_mask = 7;
        cfg.n_cache_names = 0;
        plan.live_map = plan::LiveMap::Preallocated;
        plan.notes = vec![format!(
            "all caches: every slab allocation sampled with probability 1 - e^(-size/{}) \
             (one sample per {} bytes allocated on average); each sample weighs 1/p objects \
             and size/p bytes: in-use figures are unbiased estimates with 95% intervals, \
             counting allocations since start only",
            self.rate, self.rate
        )];
        if let Some(why) = classic_note {
            plan.notes.push(classic_cost(&plan, &why));
        }
        match &self.percpu {
            Ok(p) => {
                plan.config.percpu = p.config.percpu;
                // Per-CPU addresses are aligned only as their callers asked.
                plan.config.free_align_mask = 0;
                plan.attachments.extend(p.attachments.iter().cloned());
                plan.notes.push(format!(
                    "per-CPU memory (percpu_alloc_percpu) sampled too, as cache `{}`: an \
                     allocation's bytes are its size x {} possible CPUs",
                    kheap::PERCPU,
                    p.config.percpu.possible_cpus
                ));
            }
            Err(e) => plan
                .notes
                .push(format!("per-CPU memory is not sampled: {e:#}")),
        }
        let finish = Finish {
            max_objects: Some(self.finish.max_objects.unwrap_or_else(|| {
                table_size(
                    self.rate,
                    crate::kernel::meminfo::read(self.root)
                        .ok()
                        .map(|m| m.slab_kb * 1024),
                )
            })),
            ..self.finish.clone()
        };
        plan.finish(facts, self.btf, self.root, &finish);
        // The live table is slots (twice the size, in buckets) plus an
        // overflow hash: room for at least --max-objects, often more.
        let slots = if plan.config.live_bucket_mask == 0 {
            0
        } else {
            (plan.config.live_bucket_mask + 1) * tracer_common::slab::LIVE_WAYS as u64
        };
        let room = slots
            + u64::from(plan::live_overflow_entries(
                plan.max_objects,
                plan.config.live_bucket_mask,
            ));
        plan.notes.push(format!(
            "sample table: room for at least {} samples at once, {room} when every bucket \
             has room (--max-objects sets the first); when full, new samples are counted \
             as dropped",
            plan.max_objects
        ));
        Ok(plan)
    }

    fn name(_plan: &Plan) -> &str {
        NAME
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::slab::plan::Hook;

    const TESTDATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata");

    /// Without raw hooks (no BTF, as on 5.10's undescribed events) every
    /// fixture kernel gets both allocation hooks, the `_node` twins where
    /// they exist, and the cache's name only where the format has one.
    #[test]
    fn every_cache_plans_classic_hooks_on_every_fixture_kernel() {
        let catalogue = Catalogue::read(&Path::new(TESTDATA).join("proc/host-6.18"))
            .expect("catalogue fixture");
        for kernel in ["5.10", "6.1", "6.12", "6.18"] {
            let tracefs = Tracefs::at(Path::new(TESTDATA).join("formats").join(kernel));
            let options = PlanOptions {
                hooks: HookMode::Classic,
                ..PlanOptions::default()
            };
            let plan = plan::build(&tracefs, None, &catalogue, &selection(), &options)
                .unwrap_or_else(|e| panic!("{kernel}: {e:#}"));
            let events: Vec<&str> = plan.attachments.iter().map(|a| a.event).collect();
            let want: &[&str] = if kernel == "5.10" {
                &[
                    "kfree",
                    "kmem_cache_free",
                    "kmalloc",
                    "kmalloc_node",
                    "kmem_cache_alloc",
                    "kmem_cache_alloc_node",
                ]
            } else {
                &["kfree", "kmem_cache_free", "kmalloc", "kmem_cache_alloc"]
            };
            assert_eq!(events, want, "{kernel}");
            assert!(plan.attachments.iter().all(|a| a.hook == Hook::Classic));
            let c = &plan.config;
            assert_eq!(
                c.cache_alloc.name,
                if kernel == "6.18" { 24 } else { 0 },
                "{kernel}"
            );
            assert_ne!(c.cache_alloc.bytes_alloc, 0, "{kernel}");
            assert_ne!(c.kmalloc.bytes_alloc, 0, "{kernel}");
            let note = classic_cost(&plan, "");
            assert_eq!(
                note.contains("labelled by object size"),
                kernel != "6.18",
                "{note}"
            );
        }
    }
}
