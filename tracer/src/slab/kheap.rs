//! `--all-caches`: what the byte-sampled allocations of every slab cache
//! (`tracer-ebpf/src/slab/kheap.rs`) estimate.
//!
//! The kernel samples an allocation of `size` bytes when a uniform 32-bit
//! draw falls below `threshold(size)` ([`Sampler::thresholds`]), so with
//! probability `p = threshold / 2^32` ≈ 1 − e^(−size/rate), Go's
//! `runtime.MemProfileRate` weights. Each sample stands for `1/p` objects and
//! `size/p` bytes (Horvitz-Thompson: unbiased for any `p`, so the fixed-point
//! rounding costs no bias). A sample held until its free stands for that
//! many objects still in use; the samples of a row are a Poisson-like count,
//! so its 95% interval is the exact Poisson interval of the count scaled by
//! the row's mean weight.

use std::collections::{HashMap, HashSet};

use statrs::distribution::{ContinuousCDF, Gamma};
use tracer_common::slab::{
    cache_name_hash, kheap_class, kmalloc_class, Config, KheapConfig, CACHE_NAME_LEN,
    KHEAP_CLASSES, KHEAP_SMALL_LIMIT, SOURCE_CACHE_ALLOC, SOURCE_KMALLOC, SOURCE_PERCPU,
};

use crate::{
    bpf::stacks::StackId,
    kernel::slabinfo::SlabLine,
    slab::caches::Catalogue,
    slab::grouping,
    slab::report::{
        ExitedRow, GroupBy, KheapCache, KheapGroup, KheapRow, KheapSummary, ProcKey, ProcessReport,
        FORGOTTEN,
    },
};

/// `--sample-bytes`' default: Go's `runtime.MemProfileRate`.
pub const DEFAULT_RATE: u64 = 512 * 1024;

/// The kernel's draw for `rate`: the threshold of each size class.
pub fn config(rate: u64) -> KheapConfig {
    let mut thresholds = [0u32; KHEAP_CLASSES];
    for (class, t) in thresholds.iter_mut().enumerate() {
        *t = threshold(class_size(class), rate);
    }
    KheapConfig { rate, thresholds }
}

/// The smallest size of `class` (what its threshold is computed for).
fn class_size(class: usize) -> u64 {
    let class = class as u64;
    if class < KHEAP_SMALL_LIMIT >> 3 {
        class << 3
    } else {
        (class - 1024) << 12
    }
}

/// round(2^32 × (1 − e^(−size/rate))), at least 1 (every size can be
/// sampled, so every object is estimated) and at most 2^32 − 1.
fn threshold(size: u64, rate: u64) -> u32 {
    let p = -(-(size.max(1) as f64) / rate as f64).exp_m1();
    (p * 4_294_967_296.0).round().clamp(1.0, u32::MAX as f64) as u32
}

/// The probability the kernel sampled an allocation of `size` bytes with.
pub fn probability(k: &KheapConfig, size: u64) -> f64 {
    f64::from(k.thresholds[kheap_class(size)]) / 4_294_967_296.0
}

/// The name per-CPU samples are listed under (what `/proc/meminfo` calls
/// `Percpu`), beside the slab caches.
pub const PERCPU: &str = "percpu";

/// The name allocations past kmalloc's largest cache are listed under.
pub const KMALLOC_LARGE: &str = "kmalloc-large (pages)";

/// Slab caches by the hash the kernel sends (every name and alias of the
/// catalogue, as `s->name` may be any of them), and kmalloc's names.
pub struct CacheNames {
    by_hash: HashMap<u64, String>,
    /// For samples without a name (a classic kmem_cache_alloc before
    /// 6.18): what is known, the object size and every cache of it.
    by_size: HashMap<u64, String>,
}

/// Caches listed by name in an unnamed sample's label, the rest counted.
const SIZE_NAMES: usize = 4;

impl CacheNames {
    /// `slabinfo`: /proc/slabinfo at start (empty if unreadable), which
    /// orders an unnamed sample's caches, most active objects first.
    pub fn new(catalogue: &Catalogue, slabinfo: &[SlabLine]) -> CacheNames {
        let active: HashMap<&str, u64> = slabinfo
            .iter()
            .map(|l| (l.name.as_str(), l.active_objs))
            .collect();
        let mut by_hash = HashMap::new();
        // A merged group is one kmem_cache: listed once, under the name
        // /proc/slabinfo shows (its sysfs directory is shared).
        let mut groups: HashMap<u64, Vec<(String, String)>> = HashMap::new();
        for c in catalogue.iter() {
            for name in std::iter::once(&c.name).chain(&c.aliases) {
                by_hash.insert(name_hash(name), c.name.clone());
            }
            let group = c.sysfs_dir.clone().unwrap_or_else(|| c.name.clone());
            let shown = c.kernel_name.clone().unwrap_or_else(|| c.name.clone());
            let names = groups.entry(u64::from(c.slab_size)).or_default();
            if !names.iter().any(|(g, _)| *g == group) {
                names.push((group, shown));
            }
        }
        let by_size = groups
            .into_iter()
            .map(|(size, groups)| {
                let mut names: Vec<String> = groups.into_iter().map(|(_, n)| n).collect();
                names.sort_by(|a, b| {
                    let objects = |n: &String| active.get(n.as_str()).copied().unwrap_or(0);
                    objects(b).cmp(&objects(a)).then_with(|| a.cmp(b))
                });
                (size, size_label(size, &names))
            })
            .collect();
        CacheNames { by_hash, by_size }
    }

    /// A `kmem_cache_alloc` sample of `bytes_alloc` whose cache the kernel
    /// could not name.
    fn unnamed(&self, bytes_alloc: u64) -> String {
        self.by_size
            .get(&bytes_alloc)
            .cloned()
            .unwrap_or_else(|| size_label(bytes_alloc, &[]))
    }

    /// The cache of a sample from `source` with `bytes_alloc`, `gfp` and
    /// (`kmem_cache_alloc`) the name hash the kernel put in `bytes_req`.
    pub fn name(&self, cfg: &Config, source: u16, bytes_alloc: u64, gfp: u64, hash: u64) -> String {
        match source {
            SOURCE_CACHE_ALLOC if hash == 0 => self.unnamed(bytes_alloc),
            SOURCE_CACHE_ALLOC => self
                .by_hash
                .get(&hash)
                .cloned()
                .unwrap_or_else(|| format!("cache {hash:#x}")),
            SOURCE_KMALLOC => {
                // A kind this kernel has no caches of (kmalloc-cg before
                // 5.14) lands in the plain cache, as kmalloc_type() does.
                let name = kmalloc_name(bytes_alloc, kmalloc_class(gfp, cfg));
                let plain = kmalloc_name(bytes_alloc, 0);
                let known = |n: &str| self.by_hash.contains_key(&name_hash(n));
                if !known(&name) && known(&plain) {
                    plain
                } else {
                    name
                }
            }
            SOURCE_PERCPU => PERCPU.to_string(),
            _ => "unknown".to_string(),
        }
    }
}

/// `cache of 192 B (dentry|kmalloc-192|…)`: which caches an unnamed
/// sample of `size` bytes (`s->size`) may come from (`names` in order),
/// never one guessed.
fn size_label(size: u64, names: &[String]) -> String {
    match names.len() {
        0 => format!("cache of {size} B (none at start)"),
        n if n <= SIZE_NAMES => format!("cache of {size} B ({})", names.join("|")),
        n => format!(
            "cache of {size} B ({}|+{} more)",
            names[..SIZE_NAMES].join("|"),
            n - SIZE_NAMES
        ),
    }
}

/// The hash the kernel computes of a cache's name (`cache_name_hash`).
pub fn name_hash(name: &str) -> u64 {
    let mut bytes = [0u8; CACHE_NAME_LEN];
    let n = name.len().min(CACHE_NAME_LEN - 1);
    bytes[..n].copy_from_slice(&name.as_bytes()[..n]);
    let mut words = [0u64; CACHE_NAME_LEN / 8];
    for (w, chunk) in words.iter_mut().zip(bytes.chunks_exact(8)) {
        *w = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
    }
    cache_name_hash(&words)
}

/// kmalloc's cache for a size and class (`dma | reclaimable << 1 |
/// account << 2`), as the kernel names it; past the largest cache, pages.
fn kmalloc_name(bytes_alloc: u64, class: u64) -> String {
    if bytes_alloc > KHEAP_SMALL_LIMIT {
        return KMALLOC_LARGE.to_string();
    }
    let size = if bytes_alloc >= 1024 && bytes_alloc.is_multiple_of(1024) {
        format!("{}k", bytes_alloc / 1024)
    } else {
        bytes_alloc.to_string()
    };
    match class {
        c if c & 1 != 0 => format!("dma-kmalloc-{size}"),
        c if c & 4 != 0 => format!("kmalloc-cg-{size}"),
        c if c & 2 != 0 => format!("kmalloc-rcl-{size}"),
        _ => format!("kmalloc-{size}"),
    }
}

/// Who a sample is attributed to: one profile row. `(tgid, start_ns)` is
/// one process, so a reused pid is another row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RowKey {
    pub tgid: u32,
    pub start_ns: u64,
    pub kstack: StackId,
    pub ustack: StackId,
    pub cache: u32,
}

#[derive(Debug, Clone, Copy, Default)]
struct Weights {
    samples: u64,
    objects: f64,
    bytes: f64,
}

impl Weights {
    fn add(&mut self, objects: f64, bytes: f64) {
        self.samples += 1;
        self.objects += objects;
        self.bytes += bytes;
    }

    fn merge(&mut self, other: &Weights) {
        self.samples += other.samples;
        self.objects += other.objects;
        self.bytes += other.bytes;
    }

    fn sub(&mut self, objects: f64, bytes: f64) {
        self.samples = self.samples.saturating_sub(1);
        self.objects = (self.objects - objects).max(0.0);
        self.bytes = (self.bytes - bytes).max(0.0);
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Row {
    alloc: Weights,
    inuse: Weights,
}

impl RowKey {
    fn process(&self) -> ProcKey {
        ProcKey {
            tgid: self.tgid,
            start_ns: self.start_ns,
        }
    }
}

/// Where a held sample's weights are: its process's row, or the folded
/// row it went to when the process was forgotten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Row(RowKey),
    Folded(u32),
}

struct Held {
    row: Slot,
    objects: f64,
    bytes: f64,
}

/// What a folded row stands for: what still means something once its
/// processes are gone and repeats across churn. Stacks by content (the
/// kernel's return addresses; the user frames' names and files, which do
/// not move with each process's address-space layout), never by an id the
/// stack table may give to another stack.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FoldKey {
    comm: String,
    cgroup_id: u64,
    stacks: String,
    cache: u32,
}

impl FoldKey {
    fn of(e: &ExitedRow, cache: u32) -> FoldKey {
        let mut stacks = String::new();
        for l in &e.kernel_locations {
            stacks.push_str(&format!("{:x};", l.addr));
        }
        stacks.push('|');
        for l in &e.user_locations {
            stacks.push_str(&l.frames.join(","));
            if let Some(m) = &l.module {
                stacks.push_str(&format!("@{}#{}", m.path, m.build_id));
            }
            stacks.push(';');
        }
        FoldKey {
            comm: e.comm.clone(),
            cgroup_id: e.cgroup_id,
            stacks,
            cache,
        }
    }
}

/// The samples of forgotten processes that were still held, by [`FoldKey`],
/// with the names their processes had.
struct Folded {
    key: FoldKey,
    row: Row,
    exited: ExitedRow,
}

/// An unnamed user frame (`[unknown] 0xADDR`, in no file: the process was
/// gone before its mappings were read) is an address in one process's
/// layout, meaningless in another's: a folded row keeps it as `[unknown]`,
/// what is known of it in each of its processes, so the exits of one program
/// fold together instead of one row per address-space layout.
fn without_addresses(e: &mut ExitedRow) {
    const UNKNOWN: &str = "[unknown]";
    for f in &mut e.user {
        if f.starts_with(UNKNOWN) {
            *f = UNKNOWN.to_string();
        }
    }
    for l in &mut e.user_locations {
        if l.module.is_none() && l.frames.iter().all(|f| f.starts_with(UNKNOWN)) {
            l.addr = 0;
            l.frames = vec![UNKNOWN.to_string()];
        }
    }
}

/// Who a row's estimates belong to, for `--group-by`.
pub enum Who<'a> {
    Row(&'a RowKey),
    Exited(&'a ExitedRow),
}

/// The samples since start: every one allocated (`alloc_*`) and those
/// still held (`inuse_*`), by row.
pub struct Kheap {
    pub sampler: KheapConfig,
    names: CacheNames,
    caches: Vec<String>,
    cache_ids: HashMap<String, u32>,
    held: HashMap<u64, Held>,
    rows: HashMap<RowKey, Row>,
    /// Folded rows by slot (None: free, in `free_folds`), and by key.
    folded: Vec<Option<Folded>>,
    fold_ids: HashMap<FoldKey, u32>,
    free_folds: Vec<u32>,
    started_wall_s: u64,
    samples: u64,
    stale: u64,
}

/// What the kernel counted as not handed over, from its loss counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct KheapLosses {
    /// Samples the live table had no room for (`allocs_lost_map_full`).
    pub dropped: u64,
    /// Samples the ring buffer had no room for (`allocs_lost_ringbuf`).
    pub samples: u64,
    /// Frees of held samples the ring had no room for
    /// (`frees_lost_ringbuf`): those samples stay held until their address
    /// is allocated again.
    pub sample_frees: u64,
}

/// One sample as the session hands it over.
pub struct Sample {
    pub ptr: u64,
    pub tgid: u32,
    pub start_ns: u64,
    pub kstack: StackId,
    pub ustack: StackId,
    pub source: u16,
    pub bytes_alloc: u64,
    pub gfp: u64,
    pub name_hash: u64,
}

impl Kheap {
    pub fn new(sampler: KheapConfig, names: CacheNames, started_wall_s: u64) -> Kheap {
        Kheap {
            sampler,
            names,
            caches: Vec::new(),
            cache_ids: HashMap::new(),
            held: HashMap::new(),
            rows: HashMap::new(),
            folded: Vec::new(),
            fold_ids: HashMap::new(),
            free_folds: Vec::new(),
            started_wall_s,
            samples: 0,
            stale: 0,
        }
    }

    pub fn alloc(&mut self, cfg: &Config, s: &Sample) {
        // An address handed out again: its old sample was freed unseen.
        if self.held.contains_key(&s.ptr) {
            self.stale += 1;
            self.free(s.ptr);
        }
        let name = self
            .names
            .name(cfg, s.source, s.bytes_alloc, s.gfp, s.name_hash);
        let next = self.caches.len() as u32;
        let cache = *self.cache_ids.entry(name.clone()).or_insert(next);
        if cache == next {
            self.caches.push(name);
        }
        let p = probability(&self.sampler, s.bytes_alloc);
        let (objects, bytes) = (1.0 / p, s.bytes_alloc as f64 / p);
        let row = RowKey {
            tgid: s.tgid,
            start_ns: s.start_ns,
            kstack: s.kstack,
            ustack: s.ustack,
            cache,
        };
        let r = self.rows.entry(row).or_default();
        r.alloc.add(objects, bytes);
        r.inuse.add(objects, bytes);
        self.held.insert(
            s.ptr,
            Held {
                row: Slot::Row(row),
                objects,
                bytes,
            },
        );
        self.samples += 1;
    }

    /// The session forgot these processes (`gone`) and the stack table may
    /// give their stacks' ids to other stacks. A row that holds no sample
    /// keeps its allocation totals under [`FORGOTTEN`] with no stack. A row
    /// that still holds samples (the process exited, its kernel objects live
    /// on) folds into the row of its comm, cgroup, stacks by content and
    /// cache, labelled exited: its held samples move there, so a later free
    /// subtracts from it, and `name` (called while the process's names are
    /// still at hand) gives the row's names. Folded rows that hold nothing
    /// any more give their totals to [`FORGOTTEN`] too, so rows and the
    /// stacks they keep are bounded by the live processes, the held samples
    /// and the distinct (comm, cgroup, stacks, cache) they came from, not by
    /// the processes that ever ran. Totals (in use and allocated) do not
    /// change.
    pub fn forget(
        &mut self,
        gone: &[ProcKey],
        mut name: impl FnMut(ProcKey, StackId, StackId) -> ExitedRow,
    ) {
        let gone: HashSet<ProcKey> = gone.iter().copied().collect();
        let keys: Vec<RowKey> = self
            .rows
            .keys()
            .filter(|k| gone.contains(&k.process()))
            .copied()
            .collect();
        let mut moved: HashMap<RowKey, u32> = HashMap::new();
        let mut counted: HashSet<(ProcKey, u32)> = HashSet::new();
        for key in keys {
            let Some(row) = self.rows.remove(&key) else {
                continue;
            };
            if row.inuse.samples == 0 {
                self.forgotten(key.cache).alloc.merge(&row.alloc);
                continue;
            }
            let exited = name(key.process(), key.kstack, key.ustack);
            let id = self.fold(exited, key.cache);
            let Some(Some(f)) = self.folded.get_mut(id as usize) else {
                continue;
            };
            f.row.alloc.merge(&row.alloc);
            f.row.inuse.merge(&row.inuse);
            if counted.insert((key.process(), id)) {
                f.exited.processes += 1;
            }
            moved.insert(key, id);
        }
        if !moved.is_empty() {
            for h in self.held.values_mut() {
                if let Slot::Row(k) = h.row {
                    if let Some(&id) = moved.get(&k) {
                        h.row = Slot::Folded(id);
                    }
                }
            }
        }
        self.release_empty_folds();
    }

    /// The slot of the folded row `exited` and `cache` belong to, made if new.
    fn fold(&mut self, mut exited: ExitedRow, cache: u32) -> u32 {
        without_addresses(&mut exited);
        let key = FoldKey::of(&exited, cache);
        if let Some(&id) = self.fold_ids.get(&key) {
            return id;
        }
        exited.processes = 0;
        let f = Folded {
            key: key.clone(),
            row: Row::default(),
            exited,
        };
        let id = match self.free_folds.pop() {
            Some(id) => {
                self.folded[id as usize] = Some(f);
                id
            }
            None => {
                self.folded.push(Some(f));
                self.folded.len() as u32 - 1
            }
        };
        self.fold_ids.insert(key, id);
        id
    }

    fn forgotten(&mut self, cache: u32) -> &mut Row {
        self.rows
            .entry(RowKey {
                tgid: FORGOTTEN,
                start_ns: 0,
                kstack: StackId::EMPTY,
                ustack: StackId::EMPTY,
                cache,
            })
            .or_default()
    }

    /// Folded rows whose samples were all freed: no sample needs their
    /// names and stacks any more.
    fn release_empty_folds(&mut self) {
        for id in 0..self.folded.len() {
            let empty = matches!(&self.folded[id], Some(f) if f.row.inuse.samples == 0);
            if !empty {
                continue;
            }
            if let Some(f) = self.folded[id].take() {
                self.fold_ids.remove(&f.key);
                self.forgotten(f.key.cache).alloc.merge(&f.row.alloc);
                self.free_folds.push(id as u32);
            }
        }
    }

    /// The stack ids the rows still refer to (folded rows keep their
    /// stacks by content, not by id).
    pub fn stacks_in_use(&self) -> impl Iterator<Item = StackId> + '_ {
        self.rows.keys().flat_map(|k| [k.kstack, k.ustack])
    }

    pub fn free(&mut self, ptr: u64) {
        let Some(h) = self.held.remove(&ptr) else {
            return;
        };
        let row = match h.row {
            Slot::Row(k) => self.rows.get_mut(&k),
            Slot::Folded(id) => self
                .folded
                .get_mut(id as usize)
                .and_then(Option::as_mut)
                .map(|f| &mut f.row),
        };
        if let Some(r) = row {
            r.inuse.sub(h.objects, h.bytes);
        }
    }

    /// The in-use estimates summed by `key` (a row's process, kernel and
    /// user stacks and cache name to its group), largest first; each group's
    /// interval as a row's, from its own samples and weights.
    pub fn groups(&self, key: impl Fn(Who<'_>, &str) -> String) -> Vec<KheapGroup> {
        let mut by: HashMap<String, Row> = HashMap::new();
        let live = self.rows.iter().map(|(k, r)| (Who::Row(k), k.cache, r));
        let folded = self
            .folded
            .iter()
            .flatten()
            .map(|f| (Who::Exited(&f.exited), f.key.cache, &f.row));
        for (who, cache, r) in live.chain(folded) {
            let g = by
                .entry(key(who, &self.caches[cache as usize]))
                .or_default();
            g.inuse.merge(&r.inuse);
            g.alloc.merge(&r.alloc);
        }
        let mut out: Vec<KheapGroup> = by
            .into_iter()
            .filter(|(_, r)| r.inuse.samples > 0 || r.alloc.samples > 0)
            .map(|(key, r)| {
                let (low, high) = interval(&r.inuse);
                KheapGroup {
                    key,
                    samples: r.inuse.samples,
                    inuse_objects: r.inuse.objects.round() as u64,
                    inuse_bytes: r.inuse.bytes.round() as u64,
                    inuse_bytes_low: low,
                    inuse_bytes_high: high,
                    alloc_bytes: r.alloc.bytes.round() as u64,
                }
            })
            .collect();
        out.sort_by(|a, b| b.inuse_bytes.cmp(&a.inuse_bytes).then(a.key.cmp(&b.key)));
        out
    }

    /// Rows, caches and coverage as the report carries them; `lost`: the
    /// samples and samples' frees the kernel could not hand over.
    pub fn summary(&self, lost: KheapLosses) -> KheapSummary {
        let mut rows: Vec<KheapRow> = Vec::new();
        let row = |key: &RowKey, r: &Row, exited: Option<&ExitedRow>| {
            let (low, high) = interval(&r.inuse);
            KheapRow {
                tgid: key.tgid,
                start_ns: key.start_ns,
                kstack: key.kstack,
                ustack: key.ustack,
                cache: self.caches[key.cache as usize].clone(),
                samples: r.inuse.samples,
                inuse_objects: r.inuse.objects.round() as u64,
                inuse_bytes: r.inuse.bytes.round() as u64,
                inuse_bytes_low: low,
                inuse_bytes_high: high,
                alloc_objects: r.alloc.objects.round() as u64,
                alloc_bytes: r.alloc.bytes.round() as u64,
                kernel: Vec::new(),
                user: Vec::new(),
                exited: exited.cloned(),
            }
        };
        for (key, r) in &self.rows {
            rows.push(row(key, r, None));
        }
        for f in self.folded.iter().flatten() {
            let key = RowKey {
                tgid: FORGOTTEN,
                start_ns: 0,
                kstack: StackId::EMPTY,
                ustack: StackId::EMPTY,
                cache: f.key.cache,
            };
            rows.push(row(&key, &f.row, Some(&f.exited)));
        }
        rows.sort_by(|a, b| b.inuse_bytes.cmp(&a.inuse_bytes).then(a.tgid.cmp(&b.tgid)));
        // The by-cache figures are the groups by cache name, in the same order.
        let caches: Vec<KheapCache> = self
            .groups(|_, cache| cache.to_string())
            .into_iter()
            .map(|g| KheapCache {
                name: g.key,
                samples: g.samples,
                inuse_objects: g.inuse_objects,
                inuse_bytes: g.inuse_bytes,
                inuse_bytes_low: g.inuse_bytes_low,
                inuse_bytes_high: g.inuse_bytes_high,
            })
            .collect();
        let held_bytes: f64 = self.held.values().map(|h| h.bytes).sum();
        // A sample whose free the ring had no room for stays held in the
        // kernel and here: a phantom among the held samples. At most
        // `lost.sample_frees` of them, so the largest that many held
        // weights bound what they add.
        let mut weights: Vec<f64> = self.held.values().map(|h| h.bytes).collect();
        weights.sort_by(|a, b| b.total_cmp(a));
        let phantom: f64 = weights
            .iter()
            .take(usize::try_from(lost.sample_frees).unwrap_or(usize::MAX))
            .sum();
        let unseen = lost.dropped.saturating_add(lost.samples);
        KheapSummary {
            sample_bytes: self.sampler.rate,
            since_unix_s: self.started_wall_s,
            samples: self.samples,
            samples_held: self.held.len() as u64,
            stale: self.stale,
            dropped: lost.dropped,
            lost_samples: lost.samples,
            // A sample of `size` bytes stood for size / (1 − e^(−size/rate))
            // bytes, never less than `rate` (1 − e^(−x) ≤ x): a floor on
            // what the unseen samples leave out, not a ceiling.
            low_by_at_least_bytes: unseen.saturating_mul(self.sampler.rate),
            lost_sample_frees: lost.sample_frees,
            high_by_at_most_bytes: phantom.round() as u64,
            inuse_bytes: held_bytes.round() as u64,
            caches,
            rows,
            group_by: GroupBy::Cache,
            groups: Vec::new(),
        }
    }
}

/// The group `--group-by` puts a row of `cache` in: `procs` are the report's
/// processes by (tgid, start); rows of forgotten processes group as
/// "(exited)", folded ones by the names they kept.
pub fn group_key(
    by: GroupBy,
    who: Who<'_>,
    cache: &str,
    procs: &HashMap<ProcKey, &ProcessReport>,
) -> String {
    let row = match who {
        Who::Exited(e) => return exited_key(by, e, cache),
        Who::Row(row) => row,
    };
    let p = procs.get(&row.process());
    match (by, p) {
        (GroupBy::Cache, _) => cache.to_string(),
        (GroupBy::Stack, Some(p)) => p
            .stacks
            .iter()
            .find(|s| s.kstack == row.kstack && s.ustack == row.ustack)
            .map(|s| stack_label(&s.kernel, &s.user))
            .unwrap_or_else(|| format!("stacks {}/{}", row.kstack.0, row.ustack.0)),
        (GroupBy::Process, Some(p)) => format!("{} {}", p.tgid, p.comm),
        (_, Some(p)) => crate::slab::grouping::key_of(p, by),
        (_, None) if row.tgid == FORGOTTEN => "(exited)".to_string(),
        (_, None) => format!("pid {}", row.tgid),
    }
}

/// A folded row's group: by the comm, cgroup and stacks it kept; no pid nor
/// parent (its processes are gone, and were many).
fn exited_key(by: GroupBy, e: &ExitedRow, cache: &str) -> String {
    match by {
        GroupBy::Cache => cache.to_string(),
        GroupBy::Stack => stack_label(&e.kernel, &e.user),
        GroupBy::Process | GroupBy::Parent => format!("(exited) {}", e.comm),
        _ => grouping::key_of_names(
            &e.comm,
            e.cgroup_id,
            e.cgroup.as_deref(),
            e.pod.as_deref(),
            by,
        ),
    }
}

/// The first kernel frames past the allocator and the first user frame.
fn stack_label(kernel: &[String], user: &[String]) -> String {
    let kernel = kernel
        .iter()
        .skip_while(|f| f.starts_with("kmem_cache_alloc") || f.starts_with("__kmalloc"));
    kernel
        .take(2)
        .chain(user.first())
        .cloned()
        .collect::<Vec<_>>()
        .join(" <- ")
}

/// 95% interval of a row's estimate: the exact Poisson interval of its
/// sample count times its mean weight (bytes per sample).
fn interval(w: &Weights) -> (u64, u64) {
    if w.samples == 0 {
        return (0, 0);
    }
    let n = w.samples as f64;
    let per = w.bytes / n;
    let low = Gamma::new(n, 1.0).map_or(0.0, |g| g.inverse_cdf(0.025));
    let high = Gamma::new(n + 1.0, 1.0).map_or(n, |g| g.inverse_cdf(0.975));
    ((low * per).round() as u64, (high * per).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{bpf::stacks::StackTable, slab::report::Location, test_rng::Rng};

    fn empty() -> Kheap {
        Kheap::new(
            config(DEFAULT_RATE),
            CacheNames {
                by_hash: HashMap::new(),
                by_size: HashMap::new(),
            },
            0,
        )
    }

    fn names_of(fixture: &str) -> CacheNames {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata/proc")
            .join(fixture);
        let slabinfo = crate::kernel::slabinfo::read(&root).unwrap_or_default();
        CacheNames::new(
            &Catalogue::read(&root).expect("catalogue fixture"),
            &slabinfo,
        )
    }

    #[test]
    fn unnamed_cache_samples_list_every_cache_of_their_size() {
        let names = names_of("merged");
        let cfg = Config::zeroed();
        let unnamed = |size| names.name(&cfg, SOURCE_CACHE_ALLOC, size, 0, 0);
        // kmalloc-256, kmalloc-cg-256 and sgpool-8 are one kmem_cache:
        // listed once, by the name /proc/slabinfo shows; the caches with
        // most active objects first, then by name.
        assert_eq!(
            unnamed(256),
            "cache of 256 B (kmalloc-256|dma-kmalloc-256|kmalloc-rcl-256)"
        );
        assert_eq!(unnamed(192), "cache of 192 B (dentry|filp)");
        assert_eq!(unnamed(12345), "cache of 12345 B (none at start)");
        let many: Vec<String> = (0..6).map(|i| format!("c{i}")).collect();
        assert_eq!(size_label(64, &many[..2]), "cache of 64 B (c0|c1)");
        assert_eq!(size_label(64, &many), "cache of 64 B (c0|c1|c2|c3|+2 more)");
        // A named sample keeps its name.
        let hash = name_hash("dentry");
        assert_eq!(names.name(&cfg, SOURCE_CACHE_ALLOC, 192, 0, hash), "dentry");
    }

    #[test]
    fn accounted_kmalloc_lands_in_the_plain_cache_where_there_is_no_cg_one() {
        let mut cfg = Config::zeroed();
        cfg.gfp_account = 0x400000;
        let accounted = 0x400000 | 0xcc0;
        let without_cg = names_of("nokmem");
        assert_eq!(
            without_cg.name(&cfg, SOURCE_KMALLOC, 512, accounted, 0),
            "kmalloc-512"
        );
        let with_cg = names_of("merged");
        assert_eq!(
            with_cg.name(&cfg, SOURCE_KMALLOC, 512, accounted, 0),
            "kmalloc-cg-512"
        );
    }

    #[test]
    fn thresholds_follow_the_exponential_and_never_vanish() {
        let k = config(DEFAULT_RATE);
        let p = |size| probability(&k, size);
        assert!((p(512) - (1.0 - (-512.0f64 / 524_288.0).exp())).abs() < 1e-9);
        assert!((p(8192) - (1.0 - (-8192.0f64 / 524_288.0).exp())).abs() < 1e-9);
        assert!(p(8) > 0.0 && p(1 << 30) < 1.0);
        assert_eq!(kmalloc_name(512, 0), "kmalloc-512");
        assert_eq!(kmalloc_name(2048, 4), "kmalloc-cg-2k");
        assert_eq!(kmalloc_name(96, 1), "dma-kmalloc-96");
    }

    fn sample(ptr: u64, tgid: u32, kstack: StackId, ustack: StackId, bytes: u64) -> Sample {
        Sample {
            ptr,
            tgid,
            start_ns: 1000 + u64::from(tgid),
            kstack,
            ustack,
            source: SOURCE_KMALLOC,
            bytes_alloc: bytes,
            gfp: 0,
            name_hash: 0,
        }
    }

    fn key(tgid: u32) -> ProcKey {
        ProcKey {
            tgid,
            start_ns: 1000 + u64::from(tgid),
        }
    }

    /// What the session names a forgotten process's row by: comm `comm`,
    /// cgroup 42, and the stacks' frames as `stacks` holds them now.
    fn namer<'a>(
        stacks: &'a StackTable,
        comm: &'a str,
    ) -> impl FnMut(ProcKey, StackId, StackId) -> ExitedRow + 'a {
        move |_, k, u| {
            let loc = |&addr: &u64| Location {
                addr,
                frames: vec![format!("f{addr:x}")],
                module: None,
            };
            let kernel_locations: Vec<Location> = stacks.frames(k).iter().map(loc).collect();
            let user_locations: Vec<Location> = stacks.frames(u).iter().map(loc).collect();
            ExitedRow {
                comm: comm.to_string(),
                cgroup_id: 42,
                cgroup: Some("/system.slice/cron.service".to_string()),
                pod: None,
                processes: 1,
                kernel: kernel_locations
                    .iter()
                    .map(|l| l.frames[0].clone())
                    .collect(),
                user: user_locations.iter().map(|l| l.frames[0].clone()).collect(),
                kernel_locations,
                user_locations,
            }
        }
    }

    /// In-use bytes (the held samples'), and in-use and allocated bytes
    /// summed over the caches (unrounded weights summed per cache) and over
    /// the rows (each rounded once).
    fn totals(s: &KheapSummary) -> (u64, u64, f64, f64) {
        let rows = |f: fn(&KheapRow) -> u64| s.rows.iter().map(|r| f(r) as f64).sum::<f64>();
        (
            s.inuse_bytes,
            s.caches.iter().map(|c| c.inuse_bytes).sum(),
            rows(|r| r.inuse_bytes),
            rows(|r| r.alloc_bytes),
        )
    }

    /// Equal but for each row's rounding (half a byte per row at most).
    fn same_totals(a: &KheapSummary, b: &KheapSummary) {
        let (x, y) = (totals(a), totals(b));
        let rows = a.rows.len().max(b.rows.len()) as f64;
        assert_eq!(x.0, y.0, "held bytes");
        assert!(x.1.abs_diff(y.1) <= 1, "cache in-use {} vs {}", x.1, y.1);
        assert!(
            (x.2 - y.2).abs() <= rows / 2.0,
            "row in-use {} vs {}",
            x.2,
            y.2
        );
        assert!(
            (x.3 - y.3).abs() <= rows / 2.0,
            "row allocs {} vs {}",
            x.3,
            y.3
        );
    }

    #[test]
    fn forgotten_processes_that_hold_nothing_keep_their_totals_but_no_stack() {
        let mut k = empty();
        let cfg = Config::zeroed();
        let mut stacks = StackTable::default();
        let (ks, us) = (stacks.intern(&[7, 70]), stacks.intern(&[8]));
        k.alloc(&cfg, &sample(1, 10, ks, us, 512));
        k.free(1);
        k.alloc(&cfg, &sample(2, 11, ks, us, 512));
        k.forget(&[key(10)], namer(&stacks, "cron"));
        let s = k.summary(KheapLosses::default());
        let forgotten: Vec<&KheapRow> = s.rows.iter().filter(|r| r.tgid == FORGOTTEN).collect();
        assert_eq!(forgotten.len(), 1);
        assert_eq!(forgotten[0].kstack, StackId::EMPTY);
        assert!(forgotten[0].exited.is_none());
        assert_eq!(forgotten[0].inuse_bytes, 0);
        assert!(forgotten[0].alloc_bytes > 0);
        // A process not forgotten keeps its row, pid and stacks.
        assert!(s
            .rows
            .iter()
            .any(|r| r.tgid == 11 && r.kstack == ks && r.samples == 1 && r.exited.is_none()));
    }

    /// Exec churn: 1,000 short-lived processes with one comm and one stack
    /// each leave one held sample in kmalloc-512. Forgotten, they are one
    /// row labelled exited holding all 1,000 samples and their summed
    /// weights; a later free subtracts from it; totals do not move; the live
    /// process with the same comm and stack keeps its own row; once every
    /// folded sample is freed the row and its stacks are released.
    #[test]
    fn exited_holders_fold_into_one_row_by_comm_cgroup_stacks_and_cache() {
        let mut k = empty();
        let cfg = Config::zeroed();
        let mut stacks = StackTable::default();
        let (ks, us) = (
            stacks.intern(&[0xffff_1000, 0xffff_2000]),
            stacks.intern(&[0x40]),
        );
        k.alloc(&cfg, &sample(1, 7, ks, us, 512));
        let mut expected = Weights::default();
        for i in 0..1000u64 {
            let bytes = 512;
            let tgid = 10_000 + i as u32;
            k.alloc(&cfg, &sample(0x1000 + i * 0x10, tgid, ks, us, bytes));
            let p = probability(&k.sampler, bytes);
            expected.add(1.0 / p, bytes as f64 / p);
        }
        let before = k.summary(KheapLosses::default());
        let gone: Vec<ProcKey> = (0..1000).map(|i| key(10_000 + i)).collect();
        k.forget(&gone, namer(&stacks, "cron"));
        let after = k.summary(KheapLosses::default());
        same_totals(&after, &before);
        let folded: Vec<&KheapRow> = after.rows.iter().filter(|r| r.exited.is_some()).collect();
        assert_eq!(folded.len(), 1, "one row for 1,000 processes");
        let f = folded[0];
        let e = f.exited.as_ref().expect("exited");
        assert_eq!((f.tgid, f.samples, e.processes), (FORGOTTEN, 1000, 1000));
        assert_eq!(e.comm, "cron");
        assert_eq!(e.kernel, ["fffff1000", "fffff2000"]);
        assert_eq!(
            (e.user.as_slice(), e.cgroup_id),
            (["f40".to_string()].as_slice(), 42)
        );
        assert_eq!(f.inuse_objects, expected.objects.round() as u64);
        assert_eq!(f.inuse_bytes, expected.bytes.round() as u64);
        assert_eq!(f.alloc_bytes, expected.bytes.round() as u64);
        // The live process is never folded: its own row, pid and stacks.
        let live: Vec<&KheapRow> = after.rows.iter().filter(|r| r.tgid == 7).collect();
        assert_eq!(live.len(), 1);
        assert!(live[0].exited.is_none() && live[0].kstack == ks && live[0].samples == 1);
        assert_eq!(after.rows.len(), 2);
        // A later free of one of them subtracts from the folded row.
        k.free(0x1000);
        let p = probability(&k.sampler, 512);
        let s = k.summary(KheapLosses::default());
        let f = s.rows.iter().find(|r| r.exited.is_some()).expect("folded");
        assert_eq!(f.samples, 999);
        assert_eq!(f.inuse_bytes, (expected.bytes - 512.0 / p).round() as u64);
        assert_eq!(s.samples_held, 1000);
        // All freed: at the next forget the row goes, its totals to FORGOTTEN.
        for i in 1..1000u64 {
            k.free(0x1000 + i * 0x10);
        }
        k.forget(&[], namer(&stacks, "cron"));
        let s = k.summary(KheapLosses::default());
        assert!(s.rows.iter().all(|r| r.exited.is_none()));
        assert!(k.folded.iter().all(Option::is_none) && k.fold_ids.is_empty());
        let forgotten = s
            .rows
            .iter()
            .find(|r| r.tgid == FORGOTTEN)
            .expect("forgotten");
        assert_eq!(forgotten.inuse_bytes, 0);
        assert_eq!(forgotten.alloc_bytes, expected.bytes.round() as u64);
        let (allocs, allocs_before) = (totals(&s).3, totals(&before).3);
        assert!(
            (allocs - allocs_before).abs() <= 1001.0 / 2.0,
            "alloc totals kept"
        );
    }

    /// Folding keys stacks by content: the same frames under ids the table
    /// gave out again fold together, different frames or comm or cache stay
    /// apart, and folded rows name no stack id.
    #[test]
    fn folded_rows_key_stacks_by_content_not_by_id() {
        let mut k = empty();
        let cfg = Config::zeroed();
        let mut stacks = StackTable::default();
        let a = stacks.intern(&[1, 2]);
        let u = stacks.intern(&[0x40]);
        k.alloc(&cfg, &sample(0x10, 100, a, u, 512));
        k.forget(&[key(100)], namer(&stacks, "probe"));
        // The table releases `a`; its id now names other frames, and the
        // old frames come back under another id.
        stacks.retain(&HashSet::from([u]));
        let b = stacks.intern(&[3, 4]);
        let a2 = stacks.intern(&[1, 2]);
        assert_eq!(b, a, "the id was reused");
        k.alloc(&cfg, &sample(0x20, 101, a2, u, 512));
        k.alloc(&cfg, &sample(0x30, 102, b, u, 512));
        k.alloc(&cfg, &sample(0x40, 103, a2, u, 64));
        k.forget(&[key(101), key(102), key(103)], namer(&stacks, "probe"));
        let s = k.summary(KheapLosses::default());
        let folded: Vec<&KheapRow> = s.rows.iter().filter(|r| r.exited.is_some()).collect();
        assert_eq!(
            folded.len(),
            3,
            "[1,2] in kmalloc-512, [3,4], [1,2] in kmalloc-64"
        );
        let of = |frames: &[&str], cache: &str| {
            folded
                .iter()
                .find(|r| r.cache == cache && r.exited.as_ref().is_some_and(|e| e.kernel == frames))
                .map(|r| r.samples)
        };
        assert_eq!(of(&["f1", "f2"], "kmalloc-512"), Some(2));
        assert_eq!(of(&["f3", "f4"], "kmalloc-512"), Some(1));
        assert_eq!(of(&["f1", "f2"], "kmalloc-64"), Some(1));
        assert!(folded.iter().all(|r| r.kstack == StackId::EMPTY));
        assert_eq!(k.stacks_in_use().count(), 0, "no row keeps a stack id");
        // Another comm is another row.
        k.alloc(&cfg, &sample(0x50, 104, a2, u, 512));
        k.forget(&[key(104)], namer(&stacks, "shell"));
        assert_eq!(
            k.summary(KheapLosses::default())
                .rows
                .iter()
                .filter(|r| r.exited.is_some())
                .count(),
            4
        );
        // --group-by on folded rows: by what they kept, never a pid.
        let procs = HashMap::new();
        let by_process = k.groups(|w, c| group_key(GroupBy::Process, w, c, &procs));
        let keys: Vec<&str> = by_process.iter().map(|g| g.key.as_str()).collect();
        assert!(keys.contains(&"(exited) probe") && keys.contains(&"(exited) shell"));
        let by_cgroup = k.groups(|w, c| group_key(GroupBy::Cgroup, w, c, &procs));
        assert_eq!(by_cgroup[0].key, "/system.slice/cron.service");
        assert_eq!(by_cgroup[0].samples, 5);
    }

    /// Short-lived processes gone before their mappings were read leave
    /// unnamed user frames at addresses of their own layouts: folded, they
    /// are one row whose user frames are `[unknown]`, without an address
    /// that was only one process's; a named frame stays apart.
    #[test]
    fn unnamed_user_frames_fold_without_their_addresses() {
        let mut k = empty();
        let cfg = Config::zeroed();
        let mut stacks = StackTable::default();
        let ks = stacks.intern(&[0xffff_1000]);
        let mut gone = Vec::new();
        for i in 0..100u64 {
            let us = stacks.intern(&[0x7f00_0000_0f37 + (i << 12)]);
            k.alloc(&cfg, &sample(0x10 + i * 0x10, 200 + i as u32, ks, us, 512));
            gone.push(key(200 + i as u32));
        }
        let named = stacks.intern(&[0x40]);
        k.alloc(&cfg, &sample(0x9000, 400, ks, named, 512));
        gone.push(key(400));
        let mut name = namer(&stacks, "mkdir");
        k.forget(&gone, |p, kstack, ustack| {
            let mut e = name(p, kstack, ustack);
            if ustack != named {
                for l in &mut e.user_locations {
                    l.frames = vec![format!("[unknown] {:#x}", l.addr)];
                }
                e.user = e
                    .user_locations
                    .iter()
                    .map(|l| l.frames[0].clone())
                    .collect();
            }
            e
        });
        let s = k.summary(KheapLosses::default());
        let folded: Vec<&KheapRow> = s.rows.iter().filter(|r| r.exited.is_some()).collect();
        assert_eq!(folded.len(), 2, "{folded:?}");
        let unknown = folded
            .iter()
            .find_map(|r| {
                r.exited
                    .as_ref()
                    .filter(|e| e.user == ["[unknown]"])
                    .map(|e| (r, e))
            })
            .expect("the unnamed ones, folded");
        assert_eq!((unknown.0.samples, unknown.1.processes), (100, 100));
        assert_eq!(unknown.1.user_locations[0].addr, 0);
        assert!(folded
            .iter()
            .any(|r| r.samples == 1 && r.exited.as_ref().is_some_and(|e| e.user == ["f40"])));
    }

    /// Samples never handed over put the estimates low by at least the
    /// rate each; a lost free of a sample leaves it held, so the estimates
    /// may be high by at most the largest that many held weights.
    #[test]
    fn losses_bound_the_estimates_each_way() {
        let mut k = empty();
        let cfg = Config::zeroed();
        for (ptr, bytes) in [(1u64, 64u64), (2, 8192), (3, 512)] {
            k.alloc(&cfg, &sample(ptr, 1, StackId(0), StackId(0), bytes));
        }
        let weight = |size: u64| size as f64 / probability(&k.sampler, size);
        // Each sample stands for at least the rate, more for larger objects.
        for size in [8, 64, 512, 8192, 1 << 20] {
            assert!(weight(size) >= DEFAULT_RATE as f64 * 0.999, "{size}");
        }
        let none = k.summary(KheapLosses::default());
        assert_eq!(
            (none.low_by_at_least_bytes, none.high_by_at_most_bytes),
            (0, 0)
        );
        let s = k.summary(KheapLosses {
            dropped: 2,
            samples: 1,
            sample_frees: 2,
        });
        assert_eq!((s.dropped, s.lost_samples, s.lost_sample_frees), (2, 1, 2));
        assert_eq!(s.low_by_at_least_bytes, 3 * DEFAULT_RATE);
        // The two largest held weights: the 8 KiB and the 512 B samples'.
        let high = (weight(8192) + weight(512)).round() as u64;
        assert_eq!(s.high_by_at_most_bytes, high);
        assert!(
            high > 2 * DEFAULT_RATE,
            "more than rate x lost frees: {high}"
        );
    }

    /// The kernel's draw and the estimate over 200 seeds: for objects of
    /// 8 B to 8 KiB (one size a run, and mixed), allocated and mostly freed,
    /// the mean in-use estimate is within 3 standard errors of the truth and
    /// the 95% interval covers the truth in at least 90% of the seeds.
    #[test]
    fn in_use_estimates_are_unbiased_and_their_intervals_cover() {
        const SEEDS: u64 = 200;
        for size in [8u64, 64, 512, 4096, 8192, 0] {
            let (mut estimates, mut covered, mut truth_sum) = (Vec::new(), 0, 0.0);
            for seed in 0..SEEDS {
                let mut rng = Rng(seed * 7919 + size + 1);
                let mut k = empty();
                let cfg = Config::zeroed();
                let mut truth = 0u64;
                // 64 MiB allocated, a third of the objects held: ~43
                // samples held on average at the default rate.
                let objects = (64 << 20) / if size == 0 { 4100 } else { size } as usize;
                for i in 0..objects {
                    let bytes = if size == 0 {
                        8 * (1 + rng.below(1024) as u64)
                    } else {
                        size
                    };
                    let held = rng.below(3) == 0;
                    if held {
                        truth += bytes;
                    }
                    let draw = (rng.next() >> 32) as u32;
                    if draw >= k.sampler.thresholds[kheap_class(bytes)] {
                        continue;
                    }
                    let ptr = (i as u64 + 1) << 12;
                    k.alloc(&cfg, &sample(ptr, 1, StackId(0), StackId(0), bytes));
                    if !held {
                        k.free(ptr);
                    }
                }
                let s = k.summary(KheapLosses::default());
                let (est, low, high) = s.caches.iter().fold((0, 0, 0), |a, c| {
                    (
                        a.0 + c.inuse_bytes,
                        a.1 + c.inuse_bytes_low,
                        a.2 + c.inuse_bytes_high,
                    )
                });
                // One cache a run except the mixed one, whose per-cache
                // intervals are summed (conservative).
                if low <= truth && truth <= high {
                    covered += 1;
                }
                estimates.push(est as f64);
                truth_sum += truth as f64;
            }
            let n = SEEDS as f64;
            let mean = estimates.iter().sum::<f64>() / n;
            let var = estimates.iter().map(|e| (e - mean).powi(2)).sum::<f64>() / (n - 1.0);
            let se = (var / n).sqrt();
            let truth = truth_sum / n;
            assert!(
                (mean - truth).abs() <= 3.0 * se,
                "size {size}: mean estimate {mean:.0} vs truth {truth:.0} (SE {se:.0})"
            );
            assert!(
                covered * 10 >= SEEDS * 9,
                "size {size}: 95% intervals covered the truth in {covered} of {SEEDS} seeds"
            );
        }
    }
}
