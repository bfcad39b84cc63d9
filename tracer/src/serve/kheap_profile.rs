//! The arithmetic `/debug/pprof/kheap` and `/metrics` do on the continuous
//! sampler's heap profiles (Go heap shape: `alloc_objects`, `alloc_space`,
//! `inuse_objects`, `inuse_space`, with a `cache` label per sample): decode,
//! the delta of `?seconds=N`, the filter of `?cache=NAME`, and the per-cache
//! in-use estimate of the metrics. No I/O: profiles in, profiles out.

use std::{
    collections::{BTreeMap, HashMap},
    io::Read,
};

use anyhow::{Context, Result};
use prost::Message;

use crate::output::pprof::{Function, Label, Location, Mapping, Profile, Sample};

/// A gzipped (or plain) profile.proto message.
pub fn decode(bytes: &[u8]) -> Result<Profile> {
    let raw = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut raw)
            .context("gunzipping the heap profile")?;
        raw
    } else {
        bytes.to_vec()
    };
    Profile::decode(raw.as_slice()).context("decoding the heap profile")
}

/// What a sample is, independent of the ids one profile gave its locations
/// and strings: its stack (each frame's address, mapping file and function
/// names) and its labels. Two snapshots of one sampler name the same stack
/// and labels with the same key.
fn sample_key(p: &Profile, s: &Sample, locations: &HashMap<u64, &Location>) -> String {
    let text = |i: i64| p.string_table.get(i as usize).map_or("", String::as_str);
    let mut key = String::new();
    for id in &s.location_id {
        key.push('|');
        if let Some(loc) = locations.get(id) {
            key.push_str(&format!("{:x}", loc.address));
            if let Some(m) = p.mapping.iter().find(|m| m.id == loc.mapping_id) {
                key.push('@');
                key.push_str(text(m.filename));
            }
            for line in &loc.line {
                key.push(';');
                if let Some(f) = p.function.iter().find(|f| f.id == line.function_id) {
                    key.push_str(text(f.name));
                }
            }
        }
    }
    let mut labels: Vec<String> = s
        .label
        .iter()
        .map(|l| format!("{}={}#{}", text(l.key), text(l.str), l.num))
        .collect();
    labels.sort();
    key.push('\n');
    key.push_str(&labels.join(","));
    key
}

fn location_index(p: &Profile) -> HashMap<u64, &Location> {
    p.location.iter().map(|l| (l.id, l)).collect()
}

/// `later - earlier`, as Go's net/http/pprof answers `/debug/pprof/heap?seconds=N`
/// (serveDeltaProfile: the earlier profile scaled by -1 and merged into the
/// later one): every value of a sample with the same stack and labels is
/// subtracted, so `alloc_*` is what was allocated in the window and `inuse_*`
/// is how much in-use memory grew (negative where it shrank). Samples whose
/// values all cancel are left out; a sample only in `earlier` (freed during
/// the window) appears with its values negated. Time is the later
/// profile's, duration the time between them.
pub fn delta(earlier: &Profile, later: &Profile) -> Profile {
    let mut out = later.clone();
    let earlier_locs = location_index(earlier);
    let mut before: HashMap<String, &Sample> = HashMap::new();
    for s in &earlier.sample {
        before.insert(sample_key(earlier, s, &earlier_locs), s);
    }
    let later_locs = location_index(later);
    let mut kept = Vec::with_capacity(later.sample.len());
    for s in &later.sample {
        let mut s = s.clone();
        if let Some(b) = before.remove(&sample_key(later, &s, &later_locs)) {
            for (v, bv) in s.value.iter_mut().zip(&b.value) {
                *v -= bv;
            }
        }
        kept.push(s);
    }
    // Gone in the window: copied over with their stacks, negated.
    let mut copier = Copier::new(&mut out);
    let mut gone: Vec<&Sample> = before.into_values().collect();
    gone.sort_by_key(|s| s.value.iter().map(|v| -v.abs()).collect::<Vec<_>>());
    for s in gone {
        let mut s = copier.copy_sample(earlier, s);
        for v in &mut s.value {
            *v = -*v;
        }
        kept.push(s);
    }
    drop(copier);
    kept.retain(|s| s.value.iter().any(|&v| v != 0));
    out.sample = kept;
    out.duration_nanos = later.time_nanos.saturating_sub(earlier.time_nanos).max(0);
    let window_s = out.duration_nanos as f64 / 1e9;
    let end_unix_s = later.time_nanos / 1_000_000_000;
    let mut said: Vec<String> = comments(later)
        .iter()
        .map(|c| delta_comment(c, window_s, end_unix_s))
        .collect();
    if said.is_empty() {
        said.push(delta_comment("", window_s, end_unix_s));
    }
    out.comment = said
        .into_iter()
        .map(|c| {
            out.string_table.push(c);
            out.string_table.len() as i64 - 1
        })
        .collect();
    out
}

/// A delta's comment: the sampler's "allocations since unix time T only"
/// (output/kheap_pprof.rs) would claim the values cover everything since the
/// sampler started; they are the change over the window.
fn delta_comment(text: &str, window_s: f64, end_unix_s: i64) -> String {
    const SINCE: &str = "allocations since unix time ";
    let window = format!(
        "the delta over the {window_s:.0}-second window ending at unix time {end_unix_s} \
         (alloc_*: allocated in the window; inuse_*: the change of in-use, negative where it shrank)"
    );
    if text.is_empty() {
        return window;
    }
    let Some(at) = text.find(SINCE) else {
        return format!("{window}; {text}");
    };
    let rest = &text[at + SINCE.len()..];
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let tail = &rest[digits..];
    format!(
        "{}{window}, from a sampler running since unix time {}{}",
        &text[..at],
        &rest[..digits],
        tail.strip_prefix(" only").unwrap_or(tail)
    )
}

/// Copies samples of another profile into `into`, re-interning their strings,
/// functions, mappings and locations under `into`'s ids.
struct Copier<'a> {
    into: &'a mut Profile,
    strings: HashMap<String, i64>,
    functions: HashMap<u64, u64>,
    mappings: HashMap<u64, u64>,
    locations: HashMap<u64, u64>,
}

impl<'a> Copier<'a> {
    fn new(into: &'a mut Profile) -> Copier<'a> {
        if into.string_table.is_empty() {
            into.string_table.push(String::new());
        }
        let strings = into
            .string_table
            .iter()
            .enumerate()
            .map(|(i, s)| (s.clone(), i as i64))
            .collect();
        Copier {
            into,
            strings,
            functions: HashMap::new(),
            mappings: HashMap::new(),
            locations: HashMap::new(),
        }
    }

    fn string(&mut self, from: &Profile, i: i64) -> i64 {
        let s = from
            .string_table
            .get(i as usize)
            .cloned()
            .unwrap_or_default();
        if let Some(&id) = self.strings.get(&s) {
            return id;
        }
        self.into.string_table.push(s.clone());
        let id = self.into.string_table.len() as i64 - 1;
        self.strings.insert(s, id);
        id
    }

    fn mapping(&mut self, from: &Profile, id: u64) -> u64 {
        if id == 0 {
            return 0;
        }
        if let Some(&new) = self.mappings.get(&id) {
            return new;
        }
        let Some(m) = from.mapping.iter().find(|m| m.id == id) else {
            return 0;
        };
        let new_id = self.into.mapping.iter().map(|m| m.id).max().unwrap_or(0) + 1;
        let m = Mapping {
            id: new_id,
            filename: self.string(from, m.filename),
            build_id: self.string(from, m.build_id),
            ..m.clone()
        };
        self.into.mapping.push(m);
        self.mappings.insert(id, new_id);
        new_id
    }

    fn function(&mut self, from: &Profile, id: u64) -> u64 {
        if let Some(&new) = self.functions.get(&id) {
            return new;
        }
        let Some(f) = from.function.iter().find(|f| f.id == id) else {
            return 0;
        };
        let new_id = self.into.function.iter().map(|f| f.id).max().unwrap_or(0) + 1;
        let f = Function {
            id: new_id,
            name: self.string(from, f.name),
            system_name: self.string(from, f.system_name),
            filename: self.string(from, f.filename),
        };
        self.into.function.push(f);
        self.functions.insert(id, new_id);
        new_id
    }

    fn location(&mut self, from: &Profile, id: u64) -> u64 {
        if let Some(&new) = self.locations.get(&id) {
            return new;
        }
        let Some(loc) = from.location.iter().find(|l| l.id == id) else {
            return 0;
        };
        let mut line = loc.line.clone();
        for l in &mut line {
            l.function_id = self.function(from, l.function_id);
        }
        let new_id = self.into.location.iter().map(|l| l.id).max().unwrap_or(0) + 1;
        let mapping_id = self.mapping(from, loc.mapping_id);
        self.into.location.push(Location {
            id: new_id,
            mapping_id,
            address: loc.address,
            line,
        });
        self.locations.insert(id, new_id);
        new_id
    }

    fn copy_sample(&mut self, from: &Profile, s: &Sample) -> Sample {
        let location_id = s
            .location_id
            .iter()
            .map(|&id| self.location(from, id))
            .collect();
        let label = s
            .label
            .iter()
            .map(|l| Label {
                key: self.string(from, l.key),
                str: if l.str == 0 {
                    0
                } else {
                    self.string(from, l.str)
                },
                num: l.num,
                num_unit: if l.num_unit == 0 {
                    0
                } else {
                    self.string(from, l.num_unit)
                },
            })
            .collect();
        Sample {
            location_id,
            value: s.value.clone(),
            label,
        }
    }
}

/// The value of a sample's string label `key`, if it has one.
fn label<'p>(p: &'p Profile, s: &Sample, key: &str) -> Option<&'p str> {
    s.label
        .iter()
        .find(|l| p.string_table.get(l.key as usize).is_some_and(|k| k == key))
        .and_then(|l| p.string_table.get(l.str as usize))
        .map(String::as_str)
}

/// Keeps only the samples whose `cache` label `wanted` accepts. Locations
/// and functions stay: pprof ignores the ones no sample uses.
pub fn filter_cache(p: &mut Profile, wanted: impl Fn(&str) -> bool) {
    let keep: Vec<bool> = p
        .sample
        .iter()
        .map(|s| label(p, s, "cache").is_some_and(&wanted))
        .collect();
    let mut it = keep.into_iter();
    p.sample.retain(|_| it.next().unwrap_or(false));
}

/// Index of the sample type named `name` (e.g. `inuse_space`).
fn value_index(p: &Profile, name: &str) -> Option<usize> {
    p.sample_type.iter().position(|t| {
        p.string_table
            .get(t.r#type as usize)
            .is_some_and(|n| n == name)
    })
}

/// What `/metrics` says about the sampled heap, from one snapshot.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct CacheEstimates {
    /// Estimated in-use bytes by cache, largest first, at most `top` caches,
    /// then `("other", the rest)` if any were folded.
    pub inuse_bytes: Vec<(String, i64)>,
    /// Estimated in-use objects, all caches.
    pub inuse_objects: i64,
}

/// In-use bytes by the `cache` label, bounded to the `top` largest caches and
/// `other`, so a node with thousands of caches cannot flood a scraper.
pub fn cache_estimates(p: &Profile, top: usize) -> CacheEstimates {
    let (Some(space), objects) = (
        value_index(p, "inuse_space"),
        value_index(p, "inuse_objects"),
    ) else {
        return CacheEstimates::default();
    };
    let mut by_cache: BTreeMap<&str, i64> = BTreeMap::new();
    let mut inuse_objects = 0i64;
    for s in &p.sample {
        let bytes = s.value.get(space).copied().unwrap_or(0);
        let cache = label(p, s, "cache").unwrap_or("unknown");
        *by_cache.entry(cache).or_default() += bytes;
        inuse_objects += objects.and_then(|i| s.value.get(i)).copied().unwrap_or(0);
    }
    // Caches sampled only for allocations since freed hold nothing: no series.
    let mut ranked: Vec<(String, i64)> = by_cache
        .into_iter()
        .filter(|&(_, b)| b != 0)
        .map(|(c, b)| (c.to_string(), b))
        .collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    if ranked.len() > top {
        let other: i64 = ranked[top..].iter().map(|(_, b)| b).sum();
        ranked.truncate(top);
        ranked.push(("other".to_string(), other));
    }
    CacheEstimates {
        inuse_bytes: ranked,
        inuse_objects,
    }
}

/// The profile's comments, e.g. the sampler's rate and since when.
pub fn comments(p: &Profile) -> Vec<&str> {
    p.comment
        .iter()
        .filter_map(|&i| p.string_table.get(i as usize))
        .map(String::as_str)
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::output::pprof::{Line, ValueType};

    /// A Go-heap-shaped profile: each entry is (stack of function names, leaf
    /// first; cache; [alloc_objects, alloc_space, inuse_objects, inuse_space]).
    pub fn heap(samples: &[(&[&str], &str, [i64; 4])], time_nanos: i64) -> Profile {
        let mut p = Profile {
            string_table: vec![String::new()],
            time_nanos,
            ..Profile::default()
        };
        let mut strings: HashMap<String, i64> = HashMap::new();
        let mut intern = |p: &mut Profile, s: &str| -> i64 {
            *strings.entry(s.to_string()).or_insert_with(|| {
                p.string_table.push(s.to_string());
                p.string_table.len() as i64 - 1
            })
        };
        for (t, u) in [
            ("alloc_objects", "count"),
            ("alloc_space", "bytes"),
            ("inuse_objects", "count"),
            ("inuse_space", "bytes"),
        ] {
            let vt = ValueType {
                r#type: intern(&mut p, t),
                unit: intern(&mut p, u),
            };
            p.sample_type.push(vt);
        }
        for (stack, cache, values) in samples {
            let mut ids = Vec::new();
            for name in *stack {
                let n = intern(&mut p, name);
                let id = match p.function.iter().find(|f| f.name == n) {
                    Some(f) => f.id,
                    None => {
                        let id = p.function.len() as u64 + 1;
                        p.function.push(Function {
                            id,
                            name: n,
                            ..Function::default()
                        });
                        p.location.push(Location {
                            id,
                            line: vec![Line {
                                function_id: id,
                                line: 0,
                            }],
                            ..Location::default()
                        });
                        id
                    }
                };
                ids.push(id);
            }
            let key = intern(&mut p, "cache");
            let str = intern(&mut p, cache);
            p.sample.push(Sample {
                location_id: ids,
                value: values.to_vec(),
                label: vec![Label {
                    key,
                    str,
                    ..Label::default()
                }],
            });
        }
        p
    }

    /// (leaf function, cache, values) of every sample, sorted.
    fn rows(p: &Profile) -> Vec<(String, String, Vec<i64>)> {
        let locs = location_index(p);
        let mut out: Vec<_> = p
            .sample
            .iter()
            .map(|s| {
                let leaf = locs
                    .get(&s.location_id[0])
                    .and_then(|l| p.function.iter().find(|f| f.id == l.line[0].function_id))
                    .map(|f| p.string_table[f.name as usize].clone())
                    .unwrap_or_default();
                (
                    leaf,
                    label(p, s, "cache").unwrap_or("").to_string(),
                    s.value.clone(),
                )
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn delta_subtracts_every_value_like_go() {
        let before = heap(
            &[
                (
                    &["user_preparse", "add_key"],
                    "kmalloc-512",
                    [100, 51200, 100, 51200],
                ),
                (&["d_alloc", "path_openat"], "dentry", [10, 1920, 10, 1920]),
                (&["gone", "syscall"], "kmalloc-64", [5, 320, 5, 320]),
            ],
            1_000,
        );
        // Different ids for the same stacks: the second snapshot interned in
        // another order.
        let after = heap(
            &[
                (&["d_alloc", "path_openat"], "dentry", [10, 1920, 10, 1920]),
                (&["new_site", "syscall"], "kmalloc-64", [3, 192, 1, 64]),
                (
                    &["user_preparse", "add_key"],
                    "kmalloc-512",
                    [300, 153600, 250, 128000],
                ),
            ],
            31_000,
        );
        let d = delta(&before, &after);
        assert_eq!(d.duration_nanos, 30_000);
        assert_eq!(d.time_nanos, 31_000);
        assert_eq!(
            rows(&d),
            vec![
                // Freed during the window: negative in-use, negative alloc (as Go).
                ("gone".into(), "kmalloc-64".into(), vec![-5, -320, -5, -320]),
                ("new_site".into(), "kmalloc-64".into(), vec![3, 192, 1, 64]),
                (
                    "user_preparse".into(),
                    "kmalloc-512".into(),
                    vec![200, 102400, 150, 76800]
                ),
            ],
            "the unchanged dentry sample cancels out"
        );
        // The copied sample's stack resolves in the new profile.
        let gone = d
            .sample
            .iter()
            .find(|s| s.value[0] == -5)
            .expect("gone sample");
        assert_eq!(gone.location_id.len(), 2);
        assert!(d.encode_to_vec().len() > 10);
    }

    /// A delta says it is the change over its window, not the in-use since
    /// the sampler started that its later snapshot's comment claims.
    #[test]
    fn a_delta_says_it_is_the_window() {
        let with_comment = |time_nanos: i64| {
            let mut p = heap(&[(&["a"], "kmalloc-512", [1, 512, 1, 512])], time_nanos);
            p.string_table.push(
                "leaktrace kernel heap profile, every slab cache: sampled; values are unbiased \
                 estimates; allocations since unix time 1796000000 only; 12 samples, 3 held"
                    .into(),
            );
            p.comment = vec![p.string_table.len() as i64 - 1];
            p
        };
        let d = delta(
            &with_comment(1_796_000_100_000_000_000),
            &with_comment(1_796_000_108_000_000_000),
        );
        assert_eq!(
            comments(&d),
            vec![
                "leaktrace kernel heap profile, every slab cache: sampled; values are unbiased \
                 estimates; the delta over the 8-second window ending at unix time 1796000108 \
                 (alloc_*: allocated in the window; inuse_*: the change of in-use, negative where \
                 it shrank), from a sampler running since unix time 1796000000; 12 samples, 3 held"
            ]
        );
        let bare = delta(&heap(&[], 0), &heap(&[], 8_000_000_000));
        assert!(
            comments(&bare)[0].starts_with("the delta over the 8-second window"),
            "{:?}",
            comments(&bare)
        );
    }

    #[test]
    fn cache_filter_keeps_only_that_cache() {
        let mut p = heap(
            &[
                (&["a"], "kmalloc-512", [1, 512, 1, 512]),
                (&["b"], "dentry", [1, 192, 1, 192]),
                (&["c"], "kmalloc-rnd-03-512", [1, 512, 1, 512]),
            ],
            0,
        );
        filter_cache(&mut p, |c| c == "kmalloc-512" || c == "kmalloc-rnd-03-512");
        let leaves: Vec<String> = rows(&p).into_iter().map(|r| r.0).collect();
        assert_eq!(leaves, vec!["a", "c"]);
        filter_cache(&mut p, |c| c == "nothing");
        assert!(p.sample.is_empty());
    }

    #[test]
    fn metrics_keep_the_top_caches_and_fold_the_rest() {
        let samples: Vec<(Vec<&str>, String, [i64; 4])> = (0..30)
            .map(|i| {
                (
                    vec!["f"],
                    format!("cache-{i:02}"),
                    [1, 1, 1, (i + 1) * 1000],
                )
            })
            .collect();
        let refs: Vec<(&[&str], &str, [i64; 4])> = samples
            .iter()
            .map(|(s, c, v)| (s.as_slice(), c.as_str(), *v))
            .collect();
        let p = heap(&refs, 0);
        let e = cache_estimates(&p, 20);
        assert_eq!(e.inuse_bytes.len(), 21);
        assert_eq!(e.inuse_bytes[0], ("cache-29".to_string(), 30_000));
        assert_eq!(e.inuse_bytes[19], ("cache-10".to_string(), 11_000));
        // cache-00..cache-09: 1000 + ... + 10000.
        assert_eq!(e.inuse_bytes[20], ("other".to_string(), 55_000));
        assert_eq!(e.inuse_objects, 30);
        let total: i64 = e.inuse_bytes.iter().map(|(_, b)| b).sum();
        assert_eq!(total, (1..=30).map(|i| i * 1000).sum::<i64>());
        // A cache whose sampled objects were all freed has no series.
        let z = cache_estimates(
            &heap(
                &[
                    (&["f"], "dead", [5, 100, 0, 0]),
                    (&["g"], "live", [1, 512, 1, 512]),
                ],
                0,
            ),
            20,
        );
        assert_eq!(z.inuse_bytes, vec![("live".to_string(), 512)]);
        // Few caches: no `other`.
        let small = cache_estimates(&heap(&refs[..3], 0), 20);
        assert_eq!(small.inuse_bytes.len(), 3);
    }
}
