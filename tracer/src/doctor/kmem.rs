//! Kmem accounting and the kernel version: what charges slab to memory cgroups here.

use super::*;

#[derive(Debug, Clone, Serialize)]
pub struct KmemData {
    pub kernel_release: String,
    pub known_issues: Vec<KnownIssue>,
    pub cgroup_version: Option<CgroupVersion>,
    /// cgroup v1 only.
    pub kmem: Option<KmemState>,
    pub cgroups_unknown: Option<String>,
}

pub fn kmem_finding(
    release: &str,
    version: Result<CgroupVersion, String>,
    kmem: Option<KmemState>,
) -> Finding {
    let known_issues = kernel::known_issues(release);
    let active = kmem
        .as_ref()
        .is_some_and(|k| k.with_kmem_limit > 0 || k.with_kmem_usage > 0);
    let severity = if known_issues.iter().any(|i| i.needs_kmem_active) && active {
        Severity::Critical
    } else if !known_issues.is_empty() {
        Severity::Warning
    } else {
        Severity::Ok
    };
    let mut parts = Vec::new();
    let mut details = Vec::new();
    match (&version, &kmem) {
        (Ok(CgroupVersion::V1), Some(k)) => {
            let state = if k.nokmem {
                "off (cgroup.memory=nokmem)".to_string()
            } else if !k.kmem_files {
                "interface absent (no memory.kmem.* files)".to_string()
            } else {
                let usage = k
                    .root_kmem_usage_bytes
                    .map(|u| format!(", root kmem usage {}", human_bytes(u)))
                    .unwrap_or_default();
                format!("on{usage}")
            };
            parts.push(format!("cgroup v1 kmem accounting {state}"));
            parts.push(format!(
                "{} kubepods/docker cgroups, {} charging kmem, {} with a kmem limit",
                k.container_cgroups, k.with_kmem_usage, k.with_kmem_limit
            ));
            details.push(format!(
                "memory.kmem.slabinfo {}",
                if k.slabinfo_readable {
                    "readable"
                } else {
                    "not readable"
                }
            ));
            for e in &k.examples {
                details.push(format!("  e.g. {e}"));
            }
        }
        (Ok(CgroupVersion::V2), _) => parts.push(
            "cgroup v2: kernel memory is always accounted (no memory.kmem.* knobs)".to_string(),
        ),
        (Ok(CgroupVersion::V1), None) => {}
        (Err(why), _) => parts.push(format!("kmem accounting unknown: {why}")),
    }
    if known_issues.is_empty() {
        parts.push(format!("kernel {release}: no known memcg/kmem leak range"));
    } else {
        parts.push(format!(
            "kernel {release} is in {} known-affected range(s)",
            known_issues.len()
        ));
        for i in &known_issues {
            details.push(format!("{}: {}", i.id, i.summary));
        }
    }
    let (cgroup_version, cgroups_unknown) = match version {
        Ok(v) => (Some(v), None),
        Err(why) => (None, Some(why)),
    };
    Finding {
        check: "kmem",
        severity,
        summary: parts.join("; "),
        details,
        data: Some(Data::Kmem(KmemData {
            kernel_release: release.to_string(),
            known_issues,
            cgroup_version,
            kmem,
            cgroups_unknown,
        })),
    }
}
