//! Every memory cgroup the kernel still has, dying ones included, read from
//! kernel memory ([`Kread`]) at BTF offsets of the running kernel, the way
//! drgn walks cgroups: from our own task's memory css up its `parent` chain to
//! the root memcg, then down `css.children` / `css.sibling`. A css stays on
//! its parent's children list after rmdir until it is released
//! (`css_release_work_fn`), so offline-but-unreleased memcgs are all there.
//!
//! Per memcg: `css.flags` (CSS_ONLINE clear = offline), the cgroup's kernfs
//! name and id (`cgroup->kn`, kept until the cgroup is freed), the page
//! counters (`memory`, `swap`/`memsw`, v1 `kmem`) and the per-item page stats
//! (`vmstats->state_local[]`: file, shmem, anon, swap, kernel). The stats are
//! the rstat-flushed values: updates not yet flushed (under ~64 pages per CPU)
//! lag.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::kread::{read_strings, u32_at, u64_at, Kread};
use crate::kernel::btf::{Btf, Shape};

/// The first entries of `memcg_node_stat_items[]` (mm/memcontrol.c), the
/// order of the compacted `memcg_vmstats.state[]` on kernels from 6.11 (where
/// that array is shorter than MEMCG_NR_STAT). This prefix has not changed
/// since the compaction; later kernels append or insert after NR_SHMEM only.
const COMPACT_NODE_PREFIX: [&str; 20] = [
    "NR_INACTIVE_ANON",
    "NR_ACTIVE_ANON",
    "NR_INACTIVE_FILE",
    "NR_ACTIVE_FILE",
    "NR_UNEVICTABLE",
    "NR_SLAB_RECLAIMABLE_B",
    "NR_SLAB_UNRECLAIMABLE_B",
    "WORKINGSET_REFAULT_ANON",
    "WORKINGSET_REFAULT_FILE",
    "WORKINGSET_ACTIVATE_ANON",
    "WORKINGSET_ACTIVATE_FILE",
    "WORKINGSET_RESTORE_ANON",
    "WORKINGSET_RESTORE_FILE",
    "WORKINGSET_NODERECLAIM",
    "NR_ANON_MAPPED",
    "NR_FILE_MAPPED",
    "NR_FILE_PAGES",
    "NR_FILE_DIRTY",
    "NR_WRITEBACK",
    "NR_SHMEM",
];

/// Upper bound on memcgs walked (the kernel's memcg id space is 65,535 on
/// v1 and the css id space is larger; a walk past this is a corrupt read).
const MAX_MEMCGS: usize = 1 << 20;

/// Where the page stats live.
#[derive(Debug, Clone)]
enum StatsAt {
    /// `mem_cgroup.vmstats` is a pointer (6.8+) to a struct with the array at `array`.
    Pointer { member: u64, array: u64 },
    /// The array is inside `mem_cgroup` at this offset (5.10-6.7).
    Inline { array: u64 },
}

#[derive(Debug, Clone)]
struct StatLayout {
    at: StatsAt,
    /// Elements in the array.
    len: usize,
    /// "state_local" (this memcg only) or "state" (includes descendants).
    array_name: String,
    file: Option<usize>,
    shmem: Option<usize>,
    anon: Option<usize>,
    swap: Option<usize>,
    kernel: Option<usize>,
    dirty: Option<usize>,
    writeback: Option<usize>,
}

#[derive(Debug, Clone)]
enum RefCount {
    Behind { data: u64, count: u64 },
    Inline { count: u64 },
    Unknown,
}

#[derive(Debug, Clone)]
struct Layout {
    task_cgroups: u64,
    css_set_subsys: u64,
    memory_subsys: u64,
    css_cgroup: u64,
    css_ss: u64,
    css_sibling: u64,
    css_children: u64,
    css_flags: u64,
    css_parent: u64,
    /// Bytes of a css we read at once (covers every field above).
    css_span: usize,
    /// `css.refcnt.percpu_count_ptr` (bit 0: atomic mode, as after kill) and
    /// where the atomic count is: `css.refcnt.data->count` (5.9+) or
    /// `css.refcnt.count` (inline, before).
    css_ref_mode: u64,
    css_ref_count: RefCount,
    memcg_css: u64,
    memcg_id: Option<u64>,
    memory_usage: u64,
    /// `swap` (v2 semantics: swap only) and `memsw` (v1: memory + swap) share a union.
    swap_usage: Option<u64>,
    kmem_usage: Option<u64>,
    cgroup_kn: u64,
    kn_name: u64,
    kn_id: u64,
    css_online: u64,
    css_released: Option<u64>,
    css_dying: Option<u64>,
    stats: std::result::Result<StatLayout, String>,
}

fn off(btf: &Btf, s: &str, m: &str) -> Result<u64> {
    btf.member(s, m)
        .map(|m| u64::from(m.offset))
        .with_context(|| format!("no {s}.{m} in this kernel's BTF"))
}

impl Layout {
    fn from_btf(btf: &Btf) -> Result<Layout> {
        let usage = off(btf, "page_counter", "usage")?;
        let counter = |m: &str| {
            btf.member("mem_cgroup", m)
                .filter(
                    |x| matches!(&x.shape, Shape::Struct { name, .. } if name == "page_counter"),
                )
                .map(|x| u64::from(x.offset) + usage)
        };
        let fields = [
            ("cgroup", "css_cgroup"),
            ("ss", "css_ss"),
            ("sibling", "css_sibling"),
            ("children", "css_children"),
            ("flags", "css_flags"),
            ("parent", "css_parent"),
        ];
        let mut css = [0u64; 6];
        for (i, (m, _)) in fields.iter().enumerate() {
            css[i] = off(btf, "cgroup_subsys_state", m)?;
        }
        let refcnt = off(btf, "cgroup_subsys_state", "refcnt")?;
        let css_ref_mode = refcnt + off(btf, "percpu_ref", "percpu_count_ptr")?;
        let css_ref_count = match (
            btf.member("percpu_ref", "data"),
            btf.member("percpu_ref_data", "count"),
            btf.member("percpu_ref", "count"),
        ) {
            (Some(d), Some(c), _) => RefCount::Behind {
                data: refcnt + u64::from(d.offset),
                count: u64::from(c.offset),
            },
            (None, _, Some(c)) => RefCount::Inline {
                count: refcnt + u64::from(c.offset),
            },
            _ => RefCount::Unknown,
        };
        let css_span = (css
            .iter()
            .copied()
            .chain([css_ref_mode])
            .chain(match css_ref_count {
                RefCount::Behind { data, .. } => Some(data),
                RefCount::Inline { count } => Some(count),
                RefCount::Unknown => None,
            })
            .max()
            .unwrap_or(0)
            + 8) as usize;
        let kn_name = off(btf, "kernfs_node", "name")?;
        let kn_id = off(btf, "kernfs_node", "id")?;
        Ok(Layout {
            task_cgroups: off(btf, "task_struct", "cgroups")?,
            css_set_subsys: off(btf, "css_set", "subsys")?,
            memory_subsys: u64::from(
                btf.enum_value("cgroup_subsys_id", "memory_cgrp_id")
                    .context("no memory_cgrp_id in this kernel's BTF (no memory controller)")?,
            ),
            css_cgroup: css[0],
            css_ss: css[1],
            css_sibling: css[2],
            css_children: css[3],
            css_flags: css[4],
            css_parent: css[5],
            css_span,
            css_ref_mode,
            css_ref_count,
            memcg_css: off(btf, "mem_cgroup", "css")?,
            memcg_id: btf.member("mem_cgroup", "id").and_then(|m| {
                Some(u64::from(m.offset) + u64::from(btf.member("mem_cgroup_id", "id")?.offset))
            }),
            memory_usage: counter("memory").context("no mem_cgroup.memory page counter in BTF")?,
            swap_usage: counter("swap").or_else(|| counter("memsw")),
            kmem_usage: counter("kmem"),
            cgroup_kn: off(btf, "cgroup", "kn")?,
            kn_name,
            kn_id,
            css_online: u64::from(
                btf.enumerator("CSS_ONLINE")
                    .context("no CSS_ONLINE in BTF")?,
            ),
            css_released: btf.enumerator("CSS_RELEASED").map(u64::from),
            css_dying: btf.enumerator("CSS_DYING").map(u64::from),
            stats: StatLayout::from_btf(btf),
        })
    }
}

impl StatLayout {
    fn from_btf(btf: &Btf) -> std::result::Result<StatLayout, String> {
        let vm = btf
            .member("mem_cgroup", "vmstats")
            .ok_or("no mem_cgroup.vmstats in BTF")?;
        let nr_stat = btf
            .enum_value("memcg_stat_item", "MEMCG_NR_STAT")
            .ok_or("no MEMCG_NR_STAT in BTF")? as usize;
        let first_memcg = btf
            .enum_value("memcg_stat_item", "MEMCG_SWAP")
            .ok_or("no MEMCG_SWAP in BTF")? as usize;
        let find_array = |strukt: &str| -> Option<(String, u64, usize)> {
            ["state_local", "state"].iter().find_map(|a| {
                let m = btf.member(strukt, a)?;
                match m.shape {
                    Shape::Array { elem_size: 8, len } => {
                        Some((a.to_string(), u64::from(m.offset), len as usize))
                    }
                    _ => None,
                }
            })
        };
        let (at, array_name, len) = match &vm.shape {
            Shape::Pointer => {
                let (name, array, len) = find_array("memcg_vmstats")
                    .ok_or("no memcg_vmstats.state[] of 8-byte counters in BTF")?;
                (
                    StatsAt::Pointer {
                        member: u64::from(vm.offset),
                        array,
                    },
                    name,
                    len,
                )
            }
            Shape::Struct { name, .. } => {
                let (aname, array, len) = find_array(name)
                    .ok_or_else(|| format!("no {name}.state[] of 8-byte counters in BTF"))?;
                (
                    StatsAt::Inline {
                        array: u64::from(vm.offset) + array,
                    },
                    aname,
                    len,
                )
            }
            // 5.10-5.12: atomic_long_t vmstats[MEMCG_NR_STAT], hierarchical.
            Shape::Array { elem_size: 8, len } => (
                StatsAt::Inline {
                    array: u64::from(vm.offset),
                },
                "vmstats".to_string(),
                *len as usize,
            ),
            other => return Err(format!("mem_cgroup.vmstats has an unknown shape {other:?}")),
        };
        let memcg_items = nr_stat.saturating_sub(first_memcg);
        let index = |item: &str| -> Option<usize> {
            if let Some(v) = btf.enum_value("memcg_stat_item", item) {
                let v = v as usize;
                return if len == nr_stat {
                    Some(v)
                } else {
                    // memcg_stat_items[] follows the enum's order at the array's end.
                    (len.checked_sub(memcg_items)? + (v - first_memcg)).into()
                };
            }
            if len == nr_stat {
                btf.enum_value("node_stat_item", item).map(|v| v as usize)
            } else {
                COMPACT_NODE_PREFIX.iter().position(|&n| n == item)
            }
        };
        if len != nr_stat && len < COMPACT_NODE_PREFIX.len() + memcg_items {
            return Err(format!(
                "memcg stats array has {len} entries, fewer than the known compact layout needs"
            ));
        }
        Ok(StatLayout {
            at,
            len,
            array_name,
            file: index("NR_FILE_PAGES"),
            shmem: index("NR_SHMEM"),
            anon: index("NR_ANON_MAPPED"),
            swap: index("MEMCG_SWAP"),
            kernel: index("MEMCG_KMEM"),
            dirty: index("NR_FILE_DIRTY"),
            writeback: index("NR_WRITEBACK"),
        })
    }
}

/// One memory cgroup as the kernel holds it now.
#[derive(Debug, Clone, Serialize)]
pub struct KMemcg {
    /// The cgroup's kernfs id (the id of the cgroup tracepoints and of file handles).
    pub id: u64,
    /// The memcg's own id (`mem_cgroup.id`, at most 65,535: swap records use it).
    pub memcg_id: Option<u32>,
    /// Path from the hierarchy's root, as named when the memcg was last online.
    pub path: String,
    pub level: u32,
    pub online: bool,
    /// Offline (rmdir'd) but not released: a dying memcg.
    pub dying: bool,
    /// Released: on its way to being freed (seen only in a race).
    pub released: bool,
    /// Page counters, in pages.
    pub usage_pages: Option<u64>,
    /// `swap` counter (v2: swap) or `memsw` (v1: memory + swap).
    pub swap_counter_pages: Option<u64>,
    /// cgroup v1 `kmem` counter.
    pub kmem_counter_pages: Option<u64>,
    /// Per-item page stats (flushed values).
    pub file: Option<i64>,
    pub shmem: Option<i64>,
    pub anon: Option<i64>,
    pub swap: Option<i64>,
    pub kernel: Option<i64>,
    pub dirty: Option<i64>,
    pub writeback: Option<i64>,
    /// References on its css (`css.refcnt`), readable once the ref is in atomic
    /// mode, as it is for a removed memcg. On 5.x-6.x each charged folio holds
    /// one; the rest are other holders (swap records, sockets, fsnotify, ...).
    pub css_refs: Option<i64>,
    /// What its LRU pages are, by file (dying memcgs only; see `pins.rs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page_pins: Option<super::pins::PagePins>,
    /// The `mem_cgroup` address, for further reads.
    #[serde(skip)]
    pub addr: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct KernelWalk {
    pub memcgs: Vec<KMemcg>,
    pub walk_ms: f64,
    /// BPF program runs and 256-byte reads the walk took.
    pub runs: u64,
    pub reads: u64,
    /// Entries whose css did not look like a memory css (freed during the walk).
    pub dropped: u64,
    /// Which stats array the per-item pages come from, or why there are none.
    pub stats_source: String,
    /// Why dying memcgs have no `page_pins`, where they have none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page_pins_unknown: Option<String>,
    pub page_pins_ms: f64,
    /// BPF program runs and reads the page-cache walk took.
    pub page_pins_runs: u64,
    pub page_pins_reads: u64,
}

impl KernelWalk {
    pub fn dying(&self) -> impl Iterator<Item = &KMemcg> {
        self.memcgs.iter().filter(|m| m.dying)
    }
}

struct Node {
    css: u64,
    /// Address of the atomic count, when the css ref is in atomic mode.
    ref_count_at: Option<u64>,
    parent: Option<usize>,
    level: u32,
    flags: u32,
    cgroup: u64,
}

pub fn walk(btf: &Btf, kread: &mut Kread) -> Result<KernelWalk> {
    let lay = Layout::from_btf(btf)?;
    let start = Instant::now();
    let (runs0, slots0) = (kread.runs, kread.slots);

    // Our own task -> css_set -> memory css -> parents -> the root memcg's css.
    let cset = kread.read_u64s(&[kread.self_task + lay.task_cgroups])?[0]
        .filter(|&p| p != 0)
        .context("reading task_struct.cgroups of our own task")?;
    let mut css = kread.read_u64s(&[cset + lay.css_set_subsys + 8 * lay.memory_subsys])?[0]
        .filter(|&p| p != 0)
        .context("reading css_set.subsys[memory] of our own task")?;
    for _ in 0..256 {
        match kread.read_u64s(&[css + lay.css_parent])?[0] {
            Some(0) => break,
            Some(p) => css = p,
            None => bail!("reading css.parent at {css:#x} failed"),
        }
    }
    let root = css;
    let ss = kread.read_u64s(&[root + lay.css_ss])?[0].context("reading the root css's ss")?;

    let mut nodes: Vec<Node> = Vec::new();
    let mut seen: HashSet<u64> = HashSet::new();
    let mut dropped = 0u64;
    // Level by level: each parent's whole children list is followed in the
    // kernel (`Kread::follow`), then the children's css fields read in batches.
    let mut level: Vec<(u64, Option<usize>)> = vec![(root, None)];
    while !level.is_empty() {
        let reqs: Vec<(u64, usize)> = level.iter().map(|&(c, _)| (c, lay.css_span)).collect();
        let chunks = kread.read(&reqs)?;
        let mut parents: Vec<usize> = Vec::new();
        for (&(c, parent), chunk) in level.iter().zip(chunks) {
            let Some(b) = chunk else {
                dropped += 1;
                continue;
            };
            if u64_at(&b, lay.css_ss as usize) != Some(ss) || !seen.insert(c) {
                dropped += 1;
                continue;
            }
            if nodes.len() >= MAX_MEMCGS {
                bail!("more than {MAX_MEMCGS} memcgs walked: the walk is reading garbage");
            }
            let atomic = u64_at(&b, lay.css_ref_mode as usize).is_some_and(|p| p & 1 != 0);
            let ref_count_at = match lay.css_ref_count {
                RefCount::Behind { data, count } => u64_at(&b, data as usize)
                    .filter(|&d| d >> 56 == 0xff)
                    .map(|d| d + count),
                RefCount::Inline { count } => Some(c + count),
                RefCount::Unknown => None,
            }
            .filter(|_| atomic);
            parents.push(nodes.len());
            nodes.push(Node {
                css: c,
                ref_count_at,
                parent,
                level: parent.map_or(0, |p| nodes[p].level + 1),
                flags: u32_at(&b, lay.css_flags as usize).unwrap_or(0),
                cgroup: u64_at(&b, lay.css_cgroup as usize).unwrap_or(0),
            });
        }
        let starts: Vec<(u64, u64)> = parents
            .iter()
            .map(|&p| {
                let head = nodes[p].css + lay.css_children;
                (head, head)
            })
            .collect();
        let lists = kread.follow(&starts, MAX_MEMCGS)?;
        level = Vec::new();
        for (&p, (children, complete)) in parents.iter().zip(lists) {
            if !complete {
                // A list that changed under us: what was read is kept.
                dropped += 1;
            }
            level.extend(children.into_iter().map(|n| (n - lay.css_sibling, Some(p))));
        }
    }

    // Counters and stats, then names: a few batched rounds for all memcgs.
    let memcg_of = |n: &Node| n.css - lay.memcg_css;
    let mut reqs: Vec<(u64, usize)> = Vec::new();
    for n in &nodes {
        let m = memcg_of(n);
        reqs.push((m + lay.memory_usage, 8));
        reqs.push((lay.swap_usage.map_or(0, |o| m + o), 8));
        reqs.push((lay.kmem_usage.map_or(0, |o| m + o), 8));
        reqs.push((lay.memcg_id.map_or(0, |o| m + o), 4));
        reqs.push((n.cgroup + lay.cgroup_kn, 8));
        match &lay.stats {
            Ok(StatLayout {
                at: StatsAt::Pointer { member, .. },
                ..
            }) => reqs.push((m + member, 8)),
            Ok(
                s @ StatLayout {
                    at: StatsAt::Inline { array },
                    ..
                },
            ) => reqs.push((m + array, 8 * s.len)),
            Err(_) => reqs.push((0, 8)),
        }
    }
    let first = kread.read(&reqs)?;
    const PER: usize = 6;
    let word = |i: usize, k: usize| first[i * PER + k].as_ref().and_then(|b| u64_at(b, 0));

    let mut reqs2: Vec<(u64, usize)> = Vec::new();
    for i in 0..nodes.len() {
        let kn = word(i, 4).unwrap_or(0);
        reqs2.push((if kn == 0 { 0 } else { kn + lay.kn_name }, 8));
        reqs2.push((if kn == 0 { 0 } else { kn + lay.kn_id }, 8));
        match &lay.stats {
            Ok(
                s @ StatLayout {
                    at: StatsAt::Pointer { array, .. },
                    ..
                },
            ) => {
                let vm = word(i, 5).unwrap_or(0);
                reqs2.push((if vm == 0 { 0 } else { vm + array }, 8 * s.len));
            }
            _ => reqs2.push((0, 0)),
        }
    }
    let second = kread.read(&reqs2)?;
    let names_at: Vec<u64> = (0..nodes.len())
        .map(|i| {
            second[i * 3]
                .as_ref()
                .and_then(|b| u64_at(b, 0))
                .unwrap_or(0)
        })
        .collect();
    let names = read_strings(kread, &names_at)?;
    let refs = kread.read_u64s(
        &nodes
            .iter()
            .map(|n| n.ref_count_at.unwrap_or(0))
            .collect::<Vec<_>>(),
    )?;

    let mut out: Vec<KMemcg> = Vec::with_capacity(nodes.len());
    for (i, n) in nodes.iter().enumerate() {
        let stats: Option<&Vec<u8>> = match &lay.stats {
            Ok(StatLayout {
                at: StatsAt::Pointer { .. },
                ..
            }) => second[i * 3 + 2].as_ref(),
            Ok(_) => first[i * PER + 5].as_ref(),
            Err(_) => None,
        };
        let item = |idx: Option<usize>| -> Option<i64> {
            let b = stats?;
            u64_at(b, idx? * 8).map(|v| v as i64)
        };
        let s = lay.stats.as_ref().ok();
        let path = match n.parent {
            None => "/".to_string(),
            Some(p) => {
                let parent: &str = &out[p].path;
                let name = names[i]
                    .clone()
                    .unwrap_or_else(|| format!("?css@{:#x}", n.css));
                if parent == "/" {
                    format!("/{name}")
                } else {
                    format!("{parent}/{name}")
                }
            }
        };
        let flags = u64::from(n.flags);
        let online = flags & lay.css_online != 0;
        let dying_flag = lay.css_dying.is_some_and(|d| flags & d != 0);
        out.push(KMemcg {
            id: second[i * 3 + 1]
                .as_ref()
                .and_then(|b| u64_at(b, 0))
                .unwrap_or(0),
            memcg_id: lay
                .memcg_id
                .and(first[i * PER + 3].as_ref())
                .and_then(|b| u32_at(b, 0)),
            path,
            level: n.level,
            online: online && !dying_flag,
            dying: n.parent.is_some() && (!online || dying_flag),
            released: lay.css_released.is_some_and(|r| flags & r != 0),
            usage_pages: word(i, 0),
            swap_counter_pages: lay.swap_usage.and(word(i, 1)),
            kmem_counter_pages: lay.kmem_usage.and(word(i, 2)),
            file: item(s.and_then(|s| s.file)),
            shmem: item(s.and_then(|s| s.shmem)),
            anon: item(s.and_then(|s| s.anon)),
            swap: item(s.and_then(|s| s.swap)),
            kernel: item(s.and_then(|s| s.kernel)),
            dirty: item(s.and_then(|s| s.dirty)),
            writeback: item(s.and_then(|s| s.writeback)),
            css_refs: n.ref_count_at.and(refs[i]).map(|v| v as i64),
            page_pins: None,
            addr: memcg_of(n),
        });
    }
    let stats_source = match &lay.stats {
        Ok(s) => format!(
            "memcg_vmstats.{}[{}] ({}; rstat-flushed values, may lag by unflushed per-CPU updates)",
            s.array_name,
            s.len,
            if s.len
                == btf
                    .enum_value("memcg_stat_item", "MEMCG_NR_STAT")
                    .unwrap_or(0) as usize
            {
                "indexed by enum node_stat_item/memcg_stat_item"
            } else {
                "compacted index, 6.11+ layout"
            }
        ),
        Err(e) => format!("unknown on this kernel: {e}"),
    };
    Ok(KernelWalk {
        memcgs: out,
        walk_ms: duration_ms(start.elapsed()),
        runs: kread.runs - runs0,
        reads: kread.slots - slots0,
        dropped,
        stats_source,
        page_pins_unknown: None,
        page_pins_ms: 0.0,
        page_pins_runs: 0,
        page_pins_reads: 0,
    })
}

pub(super) fn duration_ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_of_the_running_kernel() {
        let btf = Btf::from_sys_fs().expect("this machine has BTF");
        let lay = Layout::from_btf(&btf).expect("layout");
        assert!(
            lay.css_span <= 512,
            "css fields within {} bytes",
            lay.css_span
        );
        let s = lay.stats.expect("stats layout");
        assert!(s.shmem.is_some() && s.file.is_some() && s.kernel.is_some());
        assert!(s.shmem < Some(s.len) && s.kernel < Some(s.len));
    }
}
