//! Small HTTP helpers shared by the lease API, the proxy and the health
//! endpoints: one boxed body type, bounded body reading, JSON and streaming
//! responses.
//!
//! Bodies are always read with a byte limit so no peer can make us buffer
//! without bound.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, Limited, StreamBody};
use hyper::body::Frame;
use std::convert::Infallible;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

/// The response body type used everywhere.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body exceeds the {limit}-byte limit")]
    TooLarge { limit: usize },
    #[error("reading the request body failed: {0}")]
    Read(String),
}

/// A request body that [`read_body`] can read: hyper's `Incoming`, or a
/// body already in memory.
pub trait ReadableBody:
    http_body::Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
{
}

impl<B> ReadableBody for B
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
}

/// Reads a whole body, refusing more than `limit` bytes.
pub async fn read_body<B: ReadableBody>(body: B, limit: usize) -> Result<Bytes, BodyError> {
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge { limit }),
        Err(e) => Err(BodyError::Read(e.to_string())),
    }
}

/// A complete body.
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed_unsync()
}

/// An empty body.
pub fn empty() -> Body {
    full(Bytes::new())
}

/// A body fed by a channel; the sender learns the peer left when `send` fails.
pub fn channel_body(capacity: usize) -> (mpsc::Sender<Bytes>, Body) {
    let (tx, rx) = mpsc::channel::<Bytes>(capacity);
    let stream = ReceiverStream::new(rx).map(|b| Ok::<_, Infallible>(Frame::data(b)));
    (tx, StreamBody::new(stream).boxed_unsync())
}

/// A response with `status`, a content type and a body.
pub fn response(status: StatusCode, content_type: &'static str, body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// A JSON response.
pub fn json(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    response(
        status,
        "application/json",
        full(serde_json::to_vec(v).expect("Value serializes")),
    )
}

/// A plain-text response.
pub fn text(status: StatusCode, s: impl Into<String>) -> Response<Body> {
    response(status, "text/plain; charset=utf-8", full(s.into()))
}
