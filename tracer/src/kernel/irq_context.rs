//! Where the kernel side finds this CPU's preempt count, to mark allocations
//! made while serving an interrupt ([`IrqContext`]). Typed per-CPU ksyms
//! (`bpf_this_cpu_ptr`) need loader support we do not have, and
//! `__per_cpu_offset` is a data symbol that kallsyms lacks without
//! CONFIG_KALLSYMS_ALL (this project's host); the running task's runqueue is
//! a per-CPU object reachable from `current`, so offsets from BTF suffice.

use tracer_common::IrqContext;

use crate::kernel::btf::Btf;

/// The offsets, and the one-line note the run prints; None (with the reason)
/// where this kernel's BTF lacks any of them: interrupt context is "unknown".
pub fn resolve(btf: Option<&Btf>) -> Result<IrqContext, String> {
    let b = btf.ok_or("no kernel BTF")?;
    let member = |s: &str, path: &[&str]| {
        b.member_path(s, path)
            .map(|m| m.offset)
            .ok_or_else(|| format!("BTF has no {s}.{}", path.join(".")))
    };
    let task_cfs_rq = member("task_struct", &["se", "cfs_rq"])
        .map_err(|e| format!("{e} (a kernel without CONFIG_FAIR_GROUP_SCHED)"))?;
    let cfs_rq_rq = member("cfs_rq", &["rq"])?;
    let rq_cpu = member("rq", &["cpu"])?;
    let runqueues = b
        .percpu_var_offset("runqueues")
        .ok_or("BTF describes no per-CPU variable runqueues")?;
    // x86: its own variable up to 6.1 and again from 6.15, in pcpu_hot between.
    let preempt = match b.percpu_var_offset("__preempt_count") {
        Some(off) => off,
        None => {
            let hot = b
                .percpu_var_offset("pcpu_hot")
                .ok_or("BTF has neither __preempt_count nor pcpu_hot (not x86?)")?;
            hot + member("pcpu_hot", &["preempt_count"])?
        }
    };
    Ok(IrqContext {
        task_cfs_rq,
        cfs_rq_rq,
        rq_cpu,
        _pad: 0,
        preempt_delta: i64::from(preempt) - i64::from(runqueues),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_on_this_kernel() {
        let btf = Btf::from_sys_fs().expect("this machine has /sys/kernel/btf/vmlinux");
        let irq = resolve(Some(&btf)).expect("offsets");
        assert!(irq.task_cfs_rq > 0 && irq.cfs_rq_rq > 0 && irq.rq_cpu > 0);
        assert_ne!(irq.preempt_delta, 0);
        assert!(resolve(None).is_err());
    }
}
