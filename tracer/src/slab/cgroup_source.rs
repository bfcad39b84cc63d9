//! Where the slab tracer's CGROUP column comes from: which cgroup the kernel
//! side reads for the allocating task, with the offsets BTF gives for it.

use std::path::Path;

use tracer_common::TaskOffsets;

use crate::{
    kernel::btf::Btf, kernel::cgroupfs::Hierarchy, kernel::procinfo, kernel::task_offsets,
};

/// Where the CGROUP column's ids come from and how they are named.
pub struct CgroupSource {
    pub task: TaskOffsets,
    /// The hierarchy the ids are directories of.
    pub mount: Option<std::path::PathBuf>,
    pub note: String,
}

/// The memory cgroup where the memory controller is on a v1 hierarchy (the
/// kernel walks `task->cgroups` for it), else the task's cgroup2 cgroup. The
/// parent and process start are read wherever BTF has their offsets.
pub fn cgroup_source(root: &Path, btf: Option<&Btf>) -> CgroupSource {
    let mut task = TaskOffsets {
        memcg_from_cgroup2: 1,
        ..TaskOffsets::zeroed()
    };
    task_offsets::set_identity(btf, &mut task);
    let v1 = Hierarchy::detect(root, None)
        .ok()
        .filter(|h| h.version == 1);
    let cgroup2 = CgroupSource {
        task,
        mount: procinfo::cgroup2_mount(root),
        note: "CGROUP is the allocating task's cgroup2 cgroup".to_string(),
    };
    let Some(h) = v1 else {
        return cgroup2;
    };
    match task_offsets::memcg_walk(btf) {
        Some(w) => CgroupSource {
            task: task_offsets::combined(w, &task),
            note: format!(
                "CGROUP is the allocating task's memory cgroup on the v1 hierarchy at {} \
                 (task->cgroups->subsys[memory], BTF offsets)",
                h.mount.display()
            ),
            mount: Some(h.mount),
        },
        None => CgroupSource {
            note: format!(
                "CGROUP shows cgroup2 paths although memory is on the v1 hierarchy at {}: \
                 without BTF the kernel side cannot read the task's v1 memory cgroup",
                h.mount.display()
            ),
            ..cgroup2
        },
    }
}
