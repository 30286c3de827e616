//! Server-Sent Events framing shared by every stream the proxy serves: a
//! request's response stream ([`super::flow`]) and the notification streams
//! ([`super::listen`]). One place decides the event shape, the keep-alive
//! comment and the response headers.

use crate::web::{self, Body};
use ::http::{HeaderValue, Response, StatusCode};
use bytes::Bytes;
use serde_json::Value;
use std::time::Duration;

/// Interval of keep-alive comments on an open stream.
pub const KEEPALIVE: Duration = Duration::from_secs(15);
/// The keep-alive comment clients ignore.
pub const KEEPALIVE_COMMENT: Bytes = Bytes::from_static(b": keep-alive\n\n");

/// One `message` event carrying `msg`.
pub fn event(msg: &Value) -> Bytes {
    let data = serde_json::to_string(msg).expect("Value serializes");
    Bytes::from(format!("event: message\ndata: {data}\n\n"))
}

/// A timer ticking every [`KEEPALIVE`], first one [`KEEPALIVE`] from now.
pub fn keepalive() -> tokio::time::Interval {
    tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE)
}

/// A `200 text/event-stream` response over `body`, uncached and unbuffered
/// by intermediaries.
pub fn response(body: Body) -> Response<Body> {
    let mut r = web::response(StatusCode::OK, "text/event-stream", body);
    r.headers_mut().insert(
        ::http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    r.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}
