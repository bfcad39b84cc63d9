//! `leaktrace caches`: the catalogue as a table.

use super::*;
use crate::present::units::human_bytes;

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
    if slabinfo.is_empty() && cat.slabinfo_note.is_none() {
        out.push_str("note: no /proc/slabinfo figures (reading it needs root)\n");
    }
    for note in cat.notes() {
        out.push_str(&format!("note: {note}\n"));
    }
    out
}
