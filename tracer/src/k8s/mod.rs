//! Kubernetes names for cgroup paths, without an API server.
pub struct PodNames;

impl PodNames {
    pub fn new(_root: &std::path::Path) -> PodNames {
        PodNames
    }
}

pub fn label_profile(_gz: &[u8], _pods: &mut PodNames) -> Option<Vec<u8>> {
    None
}
