//! The text form of a diagnosis.

use super::*;

pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "leaktrace doctor — kernel {}, slab sampled over {:.1}s",
        report.kernel_release, report.watch_seconds
    );
    for f in &report.findings {
        let _ = writeln!(
            out,
            "{:<8} {:<7} {}",
            f.severity.label(),
            f.check,
            f.summary
        );
        for d in &f.details {
            let _ = writeln!(out, "{:17}{d}", "");
        }
    }
    match &report.next_command {
        Some(cmd) => {
            let _ = writeln!(out, "next: {cmd}");
        }
        None => {
            let _ = writeln!(
                out,
                "next: leaktrace cannot attach on this node; see the bpf line"
            );
        }
    }
    out
}
