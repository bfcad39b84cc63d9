//! What `doctor` reads of the memory-cgroup hierarchy beyond where it is and
//! how many memcgs it holds (`kernel/cgroupfs.rs`) and how long `memory.stat`
//! takes to read (`kernel/memory_stat.rs`): the cgroup v1 kmem accounting
//! state of container cgroups.

use std::fs;
use std::path::Path;

use serde::Serialize;

use crate::kernel::cgroupfs::{read_u64, CgroupDir, Hierarchy};

/// Limits at or above this are the kernel's "unlimited" (PAGE_COUNTER_MAX pages).
const UNLIMITED: u64 = 1 << 60;

/// cgroup v1 kernel-memory accounting as the container runtimes left it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KmemState {
    /// `cgroup.memory=nokmem` on the kernel command line: no kmem accounting at all.
    pub nokmem: bool,
    /// The root has memory.kmem.* files (CONFIG_MEMCG_KMEM, v1 interface present).
    pub kmem_files: bool,
    pub root_kmem_usage_bytes: Option<u64>,
    /// `memory.kmem.slabinfo` of the root could be read.
    pub slabinfo_readable: bool,
    /// Cgroups whose path names kubepods or docker.
    pub container_cgroups: u64,
    pub with_kmem_usage: u64,
    pub with_kmem_limit: u64,
    /// A few container cgroups with a kmem limit (or usage), for the report.
    pub examples: Vec<String>,
}

pub fn kmem_state(root: &Path, h: &Hierarchy, dirs: &[CgroupDir]) -> KmemState {
    let nokmem = fs::read_to_string(root.join("proc/cmdline"))
        .map(|c| c.split_whitespace().any(|a| a == "cgroup.memory=nokmem"))
        .unwrap_or(false);
    let root_usage = read_u64(&h.mount.join("memory.kmem.usage_in_bytes")).ok();
    let mut state = KmemState {
        nokmem,
        kmem_files: h.mount.join("memory.kmem.usage_in_bytes").exists(),
        root_kmem_usage_bytes: root_usage,
        slabinfo_readable: fs::read(h.mount.join("memory.kmem.slabinfo")).is_ok(),
        container_cgroups: 0,
        with_kmem_usage: 0,
        with_kmem_limit: 0,
        examples: Vec::new(),
    };
    let mut limited = Vec::new();
    let mut used = Vec::new();
    for dir in dirs.iter().filter(|d| is_container(&d.rel)) {
        state.container_cgroups += 1;
        let path = h.mount.join(dir.rel.trim_start_matches('/'));
        if read_u64(&path.join("memory.kmem.usage_in_bytes")).is_ok_and(|u| u > 0) {
            state.with_kmem_usage += 1;
            used.push(dir.rel.clone());
        }
        if read_u64(&path.join("memory.kmem.limit_in_bytes")).is_ok_and(|l| l < UNLIMITED) {
            state.with_kmem_limit += 1;
            limited.push(dir.rel.clone());
        }
    }
    limited.extend(used);
    limited.dedup();
    limited.truncate(3);
    state.examples = limited;
    state
}

fn is_container(rel: &str) -> bool {
    rel.split('/')
        .any(|c| c.contains("kubepods") || c.contains("docker"))
}
