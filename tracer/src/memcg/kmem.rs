//! The seed incident's question, "does this node charge kernel memory to its
//! memory cgroups?", answered by the kernel's own rule rather than by the
//! presence of `memory.kmem.*` files:
//! - cgroup v1 before 4.6: only in memcgs where a kmem limit was written
//!   (`memory.kmem.limit_in_bytes`; that write turned accounting on);
//! - cgroup v1 from 4.6, and cgroup v2: always, unless the kernel was booted
//!   with `cgroup.memory=nokmem`.
//!
//! Charged kernel memory (slab, kernel stacks, page tables, pipe buffers...)
//! is what made memcgs outlive their cgroups before 5.9; how much each dying
//! memcg still holds is the walk's `kernel` column (MEMCG_KMEM).

use std::{fs, path::Path};

use serde::Serialize;

use crate::kernel::{cgroupfs::Hierarchy, facts::parse_version};

#[derive(Debug, Clone, Serialize)]
pub struct Accounting {
    /// "yes", "no", or "only where a kmem limit was written".
    pub charged: String,
    /// Why, in the kernel's terms.
    pub rule: String,
}

/// (major, minor) of `release`, as `kernel::facts` parses it.
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    parse_version(release).map(|v| (v.major, v.minor))
}

impl Accounting {
    /// `release`: the running kernel's (`kernel::facts`), empty when unreadable.
    pub fn detect(root: &Path, h: &Hierarchy, release: &str) -> Accounting {
        let cmdline = fs::read_to_string(root.join("proc/cmdline")).unwrap_or_default();
        Self::decide(h.version, release, &cmdline)
    }

    pub fn decide(version: u8, release: &str, cmdline: &str) -> Accounting {
        let nokmem = cmdline
            .split_whitespace()
            .any(|a| a == "cgroup.memory=nokmem");
        let Some(kv) = kernel_version(release) else {
            return Accounting {
                charged: "unknown".into(),
                rule: format!("unknown on this kernel: cannot parse release {release:?}"),
            };
        };
        let (charged, rule) = match (version, kv < (4, 6), nokmem) {
            (_, false, true) => (
                "no",
                "booted with cgroup.memory=nokmem: kernel memory is charged to no memcg",
            ),
            (1, true, _) => (
                "only where a kmem limit was written",
                "cgroup v1 before 4.6: a memcg charges kernel memory once memory.kmem.limit_in_bytes was written",
            ),
            (1, false, false) => (
                "yes",
                "cgroup v1 from 4.6: kernel memory is charged to every memcg (no cgroup.memory=nokmem)",
            ),
            _ => (
                "yes",
                "cgroup v2: kernel memory is always charged (no cgroup.memory=nokmem)",
            ),
        };
        Accounting {
            charged: charged.into(),
            rule: format!("{rule}; kernel {release}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_rule() {
        assert_eq!(
            Accounting::decide(1, "4.4.0-1", "").charged,
            "only where a kmem limit was written"
        );
        assert_eq!(Accounting::decide(1, "5.10.0", "quiet").charged, "yes");
        assert_eq!(
            Accounting::decide(1, "6.18.44-fc", "cgroup.memory=nokmem").charged,
            "no"
        );
        assert_eq!(Accounting::decide(2, "6.1.0", "").charged, "yes");
        assert_eq!(Accounting::decide(2, "garbage", "").charged, "unknown");
        assert_eq!(kernel_version("6.18.44-fc-v657"), Some((6, 18)));
    }
}
