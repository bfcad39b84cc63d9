//! Reads of the current task through BTF offsets ([`TaskOffsets`]), shared by
//! the slab tracer and `leaktrace memcg`: one walk, so both name the same
//! memory cgroup and the same parent for a task. Also the interrupt context
//! the current allocation runs in ([`IrqContext`]).

use aya_ebpf::helpers::{
    bpf_get_current_cgroup_id, bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_kernel,
    generated::{bpf_get_smp_processor_id, bpf_jiffies64},
};
use tracer_common::{
    IrqContext, TaskOffsets, CONTEXT_HARDIRQ, CONTEXT_KNOWN, CONTEXT_NMI, CONTEXT_SOFTIRQ,
};

/// The u64 at `addr`, 0 when `addr` is 0 or unreadable.
#[inline(always)]
pub fn read_ptr(addr: u64) -> u64 {
    if addr == 0 {
        return 0;
    }
    unsafe { bpf_probe_read_kernel(addr as *const u64) }.unwrap_or(0)
}

/// css -> cgroup -> kernfs_node -> id, the id the cgroup tracepoints report
/// and the cgroup directory's inode number.
#[inline(always)]
pub fn css_cgroup_id(off: &TaskOffsets, css: u64) -> u64 {
    if css == 0 || off.cgroup_kn == 0 {
        return 0;
    }
    let cgrp = read_ptr(css + off.css_cgroup as u64);
    if cgrp == 0 {
        return 0;
    }
    let kn = read_ptr(cgrp + off.cgroup_kn as u64);
    if kn == 0 {
        return 0;
    }
    read_ptr(kn + off.kn_id as u64)
}

/// What an allocation header says of its task, as last read on this CPU by one
/// program (`TASK_FACTS` in slab.rs has a slot per program, so a nested run of
/// another program never tears it; a raw tracepoint program nesting into
/// itself, possible before 6.1, can). Reading them costs a dozen dependent
/// kernel reads (~500 ns); a loop allocating on one CPU pays one instead:
/// `task->cgroups` is re-read every time and the rest is reused only while it,
/// the task and its pid/tgid are unchanged. A migration to another cgroup replaces
/// `task->cgroups` (a new css_set) and a process's start time never changes.
/// The parent is read when the slot is refreshed, which a process's first
/// allocation on a CPU always does, and userspace keeps a process's first
/// parent: a later reparenting changes nothing it shows.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TaskFacts {
    pub task: u64,
    pub pid_tgid: u64,
    pub cset: u64,
    pub memcg: u64,
    pub start_ns: u64,
    pub ppid: u32,
    pub _pad: u32,
    /// This CPU's preempt count (a per-CPU address, so it never changes for
    /// the slot's CPU); 0 until found through the runqueue.
    pub preempt_at: u64,
    /// [`tick_clock`]'s state: the jiffy it last saw and the
    /// `bpf_ktime_get_ns` it read then.
    pub clock_jiffies: u64,
    pub clock_ns: u64,
}

/// Brings `facts` up to date for the current task (see [`TaskFacts`]).
#[inline(always)]
pub fn refresh_facts(off: &TaskOffsets, facts: &mut TaskFacts, pid_tgid: u64) {
    let task = unsafe { bpf_get_current_task() };
    let cset = if off.task_cgroups != 0 {
        read_ptr(task + off.task_cgroups as u64)
    } else {
        0
    };
    if facts.task == task && facts.pid_tgid == pid_tgid && facts.cset == cset && task != 0 {
        if off.task_cgroups == 0 && off.memcg_from_cgroup2 != 0 {
            // No css_set read tells a cgroup2 migration: ask every time (a
            // helper without pointer walks).
            facts.memcg = unsafe { bpf_get_current_cgroup_id() };
        }
        return;
    }
    let parent = if off.task_real_parent != 0 {
        read_ptr(task + off.task_real_parent as u64)
    } else {
        0
    };
    facts.task = task;
    facts.pid_tgid = pid_tgid;
    facts.cset = cset;
    facts.memcg = if off.task_cgroups != 0 {
        memcg_of_cset(off, cset)
    } else if off.memcg_from_cgroup2 != 0 {
        unsafe { bpf_get_current_cgroup_id() }
    } else {
        0
    };
    facts.ppid = if parent != 0 && off.task_tgid != 0 {
        unsafe { bpf_probe_read_kernel((parent + off.task_tgid as u64) as *const u32) }.unwrap_or(0)
    } else {
        0
    };
    facts.start_ns = process_start_ns(off);
}

/// The current task's parent process now (`real_parent->tgid`); 0 when unknown.
/// A short-lived allocator is gone before /proc can be asked.
#[inline(always)]
pub fn parent_tgid(off: &TaskOffsets) -> u32 {
    if off.task_real_parent == 0 || off.task_tgid == 0 {
        return 0;
    }
    let task = unsafe { bpf_get_current_task() };
    let parent = read_ptr(task + off.task_real_parent as u64);
    if parent == 0 {
        return 0;
    }
    unsafe { bpf_probe_read_kernel((parent + off.task_tgid as u64) as *const u32) }.unwrap_or(0)
}

/// `group_leader->start_time` of the current task (ns, CLOCK_MONOTONIC): the
/// process's start, which tells a reused tgid from the one before. 0: unknown.
#[inline(always)]
pub fn process_start_ns(off: &TaskOffsets) -> u64 {
    if off.task_group_leader == 0 || off.task_start_time == 0 {
        return 0;
    }
    let task = unsafe { bpf_get_current_task() };
    let leader = read_ptr(task + off.task_group_leader as u64);
    if leader == 0 {
        return 0;
    }
    read_ptr(leader + off.task_start_time as u64)
}

/// The memcg a charge by the current task goes to: the cgroup owning the
/// task's memory css. On cgroup v1 this is NOT `bpf_get_current_cgroup_id`
/// (that is the cgroup2 id), hence the BTF-described pointer walk.
#[inline(always)]
pub fn current_memcg(off: &TaskOffsets) -> u64 {
    if off.task_cgroups == 0 {
        return if off.memcg_from_cgroup2 != 0 {
            unsafe { bpf_get_current_cgroup_id() }
        } else {
            0
        };
    }
    let task = unsafe { bpf_get_current_task() };
    memcg_of_cset(off, read_ptr(task + off.task_cgroups as u64))
}

/// css_set -> subsys[memory] -> its cgroup's id; 0 when `cset` is 0.
#[inline(always)]
fn memcg_of_cset(off: &TaskOffsets, cset: u64) -> u64 {
    if cset == 0 {
        return 0;
    }
    let slot = cset + off.css_set_subsys as u64 + 8 * (off.memory_subsys as u64 & 0x3f);
    css_cgroup_id(off, read_ptr(slot))
}

/// The memcg the current task had set to charge instead of its own
/// (`current->active_memcg`, set by `set_active_memcg()`), as a cgroup id; 0
/// when none is set or the offset is unknown. Userspace checked from BTF that
/// `struct mem_cgroup` begins with its css, so the pointer is a css.
#[inline(always)]
pub fn active_memcg(off: &TaskOffsets) -> u64 {
    if off.task_active_memcg == 0 {
        return 0;
    }
    let task = unsafe { bpf_get_current_task() };
    css_cgroup_id(off, read_ptr(task + off.task_active_memcg as u64))
}

/// Whether the current allocation serves an interrupt: [`CONTEXT_KNOWN`] and
/// the context bits, from this CPU's preempt count (found through the
/// runqueue, see [`IrqContext`]); 0 when it cannot be read. `preempt_at`
/// caches this CPU's preempt count address (0: not found yet).
#[inline(always)]
pub fn interrupt_context(irq: &IrqContext, preempt_at: &mut u64) -> u32 {
    if *preempt_at == 0 {
        *preempt_at = find_preempt_count(irq);
    }
    let at = *preempt_at;
    if at == 0 {
        return 0;
    }
    let Ok(count) = (unsafe { bpf_probe_read_kernel(at as *const u32) }) else {
        return 0;
    };
    let mut context = CONTEXT_KNOWN;
    if count & 0x0000_0100 != 0 {
        context |= CONTEXT_SOFTIRQ;
    }
    if count & 0x000f_0000 != 0 {
        context |= CONTEXT_HARDIRQ;
    }
    if count & 0x00f0_0000 != 0 {
        context |= CONTEXT_NMI;
    }
    context
}

/// This CPU's preempt count address: the runqueue the current task runs on
/// (checked to be this CPU's) plus the per-CPU distance userspace found in
/// kallsyms; 0 when it cannot be read.
#[inline(always)]
fn find_preempt_count(irq: &IrqContext) -> u64 {
    if irq.task_cfs_rq == 0 {
        return 0;
    }
    let task = unsafe { bpf_get_current_task() };
    let cfs_rq = read_ptr(task + irq.task_cfs_rq as u64);
    if cfs_rq == 0 {
        return 0;
    }
    let rq = read_ptr(cfs_rq + irq.cfs_rq_rq as u64);
    if rq == 0 {
        return 0;
    }
    let cpu = unsafe { bpf_probe_read_kernel((rq + irq.rq_cpu as u64) as *const u32) };
    if cpu != Ok(unsafe { bpf_get_smp_processor_id() }) {
        return 0;
    }
    rq.wrapping_add(irq.preempt_delta as u64)
}

/// CLOCK_MONOTONIC in ns at the kernel tick's resolution, never ahead of the
/// truth: the `bpf_ktime_get_ns` of the first event this slot saw in the
/// current jiffy, so normally at most a tick (1-10 ms, `CONFIG_HZ`) early, and
/// longer only while the kernel's jiffies counter itself stalls. An
/// allocation's birth time needs no better (ages are shown in ms and up), and
/// the precise clock costs ~80 ns a call on a 6.18 KVM guest, a tenth of a
/// matched allocation, where `bpf_jiffies64` is a load. Tracing programs may
/// call it from 5.9; `bpf_ktime_get_coarse_ns` would be the natural helper,
/// but they may not call that one at all (not NMI-safe).
#[inline(always)]
pub fn tick_clock(facts: &mut TaskFacts) -> u64 {
    let jiffies = unsafe { bpf_jiffies64() };
    if facts.clock_jiffies != jiffies || facts.clock_ns == 0 {
        // Before 6.1 a raw tracepoint program can nest into itself and share
        // this slot: the time goes first, so a nested run that sees the new
        // jiffy also sees its time, never an older one.
        unsafe {
            core::ptr::write_volatile(&mut facts.clock_ns, bpf_ktime_get_ns());
            core::ptr::write_volatile(&mut facts.clock_jiffies, jiffies);
        }
    }
    facts.clock_ns
}
