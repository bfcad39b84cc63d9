//! What `leaktrace memcg` attaches on *this* kernel: `MemcgConfig` from the
//! running kernel's tracefs formats and BTF, the `cgroup:*` tracepoints
//! (every kernel), the `kmem:*` ones for pins, and kprobes where the kernel
//! facts allow them. Loading and attaching the plan is `hooks.rs`.

use anyhow::{bail, Context, Result};
use tracer_common::memcg::{CgroupLayout, KmemLayout, MemcgConfig, PercpuLayout};

use crate::{
    kernel::btf::Btf,
    kernel::cgroupfs::Hierarchy,
    kernel::facts::KernelFacts,
    kernel::features::kernel_has_symbol,
    kernel::tracefs::{EventFormat, Tracefs},
};

/// What was decided, for the one-line mode report and for attaching.
pub struct Plan {
    pub config: MemcgConfig,
    /// (program, system, event)
    pub attachments: Vec<(&'static str, &'static str, &'static str)>,
    /// (program, event) raw tracepoints.
    pub raw_attachments: Vec<(&'static str, &'static str)>,
    /// (program, kernel function) kprobes, where the kernel has them.
    pub kprobes: Vec<(&'static str, &'static str)>,
    /// How a charge is attributed to a memcg, or why pins are off.
    pub attribution: String,
    pub notes: Vec<String>,
}

impl Plan {
    /// The per-CPU programs are attached: the memcgs made under tracing get
    /// measured per-CPU shares.
    pub fn percpu(&self) -> bool {
        self.config.percpu.enabled != 0
    }

    /// Leaves the per-CPU programs out (`why`: a note for the user).
    pub fn drop_percpu(&mut self, why: &str) {
        if self.percpu() {
            self.config.percpu.enabled = 0;
            self.attachments
                .retain(|&(_, system, _)| system != "percpu");
            self.notes.push(why.to_string());
        }
    }
}

/// The kernel has kprobes (`KernelFacts`) and kallsyms names the functions
/// the memcg kprobes attach to.
pub fn kprobes_usable(facts: &KernelFacts) -> bool {
    facts.features.kprobes
        && ["mem_cgroup_css_offline", "mem_cgroup_css_free"]
            .iter()
            .all(|f| kernel_has_symbol(f))
}

pub struct PlanOptions {
    pub pins: bool,
    pub stacks: bool,
    pub all_hierarchies: bool,
    /// The kernel has kprobes and the mem_cgroup_css_* functions in kallsyms.
    pub kprobes: bool,
}

fn cgroup_layout(f: &EventFormat) -> Result<CgroupLayout> {
    Ok(CgroupLayout {
        root: f.offset_of("root", 4)?,
        level: f.offset_of("level", 4)?,
        id: f.offset_of("id", 8)?,
        path: f.data_loc_offset("path")?,
    })
}

fn kmem_layout(f: &EventFormat) -> Result<KmemLayout> {
    let opt = |name: &str, size: u16| f.field(name).filter(|x| x.size == size).map(|x| x.offset);
    Ok(KmemLayout {
        ptr: f.offset_of("ptr", 8)?,
        bytes_alloc: f.offset_of("bytes_alloc", 8)?,
        // 4 or 8 bytes: the program reads the low 32, where every GFP bit is.
        gfp_flags: f.required("gfp_flags")?.offset,
        call_site: opt("call_site", 8).unwrap_or(0),
        name: f
            .field("name")
            .filter(|x| x.data_loc && !x.rel_loc)
            .map_or(0, |x| x.offset),
        accounted: opt("accounted", 1).unwrap_or(0),
        _pad: [0; 2],
    })
}

/// The `percpu:*` offsets, or None where the kernel lacks the events.
fn percpu_layout(tracefs: &Tracefs) -> Result<Option<PercpuLayout>> {
    let (Some(alloc), Some(free)) = (
        tracefs.event_format("percpu", "percpu_alloc_percpu")?,
        tracefs.event_format("percpu", "percpu_free_percpu")?,
    ) else {
        return Ok(None);
    };
    Ok(Some(PercpuLayout {
        enabled: 1,
        _pad: 0,
        alloc_size: alloc
            .offset_of("size", 8)
            .context("reading percpu:percpu_alloc_percpu")?,
        alloc_ptr: alloc
            .offset_of("ptr", 8)
            .context("reading percpu:percpu_alloc_percpu")?,
        free_ptr: free
            .offset_of("ptr", 8)
            .context("reading percpu:percpu_free_percpu")?,
    }))
}

pub fn build(
    tracefs: &Tracefs,
    btf: Option<&Btf>,
    hierarchy: &Hierarchy,
    opts: &PlanOptions,
) -> Result<Plan> {
    let mut cfg = MemcgConfig::zeroed();
    let mut notes = Vec::new();
    let mut layouts = Vec::new();
    for event in ["cgroup_mkdir", "cgroup_rmdir", "cgroup_release"] {
        let f = tracefs
            .event_format("cgroup", event)?
            .with_context(|| format!("this kernel has no cgroup:{event} tracepoint"))?;
        layouts.push(cgroup_layout(&f).with_context(|| format!("reading cgroup:{event}"))?);
    }
    if layouts.windows(2).any(|w| w[0] != w[1]) {
        bail!("cgroup_mkdir/rmdir/release records differ in layout on this kernel; one program cannot read all three");
    }
    cfg.cgroup = layouts[0];
    cfg.hierarchy = hierarchy.id;
    cfg.filter_hierarchy = u32::from(!opts.all_hierarchies);
    cfg.root_memcg_id = hierarchy.root_id();
    let mut attachments = vec![
        ("memcg_mkdir", "cgroup", "cgroup_mkdir"),
        ("memcg_rmdir", "cgroup", "cgroup_rmdir"),
        ("memcg_release", "cgroup", "cgroup_release"),
    ];

    // Parent of the acting task: optional, only improves the ancestry.
    crate::kernel::task_offsets::set_identity(btf, &mut cfg.task);

    // css -> cgroup id: used by the kprobes and by the charge attribution walk.
    let walk = crate::kernel::task_offsets::memcg_walk(btf);
    if let Some(w) = walk {
        cfg.task.css_cgroup = w.css_cgroup;
        cfg.task.cgroup_kn = w.cgroup_kn;
        cfg.task.kn_id = w.kn_id;
    }
    let mut kprobes = Vec::new();
    if opts.kprobes && walk.is_some() {
        kprobes.push(("memcg_css_offline", "mem_cgroup_css_offline"));
        kprobes.push(("memcg_css_free", "mem_cgroup_css_free"));
    }
    let attribution = if !opts.pins {
        "pins off (--no-pins)".to_string()
    } else {
        match walk {
            Some(w) => {
                let mem_id = w.memory_subsys;
                cfg.task = crate::kernel::task_offsets::combined(w, &cfg.task);
                format!(
                    "charges attributed to task->cgroups->subsys[memory_cgrp_id={mem_id}]->cgroup (BTF offsets)"
                )
            }
            None if hierarchy.version == 2 => {
                cfg.task.memcg_from_cgroup2 = 1;
                "charges attributed to the task's cgroup2 id (no BTF for the css walk: \
                 a task in a cgroup without its own memcg is attributed to that cgroup)"
                    .to_string()
            }
            None => {
                notes.push(
                    "pins off: without BTF the task's v1 memory cgroup cannot be read in the kernel"
                        .into(),
                );
                "pins off (no BTF)".to_string()
            }
        }
    };
    let pins = opts.pins && (cfg.task.task_cgroups != 0 || cfg.task.memcg_from_cgroup2 != 0);
    if pins {
        cfg.pins = 1;
        cfg.stacks = u32::from(opts.stacks);
        let fmt = |e: &str| -> Result<Option<EventFormat>> { Ok(tracefs.event_format("kmem", e)?) };
        let kmalloc = fmt("kmalloc")?.context("this kernel has no kmem:kmalloc tracepoint")?;
        let cache = fmt("kmem_cache_alloc")?
            .context("this kernel has no kmem:kmem_cache_alloc tracepoint")?;
        cfg.kmalloc = kmem_layout(&kmalloc)?;
        cfg.cache_alloc = kmem_layout(&cache)?;
        cfg.gfp_account = kmalloc.print_flag("__GFP_ACCOUNT").unwrap_or(0);
        if cfg.gfp_account == 0 {
            notes.push(
                "__GFP_ACCOUNT not found in kmem:kmalloc's format: kmalloc charges are not seen"
                    .into(),
            );
        }
        if cfg.cache_alloc.accounted == 0 {
            notes.push(
                "kmem:kmem_cache_alloc has no 'accounted' field (before 6.0): objects of SLAB_ACCOUNT \
                 caches (dentry, inode, filp...) are not seen, only __GFP_ACCOUNT allocations"
                    .into(),
            );
        }
        cfg.kfree_ptr = fmt("kfree")?
            .context("no kmem:kfree")?
            .offset_of("ptr", 8)?;
        cfg.cache_free_ptr = fmt("kmem_cache_free")?
            .context("no kmem:kmem_cache_free")?
            .offset_of("ptr", 8)?;
        attachments.push(("memcg_kmalloc", "kmem", "kmalloc"));
        attachments.push(("memcg_cache_alloc", "kmem", "kmem_cache_alloc"));
        // Kernels before 6.1 have separate *_node events; the programs read
        // them with the base event's offsets, so attach only where they agree.
        for (prog, base, node, layout) in [
            ("memcg_kmalloc", "kmalloc", "kmalloc_node", cfg.kmalloc),
            (
                "memcg_cache_alloc",
                "kmem_cache_alloc",
                "kmem_cache_alloc_node",
                cfg.cache_alloc,
            ),
        ] {
            if let Some(f) = fmt(node)? {
                if kmem_layout(&f).ok() == Some(layout) {
                    attachments.push((prog, "kmem", node));
                } else {
                    notes.push(format!(
                        "kmem:{node} differs from kmem:{base}: not attached"
                    ));
                }
            }
        }
        attachments.push(("memcg_kfree", "kmem", "kfree"));
        attachments.push(("memcg_cache_free", "kmem", "kmem_cache_free"));
    }
    let mut raw_attachments = Vec::new();
    match percpu_layout(tracefs)? {
        Some(layout) => {
            // Raw tracepoints: a classic tracepoint program is skipped while
            // any BPF program or map syscall runs on the CPU
            // (`bpf_prog_active`), and per-CPU frees come from RCU callbacks
            // that interrupt exactly those. One program per argument layout.
            let pos = |event: &str, arg: &str| -> Option<usize> {
                btf?.tracepoint_args(event)?.iter().position(|a| a == arg)
            };
            let alloc = match (
                pos("percpu_alloc_percpu", "size"),
                pos("percpu_alloc_percpu", "ptr"),
            ) {
                (Some(2), Some(6)) => Some("memcg_percpu_alloc_raw26"),
                (Some(3), Some(7)) => Some("memcg_percpu_alloc_raw37"),
                _ => None,
            };
            let free = pos("percpu_free_percpu", "ptr") == Some(2);
            match alloc.filter(|_| free) {
                Some(alloc) => {
                    raw_attachments.push((alloc, "percpu_alloc_percpu"));
                    raw_attachments.push(("memcg_percpu_free_raw", "percpu_free_percpu"));
                }
                None => {
                    notes.push(
                        "percpu raw tracepoints not described by BTF as expected: classic ones, \
                         which miss events while another BPF program runs on the CPU"
                            .into(),
                    );
                    attachments.push(("memcg_percpu_alloc", "percpu", "percpu_alloc_percpu"));
                    attachments.push(("memcg_percpu_free", "percpu", "percpu_free_percpu"));
                }
            }
            cfg.percpu = layout;
        }
        None => notes.push(
            "no percpu:percpu_alloc_percpu/percpu_free_percpu tracepoints: per-CPU shares are estimated only"
                .into(),
        ),
    }
    Ok(Plan {
        config: cfg,
        attachments,
        raw_attachments,
        kprobes,
        attribution,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixture(kernel: &str) -> Tracefs {
        Tracefs::at(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("testdata/formats/{kernel}")),
        )
    }

    #[test]
    fn plans_on_every_fixture_kernel() {
        let h = Hierarchy {
            version: 1,
            id: 4,
            mount: PathBuf::from("/nonexistent"),
            seen_as: "/nonexistent".into(),
        };
        for kernel in ["5.10", "6.1", "6.12", "6.18"] {
            let opts = PlanOptions {
                pins: false,
                stacks: false,
                all_hierarchies: false,
                kprobes: true,
            };
            let plan = build(&fixture(kernel), None, &h, &opts).expect(kernel);
            assert_eq!(
                plan.config.cgroup,
                CgroupLayout {
                    root: 8,
                    level: 12,
                    id: 16,
                    path: 24
                },
                "{kernel}"
            );
            assert_eq!(plan.config.hierarchy, 4);
            assert_eq!(plan.config.filter_hierarchy, 1);
            let percpu = plan.config.percpu;
            assert_eq!(
                plan.attachments.len(),
                if percpu.enabled != 0 { 5 } else { 3 },
                "{kernel}"
            );
            if percpu.enabled != 0 {
                assert!(percpu.alloc_size != 0 && percpu.alloc_ptr != 0 && percpu.free_ptr != 0);
            }
            assert!(plan.kprobes.is_empty(), "no BTF, no css -> cgroup id walk");
        }
    }

    #[test]
    fn percpu_layout_from_the_running_kernels_format() {
        let l = percpu_layout(&fixture("6.18"))
            .expect("readable")
            .expect("6.18 has the percpu events");
        assert_eq!((l.alloc_size, l.alloc_ptr, l.free_ptr), (24, 56, 24));
        // 5.10 has no call_site, bytes_alloc or gfp_flags before size.
        let l = percpu_layout(&fixture("5.10"))
            .expect("readable")
            .expect("5.10 has the percpu events");
        assert_eq!((l.alloc_size, l.alloc_ptr, l.free_ptr), (16, 48, 24));
    }

    #[test]
    fn kmem_layouts_know_accounted_where_it_exists() {
        for (kernel, accounted) in [
            ("5.10", false),
            ("6.1", true),
            ("6.12", true),
            ("6.18", true),
        ] {
            let t = fixture(kernel);
            let f = t
                .event_format("kmem", "kmem_cache_alloc")
                .expect("readable")
                .expect("present");
            let l = kmem_layout(&f).expect(kernel);
            assert_eq!(l.accounted != 0, accounted, "{kernel}");
            assert_eq!(l.name != 0, kernel == "6.18", "{kernel}");
            assert_ne!(l.ptr, 0);
        }
    }
}
