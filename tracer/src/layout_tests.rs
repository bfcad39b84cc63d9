//! The layout's rules, checked on the source tree: which top-level modules may
//! use which. Folders hold one stage of the data path each; a stage may use the
//! stages below it, never one above (kernel facts know nothing of the tools).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module -> the top-level modules its files name as `crate::X`.
fn uses() -> BTreeMap<String, BTreeSet<String>> {
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
            out.entry(top.clone())
                .or_default()
                .extend(crate_paths(&text).into_iter().filter(|m| *m != top));
        }
    }
    out
}

/// First segments after every `crate::`, including those of `crate::{a, b::c}`.
fn crate_paths(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut item = String::new();
            let mut at_start = true;
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => at_start = true,
                    c if at_start && (c.is_alphanumeric() || c == '_') => item.push(c),
                    _ if at_start && !item.is_empty() => {
                        found.insert(std::mem::take(&mut item));
                        at_start = false;
                    }
                    _ => {}
                }
            }
            if !item.is_empty() {
                found.insert(item);
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

fn assert_uses_only(module: &str, allowed: &[&str]) {
    let all = uses();
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

#[test]
fn crate_paths_are_found_in_groups_too() {
    let text =
        "use crate::{kernel::tracefs::{A, B}, present::units::x, slab};\nlet y = crate::plan::f();";
    let got: Vec<String> = crate_paths(text).into_iter().collect();
    assert_eq!(got, ["kernel", "plan", "present", "slab"]);
}

#[test]
fn kernel_facts_know_nothing_of_the_tools() {
    assert_uses_only("kernel", &[]);
}

#[test]
fn presentation_units_stand_alone() {
    assert_uses_only("present", &[]);
}

#[test]
fn slab_caches_use_only_kernel_facts_and_units() {
    assert_uses_only("slab", &["kernel", "present"]);
}

#[test]
fn outputs_read_reports_only() {
    // The aggregator's Counts are part of the report model.
    assert_uses_only("output", &["report", "aggregator", "grouping", "present"]);
}
