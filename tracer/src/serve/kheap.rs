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

/// Caches `/metrics` names one by one; the rest are summed as `other`.
pub const METRIC_CACHES: usize = 20;
/// The 503 of a `?seconds=N` whose window the sampler restarted in.
const RESTARTED: &str = "the sampler restarted during the window (its samples start again); retry";
/// Longest cache name accepted (kernel names are far shorter).
const MAX_CACHE_NAME: usize = 64;

pub struct Kheap {
    pub continuous: Continuous,
    max_seconds: u64,
    refresh: Duration,
    pods: Mutex<PodNames>,
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
            estimates: tokio::sync::Mutex::new(None),
        }
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
        let names = match &request.cache {
            None => None,
            Some(name) => match cache_names(name.clone()).await {
                Ok(n) => Some(n),
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
                tokio::time::sleep(Duration::from_secs(n)).await;
                match self.profile().await {
                    // A new sampler's samples start again: the difference of
                    // two lives would read as a shrink of everything held.
                    Ok((life, _)) if life != first_life => return unavailable(RESTARTED),
                    Ok((_, later)) => kheap_profile::delta(&first, &later),
                    Err(why) => return unavailable(&why),
                }
            }
        };
        if let Some(names) = &names {
            kheap_profile::filter_cache(&mut profile, names);
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

/// The cache's name and the names merged into it, as the sampler may label
/// samples with any of them; a name the kernel does not have is an error with
/// suggestions.
async fn cache_names(name: String) -> Result<Vec<String>, String> {
    tokio::task::spawn_blocking(move || {
        let catalogue = Catalogue::read(Path::new("/"))
            .map_err(|e| format!("reading the slab cache catalogue: {e:#}"))?;
        let selected = caches::select(&catalogue, &name).map_err(|e| e.to_string())?;
        let mut names = vec![name, selected.cache.clone()];
        names.extend(selected.named.iter().cloned());
        names.extend(selected.aliases_included.iter().cloned());
        names.sort();
        names.dedup();
        Ok(names)
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
                ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | ':' | '.' | '(' | ')')
            })
        {
            return Err(format!(
                "cache must be a slab cache name (letters, digits, - _ : . ( ), at most {MAX_CACHE_NAME} characters)"
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
        assert!(ok(&format!("cache={}", "a".repeat(65))).is_err());
        assert!(ok("bogus=1")
            .unwrap_err()
            .contains("unknown parameter 'bogus'"));
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
