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

use std::collections::HashMap;

use statrs::distribution::{ContinuousCDF, Gamma};
use tracer_common::slab::{
    cache_name_hash, kheap_class, kmalloc_class, Config, KheapConfig, CACHE_NAME_LEN,
    KHEAP_CLASSES, KHEAP_SMALL_LIMIT, SOURCE_CACHE_ALLOC, SOURCE_KMALLOC, SOURCE_PERCPU,
};

use crate::{
    bpf::stacks::StackId,
    kernel::slabinfo::SlabLine,
    slab::caches::Catalogue,
    slab::report::{
        GroupBy, KheapCache, KheapGroup, KheapRow, KheapSummary, ProcessReport, FORGOTTEN,
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

/// Who a sample is attributed to: one profile row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RowKey {
    pub tgid: u32,
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

struct Held {
    row: RowKey,
    objects: f64,
    bytes: f64,
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
    started_wall_s: u64,
    samples: u64,
    stale: u64,
}

/// One sample as the session hands it over.
pub struct Sample {
    pub ptr: u64,
    pub tgid: u32,
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
                row,
                objects,
                bytes,
            },
        );
        self.samples += 1;
    }

    /// The session forgot these processes (gone, holding nothing) and the
    /// stack table may give their stacks' ids to other stacks: their rows,
    /// which hold no sample, keep their allocation totals under
    /// [`FORGOTTEN`] with no stack, so no row ever names a stack it did not
    /// come from and rows stay as many as the live processes.
    pub fn forget(&mut self, tgids: &[u32]) {
        let gone: Vec<RowKey> = self
            .rows
            .iter()
            .filter(|(k, r)| tgids.contains(&k.tgid) && r.inuse.samples == 0)
            .map(|(k, _)| *k)
            .collect();
        for key in gone {
            let Some(row) = self.rows.remove(&key) else {
                continue;
            };
            let merged = self
                .rows
                .entry(RowKey {
                    tgid: FORGOTTEN,
                    kstack: StackId::EMPTY,
                    ustack: StackId::EMPTY,
                    cache: key.cache,
                })
                .or_default();
            merged.alloc.samples += row.alloc.samples;
            merged.alloc.objects += row.alloc.objects;
            merged.alloc.bytes += row.alloc.bytes;
        }
    }

    pub fn free(&mut self, ptr: u64) {
        if let Some(h) = self.held.remove(&ptr) {
            if let Some(r) = self.rows.get_mut(&h.row) {
                r.inuse.sub(h.objects, h.bytes);
            }
        }
    }

    /// Rows, caches and coverage as the report carries them; `dropped`:
    /// samples the kernel's live table had no room for.
    /// The in-use estimates summed by `key` (a row's process, kernel and
    /// user stacks and cache name to its group), largest first; each group's
    /// interval as a row's, from its own samples and weights.
    pub fn groups(&self, key: impl Fn(&RowKey, &str) -> String) -> Vec<KheapGroup> {
        let mut by: HashMap<String, Row> = HashMap::new();
        for (k, r) in &self.rows {
            let g = by
                .entry(key(k, &self.caches[k.cache as usize]))
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

    pub fn summary(&self, dropped: u64) -> KheapSummary {
        let mut rows: Vec<KheapRow> = Vec::new();
        for (key, r) in &self.rows {
            let (low, high) = interval(&r.inuse);
            rows.push(KheapRow {
                tgid: key.tgid,
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
            });
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
        KheapSummary {
            sample_bytes: self.sampler.rate,
            since_unix_s: self.started_wall_s,
            samples: self.samples,
            samples_held: self.held.len() as u64,
            stale: self.stale,
            dropped,
            // A dropped sample stood for `rate` bytes on average.
            may_be_low_by_bytes: dropped.saturating_mul(self.sampler.rate),
            inuse_bytes: held_bytes.round() as u64,
            caches,
            rows,
            group_by: GroupBy::Cache,
            groups: Vec::new(),
        }
    }
}

/// The group `--group-by` puts a row of `cache` in: `procs` are the report's
/// processes by tgid (rows of forgotten processes group as "(exited)").
pub fn group_key(
    by: GroupBy,
    row: &RowKey,
    cache: &str,
    procs: &HashMap<u32, &ProcessReport>,
) -> String {
    let p = procs.get(&row.tgid);
    match (by, p) {
        (GroupBy::Cache, _) => cache.to_string(),
        (GroupBy::Stack, Some(p)) => p
            .stacks
            .iter()
            .find(|s| s.kstack == row.kstack && s.ustack == row.ustack)
            .map(|s| {
                let kernel = s.kernel.iter().skip_while(|f| {
                    f.starts_with("kmem_cache_alloc") || f.starts_with("__kmalloc")
                });
                kernel
                    .take(2)
                    .chain(s.user.first())
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(" <- ")
            })
            .unwrap_or_else(|| format!("stacks {}/{}", row.kstack.0, row.ustack.0)),
        (GroupBy::Process, Some(p)) => format!("{} {}", p.tgid, p.comm),
        (_, Some(p)) => crate::slab::grouping::key_of(p, by),
        (_, None) if row.tgid == FORGOTTEN => "(exited)".to_string(),
        (_, None) => format!("pid {}", row.tgid),
    }
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
    use crate::test_rng::Rng;

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

    #[test]
    fn forgotten_processes_keep_their_totals_but_no_stack() {
        let mut k = empty();
        let cfg = Config::zeroed();
        let sample = |ptr, tgid| Sample {
            ptr,
            tgid,
            kstack: StackId(7),
            ustack: StackId(8),
            source: SOURCE_KMALLOC,
            bytes_alloc: 512,
            gfp: 0,
            name_hash: 0,
        };
        k.alloc(&cfg, &sample(1, 10));
        k.free(1);
        k.alloc(&cfg, &sample(2, 11));
        k.forget(&[10, 11]);
        let s = k.summary(0);
        let forgotten: Vec<&KheapRow> = s.rows.iter().filter(|r| r.tgid == FORGOTTEN).collect();
        assert_eq!(forgotten.len(), 1);
        assert_eq!(forgotten[0].kstack, StackId::EMPTY);
        assert_eq!(forgotten[0].inuse_bytes, 0);
        assert!(forgotten[0].alloc_bytes > 0);
        // A row still holding a sample keeps its process and stacks.
        assert!(s
            .rows
            .iter()
            .any(|r| r.tgid == 11 && r.kstack == StackId(7) && r.samples == 1));
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
                    k.alloc(
                        &cfg,
                        &Sample {
                            ptr,
                            tgid: 1,
                            kstack: StackId(0),
                            ustack: StackId(0),
                            source: SOURCE_KMALLOC,
                            bytes_alloc: bytes,
                            gfp: 0,
                            name_hash: 0,
                        },
                    );
                    if !held {
                        k.free(ptr);
                    }
                }
                let s = k.summary(0);
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
