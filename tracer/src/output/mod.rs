//! Files and endpoints rendered from the one [`Report`](crate::report::Report)
//! model, like the text and JSON views, so every output states the same numbers.

pub mod folded;
pub mod metrics;
pub mod pprof;

use std::{
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};

use crate::{cli::TraceArgs, report::Report};

/// Writes the files asked for with --pprof, --folded and --flamegraph. Each is
/// written to a temporary name and renamed, so a reader never sees half a file.
pub fn write_files(args: &TraceArgs, report: &Report) -> Result<()> {
    if let Some(path) = &args.pprof {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
        let bytes = pprof::encode(&pprof::build(report, now))?;
        write_atomic(path, &bytes)?;
        eprintln!("leaktrace: wrote pprof profile {}", path.display());
    }
    if let Some(path) = &args.folded {
        write_atomic(path, folded::folded_text(report, args.weight).as_bytes())?;
        eprintln!("leaktrace: wrote folded stacks {}", path.display());
    }
    if let Some(path) = &args.flamegraph {
        write_atomic(path, &folded::flamegraph_svg(report, args.weight)?)?;
        eprintln!("leaktrace: wrote flame graph {}", path.display());
    }
    Ok(())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", path.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// A small report with one leaking process and one stack, for the renderers' tests.
#[cfg(test)]
pub(crate) fn test_report() -> Report {
    use crate::{
        aggregator::Counts,
        report::{Location, ProcessReport, StackReport},
    };
    let loc = |addr: u64, f: &[&str]| Location {
        addr,
        frames: f.iter().map(|s| s.to_string()).collect(),
    };
    Report {
        schema_version: crate::report::SCHEMA_VERSION,
        kind: "final",
        cache: "kmalloc-512".to_string(),
        aliases: Vec::new(),
        elapsed_s: 2.5,
        rss_bytes: None,
        meminfo: None,
        slab: None,
        totals: Counts {
            outstanding: 4,
            outstanding_bytes: 2048,
            allocs: 10,
            frees: 6,
        },
        kernel: Default::default(),
        anomalies: Default::default(),
        stacks: Default::default(),
        age: Default::default(),
        processes: vec![ProcessReport {
            tgid: 42,
            comm: "leak;er".to_string(),
            cmdline: Some("/usr/bin/leaker --fast".to_string()),
            cgroup_id: 9,
            cgroup: Some("/pods/a".to_string()),
            counts: Counts {
                outstanding: 4,
                outstanding_bytes: 2048,
                allocs: 10,
                frees: 6,
            },
            alloc_rate: 0.0,
            growth_rate: 0.0,
            fingerprinted: true,
            unfingerprinted_allocs: 0,
            stacks: vec![StackReport {
                counts: Counts {
                    outstanding: 4,
                    outstanding_bytes: 2048,
                    allocs: 10,
                    frees: 6,
                },
                estimated: false,
                outstanding_low: 4,
                outstanding_high: 4,
                partial: false,
                stratum_outstanding: 4,
                kernel: vec!["__kmalloc+0x10".into(), "user_preparse+0x2f".into()],
                user: vec!["inlined+0x1".into(), "outer+0x5".into(), "main+0x9".into()],
                kernel_locations: vec![
                    loc(0xffff_0010, &["__kmalloc+0x10"]),
                    loc(0xffff_0020, &["user_preparse+0x2f"]),
                ],
                user_locations: vec![
                    loc(0x1000, &["inlined+0x1", "outer+0x5"]),
                    loc(0x2000, &["main+0x9"]),
                ],
            }],
        }],
        cgroups: Vec::new(),
    }
}
