//! The plain responses every endpoint of `serve` answers with: one body
//! type, and text with its content type.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{header, Response, StatusCode};

pub type Body = Full<Bytes>;

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

/// A gzipped pprof profile, offered for download as `filename` (what
/// `go tool pprof` and curl save it as).
pub fn profile(gz: Vec<u8>, filename: &'static str) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(gz)));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(
        header::CONTENT_DISPOSITION,
        header::HeaderValue::from_static(filename),
    );
    resp
}
