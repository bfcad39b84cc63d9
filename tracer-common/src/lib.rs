//! The one place where leaktrace's kernel side and user side agree on bytes.
//!
//! Everything here is `#[repr(C)]` and free of pointers so the eBPF objects and
//! the userspace decoders read the same layout. Each object reads its config
//! from a read-only global that userspace fills in before load; because the
//! verifier knows those values, branches on them cost nothing.
//!
//! One module a tool, each with its user-side helpers beside its types in a
//! `user` module (built with the `user` feature only, so the kernel side stays
//! `no_std` and free of aya): [`slab`] for the slab tracer's object, [`memcg`]
//! for `leaktrace memcg`'s. What both share stays here: the record kinds in
//! one space, the task walk ([`TaskOffsets`]) and the interrupt context
//! ([`IrqContext`]).
#![no_std]

pub mod memcg;
pub mod slab;

#[cfg(feature = "user")]
pub mod user;

// Record kinds: the first u32 of every ring-buffer record, of either tool, in
// one space, so no two kinds share a value and a record handed to the wrong
// decoder is refused as unknown instead of read as something else.

/// [`slab::AllocEvent`]: a selected allocation with its stacks.
pub const EVENT_ALLOC: u32 = 1;
/// [`slab::FreeEvent`]: the free of a tracked object.
pub const EVENT_FREE: u32 = 2;
/// [`slab::AllocHeader`] alone: an allocation whose stacks were not captured.
pub const EVENT_ALLOC_NO_STACKS: u32 = 3;
/// [`memcg::CgroupEvent`] of `cgroup:cgroup_mkdir`.
pub const EVENT_MKDIR: u32 = 4;
/// [`memcg::CgroupEvent`] of `cgroup:cgroup_rmdir`.
pub const EVENT_RMDIR: u32 = 5;
/// [`memcg::CgroupEvent`] of `cgroup:cgroup_release`.
pub const EVENT_RELEASE: u32 = 6;
/// [`memcg::ChargeEvent`]: a charged slab allocation.
pub const EVENT_CHARGE: u32 = 7;
/// [`memcg::UnchargeEvent`]: the free of a tracked charged object.
pub const EVENT_UNCHARGE: u32 = 8;
/// [`memcg::CssEvent`] of kprobe `mem_cgroup_css_offline`: the memcg css went
/// offline (after rmdir).
pub const EVENT_CSS_OFFLINE: u32 = 9;
/// [`memcg::CssEvent`] of kprobe `mem_cgroup_css_free`: the memcg itself is freed.
pub const EVENT_CSS_FREE: u32 = 10;
/// [`memcg::PercpuAllocEvent`]: a per-CPU allocation (`percpu:percpu_alloc_percpu`),
/// for the memcg tool's per-CPU share of the memcgs it sees created.
pub const EVENT_PERCPU_ALLOC: u32 = 40;
/// [`memcg::PercpuFreeEvent`]: a per-CPU free (`percpu:percpu_free_percpu`).
pub const EVENT_PERCPU_FREE: u32 = 41;
/// [`memcg::PercpuFreeEvent`] carrying a pid: that task made a cgroup in a
/// hierarchy other than the memory controller's (its per-CPU allocations so
/// far belong to that cgroup, not to its next memcg).
pub const EVENT_PERCPU_OTHER_MKDIR: u32 = 42;

/// Counter indexes for a per-CPU counters array: each name gets the next
/// index from 0, in order, and `COUNT` is how many there are (the array's
/// size).
#[macro_export]
#[doc(hidden)]
macro_rules! counters {
    (@next $n:expr; $(#[$doc:meta])* $name:ident, $($rest:tt)*) => {
        $(#[$doc])*
        pub const $name: u32 = $n;
        $crate::counters!(@next $n + 1; $($rest)*);
    };
    (@next $n:expr;) => {
        pub const COUNT: u32 = $n;
    };
    ($($body:tt)*) => {
        $crate::counters!(@next 0u32; $($body)*);
    };
}

/// Offsets (from BTF) for reading the current task in the kernel: its memory
/// cgroup (`task->cgroups->subsys[memory_cgrp_id]->cgroup->kn->id`, what cgroup
/// v1 needs: `bpf_get_current_cgroup_id` is the cgroup2 id), its parent at this
/// moment (`real_parent->tgid`) and its process's start
/// (`group_leader->start_time`, ns of CLOCK_MONOTONIC since 5.5). Shared by the
/// slab tracer and `leaktrace memcg`; 0 in a field disables what needs it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskOffsets {
    /// task_struct -> css_set -> subsys[memory] -> cgroup -> kernfs_node -> id.
    /// `task_cgroups == 0` disables the walk.
    pub task_cgroups: u16,
    pub css_set_subsys: u16,
    pub css_cgroup: u16,
    pub cgroup_kn: u16,
    pub kn_id: u16,
    /// task_struct.real_parent and .tgid, for the parent.
    pub task_real_parent: u16,
    pub task_tgid: u16,
    /// task_struct.group_leader and .start_time, for the process's identity
    /// (a tgid alone is reused). 0: not read.
    pub task_group_leader: u16,
    pub task_start_time: u16,
    /// task_struct.active_memcg (remote charging: `set_active_memcg()`), read
    /// as a css because `struct mem_cgroup` begins with its css. 0: not read.
    pub task_active_memcg: u16,
    pub _pad: [u16; 2],
    /// `memory_cgrp_id` in `enum cgroup_subsys_id`.
    pub memory_subsys: u32,
    /// 1: no BTF walk; memory is on cgroup2, so the task's cgroup2 id
    /// (`bpf_get_current_cgroup_id`) stands in for its memcg.
    pub memcg_from_cgroup2: u32,
}

impl TaskOffsets {
    pub const fn zeroed() -> Self {
        TaskOffsets {
            task_cgroups: 0,
            css_set_subsys: 0,
            css_cgroup: 0,
            cgroup_kn: 0,
            kn_id: 0,
            task_real_parent: 0,
            task_tgid: 0,
            task_group_leader: 0,
            task_start_time: 0,
            task_active_memcg: 0,
            _pad: [0; 2],
            memory_subsys: 0,
            memcg_from_cgroup2: 0,
        }
    }
}

/// [`slab::AllocHeader::context`]: the preempt count could be read
/// ([`IrqContext`]); without it the other bits mean nothing.
pub const CONTEXT_KNOWN: u32 = 1;
/// Serving a hardirq (`HARDIRQ_MASK`, bits 16-19 of the preempt count).
pub const CONTEXT_HARDIRQ: u32 = 2;
/// Serving a softirq (`SOFTIRQ_OFFSET`, bit 8): not merely bottom halves
/// disabled, which adds `2 * SOFTIRQ_OFFSET` in process context.
pub const CONTEXT_SOFTIRQ: u32 = 4;
/// In an NMI (`NMI_MASK`, bit 20; bits 20-23 since 5.12).
pub const CONTEXT_NMI: u32 = 8;
/// Any of the interrupt bits.
pub const CONTEXT_INTERRUPT: u32 = CONTEXT_HARDIRQ | CONTEXT_SOFTIRQ | CONTEXT_NMI;

/// How the kernel side finds this CPU's preempt count without typed ksyms or
/// data symbols in kallsyms: the running task's runqueue is the per-CPU
/// `runqueues` of this CPU (`current->se.cfs_rq->rq`), so the preempt count is
/// at that address plus `preempt_delta`, the distance between the two per-CPU
/// variables (`.data..percpu` offsets from BTF: `__preempt_count`, or
/// `pcpu_hot.preempt_count` on 6.2-6.14). `rq->cpu` is checked against the
/// CPU the program runs on. `task_cfs_rq == 0` disables it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqContext {
    /// `task_struct.se` + `sched_entity.cfs_rq` (CONFIG_FAIR_GROUP_SCHED).
    pub task_cfs_rq: u32,
    /// `cfs_rq.rq`.
    pub cfs_rq_rq: u32,
    /// `rq.cpu`.
    pub rq_cpu: u32,
    pub _pad: u32,
    /// Preempt count's per-CPU offset minus `runqueues`'.
    pub preempt_delta: i64,
}

/// Every record kind is distinct: a kind added to one tool must not reuse
/// another's value.
const _: () = {
    const KINDS: [u32; 13] = [
        EVENT_ALLOC,
        EVENT_FREE,
        EVENT_ALLOC_NO_STACKS,
        EVENT_MKDIR,
        EVENT_RMDIR,
        EVENT_RELEASE,
        EVENT_CHARGE,
        EVENT_UNCHARGE,
        EVENT_CSS_OFFLINE,
        EVENT_CSS_FREE,
        EVENT_PERCPU_ALLOC,
        EVENT_PERCPU_FREE,
        EVENT_PERCPU_OTHER_MKDIR,
    ];
    let mut i = 0;
    while i < KINDS.len() {
        let mut j = i + 1;
        while j < KINDS.len() {
            assert!(KINDS[i] != KINDS[j], "two record kinds share a value");
            j += 1;
        }
        i += 1;
    }
};
