//! The slab cache catalogue: every cache in /sys/kernel/slab (or /proc/slabinfo), its
//! sizes, debug flags and merged aliases.

use super::*;

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

#[derive(Debug, Clone)]
pub struct Catalogue {
    pub(super) by_name: BTreeMap<String, CacheInfo>,
    /// Caveats that apply to any selection.
    pub(super) selection_notes: Vec<String>,
    /// Why kernel names are unknown; only matters for merged caches, where `select` says so.
    pub(super) slabinfo_note: Option<String>,
    pub(super) all_notes: Vec<String>,
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

    pub(super) fn from_sysfs(
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

    pub(super) fn from_slabinfo(lines: &[SlabLine]) -> Catalogue {
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

    /// Why /proc/slabinfo gave no figures, when it did not.
    pub fn slabinfo_note(&self) -> Option<&str> {
        self.slabinfo_note.as_deref()
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

    pub(super) fn has_kind(&self, kind: KmallocKind) -> bool {
        self.by_name.keys().any(|n| {
            matches!(parse_kmalloc_name(n), Some(KmallocName::Kind { kind: k, .. }) if k == kind)
        })
    }

    /// Catalogue spelling of the kmalloc cache of `kind` and `size`, whichever way the kernel
    /// spells sizes.
    pub(super) fn kmalloc_cache(&self, kind: KmallocKind, size: u32) -> Option<&CacheInfo> {
        size_spellings(size)
            .iter()
            .find_map(|s| self.get(&kind.cache_name(s)))
    }

    /// A user's spelling of a cache: exact, the other kmalloc size spelling (`kmalloc-1024`
    /// for `kmalloc-1k`), or a unique case-insensitive match (`tcp` for `TCP`).
    pub(super) fn resolve(&self, name: &str) -> Option<&CacheInfo> {
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
    pub(super) fn bucket_families(&self) -> BTreeMap<&str, BTreeMap<u32, &str>> {
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

pub(super) fn size_text_of(name: &str) -> &str {
    name.rsplit_once('-').map(|(_, s)| s).unwrap_or("")
}

pub(super) fn read_attrs(dir: &Path) -> Result<(u32, u32, u32, bool)> {
    let debug =
        read_flag(dir, "red_zone")? || read_flag(dir, "poison")? || read_flag(dir, "store_user")?;
    Ok((
        read_u32(dir, "object_size")?,
        read_u32(dir, "slab_size")?,
        read_u32(dir, "align")?,
        debug,
    ))
}

pub(super) fn read_u32(dir: &Path, attr: &str) -> Result<u32> {
    let path = dir.join(attr);
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.trim()
        .parse()
        .with_context(|| format!("{}: '{}' is not a number", path.display(), text.trim()))
}

/// Debug flags are optional: kernels without CONFIG_SLUB_DEBUG do not create them.
pub(super) fn read_flag(dir: &Path, attr: &str) -> Result<bool> {
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
