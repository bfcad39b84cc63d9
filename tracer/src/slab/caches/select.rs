//! `--cache NAME` to what the eBPF side must match, with did-you-mean for typos.

use super::*;

pub(super) fn digits(s: &str) -> String {
    s.chars().filter(char::is_ascii_digit).collect()
}

/// Optimal string alignment distance: Levenshtein plus adjacent transpositions ("kmlaloc").
pub(super) fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let width = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * width];
    for i in 0..=a.len() {
        d[i * width] = i;
    }
    for (j, cell) in d.iter_mut().enumerate().take(width) {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[(i - 1) * width + j] + 1)
                .min(d[i * width + j - 1] + 1)
                .min(d[(i - 1) * width + j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[(i - 2) * width + j - 2] + 1);
            }
            d[i * width + j] = best;
        }
    }
    d[a.len() * width + b.len()]
}

/// What the eBPF side must match to see every allocation from the selected cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Selection {
    /// The selected cache as the catalogue spells it (`kmalloc-1024` -> `kmalloc-1k`).
    pub cache: String,
    /// `s->size`, the `bytes_alloc` both kmem tracepoints report for it.
    pub object_size: u32,
    /// Match kmem:kmalloc events with `bytes_alloc == size` and this kind (from gfp flags).
    pub kmalloc: Option<(u32, KmallocKind)>,
    /// Further kmalloc (size, kind) pairs served by the same kmem_cache(s).
    pub also_kmalloc: Vec<(u32, KmallocKind)>,
    /// Names to match in kmem:kmem_cache_alloc's `name` field; the kernel's `s->name` first.
    /// Empty when nothing but kmalloc() allocates from the cache.
    pub named: Vec<String>,
    /// Other caches whose objects are counted too: "also covers merged caches: a, b".
    pub aliases_included: Vec<String>,
    /// Caveats to print before tracing.
    pub notes: Vec<String>,
    /// Every cache at once (`--all-caches`): a classic kmem_cache_alloc
    /// without a `name` field (before 6.18) is hooked all the same, its
    /// samples named by object size in userspace.
    #[serde(skip)]
    pub every_cache: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    #[error("unknown slab cache '{name}'{}", did_you_mean(.suggestions))]
    Unknown {
        name: String,
        suggestions: Vec<String>,
    },
    #[error(
        "'{name}' is one of the CONFIG_RANDOM_KMALLOC_CACHES copies of {base}: the kernel picks \
         the copy per call site and kmem:kmalloc events do not say which, so a copy cannot be \
         traced alone; select {base} (covers it and all its kmalloc-rnd-* copies)"
    )]
    RandomKmalloc { name: String, base: String },
    #[error(
        "'{name}' is a dedicated kmalloc bucket (CONFIG_SLAB_BUCKETS): its allocations appear as \
         kmem:kmalloc events indistinguishable from {kmalloc} (or the kmalloc-cg/-rcl cache of \
         that size, by gfp flags); select that cache and look for the bucket's callers in the \
         stacks"
    )]
    KmallocBucket { name: String, kmalloc: String },
    #[error(
        "'{name}' does not exist on this kernel: there are no {} caches because {} are served \
         by {served_by}; select {served_by}",
        .kind.family(),
        .kind.absence_reason()
    )]
    KmallocKindAbsent {
        name: String,
        kind: KmallocKind,
        served_by: String,
    },
    #[error(
        "'{cache}' shares its kmem_cache with {} names ({}), more than the {MAX_NAMED} the tracer \
         can match, and /proc/slabinfo was unreadable to tell which one the kernel reports; run \
         as root",
        .names.len(),
        .names.join(", ")
    )]
    TooManyNames { cache: String, names: Vec<String> },
}

pub(super) fn did_you_mean(suggestions: &[String]) -> String {
    if suggestions.is_empty() {
        " (see 'leaktrace caches')".to_string()
    } else {
        format!(
            "; did you mean: {}? (see 'leaktrace caches')",
            suggestions.join(", ")
        )
    }
}

/// Turns `--cache NAME` into what the eBPF side must match.
pub fn select(cat: &Catalogue, user_name: &str) -> Result<Selection, SelectError> {
    let wanted = user_name.trim();
    let Some(info) = cat.resolve(wanted) else {
        if let Some(err) = absent_kind(cat, wanted) {
            return Err(err);
        }
        let mut suggestions = cat.suggest(wanted);
        // kmalloc-rnd-NN-N on a kernel without random caches: kmalloc-N is what was meant.
        if let Some(KmallocName::Random { size, .. }) = parse_kmalloc_name(wanted) {
            if let Some(base) = cat.kmalloc_cache(KmallocKind::Normal, size) {
                suggestions.retain(|s| *s != base.name);
                suggestions.insert(0, base.name.clone());
                suggestions.truncate(MAX_SUGGESTIONS);
            }
        }
        return Err(SelectError::Unknown {
            name: wanted.to_string(),
            suggestions,
        });
    };
    let own = parse_kmalloc_name(&info.name);
    if let Some(KmallocName::Random { size, size_text }) = own {
        let base = cat
            .kmalloc_cache(KmallocKind::Normal, size)
            .map(|c| c.name.clone())
            .unwrap_or_else(|| KmallocKind::Normal.cache_name(size_text));
        return Err(SelectError::RandomKmalloc {
            name: info.name.clone(),
            base,
        });
    }
    let buckets = cat.bucket_families();
    if own.is_none() {
        if let Some(size) = buckets
            .values()
            .find_map(|m| m.iter().find(|(_, n)| **n == info.name).map(|(s, _)| *s))
        {
            let kmalloc = cat
                .kmalloc_cache(KmallocKind::Normal, size)
                .map(|c| c.name.clone())
                .unwrap_or_else(|| format!("kmalloc-{size}"));
            return Err(SelectError::KmallocBucket {
                name: info.name.clone(),
                kmalloc,
            });
        }
    }

    let size = info.slab_size;
    let mut notes: Vec<String> = cat.selection_notes.clone();
    let group: Vec<&str> = std::iter::once(info.name.as_str())
        .chain(info.aliases.iter().map(String::as_str))
        .collect();

    // Every kmalloc kind served by this kmem_cache; all report its s->size as bytes_alloc.
    let mut kinds: Vec<(KmallocKind, u32)> = Vec::new();
    for name in &group {
        if let Some(KmallocName::Kind { kind, size, .. }) = parse_kmalloc_name(name) {
            kinds.push((kind, size));
        }
    }
    let kmalloc = match own {
        Some(KmallocName::Kind { kind, .. }) => Some((size, kind)),
        _ => None,
    };
    let mut also_kmalloc: Vec<(u32, KmallocKind)> = Vec::new();
    let add = |entry: (u32, KmallocKind), also: &mut Vec<(u32, KmallocKind)>| {
        if Some(entry) != kmalloc && !also.contains(&entry) {
            also.push(entry);
        }
    };
    for (kind, _) in &kinds {
        add((size, *kind), &mut also_kmalloc);
    }

    let mut aliases_included = info.aliases.clone();
    let normal_size = kinds
        .iter()
        .find(|(k, _)| *k == KmallocKind::Normal)
        .map(|(_, s)| *s);
    if let Some(nominal) = normal_size {
        // Kinds whose caches the kernel never created fall back to kmalloc-N.
        for kind in [
            KmallocKind::Cgroup,
            KmallocKind::Reclaimable,
            KmallocKind::Dma,
        ] {
            if !cat.has_kind(kind) {
                add((size, kind), &mut also_kmalloc);
                notes.push(format!(
                    "no {} caches: {} are served by {} and are included",
                    kind.family(),
                    kind.absence_reason(),
                    info.name
                ));
            }
        }
        let copies: Vec<&CacheInfo> = cat
            .iter()
            .filter(|c| {
                matches!(parse_kmalloc_name(&c.name),
                    Some(KmallocName::Random { size, .. }) if size == nominal)
            })
            .collect();
        if !copies.is_empty() {
            for copy in &copies {
                aliases_included.push(copy.name.clone());
                add((copy.slab_size, KmallocKind::Normal), &mut also_kmalloc);
            }
            notes.push(format!(
                "CONFIG_RANDOM_KMALLOC_CACHES: {} copies of this size class ({} .. {}) are chosen \
                 per call site and look identical in kmem:kmalloc events, so they are included",
                copies.len(),
                copies.first().map(|c| c.name.as_str()).unwrap_or(""),
                copies.last().map(|c| c.name.as_str()).unwrap_or("")
            ));
        }
    }
    let nominal_sizes: BTreeSet<u32> = kinds.iter().map(|(_, s)| *s).collect();
    for nominal in nominal_sizes {
        let same_size: Vec<&str> = buckets
            .values()
            .filter_map(|m| m.get(&nominal).copied())
            .collect();
        if !same_size.is_empty() {
            notes.push(format!(
                "dedicated kmalloc buckets {} (CONFIG_SLAB_BUCKETS) produce identical kmem:kmalloc \
                 events; their allocations with a matching gfp kind are counted too (tell them \
                 apart by stack)",
                same_size.join(", ")
            ));
        }
    }

    let named = named_for(cat, info, &group, &mut notes)?;

    if info.debug {
        notes.push(format!(
            "SLUB debugging (red_zone/poison/store_user) is on for {}: objects of {} bytes \
             occupy {} bytes each, and tracing it is slower than usual",
            info.name, info.object_size, info.slab_size
        ));
    }

    Ok(Selection {
        cache: info.name.clone(),
        object_size: size,
        kmalloc,
        also_kmalloc,
        named,
        aliases_included,
        notes,
        every_cache: false,
    })
}

/// The names kmem:kmem_cache_alloc can carry for this kmem_cache.
pub(super) fn named_for(
    cat: &Catalogue,
    info: &CacheInfo,
    group: &[&str],
    notes: &mut Vec<String>,
) -> Result<Vec<String>, SelectError> {
    let (kmalloc_names, mut named): (Vec<&str>, Vec<&str>) =
        group.iter().partition(|n| parse_kmalloc_name(n).is_some());
    if named.is_empty() {
        // Only kmalloc() allocates from it, and kmalloc() fires kmem:kmalloc instead.
        return Ok(Vec::new());
    }
    // A named cache merged into a kmalloc cache is reported under the kmalloc name.
    match &info.kernel_name {
        Some(kernel) if !named.contains(&kernel.as_str()) => named.push(kernel),
        Some(_) => {}
        None => named.extend(kmalloc_names.iter().copied()),
    }
    named.sort_by_key(|n| (Some(*n) != info.kernel_name.as_deref(), *n));
    if named.len() > MAX_NAMED {
        match &info.kernel_name {
            Some(kernel) => {
                notes.push(format!(
                    "{} names share this kmem_cache; kmem:kmem_cache_alloc reports all of them as \
                     '{kernel}', so only that name is matched",
                    named.len()
                ));
                return Ok(vec![kernel.clone()]);
            }
            None => {
                return Err(SelectError::TooManyNames {
                    cache: info.name.clone(),
                    names: named.iter().map(|n| n.to_string()).collect(),
                })
            }
        }
    }
    if info.kernel_name.is_none() && named.len() > 1 {
        if let Some(why) = &cat.slabinfo_note {
            notes.push(format!(
                "{why}; the kernel reports this merged cache under one of its names, so all of \
                 them are matched"
            ));
        }
    }
    Ok(named.into_iter().map(str::to_string).collect())
}

/// `kmalloc-cg-512` on a kernel without any kmalloc-cg caches is not a typo: say where those
/// allocations went.
pub(super) fn absent_kind(cat: &Catalogue, wanted: &str) -> Option<SelectError> {
    let Some(KmallocName::Kind { kind, size, .. }) = parse_kmalloc_name(wanted) else {
        return None;
    };
    if kind == KmallocKind::Normal || cat.has_kind(kind) {
        return None;
    }
    let normal = cat.kmalloc_cache(KmallocKind::Normal, size)?;
    Some(SelectError::KmallocKindAbsent {
        name: wanted.to_string(),
        kind,
        served_by: normal.name.clone(),
    })
}
