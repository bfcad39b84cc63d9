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
