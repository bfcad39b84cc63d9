//! The page source (`leaktrace --pages`): blocks the kernel takes straight
//! from the page allocator for itself (pipe buffers, socket frags, driver
//! buffers...), by process, stack and cgroup, through the slab tracer's
//! pipeline. Its kernel side is `tracer-ebpf/src/slab/pages.rs`; its plan is
//! [`plan`]; what the tracepoints cannot tell at allocation time (a slab or
//! page-table page, a page whose free went unseen) [`kpageflags`] settles at
//! report time.

pub mod kpageflags;
pub mod plan;

use anyhow::Result;

use crate::{
    kernel::btf::Btf, kernel::facts::KernelFacts, kernel::tracefs::Tracefs, slab::plan::Finish,
    slab::plan::Plan, slab::plan::PlanOptions, slab::source::AllocSource,
};

/// What `--pages` selects (main.rs fills it from `--order` and `--gfp`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageOptions {
    /// Only blocks of this order; None: every order.
    pub order: Option<u8>,
    /// gfp flag names as the kernel prints them (`__GFP_ACCOUNT`), each
    /// required, or refused when written `!NAME`.
    pub gfp: Vec<String>,
}

/// The page allocator's unmovable blocks, as [`AllocSource`].
pub struct Pages<'a> {
    pub tracefs: &'a Tracefs,
    pub btf: Option<&'a Btf>,
    pub root: &'a std::path::Path,
    pub select: &'a PageOptions,
    /// The largest kmalloc cache's object size ([`kmalloc_max`]).
    pub kmalloc_max: Option<u64>,
    /// `on_demand_maps` is the kernel facts', whatever is set here.
    pub options: PlanOptions,
    pub finish: Finish,
}

/// The largest plain kmalloc cache's object size in `catalogue`: beyond it
/// kmalloc takes blocks from the page allocator.
pub fn kmalloc_max(catalogue: &crate::slab::caches::Catalogue) -> Option<u64> {
    catalogue
        .iter()
        .filter(|c| {
            c.name
                .strip_prefix("kmalloc-")
                .is_some_and(|size| size.bytes().all(|b| b.is_ascii_digit() || b == b'k'))
        })
        .map(|c| u64::from(c.object_size))
        .max()
}

/// The report's name for the traced memory.
pub const NAME: &str = "pages";

impl AllocSource for Pages<'_> {
    type Plan = Plan;

    fn plan(&self, facts: &KernelFacts) -> Result<Plan> {
        let mut plan = plan::build(
            self.tracefs,
            self.btf,
            self.kmalloc_max,
            self.select,
            &self.options.with_facts(facts),
        )?;
        plan.finish(facts, self.btf, self.root, &self.finish);
        Ok(plan)
    }

    fn name(_plan: &Plan) -> &str {
        NAME
    }
}
