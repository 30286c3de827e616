//! A small HTTP/1.1 client for the broker's Unix socket: kept-alive
//! connections in a LIFO stack, nothing else.
//!
//! Why not hyper-util's pooled client: the lease API is one host, one
//! protocol and one kind of connection, so its generality (connector
//! services, pool keys, HTTP/2 negotiation, an executor per connection
//! checkout) is cost without use on the proxy's hottest path; and it links
//! HTTP/2 into every binary that uses it, which is most of the slim shim's
//! code pages (`crate::slim` says why those matter).
//!
//! Invariants:
//! * A connection goes back to the stack only after its answer's body
//!   ended; one dropped unread is closed by hyper, never reused.
//! * The stack holds at most [`MAX_IDLE`] connections, each at most
//!   [`IDLE_TIMEOUT`] (the broker closes idle ones after its own keep-alive
//!   timeout too; a closed one is skipped).
//! * Errors say whether the request can have reached the broker
//!   ([`UdsError::is_connect`], [`UdsError::is_unsent`]).

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::net::UnixStream;

/// Idle connections kept at most.
const MAX_IDLE: usize = 256;
/// An idle connection older than this is closed instead of reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

type Sender = SendRequest<Full<Bytes>>;

/// Why a request got no answer head.
#[derive(Debug, thiserror::Error)]
pub enum UdsError {
    #[error("cannot connect: {0}")]
    Connect(#[source] std::io::Error),
    #[error("HTTP/1.1 handshake failed: {0}")]
    Handshake(#[source] hyper::Error),
    #[error("{0}")]
    Send(#[source] hyper::Error),
}

impl UdsError {
    /// No byte of the request can have reached the broker: the connection
    /// was never made.
    pub fn is_connect(&self) -> bool {
        matches!(self, UdsError::Connect(_) | UdsError::Handshake(_))
    }

    /// The connection was closed or reset under the request before any
    /// answer head (before it was sent, while writing it, or before the
    /// broker answered).
    pub fn is_unsent(&self) -> bool {
        use std::io::ErrorKind::{BrokenPipe, ConnectionReset};
        let UdsError::Send(h) = self else {
            return false;
        };
        if h.is_canceled() || h.is_incomplete_message() {
            return true;
        }
        let mut src = std::error::Error::source(h);
        while let Some(err) = src {
            if let Some(io) = err.downcast_ref::<std::io::Error>() {
                if matches!(io.kind(), BrokenPipe | ConnectionReset) {
                    return true;
                }
            }
            src = err.source();
        }
        false
    }
}

struct Idle {
    tx: Sender,
    since: Instant,
}

struct Inner {
    path: PathBuf,
    idle: Mutex<Vec<Idle>>,
}

/// Pooled HTTP/1.1 connections to one Unix socket (cheap to clone).
#[derive(Clone)]
pub struct UdsClient {
    inner: Arc<Inner>,
}

impl UdsClient {
    /// A client for the socket at `path` (nothing is connected yet).
    pub fn new(path: PathBuf) -> Self {
        Self {
            inner: Arc::new(Inner {
                path,
                idle: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Sends `req` (origin-form URI) on a kept-alive connection, or a new
    /// one when none is free.
    pub async fn request(&self, req: Request<Full<Bytes>>) -> Result<Response<Pooled>, UdsError> {
        let mut tx = self.checkout().await?;
        let resp = tx.send_request(req).await.map_err(UdsError::Send)?;
        let back = Arc::downgrade(&self.inner);
        Ok(resp.map(|body| Pooled {
            body,
            back: Some((tx, back)),
        }))
    }

    async fn checkout(&self) -> Result<Sender, UdsError> {
        loop {
            let got = self
                .inner
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop();
            let Some(Idle { mut tx, since }) = got else {
                return self.connect().await;
            };
            if tx.is_closed() || since.elapsed() > IDLE_TIMEOUT {
                continue;
            }
            // Ready at once unless the connection is finishing its last
            // answer (then: as soon as it has) or broke (then: the next).
            if tx.ready().await.is_ok() {
                return Ok(tx);
            }
        }
    }

    async fn connect(&self) -> Result<Sender, UdsError> {
        let io = UnixStream::connect(&self.inner.path)
            .await
            .map_err(UdsError::Connect)?;
        let (tx, conn) = http1::handshake(TokioIo::new(io))
            .await
            .map_err(UdsError::Handshake)?;
        // Ends when the broker closes the connection or the last sender is
        // dropped (an idle connection past its timeout, a broken answer).
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::trace!("lease API connection ended: {e}");
            }
        });
        Ok(tx)
    }
}

impl Inner {
    fn put_back(&self, tx: Sender) {
        if tx.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                tx,
                since: Instant::now(),
            });
        }
    }
}

/// An answer's body; its connection returns to the client when it ends.
pub struct Pooled {
    body: Incoming,
    back: Option<(Sender, Weak<Inner>)>,
}

impl Pooled {
    fn release(&mut self) {
        if let Some((tx, inner)) = self.back.take() {
            if let Some(inner) = inner.upgrade() {
                inner.put_back(tx);
            }
        }
    }
}

impl Body for Pooled {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.release(),
            // A broken body: the connection is not reused.
            Poll::Ready(Some(Err(_))) => this.back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use hyper::service::service_fn;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::UnixListener;

    /// A server that counts connections and answers each request with its
    /// path; `/close` answers and closes the connection.
    async fn server(path: PathBuf, conns: Arc<AtomicUsize>) {
        let l = UnixListener::bind(&path).unwrap();
        loop {
            let (s, _) = l.accept().await.unwrap();
            conns.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let mut r = Response::new(Full::new(Bytes::from(req.uri().path().to_string())));
                    if req.uri().path() == "/close" {
                        r.headers_mut()
                            .insert(http::header::CONNECTION, "close".parse().unwrap());
                    }
                    Ok::<_, std::convert::Infallible>(r)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    }

    async fn get(c: &UdsClient, path: &str) -> Result<String, UdsError> {
        let req = Request::get(path).body(Full::new(Bytes::new())).unwrap();
        let body = c.request(req).await?.into_body().collect().await.unwrap();
        Ok(String::from_utf8(body.to_bytes().to_vec()).unwrap())
    }

    #[tokio::test]
    async fn reuses_a_connection_once_its_body_ended() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let conns = Arc::new(AtomicUsize::new(0));
        let c = UdsClient::new(path.clone());
        let e = get(&c, "/a").await.unwrap_err();
        assert!(e.is_connect(), "{e}");
        tokio::spawn(server(path, conns.clone()));
        // The listener binds in the spawned task: retry until it answers.
        let first = loop {
            match get(&c, "/a").await {
                Ok(b) => break b,
                Err(e) if e.is_connect() => tokio::task::yield_now().await,
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(first, "/a");
        for i in 0..20 {
            assert_eq!(get(&c, &format!("/{i}")).await.unwrap(), format!("/{i}"));
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1, "one kept-alive connection");
        // Two at once need two connections; both are kept.
        let (a, b) = tokio::join!(get(&c, "/x"), get(&c, "/y"));
        assert_eq!((a.unwrap(), b.unwrap()), ("/x".into(), "/y".into()));
        assert_eq!(conns.load(Ordering::SeqCst), 2);
        // A connection the server closes is not reused.
        assert_eq!(get(&c, "/close").await.unwrap(), "/close");
        let n = conns.load(Ordering::SeqCst);
        for _ in 0..3 {
            get(&c, "/z").await.unwrap();
        }
        assert!(conns.load(Ordering::SeqCst) <= n + 1);
    }

    #[tokio::test]
    async fn a_body_dropped_unread_does_not_return_its_connection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let conns = Arc::new(AtomicUsize::new(0));
        let srv = tokio::spawn(server(path.clone(), conns.clone()));
        let c = UdsClient::new(path);
        let resp = loop {
            let req = Request::get("/a").body(Full::new(Bytes::new())).unwrap();
            match c.request(req).await {
                Ok(r) => break r,
                Err(e) if e.is_connect() => tokio::task::yield_now().await,
                Err(e) => panic!("{e}"),
            }
        };
        drop(resp);
        assert!(c.inner.idle.lock().unwrap().is_empty());
        assert_eq!(get(&c, "/b").await.unwrap(), "/b");
        assert_eq!(c.inner.idle.lock().unwrap().len(), 1);
        srv.abort();
    }
}
