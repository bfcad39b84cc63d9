//! Turns "trace this cache" into what the kernel side needs on *this* kernel:
//! field offsets from tracefs `format` files, gfp bit values from their print
//! formats, which kmalloc classes land in the cache, and which tracepoints to attach.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tracer_common::slab::{
    programs::{name as program, PROGRAMS},
    user::cache_name_words,
    AllocLayout, Config, CACHE_NAME_LEN, MAX_CACHE_NAMES, STACK_KERNEL, STACK_USER,
};

use crate::{
    kernel::btf::Btf,
    kernel::facts::{Features, KernelFacts},
    kernel::irq_context,
    kernel::tracefs::{EventFormat, Tracefs},
    slab::caches::{Catalogue, KmallocKind, Selection},
    slab::cgroup_source::cgroup_source,
};

/// How a program hooks its event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// `kmem:<event>` through perf, fields read at format-file offsets.
    Classic,
    /// `bpf_raw_tracepoint_open(<event>)`: TP_PROTO arguments, no perf record.
    Raw,
    /// The same arguments as a BTF tracepoint (`tp_btf/<event>`, 5.5+): a
    /// pointer argument's fields are plain loads, no `bpf_probe_read_kernel`.
    Btf,
}

/// Which hooks the user allows; `Auto` prefers raw tracepoints where BTF proves
/// the argument layout the raw programs were written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum HookMode {
    #[default]
    Auto,
    Raw,
    Classic,
}

/// One program attached to one tracepoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub program: &'static str,
    pub hook: Hook,
    /// The tracefs group of a classic hook's event: `kmem`, `percpu`.
    pub system: &'static str,
    pub event: &'static str,
}

impl Attachment {
    pub fn describe(&self) -> String {
        match self.hook {
            Hook::Classic => format!("{}:{}", self.system, self.event),
            Hook::Raw => format!("raw:{}", self.event),
            Hook::Btf => format!("btf:{}", self.event),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub config: Config,
    pub attachments: Vec<Attachment>,
    pub live_map: LiveMap,
    /// One-line facts the user should see at start (aliases included, fallbacks taken).
    pub notes: Vec<String>,
    pub cache: String,
    /// The kernel reports runs it skipped for recursion in each program's
    /// info (`KernelFacts::recursion_misses`); set by [`Plan::finish`].
    pub recursion_misses: bool,
    /// Objects the kernel can track at once; set by [`Plan::finish`].
    pub max_objects: u32,
    /// The hierarchy the CGROUP column's ids are directories of; set by
    /// [`Plan::finish`].
    pub cgroup_mount: Option<PathBuf>,
    /// `--hooks raw` with the page source: its raw hooks' calibration
    /// failing at attach is an error, not a fallback to the classic ones.
    pub page_hooks_raw_required: bool,
}

#[derive(Debug, Clone, Default)]
pub struct PlanOptions {
    pub pid: Option<u32>,
    pub kernel_stacks: bool,
    pub user_stacks: bool,
    pub hooks: HookMode,
    /// Capture full stacks for a random one allocation in this many; 1
    /// captures every allocation.
    pub stack_sample: u64,
    /// The kernel lets tracing programs use hash maps that are not
    /// preallocated (`KernelFacts::on_demand_maps`).
    pub on_demand_maps: bool,
}

impl PlanOptions {
    /// These options with the kernel facts' say on on-demand maps, whatever
    /// was set: what every source plans with.
    pub fn with_facts(&self, facts: &KernelFacts) -> PlanOptions {
        PlanOptions {
            on_demand_maps: facts.on_demand_maps,
            ..self.clone()
        }
    }
}

/// A stratum's first allocations on each CPU drawn with probability 1: a path
/// that allocates once every few seconds (a retry loop) is then named by its
/// first allocations instead of after ~64 of them, and a burst of new
/// short-lived processes costs at most this many stacks each per CPU.
pub const CENSUS_ALLOCS: u32 = 32;

/// Census draws one CPU may make per ~134 ms budget window (~1,900 a second):
/// a storm of new strata (thousands of short-lived processes, or strata
/// taking over each other's slot) costs at most that many stacks.
pub const CENSUS_WINDOW_CAP: u64 = 256;

/// How the live-object map gets its memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveMap {
    /// Every entry allocated at load: `--max-objects` × ~80 bytes up front.
    Preallocated,
    /// Entries allocated as objects are tracked (BPF_F_NO_PREALLOC).
    OnDemand,
}

/// bpf_mem_alloc refills its per-CPU caches with kmalloc of the element size
/// (a 64-byte htab element here, charged: kmalloc-cg-64) from irq_work. If the
/// traced cache could receive those refills, every tracked object would make
/// room for more: only caches of larger objects get an on-demand map.
const ON_DEMAND_MIN_OBJECT: u64 = 256;

/// The raw tracepoint argument names each raw program was written for, checked
/// against the running kernel's BTF before the program is used.
const RAW_KMALLOC: &[&str] = &["call_site", "ptr", "bytes_req", "bytes_alloc", "gfp_flags"];
const RAW_FREE: &[&str] = &["call_site", "ptr"];
const RAW_CACHE_ALLOC: &[&str] = &["call_site", "ptr", "s", "gfp_flags"];

/// The second program on a raw hook, run when the first is skipped for
/// recursion (see `kfree_raw_spare` and `kmalloc_raw_spare` in the eBPF object). Classic tracepoints
/// share one CPU-wide guard across all programs, so a spare cannot help there.
/// A `_nocas` build's spare is that of its program, built the same way.
pub fn spare_program(raw: &str) -> Option<&'static str> {
    let (program, live_slots) = match raw.strip_suffix(NOCAS) {
        Some(program) => (program, false),
        None => (raw, true),
    };
    // Only raw hooks have spares, and each is named after its program.
    let spare = PROGRAMS
        .iter()
        .find(|p| p.spare && p.name.strip_suffix("_spare") == Some(program))?;
    Some(program_variant(spare.name, live_slots))
}

/// The name suffix of the programs built without compare-and-swap.
const NOCAS: &str = "_nocas";

/// The program to load for the plan's `program`: the same program built
/// without BPF compare-and-swap where the kernel has none (`live_slots` false:
/// `live_bucket_mask` 0, `KernelFacts::bpf_cmpxchg` false, Linux before 5.12,
/// whose verifier rejects a `BPF_CMPXCHG` anywhere in a program; see the
/// `_nocas` programs in tracer-ebpf/src/slab.rs).
pub fn program_variant(program: &'static str, live_slots: bool) -> &'static str {
    if live_slots {
        return program;
    }
    PROGRAMS
        .iter()
        .find(|p| p.name == program)
        .map_or(program, |p| p.nocas)
}

pub fn is_spare(program: &str) -> bool {
    program
        .strip_suffix(NOCAS)
        .unwrap_or(program)
        .ends_with("_spare")
}

struct Hooks<'a> {
    tracefs: &'a Tracefs,
    btf: Option<&'a Btf>,
    mode: HookMode,
    attachments: Vec<Attachment>,
}

impl Hooks<'_> {
    /// Attach `event` through its raw tracepoint when allowed and the kernel's
    /// arguments start with `raw_args`; otherwise through the classic tracepoint,
    /// whose format is returned for offset lookups. None: the event does not exist.
    fn add(
        &mut self,
        event: &'static str,
        classic: &'static str,
        raw: &'static str,
        raw_args: &[&str],
        extra_raw_ok: bool,
    ) -> Result<Option<Option<EventFormat>>> {
        let Some(fmt) = self.tracefs.event_format("kmem", event)? else {
            return Ok(None);
        };
        let raw_ok = extra_raw_ok
            && self
                .btf
                .and_then(|b| b.tracepoint_args(event))
                .is_some_and(|args| {
                    args.len() >= raw_args.len() && args.iter().zip(raw_args).all(|(a, b)| a == b)
                });
        match (self.mode, raw_ok) {
            (HookMode::Raw, false) => bail!(
                "--hooks raw: the raw tracepoint {event} is unusable here ({}); use --hooks auto",
                match self.btf.map(|b| b.tracepoint_args(event)) {
                    None => "no BTF at /sys/kernel/btf/vmlinux",
                    Some(None) => "its BTF has no __bpf_trace_ function naming the arguments",
                    Some(Some(_)) =>
                        "its BTF arguments differ from what leaktrace's raw program reads",
                }
            ),
            (HookMode::Auto | HookMode::Raw, true) => {
                self.attachments.push(Attachment {
                    program: raw,
                    hook: Hook::Raw,
                    system: "kmem",
                    event,
                });
                if let Some(spare) = spare_program(raw) {
                    self.attachments.push(Attachment {
                        program: spare,
                        hook: Hook::Raw,
                        system: "kmem",
                        event,
                    });
                }
                Ok(Some(None))
            }
            _ => {
                self.attachments.push(Attachment {
                    program: classic,
                    hook: Hook::Classic,
                    system: "kmem",
                    event,
                });
                Ok(Some(Some(fmt)))
            }
        }
    }
}

pub fn build(
    tracefs: &Tracefs,
    btf: Option<&Btf>,
    catalogue: &Catalogue,
    sel: &Selection,
    opts: &PlanOptions,
) -> Result<Plan> {
    let mut cfg = Config::zeroed();
    let mut notes = sel.notes.clone();
    let mut hooks = Hooks {
        tracefs,
        btf,
        mode: opts.hooks,
        attachments: Vec::new(),
    };

    // Frees are matched against the kernel's live map, so both free paths are always needed:
    // kmalloc'd memory may be freed by kmem_cache_free and cache objects by kfree.
    match hooks.add("kfree", program::kfree, program::kfree_raw, RAW_FREE, true)? {
        None => return Err(missing(tracefs, "kfree")),
        Some(Some(fmt)) => cfg.kfree_ptr = fmt.offset_of("ptr", 8)?,
        Some(None) => {}
    }
    match hooks.add(
        "kmem_cache_free",
        program::kmem_cache_free,
        program::kmem_cache_free_raw,
        RAW_FREE,
        true,
    )? {
        None => return Err(missing(tracefs, "kmem_cache_free")),
        Some(Some(fmt)) => cfg.cache_free_ptr = fmt.offset_of("ptr", 8)?,
        Some(None) => {}
    }

    // bytes_alloc is the kmem_cache's size (Selection::object_size), which debug
    // options (red zones) make larger than the nominal object size.
    let slab_size = u64::from(sel.object_size);

    let mut kinds: Vec<(u32, KmallocKind)> = sel.kmalloc.iter().copied().collect();
    kinds.extend(sel.also_kmalloc.iter().copied());
    if !kinds.is_empty() {
        // gfp bit values come from the classic format's print fmt whichever hook runs.
        let fmt = require(tracefs, "kmalloc")?;
        cfg.kmalloc_size = slab_size;
        // Kernels before 6.18 print bit 0 only under its alias GFP_DMA.
        cfg.gfp_dma = gfp_bit(&fmt, "__GFP_DMA").or_else(|_| gfp_bit(&fmt, "GFP_DMA"))?;
        cfg.gfp_reclaimable = gfp_bit(&fmt, "__GFP_RECLAIMABLE")?;
        cfg.gfp_account = gfp_bit(&fmt, "__GFP_ACCOUNT")?;
        // The kernel creates a kind's caches for every size or for none, so ask
        // whether the kind exists at all; sizes here are slab sizes, which debug
        // options make differ from the nominal one in the cache name.
        let present = |kind| {
            let prefix = kmalloc_prefix(kind);
            catalogue.iter().any(|c| c.name.starts_with(prefix))
        };
        cfg.kmalloc_classes = class_bitmap(&kinds, present);
        // Before 6.1 NUMA-node kmallocs had their own tracepoint with the same leading fields.
        for event in ["kmalloc", "kmalloc_node"] {
            if let Some(Some(f)) = hooks.add(
                event,
                program::kmalloc,
                program::kmalloc_raw,
                RAW_KMALLOC,
                true,
            )? {
                let layout = alloc_layout(&f)?;
                if cfg.kmalloc != AllocLayout::default() && cfg.kmalloc != layout {
                    bail!("kmem:kmalloc and kmem:{event} lay out their fields differently; not supported");
                }
                cfg.kmalloc = layout;
            }
        }
    }

    if !sel.named.is_empty() {
        let kmem_cache = btf.and_then(|b| {
            Some((
                b.member_offset("kmem_cache", "size")?,
                b.member_offset("kmem_cache", "name")?,
            ))
        });
        if let Some((size, name)) = kmem_cache {
            cfg.kmem_cache_size_off = u16::try_from(size).context("kmem_cache.size offset")?;
            cfg.kmem_cache_name_off = u16::try_from(name).context("kmem_cache.name offset")?;
        }
        for event in ["kmem_cache_alloc", "kmem_cache_alloc_node"] {
            let raw_ok = kmem_cache.is_some();
            let Some(Some(fmt)) = hooks.add(
                event,
                program::kmem_cache_alloc,
                program::kmem_cache_alloc_raw,
                RAW_CACHE_ALLOC,
                raw_ok,
            )?
            else {
                continue;
            };
            // Offset 0 (the common header, never a name) tells the kernel
            // side there is none.
            let name = fmt.field("name").filter(|f| f.data_loc).map(|f| f.offset);
            let Some(name) = name.or(sel.every_cache.then_some(0)) else {
                bail!(
                    "cache '{}' is selected by name, but this kernel's kmem:{event} tracepoint has no \
                     cache name (Debian's 6.1 and 6.12 have none; 6.18 has it) and its raw tracepoint \
                     is unusable without BTF; pick a kmalloc-N cache instead (see 'leaktrace caches')",
                    sel.cache
                );
            };
            let layout = AllocLayout {
                name,
                ..alloc_layout(&fmt)?
            };
            // One layout serves both events' program.
            if cfg.cache_alloc != AllocLayout::default() && cfg.cache_alloc != layout {
                bail!("kmem:kmem_cache_alloc and kmem:{event} lay out their fields differently; not supported");
            }
            cfg.cache_alloc = layout;
        }
        if !hooks
            .attachments
            .iter()
            .any(|a| a.program.starts_with(program::kmem_cache_alloc))
        {
            return Err(missing(tracefs, "kmem_cache_alloc"));
        }
        cfg.cache_size = slab_size;
        if sel.named.len() > MAX_CACHE_NAMES {
            bail!(
                "cache '{}' has {} merged names; the kernel side compares at most {MAX_CACHE_NAMES}",
                sel.cache,
                sel.named.len()
            );
        }
        for (slot, name) in cfg.cache_names.iter_mut().zip(&sel.named) {
            *slot = name_words(name)?;
        }
        cfg.n_cache_names = sel.named.len() as u16;
    }
    if cfg.kmalloc_size == 0 && cfg.cache_size == 0 {
        bail!(
            "cache '{}' selects nothing the kmem tracepoints can see",
            sel.cache
        );
    }
    if !sel.aliases_included.is_empty() {
        notes.push(format!(
            "also covers caches merged into {}: {}",
            sel.cache,
            sel.aliases_included.join(", ")
        ));
    }
    // Objects of a power-of-two cache sit at multiples of their size (kmalloc's
    // alignment guarantee; slabs are page-aligned), so a free whose pointer has a
    // low bit set cannot be ours. Debug layouts (red zones) break this: no filter.
    let debug = catalogue.get(&sel.cache).is_some_and(|c| c.debug);
    if slab_size.is_power_of_two() && !debug {
        cfg.free_align_mask = slab_size.min(4096) - 1;
    }

    set_sampling(&mut cfg, opts);
    let live_map = if opts.on_demand_maps && slab_size > ON_DEMAND_MIN_OBJECT {
        LiveMap::OnDemand
    } else {
        notes.push(format!(
            "live-object map preallocated ({}); --max-objects sizes it",
            if opts.on_demand_maps {
                "objects of 256 bytes or less could receive the map's own on-demand elements"
            } else {
                "tracing programs get on-demand hash maps from Linux 6.1"
            }
        ));
        LiveMap::Preallocated
    };
    Ok(Plan::unfinished(
        cfg,
        hooks.attachments,
        live_map,
        notes,
        sel.cache.clone(),
    ))
}

/// The run's choices [`Plan::finish`] settles with the kernel's facts.
/// What every source's kernel side takes from the run's options: the
/// process filter, which stacks, and how they are drawn.
pub fn set_sampling(cfg: &mut Config, opts: &PlanOptions) {
    let sample_every = opts.stack_sample.max(1).next_power_of_two();
    cfg.stack_sample_mask = sample_every - 1;
    cfg.base_level = sample_every.trailing_zeros();
    // Where every allocation is drawn anyway, a census adds nothing.
    cfg.census_allocs = if sample_every > 1 { CENSUS_ALLOCS } else { 0 };
    cfg.census_window_cap = CENSUS_WINDOW_CAP;
    cfg.target_tgid = opts.pid.unwrap_or(0);
    cfg.stack_flags = if opts.kernel_stacks { STACK_KERNEL } else { 0 }
        | if opts.user_stacks { STACK_USER } else { 0 };
}

#[derive(Debug, Clone, Default)]
pub struct Finish {
    pub ringbuf_bytes: u32,
    /// Key the exact counts by each allocation's first user frames too.
    pub user_paths: bool,
    /// `--max-objects`; None: sized from the cache's active objects.
    pub max_objects: Option<u32>,
    /// The cache's active objects at start (/proc/slabinfo), if readable.
    pub active_objs: Option<u64>,
    /// Expected zoomed draws the kernel allows per budget window.
    pub zoom_window_cap: u64,
}

impl Plan {
    /// A source's plan as its `build` leaves it: [`Plan::finish`] settles
    /// the rest (the cgroup source, the live table's size) with the facts.
    pub fn unfinished(
        config: Config,
        attachments: Vec<Attachment>,
        live_map: LiveMap,
        notes: Vec<String>,
        cache: String,
    ) -> Plan {
        Plan {
            config,
            attachments,
            live_map,
            notes,
            cache,
            recursion_misses: false,
            max_objects: 0,
            cgroup_mount: None,
            page_hooks_raw_required: false,
        }
    }

    /// The rest of the kernel side's configuration, decided once the cache's
    /// hooks are known: how the ring buffer wakes the reader, what keys the
    /// strata, where the task's cgroup and interrupt context are read, and how
    /// the live-object map is sized and probed.
    pub fn finish(&mut self, facts: &KernelFacts, btf: Option<&Btf>, root: &Path, f: &Finish) {
        // Wake the reader at a quarter full; the poll timer drains smaller batches.
        self.config.wakeup_bytes = u64::from(f.ringbuf_bytes / 4);
        // Strata are keyed by the user path only on request: the walk costs more
        // than the rest of a matched allocation (`cargo xtask bench`), and
        // sampling is unbiased without it.
        self.config.user_fingerprint = u32::from(f.user_paths);
        let cgroup_source = cgroup_source(root, btf);
        self.config.task = cgroup_source.task;
        self.notes.push(cgroup_source.note);
        match irq_context::resolve(btf) {
            Ok(irq) => self.config.irq = irq,
            Err(why) => self.notes.push(format!(
                "interrupt context unknown on this kernel ({why}): allocations made in softirq \
                 or irq are charged to the interrupted process"
            )),
        }
        let max_objects = match f.max_objects {
            Some(n) => n,
            None => {
                let n = live_map_entries(f.active_objs);
                self.notes.push(format!(
                    "sized to track {n} objects at once ({}; --max-objects sets it)",
                    f.active_objs
                        .map_or("/proc/slabinfo unreadable".to_string(), |a| format!(
                            "twice the cache's {a} active objects, 65536 at least"
                        ))
                ));
                n
            }
        };
        self.config.live_bucket_mask = live_bucket_mask(max_objects, facts.bpf_cmpxchg);
        self.config.zoom_window_cap = f.zoom_window_cap;
        self.recursion_misses = facts.recursion_misses;
        self.max_objects = max_objects;
        self.cgroup_mount = cgroup_source.mount;
    }
}

fn missing(tracefs: &Tracefs, event: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "this kernel has no kmem:{event} tracepoint (looked in {}/events/kmem); \
         leaktrace needs the kmem tracepoints (CONFIG_TRACEPOINTS)",
        tracefs.root().display()
    )
}

fn require(tracefs: &Tracefs, event: &str) -> Result<EventFormat> {
    tracefs
        .event_format("kmem", event)?
        .ok_or_else(|| missing(tracefs, event))
}

fn alloc_layout(fmt: &EventFormat) -> Result<AllocLayout> {
    Ok(AllocLayout {
        ptr: fmt.offset_of("ptr", 8)?,
        bytes_req: fmt.offset_of("bytes_req", 8)?,
        bytes_alloc: fmt.offset_of("bytes_alloc", 8)?,
        gfp_flags: fmt.offset_of_any("gfp_flags", &[4, 8])?,
        name: 0,
        call_site: fmt.offset_of("call_site", 8)?,
        _pad: [0; 2],
    })
}

fn gfp_bit(fmt: &EventFormat, flag: &str) -> Result<u64> {
    fmt.print_flag(flag).with_context(|| {
        format!(
            "cannot read the value of {flag} from kmem:{}'s print format; refusing to guess this kernel's gfp bits",
            fmt.name
        )
    })
}

fn kmalloc_prefix(kind: KmallocKind) -> &'static str {
    match kind {
        KmallocKind::Normal => "kmalloc-",
        KmallocKind::Cgroup => "kmalloc-cg-",
        KmallocKind::Reclaimable => "kmalloc-rcl-",
        KmallocKind::Dma => "dma-kmalloc-",
    }
}

/// Which of the 8 (dma, reclaimable, account) combinations land in the selected caches.
/// Mirrors the kernel's kmalloc_type(): DMA wins, then reclaimable, then accounted; a
/// kind whose caches this kernel does not have (no kmalloc-cg before 5.14, no ZONE_DMA)
/// falls back to the normal caches.
fn class_bitmap(selected: &[(u32, KmallocKind)], present: impl Fn(KmallocKind) -> bool) -> u64 {
    let mut bitmap = 0;
    for class in 0..8u64 {
        let (dma, rcl, account) = (class & 1 != 0, class & 2 != 0, class & 4 != 0);
        let wanted = if dma {
            KmallocKind::Dma
        } else if rcl {
            KmallocKind::Reclaimable
        } else if account {
            KmallocKind::Cgroup
        } else {
            KmallocKind::Normal
        };
        let lands_in = if present(wanted) {
            wanted
        } else {
            KmallocKind::Normal
        };
        if selected.iter().any(|&(_, k)| k == lands_in) {
            bitmap |= 1 << class;
        }
    }
    bitmap
}

fn name_words(name: &str) -> Result<[u64; CACHE_NAME_LEN / 8]> {
    cache_name_words(name).with_context(|| {
        format!(
            "cache name '{name}' is longer than {} bytes",
            CACHE_NAME_LEN - 1
        )
    })
}

/// The one line users see about hooks: what we use and what we fell back from.
pub fn hooks_note(features: &Features, attachments: &[Attachment], btf: bool) -> String {
    let list = |hook| {
        let mut events: Vec<&str> = Vec::new();
        // A free hook carries a spare program too; name the event once.
        for a in attachments.iter().filter(|a| a.hook == hook) {
            if !events.contains(&a.event) {
                events.push(a.event);
            }
        }
        events.join(",")
    };
    let mut used = Vec::new();
    let raw = list(Hook::Raw);
    if !raw.is_empty() {
        used.push(format!("raw tracepoints {raw}"));
    }
    let btf_hooks = list(Hook::Btf);
    if !btf_hooks.is_empty() {
        used.push(format!("BTF tracepoints {btf_hooks}"));
    }
    let classic = list(Hook::Classic);
    if !classic.is_empty() {
        let why = if btf {
            ""
        } else {
            " (no BTF: raw tracepoint layouts unverifiable)"
        };
        // One source a run: its classic hooks share one tracefs group.
        let system = attachments
            .iter()
            .find(|a| a.hook == Hook::Classic)
            .map_or("kmem", |a| a.system);
        used.push(format!("tracepoints {system}:{classic}{why}"));
    }
    let kprobes = if features.kprobes {
        "kprobes available, not needed for slab tracing"
    } else {
        "no kprobes on this kernel"
    };
    format!(
        "hooks: {} ({kprobes}; kernel {})",
        used.join(" + "),
        features.kernel_release
    )
}

/// Default size of the live-object map: room for the selected cache's
/// `active_objs` (from /proc/slabinfo) to double while we trace, as a power of
/// two from 65,536 to 1,048,576 (all of it when slabinfo could not be read).
/// The map's buckets are allocated up front (16 B each, plus 80 B an entry when
/// preallocated), so a 1 M-entry map on an idle cache would pin 16-84 MB of
/// kernel memory on a node that is already short of it.
pub fn live_map_entries(active_objs: Option<u64>) -> u32 {
    const MIN: u64 = 1 << 16;
    const MAX: u64 = 1 << 20;
    let want = active_objs.map_or(MAX, |n| {
        n.saturating_mul(2)
            .checked_next_power_of_two()
            .unwrap_or(MAX)
    });
    want.clamp(MIN, MAX) as u32
}

/// The lock-free live-object table for `max_objects` (see `LIVE_SLOTS` in
/// tracer-ebpf/src/slab/live.rs): `LIVE_WAYS` slots a bucket, twice as many slots
/// as objects so a full bucket stays rare, as a bucket count minus one. 0 where
/// the kernel has no BPF compare-and-swap (`BPF_CMPXCHG`, Linux 5.12); every
/// pointer then goes to the `LIVE` hash map.
pub fn live_bucket_mask(max_objects: u32, have_cmpxchg: bool) -> u64 {
    if !have_cmpxchg {
        return 0;
    }
    let slots = u64::from(max_objects).max(1).next_power_of_two() * 2;
    // At least two buckets: a mask of 0 means "no slots".
    (slots / tracer_common::slab::LIVE_WAYS as u64).max(2) - 1
}

/// Entries of the `LIVE` hash map: everything where there are no slots, else
/// only the pointers whose bucket was full (a few percent at most), so an
/// eighth, 8,192 at least.
pub fn live_overflow_entries(max_objects: u32, bucket_mask: u64) -> u32 {
    if bucket_mask == 0 {
        max_objects
    } else {
        (max_objects / 8).max(8192)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::slab::caches;

    const TESTDATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata");

    fn plan_for(kernel: &str, cache: &str) -> Result<Plan> {
        let catalogue = Catalogue::read(&Path::new(TESTDATA).join("proc/host-6.18"))
            .expect("catalogue fixture");
        let sel = caches::select(&catalogue, cache).expect("selection");
        let tracefs = Tracefs::at(Path::new(TESTDATA).join("formats").join(kernel));
        let opts = PlanOptions {
            pid: Some(42),
            kernel_stacks: true,
            user_stacks: false,
            hooks: HookMode::Classic,
            stack_sample: 64,
            on_demand_maps: false,
        };
        build(&tracefs, None, &catalogue, &sel, &opts)
    }

    fn events(plan: &Plan) -> Vec<&str> {
        plan.attachments.iter().map(|a| a.event).collect()
    }

    #[test]
    fn kmalloc_512_on_every_fixture_kernel() {
        for kernel in ["5.10", "6.1", "6.12", "6.18"] {
            let plan =
                plan_for(kernel, "kmalloc-512").unwrap_or_else(|e| panic!("{kernel}: {e:#}"));
            let c = &plan.config;
            assert_eq!(
                (c.kmalloc.ptr, c.kmalloc.bytes_alloc, c.kmalloc.gfp_flags),
                (16, 32, 40),
                "{kernel}"
            );
            assert_eq!((c.kfree_ptr, c.cache_free_ptr), (16, 16), "{kernel}");
            assert_eq!(c.kmalloc_size, 512);
            assert_eq!(
                (c.gfp_dma, c.gfp_reclaimable, c.gfp_account),
                (0x1, 0x10, 0x400000),
                "{kernel}"
            );
            // This host has kmalloc-cg/rcl/dma caches: only the plain class is kmalloc-512.
            assert_eq!(c.kmalloc_classes, 0b1);
            assert_eq!(
                c.cache_size, 0,
                "nothing named is merged into kmalloc-512 here"
            );
            assert_eq!((c.target_tgid, c.stack_flags), (42, STACK_KERNEL));
            let mut want = vec!["kfree", "kmem_cache_free", "kmalloc"];
            if kernel == "5.10" {
                want.push("kmalloc_node");
            }
            assert_eq!(events(&plan), want, "{kernel}");
        }
    }

    #[test]
    fn named_cache_reads_the_name_where_the_kernel_has_one() {
        let plan = plan_for("6.18", "filp").expect("6.18 has kmem_cache_alloc name");
        let c = &plan.config;
        assert_eq!(
            (
                c.cache_alloc.name,
                c.cache_alloc.bytes_alloc,
                c.cache_alloc.gfp_flags
            ),
            (24, 40, 48)
        );
        assert_eq!(c.cache_size, 192);
        assert_eq!(c.n_cache_names, 1);
        assert_eq!(c.cache_names[0], name_words("filp").expect("fits"));
        assert_eq!(c.kmalloc_size, 0);
        assert!(events(&plan).contains(&"kmem_cache_alloc"));
        for kernel in ["5.10", "6.1", "6.12"] {
            let err = plan_for(kernel, "filp")
                .expect_err("no name field")
                .to_string();
            assert!(err.contains("has no cache name"), "{kernel}: {err}");
        }
    }

    #[test]
    fn missing_tracepoint_is_a_clear_error() {
        let catalogue =
            Catalogue::read(&Path::new(TESTDATA).join("proc/host-6.18")).expect("catalogue");
        let sel = caches::select(&catalogue, "kmalloc-512").expect("selection");
        let empty =
            std::env::temp_dir().join(format!("leaktrace-empty-tracefs-{}", std::process::id()));
        std::fs::create_dir_all(&empty).expect("mkdir");
        let err = build(
            &Tracefs::at(&empty),
            None,
            &catalogue,
            &sel,
            &PlanOptions::default(),
        )
        .expect_err("no tracepoints")
        .to_string();
        assert!(err.contains("no kmem:kfree tracepoint"), "{err}");
        let _ = std::fs::remove_dir_all(&empty);
    }

    /// A copy of a fixture kernel's tracefs with one field line taken out of one
    /// event's format.
    fn tracefs_without(kernel: &str, event: &str, field: &str) -> std::path::PathBuf {
        let src = Path::new(TESTDATA).join("formats").join(kernel);
        let dst = std::env::temp_dir().join(format!(
            "leaktrace-no-{event}-{field}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dst);
        for system in ["kmem", "cgroup"] {
            let dir = src.join("events").join(system);
            for e in std::fs::read_dir(&dir).expect("fixture dir") {
                let e = e.expect("entry");
                let name = e.file_name().to_string_lossy().into_owned();
                let text = std::fs::read_to_string(e.path().join("format")).expect("format");
                let text = if name == event {
                    let pattern = format!(" {field};");
                    let kept: Vec<&str> = text.lines().filter(|l| !l.contains(&pattern)).collect();
                    assert_ne!(kept.len(), text.lines().count(), "{event} has no {field}");
                    kept.join("\n") + "\n"
                } else {
                    text
                };
                let out = dst.join("events").join(system).join(&name);
                std::fs::create_dir_all(&out).expect("mkdir");
                std::fs::write(out.join("format"), text).expect("write");
            }
        }
        dst
    }

    /// A kernel whose format lacks a field a hook reads is refused in one line
    /// that names the event and the field, not attached with a guessed offset.
    #[test]
    fn a_missing_hook_field_is_one_line_naming_it() {
        let catalogue =
            Catalogue::read(&Path::new(TESTDATA).join("proc/host-6.18")).expect("catalogue");
        let opts = PlanOptions {
            hooks: HookMode::Classic,
            ..PlanOptions::default()
        };
        for (cache, event, field) in [
            ("kmalloc-512", "kmalloc", "bytes_alloc"),
            ("kmalloc-512", "kmalloc", "call_site"),
            ("kmalloc-512", "kfree", "ptr"),
            ("kmalloc-512", "kmem_cache_free", "ptr"),
            ("kmalloc-512", "kmalloc", "gfp_flags"),
            ("filp", "kmem_cache_alloc", "ptr"),
        ] {
            let sel = caches::select(&catalogue, cache).expect("selection");
            let dir = tracefs_without("6.18", event, field);
            let err = build(&Tracefs::at(&dir), None, &catalogue, &sel, &opts)
                .expect_err("a field is missing");
            let msg = format!("{err:#}");
            assert!(
                msg.contains(event) && msg.contains(field),
                "{event}.{field}: {msg}"
            );
            assert_eq!(msg.lines().count(), 1, "{msg}");
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    #[test]
    fn class_bitmap_follows_kmalloc_type() {
        let all = |_| true;
        assert_eq!(
            class_bitmap(&[(512, KmallocKind::Normal)], all),
            0b0000_0001
        );
        // account only -> cg; reclaimable(+account) -> rcl; dma(+anything) -> dma.
        assert_eq!(
            class_bitmap(&[(512, KmallocKind::Cgroup)], all),
            0b0001_0000
        );
        assert_eq!(
            class_bitmap(&[(512, KmallocKind::Reclaimable)], all),
            0b0100_0100
        );
        assert_eq!(class_bitmap(&[(512, KmallocKind::Dma)], all), 0b1010_1010);
        // A kernel without kmalloc-cg caches puts accounted kmallocs in kmalloc-N.
        let no_cg = |k| k != KmallocKind::Cgroup;
        assert_eq!(
            class_bitmap(&[(512, KmallocKind::Normal)], no_cg),
            0b0001_0001
        );
        assert_eq!(class_bitmap(&[(512, KmallocKind::Cgroup)], no_cg), 0);
    }

    #[test]
    fn names_pack_little_endian_with_nul() {
        let w = name_words("filp").expect("fits");
        assert_eq!(w[0], u64::from_le_bytes(*b"filp\0\0\0\0"));
        assert_eq!(&w[1..], &[0, 0, 0]);
        assert!(name_words(&"x".repeat(32)).is_err());
        assert!(name_words(&"x".repeat(31)).is_ok());
    }

    #[test]
    fn live_map_is_sized_to_the_cache() {
        assert_eq!(live_map_entries(None), 1 << 20);
        assert_eq!(live_map_entries(Some(0)), 1 << 16);
        assert_eq!(live_map_entries(Some(11_621)), 1 << 16);
        assert_eq!(live_map_entries(Some(100_000)), 1 << 18);
        assert_eq!(live_map_entries(Some(262_842)), 1 << 20);
        assert_eq!(live_map_entries(Some(u64::MAX)), 1 << 20);
    }

    #[test]
    fn hooks_note_names_hooks_and_fallbacks() {
        let features = Features {
            kernel_release: "5.10.0-test".into(),
            btf: true,
            kprobes: false,
        };
        let kmalloc = Attachment {
            program: "kmalloc",
            hook: Hook::Classic,
            system: "kmem",
            event: "kmalloc",
        };
        let note = hooks_note(&features, &[kmalloc], false);
        assert!(note.contains("no kprobes"), "{note}");
        assert!(note.contains("tracepoints kmem:kmalloc (no BTF"), "{note}");
        assert!(note.contains("kernel 5.10.0-test"), "{note}");
    }

    #[test]
    fn live_slots_hold_twice_the_objects_in_buckets_of_ways() {
        let ways = tracer_common::slab::LIVE_WAYS as u64;
        // 65,536 objects: 131,072 slots in 32,768 buckets.
        assert_eq!(live_bucket_mask(65_536, true), 131_072 / ways - 1);
        // Not a power of two: rounded up first, so never fewer slots than 2x.
        let mask = live_bucket_mask(100_000, true);
        assert!((mask + 1) * ways >= 200_000, "{mask}");
        assert!((mask + 1).is_power_of_two(), "{mask}");
        // Degenerate sizes still give two buckets, and no slots without cmpxchg.
        assert_eq!(live_bucket_mask(0, true), 1);
        assert_eq!(live_bucket_mask(1, true), 1);
        assert_eq!(live_bucket_mask(1_048_576, false), 0);
    }

    #[test]
    fn live_overflow_holds_everything_only_without_slots() {
        assert_eq!(live_overflow_entries(1_048_576, 0), 1_048_576);
        assert_eq!(live_overflow_entries(1_048_576, 524_287), 131_072);
        assert_eq!(live_overflow_entries(65_536, 32_767), 8_192);
    }
}
