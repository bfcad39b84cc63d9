//! `GET /debug/pprof/kheap`: the continuous sampler's heap profile of every
//! slab cache since serve started, answered at once, as Go's
//! `/debug/pprof/heap` is; `?seconds=N` the delta over the next N seconds (Go's
//! serveDeltaProfile); `?cache=NAME` only that cache's samples. The estimates
//! `/metrics` shows come from the same snapshots, taken at most once per
//! `--refresh`.

use std::{
    path::Path,
    sync::Mutex,
    time::{Duration, Instant},
};

use hyper::{header, Response, StatusCode};

use super::continuous::Continuous;
use super::kheap_profile::{self, CacheEstimates};
use super::response::{owned_text, Body};
use crate::kernel::pods::PodNames;
use crate::slab::caches::{self, Catalogue};
use crate::slab::kheap::{KMALLOC_LARGE, PERCPU};

/// Caches `/metrics` names one by one; the rest are summed as `other`.
pub const METRIC_CACHES: usize = 20;
/// The 503 of a `?seconds=N` whose window the sampler restarted in.
const RESTARTED: &str = "the sampler restarted during the window (its samples start again); retry";
/// The 503 of a `?seconds=N` whose window serve stopped in.
const STOPPING: &str = "serve is stopping";
/// Longest cache name accepted: kernel names are far shorter, an unnamed
/// cache's label lists up to four of them (`cache of 256 B (a|b|c|d|+5 more)`).
const MAX_CACHE_NAME: usize = 192;

pub struct Kheap {
    pub continuous: Continuous,
    max_seconds: u64,
    refresh: Duration,
    pods: Mutex<PodNames>,
    /// Set when serve stops: deltas waiting out their window answer 503.
    stopping: tokio::sync::watch::Sender<bool>,
    /// The latest estimate for /metrics and when it was taken.
    estimates: tokio::sync::Mutex<Option<(Instant, Result<Estimates, String>)>>,
}

/// What /metrics shows from one snapshot.
#[derive(Debug, Clone, Default)]
pub struct Estimates {
    pub caches: CacheEstimates,
    /// Counts the sampler states in its comment ("N samples, N held, N dropped"):
    /// allocations sampled since it started, samples still live (what the in-use
    /// estimates stand on), samples its full table could not keep.
    pub samples: Option<u64>,
    pub held: Option<u64>,
    pub dropped: Option<u64>,
}

#[derive(Debug, PartialEq, Eq)]
struct KheapRequest {
    cache: Option<String>,
    /// `None`: the instant profile; `Some(n)`: the delta over the next n seconds.
    seconds: Option<u64>,
}

impl Kheap {
    pub fn new(
        continuous: Continuous,
        max_seconds: u64,
        refresh: Duration,
        pods: PodNames,
    ) -> Kheap {
        Kheap {
            continuous,
            max_seconds,
            refresh,
            pods: Mutex::new(pods),
            stopping: tokio::sync::watch::Sender::new(false),
            estimates: tokio::sync::Mutex::new(None),
        }
    }

    /// serve is stopping: a `?seconds=N` in its window answers 503 now
    /// rather than be cut off unanswered.
    pub fn stop(&self) {
        self.stopping.send_replace(true);
    }

    /// `GET /debug/pprof/kheap?QUERY`, already authenticated.
    pub async fn serve(&self, query: &str) -> Response<Body> {
        let request = match parse_query(query, self.max_seconds) {
            Ok(r) => r,
            Err(why) => return owned_text(StatusCode::BAD_REQUEST, format!("{why}\n")),
        };
        // A cache name is checked against the catalogue before anything is
        // asked of the sampler: a typo is a 400 with the CLI's did-you-mean,
        // not an empty profile. Merged caches answer to every alias.
        let filter = match &request.cache {
            None => None,
            Some(name) => match read_cache_filter(name.clone()).await {
                Ok(f) => Some(f),
                Err(why) => return owned_text(StatusCode::BAD_REQUEST, format!("{why}\n")),
            },
        };
        if !self.continuous.enabled() {
            return unavailable(
                "continuous sampling is off (serve --no-continuous); \
                 /debug/pprof/kmem?cache=NAME&seconds=N traces on demand",
            );
        }
        let (first_life, first) = match self.profile().await {
            Ok(p) => p,
            Err(why) => return unavailable(&why),
        };
        let mut profile = match request.seconds {
            None => first,
            Some(n) => {
                let mut stopping = self.stopping.subscribe();
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(n)) => {}
                    _ = stopping.wait_for(|&stop| stop) => return unavailable(STOPPING),
                }
                match self.profile().await {
                    // A new sampler's samples start again: the difference of
                    // two lives would read as a shrink of everything held.
                    Ok((life, _)) if life != first_life => return unavailable(RESTARTED),
                    Ok((_, later)) => kheap_profile::delta(&first, &later),
                    Err(why) => return unavailable(&why),
                }
            }
        };
        if let Some(filter) = &filter {
            kheap_profile::filter_cache(&mut profile, |label| filter.keeps(label));
        }
        if !profile.string_table.iter().any(|s| s == "pod") {
            let mut pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
            super::labels::add_pod_labels(&mut profile, &mut pods);
        }
        match crate::output::pprof::encode(&profile) {
            Ok(gz) => super::response::profile(
                gz,
                if request.seconds.is_some() {
                    "attachment; filename=\"kheap-delta\""
                } else {
                    "attachment; filename=\"kheap\""
                },
            ),
            Err(e) => owned_text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("encoding the heap profile: {e:#}\n"),
            ),
        }
    }

    /// One decoded snapshot and the sampler's life that took it, or why
    /// there is none.
    async fn profile(&self) -> Result<(u64, crate::output::pprof::Profile), String> {
        let snap = self.continuous.snapshot().await?;
        let profile = kheap_profile::decode(&snap.gz)
            .map_err(|e| format!("the sampler's snapshot: {e:#}"))?;
        Ok((snap.life, profile))
    }

    /// The estimates of the latest snapshot, taken at most once per
    /// `--refresh` however often /metrics is scraped. `None` with sampling off.
    pub async fn estimates(&self) -> Option<Result<Estimates, String>> {
        if !self.continuous.enabled() {
            return None;
        }
        let mut cached = self.estimates.lock().await;
        if let Some((at, e)) = cached.as_ref() {
            if at.elapsed() < self.refresh {
                return Some(e.clone());
            }
        }
        let fresh = self.profile().await.map(|(_, p)| {
            let comments = kheap_profile::comments(&p);
            Estimates {
                caches: kheap_profile::cache_estimates(&p, METRIC_CACHES),
                samples: count_before(&comments, "samples"),
                held: count_before(&comments, "held"),
                dropped: count_before(&comments, "dropped"),
            }
        });
        *cached = Some((Instant::now(), fresh.clone()));
        Some(fresh)
    }
}

fn unavailable(why: &str) -> Response<Body> {
    let mut resp = owned_text(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("no heap profile: {why}\n"),
    );
    resp.headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from(5u32));
    resp
}

/// What `?cache=` keeps: any `cache` label the sampler gives
/// (`CacheNames::name` in slab/kheap.rs) is accepted, a slab cache by any of
/// its names.
#[derive(Debug, PartialEq, Eq)]
enum CacheFilter {
    /// Samples labelled with one of these: a slab cache, its kernel name and
    /// the names merged into it; or one of the sampler's own labels
    /// (`percpu`, `kmalloc-large (pages)`, `cache 0x…`, `unknown`).
    Names(Vec<String>),
    /// Samples of an unnamed cache of this object size: `cache of N B
    /// (candidates)`. Matched by the size alone, as the candidates are listed
    /// by their activity when the sampler started, which a restart may reorder.
    Size(u64),
}

impl CacheFilter {
    fn keeps(&self, label: &str) -> bool {
        match self {
            CacheFilter::Names(names) => names.iter().any(|n| n == label),
            CacheFilter::Size(size) => size_label(label) == Some(*size),
        }
    }
}

/// The object size of an unnamed cache's label, `cache of N B` alone or
/// followed by ` (candidates)`.
fn size_label(label: &str) -> Option<u64> {
    let rest = label.strip_prefix("cache of ")?;
    let (size, rest) = rest.split_once(" B")?;
    if size.is_empty() || !size.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let candidates_ok = rest.is_empty() || (rest.starts_with(" (") && rest.ends_with(')'));
    candidates_ok.then(|| size.parse().ok()).flatten()
}

/// The sampler's labels that name no slab cache: per-CPU memory, kmalloc's
/// page-backed sizes, a cache created after the sampler started (known by
/// the hash of its name only), a source without a name.
fn sampler_label(name: &str) -> bool {
    name == PERCPU
        || name == KMALLOC_LARGE
        || name == "unknown"
        || name.strip_prefix("cache 0x").is_some_and(|hex| {
            !hex.is_empty() && hex.len() <= 16 && hex.bytes().all(|b| b.is_ascii_hexdigit())
        })
}

/// The filter for `?cache=NAME`; a name no sample can carry is an error with
/// the CLI's suggestions.
fn cache_filter(catalogue: &Catalogue, name: &str) -> Result<CacheFilter, String> {
    if sampler_label(name) {
        return Ok(CacheFilter::Names(vec![name.to_string()]));
    }
    if let Some(size) = size_label(name) {
        return Ok(CacheFilter::Size(size));
    }
    let selected = caches::select(catalogue, name).map_err(|e| e.to_string())?;
    let mut names = vec![name.to_string(), selected.cache.clone()];
    names.extend(selected.named.iter().cloned());
    names.extend(selected.aliases_included.iter().cloned());
    names.sort();
    names.dedup();
    Ok(CacheFilter::Names(names))
}

/// [`cache_filter`] against the running kernel's catalogue.
async fn read_cache_filter(name: String) -> Result<CacheFilter, String> {
    tokio::task::spawn_blocking(move || {
        let catalogue = Catalogue::read(Path::new("/"))
            .map_err(|e| format!("reading the slab cache catalogue: {e:#}"))?;
        cache_filter(&catalogue, &name)
    })
    .await
    .unwrap_or_else(|e| Err(format!("cache lookup failed: {e}")))
}

/// The number just before `word` in any comment ("1234 samples"), if any.
fn count_before(comments: &[&str], word: &str) -> Option<u64> {
    comments.iter().find_map(|c| {
        let tokens: Vec<&str> = c
            .split(|ch: char| ch.is_whitespace() || matches!(ch, ',' | ';' | '(' | ')' | ':'))
            .filter(|t| !t.is_empty())
            .collect();
        tokens
            .windows(2)
            .find(|w| w[1] == word)
            .and_then(|w| w[0].parse().ok())
    })
}

/// `cache=NAME` and `seconds=N`, both optional, nothing else: unknown
/// parameters are refused rather than ignored, so a client never believes an
/// option took effect.
fn parse_query(query: &str, max_seconds: u64) -> Result<KheapRequest, String> {
    let mut cache = None;
    let mut seconds = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = super::profile::percent_decode(value)
            .ok_or_else(|| format!("parameter {key}: malformed percent-encoding"))?;
        match key {
            "cache" if cache.is_none() => cache = Some(value),
            "seconds" if seconds.is_none() => seconds = Some(value),
            "cache" | "seconds" => return Err(format!("parameter {key} given twice")),
            _ => {
                return Err(format!(
                    "unknown parameter '{}'; use cache=NAME and/or seconds=N (the delta over the next N seconds)",
                    key.chars().take(32).collect::<String>()
                ))
            }
        }
    }
    let seconds = match seconds {
        None => None,
        Some(text) => match text.parse::<u64>() {
            Ok(n) if (1..=max_seconds).contains(&n) => Some(n),
            _ => {
                return Err(format!(
                    "seconds must be a whole number from 1 to {max_seconds} (--max-seconds)"
                ))
            }
        },
    };
    if let Some(c) = &cache {
        if c.is_empty()
            || c.len() > MAX_CACHE_NAME
            || !c.chars().all(|ch| {
                ch.is_ascii_alphanumeric()
                    || matches!(ch, '-' | '_' | ':' | '.' | '(' | ')' | ' ' | '|' | '+')
            })
        {
            return Err(format!(
                "cache must be a slab cache name or a cache label of the profile (letters, digits, \
                 spaces, - _ : . ( ) | +, at most {MAX_CACHE_NAME} characters)"
            ));
        }
    }
    Ok(KheapRequest { cache, seconds })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn query_is_checked_before_the_sampler_is_asked() {
        let ok = |q: &str| parse_query(q, 60);
        assert_eq!(
            ok(""),
            Ok(KheapRequest {
                cache: None,
                seconds: None
            })
        );
        assert_eq!(
            ok("seconds=30&cache=kmalloc%2D512"),
            Ok(KheapRequest {
                cache: Some("kmalloc-512".into()),
                seconds: Some(30)
            })
        );
        assert_eq!(ok("cache=dentry").map(|r| r.seconds), Ok(None));
        for bad in [
            "seconds=0",
            "seconds=61",
            "seconds=-1",
            "seconds=1e3",
            "seconds=",
            "seconds=5&seconds=5",
            "cache=",
            "cache=../../etc/passwd",
            "cache=%2Fetc",
            "cache=a&cache=b",
            "cache=%zz",
            "gc=1",
            "debug=1",
        ] {
            assert!(ok(bad).is_err(), "{bad:?} accepted");
        }
        assert!(ok(&format!("cache={}", "a".repeat(193))).is_err());
        assert!(ok("bogus=1")
            .unwrap_err()
            .contains("unknown parameter 'bogus'"));
    }

    /// Every label the sampler's `CacheNames` gives a sample is accepted by
    /// `?cache=` and keeps that sample; names no sample can carry are still
    /// refused with the did-you-mean.
    #[test]
    fn every_cache_label_of_the_profile_is_a_filter() {
        use crate::slab::kheap::{name_hash, CacheNames};
        use tracer_common::slab::{
            Config, SOURCE_CACHE_ALLOC, SOURCE_KMALLOC, SOURCE_PAGE, SOURCE_PERCPU,
        };
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/proc/merged");
        let catalogue = Catalogue::read(&root).expect("catalogue fixture");
        let slabinfo = crate::kernel::slabinfo::read(&root).unwrap_or_default();
        let names = CacheNames::new(&catalogue, &slabinfo);
        let cfg = Config::zeroed();
        let labels = [
            names.name(&cfg, SOURCE_PERCPU, 4096, 0, 0),
            names.name(&cfg, SOURCE_KMALLOC, 16384, 0, 0),
            names.name(&cfg, SOURCE_KMALLOC, 512, 0, 0),
            names.name(&cfg, SOURCE_CACHE_ALLOC, 256, 0, 0),
            names.name(&cfg, SOURCE_CACHE_ALLOC, 12345, 0, 0),
            names.name(&cfg, SOURCE_CACHE_ALLOC, 192, 0, name_hash("dentry")),
            names.name(&cfg, SOURCE_CACHE_ALLOC, 64, 0, 0xdead_beef),
            names.name(&cfg, SOURCE_PAGE, 4096, 0, 0),
        ];
        assert_eq!(labels[0], "percpu");
        assert_eq!(labels[1], "kmalloc-large (pages)");
        assert!(labels[3].starts_with("cache of 256 B ("), "{}", labels[3]);
        for label in &labels {
            // As a client sends it: spaces as '+', '+' and '|' escaped.
            let query = format!(
                "cache={}",
                label
                    .replace('+', "%2B")
                    .replace(' ', "+")
                    .replace('|', "%7C")
            );
            let request = parse_query(&query, 60).unwrap_or_else(|e| panic!("{query}: {e}"));
            let asked = request.cache.expect("cache");
            assert_eq!(&asked, label);
            let filter =
                cache_filter(&catalogue, &asked).unwrap_or_else(|e| panic!("{label}: {e}"));
            assert!(filter.keeps(label), "{label}: {filter:?}");
            for other in labels.iter().filter(|o| *o != label) {
                assert!(!filter.keeps(other), "{label} keeps {other}");
            }
        }
        // An unnamed cache is one size, whatever its candidates are listed as.
        let size = cache_filter(&catalogue, "cache of 256 B").expect("size alone");
        assert!(size.keeps("cache of 256 B (filp|kmalloc-256|+5 more)"));
        assert!(!size.keeps("cache of 2560 B (none at start)"));
        let unknown = cache_filter(&catalogue, "kmalloc-51").expect_err("typo");
        assert!(unknown.contains("did you mean: kmalloc-512"), "{unknown}");
        for never in [
            "percpu2",
            "cache of 25x B",
            "cache of  B",
            "cache of 256 B trailing",
            "cache 0x",
            "cache 0xzz",
            "kmalloc-large",
        ] {
            assert!(cache_filter(&catalogue, never).is_err(), "{never} accepted");
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    /// A stand-in sampler running `script` (see continuous.rs's tests), and
    /// `answer`, the file each life writes to fd 3 per `snapshot`: a real
    /// heap profile, length-prefixed.
    fn fake_sampler(dir: &Path, script: &str) -> (Kheap, PathBuf) {
        let profile =
            kheap_profile::tests::heap(&[(&["leak"], "kmalloc-512", [1, 512, 1, 512])], 1);
        let gz = crate::output::pprof::encode(&profile).expect("encode");
        let mut framed = (gz.len() as u64).to_le_bytes().to_vec();
        framed.extend_from_slice(&gz);
        let answer = dir.join("answer");
        std::fs::write(&answer, framed).expect("write answer");
        let script = script.replace("ANSWER", &answer.display().to_string());
        let continuous =
            Continuous::start_command(PathBuf::from("/bin/sh"), vec!["-c".into(), script], 65536);
        let kheap = Kheap::new(continuous, 60, Duration::from_secs(1), PodNames::new(dir));
        (kheap, answer)
    }

    async fn body(resp: Response<Body>) -> (StatusCode, String) {
        use http_body_util::BodyExt;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kheap-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    /// The sampler dies after the window's first snapshot and a new one
    /// answers the second: its profile starts again, so the difference would
    /// claim every held byte was freed. 503, and never a delta of two lives.
    #[test]
    fn a_delta_across_a_sampler_restart_is_refused() {
        let dir = scratch("restart");
        runtime().block_on(async {
            let (kheap, _) = fake_sampler(
                &dir,
                &format!(
                    "if [ -e {m} ]; then while read l; do cat ANSWER >&3; done; \
                     else touch {m}; read l; cat ANSWER >&3; exit 9; fi",
                    m = dir.join("lived").display()
                ),
            );
            let (status, text) = body(kheap.serve("seconds=3").await).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
            assert!(
                text.contains("the sampler restarted during the window"),
                "{text}"
            );
            // The same sampler on both ends: a delta.
            let (status, text) = body(kheap.serve("seconds=1").await).await;
            assert_eq!(status, StatusCode::OK, "{text}");
        });
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sampler_counts_are_read_from_its_comment() {
        // The sampler's comment (output/kheap_pprof.rs).
        let c = [
            "leaktrace kernel heap profile, every slab cache: sampled, one allocation per 524288 bytes \
             allocated on average, each weighted 1/(1-e^(-size/524288)); values are unbiased estimates; \
             allocations since unix time 1796000000 only; 1234 samples, 321 held, 5 dropped (table full: \
             in-use may be low by up to 2621440 bytes)",
        ];
        assert_eq!(count_before(&c, "samples"), Some(1234));
        assert_eq!(count_before(&c, "held"), Some(321));
        assert_eq!(count_before(&c, "dropped"), Some(5));
        assert_eq!(count_before(&["nothing here"], "samples"), None);
    }
}
