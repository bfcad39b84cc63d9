//! BPF capability: can leaktrace attach on this node (root, tracefs, BTF, ring buffers).

use super::*;

#[derive(Debug, Clone, Serialize)]
pub struct BpfData {
    pub root: bool,
    pub btf: bool,
    pub kprobes: bool,
    /// The tracefs directory with kmem events, when one was found.
    pub tracefs: Option<String>,
    pub tracefs_note: Option<String>,
    pub kmem_tracepoints: bool,
    pub ring_buffer: Option<bool>,
    pub can_attach: bool,
    pub blockers: Vec<String>,
    pub next_command: String,
}

/// What is known about tracefs without mounting it (doctor changes nothing on the node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TracefsState {
    Found { path: String, kmem_events: bool },
    NotReadable(String),
    NotMounted,
}

/// The same discovery as the tracer's (`kernel/tracefs`), without its mount.
pub fn probe_tracefs(root: &Path) -> TracefsState {
    match crate::kernel::tracefs::find_mounted(root) {
        Ok(Some(place)) => TracefsState::Found {
            path: place.to_string(),
            kmem_events: root
                .join(place.trim_start_matches('/'))
                .join("events/kmem/kmalloc")
                .exists(),
        },
        Ok(None) => TracefsState::NotMounted,
        Err((place, e)) => {
            TracefsState::NotReadable(format!("{place} is not readable ({e}); it needs root"))
        }
    }
}

/// The kernel's BPF ring buffer, which leaktrace needs, arrived in 5.8. RHEL 8 backported
/// it into 4.18 builds, so there the version cannot answer and the load will.
pub(super) fn has_ring_buffer(release: &str) -> Option<bool> {
    let v = kernel::parse_version(release)?;
    if (v.major, v.minor) >= (5, 8) {
        return Some(true);
    }
    if kernel::rhel_build(release).is_some() && (v.major, v.minor) == (4, 18) {
        return None;
    }
    Some(false)
}

pub fn bpf_finding(
    root_user: bool,
    features: &Features,
    tracefs: &TracefsState,
    cache: Option<&str>,
) -> Finding {
    let ring_buffer = has_ring_buffer(&features.kernel_release);
    let mut blockers = Vec::new();
    if ring_buffer == Some(false) {
        blockers.push(format!(
            "kernel {} has no BPF ring buffer (needs 5.8+)",
            features.kernel_release
        ));
    }
    let (tracefs_path, tracefs_note, kmem_tracepoints) = match tracefs {
        TracefsState::Found { path, kmem_events } => {
            if !kmem_events {
                blockers.push(format!("{path}/events/kmem has no kmalloc tracepoint"));
            }
            (Some(path.clone()), None, *kmem_events)
        }
        TracefsState::NotReadable(why) => (None, Some(why.clone()), false),
        TracefsState::NotMounted => (
            None,
            Some("tracefs is not mounted; leaktrace mounts it at /sys/kernel/tracing when run as root".to_string()),
            false,
        ),
    };
    let can_attach = blockers.is_empty() && ring_buffer != Some(false);
    // Without a cache to name, the catalogue is where to pick one.
    let command = cache.map_or_else(
        || "leaktrace caches".to_string(),
        |c| format!("leaktrace --cache {c} --top"),
    );
    let next_command = match (can_attach, root_user) {
        (true, true) => command,
        (true, false) => format!("sudo {command}"),
        // Without BPF the best leaktrace-free step is watching the suspect grow.
        (false, _) => cache.map_or_else(
            || "slabtop -s c".to_string(),
            |c| format!("watch -n 1 \"grep -E '^{c} ' /proc/slabinfo\""),
        ),
    };
    let yes = |b: bool| if b { "yes" } else { "no" };
    let tracefs_word = match tracefs {
        TracefsState::Found { .. } => "yes",
        TracefsState::NotReadable(_) => "unknown",
        TracefsState::NotMounted => "not mounted",
    };
    let mut summary = if !can_attach {
        format!("leaktrace cannot attach here: {}", blockers.join("; "))
    } else if root_user {
        "leaktrace can attach here".to_string()
    } else {
        "leaktrace can attach here as root (this user is not root)".to_string()
    };
    summary.push_str(&format!(
        " (root {}, BTF {}, tracefs {}, kprobes {})",
        yes(root_user),
        yes(features.btf),
        tracefs_word,
        yes(features.kprobes)
    ));
    let mut details = Vec::new();
    if ring_buffer.is_none() {
        details.push(format!(
            "BPF ring buffer: unknown on {} (backports); loading leaktrace will tell",
            features.kernel_release
        ));
    }
    if !features.btf {
        details.push(
            "no BTF: classic kmem tracepoints are used (layouts from tracefs format files)"
                .to_string(),
        );
    }
    if let Some(note) = &tracefs_note {
        details.push(note.clone());
    }
    if !features.kprobes {
        details.push(
            "no kprobes on this kernel: not needed, slab tracing uses tracepoints".to_string(),
        );
    }
    Finding {
        check: "bpf",
        severity: if can_attach {
            Severity::Ok
        } else {
            Severity::Warning
        },
        summary,
        details,
        data: Some(Data::Bpf(BpfData {
            root: root_user,
            btf: features.btf,
            kprobes: features.kprobes,
            tracefs: tracefs_path,
            tracefs_note,
            kmem_tracepoints,
            ring_buffer,
            can_attach,
            blockers,
            next_command,
        })),
    }
}
