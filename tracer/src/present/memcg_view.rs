//! Text rendering of a memcg [`Report`]: the live `--top` screen, the final
//! report and `--list`. Plain text so it works in a terminal, `watch` and logs.
//! Reads memcg's report model only; what it needs besides is passed in.

use std::fmt::Write;

use crate::{
    memcg::report::{Actor, Group, KMemcg, MemcgReport, PercpuSummary, Phase, Report},
    present::units::{group, human_bytes, human_secs, tracked},
};

/// What the text view shows besides the report.
pub struct ViewOptions {
    /// The refresh period shown in the header, in seconds.
    pub interval_s: f64,
    /// Memcgs listed in live views (the final report lists every traced one).
    pub limit: usize,
}

/// The running kernel, for `--why`'s explanations of what releases a memcg.
pub struct KernelRelease {
    /// As `uname -r` prints it (empty when unreadable).
    pub release: String,
    /// (major, minor) of `release`; (0, 0) when it cannot be parsed.
    pub version: (u32, u32),
}

/// The whole view: header, zombie groups, traced memcgs and the kernel's
/// dying memcgs. `last`: the final report, which lists every traced memcg.
pub fn render(r: &Report, opts: &ViewOptions, last: bool) -> String {
    let mut out = String::new();
    header(&mut out, r, opts);
    groups(
        &mut out,
        "zombies by creator",
        &r.snapshot.zombies_by_creator,
    );
    groups(&mut out, "zombies by pod", &r.snapshot.zombies_by_pod);
    memcgs(&mut out, r, opts, last);
    kernel_memcgs(&mut out, r, opts);
    out
}

fn pages(v: Option<i64>) -> String {
    v.map_or_else(|| "?".into(), |p| group(u64::try_from(p).unwrap_or(0)))
}

/// Every dying memcg the kernel holds, pre-existing ones included.
fn kernel_memcgs(out: &mut String, r: &Report, opts: &ViewOptions) {
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
            "dying memcgs in the kernel: unknown {}: {}",
            if k.unknown
                .as_deref()
                .is_some_and(|u| u.starts_with("not root"))
            {
                "here"
            } else {
                "on this kernel"
            },
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
        "{:>8} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}  PATH   (pages; REFS = css references; dying = offline, not released)",
        "ID", "MEMCG", "CHARGED", "FILE", "SHMEM", "ANON", "SWAP", "KERNEL", "REFS"
    );
    let mut dying: Vec<_> = w.dying().collect();
    dying.sort_by_key(|m| std::cmp::Reverse(m.usage_pages.unwrap_or(0)));
    let limit = if r.kind == "list" {
        usize::MAX
    } else {
        opts.limit
    };
    for m in dying.iter().take(limit) {
        let _ = writeln!(
            out,
            "{:>8} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}  {}{}",
            m.id,
            // The memcg id is given back at offline (0 from then on).
            m.memcg_id
                .filter(|&i| i != 0)
                .map_or_else(|| "-".into(), |i| i.to_string()),
            m.usage_pages.map_or_else(|| "?".into(), group),
            pages(m.file),
            pages(m.shmem),
            pages(m.anon),
            pages(m.swap),
            pages(m.kernel),
            pages(m.css_refs),
            m.path,
            if m.released {
                "  (released, being freed)"
            } else {
                ""
            }
        );
        file_pins(out, m, 3, "           ");
    }
    if dying.len() > limit {
        let _ = writeln!(out, "... {} more dying (--limit)", dying.len() - limit);
    }
    if let Some(why) = &w.page_pins_unknown {
        let _ = writeln!(out, "page cache by file: {why}");
    } else {
        let _ = writeln!(
            out,
            "(files: each dying memcg's LRU pages by file, read in {:.0} ms; `--why ID` shows every file and what releases it)",
            w.page_pins_ms
        );
    }
}

/// A dying memcg's LRU pages by file, `n` files at most.
fn file_pins(out: &mut String, m: &KMemcg, n: usize, indent: &str) {
    let Some(p) = &m.page_pins else {
        return;
    };
    for f in p.files.iter().take(n) {
        let _ = writeln!(
            out,
            "{indent}{:>7} pages  {}",
            group(f.pages),
            f.path.clone().unwrap_or_else(|| match f.fs.as_deref() {
                Some("bdev") => format!(
                    "block device page cache (bdev inode {}; filesystem metadata / buffer heads)",
                    f.ino
                ),
                fs => format!(
                    "{} dev {} inode {} (no path: the inode has no dentry)",
                    fs.unwrap_or("?"),
                    f.dev,
                    f.ino
                ),
            })
        );
    }
    if p.files.len() > n {
        let rest: u64 = p.files[n..].iter().map(|f| f.pages).sum();
        let _ = writeln!(
            out,
            "{indent}{:>7} pages  in {} more files",
            group(rest),
            p.files.len() - n
        );
    }
    if p.anon_pages > 0 {
        let _ = writeln!(out, "{indent}{:>7} pages  anonymous", group(p.anon_pages));
    }
}

fn header(out: &mut String, r: &Report, opts: &ViewOptions) {
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
        opts.interval_s,
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
    let _ = writeln!(out, "{}", percpu_line(&r.percpu));
    let k = &r.kernel;
    let pins = &r.snapshot.pins;
    let _ = writeln!(
        out,
        "charged objects tracked: {}   lost: events {} charges {}+{} frees {}   memcg-unknown {}   decode-errors {}",
        tracked(pins.outstanding, None, ("charges", pins.charges), pins.uncharges),
        group(k.cgroup_events_lost),
        group(k.charges_lost_ringbuf),
        group(k.charges_lost_map_full),
        group(k.uncharges_lost),
        group(k.memcg_unknown),
        r.decode_errors,
    );
    out.push('\n');
}

/// "81 dying memcgs hold ~0.3M of Percpu": which part is measured, which estimated.
pub fn percpu_line(p: &PercpuSummary) -> String {
    let d = &p.dying;
    let total = d.total_bytes.map_or_else(
        || "an unknown amount".to_string(),
        |b| format!("~{}", human_bytes(b)),
    );
    let mut parts = Vec::new();
    if d.measured_memcgs > 0 || p.measuring {
        parts.push(format!(
            "{} measured: {}",
            group(d.measured_memcgs),
            human_bytes(d.measured_bytes)
        ));
    }
    match &p.estimate {
        Some(e) => parts.push(format!(
            "{} estimated at {} each (BTF sizes x {} possible CPUs)",
            group(d.estimated_memcgs),
            human_bytes(e.dying_bytes),
            p.possible_cpus
        )),
        None => parts.push(format!(
            "{} not estimated: {}",
            group(d.estimated_memcgs),
            p.estimate_unavailable.as_deref().unwrap_or("no estimate")
        )),
    }
    if let Some(b) = p.memory_stat_percpu {
        parts.push(format!(
            "memory.stat percpu under the top-level memcgs: {} (charged part only, dying included)",
            human_bytes(b)
        ));
    }
    format!(
        "per-CPU: {} dying memcgs hold {total} of Percpu ({})",
        group(d.memcgs),
        parts.join("; ")
    )
}

/// A memcg's per-CPU figure and its kind: `4.1K m` measured, `4.1K e` estimated.
fn percpu_cell(m: &MemcgReport) -> String {
    match &m.percpu {
        Some(p) if p.kind == "measured" => format!("{} m", human_bytes(p.bytes)),
        Some(p) if p.kind == "estimated" => format!("{} e", human_bytes(p.bytes)),
        Some(p) => human_bytes(p.bytes),
        None => "-".into(),
    }
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
            human_secs(g.oldest_dying_s),
            group(g.pinned.objects)
        );
    }
    out.push('\n');
}

fn memcgs(out: &mut String, r: &Report, opts: &ViewOptions, last: bool) {
    let shown = &r.snapshot.memcgs;
    if shown.is_empty() {
        let _ = writeln!(out, "\nno memcg created or removed since tracing started");
        return;
    }
    let _ = writeln!(
        out,
        "\n{:>8} {:<8} {:>8} {:>8} {:>8} {:>9}  {:<26} {:<18} PATH   (PERCPU: m measured, e estimated)",
        "ID", "STATE", "AGE", "DYING", "CHARGED", "PERCPU", "CREATOR", "REMOVER"
    );
    let limit = if last && r.kind != "list" {
        usize::MAX
    } else {
        opts.limit
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
        "{:>8} {:<8} {:>8} {:>8} {:>8} {:>9}  {:<26} {:<18} {}",
        m.id,
        state,
        m.age_s.map_or_else(|| "-".into(), human_secs),
        m.dying_s.map_or_else(|| "-".into(), human_secs),
        group(m.pinned.objects),
        percpu_cell(m),
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

/// `--why ID`: one memcg's whole story, explained for `kernel_release`.
pub fn why(r: &Report, id: u64, kernel_release: &KernelRelease) -> String {
    let mut out = String::new();
    let kernel = r
        .kernel_memcgs
        .as_ref()
        .and_then(|k| k.walk.as_ref())
        .and_then(|w| w.memcgs.iter().find(|m| m.id == id));
    let traced = r.snapshot.memcgs.iter().find(|m| m.id == id);
    let path = kernel
        .map(|m| m.path.clone())
        .or_else(|| traced.map(|m| m.path.clone()));
    let _ = writeln!(
        out,
        "memcg {id}: {}",
        path.as_deref().unwrap_or("(not found)")
    );
    let (release, kv) = (&kernel_release.release, kernel_release.version);
    match (kernel, &r.kernel_memcgs) {
        (Some(m), _) => {
            let state = if m.dying {
                "dying: offline (rmdir'd) but not released; something still holds it"
            } else if m.online {
                "live (online)"
            } else {
                "root"
            };
            let _ = writeln!(out, "  state: {state}");
        }
        (None, Some(k)) if k.walk.is_some() => {
            let _ = writeln!(
                out,
                "  state: not in the kernel: released (or never a memcg in hierarchy {})",
                r.hierarchy.id
            );
        }
        (None, Some(k)) => {
            let _ = writeln!(
                out,
                "  state: unknown on this kernel: {}",
                k.unknown.as_deref().unwrap_or("no walk")
            );
        }
        (None, None) => {}
    }
    let container = path
        .as_deref()
        .map(crate::kernel::cgroup_paths::decode)
        .unwrap_or_default();
    if !container.is_empty() {
        let _ = writeln!(
            out,
            "  container: runtime {}  pod {}  id {}",
            container.runtime.unwrap_or("?"),
            container.pod_uid.as_deref().unwrap_or("-"),
            container.container_id.as_deref().unwrap_or("-")
        );
    }
    let actor = |a: &Option<Actor>| {
        a.as_ref().map(|a| {
            let chain: Vec<String> = a
                .ancestry
                .iter()
                .map(|p| format!("{}/{}", p.comm, p.pid))
                .collect();
            format!(
                "{}/{} {}{}",
                a.comm,
                a.tgid,
                a.cmdline.as_deref().unwrap_or(""),
                if chain.is_empty() {
                    String::new()
                } else {
                    format!("  <- {}", chain.join(" <- "))
                }
            )
        })
    };
    match traced {
        Some(t) => {
            let _ = writeln!(
                out,
                "  created by: {}",
                actor(&t.creator)
                    .unwrap_or_else(|| "unknown: created before tracing started".into())
            );
            let _ = writeln!(
                out,
                "  removed by: {}{}",
                actor(&t.remover).unwrap_or_else(|| "-".into()),
                t.dying_s
                    .map(|d| format!(", {} ago", human_secs(d)))
                    .unwrap_or_default()
            );
        }
        None => {
            let _ = writeln!(
                out,
                "  created / removed by: unknown on this kernel: before leaktrace traced it (the kernel keeps no creator, and no offline time); run with --duration to attribute new ones"
            );
        }
    }
    let Some(m) = kernel else {
        return out;
    };
    let p = |v: Option<u64>| v.map_or_else(|| "?".into(), group);
    let _ = writeln!(
        out,
        "  page counters: memory {} pages, {} {} pages, {}",
        p(m.usage_pages),
        if r.hierarchy.version == 1 {
            "memsw (memory+swap)"
        } else {
            "swap"
        },
        p(m.swap_counter_pages),
        match (r.hierarchy.version, m.kmem_counter_pages) {
            (1, Some(k)) => format!("kmem {} pages", group(k)),
            (1, None) => "kmem: no v1 kmem counter in this kernel".to_string(),
            _ => "kmem: no separate counter on cgroup v2 (kernel pages are in memory)".to_string(),
        },
    );
    let _ = writeln!(
        out,
        "  pages by kind: file {}  shmem {}  anon {}  swap {}  kernel {}  dirty {}  writeback {}",
        pages(m.file),
        pages(m.shmem),
        pages(m.anon),
        pages(m.swap),
        pages(m.kernel),
        pages(m.dirty),
        pages(m.writeback)
    );
    let _ = writeln!(out, "  what holds it, on kernel {release}:");
    match &m.page_pins {
        Some(pp) => {
            let files: u64 = pp.files.iter().map(|f| f.pages).sum();
            let _ = writeln!(
                out,
                "    page cache: {} pages in {} files (its LRU lists walked now: every folio still charged to it, however old){}",
                group(files),
                pp.files.len(),
                if pp.truncated { "; walk stopped early" } else { "" }
            );
            file_pins(&mut out, m, usize::MAX, "      ");
            if files > 0 {
                let shmem_only = pp
                    .files
                    .iter()
                    .all(|f| matches!(f.fs.as_deref(), Some("tmpfs" | "shmem")));
                let _ = writeln!(
                    out,
                    "      release: a file that is garbage (a dead container's log or volume): delete or truncate it, once no process has it open or mapped{}{}",
                    if shmem_only {
                        "; tmpfs pages go no other way (fadvise(DONTNEED) does not free shmem)"
                    } else {
                        "; a file still in use (a library, an image layer): evict its clean, unmapped pages with posix_fadvise(DONTNEED), e.g. `dd if=FILE iflag=nocache count=0` (does not free shmem, dirty or mapped pages)"
                    },
                    if r.hierarchy.version == 2 && kv >= (5, 19) {
                        "; or write to the parent's memory.reclaim (clean file pages)"
                    } else {
                        ""
                    }
                );
            }
        }
        None if m.dying => {
            let _ = writeln!(
                out,
                "    page cache by file: unknown on this kernel: the LRU walk was not possible"
            );
        }
        None => {
            let _ = writeln!(
                out,
                "    (live: page cache by file is walked for dying memcgs only)"
            );
        }
    }
    if let Some(refs) = m.css_refs {
        let folios = m.page_pins.as_ref().map(|p| p.folios_walked);
        let _ = writeln!(
            out,
            "    css references: {}{}",
            group(u64::try_from(refs).unwrap_or(0)),
            match folios {
                Some(f) => format!(
                    "; its LRU folios hold {} (one each on this kernel's charge path), so {} other reference{} (swap records, sockets' sk_memcg, fsnotify groups, writeback, BPF maps, ...; not identified)",
                    group(f),
                    refs - f as i64,
                    if refs - f as i64 == 1 { "" } else { "s" }
                ),
                None => String::new(),
            }
        );
    }
    if m.swap.unwrap_or(0) > 0 {
        let _ = writeln!(
            out,
            "    swap: {} pages swapped out while charged here; each swap entry records this memcg and holds it until freed",
            pages(m.swap)
        );
    }
    let kernel_note = if kv >= (5, 14) {
        "charged through obj_cgroup and reparented to the parent at offline: not a pin on this kernel (their later frees are uncharged from the parent, so this count can stay above what is really left)"
    } else if kv >= (5, 9) {
        "slab objects reparented at offline (not a pin); other accounted kernel pages (pipe buffers, kernel stacks) still pin until 5.14"
    } else {
        "every charged kernel object pins the memcg on kernels before 5.9"
    };
    let _ = writeln!(
        out,
        "    kernel memory: {} pages, {kernel_note}",
        pages(m.kernel)
    );
    let _ = writeln!(
        out,
        "    holders of other references (sockets' sk_memcg, fsnotify groups, swap records, cgroup-v2 writeback, BPF maps on 5.11-6.0): unknown on this kernel: leaktrace {} but does not identify their holders",
        if m.css_refs.is_some() { "counts them (above)" } else { "cannot read the css refcount here" }
    );
    if let Some(t) = traced {
        if t.pinned.objects > 0 {
            let _ = writeln!(
                out,
                "  objects charged while live (since tracing started; reparented on >= 5.9): {}",
                group(t.pinned.objects)
            );
        }
    }
    let _ = writeln!(
        out,
        "  kernel memory accounting: {} ({})",
        r.kmem_accounting.charged, r.kmem_accounting.rule
    );
    out
}
