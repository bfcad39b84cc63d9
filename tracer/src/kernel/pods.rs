//! Kubernetes names for cgroup paths, with no API server: the pod UID (and
//! container id) that [`crate::kernel::cgroup_paths::decode`] reads from a cgroup path
//! of either kubelet cgroup driver, joined with what kubelet writes on every
//! node anyway:
//!
//! - `/var/log/pods/<namespace>_<pod>_<uid>/` per pod (names cannot contain
//!   `_`, so the three parts split unambiguously);
//! - `/var/log/containers/<pod>_<namespace>_<container>-<id>.log` per container.
//!
//! Kubelet garbage-collects a deleted pod's directories, yet its dying memcgs
//! (and the objects charged to them) outlive it: names once seen are kept for
//! [`KEEP`] after they were last seen, so a profile taken after the pod is gone
//! still names it.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::kernel::cgroup_paths as paths;

/// How long a pod's or container's name outlives its kubelet directory.
const KEEP: Duration = Duration::from_secs(24 * 3600);
/// Rescans on unknown UIDs happen at most this often: a cgroup outside
/// Kubernetes (system services) must not make every lookup list directories.
const RESCAN_MIN: Duration = Duration::from_secs(10);
/// Bound on names kept, whatever the pod churn.
const MAX_ENTRIES: usize = 20_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub pod: String,
    pub uid: String,
    /// The container's name, where the cgroup path carries its id and kubelet's
    /// container log link for that id exists (or existed).
    pub container: Option<String>,
}

pub struct PodNames {
    pods_dir: PathBuf,
    containers_dir: PathBuf,
    /// uid -> (namespace, pod, last seen)
    pods: HashMap<String, (String, String, Instant)>,
    /// container id -> (container name, last seen)
    containers: HashMap<String, (String, Instant)>,
    scanned: Option<Instant>,
}

impl PodNames {
    /// `root` is `/` on a node, a fixture tree in tests.
    pub fn new(root: &Path) -> PodNames {
        PodNames {
            pods_dir: root.join("var/log/pods"),
            containers_dir: root.join("var/log/containers"),
            pods: HashMap::new(),
            containers: HashMap::new(),
            scanned: None,
        }
    }

    /// The pod (and container) a cgroup path belongs to, if kubelet named it.
    pub fn resolve(&mut self, cgroup_path: &str) -> Option<PodRef> {
        let info = paths::decode(cgroup_path);
        let uid = info.pod_uid?;
        let known = self.pods.contains_key(&uid)
            && info
                .container_id
                .as_ref()
                .is_none_or(|id| self.containers.contains_key(id));
        if !known && self.scanned.is_none_or(|at| at.elapsed() >= RESCAN_MIN) {
            self.rescan();
        }
        let (namespace, pod, _) = self.pods.get(&uid)?;
        Some(PodRef {
            namespace: namespace.clone(),
            pod: pod.clone(),
            container: info
                .container_id
                .as_ref()
                .and_then(|id| self.containers.get(id))
                .map(|(name, _)| name.clone()),
            uid,
        })
    }

    fn rescan(&mut self) {
        let now = Instant::now();
        self.scanned = Some(now);
        for name in dir_names(&self.pods_dir) {
            if let Some((ns, pod, uid)) = parse_pod_dir(&name) {
                self.pods.insert(uid, (ns, pod, now));
            }
        }
        for name in dir_names(&self.containers_dir) {
            if let Some((_, _, container, id)) = parse_container_log(&name) {
                self.containers.insert(id, (container, now));
            }
        }
        self.pods
            .retain(|_, (_, _, seen)| now.duration_since(*seen) < KEEP);
        self.containers
            .retain(|_, (_, seen)| now.duration_since(*seen) < KEEP);
        // Past the bound, the names not seen the longest go first.
        if self.pods.len() > MAX_ENTRIES {
            let mut ages: Vec<Instant> = self.pods.values().map(|(_, _, s)| *s).collect();
            ages.sort();
            let cut = ages[ages.len() - MAX_ENTRIES];
            self.pods.retain(|_, (_, _, s)| *s >= cut);
        }
        if self.containers.len() > MAX_ENTRIES {
            let mut ages: Vec<Instant> = self.containers.values().map(|(_, s)| *s).collect();
            ages.sort();
            let cut = ages[ages.len() - MAX_ENTRIES];
            self.containers.retain(|_, (_, s)| *s >= cut);
        }
    }
}

fn dir_names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect()
}

/// `<namespace>_<pod>_<uid>` -> (namespace, pod, uid).
fn parse_pod_dir(name: &str) -> Option<(String, String, String)> {
    let mut parts = name.splitn(3, '_');
    let (ns, pod, uid) = (parts.next()?, parts.next()?, parts.next()?);
    if ns.is_empty() || pod.is_empty() || !is_uid(uid) {
        return None;
    }
    Some((ns.to_string(), pod.to_string(), uid.to_string()))
}

/// `<pod>_<namespace>_<container>-<id>.log` -> (pod, namespace, container, id).
fn parse_container_log(name: &str) -> Option<(String, String, String, String)> {
    let stem = name.strip_suffix(".log")?;
    let (rest, id) = stem.rsplit_once('-')?;
    if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut parts = rest.splitn(3, '_');
    let (pod, ns, container) = (parts.next()?, parts.next()?, parts.next()?);
    if pod.is_empty() || ns.is_empty() || container.is_empty() {
        return None;
    }
    Some((
        pod.to_string(),
        ns.to_string(),
        container.to_string(),
        id.to_string(),
    ))
}

fn is_uid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| {
            matches!(i, 8 | 13 | 18 | 23) == (b == b'-') && (b == b'-' || b.is_ascii_hexdigit())
        })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const UID: &str = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
    const UID2: &str = "6f1c0a2e-0000-4a5b-9c1d-2e3f4a5b6c7d";
    pub(crate) const C1: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const C2: &str = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";

    /// kubelet's directories for two pods: web (container nginx, C1) in
    /// default, and db (container postgres, C2) in prod.
    pub(crate) fn fixture(name: &str) -> PathBuf {
        let root =
            std::env::temp_dir().join(format!("leaktrace-k8s-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (ns, pod, uid, container, id) in [
            ("default", "web-7d4b9c-x2x8q", UID, "nginx", C1),
            ("prod", "db-0", UID2, "postgres", C2),
        ] {
            let pod_dir = root.join(format!("var/log/pods/{ns}_{pod}_{uid}/{container}"));
            std::fs::create_dir_all(&pod_dir).expect("pod dir");
            std::fs::write(pod_dir.join("0.log"), "").expect("log");
            let links = root.join("var/log/containers");
            std::fs::create_dir_all(&links).expect("containers dir");
            std::os::unix::fs::symlink(
                pod_dir.join("0.log"),
                links.join(format!("{pod}_{ns}_{container}-{id}.log")),
            )
            .expect("link");
        }
        root
    }

    /// `namespace/pod/container`, or `namespace/pod` for the pod-level cgroup.
    fn named(pods: &mut PodNames, path: &str) -> Option<String> {
        pods.resolve(path).map(|p| match &p.container {
            Some(c) => format!("{}/{}/{c}", p.namespace, p.pod),
            None => format!("{}/{}", p.namespace, p.pod),
        })
    }

    #[test]
    fn cgroupfs_driver_paths() {
        let root = fixture("cgroupfs");
        let mut pods = PodNames::new(&root);
        let pod = format!("/kubepods/burstable/pod{UID}");
        assert_eq!(
            named(&mut pods, &pod).as_deref(),
            Some("default/web-7d4b9c-x2x8q")
        );
        assert_eq!(
            named(&mut pods, &format!("{pod}/{C1}")).as_deref(),
            Some("default/web-7d4b9c-x2x8q/nginx")
        );
        assert_eq!(
            named(&mut pods, &format!("/kubepods/pod{UID2}/{C2}")).as_deref(),
            Some("prod/db-0/postgres")
        );
        assert_eq!(named(&mut pods, "/system.slice/sshd.service"), None);
        assert_eq!(
            named(
                &mut pods,
                "/kubepods/besteffort/pod00000000-0000-0000-0000-000000000000"
            ),
            None
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn systemd_driver_paths_with_underscored_uids_and_runtime_scopes() {
        let root = fixture("systemd");
        let mut pods = PodNames::new(&root);
        let slice = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
            UID.replace('-', "_")
        );
        assert_eq!(
            named(&mut pods, &slice).as_deref(),
            Some("default/web-7d4b9c-x2x8q")
        );
        for scope in [
            format!("cri-containerd-{C1}.scope"),
            format!("crio-{C1}.scope"),
            format!("docker-{C1}.scope"),
        ] {
            assert_eq!(
                named(&mut pods, &format!("{slice}/{scope}")).as_deref(),
                Some("default/web-7d4b9c-x2x8q/nginx"),
                "{scope}"
            );
        }
        let guaranteed = format!(
            "/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{C2}.scope",
            UID2.replace('-', "_")
        );
        assert_eq!(
            named(&mut pods, &guaranteed).as_deref(),
            Some("prod/db-0/postgres")
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn names_outlive_kubelets_garbage_collection() {
        let root = fixture("gc");
        let mut pods = PodNames::new(&root);
        let path = format!("/kubepods/burstable/pod{UID}/{C1}");
        assert!(named(&mut pods, &path).is_some());
        // Pod deleted: kubelet removes its directories, the dying memcg stays.
        std::fs::remove_dir_all(root.join("var/log")).expect("gc");
        pods.scanned = None;
        pods.rescan();
        assert_eq!(
            named(&mut pods, &path).as_deref(),
            Some("default/web-7d4b9c-x2x8q/nginx")
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn kubelet_names_parse_strictly() {
        assert_eq!(
            parse_pod_dir(&format!("kube-system_coredns-abc_{UID}")),
            Some(("kube-system".into(), "coredns-abc".into(), UID.into()))
        );
        assert_eq!(parse_pod_dir("kube-system_coredns-abc_not-a-uid"), None);
        assert_eq!(
            parse_container_log(&format!("coredns-abc_kube-system_coredns-{C1}.log")),
            Some((
                "coredns-abc".into(),
                "kube-system".into(),
                "coredns".into(),
                C1.into()
            ))
        );
        assert_eq!(
            parse_container_log("coredns-abc_kube-system_coredns-1234.log"),
            None
        );
    }
}
