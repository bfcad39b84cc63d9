//! Files and endpoints rendered from the one [`Report`](crate::report::Report)
//! model, like the text and JSON views, so every output states the same numbers.

pub mod files;
pub mod folded;
pub mod metrics;
pub mod pprof;

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};

use self::files::Destination;
use self::folded::Weight;
use crate::report::Report;

/// The files asked for with --pprof, --folded and --flamegraph, checked
/// before anything is attached.
pub struct Outputs {
    pprof: Option<Destination>,
    folded: Option<Destination>,
    flamegraph: Option<Destination>,
    weight: Weight,
}

/// The output files asked for, as plain options (the CLI's flags map onto it).
pub struct OutputFiles<'a> {
    pub pprof: Option<&'a std::path::Path>,
    pub folded: Option<&'a std::path::Path>,
    pub flamegraph: Option<&'a std::path::Path>,
    /// What the folded stacks and the flame graph weigh.
    pub weight: Weight,
}

impl Outputs {
    pub fn check(files: &OutputFiles<'_>) -> Result<Outputs> {
        let check = |flag, path: Option<&std::path::Path>| {
            path.map(|p| Destination::check(flag, p)).transpose()
        };
        let outputs = Outputs {
            pprof: check("--pprof", files.pprof)?,
            folded: check("--folded", files.folded)?,
            flamegraph: check("--flamegraph", files.flamegraph)?,
            weight: files.weight,
        };
        let all: Vec<&Destination> = [&outputs.pprof, &outputs.folded, &outputs.flamegraph]
            .into_iter()
            .flatten()
            .collect();
        files::check_distinct(&all)?;
        Ok(outputs)
    }

    /// Writes every file once. One that fails does not stop the others; each
    /// failure is on stderr with its fallback, and the result is an error.
    pub fn write(&self, report: &Report) -> Result<()> {
        let mut failed = 0;
        let mut one =
            |dest: &Option<Destination>, what: &str, render: &dyn Fn() -> Result<Vec<u8>>| {
                let Some(dest) = dest else { return };
                match render().and_then(|bytes| dest.write(&bytes)) {
                    Ok(()) => eprintln!("leaktrace: wrote {what} {}", dest.path.display()),
                    Err(e) => {
                        eprintln!("leaktrace: error: {e:#}");
                        failed += 1;
                    }
                }
            };
        one(&self.pprof, "pprof profile", &|| {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
            pprof::encode(&pprof::build(report, now))
        });
        one(&self.folded, "folded stacks", &|| {
            Ok(folded::folded_text(report, self.weight).into_bytes())
        });
        one(&self.flamegraph, "flame graph", &|| {
            folded::flamegraph_svg(report, self.weight)
        });
        if failed > 0 {
            bail!("{failed} output file(s) could not be written where asked (see above)");
        }
        Ok(())
    }
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
            start_ns: 0,
            ppid: 0,
            parent_comm: None,
            exited: false,
            context: None,
            comm: "leak;er".to_string(),
            cmdline: Some("/usr/bin/leaker --fast".to_string()),
            cgroup_id: 9,
            cgroup: Some("/pods/a".to_string()),
            charged_elsewhere: None,
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
        group_by: Default::default(),
        groups: Vec::new(),
        top_stacks: Vec::new(),
        traced: None,
    }
}
