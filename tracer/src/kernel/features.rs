//! What this process may do (root) and which kernel symbols exist; what the
//! kernel can do is `kernel::facts`.

use anyhow::{bail, Result};

/// Whether /proc/kallsyms names `name`: every BPF helper and kprobe-able
/// function the running kernel has is listed there.
pub fn kernel_has_symbol(name: &str) -> bool {
    std::fs::read_to_string("/proc/kallsyms").is_ok_and(|text| {
        text.lines()
            .any(|l| l.split_whitespace().nth(2) == Some(name))
    })
}

/// BPF programs and perf events need root (or CAP_BPF + CAP_PERFMON, which a
/// plain user does not have either); say so before anything fails obscurely.
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "leaktrace needs root to load eBPF programs and read kernel symbols; run it with sudo \
             (or as root in a privileged container with hostPID)"
        );
    }
    Ok(())
}
