//! `--folded FILE` and `--flamegraph FILE.svg`: FlameGraph's folded stacks
//! (`root;...;leaf weight`), and the SVG inferno draws from exactly those lines,
//! so the picture and the text file never disagree.

use std::fmt::Write as _;

use anyhow::{Context, Result};
use clap::ValueEnum;

use crate::{
    output::pprof::function_name,
    slab::report::{KheapSummary, Report, FORGOTTEN},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Weight {
    /// Outstanding bytes (allocated, not yet freed).
    Bytes,
    /// Outstanding objects.
    Objects,
    /// Allocations since attach, freed or not: where churn comes from.
    Allocs,
}

impl Weight {
    pub fn unit(self) -> &'static str {
        match self {
            Weight::Bytes => "bytes",
            Weight::Objects => "objects",
            Weight::Allocs => "allocations",
        }
    }
}

/// Root first: the process, its user stack from `main` down, then the kernel
/// stack from the syscall entry to the allocator. Offsets are dropped so one
/// function is one box however many call sites it has.
pub fn lines(report: &Report, weight: Weight) -> Vec<String> {
    if let Some(k) = &report.kheap {
        return kheap_lines(report, k, weight);
    }
    let mut out = Vec::new();
    for p in &report.processes {
        for s in &p.stacks {
            let w = match weight {
                Weight::Bytes => s.counts.outstanding_bytes,
                Weight::Objects => s.counts.outstanding,
                Weight::Allocs => s.counts.allocs,
            };
            // A zero-width frame would be invisible in the graph anyway.
            if w == 0 {
                continue;
            }
            let mut line = frame(&format!("{} [{}]", p.comm, p.tgid));
            for f in s.user.iter().rev().chain(s.kernel.iter().rev()) {
                line.push(';');
                line.push_str(&frame(function_name(f)));
            }
            let _ = write!(line, " {w}");
            out.push(line);
        }
    }
    out
}

/// `--all-caches`: the process stack tables count samples, so each row
/// (process, kernel and user stack, cache) is weighed by the estimates the
/// text report prints: in-use bytes or objects, or objects allocated. The
/// cache is the leaf, below the allocator.
fn kheap_lines(report: &Report, k: &KheapSummary, weight: Weight) -> Vec<String> {
    let mut out = Vec::new();
    for row in &k.rows {
        let w = match weight {
            Weight::Bytes => row.inuse_bytes,
            Weight::Objects => row.inuse_objects,
            Weight::Allocs => row.alloc_objects,
        };
        if w == 0 {
            continue;
        }
        let comm = report
            .processes
            .iter()
            .find(|p| p.tgid == row.tgid && p.start_ns == row.start_ns)
            .map(|p| p.comm.as_str());
        // A folded row of exited processes keeps their comm and stacks.
        let (mut line, user, kernel) = match (&row.exited, comm) {
            (Some(e), _) => (frame(&format!("{} [exited]", e.comm)), &e.user, &e.kernel),
            (None, Some(comm)) => (
                frame(&format!("{comm} [{}]", row.tgid)),
                &row.user,
                &row.kernel,
            ),
            (None, None) if row.tgid == FORGOTTEN => {
                ("(exited)".to_string(), &row.user, &row.kernel)
            }
            (None, None) => (format!("? [{}]", row.tgid), &row.user, &row.kernel),
        };
        for f in user.iter().rev().chain(kernel.iter().rev()) {
            line.push(';');
            line.push_str(&frame(function_name(f)));
        }
        let _ = write!(line, ";{} {w}", frame(&format!("[{}]", row.cache)));
        out.push(line);
    }
    out
}

/// `;` separates frames and a newline ends a record; neither may appear in one.
fn frame(name: &str) -> String {
    name.replace(';', ":").replace('\n', " ")
}

pub fn folded_text(report: &Report, weight: Weight) -> String {
    let mut text = lines(report, weight).join("\n");
    text.push('\n');
    text
}

pub fn flamegraph_svg(report: &Report, weight: Weight) -> Result<Vec<u8>> {
    let lines = lines(report, weight);
    let mut opts = inferno::flamegraph::Options::default();
    if let Some(k) = &report.kheap {
        opts.title = match weight {
            Weight::Allocs => {
                "leaktrace: objects allocated, every slab cache (sampled estimates)".to_string()
            }
            _ => format!(
                "leaktrace: in-use {}, every slab cache (sampled estimates)",
                weight.unit()
            ),
        };
        opts.subtitle = Some(format!(
            "widths are unbiased estimates from byte-sampled allocations, one per {} bytes on average \
             (each weighed 1/(1-e^(-size/{}))), since unix time {}; {}",
            k.sample_bytes,
            k.sample_bytes,
            k.since_unix_s,
            k.losses(|b| format!("{b} bytes")),
        ));
        opts.count_name = format!("estimated {}", weight.unit());
    } else {
        opts.title = match weight {
            Weight::Allocs => format!("leaktrace: allocations in {}", report.memory()),
            _ => format!(
                "leaktrace: outstanding {} in {}",
                weight.unit(),
                report.memory()
            ),
        };
        if report
            .processes
            .iter()
            .any(|p| p.stacks.iter().any(|s| s.estimated))
        {
            opts.subtitle = Some(format!(
                "per-stack widths are unbiased estimates from drawn stacks (census, zoom, 1 in {}); process totals exact",
                report.stacks.sample_every
            ));
        }
        opts.count_name = weight.unit().to_string();
    }
    let mut svg = Vec::new();
    let drawn =
        inferno::flamegraph::from_lines(&mut opts, lines.iter().map(String::as_str), &mut svg);
    // With nothing attributed inferno still writes a valid SVG that says so,
    // and returns an error; the file is kept so a pipeline finds one.
    if let Err(err) = drawn {
        if !lines.is_empty() {
            return Err(err).context("rendering the flame graph");
        }
        eprintln!(
            "leaktrace: flame graph is empty: nothing with a nonzero {} was attributed",
            weight.unit()
        );
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_root_first_and_weighted() {
        let r = crate::slab::report::test_report();
        assert_eq!(
            lines(&r, Weight::Bytes),
            ["leak:er [42];main;outer;inlined;user_preparse;__kmalloc 2048"]
        );
        assert!(lines(&r, Weight::Objects)[0].ends_with(" 4"));
        assert!(lines(&r, Weight::Allocs)[0].ends_with(" 10"));
        let svg =
            String::from_utf8(flamegraph_svg(&r, Weight::Bytes).expect("svg")).expect("utf-8");
        assert!(
            svg.contains("user_preparse") && svg.contains("2,048 bytes"),
            "{svg}"
        );
        assert!(svg.contains("leaktrace: outstanding bytes in kmalloc-512<"));
        let allocs = flamegraph_svg(&r, Weight::Allocs).expect("svg");
        assert!(String::from_utf8_lossy(&allocs).contains("leaktrace: allocations in kmalloc-512<"));
        let mut empty = r.clone();
        empty.processes.clear();
        let svg = flamegraph_svg(&empty, Weight::Bytes).expect("an empty graph is still a file");
        assert!(String::from_utf8_lossy(&svg).contains("<svg"));
    }

    /// Under --all-caches the stack tables count samples (4 of 512 B
    /// here, 2,048 "bytes"): the lines carry the rows' estimates instead,
    /// the cache as the leaf, and the graph says they are sampled.
    #[test]
    fn all_caches_weighs_stacks_by_their_estimates() {
        let r = crate::slab::report::test_kheap_report();
        let stack = "leak:er [42];main;outer;inlined;user_preparse;__kmalloc;[kmalloc-512]";
        assert_eq!(lines(&r, Weight::Bytes), [format!("{stack} 263170")]);
        assert_eq!(lines(&r, Weight::Objects), [format!("{stack} 514")]);
        assert_eq!(lines(&r, Weight::Allocs), [format!("{stack} 1285")]);
        let svg =
            String::from_utf8(flamegraph_svg(&r, Weight::Bytes).expect("svg")).expect("utf-8");
        assert!(
            svg.contains("leaktrace: in-use bytes, every slab cache (sampled estimates)"),
            "{svg}"
        );
        assert!(
            svg.contains("one per 65536 bytes on average") && svg.contains("none dropped or lost"),
            "{svg}"
        );
        assert!(svg.contains("263,170 estimated bytes"), "{svg}");
    }

    #[test]
    fn separators_cannot_split_a_frame() {
        assert_eq!(frame("a;b\nc"), "a:b c");
    }
}
