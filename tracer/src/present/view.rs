//! Text rendering of a [`Report`]: the live `--top` screen and the final report.
//! Plain text, so the same output works in a terminal, in `watch`, and in a log.

use std::fmt::Write;

use crate::{
    present::units::{group, human_bytes, human_ms, human_secs, tracked},
    slab::report::{
        GroupBy, GroupReport, LedgerPicture, MergedStack, ProcessReport, Report, StackReport,
    },
};

/// Zoom episodes the header lists (active first; `--json` has them all).
const ZOOM_EPISODES_SHOWN: usize = 3;

pub struct TextOptions {
    /// Frames per stack; None shows every frame (final report).
    pub frames: Option<usize>,
    pub sort_label: &'static str,
    pub interval_s: f64,
}

pub fn render(report: &Report, opts: &TextOptions) -> String {
    let mut out = String::new();
    header(&mut out, report, opts);
    if report.kheap.is_some() {
        // The process, stack and cgroup tables would count samples, not
        // objects: under --all-caches the estimates are the report.
        crate::present::kheap_view::section(&mut out, report);
        return out;
    }
    if report.group_by == GroupBy::Process {
        processes(&mut out, report, opts);
    } else {
        groups(&mut out, report, opts);
    }
    top_stacks(&mut out, &report.top_stacks, opts);
    cgroups(&mut out, report);
    out
}

/// Says when --pid's process is gone: its numbers stop moving for that reason,
/// not because the leak stopped, and what it still holds stays listed.
pub fn traced_exit_note(r: &Report) -> Option<String> {
    let t = r.traced.as_ref()?;
    let after = t.exited_after_s?;
    Some(format!(
        "traced process {} exited {after:.1}s after attach; its objects stay counted",
        t.pid
    ))
}

fn traced_line(out: &mut String, r: &Report) {
    if let Some(note) = traced_exit_note(r) {
        let _ = writeln!(out, "{note}");
    }
}

/// The kernel buckets that leak, each with its growth since attach, compactly: the
/// reclaimable and config-specific ones are left to doctor and `--json`.
pub fn ledger_line(l: &LedgerPicture) -> String {
    const SHOWN: [(&str, &str); 6] = [
        ("slab_unreclaimable", "SUnreclaim"),
        ("percpu", "Percpu"),
        ("vmalloc", "Vmalloc"),
        ("kernel_stack", "KernelStack"),
        ("page_tables", "PageTables"),
        ("unexplained", "unexplained"),
    ];
    let signed = |kb: i64| {
        let size = human_bytes(kb.unsigned_abs().saturating_mul(1024));
        if kb < 0 {
            format!("-{size}")
        } else {
            size
        }
    };
    let mut parts = Vec::new();
    for (name, label) in SHOWN {
        let Some(g) = l.growth.iter().find(|g| g.name == name) else {
            continue;
        };
        let Some(now) = g.after_kb else {
            continue;
        };
        let delta = g.growth_kb.map_or_else(String::new, |d| {
            format!(" ({}{})", if d < 0 { "" } else { "+" }, signed(d))
        });
        parts.push(format!("{label} {}{delta}", signed(now)));
    }
    format!(
        "kernel memory (growth since attach, {:.0}s): {}",
        l.since_s,
        parts.join("   ")
    )
}

fn header(out: &mut String, r: &Report, opts: &TextOptions) {
    let title = if r.kind == "final" {
        "final report"
    } else {
        "live"
    };
    let _ = writeln!(
        out,
        "leaktrace {title} — {}   up {:.0}s   refresh {:.1}s   sort {}   by {}   own memory: BPF maps {} + RSS {}",
        r.traced(),
        r.elapsed_s,
        opts.interval_s,
        opts.sort_label,
        r.group_by.name(),
        human_bytes(r.kernel.map_bytes),
        r.rss_bytes.map_or_else(|| "?".to_string(), human_bytes),
    );
    if !r.aliases.is_empty() {
        let _ = writeln!(out, "also covers merged caches: {}", r.aliases.join(", "));
    }
    traced_line(out, r);
    if let Some(m) = &r.meminfo {
        let pct = |kb: u64| 100.0 * kb as f64 / m.mem_total_kb.max(1) as f64;
        let _ = writeln!(
            out,
            "MemTotal {}   Slab {} ({:.1}%)   SUnreclaim {} ({:.1}%)",
            human_bytes(m.mem_total_kb * 1024),
            human_bytes(m.slab_kb * 1024),
            pct(m.slab_kb),
            human_bytes(m.sunreclaim_kb * 1024),
            pct(m.sunreclaim_kb),
        );
    }
    if let Some(l) = &r.ledger {
        let _ = writeln!(out, "{}", ledger_line(l));
    }
    if let Some(s) = &r.slab {
        let _ = writeln!(
            out,
            "slabinfo {}: {} active / {} objs of {} B ({})   since attach {}{} objs ({:+.1}/s)",
            r.cache,
            group(s.active_objs),
            group(s.num_objs),
            s.objsize,
            human_bytes(s.num_objs * s.objsize),
            if s.active_objs_delta < 0 { "-" } else { "+" },
            group(s.active_objs_delta.unsigned_abs()),
            s.active_objs_per_sec,
        );
    }
    let t = &r.totals;
    let _ = writeln!(
        out,
        "{}: {}   (objects allocated before attach cannot be attributed)",
        if r.kheap.is_some() {
            "samples since attach (counts of samples, not of objects; the estimates follow)"
        } else {
            "tracked since attach"
        },
        tracked(
            t.outstanding,
            Some(t.outstanding_bytes),
            ("allocs", t.allocs),
            t.frees
        ),
    );
    if let Some(p) = &r.pages {
        let _ = writeln!(
            out,
            "pages taken back by /proc/kpageflags: slab {}   page-table {}   free (freed unseen) {}   user/page-cache {}   unreadable {}",
            group(p.slab),
            group(p.page_table),
            group(p.free_unseen),
            group(p.user),
            group(p.unreadable),
        );
    }
    let k = &r.kernel;
    let a = &r.anomalies;
    let recursion = k
        .recursion_misses
        .map_or_else(|| "unknown".to_string(), group);
    let _ = writeln!(
        out,
        "lost: ringbuf {} map-full {} frees {}   stack-fail k{}/u{}   freed-unseen {}   unmatched-frees {}   bpf-recursion-misses {}",
        group(k.allocs_lost_ringbuf),
        group(k.allocs_lost_map_full),
        group(k.frees_lost_ringbuf),
        group(k.kstack_failed),
        group(k.ustack_failed),
        group(a.freed_unseen),
        group(a.unmatched_frees),
        recursion,
    );
    match (k.frees_maybe_missed, k.allocs_maybe_missed) {
        (Some(0), Some(0)) => {}
        (Some(frees), Some(allocs)) => {
            // Under --all-caches `outstanding` counts held samples: say so
            // rather than let a sample count read as objects.
            let held = if r.kheap.is_some() {
                "held samples"
            } else {
                "outstanding objects"
            };
            let _ = writeln!(
                out,
                "uncertain: up to {} of the {held} may already be freed, and up to {} allocations were not seen (hooks skipped by BPF recursion; --exact does not change this)",
                group(frees.min(t.outstanding)),
                group(allocs)
            );
        }
        _ => {
            let _ = writeln!(
                out,
                "uncertain: events skipped by BPF recursion are not reported before Linux 5.12"
            );
        }
    }
    let st = &r.stacks;
    if st.sample_every > 1 && st.drawn + st.without_stacks > 0 {
        let _ = writeln!(
            out,
            "stacks: drawn for {} allocations: a census of each new stratum's first {} per CPU ({}), \
             zoom on strata whose surviving objects are too few for the base rate to name ({} in \
             {} episodes), and 1 in {} of the rest ({}); every count per process and per stratum \
             (call site{}) is exact, per-stack counts marked ~ are unbiased estimates with a 95% \
             interval",
            group(st.drawn),
            st.census_allocs,
            group(st.census),
            group(st.zoom),
            st.zoom_episodes.episodes_started,
            st.sample_every,
            group(st.sampled),
            if st.user_paths { " + user path" } else { "" },
        );
    }
    // The episodes of the processes shown, those that drew most first.
    let mut episodes: Vec<_> = st
        .zoom_episodes
        .episodes
        .iter()
        .filter(|e| r.processes.iter().any(|p| p.tgid == e.pid))
        .collect();
    episodes.sort_by_key(|e| (e.ended_s.is_some(), std::cmp::Reverse(e.drawn)));
    for e in episodes.iter().take(ZOOM_EPISODES_SHOWN) {
        let _ = writeln!(
            out,
            "zoom: pid {} at {}: 1 in {} from {} {}, {} stacks drawn, {:.1}ms of kernel time",
            e.pid,
            e.call_site_name
                .clone()
                .unwrap_or_else(|| format!("{:#x}", e.call_site)),
            e.sample_every,
            human_secs(e.started_s),
            match e.ended_s {
                Some(end) => format!("to {}", human_secs(end)),
                None => "on (active)".to_string(),
            },
            group(e.drawn),
            e.stack_ms,
        );
    }
    if episodes.len() > ZOOM_EPISODES_SHOWN {
        let _ = writeln!(
            out,
            "zoom: {} more episodes (--json lists them)",
            episodes.len() - ZOOM_EPISODES_SHOWN
        );
    }
    if r.age.count > 0 {
        let _ = writeln!(
            out,
            "age of outstanding: p50 {}   p99 {}   max {}",
            human_ms(r.age.p50_ms),
            human_ms(r.age.p99_ms),
            human_ms(r.age.max_ms)
        );
    }
    out.push('\n');
}

fn processes(out: &mut String, r: &Report, opts: &TextOptions) {
    let _ = writeln!(
        out,
        "{:>8} {:<16} {:>11} {:>10} {:>9} {:>10} {:>10} {:>10}  CGROUP",
        "PID", "COMM", "OUTSTANDING", "BYTES", "GROWTH/s", "ALLOCS/s", "ALLOCS", "FREES"
    );
    if r.processes.is_empty() {
        let _ = writeln!(out, "{:>8} (no matching allocations yet)", "");
    }
    for p in &r.processes {
        process(out, p, opts);
    }
}

fn process(out: &mut String, p: &ProcessReport, opts: &TextOptions) {
    let _ = writeln!(
        out,
        "{:>8} {:<16} {:>11} {:>10} {:>+9.1} {:>10.1} {:>10} {:>10}  {}{}",
        if p.context.is_some() {
            "-".to_string()
        } else {
            p.tgid.to_string()
        },
        truncate(&p.comm, 16),
        group(p.counts.outstanding),
        human_bytes(p.counts.outstanding_bytes),
        p.growth_rate,
        p.alloc_rate,
        group(p.counts.allocs),
        group(p.counts.frees),
        match (p.context, p.pod.as_deref(), p.cgroup.as_deref()) {
            (Some(_), _, _) => "-",
            (None, Some(pod), _) => pod,
            (None, None, Some(path)) => path,
            (None, None, None) => "?",
        },
        if p.exited { "  [exited]" } else { "" },
    );
    if let Some(cmd) = &p.cmdline {
        let _ = writeln!(out, "{:>8} cmd: {}", "", truncate(cmd, 100));
    }
    if p.ppid != 0 {
        let _ = writeln!(
            out,
            "{:>8} parent at allocation: {}{}",
            "",
            p.ppid,
            p.parent_comm
                .as_deref()
                .map_or_else(String::new, |c| format!(" ({c})"))
        );
    }
    if let Some(c) = &p.charged_elsewhere {
        let _ = writeln!(
            out,
            "{:>8} charged to another memcg: {} allocations paid by {} (remote charging, active_memcg)",
            "",
            group(c.allocs),
            c.cgroup
                .as_deref()
                .map_or_else(|| format!("cgroup id {}", c.cgroup_id), str::to_string),
        );
    }
    if p.fingerprinted == Some(false) {
        let _ = writeln!(
            out,
            "{:>8} user paths not fingerprintable (no frame pointers past the syscall): stacks split by sampling only",
            ""
        );
    }
    for (i, s) in p.stacks.iter().enumerate() {
        stack(out, i, s, None, opts);
    }
}

/// One stack row and its frames; `processes` when it sums several processes' rows.
fn stack(out: &mut String, i: usize, s: &StackReport, processes: Option<u64>, opts: &TextOptions) {
    let tilde = if s.estimated { "~" } else { "" };
    let _ = writeln!(
        out,
        "{:>8} stack #{}: {} outstanding ({tilde}{}), {tilde}{} allocs, {tilde}{} frees{}{}",
        "",
        i + 1,
        s.outstanding_label(group),
        human_bytes(s.counts.outstanding_bytes),
        group(s.counts.allocs),
        group(s.counts.frees),
        processes.map_or_else(String::new, |n| format!(" in {} processes", group(n))),
        if s.partial {
            "; exact, but only the frames all share (no allocation of this path drew a full stack)"
        } else {
            ""
        },
    );
    if s.estimated {
        let _ = writeln!(
            out,
            "{:>12} of {} outstanding in its stratum (exact)",
            "",
            group(s.stratum_outstanding)
        );
    }
    frames(out, "k", &s.kernel, opts.frames);
    frames(out, "u", &s.user, opts.frames);
}

/// The group rows of `r` with `frames` frames per stack (the live view's body).
pub fn groups_text(r: &Report, frames: usize) -> String {
    let mut out = String::new();
    let opts = TextOptions {
        frames: Some(frames),
        sort_label: "",
        interval_s: 0.0,
    };
    groups(&mut out, r, &opts);
    out
}

fn groups(out: &mut String, r: &Report, opts: &TextOptions) {
    let _ = writeln!(
        out,
        "{:>9} {:>7} {:>11} {:>10} {:>9} {:>10} {:>10} {:>10}  {}",
        "PROCESSES",
        "EXITED",
        "OUTSTANDING",
        "BYTES",
        "GROWTH/s",
        "ALLOCS/s",
        "ALLOCS",
        "FREES",
        r.group_by.name().to_uppercase()
    );
    if r.groups.is_empty() {
        let _ = writeln!(out, "{:>9} (no matching allocations yet)", "");
    }
    for g in &r.groups {
        group_row(out, g, opts);
    }
}

fn group_row(out: &mut String, g: &GroupReport, opts: &TextOptions) {
    let _ = writeln!(
        out,
        "{:>9} {:>7} {:>11} {:>10} {:>+9.1} {:>10.1} {:>10} {:>10}  {}",
        group(g.processes),
        group(g.exited),
        group(g.counts.outstanding),
        human_bytes(g.counts.outstanding_bytes),
        g.growth_rate,
        g.alloc_rate,
        group(g.counts.allocs),
        group(g.counts.frees),
        truncate(&g.key, 100),
    );
    for (i, m) in g.stacks.iter().enumerate() {
        stack(out, i, &m.stack, Some(m.processes), opts);
    }
}

/// Stacks summed across processes: one leak spread over many short-lived
/// processes is one large row here.
fn top_stacks(out: &mut String, stacks: &[MergedStack], opts: &TextOptions) {
    if stacks.is_empty() {
        return;
    }
    let _ = writeln!(out, "\ntop stacks across all processes:");
    for (i, m) in stacks.iter().enumerate() {
        stack(out, i, &m.stack, Some(m.processes), opts);
    }
}

fn frames(out: &mut String, tag: &str, frames: &[String], limit: Option<usize>) {
    let shown = limit.unwrap_or(usize::MAX).min(frames.len());
    for f in &frames[..shown] {
        let _ = writeln!(out, "{:>12} {tag} {f}", "");
    }
    if shown < frames.len() {
        let _ = writeln!(out, "{:>12} {tag} ... {} more", "", frames.len() - shown);
    }
}

fn cgroups(out: &mut String, r: &Report) {
    if r.cgroups.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\n{:>11} {:>10}  CGROUP (outstanding by the memcg that pays: the allocating task's, or a remote charge's)",
        "OUTSTANDING", "BYTES"
    );
    for c in &r.cgroups {
        let _ = writeln!(
            out,
            "{:>11} {:>10}  {}",
            group(c.counts.outstanding),
            human_bytes(c.counts.outstanding_bytes),
            match (c.cgroup_id, c.path.as_deref()) {
                (_, Some(path)) => match &c.pod {
                    Some(pod) => format!("{pod}  {path}"),
                    None => path.to_string(),
                },
                (0, None) => "id 0 (interrupt context, or unreadable)".to_string(),
                (id, None) => format!("id {id}"),
            },
        );
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_says_when_the_traced_process_exited() {
        let opts = TextOptions {
            frames: None,
            sort_label: "outstanding",
            interval_s: 1.0,
        };
        let mut r = crate::slab::report::test_report();
        r.traced = Some(crate::slab::report::TracedPid {
            pid: 42,
            exited_after_s: None,
        });
        assert!(!render(&r, &opts).contains("exited"));
        r.traced = Some(crate::slab::report::TracedPid {
            pid: 42,
            exited_after_s: Some(3.25),
        });
        let text = render(&r, &opts);
        assert!(
            text.contains("traced process 42 exited 3.2s after attach; its objects stay counted"),
            "{text}"
        );
    }

    /// Under --all-caches the header's counts are of samples: the
    /// recursion line says "held samples", and the coverage line says
    /// "none dropped or lost" when nothing was.
    #[test]
    fn all_caches_text_counts_samples_and_states_its_losses() {
        let opts = TextOptions {
            frames: None,
            sort_label: "outstanding",
            interval_s: 1.0,
        };
        let mut r = crate::slab::report::test_kheap_report();
        r.kernel.frees_maybe_missed = Some(2);
        r.kernel.allocs_maybe_missed = Some(1);
        let text = render(&r, &opts);
        assert!(
            text.contains("uncertain: up to 2 of the held samples may already be freed"),
            "{text}"
        );
        assert!(!text.contains("outstanding objects"), "{text}");
        assert!(text.contains("none dropped or lost\n"), "{text}");
        assert!(!text.contains("up to 0"), "{text}");
        if let Some(k) = r.kheap.as_mut() {
            k.lost_sample_frees = 946;
            k.high_by_at_most_bytes = 3 << 20;
        }
        let text = render(&r, &opts);
        assert!(
            text.contains("946 frees of samples lost (ring buffer full): in-use estimates may be high by up to 3.0M ("),
            "{text}"
        );
    }

    #[test]
    fn long_names_are_cut() {
        assert_eq!(truncate("kubelet-with-a-long-name", 8), "kubelet…");
    }
}
