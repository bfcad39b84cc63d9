//! What this kernel and this process can do, detected at run time: root, BTF,
//! kprobes. Tracepoint presence is checked per event by `plan`.

use std::path::Path;

use anyhow::{bail, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Features {
    pub kernel_release: String,
    pub btf: bool,
    /// A kprobe PMU or tracefs kprobe_events: kprobes can be attached.
    pub kprobes: bool,
}

impl Features {
    pub fn detect(root: &Path, tracefs: Option<&Path>) -> Features {
        let kernel_release = std::fs::read_to_string(root.join("proc/sys/kernel/osrelease"))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".to_string());
        let kprobes = root.join("sys/bus/event_source/devices/kprobe").exists()
            || tracefs.is_some_and(|t| t.join("kprobe_events").exists());
        Features {
            kernel_release,
            btf: root.join("sys/kernel/btf/vmlinux").exists(),
            kprobes,
        }
    }
}

/// Whether /proc/kallsyms names `name`: every BPF helper and kprobe-able
/// function the running kernel has is listed there.
pub fn kernel_has_symbol(name: &str) -> bool {
    std::fs::read_to_string("/proc/kallsyms").is_ok_and(|text| {
        text.lines()
            .any(|l| l.split_whitespace().nth(2) == Some(name))
    })
}

/// Whether the running kernel's release (`uname -r`) is at least major.minor.
/// An unreadable release counts as new enough: newer kernels are the common case.
pub fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    release_at_least(&release, major, minor)
}

fn release_at_least(release: &str, major: u32, minor: u32) -> bool {
    let mut parts = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(ma), Some(mi)) => (ma, mi) >= (major, minor),
        _ => true,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_versions_compare_numerically() {
        assert!(release_at_least("5.12.0-1-amd64", 5, 12));
        assert!(!release_at_least("5.10.0-35-cloud-amd64", 5, 12));
        assert!(release_at_least("6.1.0", 5, 12));
        assert!(release_at_least("7.3.4-cloud", 6, 18));
        assert!(!release_at_least("6.9.0", 6, 10));
        assert!(release_at_least("garbage", 5, 12));
    }

    #[test]
    fn detects_from_a_fake_root() {
        let dir = std::env::temp_dir().join(format!("leaktrace-features-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("proc/sys/kernel")).expect("mkdir");
        std::fs::create_dir_all(dir.join("sys/kernel/btf")).expect("mkdir");
        std::fs::write(dir.join("proc/sys/kernel/osrelease"), "5.10.0-test\n").expect("write");
        std::fs::write(dir.join("sys/kernel/btf/vmlinux"), "").expect("write");
        let f = Features::detect(&dir, None);
        assert_eq!(f.kernel_release, "5.10.0-test");
        assert!(f.btf);
        assert!(!f.kprobes);
        std::fs::create_dir_all(dir.join("sys/bus/event_source/devices/kprobe")).expect("mkdir");
        assert!(Features::detect(&dir, None).kprobes);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
