//! An allocation source: what the pipeline needs from a kind of kernel
//! memory to attribute it. Slab caches ([`SlabCaches`]) are the first.
//!
//! A source decides its hooks and kernel-side configuration on this kernel
//! from the facts probed once at start, and its eBPF programs write the
//! shared records of `tracer_common::slab` (an `AllocHeader` whose `source`
//! says which hook saw it, with its size in `bytes_alloc`; a `FreeEvent`), so
//! the decoder, aggregator, report, views and outputs take its allocations
//! as they take a slab cache's.
//!
//! A per-CPU or page source would add:
//! - its program table beside `tracer-common/src/slab/programs.rs` (e.g.
//!   `percpu_programs!`, with new `SOURCE_*` values) and the entry points
//!   generated from it in `tracer-ebpf/src/` (same record writers);
//! - its plan (hooks, config) beside `slab/plan.rs`, reading the kernel facts;
//! - an `impl AllocSource` here or in its own folder, naming what it traces.

use std::path::Path;

use anyhow::Result;

use crate::{
    kernel::btf::Btf,
    kernel::facts::KernelFacts,
    kernel::tracefs::Tracefs,
    slab::caches::{Catalogue, Selection},
    slab::decoder::{self, DecodeError, Event},
    slab::plan::{self, Finish, Plan, PlanOptions},
};

/// A kind of kernel memory whose allocations and frees the pipeline attributes.
pub trait AllocSource {
    /// What attaching needs: programs, hooks, the kernel side's config.
    type Plan;

    /// Decides the hooks and configuration on this kernel.
    fn plan(&self, facts: &KernelFacts) -> Result<Self::Plan>;

    /// A ring-buffer record as an allocation (with its size) or a free.
    fn decode(record: &[u8]) -> Result<Event<'_>, DecodeError> {
        decoder::decode(record)
    }

    /// What the report's header calls the traced memory.
    fn name(plan: &Self::Plan) -> &str;
}

/// One slab cache and everything merged into it.
pub struct SlabCaches<'a> {
    pub tracefs: &'a Tracefs,
    /// Raw tracepoints' arguments and struct offsets; None: classic hooks only.
    pub btf: Option<&'a Btf>,
    pub root: &'a Path,
    pub catalogue: &'a Catalogue,
    pub selection: &'a Selection,
    /// `on_demand_maps` is the kernel facts', whatever is set here.
    pub options: PlanOptions,
    pub finish: Finish,
}

impl AllocSource for SlabCaches<'_> {
    type Plan = Plan;

    fn plan(&self, facts: &KernelFacts) -> Result<Plan> {
        let mut plan = plan::build(
            self.tracefs,
            self.btf,
            self.catalogue,
            self.selection,
            &self.options.with_facts(facts),
        )?;
        plan.finish(facts, self.btf, self.root, &self.finish);
        Ok(plan)
    }

    fn name(plan: &Plan) -> &str {
        &plan.cache
    }
}
