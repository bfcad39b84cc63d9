//! Pod and container labels on the profiles serve hands out: kubelet's names
//! ([`PodNames`]) for each sample's `cgroup` label.

use std::{collections::HashMap, io::Read};

use prost::Message;

use crate::kernel::pods::{PodNames, PodRef};
use crate::output::pprof::{Label, Profile};

/// Adds `pod` (namespace/pod) and `container` labels to every sample of a
/// gzipped profile whose `cgroup` label names a Kubernetes pod. `None` when
/// nothing was added (or the profile is not one of ours): the original is used.
pub fn label_profile(gz: &[u8], pods: &mut PodNames) -> Option<Vec<u8>> {
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut raw)
        .ok()?;
    let mut profile = Profile::decode(raw.as_slice()).ok()?;
    if !add_pod_labels(&mut profile, pods) {
        return None;
    }
    crate::output::pprof::encode(&profile).ok()
}

/// [`label_profile`] on a decoded profile: true when a label was added.
pub fn add_pod_labels(profile: &mut Profile, pods: &mut PodNames) -> bool {
    let Some(cgroup_key) = profile.string_table.iter().position(|s| s == "cgroup") else {
        return false;
    };
    let cgroup_key = cgroup_key as i64;
    let mut strings: HashMap<String, i64> = profile
        .string_table
        .iter()
        .enumerate()
        .map(|(i, s)| (s.clone(), i as i64))
        .collect();
    let mut intern = |table: &mut Vec<String>, s: &str| -> i64 {
        if let Some(&i) = strings.get(s) {
            return i;
        }
        table.push(s.to_string());
        let i = table.len() as i64 - 1;
        strings.insert(s.to_string(), i);
        i
    };
    let mut resolved: HashMap<i64, Option<PodRef>> = HashMap::new();
    let mut added = false;
    let (pod_key, container_key) = (
        intern(&mut profile.string_table, "pod"),
        intern(&mut profile.string_table, "container"),
    );
    for sample in &mut profile.sample {
        let Some(cgroup) = sample
            .label
            .iter()
            .find(|l| l.key == cgroup_key)
            .map(|l| l.str)
        else {
            continue;
        };
        let pod = resolved
            .entry(cgroup)
            .or_insert_with(|| {
                let path = profile.string_table.get(cgroup as usize)?;
                pods.resolve(path)
            })
            .clone();
        let Some(pod) = pod else {
            continue;
        };
        let value = intern(
            &mut profile.string_table,
            &format!("{}/{}", pod.namespace, pod.pod),
        );
        sample.label.push(Label {
            key: pod_key,
            str: value,
            ..Label::default()
        });
        if let Some(c) = &pod.container {
            let value = intern(&mut profile.string_table, c);
            sample.label.push(Label {
                key: container_key,
                str: value,
                ..Label::default()
            });
        }
        added = true;
    }
    added
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::pods::tests::{C1, UID};

    #[test]
    fn profiles_get_pod_and_container_labels() {
        use crate::output::pprof::Sample;
        let root = crate::kernel::pods::tests::fixture("pprof");
        let mut pods = PodNames::new(&root);
        let path = format!("/kubepods/burstable/pod{UID}/{C1}");
        let profile = Profile {
            string_table: vec![
                String::new(),
                "cgroup".into(),
                path,
                "/system.slice/cron.service".into(),
            ],
            sample: vec![
                Sample {
                    value: vec![1],
                    label: vec![Label {
                        key: 1,
                        str: 2,
                        ..Label::default()
                    }],
                    ..Sample::default()
                },
                Sample {
                    value: vec![1],
                    label: vec![Label {
                        key: 1,
                        str: 3,
                        ..Label::default()
                    }],
                    ..Sample::default()
                },
            ],
            ..Profile::default()
        };
        let gz = crate::output::pprof::encode(&profile).expect("encode");
        let labelled = label_profile(&gz, &mut pods).expect("labelled");
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(labelled.as_slice())
            .read_to_end(&mut raw)
            .expect("gunzip");
        let p = Profile::decode(raw.as_slice()).expect("decode");
        let labels = |i: usize| -> Vec<(String, String)> {
            p.sample[i]
                .label
                .iter()
                .map(|l| {
                    (
                        p.string_table[l.key as usize].clone(),
                        p.string_table[l.str as usize].clone(),
                    )
                })
                .collect()
        };
        assert!(labels(0).contains(&("pod".into(), "default/web-7d4b9c-x2x8q".into())));
        assert!(labels(0).contains(&("container".into(), "nginx".into())));
        assert_eq!(labels(1).len(), 1, "a non-pod cgroup gets no pod label");
        let _ = std::fs::remove_dir_all(&root);
    }
}
