//! The `--all-caches` section of the text report: in-use estimates by cache
//! and by (process, stack, cache), each with its 95% interval, under one
//! line saying they are sampled, at what rate, since when and how fully.

use std::fmt::Write;

use crate::{
    present::units::{group, human_bytes},
    slab::report::{GroupBy, KheapSummary, Report, FORGOTTEN},
};

/// Caches and rows shown (`--json` has them all).
const CACHES_SHOWN: usize = 8;
const ROWS_SHOWN: usize = 8;
/// Frames shown per row's stack: the kernel's past the allocator, the user's.
const FRAMES: usize = 4;

/// Writes the section when the report has one.
pub fn section(out: &mut String, r: &Report) {
    write(out, r, CACHES_SHOWN, ROWS_SHOWN, FRAMES);
}

/// The live view's short form: the top caches and rows, no frames.
pub fn compact(r: &Report) -> Vec<String> {
    let mut out = String::new();
    write(&mut out, r, 4, 4, 0);
    out.lines().map(str::to_string).collect()
}

fn write(out: &mut String, r: &Report, caches: usize, rows: usize, frames: usize) {
    let Some(k) = &r.kheap else { return };
    coverage(out, k);
    let _ = writeln!(
        out,
        "in use by cache (estimate, 95% interval, samples held):"
    );
    for c in k.caches.iter().filter(|c| c.samples > 0).take(caches) {
        let _ = writeln!(
            out,
            "  {:<24} ~{:>8} ({}-{})  {} samples",
            c.name,
            human_bytes(c.inuse_bytes),
            human_bytes(c.inuse_bytes_low),
            human_bytes(c.inuse_bytes_high),
            group(c.samples),
        );
    }
    if k.group_by != GroupBy::Cache {
        let _ = writeln!(
            out,
            "in use by {} (estimate, 95% interval, samples held):",
            k.group_by.name()
        );
        for g in k.groups.iter().filter(|g| g.samples > 0).take(caches) {
            let _ = writeln!(
                out,
                "  {:<40} ~{:>8} ({}-{})  ~{} objects, {} samples",
                g.key,
                human_bytes(g.inuse_bytes),
                human_bytes(g.inuse_bytes_low),
                human_bytes(g.inuse_bytes_high),
                group(g.inuse_objects),
                group(g.samples),
            );
        }
    }
    let _ = writeln!(out, "in use by process, stack and cache:");
    for row in k.rows.iter().filter(|r| r.samples > 0).take(rows) {
        let p = r
            .processes
            .iter()
            .find(|p| p.tgid == row.tgid && p.start_ns == row.start_ns && row.tgid != FORGOTTEN);
        // A folded row is no live pid's: "exited", with the comm it kept.
        let (pid, comm) = match (&row.exited, p) {
            (Some(e), _) => (
                "exited".to_string(),
                match e.processes {
                    1 => format!("{} (1 process)", e.comm),
                    n => format!("{} ({} processes)", e.comm, group(n)),
                },
            ),
            (None, Some(p)) => (row.tgid.to_string(), p.comm.clone()),
            (None, None) if row.tgid == FORGOTTEN => ("exited".to_string(), "(exited)".into()),
            (None, None) => (row.tgid.to_string(), "?".to_string()),
        };
        let _ = writeln!(
            out,
            "  {:<16} pid {:<7} {:<16} ~{:>8} ({}-{})  ~{} objects, {} samples",
            row.cache,
            pid,
            comm,
            human_bytes(row.inuse_bytes),
            human_bytes(row.inuse_bytes_low),
            human_bytes(row.inuse_bytes_high),
            group(row.inuse_objects),
            group(row.samples),
        );
        let stack = match (&row.exited, p) {
            (Some(e), _) => Some((&e.kernel, &e.user)),
            (None, Some(p)) => p
                .stacks
                .iter()
                .find(|s| s.kstack == row.kstack && s.ustack == row.ustack)
                .map(|s| (&s.kernel, &s.user)),
            (None, None) => None,
        };
        if let Some((kernel, user)) = stack {
            let kernel = kernel
                .iter()
                .skip_while(|f| f.starts_with("kmem_cache_alloc") || f.starts_with("__kmalloc"));
            for f in kernel.take(frames).chain(user.iter().take(frames)) {
                let _ = writeln!(out, "      {f}");
            }
        }
    }
    let _ = writeln!(out);
}

fn coverage(out: &mut String, k: &KheapSummary) {
    let _ = writeln!(
        out,
        "SAMPLED ESTIMATES of every slab cache: one allocation per {} allocated on average \
         (p = 1-e^(-size/rate), each weighed 1/p), since unix time {}; {} samples, {} held, \
         {} stale (freed unseen), {}",
        human_bytes(k.sample_bytes),
        k.since_unix_s,
        group(k.samples),
        group(k.samples_held),
        group(k.stale),
        k.losses(human_bytes),
    );
    let _ = writeln!(
        out,
        "in use, every cache: ~{} (allocations since start only)",
        human_bytes(k.inuse_bytes)
    );
}
