//! Slab cache catalogue (`/sys/kernel/slab`) and the translation of `--cache NAME` into what
//! the eBPF side has to match.
//!
//! Facts this module is built on (checked on Linux 6.18, SLUB):
//! * SLUB merges compatible caches into one `kmem_cache`. In sysfs a mergeable cache is a
//!   directory named by a unique id (`:A-0000256`, the letters are slab flags) and every name
//!   that resolved to it is a symlink to that directory; unmergeable caches are plain
//!   directories under their own name.
//! * A merged `kmem_cache` keeps the name of the cache created first (`s->name`). That name,
//!   and only that one, is what `/proc/slabinfo` lists and what `kmem:kmem_cache_alloc`
//!   carries in its `name` field: on the reference host `sgpool-8` allocations are reported
//!   as `name=key_jar`.
//! * Both `kmem:kmalloc` and `kmem:kmem_cache_alloc` report `bytes_alloc = s->size`, which
//!   sysfs calls `slab_size` (filp: `object_size` 184, `bytes_alloc` 192).
//! * `kmem:kmalloc` has no cache field: the target cache follows from `bytes_alloc` and the
//!   kmalloc type the kernel derives from the gfp flags (see [`KmallocKind`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::ErrorKind;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::kernel::slabinfo::{self, SlabLine};

/// Upper bound of names the eBPF program compares `kmem_cache_alloc`'s `name` against.
pub const MAX_NAMED: usize = 8;
const MAX_SUGGESTIONS: usize = 5;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CacheInfo {
    pub name: String,
    pub object_size: u32,
    /// `s->size`: object plus alignment and metadata; the tracepoints' `bytes_alloc`.
    pub slab_size: u32,
    pub align: u32,
    /// Other names sharing the same kmem_cache, sorted.
    pub aliases: Vec<String>,
    /// red_zone || poison || store_user
    pub debug: bool,
    /// `s->name` of the kmem_cache, i.e. the one name of the group that tracepoints and
    /// /proc/slabinfo report. `None` when /proc/slabinfo could not be read.
    pub kernel_name: Option<String>,
    /// Entry under /sys/kernel/slab (`:A-0000256` for merged caches); `None` when the catalogue
    /// was built from /proc/slabinfo.
    pub sysfs_dir: Option<String>,
}

/// The kmalloc cache family a kmalloc() lands in. The kernel (`kmalloc_type()`) decides it
/// from the gfp flags in this order, and the eBPF side must use the same order:
/// `__GFP_DMA` -> `Dma`, else `__GFP_RECLAIMABLE` -> `Reclaimable`, else `__GFP_ACCOUNT` ->
/// `Cgroup`, else `Normal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum KmallocKind {
    Normal,
    Cgroup,
    Reclaimable,
    Dma,
}

impl KmallocKind {
    fn cache_name(self, size_text: &str) -> String {
        match self {
            KmallocKind::Normal => format!("kmalloc-{size_text}"),
            KmallocKind::Cgroup => format!("kmalloc-cg-{size_text}"),
            KmallocKind::Reclaimable => format!("kmalloc-rcl-{size_text}"),
            KmallocKind::Dma => format!("dma-kmalloc-{size_text}"),
        }
    }

    fn family(self) -> &'static str {
        match self {
            KmallocKind::Normal => "kmalloc-*",
            KmallocKind::Cgroup => "kmalloc-cg-*",
            KmallocKind::Reclaimable => "kmalloc-rcl-*",
            KmallocKind::Dma => "dma-kmalloc-*",
        }
    }

    /// Why a kernel has no caches of this kind, in which case these allocations are served by
    /// the normal kmalloc caches.
    fn absence_reason(self) -> &'static str {
        match self {
            KmallocKind::Normal => "",
            KmallocKind::Cgroup => {
                "kmem accounting is off (cgroup.memory=nokmem or no CONFIG_MEMCG) or the kernel \
                 predates 5.14, so kmalloc()s with __GFP_ACCOUNT"
            }
            KmallocKind::Reclaimable => {
                "the kernel has CONFIG_SLUB_TINY or predates 4.20, so kmalloc()s with \
                 __GFP_RECLAIMABLE"
            }
            KmallocKind::Dma => "the kernel has no CONFIG_ZONE_DMA, so kmalloc()s with __GFP_DMA",
        }
    }
}

/// What a cache name says about kmalloc, if it is a kmalloc cache name at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KmallocName<'a> {
    Kind {
        kind: KmallocKind,
        size: u32,
        size_text: &'a str,
    },
    /// `kmalloc-rnd-NN-<size>`, a CONFIG_RANDOM_KMALLOC_CACHES copy of `kmalloc-<size>`.
    Random { size: u32, size_text: &'a str },
}

fn parse_kmalloc_name(name: &str) -> Option<KmallocName<'_>> {
    fn kind(kind: KmallocKind, size_text: &str) -> Option<KmallocName<'_>> {
        Some(KmallocName::Kind {
            kind,
            size: parse_size(size_text)?,
            size_text,
        })
    }
    if let Some(rest) = name.strip_prefix("dma-kmalloc-") {
        return kind(KmallocKind::Dma, rest);
    }
    let rest = name.strip_prefix("kmalloc-")?;
    if let Some(s) = rest.strip_prefix("cg-") {
        return kind(KmallocKind::Cgroup, s);
    }
    if let Some(s) = rest.strip_prefix("rcl-") {
        return kind(KmallocKind::Reclaimable, s);
    }
    if let Some(r) = rest.strip_prefix("rnd-") {
        let (copy, size_text) = r.split_once('-')?;
        if copy.is_empty() || !copy.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        return Some(KmallocName::Random {
            size: parse_size(size_text)?,
            size_text,
        });
    }
    kind(KmallocKind::Normal, rest)
}

/// Kernels since 4.20 spell sizes from 1024 up as `1k`, `2M`; older ones as `1024`.
fn parse_size(text: &str) -> Option<u32> {
    let (digits, unit) = if let Some(d) = text.strip_suffix(['k', 'K']) {
        (d, 1024)
    } else if let Some(d) = text.strip_suffix('M') {
        (d, 1024 * 1024)
    } else {
        (text, 1)
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits
        .parse::<u32>()
        .ok()?
        .checked_mul(unit)
        .filter(|n| *n > 0)
}

/// Every way a kernel may have spelled `size` in a cache name, the modern one first.
fn size_spellings(size: u32) -> Vec<String> {
    let mut out = Vec::new();
    if size >= 1024 * 1024 && size.is_multiple_of(1024 * 1024) {
        out.push(format!("{}M", size / (1024 * 1024)));
    } else if size >= 1024 && size.is_multiple_of(1024) {
        out.push(format!("{}k", size / 1024));
    }
    out.push(size.to_string());
    out
}

#[derive(Debug, Clone)]
pub struct Catalogue {
    by_name: BTreeMap<String, CacheInfo>,
    /// Caveats that apply to any selection.
    selection_notes: Vec<String>,
    /// Why kernel names are unknown; only matters for merged caches, where `select` says so.
    slabinfo_note: Option<String>,
    all_notes: Vec<String>,
}

impl Catalogue {
    /// Reads `<root>/sys/kernel/slab`, plus `<root>/proc/slabinfo` to learn which name of a
    /// merged group the kernel reports. Without sysfs (SLAB allocator, sysfs not mounted)
    /// the catalogue is built from /proc/slabinfo alone and has no alias information.
    pub fn read(root: &Path) -> Result<Catalogue> {
        let slab_dir = root.join("sys/kernel/slab");
        let lines = slabinfo::read(root);
        if slab_dir.is_dir() {
            let (lines, slabinfo_note) = match lines {
                Ok(lines) => (Some(lines), None),
                Err(e) => (
                    None,
                    Some(format!(
                        "could not read /proc/slabinfo ({e:#}): usage figures and the name the \
                         kernel reports for merged caches are unknown"
                    )),
                ),
            };
            let cat =
                Self::from_sysfs(&slab_dir, lines.as_deref(), slabinfo_note).map_err(|e| {
                    let denied = e
                        .root_cause()
                        .downcast_ref::<std::io::Error>()
                        .is_some_and(|io| io.kind() == ErrorKind::PermissionDenied);
                    // Current kernels make every attribute mode 0400: say so, not just EACCES.
                    if denied {
                        e.context(
                            "slab cache attributes in /sys/kernel/slab are readable by root only",
                        )
                    } else {
                        e
                    }
                })?;
            match lines {
                // An empty directory (sysfs without SLUB) says nothing; slabinfo may.
                Some(lines) if cat.by_name.is_empty() => Ok(Self::from_slabinfo(&lines)),
                _ => Ok(cat),
            }
        } else {
            let lines = lines.with_context(|| {
                format!(
                    "{} is absent and /proc/slabinfo is unreadable: no slab cache list",
                    slab_dir.display()
                )
            })?;
            Ok(Self::from_slabinfo(&lines))
        }
    }

    fn from_sysfs(
        slab_dir: &Path,
        lines: Option<&[SlabLine]>,
        slabinfo_note: Option<String>,
    ) -> Result<Catalogue> {
        let mut notes = Vec::new();
        // sysfs entry that holds the attributes -> names that resolve to it
        let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let entries =
            fs::read_dir(slab_dir).with_context(|| format!("listing {}", slab_dir.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("listing {}", slab_dir.display()))?;
            let path = entry.path();
            let Ok(name) = entry.file_name().into_string() else {
                notes.push(format!("skipped non-UTF-8 cache name {}", path.display()));
                continue;
            };
            let file_type = entry
                .file_type()
                .with_context(|| format!("stat {}", path.display()))?;
            if file_type.is_symlink() {
                let target =
                    fs::read_link(&path).with_context(|| format!("readlink {}", path.display()))?;
                let Some(target) = target.file_name().and_then(|t| t.to_str()) else {
                    notes.push(format!("skipped {}: odd link target", path.display()));
                    continue;
                };
                groups.entry(target.to_string()).or_default().push(name);
            } else if file_type.is_dir() {
                let names = groups.entry(name.clone()).or_default();
                // Unique-id directories are not names anyone allocates from.
                if !name.starts_with(':') {
                    names.push(name);
                }
            }
        }

        let reported: Option<BTreeSet<&str>> =
            lines.map(|l| l.iter().map(|l| l.name.as_str()).collect());
        let mut by_name = BTreeMap::new();
        for (dir, mut names) in groups {
            let path = slab_dir.join(&dir);
            if !path.is_dir() {
                // A cache destroyed while we were listing leaves links to nothing.
                notes.push(format!(
                    "ignored {} -> {dir}: target does not exist",
                    names.join(", ")
                ));
                continue;
            }
            if names.is_empty() {
                names.push(dir.clone());
            }
            names.sort();
            let (object_size, slab_size, align, debug) = match read_attrs(&path) {
                Ok(attrs) => attrs,
                Err(_) if !path.exists() => {
                    notes.push(format!("ignored {}: cache went away", names.join(", ")));
                    continue;
                }
                Err(e) => return Err(e),
            };
            let kernel_name = reported.as_ref().and_then(|reported| {
                let mut hits = names.iter().filter(|n| reported.contains(n.as_str()));
                match (hits.next(), hits.next()) {
                    (Some(n), None) => Some(n.clone()),
                    _ => None,
                }
            });
            for name in &names {
                let info = CacheInfo {
                    name: name.clone(),
                    object_size,
                    slab_size,
                    align,
                    aliases: names.iter().filter(|n| *n != name).cloned().collect(),
                    debug,
                    kernel_name: kernel_name.clone(),
                    sysfs_dir: Some(dir.clone()),
                };
                by_name.insert(name.clone(), info);
            }
        }
        let all_notes = slabinfo_note.iter().chain(&notes).cloned().collect();
        Ok(Catalogue {
            by_name,
            selection_notes: notes,
            slabinfo_note,
            all_notes,
        })
    }

    fn from_slabinfo(lines: &[SlabLine]) -> Catalogue {
        let by_name = lines
            .iter()
            .map(|l| {
                let size = u32::try_from(l.objsize).unwrap_or(u32::MAX);
                let info = CacheInfo {
                    name: l.name.clone(),
                    // slabinfo only has s->size; the bare object size is not exposed there.
                    object_size: size,
                    slab_size: size,
                    align: 0,
                    aliases: Vec::new(),
                    debug: false,
                    kernel_name: Some(l.name.clone()),
                    sysfs_dir: None,
                };
                (l.name.clone(), info)
            })
            .collect();
        let notes = vec![
            "/sys/kernel/slab is absent (SLAB allocator, or sysfs not mounted): caches come from \
             /proc/slabinfo without alias information, so caches merged into the selected one \
             are traced with it but cannot be named"
                .to_string(),
        ];
        Catalogue {
            by_name,
            all_notes: notes.clone(),
            selection_notes: notes,
            slabinfo_note: None,
        }
    }

    pub fn get(&self, name: &str) -> Option<&CacheInfo> {
        self.by_name.get(name)
    }

    /// Every name, sorted; merged caches appear once per alias.
    pub fn iter(&self) -> impl Iterator<Item = &CacheInfo> {
        self.by_name.values()
    }

    /// Caveats found while reading, worth showing under `leaktrace caches`.
    pub fn notes(&self) -> &[String] {
        &self.all_notes
    }

    /// Names close to a mistyped `name`, best first. A different number in the name counts
    /// extra, because `kmalloc-cg-512` is a likelier intent for `kmallok-512` than
    /// `kmalloc-192` is.
    pub fn suggest(&self, name: &str) -> Vec<String> {
        let query = name.trim().to_ascii_lowercase();
        let query_len = query.chars().count();
        if query_len == 0 {
            return Vec::new();
        }
        let budget = (query_len / 2).max(2);
        let query_digits = digits(&query);
        let mut scored: Vec<(usize, &str)> = self
            .by_name
            .keys()
            .filter_map(|candidate| {
                let lower = candidate.to_ascii_lowercase();
                let distance = edit_distance(&query, &lower);
                let candidate_digits = digits(&lower);
                let renumbered = !query_digits.is_empty()
                    && !candidate_digits.is_empty()
                    && query_digits != candidate_digits;
                let score = distance + if renumbered { 3 } else { 0 };
                let substring = query_len >= 3 && lower.contains(&query);
                if substring {
                    Some((distance, candidate.as_str()))
                } else if score <= budget {
                    Some((score, candidate.as_str()))
                } else {
                    None
                }
            })
            .collect();
        scored.sort();
        scored
            .into_iter()
            .take(MAX_SUGGESTIONS)
            .map(|(_, n)| n.to_string())
            .collect()
    }

    fn has_kind(&self, kind: KmallocKind) -> bool {
        self.by_name.keys().any(|n| {
            matches!(parse_kmalloc_name(n), Some(KmallocName::Kind { kind: k, .. }) if k == kind)
        })
    }

    /// Catalogue spelling of the kmalloc cache of `kind` and `size`, whichever way the kernel
    /// spells sizes.
    fn kmalloc_cache(&self, kind: KmallocKind, size: u32) -> Option<&CacheInfo> {
        size_spellings(size)
            .iter()
            .find_map(|s| self.get(&kind.cache_name(s)))
    }

    /// A user's spelling of a cache: exact, the other kmalloc size spelling (`kmalloc-1024`
    /// for `kmalloc-1k`), or a unique case-insensitive match (`tcp` for `TCP`).
    fn resolve(&self, name: &str) -> Option<&CacheInfo> {
        if let Some(info) = self.get(name) {
            return Some(info);
        }
        match parse_kmalloc_name(name) {
            Some(KmallocName::Kind { kind, size, .. }) => {
                if let Some(info) = self.kmalloc_cache(kind, size) {
                    return Some(info);
                }
            }
            Some(KmallocName::Random { size, .. }) => {
                let prefix = name.strip_suffix(size_text_of(name)).unwrap_or(name);
                if let Some(info) = size_spellings(size)
                    .iter()
                    .find_map(|s| self.get(&format!("{prefix}{s}")))
                {
                    return Some(info);
                }
            }
            None => {}
        }
        let mut folded = self
            .by_name
            .values()
            .filter(|c| c.name.eq_ignore_ascii_case(name));
        match (folded.next(), folded.next()) {
            (Some(info), None) => Some(info),
            _ => None,
        }
    }

    /// Dedicated kmalloc buckets (CONFIG_SLAB_BUCKETS, `kmem_buckets_create()`), e.g.
    /// `msg_msg-512`: prefix -> nominal size -> cache. The kernel creates one per kmalloc
    /// size with exactly that object size, which is what tells them from `sgpool-8`-style
    /// families.
    fn bucket_families(&self) -> BTreeMap<&str, BTreeMap<u32, &str>> {
        let normal: BTreeMap<u32, &CacheInfo> = self
            .by_name
            .values()
            .filter_map(|c| match parse_kmalloc_name(&c.name) {
                Some(KmallocName::Kind {
                    kind: KmallocKind::Normal,
                    size,
                    ..
                }) => Some((size, c)),
                _ => None,
            })
            .collect();
        let mut families: BTreeMap<&str, BTreeMap<u32, &str>> = BTreeMap::new();
        for info in self.by_name.values() {
            if parse_kmalloc_name(&info.name).is_some() || !info.aliases.is_empty() {
                continue;
            }
            let Some((prefix, size_text)) = info.name.rsplit_once('-') else {
                continue;
            };
            let Some(size) = parse_size(size_text) else {
                continue;
            };
            if normal.contains_key(&size) && info.object_size == size {
                families
                    .entry(prefix)
                    .or_default()
                    .insert(size, info.name.as_str());
            }
        }
        families.retain(|_, members| {
            members.len() >= 3 && members.keys().copied().eq(normal.keys().copied())
        });
        families
    }
}

fn size_text_of(name: &str) -> &str {
    name.rsplit_once('-').map(|(_, s)| s).unwrap_or("")
}

fn read_attrs(dir: &Path) -> Result<(u32, u32, u32, bool)> {
    let debug =
        read_flag(dir, "red_zone")? || read_flag(dir, "poison")? || read_flag(dir, "store_user")?;
    Ok((
        read_u32(dir, "object_size")?,
        read_u32(dir, "slab_size")?,
        read_u32(dir, "align")?,
        debug,
    ))
}

fn read_u32(dir: &Path, attr: &str) -> Result<u32> {
    let path = dir.join(attr);
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.trim()
        .parse()
        .with_context(|| format!("{}: '{}' is not a number", path.display(), text.trim()))
}

/// Debug flags are optional: kernels without CONFIG_SLUB_DEBUG do not create them.
fn read_flag(dir: &Path, attr: &str) -> Result<bool> {
    let path = dir.join(attr);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let value: u32 = text
                .trim()
                .parse()
                .with_context(|| format!("{}: '{}' is not a flag", path.display(), text.trim()))?;
            Ok(value != 0)
        }
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn digits(s: &str) -> String {
    s.chars().filter(char::is_ascii_digit).collect()
}

/// Optimal string alignment distance: Levenshtein plus adjacent transpositions ("kmlaloc").
fn edit_distance(a: &str, b: &str) -> usize {
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

fn did_you_mean(suggestions: &[String]) -> String {
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
    })
}

/// The names kmem:kmem_cache_alloc can carry for this kmem_cache.
fn named_for(
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
fn absent_kind(cat: &Catalogue, wanted: &str) -> Option<SelectError> {
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

/// Binary units with one decimal, as `slabtop`/`free -h` users expect: `512B`, `2.4M`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["K", "M", "G", "T", "P"];
    if bytes < 1024 {
        return format!("{bytes}B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1}{}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/proc")).join(name)
    }

    fn catalogue(name: &str) -> Catalogue {
        Catalogue::read(&fixture(name)).unwrap()
    }

    fn strs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    // ---- name parsing ----

    #[test]
    fn kmalloc_names() {
        use KmallocKind::*;
        let kind = |n: &str| match parse_kmalloc_name(n) {
            Some(KmallocName::Kind { kind, size, .. }) => Some((kind, size)),
            _ => None,
        };
        assert_eq!(kind("kmalloc-8"), Some((Normal, 8)));
        assert_eq!(kind("kmalloc-96"), Some((Normal, 96)));
        assert_eq!(kind("kmalloc-192"), Some((Normal, 192)));
        assert_eq!(kind("kmalloc-1k"), Some((Normal, 1024)));
        assert_eq!(kind("kmalloc-1024"), Some((Normal, 1024)));
        assert_eq!(kind("kmalloc-8k"), Some((Normal, 8192)));
        assert_eq!(kind("kmalloc-2M"), Some((Normal, 2 << 20)));
        assert_eq!(kind("kmalloc-cg-512"), Some((Cgroup, 512)));
        assert_eq!(kind("kmalloc-rcl-4k"), Some((Reclaimable, 4096)));
        assert_eq!(kind("dma-kmalloc-2k"), Some((Dma, 2048)));
        assert_eq!(
            parse_kmalloc_name("kmalloc-rnd-07-1k"),
            Some(KmallocName::Random {
                size: 1024,
                size_text: "1k"
            })
        );
        for not_kmalloc in [
            "kmalloc_buckets",
            "kmalloc-",
            "kmalloc-0",
            "kmalloc-x",
            "kmalloc-cg-",
            "kmalloc-rnd-512",
            "memdup_user-512",
            "kmalloc-99999999999",
        ] {
            assert_eq!(parse_kmalloc_name(not_kmalloc), None, "{not_kmalloc}");
        }
        assert_eq!(size_spellings(1024), strs(&["1k", "1024"]));
        assert_eq!(size_spellings(512), strs(&["512"]));
        assert_eq!(size_spellings(1 << 20), strs(&["1M", "1048576"]));
    }

    // ---- catalogue of this host (Linux 6.18, SLUB) ----

    #[test]
    fn host_catalogue_groups_merged_caches() {
        let cat = catalogue("host-6.18");
        assert!(cat.iter().all(|c| c.sysfs_dir.is_some()));
        assert!(cat.notes().is_empty(), "{:?}", cat.notes());

        let k512 = cat.get("kmalloc-512").unwrap();
        assert_eq!(k512.sysfs_dir.as_deref(), Some("kmalloc-512"));
        assert!(k512.aliases.is_empty());
        assert_eq!((k512.object_size, k512.slab_size), (512, 512));
        assert_eq!(k512.kernel_name.as_deref(), Some("kmalloc-512"));
        assert!(!k512.debug);

        let sg = cat.get("sgpool-8").unwrap();
        assert_eq!(sg.sysfs_dir.as_deref(), Some(":0000256"));
        assert_eq!(sg.aliases, strs(&["biovec-16", "key_jar"]));
        assert_eq!(sg.kernel_name.as_deref(), Some("key_jar"));

        let filp = cat.get("filp").unwrap();
        assert_eq!((filp.object_size, filp.slab_size), (184, 192));
        assert!(cat.get(":0000256").is_none(), "unique ids are not names");
        assert!(cat.iter().all(|c| !c.name.starts_with(':')));
    }

    #[test]
    fn host_slabinfo_names_are_the_kernel_names() {
        let cat = catalogue("host-6.18");
        let lines = slabinfo::read(&fixture("host-6.18")).unwrap();
        for l in &lines {
            let info = cat.get(&l.name).unwrap_or_else(|| panic!("{}", l.name));
            assert_eq!(info.kernel_name.as_deref(), Some(l.name.as_str()));
            assert_eq!(u64::from(info.slab_size), l.objsize, "{}", l.name);
        }
        // and every sysfs group has exactly one slabinfo line
        assert!(cat.iter().all(|c| c.kernel_name.is_some()));
    }

    #[test]
    fn host_kmalloc_512() {
        let cat = catalogue("host-6.18");
        let s = select(&cat, "kmalloc-512").unwrap();
        assert_eq!(s.cache, "kmalloc-512");
        assert_eq!(s.object_size, 512);
        assert_eq!(s.kmalloc, Some((512, KmallocKind::Normal)));
        assert!(s.also_kmalloc.is_empty());
        assert!(s.named.is_empty());
        assert!(s.aliases_included.is_empty());
        assert_eq!(s.notes.len(), 1, "{:?}", s.notes);
        assert!(s.notes[0].contains("memdup_user-512, msg_msg-512"));
    }

    #[test]
    fn host_kmalloc_cg_512() {
        let cat = catalogue("host-6.18");
        let s = select(&cat, "kmalloc-cg-512").unwrap();
        assert_eq!(s.kmalloc, Some((512, KmallocKind::Cgroup)));
        assert!(s.also_kmalloc.is_empty());
        assert!(s.named.is_empty());
        assert!(s.aliases_included.is_empty());
    }

    #[test]
    fn host_kmalloc_1k_in_both_spellings() {
        let cat = catalogue("host-6.18");
        for spelled in ["kmalloc-1k", "kmalloc-1024", " kmalloc-1K "] {
            let s = select(&cat, spelled).unwrap();
            assert_eq!(s.cache, "kmalloc-1k");
            assert_eq!(s.kmalloc, Some((1024, KmallocKind::Normal)));
        }
        let s = select(&cat, "dma-kmalloc-8192").unwrap();
        assert_eq!(s.cache, "dma-kmalloc-8k");
        assert_eq!(s.kmalloc, Some((8192, KmallocKind::Dma)));
        let s = select(&cat, "kmalloc-rcl-96").unwrap();
        assert_eq!(s.kmalloc, Some((96, KmallocKind::Reclaimable)));
    }

    #[test]
    fn host_dentry_and_filp() {
        let cat = catalogue("host-6.18");
        let s = select(&cat, "dentry").unwrap();
        assert_eq!(s.object_size, 192);
        assert_eq!(s.kmalloc, None);
        assert!(s.also_kmalloc.is_empty());
        assert_eq!(s.named, strs(&["dentry"]));
        assert!(s.aliases_included.is_empty());
        assert!(s.notes.is_empty());

        // bytes_alloc is s->size (192), not the 184-byte object
        let s = select(&cat, "filp").unwrap();
        assert_eq!(s.object_size, 192);
        assert_eq!(s.named, strs(&["filp"]));
        assert_eq!(s.kmalloc, None);
    }

    #[test]
    fn host_merged_alias_matches_kernel_name_first() {
        let cat = catalogue("host-6.18");
        let s = select(&cat, "biovec-16").unwrap();
        assert_eq!(s.cache, "biovec-16");
        assert_eq!(s.object_size, 256);
        assert_eq!(s.kmalloc, None);
        assert_eq!(s.named, strs(&["key_jar", "biovec-16", "sgpool-8"]));
        assert_eq!(s.aliases_included, strs(&["key_jar", "sgpool-8"]));
    }

    #[test]
    fn host_unknown_names_get_suggestions() {
        let cat = catalogue("host-6.18");
        let err = select(&cat, "kmallok-512").unwrap_err();
        let SelectError::Unknown { name, suggestions } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(name, "kmallok-512");
        assert_eq!(
            &suggestions[..2],
            &strs(&["kmalloc-512", "kmalloc-cg-512"])[..]
        );
        assert!(suggestions.len() <= MAX_SUGGESTIONS);
        assert!(
            err.to_string().starts_with(
                "unknown slab cache 'kmallok-512'; did you mean: kmalloc-512, kmalloc-cg-512"
            ),
            "{err}"
        );
        assert!(err.to_string().ends_with("? (see 'leaktrace caches')"));

        assert_eq!(cat.suggest("dentri")[0], "dentry");
        assert_eq!(cat.suggest("dent")[0], "dentry");
        assert_eq!(cat.suggest("kmlaloc-1k")[0], "kmalloc-1k");
        assert_eq!(cat.suggest("filpp")[0], "filp");
        let inode = cat.suggest("inode");
        assert_eq!(inode.len(), MAX_SUGGESTIONS);
        assert!(inode.iter().all(|n| n.contains("inode")), "{inode:?}");

        let err = select(&cat, "zzzzzzzzzzzz").unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown slab cache 'zzzzzzzzzzzz' (see 'leaktrace caches')"
        );
        assert!(matches!(
            select(&cat, "").unwrap_err(),
            SelectError::Unknown { .. }
        ));
    }

    #[test]
    fn host_case_insensitive_unique_match() {
        let cat = catalogue("host-6.18");
        assert_eq!(select(&cat, "tcp").unwrap().cache, "TCP");
        assert_eq!(select(&cat, "TCP").unwrap().named, strs(&["TCP"]));
    }

    #[test]
    fn host_kmalloc_buckets_cannot_be_selected_alone() {
        let cat = catalogue("host-6.18");
        let err = select(&cat, "msg_msg-512").unwrap_err();
        assert_eq!(
            err,
            SelectError::KmallocBucket {
                name: "msg_msg-512".into(),
                kmalloc: "kmalloc-512".into()
            }
        );
        assert!(err.to_string().contains("CONFIG_SLAB_BUCKETS"));
        // families that only look alike are ordinary caches
        assert!(select(&cat, "bio-120").is_ok());
        assert!(select(&cat, "erofs_pcluster-16").is_ok());
    }

    #[test]
    fn host_has_no_random_kmalloc_caches() {
        let cat = catalogue("host-6.18");
        let err = select(&cat, "kmalloc-rnd-01-512").unwrap_err();
        let SelectError::Unknown { suggestions, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(suggestions[0], "kmalloc-512");
    }

    #[test]
    fn host_big_alias_group_fits() {
        let cat = catalogue("host-6.18");
        let s = select(&cat, "rtable").unwrap();
        assert!(s.named.len() <= MAX_NAMED);
        assert_eq!(
            s.named[0],
            cat.get("rtable").unwrap().kernel_name.clone().unwrap()
        );
    }

    // ---- hand-made: kmalloc-cg-512 and biovec-32 merged into kmalloc-512 ----

    #[test]
    fn merged_kmalloc_512_covers_cg_and_biovec() {
        let cat = catalogue("merged");
        let s = select(&cat, "kmalloc-512").unwrap();
        assert_eq!(s.object_size, 512);
        assert_eq!(s.kmalloc, Some((512, KmallocKind::Normal)));
        assert_eq!(s.also_kmalloc, vec![(512, KmallocKind::Cgroup)]);
        // biovec-32 allocations carry the kmem_cache's own name, kmalloc-512
        assert_eq!(s.named, strs(&["kmalloc-512", "biovec-32"]));
        assert_eq!(s.aliases_included, strs(&["biovec-32", "kmalloc-cg-512"]));
        assert!(s.notes.is_empty(), "{:?}", s.notes);
    }

    #[test]
    fn merged_kmalloc_cg_512() {
        let cat = catalogue("merged");
        let s = select(&cat, "kmalloc-cg-512").unwrap();
        assert_eq!(s.kmalloc, Some((512, KmallocKind::Cgroup)));
        assert_eq!(s.also_kmalloc, vec![(512, KmallocKind::Normal)]);
        assert_eq!(s.named, strs(&["kmalloc-512", "biovec-32"]));
        assert_eq!(s.aliases_included, strs(&["biovec-32", "kmalloc-512"]));
    }

    #[test]
    fn merged_named_alias_of_kmalloc() {
        let cat = catalogue("merged");
        let s = select(&cat, "biovec-32").unwrap();
        assert_eq!(s.kmalloc, None);
        assert_eq!(
            s.also_kmalloc,
            vec![(512, KmallocKind::Normal), (512, KmallocKind::Cgroup)]
        );
        assert_eq!(s.named, strs(&["kmalloc-512", "biovec-32"]));
        assert_eq!(s.aliases_included, strs(&["kmalloc-512", "kmalloc-cg-512"]));
    }

    #[test]
    fn merged_kmalloc_1k_is_separate() {
        let cat = catalogue("merged");
        let s = select(&cat, "kmalloc-1024").unwrap();
        assert_eq!(s.cache, "kmalloc-1k");
        assert_eq!(s.kmalloc, Some((1024, KmallocKind::Normal)));
        assert!(s.also_kmalloc.is_empty() && s.named.is_empty() && s.aliases_included.is_empty());
    }

    #[test]
    fn merged_debug_cache_reports_padded_size() {
        let cat = catalogue("merged");
        let s = select(&cat, "kmalloc-2k").unwrap();
        assert_eq!(s.object_size, 2304);
        assert_eq!(s.kmalloc, Some((2304, KmallocKind::Normal)));
        assert!(s.notes.iter().any(|n| n.contains("SLUB debugging")));
        assert!(cat.get("kmalloc-2k").unwrap().debug);
    }

    #[test]
    fn merged_too_many_aliases_matches_kernel_name_only() {
        let cat = catalogue("merged");
        let s = select(&cat, "fs_cache").unwrap();
        assert_eq!(s.named, strs(&["vmap_area"]));
        assert_eq!(s.aliases_included.len(), 9);
        assert!(s.notes.iter().any(|n| n.contains("only that name")));
    }

    // ---- hand-made: CONFIG_RANDOM_KMALLOC_CACHES ----

    #[test]
    fn rnd_kmalloc_512_includes_all_copies() {
        let cat = catalogue("kmalloc-rnd");
        let s = select(&cat, "kmalloc-512").unwrap();
        assert_eq!(s.kmalloc, Some((512, KmallocKind::Normal)));
        assert!(s.also_kmalloc.is_empty());
        assert!(s.named.is_empty());
        let expected: Vec<String> = (1..=15)
            .map(|i| format!("kmalloc-rnd-{i:02}-512"))
            .collect();
        assert_eq!(s.aliases_included, expected);
        assert!(s
            .notes
            .iter()
            .any(|n| n.contains("CONFIG_RANDOM_KMALLOC_CACHES") && n.contains("15 copies")));
        assert!(s.notes.iter().any(|n| n.contains("memdup_user-512")));

        let s = select(&cat, "kmalloc-1k").unwrap();
        assert_eq!(s.aliases_included.len(), 15);
        assert!(s.aliases_included.iter().all(|n| n.ends_with("-1k")));
    }

    #[test]
    fn rnd_copy_alone_is_an_error() {
        let cat = catalogue("kmalloc-rnd");
        let err = select(&cat, "kmalloc-rnd-03-512").unwrap_err();
        assert_eq!(
            err,
            SelectError::RandomKmalloc {
                name: "kmalloc-rnd-03-512".into(),
                base: "kmalloc-512".into()
            }
        );
        assert!(err.to_string().contains("select kmalloc-512"), "{err}");
        let err = select(&cat, "kmalloc-rnd-03-1024").unwrap_err();
        assert!(matches!(err, SelectError::RandomKmalloc { ref base, .. } if base == "kmalloc-1k"));
    }

    #[test]
    fn rnd_other_kinds_are_not_randomized() {
        let cat = catalogue("kmalloc-rnd");
        let s = select(&cat, "kmalloc-cg-512").unwrap();
        assert_eq!(s.kmalloc, Some((512, KmallocKind::Cgroup)));
        assert!(s.aliases_included.is_empty());
        assert!(!s.notes.iter().any(|n| n.contains("RANDOM")));
        assert!(matches!(
            select(&cat, "memdup_user-256").unwrap_err(),
            SelectError::KmallocBucket { .. }
        ));
    }

    // ---- hand-made: nokmem, /proc/slabinfo unreadable ----

    #[test]
    fn nokmem_kmalloc_512_also_takes_accounted_kmallocs() {
        let cat = catalogue("nokmem");
        assert!(cat.notes()[0].contains("could not read /proc/slabinfo"));
        let s = select(&cat, "kmalloc-512").unwrap();
        assert!(
            !s.notes.iter().any(|n| n.contains("/proc/slabinfo")),
            "{:?}",
            s.notes
        );
        assert_eq!(s.kmalloc, Some((512, KmallocKind::Normal)));
        assert_eq!(s.also_kmalloc, vec![(512, KmallocKind::Cgroup)]);
        assert!(s.notes.iter().any(|n| n.contains("no kmalloc-cg-* caches")));
    }

    #[test]
    fn nokmem_kmalloc_cg_explains_where_it_went() {
        let cat = catalogue("nokmem");
        let err = select(&cat, "kmalloc-cg-1024").unwrap_err();
        assert_eq!(
            err,
            SelectError::KmallocKindAbsent {
                name: "kmalloc-cg-1024".into(),
                kind: KmallocKind::Cgroup,
                served_by: "kmalloc-1k".into()
            }
        );
        assert!(err.to_string().contains("cgroup.memory=nokmem"), "{err}");
        assert!(err.to_string().ends_with("select kmalloc-1k"), "{err}");
    }

    #[test]
    fn nokmem_without_slabinfo_matches_every_alias() {
        let cat = catalogue("nokmem");
        let s = select(&cat, "sgpool-8").unwrap();
        assert_eq!(cat.get("sgpool-8").unwrap().kernel_name, None);
        assert_eq!(s.named, strs(&["biovec-16", "key_jar", "sgpool-8"]));
        assert!(s
            .notes
            .iter()
            .any(|n| n.contains("could not read") && n.contains("all of them are matched")));

        let err = select(&cat, "vmap_area").unwrap_err();
        let SelectError::TooManyNames { cache, names } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(cache, "vmap_area");
        assert_eq!(names.len(), 9);
        assert!(err.to_string().contains("run as root"));
    }

    // ---- incident capture: no sysfs, /proc/slabinfo only ----

    #[test]
    fn incident_falls_back_to_slabinfo() {
        let cat = catalogue("incident");
        assert!(cat.iter().all(|c| c.sysfs_dir.is_none()));
        assert!(cat.notes()[0].contains("/sys/kernel/slab is absent"));
        let s = select(&cat, "kmalloc-512").unwrap();
        assert_eq!(s.kmalloc, Some((512, KmallocKind::Normal)));
        assert!(s.also_kmalloc.is_empty());
        assert!(s
            .notes
            .iter()
            .any(|n| n.contains("/sys/kernel/slab is absent")));
        let s = select(&cat, "dentry").unwrap();
        assert_eq!(s.named, strs(&["dentry"]));
        assert_eq!(s.object_size, 192);
    }

    #[test]
    fn nothing_readable_is_an_error() {
        let err = Catalogue::read(Path::new("/nonexistent-root")).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("/nonexistent-root/sys/kernel/slab is absent"),
            "{msg}"
        );
        assert!(msg.contains("/nonexistent-root/proc/slabinfo"), "{msg}");
    }

    /// A throwaway tree for states that cannot live in git (dangling links, empty dirs).
    struct TempTree(std::path::PathBuf);

    impl TempTree {
        fn new(tag: &str) -> TempTree {
            let dir = std::env::temp_dir().join(format!("leaktrace-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(dir.join("sys/kernel/slab")).unwrap();
            fs::create_dir_all(dir.join("proc")).unwrap();
            TempTree(dir)
        }
    }

    impl Drop for TempTree {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn empty_sysfs_falls_back_to_slabinfo() {
        let t = TempTree::new("empty-sysfs");
        fs::copy(
            fixture("incident").join("proc/slabinfo"),
            t.0.join("proc/slabinfo"),
        )
        .unwrap();
        let cat = Catalogue::read(&t.0).unwrap();
        assert!(cat.iter().all(|c| c.sysfs_dir.is_none()));
        assert!(cat.get("kmalloc-512").is_some());
    }

    #[test]
    fn dangling_alias_is_noted_not_fatal() {
        let t = TempTree::new("dangling");
        let slab = t.0.join("sys/kernel/slab");
        fs::create_dir(slab.join("dentry")).unwrap();
        for (attr, value) in [("object_size", "192"), ("slab_size", "192"), ("align", "8")] {
            fs::write(slab.join("dentry").join(attr), format!("{value}\n")).unwrap();
        }
        std::os::unix::fs::symlink(":0000064", slab.join("gone")).unwrap();
        let cat = Catalogue::read(&t.0).unwrap();
        assert!(cat.get("gone").is_none());
        assert!(
            !cat.get("dentry").unwrap().debug,
            "missing debug flags mean off"
        );
        assert!(cat.notes().iter().any(|n| n.contains("gone -> :0000064")));

        fs::write(slab.join("dentry/slab_size"), "lots\n").unwrap();
        let err = format!("{:#}", Catalogue::read(&t.0).unwrap_err());
        assert!(
            err.contains("dentry/slab_size: 'lots' is not a number"),
            "{err}"
        );
    }

    // ---- caches table ----

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

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(0), "0B");
        assert_eq!(human_bytes(1023), "1023B");
        assert_eq!(human_bytes(1024), "1.0K");
        assert_eq!(human_bytes(2_474_000), "2.4M");
        assert_eq!(human_bytes(55 << 30), "55.0G");
        assert_eq!(human_bytes(u64::MAX), "16384.0P");
    }

    #[test]
    fn edit_distance_basics() {
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kmallok", "kmalloc"), 1);
        assert_eq!(edit_distance("kmlaloc", "kmalloc"), 1);
        assert_eq!(edit_distance("dentry", "dentry"), 0);
    }
}
