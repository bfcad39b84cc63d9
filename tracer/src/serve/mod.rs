//! `leaktrace serve`: one long-running process per node for a fleet.
//!
//! Always on and BPF-free: Prometheus metrics built from /proc/slabinfo,
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
mod http;
mod metrics;
mod profile;
mod tls;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use clap::Args;

#[derive(Debug, Args)]
#[command(after_help = SERVE_AFTER_HELP)]
pub struct ServeArgs {
    /// Address to listen on (IP:PORT). Loopback by default: exposing profiles to
    /// the network is a decision, e.g. 0.0.0.0:9464 in the DaemonSet.
    #[arg(long, default_value = "127.0.0.1:9464", value_name = "ADDR", value_parser = crate::cli::parse_listen_addr)]
    pub listen: SocketAddr,

    /// File holding the bearer token that /debug/pprof/* requests must send
    /// (`Authorization: Bearer TOKEN`), e.g. a mounted Kubernetes Secret. Without it
    /// and without --client-ca every profile request is refused with 401.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// Longest deep trace a request may ask for, in seconds (1 to 3600).
    #[arg(long, default_value_t = 60, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub max_seconds: u64,

    /// Least time between the end of one deep trace and the start of the next, so a
    /// profiler scraping every 10 s cannot turn on-demand tracing into always-on.
    #[arg(long, default_value = "60s", value_name = "DURATION", value_parser = parse_min_interval)]
    pub min_interval: Duration,

    /// The always-on reads (/proc/slabinfo walks partial slabs with interrupts off,
    /// memcg counts walk the cgroup tree) run at most once per this period; scrapes
    /// in between get the cached values (1s to 1h).
    #[arg(long, default_value = "15s", value_name = "DURATION", value_parser = parse_refresh)]
    pub refresh: Duration,

    /// Serve HTTPS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// Private key of --tls-cert (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Accept TLS client certificates signed by this CA (PEM); a verified client
    /// certificate authenticates like the token. Needs --tls-cert.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,

    /// Where kubelet's /var/log/pods and /var/log/containers are found, to name
    /// pods and containers from cgroup paths ("/" on a node; a fixture tree in tests).
    #[arg(long, default_value = "/", value_name = "DIR")]
    pub pods_root: PathBuf,
}

const SERVE_AFTER_HELP: &str = "\
Endpoints:
  /metrics                          Prometheus metrics, no authentication
  /debug/pprof/kmem?cache=NAME&seconds=N
                                    attach, trace NAME for N seconds, detach; gzipped pprof
                                    (token or client certificate required)
Examples:
  leaktrace serve --token-file /etc/leaktrace/token
  curl -H \"Authorization: Bearer $(cat token)\" -o kmem.pb.gz \\
      'http://127.0.0.1:9464/debug/pprof/kmem?cache=kmalloc-512&seconds=30'
  go tool pprof -top kmem.pb.gz";

fn parse_min_interval(text: &str) -> Result<Duration, String> {
    crate::cli::parse_duration_in(text, Duration::from_secs(1), Duration::from_secs(86400))
}

fn parse_refresh(text: &str) -> Result<Duration, String> {
    crate::cli::parse_duration_in(text, Duration::from_secs(1), Duration::from_secs(3600))
}

/// What every connection shares.
pub struct Shared {
    pub auth: auth::Auth,
    pub metrics: metrics::Collector,
    pub profiles: profile::Profiles,
}

pub fn run(args: ServeArgs) -> Result<()> {
    // One thread: serve is idle almost always, and the blocking reads of the
    // always-on metrics go to tokio's blocking pool, not this thread.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: ServeArgs) -> Result<()> {
    let auth = auth::Auth::new(args.token_file.as_deref(), args.client_ca.is_some())?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(tls::acceptor(cert, key, args.client_ca.as_deref())?),
        _ => None,
    };
    let pods = crate::k8s::PodNames::new(&args.pods_root);
    let shared = Arc::new(Shared {
        auth,
        metrics: metrics::Collector::new(PathBuf::from("/"), args.refresh),
        profiles: profile::Profiles::new(
            args.max_seconds,
            args.min_interval,
            std::env::current_exe().context("locating the leaktrace binary for deep traces")?,
            pods,
        ),
    });
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("--listen: binding {}", args.listen))?;
    let local = listener
        .local_addr()
        .context("reading the listening address")?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    eprintln!(
        "leaktrace serve: listening on {scheme}://{local} (/metrics; /debug/pprof/kmem {})",
        shared.auth.describe()
    );
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("installing the SIGINT handler")?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let server = http::accept_loop(listener, tls, shared);
    tokio::select! {
        result = server => result,
        _ = sigint.recv() => Ok(()),
        _ = sigterm.recv() => Ok(()),
    }
}
