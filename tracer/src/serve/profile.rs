//! On-demand deep traces for `/debug/pprof/kmem` and `/debug/pprof/memcg`.
//!
//! Each trace is the ordinary `leaktrace --cache NAME --duration Ns --pprof FILE`
//! (or `leaktrace memcg --duration Ns --pprof FILE`) run as a child process: the pipeline, its attach/detach and its profile are
//! exactly the ones the CLI ships, and everything a trace costs (BPF maps,
//! kallsyms, symbolizer caches) is returned to the kernel when the child exits,
//! so the always-on process stays small. Nothing from the request reaches the
//! child but a cache name the catalogue knows and a bounded number.

use std::{
    os::fd::{AsRawFd, RawFd},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use hyper::{header, Response, StatusCode};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use super::response::{owned_text, Body};
use crate::kernel::pods::PodNames;
use crate::slab::caches::{self, Catalogue};

/// Attach (tracefs, BTF, kallsyms) and the final symbolization on top of the
/// traced seconds; a child still running after that is killed.
pub const OVERHEAD: Duration = Duration::from_secs(90);
/// `seconds` when the request gives none: pprof's own default for CPU profiles.
const DEFAULT_SECONDS: u64 = 30;
/// Longest cache name accepted (kernel names are far shorter).
const MAX_CACHE_NAME: usize = 64;
/// Lines of a failed trace's stderr returned to the (authenticated) client.
const ERROR_LINES: usize = 12;

pub struct Profiles {
    max_seconds: u64,
    min_interval: Duration,
    exe: PathBuf,
    pods: Mutex<PodNames>,
    slot: Mutex<Slot>,
    stats: Stats,
}

#[derive(Default)]
struct Slot {
    running: Option<Running>,
    /// When the last trace ended; the next may start --min-interval later.
    last_end: Option<Instant>,
}

struct Running {
    started: Instant,
    seconds: u64,
    child_pid: Option<u32>,
    attached_at: Option<Instant>,
}

#[derive(Default)]
struct Stats {
    ok: AtomicU64,
    failed: AtomicU64,
    unauthorized: AtomicU64,
    invalid: AtomicU64,
    busy: AtomicU64,
    too_soon: AtomicU64,
    /// Milliseconds with programs attached, over all traces.
    attached_ms: AtomicU64,
}

/// What the metrics show about deep traces.
pub struct TraceStatus {
    pub active: bool,
    pub attached: bool,
    pub ok: u64,
    pub failed: u64,
    pub rejected: [(&'static str, u64); 4],
    pub attached_seconds: f64,
    pub child_pid: Option<u32>,
}

impl Profiles {
    pub fn new(max_seconds: u64, min_interval: Duration, exe: PathBuf, pods: PodNames) -> Profiles {
        Profiles {
            max_seconds,
            min_interval,
            exe,
            pods: Mutex::new(pods),
            slot: Mutex::new(Slot::default()),
            stats: Stats::default(),
        }
    }

    pub fn max_seconds(&self) -> u64 {
        self.max_seconds
    }

    pub fn count_rejection(&self, reason: &str) {
        let counter = match reason {
            "unauthorized" => &self.stats.unauthorized,
            "invalid" => &self.stats.invalid,
            "busy" => &self.stats.busy,
            _ => &self.stats.too_soon,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn status(&self) -> TraceStatus {
        let slot = lock(&self.slot);
        let running = slot.running.as_ref();
        let now_attached_ms = running
            .and_then(|r| r.attached_at)
            .map_or(0, |at| at.elapsed().as_millis() as u64);
        let s = &self.stats;
        TraceStatus {
            active: running.is_some(),
            attached: running.is_some_and(|r| r.attached_at.is_some()),
            ok: s.ok.load(Ordering::Relaxed),
            failed: s.failed.load(Ordering::Relaxed),
            rejected: [
                ("unauthorized", s.unauthorized.load(Ordering::Relaxed)),
                ("invalid", s.invalid.load(Ordering::Relaxed)),
                ("busy", s.busy.load(Ordering::Relaxed)),
                ("too_soon", s.too_soon.load(Ordering::Relaxed)),
            ],
            attached_seconds: (s.attached_ms.load(Ordering::Relaxed) + now_attached_ms) as f64
                / 1000.0,
            child_pid: running.and_then(|r| r.child_pid),
        }
    }

    /// `GET /debug/pprof/kmem?QUERY`, already authenticated.
    pub async fn kmem(&self, query: &str) -> Response<Body> {
        let request = match parse_query(query, self.max_seconds) {
            Ok(r) => r,
            Err(why) => {
                self.count_rejection("invalid");
                return owned_text(StatusCode::BAD_REQUEST, format!("{why}\n"));
            }
        };
        if request.percpu {
            return self.deep_trace(Kind::Percpu, request.seconds).await;
        }
        // The catalogue names what exists now (modules come and go); its
        // did-you-mean is the CLI's.
        let selected = tokio::task::spawn_blocking(move || {
            let catalogue = Catalogue::read(Path::new("/"))
                .map_err(|e| format!("reading the slab cache catalogue: {e:#}"))?;
            caches::select(&catalogue, &request.cache)
                .map(|s| s.cache)
                .map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| Err(format!("cache lookup failed: {e}")));
        let cache = match selected {
            Ok(c) => c,
            Err(why) => {
                self.count_rejection("invalid");
                return owned_text(StatusCode::BAD_REQUEST, format!("{why}\n"));
            }
        };
        self.deep_trace(Kind::Kmem(cache), request.seconds).await
    }

    /// `GET /debug/pprof/memcg?seconds=N`, already authenticated: the dying
    /// memcgs and what pins them, from `leaktrace memcg --duration Ns --pprof`.
    pub async fn memcg(&self, query: &str) -> Response<Body> {
        match parse_memcg_query(query, self.max_seconds) {
            Ok(seconds) => self.deep_trace(Kind::Memcg, seconds).await,
            Err(why) => {
                self.count_rejection("invalid");
                owned_text(StatusCode::BAD_REQUEST, format!("{why}\n"))
            }
        }
    }

    /// Claims the one trace slot, runs the trace, answers with its profile.
    async fn deep_trace(&self, kind: Kind, seconds: u64) -> Response<Body> {
        let guard = match self.claim(seconds) {
            Ok(g) => g,
            Err((reason, retry_after)) => {
                self.count_rejection(reason);
                let mut resp = owned_text(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "{}; retry in {retry_after} s\n",
                        if reason == "busy" {
                            "a deep trace is already running (one at a time per node)"
                        } else {
                            "the last deep trace ended less than --min-interval ago"
                        }
                    ),
                );
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, header::HeaderValue::from(retry_after));
                return resp;
            }
        };
        match self.trace(&kind, seconds, &guard).await {
            Ok(profile) => {
                self.stats.ok.fetch_add(1, Ordering::Relaxed);
                super::response::profile(
                    profile,
                    match kind {
                        Kind::Kmem(_) => "attachment; filename=\"kmem.pb.gz\"",
                        Kind::Percpu => "attachment; filename=\"percpu.pb.gz\"",
                        Kind::Memcg => "attachment; filename=\"memcg.pb.gz\"",
                    },
                )
            }
            Err(why) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                owned_text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("deep trace of {} failed: {why:#}\n", kind.name()),
                )
            }
        }
    }

    /// The one trace slot, or why not and for how many seconds.
    fn claim(&self, seconds: u64) -> Result<SlotGuard<'_>, (&'static str, u64)> {
        let mut slot = lock(&self.slot);
        if let Some(r) = &slot.running {
            let left = (r.started + Duration::from_secs(r.seconds) + self.min_interval)
                .saturating_duration_since(Instant::now());
            return Err(("busy", left.as_secs().max(1)));
        }
        if let Some(end) = slot.last_end {
            let ready = end + self.min_interval;
            let now = Instant::now();
            if now < ready {
                return Err(("too_soon", (ready - now).as_secs_f64().ceil() as u64));
            }
        }
        slot.running = Some(Running {
            started: Instant::now(),
            seconds,
            child_pid: None,
            attached_at: None,
        });
        Ok(SlotGuard { profiles: self })
    }

    async fn trace(
        &self,
        kind: &Kind,
        seconds: u64,
        _guard: &SlotGuard<'_>,
    ) -> anyhow::Result<Vec<u8>> {
        use anyhow::Context;
        // The profile comes back through a pipe, never a file: nothing of it
        // (kernel addresses, command lines) is left on disk however serve ends.
        let (profile_rx, profile_tx) =
            std::io::pipe().context("creating the pipe the profile comes back through")?;
        let mut command = tokio::process::Command::new(&self.exe);
        match kind {
            Kind::Kmem(cache) => command.arg("--cache").arg(cache),
            Kind::Percpu => command.arg("--percpu"),
            // Every pinning stack, not the text view's few per memcg.
            Kind::Memcg => command.args(["memcg", "--stacks", "1000"]),
        };
        let cache = kind.name();
        command
            .arg("--duration")
            .arg(format!("{seconds}s"))
            .arg("--pprof")
            .arg(format!("/dev/fd/{PROFILE_FD}"))
            .stdin(Stdio::null())
            // The final text report is not wanted; the profile holds everything tracked.
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let serve_pid = std::process::id();
        let profile_fd = profile_tx.as_raw_fd();
        // SAFETY: runs in the forked child before exec and makes only
        // async-signal-safe calls (prctl, getppid, dup2, fcntl) on integers.
        unsafe {
            command.pre_exec(move || bind_to_serve(serve_pid, profile_fd));
        }
        // Spawned from serve's one runtime thread, its main thread: the
        // parent-death signal follows the thread that forks, and this one
        // lives as long as serve.
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", self.exe.display()))?;
        // Only the child writes: the profile's end is its exit.
        drop(profile_tx);
        // A client that hangs up drops this future: the child dies with it (the
        // kernel detaches its programs when its fds close) and is reaped.
        let mut child = Reaped(Some(child));
        let child = child.0.as_mut().context("trace child")?;
        if let Some(r) = lock(&self.slot).running.as_mut() {
            r.child_pid = child.id();
        }
        let stderr = child.stderr.take().context("trace stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let mut tail: Vec<String> = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds) + OVERHEAD;
        let read_stderr = async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("attached to ") {
                    if let Some(r) = lock(&self.slot).running.as_mut() {
                        r.attached_at = Some(Instant::now());
                    }
                }
                eprintln!("leaktrace serve: trace {cache}: {line}");
                tail.push(line);
                if tail.len() > ERROR_LINES {
                    tail.remove(0);
                }
            }
            Ok(())
        };
        let read_profile = async {
            let mut profile = Vec::new();
            tokio::net::unix::pipe::Receiver::from_owned_fd(profile_rx.into())
                .context("reading the trace's profile")?
                .take(MAX_PROFILE + 1)
                .read_to_end(&mut profile)
                .await
                .context("reading the trace's profile")?;
            anyhow::ensure!(
                profile.len() as u64 <= MAX_PROFILE,
                "the trace's profile is larger than {} MiB",
                MAX_PROFILE >> 20
            );
            Ok(profile)
        };
        let finished = async {
            let ((), profile) = tokio::try_join!(read_stderr, read_profile)?;
            let status = child.wait().await.context("waiting for the trace")?;
            anyhow::Ok((status, profile))
        };
        let (status, profile) = tokio::time::timeout_at(deadline, finished)
            .await
            .with_context(|| {
                format!(
                    "the trace did not finish within {seconds} s + {} s",
                    OVERHEAD.as_secs()
                )
            })??;
        if !status.success() {
            anyhow::bail!("{status}:\n{}", tail.join("\n"));
        }
        anyhow::ensure!(!profile.is_empty(), "the trace wrote no profile");
        let labelled = {
            let mut pods = lock(&self.pods);
            crate::serve::labels::label_profile(&profile, &mut pods)
        };
        Ok(labelled.unwrap_or(profile))
    }
}

/// The child's descriptor the profile is written to (`--pprof /dev/fd/3`).
const PROFILE_FD: RawFd = 3;
/// A profile of every stack of a busy cache is megabytes; past this, the
/// trace is killed rather than held in serve's memory.
pub(super) const MAX_PROFILE: u64 = 256 << 20;

/// In the trace child, between fork and exec: the child dies with serve,
/// however serve ends (SIGKILL, the OOM killer), so its programs detach then
/// and not at the end of its `--duration`; and the profile pipe becomes fd 3.
pub(super) fn bind_to_serve(serve_pid: u32, profile_fd: RawFd) -> std::io::Result<()> {
    let failed = std::io::Error::last_os_error;
    // SAFETY: plain syscalls on integers, async-signal-safe.
    unsafe {
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
        {
            return Err(failed());
        }
        // serve may have died between fork and prctl: then no signal comes,
        // and the child was already given to another parent.
        if u32::try_from(libc::getppid()).ok() != Some(serve_pid) {
            return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
        }
        // dup2 onto itself would keep FD_CLOEXEC; the pipe is created with it.
        let moved = if profile_fd == PROFILE_FD {
            libc::fcntl(PROFILE_FD, libc::F_SETFD, 0)
        } else {
            libc::dup2(profile_fd, PROFILE_FD)
        };
        if moved < 0 {
            return Err(failed());
        }
    }
    Ok(())
}

/// What a deep trace runs: the slab tracer on one cache or on per-CPU
/// allocations, or the memcg tool.
enum Kind {
    Kmem(String),
    Percpu,
    Memcg,
}

impl Kind {
    fn name(&self) -> &str {
        match self {
            Kind::Kmem(cache) => cache,
            Kind::Percpu => "percpu",
            Kind::Memcg => "memcgs",
        }
    }
}

/// Kills and reaps a trace child whose request was dropped. tokio's
/// kill_on_drop only kills: the zombie would stay until tokio next happens to
/// reap orphans, i.e. until the next trace.
struct Reaped(Option<tokio::process::Child>);

impl Drop for Reaped {
    fn drop(&mut self) {
        let Some(mut child) = self.0.take() else {
            return;
        };
        // Exited already (the normal end): nothing to kill or reap.
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = child.start_kill();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = child.wait().await;
            });
        }
    }
}

/// Frees the trace slot however the request ends (done, failed, client gone).
struct SlotGuard<'a> {
    profiles: &'a Profiles,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        let mut slot = lock(&self.profiles.slot);
        if let Some(r) = slot.running.take() {
            if let Some(at) = r.attached_at {
                self.profiles
                    .stats
                    .attached_ms
                    .fetch_add(at.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
        }
        slot.last_end = Some(Instant::now());
    }
}

/// A poisoned lock only means another request panicked mid-update; the slot's
/// fields are still consistent enough to go on serving.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, PartialEq, Eq)]
struct KmemRequest {
    /// Empty with `percpu`.
    cache: String,
    /// `percpu=1`: per-CPU allocations (`leaktrace --percpu`) instead of a cache.
    percpu: bool,
    seconds: u64,
}

/// `cache=NAME&seconds=N` or `percpu=1&seconds=N`, nothing else: unknown
/// parameters are refused rather than ignored, so a client never believes an
/// option took effect.
fn parse_query(query: &str, max_seconds: u64) -> Result<KmemRequest, String> {
    let mut cache = None;
    let mut percpu = None;
    let mut seconds = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(value)
            .ok_or_else(|| format!("parameter {key}: malformed percent-encoding"))?;
        match key {
            "cache" if cache.is_none() => cache = Some(value),
            "percpu" if percpu.is_none() => percpu = Some(value),
            "seconds" if seconds.is_none() => seconds = Some(value),
            "cache" | "percpu" | "seconds" => return Err(format!("parameter {key} given twice")),
            _ => {
                return Err(format!(
                    "unknown parameter '{}'; use cache=NAME (or percpu=1) and seconds=N",
                    key.chars().take(32).collect::<String>()
                ))
            }
        }
    }
    let percpu = match (percpu.as_deref(), &cache) {
        (None, _) => false,
        (Some("1"), None) => true,
        (Some("1"), Some(_)) => {
            return Err("percpu=1 traces per-CPU allocations, not a cache: drop cache=".into())
        }
        (Some(_), _) => return Err("percpu must be 1".into()),
    };
    let seconds = parse_seconds(seconds, max_seconds)?;
    if percpu {
        return Ok(KmemRequest {
            cache: String::new(),
            percpu,
            seconds,
        });
    }
    let cache = cache.ok_or(
        "missing cache=NAME (e.g. cache=kmalloc-512; `leaktrace caches` lists them) or percpu=1",
    )?;
    if cache.is_empty()
        || cache.len() > MAX_CACHE_NAME
        || !cache
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | ':' | '.' | '(' | ')'))
        || cache.starts_with('-')
        || cache.contains("..")
    {
        return Err(format!(
            "cache must be a slab cache name (letters, digits, - _ : . ( ), at most {MAX_CACHE_NAME} characters)"
        ));
    }
    Ok(KmemRequest {
        cache,
        percpu,
        seconds,
    })
}

/// `seconds=N`'s value, within 1..=`max_seconds`; the default when absent.
fn parse_seconds(seconds: Option<String>, max_seconds: u64) -> Result<u64, String> {
    match seconds {
        None => Ok(DEFAULT_SECONDS.min(max_seconds)),
        Some(text) => match text.parse::<u64>() {
            Ok(n) if (1..=max_seconds).contains(&n) => Ok(n),
            _ => Err(format!(
                "seconds must be a whole number from 1 to {max_seconds} (--max-seconds)"
            )),
        },
    }
}

/// `seconds=N` or nothing; anything else is refused, as for kmem.
fn parse_memcg_query(query: &str, max_seconds: u64) -> Result<u64, String> {
    let mut seconds = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "seconds" if seconds.is_none() => seconds = Some(value),
            "seconds" => return Err("parameter seconds given twice".into()),
            _ => {
                return Err(format!(
                    "unknown parameter '{}'; use seconds=N",
                    key.chars().take(32).collect::<String>()
                ))
            }
        }
    }
    match seconds {
        None => Ok(DEFAULT_SECONDS.min(max_seconds)),
        Some(text) => match text.parse::<u64>() {
            Ok(n) if (1..=max_seconds).contains(&n) => Ok(n),
            _ => Err(format!(
                "seconds must be a whole number from 1 to {max_seconds} (--max-seconds)"
            )),
        },
    }
}

pub(super) fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_is_checked_before_anything_attaches() {
        let ok = |q: &str| parse_query(q, 60);
        assert_eq!(
            ok("cache=kmalloc-512&seconds=5"),
            Ok(KmemRequest {
                cache: "kmalloc-512".into(),
                percpu: false,
                seconds: 5
            })
        );
        assert_eq!(
            ok("percpu=1&seconds=5"),
            Ok(KmemRequest {
                cache: String::new(),
                percpu: true,
                seconds: 5
            })
        );
        assert_eq!(ok("cache=kmalloc-512").map(|r| r.seconds), Ok(30));
        assert_eq!(parse_query("cache=dentry", 10).map(|r| r.seconds), Ok(10));
        assert_eq!(
            ok("seconds=5&cache=kmalloc%2D512").map(|r| r.cache),
            Ok("kmalloc-512".into())
        );
        for bad in [
            "",
            "seconds=5",
            "cache=kmalloc-512&seconds=61",
            "cache=kmalloc-512&seconds=0",
            "cache=kmalloc-512&seconds=-1",
            "cache=kmalloc-512&seconds=99999999999999999999999",
            "cache=kmalloc-512&seconds=1e3",
            "cache=../../etc/passwd",
            "cache=%2Fetc%2Fpasswd",
            "cache=a;rm%20-rf",
            "cache=$(reboot)",
            "cache=--help",
            "cache=x&cache=y",
            "cache=kmalloc-512&path=/tmp/x",
            "cache=%zz",
            "percpu=1&cache=kmalloc-512",
            "percpu=yes",
            "percpu=1&percpu=1",
            "percpu=1&seconds=61",
        ] {
            assert!(ok(bad).is_err(), "{bad:?} accepted");
        }
        let long = format!("cache={}", "a".repeat(65));
        assert!(ok(&long).is_err());
    }
}
