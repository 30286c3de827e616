//! One lease API connection, read and written by a small HTTP/1.1 codec.
//!
//! Why not hyper here: a queued lease holds its connection for as long as it
//! waits, and hyper keeps an 8 KiB read and an 8 KiB write buffer per
//! connection (~17 KiB resident per queued request, measured with 10,000
//! queued). This codec reads a head into a buffer sized to it, holds no
//! buffer while the request waits, and writes each answer in one write.
//!
//! It speaks the shape every lease API client uses: HTTP/1.1 with the body
//! framed by `Content-Length` (or no body). Anything else (chunked request
//! bodies, `Expect`, HTTP/1.0, upgrades, `HEAD`) is handed, with the bytes
//! already read, to hyper for the rest of the connection, so every client
//! still meets a complete HTTP/1.1 server. Both paths answer through the
//! same [`api::handle`].
//!
//! Invariants: the head is bounded ([`MAX_HEADER_BYTES`], else `431`) and
//! so is the body (the broker's message limit, else `413`), after which the
//! connection closes; while a request waits or streams, the socket is
//! watched, and a peer that hangs up drops the request (the lease then
//! cancels it at the process); bytes pipelined meanwhile are kept, bounded.
//!
//! Front-door limits (`[broker]`, see docs/security.md): a head must be
//! complete within `header_timeout` of connecting (or of its first byte,
//! on a kept-alive connection): a fixed deadline, so trickling a byte a
//! second does not extend it; a body within `body_timeout` of its head;
//! a kept-alive connection must start its next request within
//! `keepalive_timeout`. Whether the caller may make the request is decided
//! from the head alone ([`api::admit`]) before any body byte is read; a
//! refused request's body is never read and the connection closes.
//! Connections are capped per peer and in all ([`serve_connection`]).

mod rewind;

use super::api::{self, MAX_HEADER_BYTES};
use super::error::ApiError;
use super::Broker;
use crate::policy::{Identity, VolumePod};
use crate::web::conn_limit::{ConnLimiter, ConnPermit, Refused};
use crate::web::Body;
use ::http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use bytes::{Buf, Bytes, BytesMut};
use http_body::Body as _;
use http_body_util::{BodyExt, Full};
use std::io::Write as _;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Headers one request may carry.
const MAX_HEADERS: usize = 64;
/// First read of a head; the buffer grows (doubling) up to the head limit.
const FIRST_READ: usize = 1024;
/// Bytes kept from a client that pipelines while its request runs; beyond
/// this the socket is no longer read until the answer is out.
const MAX_PIPELINED: usize = MAX_HEADER_BYTES;

/// What the next request on a connection turned out to be.
enum Next {
    /// A request head (its body is still to be read) and whether the
    /// connection stays open after it.
    Request(Request<()>, usize, bool),
    /// The peer closed (or broke) the connection.
    Closed,
    /// A shape this codec leaves to hyper.
    Handover,
    /// A body announced over the limit (left unread): `413`, then close.
    TooLarge { path: String, length: usize },
    /// Answer this, then close.
    Refuse(ApiError),
}

/// A parsed head, owned.
struct Head {
    method: Method,
    uri: ::http::Uri,
    headers: HeaderMap,
    length: usize,
    keep_alive: bool,
}

/// What [`Conn::receive`] got: a request to answer, or the connection's end.
enum Received {
    /// Admitted (with the caller's identity, when its route needs one) and
    /// read whole; whether the connection stays open after it. Boxed: this
    /// value's room would otherwise stay in every waiting connection's
    /// state while its request waits.
    Request(Box<(Request<Full<Bytes>>, Option<Identity>)>, bool),
    /// A request refused and answered, and the connection stays open.
    Answered,
    /// Hand the connection to hyper.
    Handover,
    /// Closed (by the peer, a timeout, shutdown, or after a refusal).
    Done,
}

/// Serves one lease API connection until the peer closes it, it breaks, a
/// front-door timeout closes it, or shutdown finds it idle.
pub async fn serve(
    broker: Arc<Broker>,
    stream: UnixStream,
    peer: Identity,
    shutdown: CancellationToken,
) {
    let mut conn = Conn {
        stream,
        buf: BytesMut::new(),
    };
    let mut fresh = true;
    loop {
        let keep_alive;
        // Pinned in place rather than passed by value (every move of a
        // future into another copies it into that one's state), and scoped
        // so its storage is reused by the write that follows. The request
        // is received by its own future, finished before the answer's, and
        // bound only inside the match arm: what receiving keeps (the head,
        // timers, the identity) is not part of a waiting request's state.
        let resp = {
            let answer = match conn.receive(&broker, &peer, &shutdown, fresh).await {
                Received::Request(req, k) => {
                    keep_alive = k;
                    let (req, who) = *req;
                    api::handle(broker.clone(), req, who)
                }
                Received::Answered => {
                    fresh = false;
                    continue;
                }
                Received::Handover => {
                    let io = rewind::Rewind::new(conn.buf.freeze(), conn.stream);
                    // Boxed: hyper's connection state is large and rare here;
                    // inline, every connection's task would carry room for it.
                    Box::pin(api::serve_hyper(broker, io, peer, shutdown)).await;
                    return;
                }
                Received::Done => return,
            };
            fresh = false;
            tokio::pin!(answer);
            let Conn { stream, buf } = &mut conn;
            tokio::select! {
                biased;
                r = &mut answer => r,
                _ = hangup(stream, buf) => return,
            }
        };
        let keep = keep_alive && !shutdown.is_cancelled() && !broker.is_closing();
        if !conn.write_response(resp, keep).await || !keep {
            return;
        }
    }
}

struct Conn {
    stream: UnixStream,
    /// Bytes read and not yet consumed: a partial head, or pipelined requests.
    buf: BytesMut,
}

impl Conn {
    /// Reads the next request within the front-door timeouts (a fresh
    /// connection's first head is due `header_timeout` after connecting; a
    /// kept-alive one must start its next request within
    /// `keepalive_timeout`, then has `header_timeout` for the head),
    /// admits it from its head, then reads its body within `body_timeout`.
    /// Refusals are answered here.
    async fn receive(
        &mut self,
        broker: &Arc<Broker>,
        peer: &Identity,
        shutdown: &CancellationToken,
        fresh: bool,
    ) -> Received {
        let limit = broker.settings().max_message_size;
        let door = &broker.settings().front_door;
        if !fresh && self.buf.is_empty() {
            let started = tokio::select! {
                r = tokio::time::timeout(door.keepalive_timeout, self.fill()) => r == Ok(true),
                _ = shutdown.cancelled() => false,
            };
            if !started {
                return Received::Done;
            }
        }
        // A fixed deadline: bytes trickling in do not extend it.
        let head_due = Instant::now() + door.header_timeout;
        let next = tokio::select! {
            n = tokio::time::timeout_at(head_due, self.read_head(limit)) => match n {
                Ok(n) => n,
                Err(_) => return Received::Done,
            },
            _ = shutdown.cancelled(), if self.buf.is_empty() => return Received::Done,
        };
        let (head, length, keep_alive) = match next {
            Next::Request(r, n, k) => (r, n, k),
            Next::Closed => return Received::Done,
            Next::Handover => return Received::Handover,
            Next::Refuse(e) => {
                let answer = e.into_response(serde_json::Value::Null);
                Box::pin(self.write_response(answer, false)).await;
                return Received::Done;
            }
            Next::TooLarge { path, length } => {
                let answer = api::too_large(broker, &path, length, limit);
                Box::pin(self.write_response(answer, false)).await;
                return Received::Done;
            }
        };
        // Allowed or not is decided from the head; a refused body stays
        // unread (so the connection stays open only if it had none).
        // Boxed: the identity check (a TokenReview) is a large future.
        let who = match Box::pin(api::admit(broker, &head, peer.clone())).await {
            Ok(who) => who,
            Err(e) => {
                let keep = length == 0 && keep_alive && !shutdown.is_cancelled();
                let answer = e.into_response(serde_json::Value::Null);
                return match Box::pin(self.write_response(answer, keep)).await && keep {
                    true => Received::Answered,
                    false => Received::Done,
                };
            }
        };
        match tokio::time::timeout(door.body_timeout, self.read_body(length)).await {
            Ok(Some(body)) => {
                Received::Request(Box::new((head.map(|()| Full::new(body)), who)), keep_alive)
            }
            Ok(None) | Err(_) => Received::Done,
        }
    }

    /// Waits for the first bytes of a request: false when the peer closed.
    async fn fill(&mut self) -> bool {
        self.buf.reserve(FIRST_READ);
        matches!(self.stream.read_buf(&mut self.buf).await, Ok(n) if n > 0)
    }

    /// Reads the next request's head; a body announced over `limit` is
    /// refused unread.
    async fn read_head(&mut self, limit: usize) -> Next {
        let (head, used) = loop {
            if !self.buf.is_empty() {
                match parse_head(&self.buf) {
                    Ok(Some(h)) => break h,
                    Ok(None) => {}
                    Err(Parse::Handover) => return Next::Handover,
                    Err(Parse::Refuse(e)) => return Next::Refuse(e),
                }
            }
            if self.buf.len() >= MAX_HEADER_BYTES {
                return Next::Refuse(ApiError::HeadTooLarge(format!(
                    "the request head is over {MAX_HEADER_BYTES} bytes"
                )));
            }
            let room = FIRST_READ
                .max(self.buf.len())
                .min(MAX_HEADER_BYTES - self.buf.len());
            self.buf.reserve(room);
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return Next::Closed,
                Ok(_) => {}
            }
        };
        self.buf.advance(used);
        if head.length > limit {
            return Next::TooLarge {
                path: head.uri.path().to_string(),
                length: head.length,
            };
        }
        let mut req = Request::new(());
        *req.method_mut() = head.method;
        *req.uri_mut() = head.uri;
        *req.headers_mut() = head.headers;
        Next::Request(req, head.length, head.keep_alive)
    }

    /// Reads a body of `length` bytes; `None` when the peer left first.
    async fn read_body(&mut self, length: usize) -> Option<Bytes> {
        while self.buf.len() < length {
            self.buf.reserve(length - self.buf.len());
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
        let body = self.buf.split_to(length).freeze();
        if self.buf.is_empty() {
            // Hold no buffer while the request waits (it may wait long).
            self.buf = BytesMut::new();
        }
        Some(body)
    }

    /// Writes `resp`: one write for a sized body, chunks as they come for a
    /// stream. False when the connection broke or the peer left.
    async fn write_response(&mut self, resp: Response<Body>, keep_alive: bool) -> bool {
        let (parts, mut body) = resp.into_parts();
        let mut out = Vec::with_capacity(256);
        let _ = write!(
            out,
            "HTTP/1.1 {} {}\r\n",
            parts.status.as_u16(),
            parts.status.canonical_reason().unwrap_or("")
        );
        for (k, v) in &parts.headers {
            out.extend_from_slice(k.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(v.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        if !keep_alive {
            out.extend_from_slice(b"connection: close\r\n");
        }
        let bodiless = parts.status == StatusCode::NO_CONTENT
            || parts.status == StatusCode::NOT_MODIFIED
            || parts.status.is_informational();
        if let Some(len) = body.size_hint().exact() {
            if !bodiless {
                let _ = write!(out, "content-length: {len}\r\n");
            }
            out.extend_from_slice(b"\r\n");
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame;
                if let (Ok(data), false) = (frame.into_data(), bodiless) {
                    out.extend_from_slice(&data);
                }
            }
            return self.stream.write_all(&out).await.is_ok();
        }
        out.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n");
        if self.stream.write_all(&out).await.is_err() {
            return false;
        }
        loop {
            let Conn { stream, buf } = &mut *self;
            let frame = tokio::select! {
                biased;
                f = body.frame() => f,
                _ = hangup(stream, buf) => return false,
            };
            let data = match frame {
                None => break,
                Some(Ok(f)) => match f.into_data() {
                    Ok(d) if !d.is_empty() => d,
                    _ => continue,
                },
            };
            let mut chunk = Vec::with_capacity(data.len() + 16);
            let _ = write!(chunk, "{:x}\r\n", data.len());
            chunk.extend_from_slice(&data);
            chunk.extend_from_slice(b"\r\n");
            if self.stream.write_all(&chunk).await.is_err() {
                return false;
            }
        }
        self.stream.write_all(b"0\r\n\r\n").await.is_ok()
    }
}

/// Resolves when the peer closes or breaks the connection. Bytes it sends
/// meanwhile (pipelined requests) are kept in `buf`, up to [`MAX_PIPELINED`];
/// past that the socket is left unread and this never resolves.
async fn hangup(stream: &UnixStream, buf: &mut BytesMut) {
    loop {
        if stream.readable().await.is_err() {
            return;
        }
        let full = {
            let mut scratch = [0u8; 512];
            match stream.try_read(&mut scratch) {
                Ok(0) => return,
                Ok(n) => {
                    buf.extend_from_slice(&scratch[..n]);
                    buf.len() >= MAX_PIPELINED
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
                Err(_) => return,
            }
        };
        if full {
            std::future::pending::<()>().await;
        }
    }
}

/// Why a head is not served here.
enum Parse {
    Handover,
    /// Answer with this error, then close.
    Refuse(ApiError),
}

/// Parses a complete head at the start of `buf`: `Ok(None)` when more bytes
/// are needed.
fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, Parse> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let used = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Parse::Refuse(ApiError::HeadTooLarge(format!(
                "more than {MAX_HEADERS} request headers"
            ))))
        }
        Err(e) => return Err(bad(format!("malformed request: {e}"))),
    };
    let method = Method::from_bytes(req.method.unwrap_or("").as_bytes())
        .map_err(|_| bad("malformed request method".into()))?;
    if req.version != Some(1) || method == Method::HEAD || method == Method::CONNECT {
        return Err(Parse::Handover);
    }
    let uri: ::http::Uri = req
        .path
        .unwrap_or("")
        .parse()
        .map_err(|_| bad("malformed request target".into()))?;
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    let mut length: Option<usize> = None;
    let mut keep_alive = true;
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| bad(format!("malformed header name {:?}", h.name)))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| bad(format!("malformed value of header {name}")))?;
        if name == header::TRANSFER_ENCODING || name == header::EXPECT || name == header::UPGRADE {
            return Err(Parse::Handover);
        }
        if name == header::CONTENT_LENGTH {
            let n = value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| bad("malformed content-length".into()))?;
            if length.is_some_and(|l| l != n) {
                return Err(bad("conflicting content-length headers".into()));
            }
            length = Some(n);
        }
        if name == header::CONNECTION
            && value
                .to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
        {
            keep_alive = false;
        }
        headers.append(name, value);
    }
    let head = Head {
        method,
        uri,
        headers,
        length: length.unwrap_or(0),
        keep_alive,
    };
    Ok(Some((head, used)))
}

fn bad(why: String) -> Parse {
    Parse::Refuse(ApiError::BadRequest(why))
}

#[cfg(test)]
mod tests;

/// Serves one lease API connection until it closes or shutdown asks it to
/// finish. The peer's identity is fixed here, once: the kernel's
/// credentials and, with `peer_identity`, its pod (through a pidfd, see
/// [`crate::policy::cgroup`]). A peer over its connection cap, or a broker
/// over the total, is answered `429`/`503` and closed.
pub async fn serve_connection(
    broker: Arc<Broker>,
    stream: UnixStream,
    limiter: Arc<ConnLimiter<String>>,
    pod: Option<Arc<VolumePod>>,
    shutdown: CancellationToken,
) {
    match accept(&broker, &stream, &limiter, pod) {
        Ok((peer, _))
            if broker
                .owner_uid()
                .is_some_and(|owner| peer.uid != Some(owner)) =>
        {
            // A per-user broker serves its user only.
            let owner = broker.owner_uid().unwrap_or_default();
            Box::pin(refuse_peer(stream, owner, peer.uid)).await;
        }
        Ok((peer, _)) if peer.uid.is_some_and(|u| broker.is_pool_user(u)) => {
            // A server process (or what runs inside it) never leases: it
            // could reach other pools around its own isolation.
            tracing::warn!(caller = %peer, "refused a lease API connection from a pool's own user");
        }
        Ok((peer, permit)) => {
            // Boxed, sized exactly: inline, this function's own state
            // (its arguments' copies, the permit, the refusal paths) sat
            // beside the connection's for its whole life, ~1.7 KiB more
            // per open connection (every queued request holds one).
            Box::pin(serve(broker, stream, *peer, shutdown)).await;
            drop(permit);
        }
        Err(refused) => {
            // Boxed: inline, its read buffer would make every connection's
            // task larger.
            Box::pin(refused.answer(stream)).await;
        }
    }
}

/// The peer of a new connection, and its place under the connection caps.
/// The identity is boxed so that this result's room is small in the task.
fn accept(
    broker: &Broker,
    stream: &UnixStream,
    limiter: &Arc<ConnLimiter<String>>,
    pod: Option<Arc<VolumePod>>,
) -> Result<(Box<Identity>, ConnPermit<String>), Refused> {
    let mut peer = match stream.peer_cred() {
        Ok(c) => Identity {
            uid: Some(c.uid()),
            gid: Some(c.gid()),
            pid: c.pid(),
            ..Identity::default()
        },
        Err(_) => Identity::default(),
    };
    if let Some(p) = pod {
        // A pod's CSI socket: the kubelet named the pod.
        peer = Identity::of_volume(peer, p);
        peer.pod_uid = peer.volume_pod.as_ref().map(|p| p.uid.clone());
    } else if broker.pod_index().is_some() {
        peer.pod_uid = peer
            .pid
            .and_then(crate::policy::cgroup::live_cgroup)
            .and_then(|t| crate::policy::cgroup::pod_uid_from_cgroup(&t));
    }
    let key = match (&peer.pod_uid, peer.uid) {
        (Some(pod), _) => format!("pod:{pod}"),
        (None, Some(uid)) => format!("uid:{uid}"),
        (None, None) => "-".into(),
    };
    match limiter.try_acquire(key) {
        Ok(permit) => Ok((Box::new(peer), permit)),
        Err(refused) => {
            tracing::debug!(caller = %peer, "lease API connection refused: {refused}");
            Err(refused)
        }
    }
}

/// Answers a peer of another user `403` and closes, reading nothing.
async fn refuse_peer(mut stream: UnixStream, owner: u32, uid: Option<u32>) {
    tracing::warn!(?uid, owner, "refused a connection from another user");
    let why = format!(
        "this per-user broker serves only uid {owner}; the caller runs as {}",
        uid.map_or_else(|| "an unknown uid".to_string(), |u| u.to_string())
    );
    let body = crate::jsonrpc::error(
        serde_json::Value::Null,
        crate::lease_api::codes::NOT_ALLOWED,
        why,
    )
    .to_string();
    let head = format!(
        "HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await?;
        // Closing with the peer's request unread would reset the connection
        // before it reads the answer: drain (bounded) until it hangs up.
        let mut sink = [0u8; 4096];
        let mut left = MAX_HEADER_BYTES;
        while left > 0 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => left = left.saturating_sub(n),
            }
        }
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), write).await;
}
