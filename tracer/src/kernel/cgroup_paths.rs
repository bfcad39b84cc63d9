//! What a memcg's path says about who owns it: container runtime, Kubernetes
//! pod UID and container id, for the layouts kubelet and the runtimes create
//! (cgroupfs and systemd drivers). Pure functions, so every layout is tested.

use serde::Serialize;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ContainerInfo {
    /// containerd, cri-o, docker, podman; None when the path does not say.
    pub runtime: Option<&'static str>,
    pub pod_uid: Option<String>,
    /// The runtime's full container id (64 hex digits for all of them).
    pub container_id: Option<String>,
    /// The runtime's monitor process scope (crio-conmon-*, libpod-conmon-*), not the container.
    pub conmon: bool,
}

impl ContainerInfo {
    pub fn is_empty(&self) -> bool {
        self.runtime.is_none() && self.pod_uid.is_none() && self.container_id.is_none()
    }
}

/// Scope prefixes of the runtimes' systemd units (and cgroupfs directories).
const PREFIXES: [(&str, &str, bool); 6] = [
    ("cri-containerd-", "containerd", false),
    ("crio-conmon-", "cri-o", true),
    ("crio-", "cri-o", false),
    ("docker-", "docker", false),
    ("libpod-conmon-", "podman", true),
    ("libpod-", "podman", false),
];

pub fn decode(path: &str) -> ContainerInfo {
    let mut info = ContainerInfo::default();
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let in_kubepods = parts.iter().any(|p| p.starts_with("kubepods"));
    for (i, raw) in parts.iter().enumerate() {
        let comp = raw
            .strip_suffix(".scope")
            .or_else(|| raw.strip_suffix(".slice"))
            .unwrap_or(raw);
        if in_kubepods {
            if let Some(uid) = pod_uid(comp) {
                info.pod_uid = Some(uid);
                continue;
            }
        }
        if let Some((runtime, conmon, id)) = PREFIXES.iter().find_map(|&(p, r, c)| {
            comp.strip_prefix(p)
                .filter(|id| is_container_id(id))
                .map(|id| (r, c, id))
        }) {
            info.runtime = Some(runtime);
            info.conmon = conmon;
            info.container_id = Some(id.to_string());
            continue;
        }
        if is_container_id(comp) {
            // cgroupfs driver: a bare id. Under /docker/ it is docker's; under a
            // kubepods pod directory the runtime is not in the path.
            if i > 0 && parts[i - 1] == "docker" {
                info.runtime = Some("docker");
            }
            info.container_id = Some(comp.to_string());
        }
    }
    info
}

/// `pod<uid>` (cgroupfs) or `kubepods[-<qos>]-pod<uid_with_underscores>` (systemd).
fn pod_uid(comp: &str) -> Option<String> {
    let rest = if let Some(rest) = comp.strip_prefix("pod") {
        rest
    } else if comp.starts_with("kubepods") {
        let at = comp.rfind("-pod")?;
        &comp[at + 4..]
    } else {
        return None;
    };
    // Pod UIDs are UUIDs; static pods use a 32-hex hash. systemd cannot have
    // '-' inside a slice name component, so kubelet writes '_' there.
    let uid = rest.replace('_', "-");
    let ok = uid.len() >= 32 && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    ok.then_some(uid)
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f3a0b9c2d1e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a";
    const UID: &str = "8e4b1c2d-3f4a-5b6c-7d8e-9f0a1b2c3d4e";

    fn uid_underscored() -> String {
        UID.replace('-', "_")
    }

    #[test]
    fn kubepods_cgroupfs_containerd() {
        let p = format!("/kubepods/burstable/pod{UID}/{ID}");
        let d = decode(&p);
        assert_eq!(d.pod_uid.as_deref(), Some(UID));
        assert_eq!(d.container_id.as_deref(), Some(ID));
        assert_eq!(d.runtime, None, "cgroupfs paths do not name the runtime");
        // Guaranteed QoS has no QoS directory; the pod directory alone is a pod.
        let d = decode(&format!("/kubepods/pod{UID}"));
        assert_eq!(d.pod_uid.as_deref(), Some(UID));
        assert_eq!(d.container_id, None);
    }

    #[test]
    fn kubepods_systemd_cri_containerd() {
        let p = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{ID}.scope",
            uid_underscored()
        );
        let d = decode(&p);
        assert_eq!(d.runtime, Some("containerd"));
        assert_eq!(d.pod_uid.as_deref(), Some(UID));
        assert_eq!(d.container_id.as_deref(), Some(ID));
        assert!(!d.conmon);
        // Guaranteed pods: kubepods-pod<uid>.slice directly under kubepods.slice.
        let p = format!(
            "/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{ID}.scope",
            uid_underscored()
        );
        assert_eq!(decode(&p).pod_uid.as_deref(), Some(UID));
    }

    #[test]
    fn crio_systemd_and_conmon() {
        let base = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
            uid_underscored()
        );
        let d = decode(&format!("{base}/crio-{ID}.scope"));
        assert_eq!(d.runtime, Some("cri-o"));
        assert_eq!(d.container_id.as_deref(), Some(ID));
        assert_eq!(d.pod_uid.as_deref(), Some(UID));
        assert!(!d.conmon);
        let d = decode(&format!("{base}/crio-conmon-{ID}.scope"));
        assert_eq!(d.runtime, Some("cri-o"));
        assert!(d.conmon);
        // cri-o with the cgroupfs driver.
        let d = decode(&format!("/kubepods/besteffort/pod{UID}/crio-{ID}"));
        assert_eq!(
            (d.runtime, d.pod_uid.as_deref(), d.container_id.as_deref()),
            (Some("cri-o"), Some(UID), Some(ID))
        );
    }

    #[test]
    fn docker_systemd_and_cgroupfs() {
        let d = decode(&format!("/system.slice/docker-{ID}.scope"));
        assert_eq!(
            (d.runtime, d.container_id.as_deref(), d.pod_uid.as_deref()),
            (Some("docker"), Some(ID), None)
        );
        let d = decode(&format!("/docker/{ID}"));
        assert_eq!(
            (d.runtime, d.container_id.as_deref()),
            (Some("docker"), Some(ID))
        );
        let d = decode(&format!(
            "/kubepods.slice/kubepods-pod{}.slice/docker-{ID}.scope",
            uid_underscored()
        ));
        assert_eq!(
            (d.runtime, d.pod_uid.as_deref()),
            (Some("docker"), Some(UID))
        );
    }

    #[test]
    fn podman_and_plain_paths() {
        let d = decode(&format!("/machine.slice/libpod-{ID}.scope"));
        assert_eq!((d.runtime, d.conmon), (Some("podman"), false));
        assert!(decode("/").is_empty());
        assert!(decode("/system.slice/sshd.service").is_empty());
        assert!(decode("/process_api/ae74de6d8c20315479205547b4a622c6").is_empty());
        // A short or non-hex suffix is not a container id.
        assert!(decode("/system.slice/docker-compose.scope").is_empty());
        assert!(
            decode("/pod123").is_empty(),
            "pod dirs outside kubepods are not pods"
        );
    }
}
