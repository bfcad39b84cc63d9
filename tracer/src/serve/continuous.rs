//! The continuous heap sampler `serve` keeps running: one child
//! `leaktrace --all-caches --sample-bytes N --pprof-snapshots`, bound to serve
//! (it dies with serve however serve ends) and restarted with backoff when it
//! dies. Each `snapshot` line on its stdin makes it write one gzipped heap
//! profile to fd 3, preceded by the profile's length as 8 bytes little-endian.
//!
//! The sampler is a child rather than a thread for the reasons the deep traces
//! are ([`super::profile`]): its BPF maps and symbolizer caches belong to a
//! process the kernel cleans up, and a crash there is a restart, not an outage
//! of /metrics. One task owns the child; requests reach it through a channel,
//! so snapshots are taken one at a time however many clients ask.

use std::{
    os::fd::AsRawFd,
    path::PathBuf,
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, ensure, Context, Result};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    sync::{mpsc, oneshot},
};

use super::profile::{bind_to_serve, MAX_PROFILE};

/// A snapshot is a walk of the sampler's live table and a symbolization of
/// the stacks not seen before: well under a second; a sampler that has not
/// answered after this is stuck and is restarted.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(20);
/// Restart backoff: doubles from the first to the last while the sampler keeps
/// dying young, so a sampler that cannot start costs a start a minute.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const LAST_BACKOFF: Duration = Duration::from_secs(60);
/// A sampler that ran this long had a healthy run: the backoff starts over.
const HEALTHY_RUN: Duration = Duration::from_secs(120);
/// Snapshot requests waiting for the sampler at once; more get 503.
const QUEUE: usize = 16;

type Reply = oneshot::Sender<Result<Snapshot, String>>;

/// One gzipped heap profile and which life of the sampler took it: two
/// snapshots of different lives sample from different starts, so their
/// difference is no delta (`?seconds=N` refuses it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Counts the sampler's starts from 1; a restart is a new life.
    pub life: u64,
    pub gz: Vec<u8>,
}

/// The sampler's state, for `/metrics` and for the reason of a 503.
#[derive(Debug, Clone, Default)]
pub struct SamplerStatus {
    /// Since when the running sampler was started; `None` while it is down.
    pub running_since: Option<SystemTime>,
    pub pid: Option<u32>,
    /// Times it died (or was killed as stuck) and was started again.
    pub restarts: u64,
    pub last_error: Option<String>,
    pub snapshots_ok: u64,
    pub snapshots_failed: u64,
}

/// The continuous sampler as serve's endpoints see it.
pub struct Continuous {
    /// `None` with `--no-continuous`.
    requests: Option<mpsc::Sender<Reply>>,
    sample_bytes: u64,
    status: Arc<Mutex<SamplerStatus>>,
}

impl Continuous {
    /// Sampling off (`--no-continuous`): every request is answered 503.
    pub fn off(sample_bytes: u64) -> Continuous {
        Continuous {
            requests: None,
            sample_bytes,
            status: Arc::default(),
        }
    }

    /// Starts `exe --all-caches --sample-bytes N --pprof-snapshots` and keeps it
    /// running. Must be called on serve's runtime thread, the main thread: the
    /// parent-death signal follows the thread that forks.
    pub fn start(exe: PathBuf, sample_bytes: u64) -> Continuous {
        Self::start_command(exe, sampler_args(sample_bytes), sample_bytes)
    }

    pub(super) fn start_command(exe: PathBuf, args: Vec<String>, sample_bytes: u64) -> Continuous {
        let (tx, rx) = mpsc::channel(QUEUE);
        let status: Arc<Mutex<SamplerStatus>> = Arc::default();
        tokio::spawn(supervise(exe, args, rx, status.clone()));
        Continuous {
            requests: Some(tx),
            sample_bytes,
            status,
        }
    }

    pub fn enabled(&self) -> bool {
        self.requests.is_some()
    }

    pub fn sample_bytes(&self) -> u64 {
        self.sample_bytes
    }

    pub fn status(&self) -> SamplerStatus {
        lock(&self.status).clone()
    }

    /// One gzipped heap profile from the sampler, or why there is none (for a
    /// 503: sampling off, the sampler down or restarting, or stuck).
    pub async fn snapshot(&self) -> Result<Snapshot, String> {
        let Some(requests) = &self.requests else {
            return Err("continuous sampling is off (serve --no-continuous); \
                        /debug/pprof/kmem?cache=NAME&seconds=N traces on demand"
                .into());
        };
        let (tx, rx) = oneshot::channel();
        requests
            .try_send(tx)
            .map_err(|_| "too many heap profile requests are waiting; retry".to_string())?;
        rx.await
            .unwrap_or_else(|_| Err("the sampler's supervisor has stopped".into()))
    }
}

/// The sampler's command line.
fn sampler_args(sample_bytes: u64) -> Vec<String> {
    vec![
        "--all-caches".into(),
        "--sample-bytes".into(),
        sample_bytes.to_string(),
        "--pprof-snapshots".into(),
        "--ringbuf-mib".into(),
        crate::slab::kheap_source::ring_mib(sample_bytes).to_string(),
    ]
}

/// Runs the sampler until serve ends: start, serve snapshots, and on its death
/// record why, answer requests with that reason while backing off, start again.
async fn supervise(
    exe: PathBuf,
    args: Vec<String>,
    mut requests: mpsc::Receiver<Reply>,
    status: Arc<Mutex<SamplerStatus>>,
) {
    let mut backoff = FIRST_BACKOFF;
    let mut life = 0;
    loop {
        let started = Instant::now();
        life += 1;
        let why = match run(&exe, &args, life, &mut requests, &status).await {
            // The request channel closed: serve is shutting down.
            Ok(()) => return,
            Err(e) => format!("{e:#}"),
        };
        eprintln!("leaktrace serve: heap sampler: {why}");
        {
            let mut st = lock(&status);
            st.running_since = None;
            st.pid = None;
            st.restarts += 1;
            st.last_error = Some(why.clone());
        }
        if started.elapsed() >= HEALTHY_RUN {
            backoff = FIRST_BACKOFF;
        }
        let until = tokio::time::Instant::now() + backoff;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => break,
                request = requests.recv() => match request {
                    None => return,
                    Some(reply) => {
                        let left = until.saturating_duration_since(tokio::time::Instant::now());
                        let _ = reply.send(Err(format!(
                            "the heap sampler is down ({why}); restarting in {} s",
                            left.as_secs() + 1
                        )));
                    }
                },
            }
        }
        backoff = (backoff * 2).min(LAST_BACKOFF);
    }
}

/// One life of the sampler. `Ok` when serve is shutting down; otherwise why it
/// ended (it is killed and reaped before this returns).
async fn run(
    exe: &PathBuf,
    args: &[String],
    life: u64,
    requests: &mut mpsc::Receiver<Reply>,
    status: &Arc<Mutex<SamplerStatus>>,
) -> Result<()> {
    let (profile_rx, profile_tx) =
        std::io::pipe().context("creating the pipe snapshots come back through")?;
    let mut command = tokio::process::Command::new(exe);
    command
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let serve_pid = std::process::id();
    let profile_fd = profile_tx.as_raw_fd();
    // SAFETY: runs in the forked child before exec and makes only
    // async-signal-safe calls (prctl, getppid, dup2, fcntl) on integers.
    unsafe {
        command.pre_exec(move || bind_to_serve(serve_pid, profile_fd));
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    drop(profile_tx);
    {
        let mut st = lock(status);
        st.running_since = Some(SystemTime::now());
        st.pid = child.id();
    }
    let mut stdin = child.stdin.take().context("sampler stdin")?;
    let stderr = child.stderr.take().context("sampler stderr")?;
    let mut profiles = tokio::net::unix::pipe::Receiver::from_owned_fd(profile_rx.into())
        .context("reading the sampler's snapshots")?;
    // Its stderr is logged as it comes; its last error line explains a
    // death (its startup banner, also on stderr, explains nothing).
    let last_error: Arc<Mutex<Option<String>>> = Arc::default();
    let log = {
        let last_error = last_error.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("leaktrace serve: heap sampler: {line}");
                if is_error_line(&line) {
                    *lock(&last_error) = Some(line.trim().to_string());
                }
            }
        })
    };
    let ended = loop {
        tokio::select! {
            exit = child.wait() => {
                // Let the last stderr lines arrive before they are quoted.
                let _ = tokio::time::timeout(Duration::from_secs(1), log).await;
                let said = lock(&last_error).take();
                break match (exit, said) {
                    (Ok(code), Some(said)) => Err(anyhow::anyhow!("exited ({code}): {said}")),
                    (Ok(code), None) => Err(anyhow::anyhow!("exited ({code})")),
                    (Err(e), _) => Err(anyhow::anyhow!("waiting for it: {e}")),
                };
            }
            request = requests.recv() => {
                let Some(reply) = request else { break Ok(()) };
                let taken = tokio::time::timeout(
                    SNAPSHOT_TIMEOUT,
                    take_snapshot(&mut stdin, &mut profiles),
                )
                .await
                .unwrap_or_else(|_| {
                    Err(anyhow::anyhow!(
                        "no snapshot within {} s",
                        SNAPSHOT_TIMEOUT.as_secs()
                    ))
                });
                match taken {
                    Ok(profile) => {
                        lock(status).snapshots_ok += 1;
                        let _ = reply.send(Ok(Snapshot { life, gz: profile }));
                    }
                    Err(e) => {
                        lock(status).snapshots_failed += 1;
                        let why = format!("snapshot failed: {e:#}");
                        let _ = reply.send(Err(why.clone()));
                        // The stream may be mid-profile: only a new sampler
                        // is in step with us again.
                        break Err(anyhow::anyhow!(why));
                    }
                }
            }
        }
    };
    let _ = child.start_kill();
    let _ = child.wait().await;
    ended
}

/// A line of the sampler's stderr that says why it failed: leaktrace's own
/// `leaktrace: error: …` (main.rs) or a panic's message.
fn is_error_line(line: &str) -> bool {
    let lower = line.to_ascii_lowercase();
    lower.contains("error") || lower.contains("panicked")
}

/// Asks for one profile and reads it: 8 bytes of length (little-endian), then
/// that many bytes of gzipped profile.
async fn take_snapshot(
    stdin: &mut tokio::process::ChildStdin,
    profiles: &mut tokio::net::unix::pipe::Receiver,
) -> Result<Vec<u8>> {
    stdin
        .write_all(b"snapshot\n")
        .await
        .context("asking for a snapshot")?;
    stdin.flush().await.context("asking for a snapshot")?;
    let mut len = [0u8; 8];
    profiles
        .read_exact(&mut len)
        .await
        .context("reading the snapshot's length")?;
    let len = u64::from_le_bytes(len);
    ensure!(
        len <= MAX_PROFILE,
        "the snapshot is {len} bytes, more than the {} MiB allowed",
        MAX_PROFILE >> 20
    );
    if len == 0 {
        bail!("the sampler sent an empty snapshot");
    }
    let mut profile = vec![0u8; len as usize];
    profiles
        .read_exact(&mut profile)
        .await
        .context("reading the snapshot")?;
    Ok(profile)
}

/// A poisoned lock only means a panic mid-update of plain counters.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in sampler: a shell that answers each `snapshot` line with a
    /// length-prefixed payload on fd 3, as the real one does.
    fn fake(script: &str) -> Continuous {
        Continuous::start_command(
            PathBuf::from("/bin/sh"),
            vec!["-c".into(), script.into()],
            65536,
        )
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    // 5 bytes, "hello", after an 8-byte little-endian length.
    const ANSWER: &str =
        r#"while read line; do printf '\005\000\000\000\000\000\000\000hello' >&3; done"#;

    #[test]
    fn snapshots_come_back_length_prefixed() {
        runtime().block_on(async {
            let c = fake(ANSWER);
            for _ in 0..3 {
                assert_eq!(
                    c.snapshot().await,
                    Ok(Snapshot {
                        life: 1,
                        gz: b"hello".to_vec()
                    })
                );
            }
            let st = c.status();
            assert_eq!(st.snapshots_ok, 3);
            assert!(st.running_since.is_some() && st.pid.is_some());
            assert_eq!(st.restarts, 0);
        });
    }

    #[test]
    fn a_dead_sampler_is_reported_and_restarted() {
        runtime().block_on(async {
            // Dies at once with a message, then (second life) answers.
            let marker = std::env::temp_dir().join(format!("kheap-fake-{}", std::process::id()));
            let _ = std::fs::remove_file(&marker);
            let script = format!(
                "if [ -e {m} ]; then {ANSWER}; else touch {m}; echo 'leaktrace: error: cannot attach' >&2; exit 3; fi",
                m = marker.display()
            );
            let c = fake(&script);
            tokio::time::sleep(Duration::from_millis(300)).await;
            let st = c.status();
            assert_eq!(st.restarts, 1);
            let err = st.last_error.unwrap_or_default();
            assert!(err.contains("cannot attach"), "{err}");
            // While backing off, the reason is the answer.
            let refused = c.snapshot().await.expect_err("down");
            assert!(refused.contains("cannot attach"), "{refused}");
            tokio::time::sleep(FIRST_BACKOFF + Duration::from_millis(300)).await;
            // Its second life: snapshots say so, so no delta spans the two.
            assert_eq!(
                c.snapshot().await,
                Ok(Snapshot {
                    life: 2,
                    gz: b"hello".to_vec()
                })
            );
            let _ = std::fs::remove_file(&marker);
        });
    }

    /// A death is told by its exit status and the last error line, not by
    /// the startup banner before it (what a 503 and serve's log quote).
    #[test]
    fn a_death_is_told_by_its_status_and_last_error_line() {
        runtime().block_on(async {
            let banner = "echo 'leaktrace: sampling every slab cache' >&2; \
                          echo '  kmalloc: raw_tp' >&2; \
                          echo 'leaktrace: attached to all caches; Ctrl-C to stop' >&2";
            let c = fake(&format!(
                "{banner}; echo 'leaktrace: error: ring buffer: lost' >&2; echo '' >&2; exit 3"
            ));
            tokio::time::sleep(Duration::from_millis(500)).await;
            let err = c.status().last_error.unwrap_or_default();
            assert_eq!(
                err,
                "exited (exit status: 3): leaktrace: error: ring buffer: lost"
            );
            let killed = fake(&format!("{banner}; kill -9 $$"));
            tokio::time::sleep(Duration::from_millis(500)).await;
            let err = killed.status().last_error.unwrap_or_default();
            assert_eq!(err, "exited (signal: 9 (SIGKILL))");
            let refused = killed.snapshot().await.expect_err("down");
            assert!(!refused.contains("Ctrl-C"), "{refused}");
        });
    }

    #[test]
    fn a_garbled_stream_restarts_the_sampler() {
        runtime().block_on(async {
            // A length far beyond the bound.
            let c =
                fake(r#"while read line; do printf '\377\377\377\377\377\377\377\377' >&3; done"#);
            let err = c.snapshot().await.expect_err("refused");
            assert!(err.contains("MiB allowed"), "{err}");
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!(c.status().restarts, 1);
        });
    }

    #[test]
    fn off_means_503_with_the_reason() {
        runtime().block_on(async {
            let c = Continuous::off(524288);
            assert!(!c.enabled());
            let err = c.snapshot().await.expect_err("off");
            assert!(err.contains("--no-continuous"), "{err}");
        });
    }
}
