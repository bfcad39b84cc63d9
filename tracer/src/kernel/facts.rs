//! What the running kernel can do, decided once at start and handed to both
//! tools' plans: the one place that reads the kernel release, and the BPF
//! capabilities asked of the kernel itself (a tiny program loaded, its
//! program info read, its BTF searched) rather than inferred from a version
//! number that enterprise kernels' backports make misleading. Where the
//! kernel cannot be asked, the version decides and the fact says so.
//! Tracepoint fields stay with tracefs (`kernel::tracefs`), read per event by
//! each tool's plan.

use std::path::Path;

use serde::Serialize;

use crate::kernel::btf::Btf;

/// A release's leading dotted version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

/// `6.18.44-fc-v669` -> 6.18.44; `3.10.0-1160.el7.x86_64` -> 3.10.0. None when the release
/// does not start with a dotted version (then no range is claimed).
pub fn parse_version(release: &str) -> Option<Version> {
    let head = release.split(['-', '+', '_', ' ']).next()?;
    let mut parts = head.split('.');
    let mut num = |required: bool| -> Option<u32> {
        match parts.next() {
            Some(p) => p.parse().ok(),
            None if required => None,
            None => Some(0),
        }
    };
    Some(Version {
        major: num(true)?,
        minor: num(true)?,
        patch: num(false)?,
    })
}

/// The release as `uname -r` prints it, trimmed; None when unreadable. The
/// only reader of `/proc/sys/kernel/osrelease`.
pub fn read_release(root: &Path) -> Option<String> {
    std::fs::read_to_string(root.join("proc/sys/kernel/osrelease"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Whether `release` is at least major.minor. An unparsable release counts
/// as new enough: newer kernels are the common case.
pub fn release_at_least(release: &str, major: u32, minor: u32) -> bool {
    parse_version(release).is_none_or(|v| (v.major, v.minor) >= (major, minor))
}

/// What files under /proc and /sys say, without a BPF syscall: what `doctor`
/// reads of a (possibly fake) root, and the start of [`KernelFacts`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Features {
    /// "unknown" when unreadable.
    pub kernel_release: String,
    pub btf: bool,
    /// A kprobe PMU or tracefs kprobe_events: kprobes can be attached.
    pub kprobes: bool,
}

impl Features {
    pub fn detect(root: &Path, tracefs: Option<&Path>) -> Features {
        let kprobes = root.join("sys/bus/event_source/devices/kprobe").exists()
            || tracefs.is_some_and(|t| t.join("kprobe_events").exists());
        Features {
            kernel_release: read_release(root).unwrap_or_else(|| "unknown".to_string()),
            btf: root.join("sys/kernel/btf/vmlinux").exists(),
            kprobes,
        }
    }
}

/// Everything the tools decide about the kernel, filled once by [`KernelFacts::probe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelFacts {
    /// Release, BTF file, kprobes.
    pub features: Features,
    /// The release's version; None when it cannot be parsed.
    pub version: Option<Version>,
    /// The verifier accepts BPF compare-and-swap (`BPF_CMPXCHG`, 5.12:
    /// 5ffa25502b5a), probed by loading a raw tracepoint program holding one.
    /// Without it the slab programs' `_nocas` builds run.
    pub bpf_cmpxchg: bool,
    /// Tracing programs may use hash maps that are not preallocated: the
    /// kernel has `bpf_mem_alloc` (6.1: 7c8199e24fa0, hash maps on it since
    /// fba1a1c6c912), found as its BTF struct. 5.10 accepts BPF_F_NO_PREALLOC
    /// for tracing maps too, but with a WARN_ONCE that taints the kernel, so
    /// the flag's acceptance is no test. Without BTF the version decides.
    pub on_demand_maps: bool,
    /// `bpf_prog_info.recursion_misses` exists (5.12: 9ed9e9ba2337), seen in
    /// the `info_len` the kernel returns for a loaded program. Raw tracepoint
    /// misses are counted only from 6.1, so a zero before that means "not
    /// counted". Without a loadable program the version decides.
    pub recursion_misses: bool,
    /// Kernel stacks are vmalloc'd (CONFIG_VMAP_STACK), so `KernelStack` is
    /// inside `VmallocUsed` ([`detect_vmap_stack`]); None: unknown.
    pub vmap_stack: Option<bool>,
}

impl KernelFacts {
    /// Reads the files and asks the kernel; the BPF probes need root, which
    /// the traced runs check first.
    pub fn probe(root: &Path, tracefs: Option<&Path>, btf: Option<&Btf>) -> KernelFacts {
        let features = Features::detect(root, tracefs);
        let at_least = |major, minor| release_at_least(&features.kernel_release, major, minor);
        KernelFacts {
            version: parse_version(&features.kernel_release),
            bpf_cmpxchg: crate::kernel::bpf_probe::cmpxchg(),
            on_demand_maps: match btf {
                Some(btf) => btf.has_struct("bpf_mem_alloc"),
                None => at_least(6, 1),
            },
            recursion_misses: crate::kernel::bpf_probe::prog_info_has_recursion_misses()
                .unwrap_or_else(|| at_least(5, 12)),
            vmap_stack: detect_vmap_stack(root, btf),
            features,
        }
    }
}

/// Whether kernel stacks are vmalloc'd (CONFIG_VMAP_STACK), from the running kernel:
/// `task_struct.stack_vm_area` exists exactly under that option (include/linux/sched.h).
/// `btf`: the running kernel's, if already parsed (parsing it takes ~100 ms);
/// else it is read here. Falls back to `/boot/config-<release>`; None when
/// neither answers.
pub fn detect_vmap_stack(root: &Path, btf: Option<&Btf>) -> Option<bool> {
    let read;
    let btf = match btf {
        Some(btf) => Some(btf),
        None => {
            read = Btf::read(&root.join("sys/kernel/btf/vmlinux")).ok();
            read.as_ref()
        }
    };
    if let Some(btf) = btf.filter(|b| b.has_struct("task_struct")) {
        return Some(btf.member("task_struct", "stack_vm_area").is_some());
    }
    let release = read_release(root)?;
    let config = std::fs::read_to_string(root.join(format!("boot/config-{release}"))).ok()?;
    Some(config.lines().any(|l| l.trim() == "CONFIG_VMAP_STACK=y"))
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

    #[test]
    fn vmap_stack_from_boot_config_without_btf() {
        let dir = std::env::temp_dir().join(format!("leaktrace-vmap-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("proc/sys/kernel")).unwrap();
        std::fs::create_dir_all(dir.join("boot")).unwrap();
        std::fs::write(dir.join("proc/sys/kernel/osrelease"), "5.10.0-26-amd64\n").unwrap();
        assert_eq!(detect_vmap_stack(&dir, None), None);
        std::fs::write(
            dir.join("boot/config-5.10.0-26-amd64"),
            "CONFIG_VMAP_STACK=y\n",
        )
        .unwrap();
        assert_eq!(detect_vmap_stack(&dir, None), Some(true));
        std::fs::write(
            dir.join("boot/config-5.10.0-26-amd64"),
            "# CONFIG_VMAP_STACK is not set\n",
        )
        .unwrap();
        assert_eq!(detect_vmap_stack(&dir, None), Some(false));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
