//! Small HTTP helpers shared by the lease API, the proxy and the health
//! endpoints: one boxed body type, bounded body reading, JSON and streaming
//! responses, the accept loop and the hyper connection driver.
//!
//! Bodies are always read with a byte limit and a deadline
//! ([`BODY_READ_TIMEOUT`]) so no peer can make us buffer without bound or
//! hold a request open by trickling it; request heads are bounded in size
//! and time by the driver ([`HEADER_READ_TIMEOUT`], which hyper also applies
//! while a kept-alive connection waits for its next request, so it bounds
//! idle connections too); open connections are capped by [`conn_limit`].

pub mod conn_limit;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, Limited, StreamBody};
use hyper::body::Frame;
use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

/// The response body type used everywhere.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body exceeds the {limit}-byte limit")]
    TooLarge { limit: usize },
    #[error("reading the request body failed: {0}")]
    Read(String),
    #[error("the request body did not arrive within {0:?}")]
    Timeout(Duration),
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

/// Reads a whole body, refusing more than `limit` bytes or taking longer
/// than [`BODY_READ_TIMEOUT`].
pub async fn read_body<B: ReadableBody>(body: B, limit: usize) -> Result<Bytes, BodyError> {
    let read = tokio::time::timeout(BODY_READ_TIMEOUT, Limited::new(body, limit).collect());
    match read.await {
        Err(_) => Err(BodyError::Timeout(BODY_READ_TIMEOUT)),
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(BodyError::TooLarge { limit })
        }
        Ok(Err(e)) => Err(BodyError::Read(e.to_string())),
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

/// Longest wait for a complete request head on a hyper connection (the
/// proxy, the health endpoints, the lease API's fallback path), counted
/// from connecting or from the previous answer: it closes slow heads and
/// idle kept-alive connections alike.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for a whole request body once its head arrived.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Open connections at most on the health/metrics listener, and from one
/// address (the scraper and the kubelet's probes need a handful).
pub const HEALTH_MAX_CONNECTIONS: usize = 256;
/// See [`HEALTH_MAX_CONNECTIONS`].
pub const HEALTH_MAX_CONNECTIONS_PER_PEER: usize = 64;
/// The smallest head limit hyper accepts.
pub const MIN_HEADER_BYTES: usize = 8192;
/// Pause after a failed `accept` (EMFILE and friends), so the loop backs
/// off instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A listener [`accept_until`] takes connections from.
pub trait Listener {
    /// What one accepted connection is.
    type Accepted;
    /// Waits for the next connection.
    fn accept_one(&self) -> impl Future<Output = std::io::Result<Self::Accepted>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Accepted = (tokio::net::TcpStream, std::net::SocketAddr);
    fn accept_one(&self) -> impl Future<Output = std::io::Result<Self::Accepted>> + Send {
        self.accept()
    }
}

impl Listener for tokio::net::UnixListener {
    type Accepted = (tokio::net::UnixStream, tokio::net::unix::SocketAddr);
    fn accept_one(&self) -> impl Future<Output = std::io::Result<Self::Accepted>> + Send {
        self.accept()
    }
}

/// Hands every connection `listener` accepts to `serve` until `shutdown`;
/// a failed accept is logged (naming `what` is served) and retried after a
/// short pause.
pub async fn accept_until<L: Listener>(
    listener: &L,
    shutdown: &CancellationToken,
    what: &str,
    mut serve: impl FnMut(L::Accepted),
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept_one() => match accepted {
                Ok(conn) => serve(conn),
                Err(e) => {
                    tracing::warn!("{what}: accept failed: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
}

/// Drives one HTTP/1.1 connection with hyper; on shutdown lets the current
/// exchange finish. A request head over `max_head` is answered `431 Request
/// Header Fields Too Large` and the connection closed; one not complete
/// within [`HEADER_READ_TIMEOUT`] closes it.
pub async fn serve_io<I, S>(io: I, svc: S, shutdown: CancellationToken, max_head: usize)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
        http::Request<hyper::body::Incoming>,
        Response = Response<Body>,
        Error = Infallible,
    >,
    S::Future: Send + 'static,
{
    serve_io_with(io, svc, shutdown, max_head, HEADER_READ_TIMEOUT).await
}

/// [`serve_io`] with a head deadline of `header_timeout` (from connecting,
/// or from the previous answer on a kept-alive connection).
pub async fn serve_io_with<I, S>(
    io: I,
    svc: S,
    shutdown: CancellationToken,
    max_head: usize,
    header_timeout: Duration,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
        http::Request<hyper::body::Incoming>,
        Response = Response<Body>,
        Error = Infallible,
    >,
    S::Future: Send + 'static,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(max_head.max(MIN_HEADER_BYTES))
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => { if let Err(e) = r { tracing::debug!("HTTP connection: {e}"); } }
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
