//! Slab growth: a two-shot slabtop over the watch window, caches ranked by growth, aliases
//! named, and the exact `leaktrace --cache` to run next.

use super::*;

pub(super) const TOP_CACHES: usize = 5;
/// A cache growing this fast for the whole window is worth tracing whatever the node size.
pub(super) const GROWTH_FLOOR_BYTES_PER_SEC: f64 = 64.0 * 1024.0;
/// ... or fast enough to eat 1% of RAM in an hour.
pub(super) const GROWTH_RAM_PCT_PER_HOUR: f64 = 1.0;
/// ... and by at least this much in all: a short window otherwise flags one burst of
/// process start-up (filp, pid, vma caches) as a leak.
pub(super) const GROWTH_MIN_BYTES: f64 = 256.0 * 1024.0;
/// One cache holding this much of RAM is a leak suspect even when it is not growing now.
pub(super) const CACHE_WARN_PCT: f64 = 10.0;
pub(super) const CACHE_CRIT_PCT: f64 = 25.0;

#[derive(Debug, Clone, Serialize)]
pub struct CacheRow {
    pub name: String,
    /// Other names SLUB merged into this cache (their objects are counted here).
    pub aliases: Vec<String>,
    pub objsize: u64,
    pub active_objs: u64,
    pub total_bytes: u64,
    pub objs_per_sec: f64,
    pub bytes_per_sec: f64,
    pub pct_of_ram: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SlabData {
    pub elapsed_seconds: f64,
    pub growth_threshold_bytes_per_sec: f64,
    /// Caches that grew, fastest first.
    pub top_growth: Vec<CacheRow>,
    /// Caches by size (objects the cache has room for), largest first.
    pub top_size: Vec<CacheRow>,
    /// The cache to trace next, under the name `--cache` accepts.
    pub suggested_cache: Option<String>,
}

pub fn slab_finding(
    before: &[SlabLine],
    after: &[SlabLine],
    elapsed: Duration,
    catalogue: Option<&Catalogue>,
    mem_total_kb: Option<u64>,
) -> Result<Finding> {
    let ram = mem_total_kb.map(|k| k.saturating_mul(1024));
    let threshold = ram.map_or(GROWTH_FLOOR_BYTES_PER_SEC, |r| {
        (r as f64 * GROWTH_RAM_PCT_PER_HOUR / 100.0 / 3600.0).max(GROWTH_FLOOR_BYTES_PER_SEC)
    });
    let mut rows = Vec::new();
    for now in after {
        // A cache created during the window grew from nothing.
        let empty = SlabLine {
            active_objs: 0,
            num_objs: 0,
            ..now.clone()
        };
        let then = before.iter().find(|b| b.name == now.name).unwrap_or(&empty);
        let g = slabinfo::growth(then, now, elapsed)?;
        let aliases = catalogue
            .and_then(|c| c.get(&now.name))
            .map(|c| c.aliases.clone())
            .unwrap_or_default();
        rows.push(CacheRow {
            name: now.name.clone(),
            aliases,
            objsize: now.objsize,
            active_objs: now.active_objs,
            total_bytes: now.total_bytes(),
            objs_per_sec: g.objs_per_sec,
            bytes_per_sec: g.bytes_per_sec,
            pct_of_ram: ram.map(|r| pct(now.total_bytes(), r)),
        });
    }
    let mut growth: Vec<CacheRow> = rows
        .iter()
        .filter(|r| r.bytes_per_sec > 0.0)
        .cloned()
        .collect();
    growth.sort_by(|a, b| {
        b.bytes_per_sec
            .total_cmp(&a.bytes_per_sec)
            .then(a.name.cmp(&b.name))
    });
    growth.truncate(TOP_CACHES);
    let mut size = rows;
    size.sort_by(|a, b| b.total_bytes.cmp(&a.total_bytes).then(a.name.cmp(&b.name)));
    size.truncate(TOP_CACHES);

    let fastest = growth.first().filter(|r| {
        r.bytes_per_sec >= threshold && r.bytes_per_sec * elapsed.as_secs_f64() >= GROWTH_MIN_BYTES
    });
    let largest = size.first();
    let largest_pct = largest.and_then(|r| r.pct_of_ram).unwrap_or(0.0);
    let mut severity = Severity::Ok;
    if fastest.is_some() || largest_pct >= CACHE_WARN_PCT {
        severity = Severity::Warning;
    }
    if largest_pct >= CACHE_CRIT_PCT {
        severity = Severity::Critical;
    }
    // A leak that is fast now is the one a trace can catch in the act; a big cache that has
    // stopped growing still holds the culprit's objects, but only new ones can be attributed.
    let pick = fastest
        .or(largest.filter(|_| largest_pct >= CACHE_WARN_PCT))
        .or(growth.first())
        .or(largest);
    let suggested_cache = pick.map(|r| traceable_name(catalogue, &r.name));

    let secs = elapsed.as_secs_f64();
    let mut parts = Vec::new();
    match (fastest, growth.first()) {
        (Some(r), _) => parts.push(format!("{} grows {}", with_aliases(r), rate(r))),
        (None, Some(r)) => parts.push(format!(
            "no cache grew faster than {}/s over {secs:.1}s (fastest {} {})",
            human_bytes(threshold as u64),
            r.name,
            rate(r)
        )),
        (None, None) => parts.push(format!("no cache grew over {secs:.1}s")),
    }
    if let Some(r) = largest {
        let share = r
            .pct_of_ram
            .map(|p| format!(" = {p:.1}% of RAM"))
            .unwrap_or_default();
        parts.push(format!(
            "largest {} {}{share}",
            r.name,
            human_bytes(r.total_bytes)
        ));
    }
    let mut details = vec![format!(
        "growth over {secs:.1}s (/proc/slabinfo active objects):"
    )];
    if growth.is_empty() {
        details.push("  (none)".to_string());
    }
    for r in &growth {
        let line = format!("  {:<24} {:>12}  {}", r.name, rate(r), alias_note(r));
        details.push(line.trim_end().to_string());
    }
    details.push("largest caches:".to_string());
    for r in &size {
        let share = r
            .pct_of_ram
            .map(|p| format!("{p:5.1}%"))
            .unwrap_or_default();
        let line = format!(
            "  {:<24} {:>8} {share}  {} objs of {}B  {}",
            r.name,
            human_bytes(r.total_bytes),
            r.active_objs,
            r.objsize,
            alias_note(r)
        );
        details.push(line.trim_end().to_string());
    }
    Ok(Finding {
        check: "slab",
        severity,
        summary: parts.join("; "),
        details,
        data: Some(Data::Slab(SlabData {
            elapsed_seconds: secs,
            growth_threshold_bytes_per_sec: threshold,
            top_growth: growth,
            top_size: size,
            suggested_cache,
        })),
    })
}

pub(super) fn rate(r: &CacheRow) -> String {
    format!(
        "+{}/s ({:+.0} objs/s)",
        human_bytes(r.bytes_per_sec.max(0.0) as u64),
        r.objs_per_sec
    )
}

pub(super) fn with_aliases(r: &CacheRow) -> String {
    if r.aliases.is_empty() {
        r.name.clone()
    } else {
        format!("{} (merged: {})", r.name, r.aliases.join(", "))
    }
}

pub(super) fn alias_note(r: &CacheRow) -> String {
    if r.aliases.is_empty() {
        String::new()
    } else {
        format!("merged: {}", r.aliases.join(", "))
    }
}

/// The name `leaktrace --cache` accepts for a slabinfo line: random-kmalloc copies and
/// dedicated buckets can only be traced through their kmalloc cache.
pub(super) fn traceable_name(catalogue: Option<&Catalogue>, name: &str) -> String {
    let Some(cat) = catalogue else {
        return name.to_string();
    };
    match caches::select(cat, name) {
        Ok(s) => s.cache,
        Err(SelectError::RandomKmalloc { base, .. }) => base,
        Err(SelectError::KmallocBucket { kmalloc, .. }) => kmalloc,
        Err(SelectError::KmallocKindAbsent { served_by, .. }) => served_by,
        Err(_) => name.to_string(),
    }
}
