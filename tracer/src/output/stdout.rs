//! stdout, for every subcommand: a report as a JSON object on one line
//! (`--json`) or as its text view, or any other text (`caches`, `doctor`).
//! Snapshots are closed by a `---` line so a reader of a pipe or a log can
//! tell one from the next. A failed stdout (a closed pipe, a full disk) is an
//! error for the caller to return, never a panic as `println!` makes it.

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
    let line = if json {
        let what = match printed {
            Printed::Snapshot => "snapshot",
            Printed::Final => "report",
        };
        serde_json::to_string(report).with_context(|| format!("encoding JSON {what}"))?
    } else {
        let end = match printed {
            Printed::Snapshot => "---",
            Printed::Final => "",
        };
        format!("{}{end}", text())
    };
    write_text(&format!("{line}\n")).context("printing the report")
}

/// Writes `text` to stdout as it is and flushes it. Errors: stdout is closed
/// (`| head`, `| true`) or cannot take the bytes (`> /dev/full`).
pub fn write_text(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("writing to stdout")
}
