//! `--all-caches` as a Go heap profile: what `go tool pprof`, Parca and
//! Pyroscope read from a Go program's `/debug/pprof/heap`, for the kernel's
//! slab caches. Sample types in Go's order (`alloc_objects`, `alloc_space`,
//! `inuse_objects`, `inuse_space`; `inuse_space` the default), labels
//! `cache`, `pid`, `comm`, `cgroup`, `pod`, `container`, `period_type`
//! space/bytes with the sampling rate as `period`, as Go's
//! `runtime.MemProfileRate` profiles carry. Values are the samples'
//! unbiased estimates (`slab/kheap.rs`).

use std::collections::HashMap;

use crate::{
    output::pprof::{process_image, Builder, Label, Profile, Sample, ValueType},
    slab::report::{KheapRow, Location, ProcessReport, Report, StackReport, FORGOTTEN},
};

/// Go's heap profile sample types, in its order.
pub const SAMPLE_TYPES: [(&str, &str); 4] = [
    ("alloc_objects", "count"),
    ("alloc_space", "bytes"),
    ("inuse_objects", "count"),
    ("inuse_space", "bytes"),
];

/// The report's `kheap` estimates as a profile; None when the report has
/// none (not an `--all-caches` run).
pub fn build(report: &Report, wall_clock_ns: i64) -> Option<Profile> {
    let kheap = report.kheap.as_ref()?;
    let mut b = header(kheap.sample_bytes, wall_clock_ns);
    b.profile.duration_nanos = (report.elapsed_s * 1e9) as i64;
    let comment = b.string(&format!(
        "leaktrace kernel heap profile, every slab cache: sampled, one allocation per {} bytes \
         allocated on average, each weighted 1/(1-e^(-size/{})); values are unbiased estimates; \
         allocations since unix time {} only; {} samples, {} held; {}",
        kheap.sample_bytes,
        kheap.sample_bytes,
        kheap.since_unix_s,
        kheap.samples,
        kheap.samples_held,
        kheap.losses(|b| format!("{b} bytes")),
    ));
    b.profile.comment.push(comment);
    // The same counts as "N word" for tools (serve's /metrics reads them):
    // the sentence above says "none dropped or lost" rather than zeros.
    let counts = b.string(&format!(
        "sampler counts: {} samples, {} held, {} dropped, {} lost, {} lost-frees",
        kheap.samples,
        kheap.samples_held,
        kheap.dropped,
        kheap.lost_samples,
        kheap.lost_sample_frees,
    ));
    b.profile.comment.push(counts);
    let kernel_mapping = b.mapping("[kernel.kallsyms]");
    let keys = ["cache", "pid", "comm", "cgroup", "pod", "container"].map(|k| b.string(k));
    let procs: HashMap<(u32, u64), &ProcessReport> = report
        .processes
        .iter()
        .map(|p| ((p.tgid, p.start_ns), p))
        .collect();
    let exited = b.string("exited");
    for row in &kheap.rows {
        let mut location_id = Vec::new();
        let mut labels = vec![(keys[0], b.string(&row.cache), 0)];
        // A row of forgotten processes is no live pid's: its pid is "exited".
        if row.tgid == FORGOTTEN {
            labels.push((keys[1], exited, 0));
        } else {
            labels.push((keys[1], 0, i64::from(row.tgid)));
        }
        let names = match (&row.exited, procs.get(&(row.tgid, row.start_ns))) {
            (Some(e), _) => Some(Names {
                image: e.comm.clone(),
                comm: &e.comm,
                cgroup: e
                    .cgroup
                    .clone()
                    .unwrap_or_else(|| format!("id {}", e.cgroup_id)),
                pod: e.pod.as_deref(),
                stacks: Some((&e.kernel_locations, &e.user_locations)),
            }),
            (None, Some(p)) if row.tgid != FORGOTTEN => Some(Names {
                image: process_image(p),
                comm: &p.comm,
                cgroup: p
                    .cgroup
                    .clone()
                    .unwrap_or_else(|| format!("id {}", p.cgroup_id)),
                pod: p.pod.as_deref(),
                stacks: stack_of(p, row).map(|s| (&s.kernel_locations, &s.user_locations)),
            }),
            _ => None,
        };
        if let Some(n) = names {
            if let Some((kernel, user)) = n.stacks {
                let user_mapping = b.mapping(&n.image);
                location_id.extend(kernel.iter().map(|l| b.location(kernel_mapping, l)));
                location_id.extend(user.iter().map(|l| b.user_location(user_mapping, l)));
            }
            labels.push((keys[2], b.string(n.comm), 0));
            labels.push((keys[3], b.string(&n.cgroup), 0));
            if let Some(pod) = n.pod {
                // `namespace/pod[/container]`
                let mut parts = pod.splitn(3, '/');
                let (ns, name, container) = (parts.next(), parts.next(), parts.next());
                if let (Some(ns), Some(name)) = (ns, name) {
                    labels.push((keys[4], b.string(&format!("{ns}/{name}")), 0));
                }
                if let Some(c) = container {
                    labels.push((keys[5], b.string(c), 0));
                }
            }
        }
        let value = [
            row.alloc_objects,
            row.alloc_bytes,
            row.inuse_objects,
            row.inuse_bytes,
        ]
        .map(|v| i64::try_from(v).unwrap_or(i64::MAX))
        .to_vec();
        b.profile.sample.push(Sample {
            location_id,
            value,
            label: labels
                .into_iter()
                .map(|(key, str, num)| Label {
                    key,
                    str,
                    num,
                    ..Label::default()
                })
                .collect(),
        });
    }
    Some(b.profile)
}

/// A heap profile with Go's sample types, the rate as its period and no
/// samples: what a `--pprof-snapshots` request gets when the report has no
/// estimates, so the requester reads a valid (empty) answer at once instead
/// of waiting for one that never comes.
pub fn empty(sample_bytes: u64, wall_clock_ns: i64) -> Profile {
    let mut b = header(sample_bytes, wall_clock_ns);
    let comment = b.string("leaktrace kernel heap profile: no estimates in this report");
    b.profile.comment.push(comment);
    b.profile
}

fn header(sample_bytes: u64, wall_clock_ns: i64) -> Builder {
    let mut b = Builder::new();
    b.sample_types(&SAMPLE_TYPES, "inuse_space");
    b.profile.period_type = Some(ValueType {
        r#type: b.string("space"),
        unit: b.string("bytes"),
    });
    b.profile.period = i64::try_from(sample_bytes).unwrap_or(i64::MAX);
    b.profile.time_nanos = wall_clock_ns;
    b
}

/// What labels and locations a row gets: its live process's, or what a
/// folded row kept of its exited ones.
struct Names<'a> {
    /// The user mapping's name: the process's executable (a folded row: its comm).
    image: String,
    comm: &'a str,
    cgroup: String,
    pod: Option<&'a str>,
    stacks: Option<(&'a Vec<Location>, &'a Vec<Location>)>,
}

fn stack_of<'a>(p: &'a ProcessReport, row: &KheapRow) -> Option<&'a StackReport> {
    p.stacks
        .iter()
        .find(|s| s.kstack == row.kstack && s.ustack == row.ustack)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::pprof::encode;
    use prost::Message;

    /// A live process's row carries its pid and stack; a folded row of
    /// exited processes carries pid "exited", the comm and cgroup it kept
    /// and its own stacks, and is never given the live pid's names.
    #[test]
    fn folded_rows_are_labelled_exited_with_the_names_and_stacks_they_kept() {
        use crate::slab::report::{ExitedRow, KheapRow, KheapSummary};
        let mut report = crate::slab::report::test_report();
        let loc = |addr: u64, f: &str| Location {
            addr,
            frames: vec![f.to_string()],
            module: None,
        };
        // The test process's one stack is the empty pair; the folded row's
        // ids are the same, and must not give it that process's names.
        let none = &report.processes[0].stacks[0];
        let (kstack, ustack) = (none.kstack, none.ustack);
        let row = |tgid, exited| KheapRow {
            tgid,
            start_ns: 0,
            kstack,
            ustack,
            cache: "kmalloc-512".to_string(),
            samples: 3,
            inuse_objects: 3000,
            inuse_bytes: 1_536_000,
            inuse_bytes_low: 1,
            inuse_bytes_high: 2,
            alloc_objects: 3000,
            alloc_bytes: 1_536_000,
            kernel: Vec::new(),
            user: Vec::new(),
            exited,
        };
        let exited = ExitedRow {
            comm: "cronjob".to_string(),
            cgroup_id: 5,
            cgroup: Some("/system.slice/cron.service".to_string()),
            pod: None,
            processes: 3,
            kernel: vec!["user_preparse+0x2f".to_string()],
            user: vec!["add_key+0x9".to_string()],
            kernel_locations: vec![loc(0xffff_0020, "user_preparse+0x2f")],
            user_locations: vec![loc(0x7000, "add_key+0x9")],
        };
        report.kheap = Some(KheapSummary {
            sample_bytes: 524_288,
            rows: vec![row(42, None), row(FORGOTTEN, Some(exited))],
            ..KheapSummary::default()
        });
        let p = build(&report, 7).expect("a heap profile");
        let s = |i: i64| p.string_table[i as usize].as_str();
        let label = |sample: &Sample, key: &str| {
            sample.label.iter().find(|l| s(l.key) == key).map(|l| {
                if l.str != 0 {
                    s(l.str).to_string()
                } else {
                    l.num.to_string()
                }
            })
        };
        let frames = |sample: &Sample| -> Vec<String> {
            sample
                .location_id
                .iter()
                .flat_map(|id| &p.location[*id as usize - 1].line)
                .map(|l| s(p.function[l.function_id as usize - 1].name).to_string())
                .collect()
        };
        let live = &p.sample[0];
        assert_eq!(label(live, "pid").as_deref(), Some("42"));
        assert_eq!(label(live, "comm").as_deref(), Some("leak;er"));
        let folded = &p.sample[1];
        assert_eq!(label(folded, "pid").as_deref(), Some("exited"));
        assert_eq!(label(folded, "comm").as_deref(), Some("cronjob"));
        assert_eq!(
            label(folded, "cgroup").as_deref(),
            Some("/system.slice/cron.service")
        );
        assert_eq!(frames(folded), ["user_preparse", "add_key"]);
        assert_eq!(folded.value, [3000, 1_536_000, 3000, 1_536_000]);
    }

    fn comment(report: &Report) -> String {
        let p = build(report, 7).expect("a heap profile");
        p.string_table[p.comment[0] as usize].clone()
    }

    #[test]
    fn the_comment_states_what_was_dropped_and_lost() {
        let mut r = crate::slab::report::test_kheap_report();
        let none = comment(&r);
        assert!(
            none.ends_with("10 samples, 4 held; none dropped or lost"),
            "{none}"
        );
        let p = build(&r, 7).expect("a heap profile");
        assert_eq!(
            p.string_table[p.comment[1] as usize],
            "sampler counts: 10 samples, 4 held, 0 dropped, 0 lost, 0 lost-frees"
        );
        if let Some(k) = r.kheap.as_mut() {
            k.lost_samples = 4_820;
            k.low_by_at_least_bytes = 4_820 * 65_536;
            k.lost_sample_frees = 946;
            k.high_by_at_most_bytes = 62_000_000;
        }
        let lost = comment(&r);
        assert!(
            lost.contains("0 samples dropped (table full) and 4820 lost (ring buffer full): in-use estimates are low by at least 315883520 bytes")
                && lost.contains("946 frees of samples lost (ring buffer full): in-use estimates may be high by up to 62000000 bytes"),
            "{lost}"
        );
    }

    #[test]
    fn a_report_without_estimates_still_gets_a_valid_empty_heap_profile() {
        let report = crate::slab::report::test_report();
        assert!(build(&report, 7).is_none());
        let bytes = encode(&empty(524_288, 7)).expect("encode");
        let mut raw = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut raw)
            .expect("gzip");
        let p = Profile::decode(raw.as_slice()).expect("decode");
        let s = |i: i64| p.string_table[i as usize].as_str();
        let types: Vec<&str> = p.sample_type.iter().map(|t| s(t.r#type)).collect();
        assert_eq!(types, SAMPLE_TYPES.map(|t| t.0));
        assert_eq!(s(p.default_sample_type), "inuse_space");
        assert_eq!((p.period, p.time_nanos), (524_288, 7));
        assert!(p.sample.is_empty());
    }
}
