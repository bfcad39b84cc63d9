//! `leaktrace memcg --pprof` and serve's `/debug/pprof/memcg`: the dying
//! memory cgroups of a memcg report as a pprof profile, so the question "what
//! pins them" opens in `go tool pprof`, Parca or Pyroscope like a heap profile.
//!
//! Shape: each dying (or zombie) memcg is a two-frame stack, `memcg PATH`
//! called from `created by COMM` (or `created before tracing`). It carries
//! one `dying_memcgs` sample; each stack of charged objects still pinning it
//! hangs below it (kernel frames leaf first, as the report lists them) with
//! `pinned_objects`/`pinned_space`. Pins the report did not draw a stack for
//! (beyond `--stacks`, or `--no-kernel-stacks`) stay on the memcg's own
//! frames, so the per-memcg totals are the report's exactly.

use anyhow::Result;

use super::pprof::{encode, Builder, Label, Sample};
use crate::memcg::report::{MemcgReport, Phase, Report};

const SAMPLE_TYPES: [(&str, &str); 3] = [
    ("dying_memcgs", "count"),
    ("pinned_objects", "count"),
    ("pinned_space", "bytes"),
];

/// The gzipped profile of `report`'s dying memcgs, stamped now.
pub fn profile(report: &Report) -> Result<Vec<u8>> {
    let wall_clock_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    let mut b = Builder::new();
    b.sample_types(&SAMPLE_TYPES, "pinned_space");
    b.profile.time_nanos = wall_clock_ns;
    b.profile.duration_nanos = (report.elapsed_s * 1e9) as i64;
    let comment = b.string(&format!(
        "leaktrace memcg {} report: dying memcgs (zombie after {} s) and the charged slab \
         objects allocated in each since tracing started that still pin it; charges made \
         before tracing are not seen here (leaktrace memcg --why ID reads them)",
        report.kind, report.zombie_after_s
    ));
    b.profile.comment.push(comment);
    let kernel = b.mapping("[kernel.kallsyms]");
    let synthetic = b.mapping("[memcg]");
    for m in report.snapshot.memcgs.iter().filter(|m| dying(m)) {
        let own = memcg_frames(&mut b, synthetic, m);
        let base = memcg_labels(&mut b, m);
        b.profile.sample.push(Sample {
            location_id: own.clone(),
            value: vec![1, 0, 0],
            label: base.clone(),
        });
        let (mut objects, mut bytes) = (m.pinned.objects, m.pinned.bytes);
        for pin in &m.pinned_stacks {
            let mut location_id = b.named_locations(kernel, &pin.kernel);
            location_id.extend(&own);
            let mut label = base.clone();
            label.push(text_label(&mut b, "cache", &pin.cache));
            label.push(text_label(&mut b, "pin_comm", &pin.comm));
            label.push(number_label(&mut b, "pin_pid", i64::from(pin.tgid)));
            b.profile.sample.push(Sample {
                location_id,
                value: vec![0, count(pin.count.objects), count(pin.count.bytes)],
                label,
            });
            objects = objects.saturating_sub(pin.count.objects);
            bytes = bytes.saturating_sub(pin.count.bytes);
        }
        if objects > 0 || bytes > 0 {
            b.profile.sample.push(Sample {
                location_id: own,
                value: vec![0, count(objects), count(bytes)],
                label: base,
            });
        }
    }
    encode(&b.profile)
}

fn dying(m: &MemcgReport) -> bool {
    matches!(m.state, Phase::Dying | Phase::Zombie)
}

fn count(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Leaf first: the memcg, then who created it.
fn memcg_frames(b: &mut Builder, mapping: u64, m: &MemcgReport) -> Vec<u64> {
    let creator = match &m.creator {
        Some(a) => format!("created by {}", a.comm),
        None if m.preexisting => "created before tracing".to_string(),
        None => "creator not seen".to_string(),
    };
    b.named_locations(mapping, &[format!("memcg {}", m.path), creator])
}

fn text_label(b: &mut Builder, key: &str, value: &str) -> Label {
    Label {
        key: b.string(key),
        str: b.string(value),
        num: 0,
        num_unit: 0,
    }
}

fn number_label(b: &mut Builder, key: &str, value: i64) -> Label {
    Label {
        key: b.string(key),
        str: 0,
        num: value,
        num_unit: 0,
    }
}

/// The labels every sample of a memcg carries.
fn memcg_labels(b: &mut Builder, m: &MemcgReport) -> Vec<Label> {
    let state = if m.state == Phase::Zombie {
        "zombie"
    } else {
        "dying"
    };
    let mut out = vec![
        // "cgroup" as in the slab profiles (serve adds pod names by it).
        text_label(b, "cgroup", &m.path),
        number_label(b, "memcg_id", count(m.id)),
        text_label(b, "state", state),
    ];
    if let Some(uid) = &m.container.pod_uid {
        out.push(text_label(b, "pod_uid", uid));
    }
    if let Some(id) = &m.container.container_id {
        out.push(text_label(b, "container_id", id));
    }
    out
}
