//! Which source a trace run plans, and what the session needs of it: a slab
//! cache by name, per-CPU allocations, the page allocator's unmovable blocks
//! or every slab cache sampled by bytes. `trace.rs` runs whichever it is.

use std::path::Path;

use anyhow::{Context, Result};

use crate::{
    kernel::btf::Btf,
    kernel::facts::KernelFacts,
    kernel::possible_cpus,
    kernel::slabinfo::SlabLine,
    kernel::tracefs::Tracefs,
    pages::{self, kpageflags::PageFlags, Pages},
    percpu::{self, source::PercpuAllocations},
    pipeline::trace_options::Traced,
    slab::caches::{self, Catalogue},
    slab::kheap::{CacheNames, Kheap},
    slab::kheap_source::AllCaches,
    slab::plan::{self, HookMode, Plan, PlanOptions},
    slab::report::MemorySource,
    slab::session::{slab_line, Settle},
    slab::source::{AllocSource, SlabCaches},
};

/// Objects the page source tracks at once unless `--max-objects` says:
/// 262,144 blocks (1 GiB at order 0). Every page freed on the node looks
/// its pfn up in the live table, so a smaller table stays in cache.
const PAGES_MAX_OBJECTS: u32 = 1 << 18;

/// What planning a source reads.
pub struct Inputs<'a, F: Fn(Option<u32>, Option<u64>) -> plan::Finish> {
    pub tracefs: &'a Tracefs,
    pub btf: Option<&'a Btf>,
    pub root: &'a Path,
    pub facts: &'a KernelFacts,
    pub options: plan::PlanOptions,
    /// The plan's finish for a live-table size and the cache's active objects.
    pub finish: &'a F,
    /// `--max-objects`.
    pub max_objects: Option<u32>,
}

/// A planned source and what the session takes from it.
pub struct Planned {
    pub plan: Plan,
    pub name: String,
    /// /proc/slabinfo's line for a named cache before attaching.
    pub slab_baseline: Option<SlabLine>,
    pub aliases: Vec<String>,
    pub settle: Option<Box<dyn Settle>>,
    pub kheap: Option<Kheap>,
    pub source: MemorySource,
}

/// Plans `traced`. Errors: an unknown cache, a kernel the source cannot
/// attach to, /proc/kpageflags or the slab catalogue unreadable.
pub fn plan<F: Fn(Option<u32>, Option<u64>) -> plan::Finish>(
    traced: &Traced,
    i: &Inputs<'_, F>,
) -> Result<Planned> {
    let (plan, name, slab_baseline, aliases, settle, kheap) = match traced {
        Traced::Cache(cache) => {
            let catalogue = Catalogue::read(i.root).context("reading the slab cache catalogue")?;
            let selection = caches::select(&catalogue, cache)?;
            // What slabinfo said before attaching, and how the tracked objects are sized.
            let slab_baseline = slab_line(i.root, &selection.cache, &selection.aliases_included);
            let plan = SlabCaches {
                tracefs: i.tracefs,
                btf: i.btf,
                root: i.root,
                catalogue: &catalogue,
                selection: &selection,
                options: i.options.clone(),
                finish: (i.finish)(i.max_objects, slab_baseline.as_ref().map(|l| l.active_objs)),
            }
            .plan(i.facts)?;
            let name = SlabCaches::name(&plan).to_string();
            (
                plan,
                name,
                slab_baseline,
                selection.aliases_included.clone(),
                None,
                None,
            )
        }
        Traced::Percpu => {
            let plan = PercpuAllocations {
                tracefs: i.tracefs,
                btf: i.btf,
                root: i.root,
                options: i.options.clone(),
                finish: (i.finish)(i.max_objects, None),
            }
            .plan(i.facts)?;
            let name = PercpuAllocations::name(&plan).to_string();
            (plan, name, None, Vec::new(), None, None)
        }
        Traced::Pages(select) => {
            // Before attaching: a run that cannot classify its pages would
            // count slab pages as loose ones.
            let flags = PageFlags::open(i.root)
                .context("opening /proc/kpageflags (root; CONFIG_PROC_PAGE_MONITOR)")?;
            let catalogue = Catalogue::read(i.root).context("reading the slab cache catalogue")?;
            let plan = Pages {
                tracefs: i.tracefs,
                btf: i.btf,
                root: i.root,
                select,
                kmalloc_max: pages::kmalloc_max(&catalogue),
                options: i.options.clone(),
                finish: (i.finish)(Some(i.max_objects.unwrap_or(PAGES_MAX_OBJECTS)), None),
            }
            .plan(i.facts)?;
            let settle: Box<dyn Settle> = Box::new(flags);
            let name = Pages::name(&plan).to_string();
            (plan, name, None, Vec::new(), Some(settle), None)
        }
        Traced::AllCaches { sample_bytes } => {
            let catalogue = Catalogue::read(i.root).context("reading the slab cache catalogue")?;
            // Per-CPU memory is sampled beside the caches, on its own hooks.
            // Its allocations are classic anyway; its free hook follows
            // --hooks classic, and is raw where it can be otherwise.
            let percpu_options = PlanOptions {
                hooks: match i.options.hooks {
                    HookMode::Classic => HookMode::Classic,
                    HookMode::Auto | HookMode::Raw => HookMode::Auto,
                },
                ..i.options.with_facts(i.facts)
            };
            let percpu = possible_cpus::read(i.root)
                .and_then(|cpus| percpu::source::build(i.tracefs, i.btf, cpus, &percpu_options));
            let plan = AllCaches {
                tracefs: i.tracefs,
                btf: i.btf,
                root: i.root,
                catalogue: &catalogue,
                rate: *sample_bytes,
                options: i.options.clone(),
                finish: (i.finish)(i.max_objects, None),
                percpu,
            }
            .plan(i.facts)?;
            let name = AllCaches::name(&plan).to_string();
            // The samples' cache names, from the catalogue the plan read.
            let kheap = Kheap::new(
                plan.config.kheap,
                CacheNames::new(
                    &catalogue,
                    &crate::kernel::slabinfo::read(i.root).unwrap_or_default(),
                ),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            );
            (plan, name, None, Vec::new(), None, Some(kheap))
        }
    };
    let source = match traced {
        Traced::Cache(_) | Traced::AllCaches { .. } => MemorySource::Slab,
        Traced::Percpu => MemorySource::Percpu,
        Traced::Pages(_) => MemorySource::Pages,
    };
    Ok(Planned {
        plan,
        name,
        slab_baseline,
        aliases,
        settle,
        kheap,
        source,
    })
}
