//! HTTP/1.1 on hyper: one task per connection, each bounded in time, so a slow
//! or silent client holds one connection slot and nothing else; one client
//! address holds a few slots at most, and a connection past either limit is
//! told so (503, Retry-After) instead of being dropped unanswered.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::{IpAddr, Ipv6Addr},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Result;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    body::Incoming, header, server::conn::http1, service::service_fn, Method, Request, Response,
    StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_rustls::TlsAcceptor;

use super::response::{text, Body};
use super::Shared;

/// Open connections at once, so a flood of idle sockets cannot exhaust
/// memory or fds.
pub const MAX_CONNECTIONS: usize = 128;
/// Of those, what one client address (an IPv6 /64) may hold: a peer that
/// opens connections and sends nothing locks out itself, not the Prometheus
/// scraping /metrics from elsewhere.
const MAX_PER_PEER: usize = 16;
/// Connections past a limit being answered 503 at once, each for at most
/// [`REFUSE_TIME`]; past this many too, a connection is closed unanswered.
const MAX_REFUSING: usize = 128;
/// To finish a TLS handshake, send the 503 and see the client close.
const REFUSE_TIME: Duration = Duration::from_secs(2);
/// A client must finish sending its request head (and TLS handshake) in this.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Besides the trace itself, the most a response may take to be written.
const WRITE_SLACK: Duration = Duration::from_secs(60);

/// Serves connections until dropped; `slots` ([`MAX_CONNECTIONS`] permits)
/// are held one per open connection, so the caller can wait for the answers
/// in flight when it stops.
pub async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
) -> Result<()> {
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let peers = Arc::new(Peers::default());
    // Whole connection, request to last byte: the longest trace plus attach,
    // symbolization and a slow but live reader.
    let lifetime =
        Duration::from_secs(shared.profiles.max_seconds()) + super::profile::OVERHEAD + WRITE_SLACK;
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(conn) => conn,
            // Out of fds or a reset before accept: this connection is lost, not the server.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let claimed = Peers::claim(&peers, addr.ip()).and_then(|peer| {
            slots
                .clone()
                .try_acquire_owned()
                .map(|slot| (peer, slot))
                .map_err(|_| Refusal::Full)
        });
        let (peer, slot) = match claimed {
            Ok(held) => held,
            Err(why) => {
                if let Ok(permit) = refusing.clone().try_acquire_owned() {
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        let _permit = permit;
                        let _ = tokio::time::timeout(REFUSE_TIME, refuse(stream, tls, why)).await;
                    });
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _held = (peer, slot);
            let _ = tokio::time::timeout(lifetime, async move {
                match tls {
                    None => connection(stream, false, shared).await,
                    Some(acceptor) => {
                        let Ok(Ok(tls_stream)) =
                            tokio::time::timeout(READ_TIMEOUT, acceptor.accept(stream)).await
                        else {
                            return;
                        };
                        // rustls hands over a peer certificate only once it verified
                        // it against --client-ca.
                        let verified = tls_stream.get_ref().1.peer_certificates().is_some();
                        connection(tls_stream, verified, shared).await
                    }
                }
            })
            .await;
        });
    }
}

/// Why a connection was not served.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    /// Every connection slot is held.
    Full,
    /// This client address holds its share of them.
    Peer,
}

/// Connections held per client address.
#[derive(Default)]
struct Peers(Mutex<HashMap<IpAddr, usize>>);

/// One connection of one peer; given back when dropped.
struct PeerSlot {
    peers: Arc<Peers>,
    key: IpAddr,
}

impl Peers {
    fn claim(peers: &Arc<Peers>, ip: IpAddr) -> Result<PeerSlot, Refusal> {
        let key = peer_key(ip);
        let mut held = lock(&peers.0);
        let n = held.entry(key).or_insert(0);
        if *n >= MAX_PER_PEER {
            return Err(Refusal::Peer);
        }
        *n += 1;
        Ok(PeerSlot {
            peers: peers.clone(),
            key,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut held = lock(&self.peers.0);
        if let Some(n) = held.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

/// A panic elsewhere while the map was locked leaves counts that are still
/// usable: at worst a peer keeps a slot it gave back.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The address a limit is kept for: IPv4 as it is (also when it reaches an
/// IPv6 socket mapped), IPv6 by its /64, which one host is commonly given.
fn peer_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// 503 with Retry-After, without reading the request: the connection is
/// answered rather than dropped, so a scraper records why and when to retry.
async fn refuse(stream: TcpStream, tls: Option<TlsAcceptor>, why: Refusal) {
    let body = match why {
        Refusal::Full => "every connection slot is held; retry later\n",
        Refusal::Peer => "this address holds its share of connections already; retry later\n",
    };
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\nRetry-After: {}\r\nContent-Type: text/plain; \
         charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        READ_TIMEOUT.as_secs(),
        body.len()
    );
    match tls {
        None => answer_and_close(stream, response.as_bytes()).await,
        Some(acceptor) => {
            if let Ok(tls_stream) = acceptor.accept(stream).await {
                answer_and_close(tls_stream, response.as_bytes()).await;
            }
        }
    }
}

async fn answer_and_close<S: AsyncRead + AsyncWrite + Unpin>(mut io: S, response: &[u8]) {
    if io.write_all(response).await.is_err() || io.shutdown().await.is_err() {
        return;
    }
    // Read what the client sent until it closes: a close with unread bytes
    // resets the connection, which can discard the answer before it is read.
    let mut sink = [0u8; 1024];
    while matches!(io.read(&mut sink).await, Ok(n) if n > 0) {}
}

async fn connection<S>(io: S, verified_cert: bool, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req: Request<Incoming>| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(route(&shared, req, verified_cert).await) }
    });
    let _ = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(READ_TIMEOUT)
        // One request per connection: a profile takes seconds anyway, and an idle
        // keep-alive connection would hold a slot for nothing.
        .keep_alive(false)
        .max_buf_size(16 * 1024)
        .serve_connection(TokioIo::new(io), service)
        .await;
}

async fn route(shared: &Shared, req: Request<Incoming>, verified_cert: bool) -> Response<Body> {
    // pprof's symbolz protocol (what net/http/pprof serves): a fetched profile
    // whose mappings lack function names makes pprof ask the server it came
    // from, and treats a refusal as fatal. Profiles here are already named as
    // far as leaktrace can; the rest are other processes' addresses, which
    // this server cannot name: "no symbols", so pprof goes on (and may name
    // them from local files by build id). Nothing is read from the body.
    if req.uri().path() == "/debug/pprof/symbol" {
        return match *req.method() {
            Method::GET | Method::HEAD => text(StatusCode::OK, "num_symbols: 0\n"),
            Method::POST => text(StatusCode::OK, ""),
            _ => text(StatusCode::METHOD_NOT_ALLOWED, "symbol: GET or POST\n"),
        };
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    let query = req.uri().query().unwrap_or("");
    match req.uri().path() {
        "/metrics" => {
            let body = shared.metrics.render(&shared.profiles, &shared.kheap).await;
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        "/" => text(StatusCode::OK, INDEX),
        path @ ("/debug/pprof/kmem"
        | "/debug/pprof/kmem/"
        | "/debug/pprof/kheap"
        | "/debug/pprof/kheap/"
        | "/debug/pprof/memcg"
        | "/debug/pprof/memcg/") => {
            // A HEAD would run a whole trace for a body nobody reads.
            if req.method() != Method::GET {
                return text(StatusCode::METHOD_NOT_ALLOWED, "profiles: only GET\n");
            }
            let authorization = req
                .headers()
                .get(header::AUTHORIZATION)
                .map(|v| v.as_bytes());
            if !shared.auth.allows(authorization, verified_cert) {
                shared.profiles.count_rejection("unauthorized");
                let mut resp = text(
                    StatusCode::UNAUTHORIZED,
                    "profiles need 'Authorization: Bearer <token>' (--token-file; or the token as HTTP Basic password, e.g. go tool pprof http://leaktrace:TOKEN@HOST/...) or a TLS client certificate (--client-ca)\n",
                );
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer realm=\"leaktrace\""),
                );
                return resp;
            }
            if path.starts_with("/debug/pprof/kheap") {
                shared.kheap.serve(query).await
            } else if path.starts_with("/debug/pprof/kmem") {
                shared.profiles.kmem(query).await
            } else {
                shared.profiles.memcg(query).await
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found; see /\n"),
    }
}

const INDEX: &str = "\
leaktrace serve
/metrics                                  Prometheus metrics (slab caches, meminfo, memcgs, trace cost, sampled heap)
/debug/pprof/kheap                        sampled heap profile of every slab cache since serve started, gzipped pprof, Go heap shape (needs auth)
/debug/pprof/kheap?seconds=N&cache=NAME   its delta over the next N seconds, one cache's samples (needs auth)
/debug/pprof/kmem?cache=NAME&seconds=N    deep trace of one slab cache, gzipped pprof (needs auth)
/debug/pprof/kmem?percpu=1&seconds=N      deep trace of per-CPU allocations, gzipped pprof (needs auth)
/debug/pprof/memcg?seconds=N              dying memcgs and what pins them, gzipped pprof (needs auth)
";
