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
