//! BTF offsets for the kernel side's reads of the current task
//! ([`TaskOffsets`]): its memory cgroup, its parent, its process's start.
//! Filled here once for both the slab tracer and `leaktrace memcg`.

use tracer_common::TaskOffsets;

use crate::kernel::btf::Btf;

fn off(b: &Btf, s: &str, m: &str) -> Option<u16> {
    b.member_offset(s, m).and_then(|o| u16::try_from(o).ok())
}

/// `task->cgroups->subsys[memory_cgrp_id]->cgroup->kn->id`: the walk
/// fields and `memory_subsys` set, the rest zero; None without BTF or when a
/// member is missing.
pub fn memcg_walk(btf: Option<&Btf>) -> Option<TaskOffsets> {
    let b = btf?;
    let (css_cgroup, cgroup_kn, kn_id) = css_id(b)?;
    Some(TaskOffsets {
        task_cgroups: off(b, "task_struct", "cgroups")?,
        css_set_subsys: off(b, "css_set", "subsys")?,
        css_cgroup,
        cgroup_kn,
        kn_id,
        memory_subsys: b.enum_value("cgroup_subsys_id", "memory_cgrp_id")?,
        ..TaskOffsets::zeroed()
    })
}

/// `css->cgroup->kn->id`: a css's cgroup id (its directory's inode number).
fn css_id(b: &Btf) -> Option<(u16, u16, u16)> {
    Some((
        off(b, "cgroup_subsys_state", "cgroup")?,
        off(b, "cgroup", "kn")?,
        off(b, "kernfs_node", "id")?,
    ))
}

/// Sets the parent (`real_parent->tgid`) and process start
/// (`group_leader->start_time`) offsets where BTF has them; leaves them 0
/// (not read) otherwise.
pub fn set_identity(btf: Option<&Btf>, t: &mut TaskOffsets) {
    let Some(b) = btf else {
        return;
    };
    if let (Some(p), Some(g)) = (
        off(b, "task_struct", "real_parent"),
        off(b, "task_struct", "tgid"),
    ) {
        t.task_real_parent = p;
        t.task_tgid = g;
    }
    if let (Some(l), Some(s)) = (
        off(b, "task_struct", "group_leader"),
        off(b, "task_struct", "start_time"),
    ) {
        t.task_group_leader = l;
        t.task_start_time = s;
    }
    // Remote charging: `active_memcg` points at a `struct mem_cgroup`, read as
    // its css, which only works while the css is its first member.
    if let (Some(a), Some(0), Some((c, k, i))) = (
        off(b, "task_struct", "active_memcg"),
        off(b, "mem_cgroup", "css"),
        css_id(b),
    ) {
        t.task_active_memcg = a;
        t.css_cgroup = c;
        t.cgroup_kn = k;
        t.kn_id = i;
    }
}

/// `walk`'s memcg walk with `identity`'s parent and process-start offsets.
pub fn combined(walk: TaskOffsets, identity: &TaskOffsets) -> TaskOffsets {
    // On cgroup2 there is no walk; the css -> id reads still name a remote charge.
    let css = if walk.cgroup_kn == 0 { identity } else { &walk };
    TaskOffsets {
        css_cgroup: css.css_cgroup,
        cgroup_kn: css.cgroup_kn,
        kn_id: css.kn_id,
        task_real_parent: identity.task_real_parent,
        task_tgid: identity.task_tgid,
        task_group_leader: identity.task_group_leader,
        task_start_time: identity.task_start_time,
        task_active_memcg: identity.task_active_memcg,
        ..walk
    }
}
