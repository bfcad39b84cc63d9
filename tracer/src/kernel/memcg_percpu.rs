//! What one memory cgroup holds in per-CPU memory (`Percpu` in /proc/meminfo),
//! estimated from the running kernel's BTF: which per-CPU structures its
//! `mkdir` allocates and how big each is, × the possible CPUs. A dying memcg
//! keeps them until it is released, so this × the dying count is what they
//! hold.
//!
//! The structures, from the kernel sources (5.10, 6.1, 6.12, 6.18):
//! - cgroup core (`cgroup_create`, kernel/cgroup/cgroup.c): the cgroup's own
//!   css `percpu_ref`; rstat (kernel/cgroup/rstat.c): `cgroup_rstat_cpu`
//!   (up to 6.14), or from 6.15 `css_rstat_cpu` + `cgroup_rstat_base_cpu`;
//!   PSI (kernel/sched/psi.c, `psi_cgroup_alloc`): `psi_group_cpu` where PSI
//!   is on.
//! - the memcg css (`mem_cgroup_alloc`, mm/memcontrol.c): its `percpu_ref`;
//!   `memcg_vmstats_percpu` (twice up to 5.12: `vmstats_local` too); per NUMA
//!   node `lruvec_stats_percpu` (5.13+) or `lruvec_stat_local` +
//!   `lruvec_stat_cpu` (before); from 6.15 its own `css_rstat_cpu`; the v1-only
//!   `memcg1_events_percpu` (mm/memcontrol-v1.c, `memcg1_alloc_events`); the
//!   writeback domain's `percpu_counter` (`cgwb_domain`); the `obj_cgroup`'s
//!   `percpu_ref` (5.9+, `memcg_online_kmem`).
//!
//! On cgroup v1 the memory hierarchy's cgroup is the memcg's own, so its core
//! structures are counted. A dying memcg has freed its killed `percpu_ref`s
//! (`Estimate::dying_bytes`). Not counted, because rmdir frees them while the
//! memcg is dying: the cgroup's BPF `percpu_ref` (v2) and the css of other
//! controllers a v2 parent enables for its children (e.g. `perf_event`).

use std::path::Path;

use serde::Serialize;

use super::{btf::Btf, possible_cpus};

/// One kind of per-CPU structure a memcg's mkdir allocates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Part {
    /// The structure (or counter) and who allocates it.
    pub what: String,
    /// Bytes per CPU of one.
    pub size: u64,
    pub count: u64,
    /// Freed once the memcg is offline: a killed `percpu_ref` without
    /// PERCPU_REF_ALLOW_REINIT frees its counters after an RCU grace period
    /// (lib/percpu-refcount.c, since 5.3), so a dying memcg no longer has it.
    pub freed_when_dying: bool,
}

/// The estimate for one memcg on this kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Estimate {
    pub possible_cpus: u64,
    pub parts: Vec<Part>,
    /// Σ size × count: bytes per CPU.
    pub per_cpu_bytes: u64,
    /// per_cpu_bytes × possible_cpus: what one live memcg holds.
    pub bytes: u64,
    /// What one dying memcg holds: without the parts freed when dying.
    pub dying_per_cpu_bytes: u64,
    pub dying_bytes: u64,
}

/// What the estimate depends on besides BTF.
#[derive(Debug, Clone, Copy)]
pub struct Host {
    pub cgroup_v1: bool,
    pub psi: bool,
    pub possible_cpus: u64,
    pub possible_nodes: u64,
}

impl Host {
    /// This machine: /sys/devices/system/{cpu,node}/possible and
    /// /proc/pressure (PSI on). Errors: the possible CPUs cannot be read.
    pub fn read(root: &Path, cgroup_v1: bool) -> std::io::Result<Host> {
        let cpus = std::fs::read_to_string(root.join("sys/devices/system/cpu/possible"))?;
        let nodes = std::fs::read_to_string(root.join("sys/devices/system/node/possible"))
            .map_or(1, |t| possible_cpus::count(&t).unwrap_or(1));
        Ok(Host {
            cgroup_v1,
            psi: root.join("proc/pressure/memory").exists(),
            possible_cpus: possible_cpus::count(&cpus).unwrap_or(1),
            possible_nodes: nodes,
        })
    }
}

/// cgroup v2's own figure (5.9+): Σ `percpu` of `memory.stat` over the
/// memcgs directly under the hierarchy's root at `mount`. A memcg's per-CPU
/// statistics are charged to its parent, so this counts every memcg below
/// the top level, dying ones included, but only the charged structures
/// (`__GFP_ACCOUNT`: statistics, not the cgroup core's) and with the
/// kernel's per-object accounting overhead: a cross-check, not our unit.
/// None: v1 (no such line) or nothing readable.
pub fn memory_stat_percpu(mount: &Path) -> Option<u64> {
    let mut total = None;
    for entry in std::fs::read_dir(mount).ok()?.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path().join("memory.stat")) else {
            continue;
        };
        if let Some(v) = text
            .lines()
            .find_map(|l| l.strip_prefix("percpu ")?.trim().parse::<u64>().ok())
        {
            total = Some(total.unwrap_or(0) + v);
        }
    }
    total
}

/// The per-memcg estimate from `btf`. None where BTF lacks `struct
/// mem_cgroup`'s per-CPU statistics (no memcg, or a layout we do not know).
pub fn estimate(btf: &Btf, host: Host) -> Option<Estimate> {
    let mut parts = Vec::new();
    let mut add = |what: &str, size: Option<u32>, count: u64| {
        if let Some(size) = size.filter(|_| count > 0) {
            parts.push(Part {
                what: what.to_string(),
                size: u64::from(size),
                count,
                freed_when_dying: what.starts_with("percpu_ref"),
            });
        }
    };
    let vmstats = btf.pointee_size("mem_cgroup", "vmstats_percpu")?;
    // percpu_ref_init allocates one `unsigned long`, the type of percpu_count_ptr.
    let percpu_ref = match btf
        .member("percpu_ref", "percpu_count_ptr")
        .map(|m| m.shape)
    {
        Some(super::btf::Shape::Scalar { size }) => Some(size),
        _ => Some(8),
    };
    let refs = 2 + u64::from(btf.has_struct("obj_cgroup"));
    add(
        "percpu_ref (cgroup, memcg css, obj_cgroup)",
        percpu_ref,
        refs,
    );
    if btf.has_struct("css_rstat_cpu") {
        add(
            "css_rstat_cpu (cgroup, memcg css)",
            btf.struct_size("css_rstat_cpu"),
            2,
        );
        add(
            "cgroup_rstat_base_cpu",
            btf.struct_size("cgroup_rstat_base_cpu"),
            1,
        );
    } else {
        add("cgroup_rstat_cpu", btf.struct_size("cgroup_rstat_cpu"), 1);
    }
    if host.psi {
        add("psi_group_cpu", btf.pointee_size("psi_group", "pcpu"), 1);
    }
    let vm_count = 1 + u64::from(btf.member("mem_cgroup", "vmstats_local").is_some());
    add("memcg_vmstats_percpu", Some(vmstats), vm_count);
    let nodes = host.possible_nodes;
    for member in [
        "lruvec_stats_percpu",
        "lruvec_stat_local",
        "lruvec_stat_cpu",
    ] {
        add(
            &format!("mem_cgroup_per_node.{member} (per node)"),
            btf.pointee_size("mem_cgroup_per_node", member),
            nodes,
        );
    }
    if host.cgroup_v1 {
        add(
            "memcg1_events_percpu (v1)",
            btf.pointee_size("mem_cgroup", "events_percpu"),
            1,
        );
    }
    if btf.member("mem_cgroup", "cgwb_domain").is_some() {
        add(
            "percpu_counter (writeback domain)",
            btf.pointee_size("percpu_counter", "counters"),
            1,
        );
    }
    let per_cpu_bytes = parts.iter().map(|p| p.size * p.count).sum::<u64>();
    let dying_per_cpu_bytes = parts
        .iter()
        .filter(|p| !p.freed_when_dying)
        .map(|p| p.size * p.count)
        .sum::<u64>();
    Some(Estimate {
        possible_cpus: host.possible_cpus,
        bytes: per_cpu_bytes * host.possible_cpus,
        per_cpu_bytes,
        dying_bytes: dying_per_cpu_bytes * host.possible_cpus,
        dying_per_cpu_bytes,
        parts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_stat_percpu_sums_the_top_level() {
        let dir = std::env::temp_dir().join(format!("leaktrace-msp-{}", std::process::id()));
        for (name, stat) in [
            ("a", "anon 1\npercpu 100\n"),
            ("b", "percpu 23\n"),
            ("c", "anon 5\n"),
        ] {
            std::fs::create_dir_all(dir.join(name)).expect("mkdir");
            std::fs::write(dir.join(name).join("memory.stat"), stat).expect("write");
        }
        assert_eq!(memory_stat_percpu(&dir), Some(123));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(memory_stat_percpu(Path::new("/nonexistent")), None);
    }

    /// On this kernel: every struct the estimate names is in its BTF, and a
    /// memcg costs at least its statistics.
    #[test]
    fn running_kernel_estimate() {
        let Ok(btf) = Btf::from_sys_fs() else {
            eprintln!("skip: no /sys/kernel/btf/vmlinux");
            return;
        };
        let host = Host::read(Path::new("/"), true).expect("possible CPUs");
        let e = estimate(&btf, host).expect("a memcg kernel");
        assert!(e.per_cpu_bytes >= 512, "{e:?}");
        assert_eq!(e.bytes, e.per_cpu_bytes * host.possible_cpus);
        assert!(
            e.dying_bytes < e.bytes && e.dying_bytes > e.bytes / 2,
            "{e:?}"
        );
        assert!(e.parts.iter().any(|p| p.what == "memcg_vmstats_percpu"));
    }
}
