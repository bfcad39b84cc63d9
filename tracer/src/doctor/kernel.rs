//! The running kernel's version against releases with known memcg / kmem accounting
//! problems. Ranges are matched on the version the release string starts with; RHEL
//! kernels (`4.18.0-<build>.el8`) carry backports, so their build number decides instead.

use serde::Serialize;

pub use crate::kernel::facts::parse_version;

/// The build number of a RHEL/CentOS kernel (`4.18.0-176.el8` -> 176): backports make
/// the upstream version alone misleading there.
pub fn rhel_build(release: &str) -> Option<u32> {
    if !release.contains(".el") {
        return None;
    }
    let (_, rest) = release.split_once('-')?;
    rest.split('.').next()?.parse().ok()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KnownIssue {
    pub id: &'static str,
    pub summary: &'static str,
    /// True when the problem needs cgroup v1 kmem accounting switched on per cgroup. Before
    /// 4.0 accounting starts when memory.kmem.limit_in_bytes is first written; runc wrote 1
    /// then -1, so the limit reads unlimited and only a non-zero kmem usage shows it is on.
    pub needs_kmem_active: bool,
}

const PER_MEMCG_CACHES_NEVER_FREED: KnownIssue = KnownIssue {
    id: "kmem-caches-leak",
    summary: "before 4.0 (RHEL 7 3.10.0-*), a cgroup v1 kmem limit (set by runc/kubelet built \
              with kmem) gives each memcg its own slab caches that are never destroyed: slab \
              grows with every pod and mkdir in the memory cgroup eventually fails with ENOMEM",
    needs_kmem_active: true,
};

const MEMORY_STAT_SLOW: KnownIssue = KnownIssue {
    id: "memory-stat-slow",
    summary: "before 5.2 (RHEL 8 before 4.18.0-176), memory.stat sums statistics over every \
              descendant including dying memcgs: reading it takes seconds on a node with many \
              zombies",
    needs_kmem_active: false,
};

const SLAB_PINS_DYING_MEMCGS: KnownIssue = KnownIssue {
    id: "slab-pins-memcg",
    summary: "before 5.9, charged slab objects live in per-memcg cache copies and are not \
              reparented: any kernel object a container left behind keeps its memcg dying",
    needs_kmem_active: false,
};

/// Which known issues apply to `release`.
pub fn known_issues(release: &str) -> Vec<KnownIssue> {
    let Some(v) = parse_version(release) else {
        return Vec::new();
    };
    let before = |major, minor| (v.major, v.minor) < (major, minor);
    let rhel = rhel_build(release);
    let mut out = Vec::new();
    if before(4, 0) {
        out.push(PER_MEMCG_CACHES_NEVER_FREED);
    }
    let stat_slow = match rhel {
        // The RHEL 8 fix was backported into 4.18.0-176.
        Some(build) if (v.major, v.minor) == (4, 18) => build < 176,
        _ => before(5, 2),
    };
    if stat_slow {
        out.push(MEMORY_STAT_SLOW);
    }
    if before(5, 9) {
        out.push(SLAB_PINS_DYING_MEMCGS);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(release: &str) -> Vec<&'static str> {
        known_issues(release).iter().map(|i| i.id).collect()
    }

    #[test]
    fn versions_parse() {
        let v = parse_version("6.18.44-fc-v669").expect("version");
        assert_eq!((v.major, v.minor, v.patch), (6, 18, 44));
        let v = parse_version("3.10.0-1160.el7.x86_64").expect("version");
        assert_eq!((v.major, v.minor, v.patch), (3, 10, 0));
        let v = parse_version("5.4").expect("version");
        assert_eq!((v.major, v.minor, v.patch), (5, 4, 0));
        assert_eq!(parse_version("unknown"), None);
        assert_eq!(parse_version(""), None);
        assert_eq!(rhel_build("4.18.0-176.el8.x86_64"), Some(176));
        assert_eq!(rhel_build("6.1.0-18-cloud-amd64"), None);
    }

    #[test]
    fn ranges() {
        assert_eq!(
            ids("3.10.0-1160.el7.x86_64"),
            ["kmem-caches-leak", "memory-stat-slow", "slab-pins-memcg"]
        );
        assert_eq!(ids("4.14.0"), ["memory-stat-slow", "slab-pins-memcg"]);
        assert_eq!(
            ids("4.18.0-147.el8.x86_64"),
            ["memory-stat-slow", "slab-pins-memcg"]
        );
        assert_eq!(ids("4.18.0-176.el8.x86_64"), ["slab-pins-memcg"]);
        assert_eq!(ids("5.4.0-42-generic"), ["slab-pins-memcg"]);
        assert!(ids("5.10.0-26-cloud-amd64").is_empty());
        assert!(ids("6.18.44-fc-v669").is_empty());
        assert!(ids("unknown").is_empty());
        assert!(known_issues("3.10.0")[0].needs_kmem_active);
    }
}
