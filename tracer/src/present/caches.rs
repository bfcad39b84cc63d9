//! `leaktrace caches`: the slab catalogue as a table. Here rather than in
//! `slab/caches/` so the slab model below never imports its presentation.

use std::collections::BTreeSet;

use crate::kernel::slabinfo::SlabLine;
use crate::present::units::human_bytes;
use crate::slab::caches::Catalogue;

/// `leaktrace caches`: one line per kmem_cache, largest first.
pub fn render_table(cat: &Catalogue, slabinfo: &[SlabLine]) -> String {
    struct Row {
        name: String,
        objsize: String,
        active: String,
        total: Option<u64>,
        aliases: String,
    }
    let alias_text = |aliases: &[String]| {
        if aliases.is_empty() {
            "-".to_string()
        } else {
            aliases.join(", ")
        }
    };
    let mut rows: Vec<Row> = if slabinfo.is_empty() {
        // No counts without /proc/slabinfo (non-root); still list what can be selected.
        let mut seen = BTreeSet::new();
        cat.iter()
            .filter(|c| seen.insert(c.sysfs_dir.clone().unwrap_or_else(|| c.name.clone())))
            .map(|c| Row {
                name: c.name.clone(),
                objsize: c.slab_size.to_string(),
                active: "-".to_string(),
                total: None,
                aliases: alias_text(&c.aliases),
            })
            .collect()
    } else {
        slabinfo
            .iter()
            .map(|l| Row {
                name: l.name.clone(),
                objsize: l.objsize.to_string(),
                active: l.active_objs.to_string(),
                total: Some(l.total_bytes()),
                aliases: cat
                    .get(&l.name)
                    .map(|c| alias_text(&c.aliases))
                    .unwrap_or_else(|| "-".to_string()),
            })
            .collect()
    };
    rows.sort_by(|a, b| b.total.cmp(&a.total).then_with(|| a.name.cmp(&b.name)));

    let width = rows
        .iter()
        .map(|r| r.name.len())
        .chain(std::iter::once(4))
        .max()
        .unwrap_or(4);
    let mut out = format!(
        "{:<width$} {:>8} {:>12} {:>9}  ALIASES\n",
        "NAME", "OBJSIZE", "ACTIVE", "TOTAL"
    );
    for r in &rows {
        let total = r.total.map(human_bytes).unwrap_or_else(|| "-".to_string());
        out.push_str(&format!(
            "{:<width$} {:>8} {:>12} {:>9}  {}\n",
            r.name, r.objsize, r.active, total, r.aliases
        ));
    }
    if slabinfo.is_empty() && cat.slabinfo_note().is_none() {
        out.push_str("note: no /proc/slabinfo figures (reading it needs root)\n");
    }
    for note in cat.notes() {
        out.push_str(&format!("note: {note}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::slabinfo;

    fn fixture(name: &str) -> std::path::PathBuf {
        std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/proc")).join(name)
    }

    fn catalogue(name: &str) -> Catalogue {
        Catalogue::read(&fixture(name)).unwrap()
    }

    #[test]
    fn table_sorted_by_total_bytes() {
        let root = fixture("incident");
        let cat = Catalogue::read(&root).unwrap();
        let lines = slabinfo::read(&root).unwrap();
        let table = render_table(&cat, &lines);
        let rows: Vec<&str> = table.lines().collect();
        assert!(rows[0].starts_with("NAME") && rows[0].ends_with("ALIASES"));
        let first: Vec<&str> = rows[1].split_whitespace().collect();
        assert_eq!(first, ["kmalloc-512", "512", "115300000", "55.0G", "-"]);
        assert!(rows[2].starts_with("dentry"));
        assert!(rows
            .last()
            .unwrap()
            .starts_with("note: /sys/kernel/slab is absent"));
    }

    #[test]
    fn table_lists_aliases() {
        let root = fixture("host-6.18");
        let cat = Catalogue::read(&root).unwrap();
        let lines = slabinfo::read(&root).unwrap();
        let table = render_table(&cat, &lines);
        let key_jar = table.lines().find(|l| l.starts_with("key_jar ")).unwrap();
        assert!(key_jar.ends_with("  biovec-16, sgpool-8"), "{key_jar}");
        assert_eq!(table.lines().count(), lines.len() + 1);
        let mut expected: Vec<&SlabLine> = lines.iter().collect();
        expected.sort_by(|a, b| {
            b.total_bytes()
                .cmp(&a.total_bytes())
                .then(a.name.cmp(&b.name))
        });
        let order: Vec<&str> = table
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        let expected: Vec<&str> = expected.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(order, expected);
    }

    #[test]
    fn table_without_slabinfo_lists_each_kmem_cache_once() {
        let cat = catalogue("nokmem");
        let table = render_table(&cat, &[]);
        assert!(table.lines().any(|l| l.starts_with("anon_vma_chain ")));
        assert!(!table.lines().any(|l| l.starts_with("vmap_area ")));
        assert!(table.contains("note: could not read"));
        assert_eq!(table.matches("note:").count(), 1, "{table}");
        let table = render_table(&catalogue("merged"), &[]);
        assert!(table.ends_with("note: no /proc/slabinfo figures (reading it needs root)\n"));
    }
}
