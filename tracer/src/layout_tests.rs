//! The layout's rules, checked on the source tree: which top-level modules may
//! use which. Folders hold one stage of the data path each; a stage may use the
//! stages below it, never one above (kernel facts know nothing of the tools),
//! and no two folders use each other, however indirectly; no two files do
//! either, and only main.rs turns the command line into options.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module -> the top-level modules its files name as `crate::X`.
fn uses() -> BTreeMap<String, BTreeSet<String>> {
    uses_with(crate_paths)
}

/// Top-level module -> the `X::Y` its files name as `crate::X::Y` (or `X` alone).
fn uses_deep() -> BTreeMap<String, BTreeSet<String>> {
    uses_with(crate_paths_deep)
}

fn uses_with(paths: fn(&str) -> BTreeSet<String>) -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src"));
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).expect("under src");
            let top = rel
                .components()
                .next()
                .and_then(|c| c.as_os_str().to_str())
                .map(|s| s.trim_end_matches(".rs").to_string())
                .expect("a name");
            let text = std::fs::read_to_string(&path).expect("read");
            out.entry(top.clone()).or_default().extend(
                paths(&text)
                    .into_iter()
                    .filter(|m| m.split("::").next() != Some(top.as_str())),
            );
        }
    }
    out
}

/// First segments after every `crate::`, including those of `crate::{a, b::c}`.
fn crate_paths(text: &str) -> BTreeSet<String> {
    crate_paths_deep(text)
        .into_iter()
        .filter_map(|p| p.split("::").next().map(str::to_string))
        .collect()
}

/// The first two segments after every `crate::` (`a::b`, or `a` alone),
/// including those of `crate::{a, b::c}`; a group one level down
/// (`crate::{a::{b, c}}`) gives `a::b` and `a::c`.
fn crate_paths_deep(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let mut paths = Vec::new();
    for (i, _) in text.match_indices("crate::") {
        let mut at = i + "crate::".len();
        use_tree(bytes, &mut at, &[], &mut paths);
    }
    paths
        .into_iter()
        .filter(|p| !p.is_empty())
        .map(|p| p.iter().take(2).cloned().collect::<Vec<_>>().join("::"))
        .collect()
}

/// The paths a use tree (or a plain path in code) names, from `b[*at..]`.
fn use_tree(b: &[u8], at: &mut usize, prefix: &[String], out: &mut Vec<Vec<String>>) {
    while *at < b.len() && b[*at].is_ascii_whitespace() {
        *at += 1;
    }
    if b.get(*at) == Some(&b'{') {
        *at += 1;
        while *at < b.len() {
            match b[*at] {
                b'}' => {
                    *at += 1;
                    return;
                }
                b',' => *at += 1,
                c if c.is_ascii_whitespace() => *at += 1,
                _ => {
                    let before = *at;
                    use_tree(b, at, prefix, out);
                    // `as name` and the like, up to the next item.
                    while *at < b.len() && b[*at] != b',' && b[*at] != b'}' {
                        *at += 1;
                    }
                    if *at == before {
                        *at += 1;
                    }
                }
            }
        }
        return;
    }
    let start = *at;
    while *at < b.len() && (b[*at].is_ascii_alphanumeric() || b[*at] == b'_') {
        *at += 1;
    }
    if *at == start {
        out.push(prefix.to_vec());
        return;
    }
    let mut path = prefix.to_vec();
    path.push(String::from_utf8_lossy(&b[start..*at]).into_owned());
    if b[*at..].starts_with(b"::") {
        *at += 2;
        use_tree(b, at, &path, out);
    } else {
        out.push(path);
    }
}

fn assert_uses_only(module: &str, allowed: &[&str]) {
    assert_uses_only_in(&uses(), module, allowed);
}

/// Like [`assert_uses_only`], by `folder::module` where `allowed` names one.
fn assert_uses_only_deep(module: &str, allowed: &[&str]) {
    let all = uses_deep();
    let used = all
        .get(module)
        .unwrap_or_else(|| panic!("no module {module}"));
    let extra: Vec<&String> = used
        .iter()
        .filter(|m| {
            let top = m.split("::").next().unwrap_or_default();
            top != "test_rng" && !allowed.contains(&m.as_str()) && !allowed.contains(&top)
        })
        .collect();
    assert!(
        extra.is_empty(),
        "{module}/ may use only {allowed:?}, but uses {extra:?}"
    );
}

fn assert_uses_only_in(all: &BTreeMap<String, BTreeSet<String>>, module: &str, allowed: &[&str]) {
    let used = all
        .get(module)
        .unwrap_or_else(|| panic!("no module {module}"));
    let extra: Vec<&String> = used
        .iter()
        .filter(|m| !allowed.contains(&m.as_str()) && m.as_str() != "test_rng")
        .collect();
    assert!(
        extra.is_empty(),
        "{module}/ may use only {allowed:?}, but uses {extra:?}"
    );
}

/// A chain of folders that leads from `from` back to itself, if any.
fn cycle_through(all: &BTreeMap<String, BTreeSet<String>>, from: &str) -> Option<Vec<String>> {
    let mut stack = vec![vec![from.to_string()]];
    let mut seen = BTreeSet::new();
    while let Some(path) = stack.pop() {
        let last = path.last().cloned().unwrap_or_default();
        for next in all.get(&last).into_iter().flatten() {
            if next == from {
                let mut cycle = path.clone();
                cycle.push(next.clone());
                return Some(cycle);
            }
            if seen.insert(next.clone()) {
                let mut longer = path.clone();
                longer.push(next.clone());
                stack.push(longer);
            }
        }
    }
    None
}

#[test]
fn crate_paths_are_found_in_groups_too() {
    let text =
        "use crate::{kernel::tracefs::{A, B}, present::units::x, slab};\nlet y = crate::plan::f();";
    let got: Vec<String> = crate_paths(text).into_iter().collect();
    assert_eq!(got, ["kernel", "plan", "present", "slab"]);
    let text = "use crate::{slab::{report::{self, R}, grouping as g}, kernel::btf::Btf};\n\
                let c = crate::slab::aggregator::Counts { x };";
    let got: Vec<String> = crate_paths_deep(text).into_iter().collect();
    assert_eq!(
        got,
        [
            "kernel::btf",
            "slab::aggregator",
            "slab::grouping",
            "slab::report"
        ]
    );
}

#[test]
fn no_folder_uses_itself_through_others() {
    let all = uses();
    for module in all.keys() {
        if let Some(cycle) = cycle_through(&all, module) {
            panic!("import cycle between folders: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn a_cycle_is_found() {
    let mut all: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    all.entry("a".into()).or_default().insert("b".into());
    all.entry("b".into()).or_default().insert("c".into());
    all.entry("c".into()).or_default().insert("a".into());
    assert_eq!(
        cycle_through(&all, "b"),
        Some(vec!["b".into(), "c".into(), "a".into(), "b".into()])
    );
    all.entry("c".into()).or_default().remove("a");
    assert_eq!(cycle_through(&all, "a"), None);
}

#[test]
fn kernel_facts_know_nothing_of_the_tools() {
    assert_uses_only("kernel", &[]);
}

#[test]
fn bpf_loading_is_shared_and_knows_no_tool() {
    assert_uses_only("bpf", &["kernel"]);
}

#[test]
fn symbolization_uses_only_kernel_facts() {
    assert_uses_only("symbolize", &["kernel"]);
}

#[test]
fn the_slab_model_uses_no_view_loop_or_cli() {
    assert_uses_only("slab", &["kernel", "bpf", "symbolize"]);
}

#[test]
fn only_main_reads_the_command_line() {
    // cli.rs owns the clap Args structs; main.rs converts them into the plain
    // options of what it runs (pipeline::trace::TraceOptions, MemcgOptions,
    // DoctorOptions, ServeOptions), so nothing below knows how a flag is spelled.
    for (module, used) in uses() {
        if ["main", "cli", "layout_tests"].contains(&module.as_str()) {
            continue;
        }
        assert!(
            !used.contains("cli"),
            "{module} uses the cli module; take a plain options struct that main.rs fills instead"
        );
    }
    for (path, text) in sources() {
        if ["main.rs", "cli.rs", "layout_tests.rs"].contains(&path.as_str()) {
            continue;
        }
        assert!(
            !text.contains("super::cli") && !text.contains("clap::Parser"),
            "{path} reaches the command line; take a plain options struct that main.rs fills instead"
        );
    }
}

#[test]
fn outputs_read_reports_only() {
    // Each tool's report model: rows, counts and groups are all in it.
    assert_uses_only_deep("output", &["slab::report", "memcg::report", "present"]);
}

#[test]
fn presentation_reads_reports_only() {
    // `caches.rs` renders `leaktrace caches`: the catalogue and slabinfo are its report.
    // `memcg_view.rs` reads memcg's report, which re-exports the model types it
    // holds; `--why` names the container of a path the report holds with the
    // same pure decoder the reports use (`kernel::cgroup_paths`, no I/O).
    assert_uses_only_deep(
        "present",
        &[
            "slab::report",
            "slab::grouping",
            "slab::caches",
            "kernel::slabinfo",
            "kernel::cgroup_paths",
            "memcg::report",
        ],
    );
}

#[test]
fn memcg_shares_the_machinery_and_copies_no_slab_code() {
    // No pipeline/, present/ or output/: its run is pipeline/memcg.rs, its
    // view present/memcg_view.rs, its profile output/memcg_pprof.rs.
    assert_uses_only("memcg", &["kernel", "bpf", "symbolize"]);
}

#[test]
fn the_tools_models_run_no_loop_and_print_nothing() {
    // memcg/ and slab/ hold plan, decode, tracker/aggregator and report; the
    // runtime, the loop and stdout belong to pipeline/.
    for (path, text) in sources() {
        if !(path.starts_with("memcg/") || path.starts_with("slab/")) {
            continue;
        }
        for word in ["tokio", "impl Tool", "event_loop", "stdout()", "println!"] {
            assert!(
                !text.contains(word),
                "{path} mentions `{word}`: runs belong to pipeline/, printing to present/ and pipeline/"
            );
        }
    }
}

/// Every `.rs` file under `src/`, as (path relative to `src/`, text).
fn sources() -> Vec<(String, String)> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<(String, String)>) {
        for entry in std::fs::read_dir(dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                walk(&path, root, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(root).expect("under src");
                let text = std::fs::read_to_string(&path).expect("read");
                out.push((rel.to_string_lossy().into_owned(), text));
            }
        }
    }
    let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src"));
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out
}

#[test]
fn both_tools_run_on_the_one_loop() {
    // The ring/ticker/signal select! lives in pipeline/event_loop.rs; the
    // tools implement its Tool trait instead of waiting on their own.
    for (path, text) in sources() {
        if path == "pipeline/event_loop.rs" || path == "layout_tests.rs" {
            continue;
        }
        assert!(
            !text.contains("ticker.tick()") && !text.contains("readable_mut()"),
            "{path} waits on the ring or the ticker itself; implement pipeline::event_loop::Tool"
        );
        if path.starts_with("memcg/") || path.starts_with("slab/") {
            assert!(
                !text.contains("tokio::select!"),
                "{path} has a select! loop of its own; implement pipeline::event_loop::Tool"
            );
        }
    }
}

/// The module path of a file under `src/` (`slab/aggregator/rows.rs` ->
/// `slab::aggregator::rows`, `slab/mod.rs` -> `slab`, `main.rs` -> the root).
fn module_of(path: &str) -> Vec<String> {
    let mut parts: Vec<String> = path
        .trim_end_matches(".rs")
        .split('/')
        .map(str::to_string)
        .collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "main") {
        parts.pop();
    }
    parts
}

/// File -> the other files its code names through `crate::` and `super::`
/// paths (comments and `mod tests` left out). A folder's `mod.rs` declares
/// its files and may name them; only what a file names outside its own
/// subtree counts.
fn file_uses() -> BTreeMap<String, BTreeSet<String>> {
    let sources = sources();
    let modules: BTreeMap<Vec<String>, String> = sources
        .iter()
        .map(|(path, _)| (module_of(path), path.clone()))
        .collect();
    let mut out = BTreeMap::new();
    for (path, text) in &sources {
        let here = module_of(path);
        let code: String = text
            .split("#[cfg(test)]\nmod tests")
            .next()
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let bytes = code.as_bytes();
        let mut named = BTreeSet::new();
        for (kw, base) in [("crate::", Vec::new()), ("super::", here.clone())] {
            for (i, _) in code.match_indices(kw) {
                let before = i.checked_sub(1).map(|j| bytes[j]);
                if before.is_some_and(|c| c == b':' || c.is_ascii_alphanumeric() || c == b'_') {
                    continue;
                }
                let mut base = base.clone();
                let mut at = i + kw.len();
                if kw == "super::" {
                    base.pop();
                    while code[at..].starts_with("super::") {
                        base.pop();
                        at += "super::".len();
                    }
                }
                let mut paths = Vec::new();
                use_tree(bytes, &mut at, &base, &mut paths);
                for p in paths {
                    // The longest prefix that is a file of src/.
                    let file = (1..=p.len())
                        .rev()
                        .find_map(|n| modules.get(&p[..n]))
                        .cloned();
                    if let Some(file) = file {
                        let target = module_of(&file);
                        if !target.starts_with(&here) {
                            named.insert(file);
                        }
                    }
                }
            }
        }
        out.insert(path.clone(), named);
    }
    out
}

#[test]
fn no_file_uses_itself_through_others() {
    let all = file_uses();
    assert!(all["slab/session.rs"].contains("slab/aggregator.rs"));
    assert!(all["slab/aggregator/rows.rs"].contains("slab/aggregator.rs"));
    for file in all.keys() {
        if let Some(cycle) = cycle_through(&all, file) {
            panic!("import circle between files: {}", cycle.join(" -> "));
        }
    }
}
