//! Per-CPU allocations as an [`AllocSource`]: the tracepoints
//! `percpu:percpu_alloc_percpu` and `percpu:percpu_free_percpu`
//! (mm/percpu.c, include/trace/events/percpu.h).
//!
//! Allocations through the classic tracepoint, fields at tracefs offsets:
//! per-CPU allocations are rare (cgroup creation, module load, BPF maps, a
//! few hundred a second at worst), so the perf record it builds costs
//! nothing that matters, and its fields are named the same on every kernel,
//! while the raw arguments changed in 5.19 (f67bed134a05 added `call_site`,
//! `bytes_alloc`, `gfp_flags`).
//!
//! Frees through the raw tracepoint where BTF shows its arguments
//! (`base_addr, off, ptr`, unchanged since 3.18), with a spare: the kernel
//! skips a classic tracepoint's program whenever any BPF program, or a BPF
//! map update from a syscall (`bpf_disable_instrumentation`), holds
//! `bpf_prog_active` on that CPU, and a skipped free is an allocation
//! reported outstanding for ever (measured here: 2 of ~800 memcg frees in
//! one run of ten, with other tracers running). A raw program is skipped only
//! while it runs itself on that CPU, and then its spare runs. Classic
//! without BTF or with `--hooks classic`.
//!
//! Bytes are `size` × `num_possible_cpus()`: what the allocation takes
//! across CPUs, the same unit on every kernel (`bytes_alloc`, 5.19+, also
//! counts the memcg bookkeeping `pcpu_obj_full_size` adds, and older kernels
//! lack it).

use std::path::Path;

use anyhow::{anyhow, bail, Result};
use tracer_common::slab::{programs::name as program, Config, PercpuLayout};

use crate::{
    kernel::btf::Btf,
    kernel::facts::KernelFacts,
    kernel::possible_cpus,
    kernel::tracefs::{EventFormat, Tracefs},
    slab::plan::{self, Attachment, Finish, Hook, HookMode, LiveMap, Plan, PlanOptions},
    slab::source::AllocSource,
};

/// What reports call the traced memory (their `cache` field) with the
/// per-CPU source.
pub const NAME: &str = "percpu";

/// Live per-CPU allocations tracked at once without `--max-objects`: a
/// memcg makes ~8, so this covers thousands of cgroups created during a run.
pub const DEFAULT_MAX_OBJECTS: u32 = 1 << 16;

/// Every per-CPU allocation and free on this kernel.
pub struct PercpuAllocations<'a> {
    pub tracefs: &'a Tracefs,
    /// For `Plan::finish` (the cgroup source, interrupt context).
    pub btf: Option<&'a Btf>,
    pub root: &'a Path,
    pub options: PlanOptions,
    pub finish: Finish,
}

impl AllocSource for PercpuAllocations<'_> {
    type Plan = Plan;

    fn plan(&self, facts: &KernelFacts) -> Result<Plan> {
        let cpus = possible_cpus::read(self.root)?;
        let mut plan = build(
            self.tracefs,
            self.btf,
            cpus,
            &self.options.with_facts(facts),
        )?;
        let finish = Finish {
            max_objects: Some(self.finish.max_objects.unwrap_or_else(|| {
                plan.notes.push(format!(
                    "sized to track {DEFAULT_MAX_OBJECTS} per-CPU allocations at once \
                     (--max-objects sets it)"
                ));
                DEFAULT_MAX_OBJECTS
            })),
            ..self.finish.clone()
        };
        plan.finish(facts, self.btf, self.root, &finish);
        Ok(plan)
    }

    fn name(_: &Plan) -> &str {
        NAME
    }
}

/// The raw free program's arguments (`TP_PROTO(void *base_addr, int off,
/// void __percpu *ptr)`), checked against BTF before it is used.
const RAW_FREE: &[&str] = &["base_addr", "off", "ptr"];

/// The plan on the kernel whose tracefs is `tracefs` (and BTF `btf`, for
/// the raw free hook), with `possible_cpus` copies of every allocation.
/// Errors: the kernel has no percpu tracepoints, their formats lack `size`
/// or `ptr`, or `--hooks raw` was asked for.
pub fn build(
    tracefs: &Tracefs,
    btf: Option<&Btf>,
    possible_cpus: u64,
    opts: &PlanOptions,
) -> Result<Plan> {
    if opts.hooks == HookMode::Raw {
        bail!(
            "--percpu attaches percpu_alloc_percpu through its classic tracepoint (its fields \
             are the same on every kernel, and per-CPU allocations are too rare for a raw hook \
             to matter); drop --hooks raw"
        );
    }
    let alloc = require(tracefs, "percpu_alloc_percpu")?;
    let free = require(tracefs, "percpu_free_percpu")?;
    let mut cfg = Config::zeroed();
    cfg.percpu = PercpuLayout {
        size: alloc.offset_of("size", 8)?,
        ptr: alloc.offset_of("ptr", 8)?,
        call_site: optional(&alloc, "call_site", &[8])?,
        gfp_flags: optional(&alloc, "gfp_flags", &[4, 8])?,
        free_ptr: free.offset_of("ptr", 8)?,
        _pad: [0; 3],
        possible_cpus,
    };
    let mut notes = vec![format!(
        "per-CPU allocations: bytes are size x {possible_cpus} possible CPUs \
         (/sys/devices/system/cpu/possible)"
    )];
    if cfg.percpu.gfp_flags != 0 {
        // Read to tell a remote charge (`active_memcg`) apart, as for slab.
        cfg.gfp_account = alloc.print_flag("__GFP_ACCOUNT").unwrap_or(0);
    }
    if cfg.percpu.call_site == 0 {
        notes.push(
            "this kernel's percpu_alloc_percpu has no call_site (before 5.19): exact counts \
             are per process, the stacks name the callers"
                .to_string(),
        );
    }
    // Per-CPU addresses are aligned only to what each caller asked (down to
    // 2 bytes), so no alignment rules frees out; frees are rare anyway.
    cfg.free_align_mask = 0;
    plan::set_sampling(&mut cfg, opts);
    let live_map = if opts.on_demand_maps {
        LiveMap::OnDemand
    } else {
        notes.push(
            "live-object map preallocated (tracing programs get on-demand hash maps from \
             Linux 6.1); --max-objects sizes it"
                .to_string(),
        );
        LiveMap::Preallocated
    };
    let hook = |program, hook, event| Attachment {
        program,
        hook,
        system: "percpu",
        event,
    };
    let mut attachments = vec![hook(
        program::percpu_alloc,
        Hook::Classic,
        "percpu_alloc_percpu",
    )];
    let raw_free = opts.hooks != HookMode::Classic
        && btf
            .and_then(|b| b.tracepoint_args("percpu_free_percpu"))
            .is_some_and(|args| args.iter().map(String::as_str).eq(RAW_FREE.iter().copied()));
    if raw_free {
        attachments.push(hook(
            program::percpu_free_raw,
            Hook::Raw,
            "percpu_free_percpu",
        ));
        if let Some(spare) = plan::spare_program(program::percpu_free_raw) {
            attachments.push(hook(spare, Hook::Raw, "percpu_free_percpu"));
        }
    } else {
        attachments.push(hook(
            program::percpu_free,
            Hook::Classic,
            "percpu_free_percpu",
        ));
    }
    Ok(Plan::unfinished(
        cfg,
        attachments,
        live_map,
        notes,
        NAME.to_string(),
    ))
}

fn require(tracefs: &Tracefs, event: &str) -> Result<EventFormat> {
    tracefs.event_format("percpu", event)?.ok_or_else(|| {
        anyhow!(
            "--percpu: this kernel has no percpu:{event} tracepoint (looked in {}/events/percpu); \
             it needs CONFIG_TRACEPOINTS and the percpu events (Linux 3.18+)",
            tracefs.root().display()
        )
    })
}

/// A field the record has only on some kernels: its offset, or 0 without it.
fn optional(fmt: &EventFormat, name: &str, sizes: &[u16]) -> Result<u16> {
    match fmt.field(name) {
        Some(_) => Ok(fmt.offset_of_any(name, sizes)?),
        None => Ok(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMATS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/formats");

    fn plan_on(kernel: &str, hooks: HookMode) -> Result<Plan> {
        let opts = PlanOptions {
            pid: Some(7),
            kernel_stacks: true,
            user_stacks: true,
            hooks,
            stack_sample: 64,
            on_demand_maps: true,
        };
        build(
            &Tracefs::at(Path::new(FORMATS).join(kernel)),
            None,
            2,
            &opts,
        )
    }

    #[test]
    fn reads_the_fields_each_kernel_has() {
        // 6.18: captured from this host's tracefs.
        let p = plan_on("6.18", HookMode::Auto).expect("6.18");
        let l = p.config.percpu;
        assert_eq!(
            (l.size, l.ptr, l.call_site, l.gfp_flags, l.free_ptr),
            (24, 56, 8, 72, 24)
        );
        assert_eq!(l.possible_cpus, 2);
        assert_eq!(p.config.gfp_account, 0x400000);
        assert_eq!(p.config.target_tgid, 7);
        assert_eq!(p.config.free_align_mask, 0);
        assert_eq!(p.cache, "percpu");
        let hooks: Vec<String> = p.attachments.iter().map(Attachment::describe).collect();
        assert_eq!(
            hooks,
            ["percpu:percpu_alloc_percpu", "percpu:percpu_free_percpu"]
        );
        // Without BTF the free is classic too (the host's BTF, raw, is
        // tested end to end in tests/tests/percpu.rs).
        // 5.10: no call_site nor gfp_flags (they came in 5.19), read as none.
        let p = plan_on("5.10", HookMode::Auto).expect("5.10");
        let l = p.config.percpu;
        assert_eq!((l.size, l.ptr, l.call_site, l.gfp_flags), (16, 48, 0, 0));
        assert_eq!(p.config.gfp_account, 0);
        assert!(p.notes.iter().any(|n| n.contains("no call_site")));
    }

    #[test]
    fn refuses_what_it_cannot_do_before_attaching() {
        let err = plan_on("6.18", HookMode::Raw).expect_err("raw");
        assert!(format!("{err}").contains("drop --hooks raw"), "{err}");
        // A kernel without the percpu events (these fixtures have kmem only).
        let err = plan_on("6.1", HookMode::Auto).expect_err("no percpu events");
        assert!(
            format!("{err}").contains("no percpu:percpu_alloc_percpu tracepoint"),
            "{err}"
        );
    }
}
