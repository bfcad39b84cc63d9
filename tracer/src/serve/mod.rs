//! `leaktrace serve`: one long-running process per node for a fleet.
//!
//! Always on: a sampled heap profile of every slab cache, kept by a child
//! sampler ([`continuous`]) and fetched instantly at `/debug/pprof/kheap`
//! ([`kheap`]) the way Go's `/debug/pprof/heap` is (`--no-continuous` turns
//! it off); and BPF-free Prometheus metrics built from /proc/slabinfo,
//! /proc/meminfo and the memory cgroup hierarchy ([`metrics`]), read at most
//! once per `--refresh` however often they are scraped.
//!
//! On demand: `GET /debug/pprof/kmem?cache=NAME&seconds=N` runs one deep trace
//! ([`profile`]) and answers with the gzipped pprof profile of `--pprof`, so
//! `go tool pprof`, Parca and Pyroscope fetch kernel-heap profiles the way they
//! fetch Go heap profiles. Those endpoints attach programs and expose kernel
//! addresses and command lines, so they need a bearer token or a verified TLS
//! client certificate ([`auth`]); metrics stay readable without either.

mod auth;
mod continuous;
mod http;
mod kheap;
mod kheap_profile;
mod labels;
mod metrics;
mod profile;
mod response;
mod tls;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result};

/// What `leaktrace serve` is asked for (main.rs fills it from the command line).
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// File holding the token profile requests must send.
    pub token_file: Option<PathBuf>,
    /// Longest deep trace a request may ask for, in seconds.
    pub max_seconds: u64,
    /// Least time between the end of one deep trace and the start of the next.
    pub min_interval: Duration,
    /// The always-on reads run at most once per this period.
    pub refresh: Duration,
    /// HTTPS with this certificate chain and key (PEM), both or neither.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// TLS client certificates signed by this CA authenticate like the token.
    pub client_ca: Option<PathBuf>,
    /// Where kubelet's pod and container logs are, to name pods.
    pub pods_root: PathBuf,
    /// Keep the heap sampler running for /debug/pprof/kheap (not `--no-continuous`).
    pub continuous: bool,
    /// Its mean sampling interval in bytes allocated.
    pub sample_bytes: u64,
}

/// What every connection shares.
pub struct Shared {
    pub auth: auth::Auth,
    pub metrics: metrics::Collector,
    pub profiles: profile::Profiles,
    pub kheap: kheap::Kheap,
}

/// `leaktrace serve`, until SIGINT or SIGTERM. The blocking reads of the
/// always-on metrics go to tokio's blocking pool, so the one runtime thread
/// stays free for connections. Errors: the token file or TLS material
/// cannot be read, the address cannot be bound.
pub async fn run(args: ServeOptions) -> Result<()> {
    let auth = auth::Auth::new(args.token_file.as_deref(), args.client_ca.is_some())?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(tls::acceptor(cert, key, args.client_ca.as_deref())?),
        _ => None,
    };
    let pods = crate::kernel::pods::PodNames::new(&args.pods_root);
    let exe = std::env::current_exe().context("locating the leaktrace binary for deep traces")?;
    // Started here, on the runtime's one thread (the main thread), so the
    // sampler's parent-death signal is tied to serve's life.
    let continuous = if args.continuous {
        continuous::Continuous::start(exe.clone(), args.sample_bytes)
    } else {
        continuous::Continuous::off(args.sample_bytes)
    };
    let kheap = kheap::Kheap::new(
        continuous,
        args.max_seconds,
        args.refresh,
        crate::kernel::pods::PodNames::new(&args.pods_root),
    );
    let shared = Arc::new(Shared {
        auth,
        metrics: metrics::Collector::new(PathBuf::from("/"), args.refresh),
        profiles: profile::Profiles::new(args.max_seconds, args.min_interval, exe, pods),
        kheap,
    });
    // Before "listening" is said: a signal from then on is a clean stop.
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    // A hangup is a clean stop, as it is for the CLI's traces (event_loop.rs).
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("--listen: binding {}", args.listen))?;
    let local = listener
        .local_addr()
        .context("reading the listening address")?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    eprintln!(
        "leaktrace serve: listening on {scheme}://{local} (/metrics; /debug/pprof/kheap and /debug/pprof/kmem {}; heap sampler {})",
        shared.auth.describe(),
        if args.continuous {
            format!("on, 1 sample per {} bytes", args.sample_bytes)
        } else {
            "off (--no-continuous)".to_string()
        }
    );
    let slots = Arc::new(tokio::sync::Semaphore::new(http::MAX_CONNECTIONS));
    let server = http::accept_loop(listener, tls, shared.clone(), slots.clone());
    let signal = tokio::select! {
        result = server => return result,
        _ = sigint.recv() => "SIGINT",
        _ = sigterm.recv() => "SIGTERM",
        _ = sighup.recv() => "SIGHUP",
    };
    eprintln!("leaktrace serve: {signal}: stopping");
    // No new connections (the listener is gone); a heap delta waiting out its
    // window answers 503 at once, and every open connection gets a moment to
    // be written before the process ends.
    shared.kheap.stop();
    let all = http::MAX_CONNECTIONS as u32;
    if tokio::time::timeout(STOP_GRACE, slots.acquire_many(all))
        .await
        .is_err()
    {
        eprintln!(
            "leaktrace serve: connections still open after {} s are closed unanswered",
            STOP_GRACE.as_secs()
        );
    }
    Ok(())
}

/// How long a stopping serve waits for the answers in flight.
const STOP_GRACE: Duration = Duration::from_secs(3);
