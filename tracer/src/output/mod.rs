//! Files and endpoints rendered from each tool's one report model, like the
//! text and JSON views, so every output states the same numbers: the slab
//! tracer's [`Report`](crate::slab::report::Report) as pprof, folded stacks,
//! a flame graph and metrics, memcg's as pprof (`memcg_pprof.rs`);
//! `stdout.rs` prints any tool's report as a JSON line or its text view.

pub mod files;
pub mod folded;
pub mod kheap_pprof;
pub mod memcg_pprof;
pub mod metrics;
pub mod pprof;
pub mod stdout;

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};

use self::files::{Destination, Patience};
use self::folded::Weight;
use crate::slab::report::Report;

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
    /// failure is on stderr with its fallback, and the result is an error. A
    /// FIFO waits for its reader no longer than `patience` allows.
    pub fn write(&self, report: &Report, patience: &Patience<'_>) -> Result<()> {
        let mut failed = 0;
        let mut one =
            |dest: &Option<Destination>, what: &str, render: &dyn Fn() -> Result<Vec<u8>>| {
                let Some(dest) = dest else { return };
                match render().and_then(|bytes| dest.write(&bytes, patience)) {
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
            match kheap_pprof::build(report, now) {
                Some(profile) => pprof::encode(&profile),
                None => pprof::encode(&pprof::build(report, now)),
            }
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
