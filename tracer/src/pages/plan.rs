//! `--pages`, `--order` and `--gfp` as the kernel side's [`PageConfig`] on
//! this kernel: field offsets from the tracefs formats of `kmem:mm_page_alloc`
//! and `kmem:mm_page_free`, gfp bit values from the former's print format.

use anyhow::{bail, Context, Result};
use tracer_common::slab::{programs::name as program, Config, PageConfig, PAGE_ORDERS, PAGE_SPAN};

use crate::{
    kernel::btf::Btf,
    kernel::tracefs::{EventFormat, Tracefs},
    pages::{PageOptions, NAME},
    slab::plan::{self, Attachment, Hook, HookMode, LiveMap, Plan, PlanOptions},
};

/// `migratetype` 0 (`MIGRATE_UNMOVABLE`, every kernel): what the kernel takes
/// for itself. Movable (1: user and page-cache pages) and reclaimable (2:
/// reclaimable slab caches) allocations are dropped in the kernel, before
/// any map or ring-buffer work.
const UNMOVABLE: u64 = 1 << 0;

/// `kmem:kmalloc`'s leading raw arguments the raw `page_kmalloc` reads.
const RAW_KMALLOC: &[&str] = &["call_site", "ptr", "bytes_req", "bytes_alloc"];

/// `kmalloc_max`: the largest plain kmalloc cache's object size (8 KiB with
/// 4 KiB pages on SLUB); a larger kmalloc takes a block from the page allocator.
pub fn build(
    tracefs: &Tracefs,
    btf: Option<&Btf>,
    kmalloc_max: Option<u64>,
    select: &PageOptions,
    opts: &PlanOptions,
) -> Result<Plan> {
    let raw = raw_page_hooks(btf, opts.hooks);
    if let (HookMode::Raw, Err(why)) = (opts.hooks, &raw) {
        bail!("--hooks raw: --pages cannot use the raw page hooks here: {why}; use --hooks auto");
    }
    let alloc = require(tracefs, "mm_page_alloc")?;
    let free = require(tracefs, "mm_page_free")?;
    let mut pages = PageConfig {
        alloc_pfn: alloc.offset_of("pfn", 8)?,
        alloc_order: alloc.offset_of("order", 4)?,
        alloc_gfp: alloc.offset_of_any("gfp_flags", &[4, 8])?,
        alloc_migratetype: alloc.offset_of("migratetype", 4)?,
        free_pfn: free.offset_of("pfn", 8)?,
        free_order: free.offset_of("order", 4)?,
        page_shift: page_shift()?,
        migratetypes: UNMOVABLE,
        orders: match select.order {
            None => (1 << PAGE_ORDERS) - 1,
            Some(o) => 1 << o,
        },
        ..PageConfig::default()
    };
    pages.alloc_span = span(
        "mm_page_alloc",
        &[
            (pages.alloc_pfn, 8),
            (pages.alloc_order, 4),
            (pages.alloc_gfp, 4),
            (pages.alloc_migratetype, 4),
        ],
    )?;
    pages.free_span = span(
        "mm_page_free",
        &[(pages.free_pfn, 8), (pages.free_order, 4)],
    )?;
    (pages.gfp_all, pages.gfp_none) = gfp_filter(&alloc, &select.gfp)?;
    pages.gfp_comp = alloc.print_flag("__GFP_COMP").context(
        "cannot read __GFP_COMP from kmem:mm_page_alloc's print format; refusing to guess \
         this kernel's gfp bits",
    )?;
    let mut cfg = Config::zeroed();
    cfg.pages = pages;
    plan::set_sampling(&mut cfg, opts);
    let mut notes = Vec::new();
    // The classic hooks' offsets are filled either way: the raw hooks fall
    // back to them when their calibration fails at attach.
    let (alloc_program, free_program, hook) = match raw {
        Ok(struct_page) => {
            cfg.pages.struct_page_size = struct_page;
            if struct_page.is_power_of_two() {
                cfg.pages.struct_page_shift = u64::from(struct_page.trailing_zeros());
            }
            (program::page_alloc_raw, program::page_free_raw, Hook::Raw)
        }
        Err(why) => {
            if opts.hooks != HookMode::Classic {
                notes.push(format!(
                    "pages: classic kmem:mm_page_alloc/mm_page_free hooks ({why})"
                ));
            }
            (program::page_alloc, program::page_free, Hook::Classic)
        }
    };
    let mut attachments = vec![
        Attachment {
            program: alloc_program,
            hook,
            system: "kmem",
            event: "mm_page_alloc",
        },
        Attachment {
            program: free_program,
            hook,
            system: "kmem",
            event: "mm_page_free",
        },
    ];
    if let Some(spare) = (hook == Hook::Raw)
        .then(|| plan::spare_program(free_program))
        .flatten()
    {
        attachments.push(Attachment {
            program: spare,
            hook,
            system: "kmem",
            event: "mm_page_free",
        });
    }
    match kmalloc_max {
        Some(max) => {
            // Before 6.1 kmalloc_node had its own tracepoint (same leading fields).
            for event in ["kmalloc", "kmalloc_node"] {
                let Some(fmt) = tracefs.event_format("kmem", event)? else {
                    continue;
                };
                let raw = opts.hooks != HookMode::Classic
                    && btf
                        .and_then(|b| b.tracepoint_args(event))
                        .is_some_and(|args| {
                            args.iter().zip(RAW_KMALLOC).all(|(a, b)| a == b)
                                && args.len() >= RAW_KMALLOC.len()
                        });
                if raw {
                    attachments.push(Attachment {
                        program: program::page_kmalloc_raw,
                        hook: Hook::Raw,
                        system: "kmem",
                        event,
                    });
                } else {
                    cfg.pages.kmalloc_ptr = fmt.offset_of("ptr", 8)?;
                    cfg.pages.kmalloc_bytes_alloc = fmt.offset_of("bytes_alloc", 8)?;
                    attachments.push(Attachment {
                        program: program::page_kmalloc,
                        hook: Hook::Classic,
                        system: "kmem",
                        event,
                    });
                }
                cfg.pages.kmalloc_max = max;
            }
        }
        None => notes.push(
            "no kmalloc cache found in the slab catalogue: large kmallocs' pages (in Slab) \
             are not told apart and may show here"
                .to_string(),
        ),
    }
    notes.push(format!(
        "pages: unmovable blocks{}{} from kmem:mm_page_alloc; large kmallocs' blocks are \
         taken back at kmem:kmalloc; slab and page-table pages, and \
         pages found free or on the LRU (a free unseen), are dropped at each report by \
         /proc/kpageflags; alloc_pages_bulk's fast path (vmalloc, page_pool) fires no \
         allocation event and is not seen",
        select
            .order
            .map_or(String::new(), |o| format!(" of order {o}")),
        if select.gfp.is_empty() {
            String::new()
        } else {
            format!(" with gfp {}", select.gfp.join(","))
        },
    ));
    let live_map = if opts.on_demand_maps {
        LiveMap::OnDemand
    } else {
        notes.push("live-object map preallocated; --max-objects sizes it".to_string());
        LiveMap::Preallocated
    };
    let mut plan = Plan::unfinished(cfg, attachments, live_map, notes, NAME.to_string());
    plan.page_hooks_raw_required = opts.hooks == HookMode::Raw;
    Ok(plan)
}

/// `TP_PROTO` of the raw page hooks the kernel side reads by position.
const RAW_PAGE_ALLOC: &[&str] = &["page", "order", "gfp_flags", "migratetype"];
const RAW_PAGE_FREE: &[&str] = &["page", "order"];

/// `sizeof(struct page)` where the raw `mm_page_alloc`/`mm_page_free` hooks
/// can run, or why not. Measured on this host (`cargo xtask bench
/// --pages-only`): the classic hooks build a perf record for every page
/// allocated and freed, even for an empty program, which alone cost tmpfs
/// writes 9% of their throughput; the raw hooks pass the `TP_PROTO`
/// arguments as they are. Their `struct page *` becomes a pfn by
/// `CONFIG_SPARSEMEM_VMEMMAP`'s linear map, whose base the attach measures
/// (`slab::page_base`).
fn raw_page_hooks(btf: Option<&Btf>, hooks: HookMode) -> std::result::Result<u64, String> {
    if hooks == HookMode::Classic {
        return Err("--hooks classic".to_string());
    }
    let btf = btf.ok_or("no kernel BTF to check the raw hooks' arguments against")?;
    for (event, want) in [
        ("mm_page_alloc", RAW_PAGE_ALLOC),
        ("mm_page_free", RAW_PAGE_FREE),
    ] {
        let args = btf
            .tracepoint_args(event)
            .ok_or_else(|| format!("BTF has no raw tracepoint {event}"))?;
        if !args.starts_with(&want.iter().map(|a| a.to_string()).collect::<Vec<_>>()) {
            return Err(format!(
                "raw {event} takes ({}), not ({})",
                args.join(", "),
                want.join(", ")
            ));
        }
    }
    if !btf.has_func("vmemmap_populate") {
        return Err(
            "no CONFIG_SPARSEMEM_VMEMMAP (BTF has no vmemmap_populate): \
                    struct page addresses are not linear in the pfn"
                .to_string(),
        );
    }
    match btf.struct_size("page") {
        Some(size) if size > 0 => Ok(u64::from(size)),
        _ => Err("BTF has no struct page size".to_string()),
    }
}

/// Where the kernel side's one read of an `event` record starts, so that
/// [`PAGE_SPAN`] bytes hold every (offset, size) it reads.
fn span(event: &str, fields: &[(u16, u16)]) -> Result<u16> {
    let start = fields.iter().map(|f| f.0).min().unwrap_or(0);
    let end = fields.iter().map(|f| f.0 + f.1).max().unwrap_or(0);
    if usize::from(end - start) > PAGE_SPAN {
        bail!(
            "kmem:{event}'s fields span {} bytes; leaktrace reads at most {PAGE_SPAN}",
            end - start
        );
    }
    Ok(start)
}

/// (every bit required, any bit refused) from `--gfp` names: `NAME` requires
/// the flag, `!NAME` refuses it; values read from the tracepoint's print
/// format, so an unknown name fails before anything is attached.
fn gfp_filter(fmt: &EventFormat, names: &[String]) -> Result<(u64, u64)> {
    let (mut all, mut none) = (0, 0);
    for name in names {
        let (refuse, flag) = match name.strip_prefix('!') {
            Some(flag) => (true, flag),
            None => (false, name.as_str()),
        };
        let Some(bits) = fmt.print_flag(flag) else {
            let known: Vec<String> = fmt
                .print_flags()
                .into_iter()
                .map(|(n, _)| n)
                .filter(|n| n.starts_with("__GFP_"))
                .collect();
            bail!(
                "--gfp: this kernel's kmem:mm_page_alloc prints no gfp flag '{flag}'; \
                 known: {}",
                known.join(", ")
            );
        };
        if bits == 0 {
            bail!("--gfp: '{flag}' has no bits on this kernel");
        }
        if refuse {
            none |= bits;
        } else {
            all |= bits;
        }
    }
    if all & none != 0 {
        bail!("--gfp: a flag is both required and refused");
    }
    Ok((all, none))
}

fn require(tracefs: &Tracefs, event: &str) -> Result<EventFormat> {
    tracefs.event_format("kmem", event)?.with_context(|| {
        format!(
            "this kernel has no kmem:{event} tracepoint (looked in {}/events/kmem); \
             --pages needs it (CONFIG_TRACEPOINTS)",
            tracefs.root().display()
        )
    })
}

fn page_shift() -> Result<u16> {
    // SAFETY: sysconf has no memory effects.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    match u64::try_from(size) {
        Ok(s) if s.is_power_of_two() => Ok(s.trailing_zeros() as u16),
        _ => bail!("sysconf(_SC_PAGESIZE) returned {size}"),
    }
}
