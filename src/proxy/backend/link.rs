//! How the proxy reaches the broker: over its Unix socket (a sidecar, a
//! separate `proxy`), or by calling it in this process (`mcp-broker up`,
//! through [`LocalApi`], which the broker implements). Everything above
//! [`Link::request`] is the same for both: the same requests, the same
//! answers and bodies.

use super::uds::{Pooled, UdsClient, UdsError};
use crate::lease_api::{LocalApi, LocalBody as Body};
use bytes::Bytes;
use http::{Request, Response};
use http_body::{Frame, SizeHint};
use http_body_util::Full;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

/// The broker's end of the proxy.
#[derive(Clone)]
pub enum Link {
    /// HTTP/1.1 over the broker's socket, kept-alive connections.
    Socket(UdsClient),
    /// A broker in this process.
    Local(Arc<dyn LocalApi>),
}

impl Link {
    /// Sends one lease API request. Only the socket can fail (to connect,
    /// or when the connection breaks).
    pub async fn request(&self, req: Request<Full<Bytes>>) -> Result<Response<ApiBody>, UdsError> {
        match self {
            Link::Socket(c) => Ok(c.request(req).await?.map(ApiBody::Socket)),
            Link::Local(l) => Ok(l.request(req).await.map(|b| ApiBody::Local(Mutex::new(b)))),
        }
    }
}

/// Errors reading an answer's body.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// The body of a lease API answer.
pub enum ApiBody {
    /// Read from the socket.
    Socket(Pooled),
    /// Handed over in this process. In a mutex only so that the lease can be
    /// shared by reference across tasks (the broker's body is not `Sync`);
    /// reading goes through `&mut` and never locks.
    Local(Mutex<Body>),
}

impl http_body::Body for ApiBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ApiBody::Socket(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(Into::into))),
            ApiBody::Local(b) => Pin::new(b.get_mut().unwrap_or_else(PoisonError::into_inner))
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(|e| match e {}))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ApiBody::Socket(b) => b.is_end_stream(),
            ApiBody::Local(b) => lock(b).is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ApiBody::Socket(b) => b.size_hint(),
            ApiBody::Local(b) => lock(b).size_hint(),
        }
    }
}

fn lock(b: &Mutex<Body>) -> MutexGuard<'_, Body> {
    b.lock().unwrap_or_else(PoisonError::into_inner)
}
