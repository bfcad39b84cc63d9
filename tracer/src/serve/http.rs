//! HTTP/1.1 on hyper: one task per connection, each bounded in time, so a slow
//! or silent client holds one connection slot and nothing else.

use std::{convert::Infallible, sync::Arc, time::Duration};

use anyhow::Result;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    body::Incoming, header, server::conn::http1, service::service_fn, Method, Request, Response,
    StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    sync::Semaphore,
};
use tokio_rustls::TlsAcceptor;

use super::Shared;

/// Open connections at once; beyond it new ones are closed at accept, so a
/// flood of idle sockets cannot exhaust memory or fds.
const MAX_CONNECTIONS: usize = 128;
/// A client must finish sending its request head (and TLS handshake) in this.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Besides the trace itself, the most a response may take to be written.
const WRITE_SLACK: Duration = Duration::from_secs(60);

pub type Body = Full<Bytes>;

pub async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
) -> Result<()> {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // Whole connection, request to last byte: the longest trace plus attach,
    // symbolization and a slow but live reader.
    let lifetime =
        Duration::from_secs(shared.profiles.max_seconds()) + super::profile::OVERHEAD + WRITE_SLACK;
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            // Out of fds or a reset before accept: this connection is lost, not the server.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _slot = slot;
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
            let body = shared.metrics.render(&shared.profiles).await;
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
            if path.starts_with("/debug/pprof/kmem") {
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
/metrics                                  Prometheus metrics (slab caches, meminfo, memcgs, trace cost)
/debug/pprof/kmem?cache=NAME&seconds=N    deep trace of one slab cache, gzipped pprof (needs auth)
/debug/pprof/memcg?seconds=N              dying memcgs and what pins them, gzipped pprof (needs auth)
";

pub fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    owned_text(status, body.to_string())
}

pub fn owned_text(status: StatusCode, body: String) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
