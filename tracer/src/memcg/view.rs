//! Text rendering of a memcg [`Report`]: the live `--top` screen, the final
//! report and `--list`. Plain text so it works in a terminal, `watch` and logs.

use std::fmt::Write;

use super::{
    state::{Actor, Group, MemcgReport, Phase},
    MemcgArgs, Report,
};
use crate::{caches::human_bytes, view::group};

pub fn render(r: &Report, args: &MemcgArgs, last: bool) -> String {
    let mut out = String::new();
    header(&mut out, r, args);
    groups(
        &mut out,
        "zombies by creator",
        &r.snapshot.zombies_by_creator,
    );
    groups(&mut out, "zombies by pod", &r.snapshot.zombies_by_pod);
    memcgs(&mut out, r, args, last);
    kernel_memcgs(&mut out, r, args);
    out
}

fn pages(v: Option<i64>) -> String {
    v.map_or_else(|| "?".into(), |p| group(u64::try_from(p).unwrap_or(0)))
}

/// Every dying memcg the kernel holds, pre-existing ones included.
fn kernel_memcgs(out: &mut String, r: &Report, args: &MemcgArgs) {
    let _ = writeln!(
        out,
        "\nkernel memory accounting: {} ({})",
        r.kmem_accounting.charged, r.kmem_accounting.rule
    );
    let Some(k) = &r.kernel_memcgs else {
        return;
    };
    let (Some(w), Some(a)) = (&k.walk, &k.aggregate) else {
        let _ = writeln!(
            out,
            "dying memcgs in the kernel: unknown on this kernel: {}",
            k.unknown.as_deref().unwrap_or("no walk")
        );
        return;
    };
    let _ = writeln!(
        out,
        "dying memcgs in the kernel: {} dying: {} hold file pages, {} charged ({} file, {} shmem, {} anon, {} swap, {} kernel)",
        group(a.dying),
        group(a.holding_file_pages),
        human_bytes(a.charged_bytes),
        human_bytes(a.file_bytes),
        human_bytes(a.shmem_bytes),
        human_bytes(a.anon_bytes),
        human_bytes(a.swap_bytes),
        human_bytes(a.kernel_bytes),
    );
    let _ = writeln!(
        out,
        "  walked {} memcgs ({} online) from the root memcg's css lists in {:.1} ms ({} BPF reads in {} runs{}); pages per memcg from {}; offline time: unknown on this kernel: the kernel keeps no timestamp",
        group(w.memcgs.len() as u64),
        group(w.memcgs.iter().filter(|m| m.online).count() as u64),
        w.walk_ms,
        group(w.reads),
        group(w.runs),
        if w.dropped > 0 {
            format!(", {} entries freed during the walk dropped", w.dropped)
        } else {
            String::new()
        },
        w.stats_source,
    );
    if a.dying == 0 {
        return;
    }
    let _ = writeln!(
        out,
        "{:>8} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}  PATH   (pages; dying = offline, not released)",
        "ID", "MEMCG", "CHARGED", "FILE", "SHMEM", "ANON", "SWAP", "KERNEL"
    );
    let mut dying: Vec<_> = w.dying().collect();
    dying.sort_by_key(|m| std::cmp::Reverse(m.usage_pages.unwrap_or(0)));
    let limit = if r.kind == "list" {
        usize::MAX
    } else {
        args.limit
    };
    for m in dying.iter().take(limit) {
        let _ = writeln!(
            out,
            "{:>8} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}  {}{}",
            m.id,
            m.memcg_id.map_or_else(|| "?".into(), |i| i.to_string()),
            m.usage_pages.map_or_else(|| "?".into(), group),
            pages(m.file),
            pages(m.shmem),
            pages(m.anon),
            pages(m.swap),
            pages(m.kernel),
            m.path,
            if m.released {
                "  (released, being freed)"
            } else {
                ""
            }
        );
    }
    if dying.len() > limit {
        let _ = writeln!(out, "... {} more dying (--limit)", dying.len() - limit);
    }
}

fn header(out: &mut String, r: &Report, args: &MemcgArgs) {
    let title = match r.kind {
        "final" => "final report",
        "list" => "list",
        _ => "live",
    };
    let _ = writeln!(
        out,
        "leaktrace memcg {title} — cgroup v{} memory at {}   up {:.0}s   refresh {:.1}s   zombie after {:.0}s",
        r.hierarchy.version,
        r.hierarchy.mount.display(),
        r.elapsed_s,
        args.interval.as_secs_f64(),
        r.zombie_after_s,
    );
    let _ = writeln!(out, "{}", r.mode);
    let c = &r.snapshot.counts;
    let _ = writeln!(
        out,
        "memcgs: live {}   dying {} (zombie {})   released {}   since start: created {} ({:.1}/s)  removed {}  released {} ({:.1}/s)",
        group(c.live),
        group(c.dying),
        group(c.zombie),
        group(c.released),
        group(c.created),
        r.snapshot.created_per_s,
        group(c.removed),
        group(c.released),
        r.snapshot.released_per_s,
    );
    let p = &r.preexisting_dying;
    let _ = writeln!(
        out,
        "dying before tracing (unattributed): {} at start, {} now ({} released since)   kernel dying now {}   [{}]",
        group(p.at_start),
        group(p.now),
        group(c.released_preexisting_dying),
        group(p.kernel_dying_now),
        p.source,
    );
    let k = &r.kernel;
    let pins = &r.snapshot.pins;
    let _ = writeln!(
        out,
        "charged objects tracked: {} outstanding   charges {}   frees {}   lost: events {} charges {}+{} frees {}   memcg-unknown {}   decode-errors {}",
        group(pins.outstanding),
        group(pins.charges),
        group(pins.uncharges),
        group(k.cgroup_events_lost),
        group(k.charges_lost_ringbuf),
        group(k.charges_lost_map_full),
        group(k.uncharges_lost),
        group(k.memcg_unknown),
        r.decode_errors,
    );
    out.push('\n');
}

fn groups(out: &mut String, title: &str, groups: &[Group]) {
    if groups.is_empty() {
        return;
    }
    let _ = write!(out, "{title}:");
    for g in groups.iter().take(8) {
        let _ = write!(
            out,
            "  {} {} (oldest {}, charged while live {})",
            g.key,
            g.zombies,
            secs(g.oldest_dying_s),
            group(g.pinned.objects)
        );
    }
    out.push('\n');
}

fn memcgs(out: &mut String, r: &Report, args: &MemcgArgs, last: bool) {
    let shown = &r.snapshot.memcgs;
    if shown.is_empty() {
        let _ = writeln!(out, "\nno memcg created or removed since tracing started");
        return;
    }
    let _ = writeln!(
        out,
        "\n{:>8} {:<8} {:>8} {:>8} {:>8}  {:<26} {:<18} PATH",
        "ID", "STATE", "AGE", "DYING", "CHARGED", "CREATOR", "REMOVER"
    );
    let limit = if last && r.kind != "list" {
        usize::MAX
    } else {
        args.limit
    };
    for m in shown.iter().take(limit) {
        memcg_line(out, m);
    }
    if shown.len() > limit {
        let _ = writeln!(out, "... {} more (--limit)", shown.len() - limit);
    }
}

fn memcg_line(out: &mut String, m: &MemcgReport) {
    let state = match m.state {
        Phase::Live => "live",
        Phase::Dying => "dying",
        Phase::Zombie => "ZOMBIE",
        Phase::Released => "released",
    };
    let who = |a: &Option<Actor>| {
        a.as_ref()
            .map_or_else(|| "-".to_string(), |a| format!("{}/{}", a.comm, a.tgid))
    };
    let _ = writeln!(
        out,
        "{:>8} {:<8} {:>8} {:>8} {:>8}  {:<26} {:<18} {}",
        m.id,
        state,
        m.age_s.map_or_else(|| "-".into(), secs),
        m.dying_s.map_or_else(|| "-".into(), secs),
        group(m.pinned.objects),
        who(&m.creator),
        who(&m.remover),
        m.path,
    );
    let c = &m.container;
    if !c.is_empty() {
        let _ = writeln!(
            out,
            "         container: runtime {}  pod {}  id {}{}",
            c.runtime.unwrap_or("?"),
            c.pod_uid.as_deref().unwrap_or("-"),
            c.container_id
                .as_deref()
                .map_or("-", |id| &id[..id.len().min(12)]),
            if c.conmon { " (conmon)" } else { "" }
        );
    }
    if let Some(a) = &m.creator {
        let chain: Vec<String> = a
            .ancestry
            .iter()
            .map(|p| format!("{}/{}", p.comm, p.pid))
            .collect();
        let _ = writeln!(
            out,
            "         created by: {}{}",
            a.cmdline.as_deref().unwrap_or(&a.comm),
            if chain.is_empty() {
                String::new()
            } else {
                format!("  <- {}", chain.join(" <- "))
            }
        );
    }
    if m.pinned.objects == 0 || !matches!(m.state, Phase::Dying | Phase::Zombie) {
        return;
    }
    let caches: Vec<String> = m
        .pinned_by_cache
        .iter()
        .map(|c| {
            format!(
                "{} {} ({})",
                c.cache,
                group(c.count.objects),
                human_bytes(c.count.bytes)
            )
        })
        .collect();
    let procs: Vec<String> = m
        .pinned_by_process
        .iter()
        .take(5)
        .map(|p| format!("{}/{} {}", p.comm, p.tgid, group(p.count.objects)))
        .collect();
    let _ = writeln!(
        out,
        "         objects charged while live (slab; reparented to the parent when the memcg went offline on >= 5.9, so they do not pin it there): {}",
        caches.join(", ")
    );
    let _ = writeln!(
        out,
        "         charged while live by processes: {}",
        procs.join(", ")
    );
    for (i, s) in m.pinned_stacks.iter().enumerate() {
        let _ = writeln!(
            out,
            "         stack #{}: {} {} by {}/{}",
            i + 1,
            group(s.count.objects),
            s.cache,
            s.comm,
            s.tgid
        );
        for f in s.kernel.iter().take(8) {
            let _ = writeln!(out, "             k {f}");
        }
    }
}

fn secs(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        format!("{:.0}m{:02.0}s", (s / 60.0).floor(), s % 60.0)
    } else {
        format!("{:.0}h{:02.0}m", (s / 3600.0).floor(), (s % 3600.0) / 60.0)
    }
}

pub fn terminal_rows() -> Option<usize> {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into the struct we own.
    let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) };
    (rc == 0 && size.ws_row > 0).then_some(usize::from(size.ws_row))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_top() {
        assert_eq!(secs(1.25), "1.2s");
        assert_eq!(secs(75.0), "1m15s");
        assert_eq!(secs(7260.0), "2h01m");
    }
}
