//! A report on stdout, as every tool prints one: a JSON object on one line
//! (`--json`), or its text view. Snapshots are closed by a `---` line so a
//! reader of a pipe or a log can tell one from the next.

use std::io::Write;

use anyhow::{Context, Result};
use serde::Serialize;

/// Which report of a run is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Printed {
    /// One of the periodic snapshots (`--top` without a terminal, or `--json`).
    Snapshot,
    /// The report at the end of the run.
    Final,
}

/// Prints `report` as JSON when `json`, else the text `text` renders (called
/// only then). Errors: the report cannot be encoded, or stdout is closed
/// (e.g. the reader of `| head` is gone).
pub fn print<R: Serialize>(
    report: &R,
    json: bool,
    printed: Printed,
    text: impl FnOnce() -> String,
) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let written = if json {
        let what = match printed {
            Printed::Snapshot => "snapshot",
            Printed::Final => "report",
        };
        let line =
            serde_json::to_string(report).with_context(|| format!("encoding JSON {what}"))?;
        writeln!(out, "{line}")
    } else {
        let end = match printed {
            Printed::Snapshot => "---",
            Printed::Final => "",
        };
        writeln!(out, "{}{end}", text())
    };
    written
        .and_then(|()| out.flush())
        .context("writing the report to stdout")
}
