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
//! cancels it at the process); bytes pipelined meanwhile are kept, bounded;
//! a request must arrive whole within `[broker] read_timeout` of connecting
//! or of the previous answer, else the connection closes.

mod rewind;

use super::api::{self, MAX_HEADER_BYTES};
use super::error::ApiError;
use super::Broker;
use crate::policy::{Identity, VolumePod};
use crate::web::Body;
use ::http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use bytes::{Buf, Bytes, BytesMut};
use http_body::Body as _;
use http_body_util::{BodyExt, Full};
use std::io::Write as _;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
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
    /// A request and whether the connection stays open after it.
    Request(Request<Full<Bytes>>, bool),
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

/// Serves one lease API connection until the peer closes it, it breaks, or
/// shutdown finds it idle.
pub async fn serve(
    broker: Arc<Broker>,
    stream: UnixStream,
    peer: Identity,
    shutdown: CancellationToken,
) {
    let limit = broker.settings().max_message_size;
    let read_timeout = broker.settings().read_timeout;
    let mut conn = Conn {
        stream,
        buf: BytesMut::new(),
    };
    loop {
        // A complete request within `read_timeout` of connecting or of the
        // previous answer, or the connection closes: no slow head, slow
        // body or idle keep-alive holds it forever.
        let next = tokio::select! {
            n = tokio::time::timeout(read_timeout, conn.next_request(limit)) => match n {
                Ok(n) => n,
                Err(_) => return,
            },
            _ = shutdown.cancelled(), if conn.buf.is_empty() => return,
        };
        let (req, keep_alive) = match next {
            Next::Request(r, k) => (r, k),
            Next::Closed => return,
            Next::Refuse(e) => {
                conn.write_response(e.into_response(serde_json::Value::Null), false)
                    .await;
                return;
            }
            Next::Handover => {
                let io = rewind::Rewind::new(conn.buf.freeze(), conn.stream);
                // Boxed: hyper's connection state is large and rare here;
                // inline, every connection's task would carry room for it.
                Box::pin(api::serve_hyper(broker, io, peer, shutdown)).await;
                return;
            }
            Next::TooLarge { path, length } => {
                let r = api::too_large(&broker, &path, length, limit);
                conn.write_response(r, false).await;
                return;
            }
        };
        // Pinned in place rather than passed by value (every move of a
        // future into another copies it into that one's state), and scoped
        // so its storage is reused by the write that follows.
        let resp = {
            let answer = api::handle(broker.clone(), req, peer.clone());
            tokio::pin!(answer);
            let Conn { stream, buf } = &mut conn;
            tokio::select! {
                biased;
                r = &mut answer => r,
                _ = hangup(stream, buf) => return,
            }
        };
        let keep = keep_alive && !shutdown.is_cancelled();
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
    /// Reads the next request: its head, then (within `limit`) its body.
    async fn next_request(&mut self, limit: usize) -> Next {
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
        while self.buf.len() < head.length {
            self.buf.reserve(head.length - self.buf.len());
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return Next::Closed,
                Ok(_) => {}
            }
        }
        let body = Full::new(self.buf.split_to(head.length).freeze());
        if self.buf.is_empty() {
            // Hold no buffer while the request waits (it may wait long).
            self.buf = BytesMut::new();
        }
        let mut req = Request::new(body);
        *req.method_mut() = head.method;
        *req.uri_mut() = head.uri;
        *req.headers_mut() = head.headers;
        Next::Request(req, head.keep_alive)
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

/// Serves one lease API connection until it closes or shutdown asks it to finish.
pub async fn serve_connection(
    broker: Arc<Broker>,
    stream: UnixStream,
    pod: Option<Arc<VolumePod>>,
    shutdown: CancellationToken,
) {
    // Who is on the other end: the kernel's word, fixed for the connection;
    // on a pod's CSI socket, also the pod the kubelet named.
    let peer = match stream.peer_cred() {
        Ok(c) => Identity {
            uid: Some(c.uid()),
            gid: Some(c.gid()),
            pid: c.pid(),
            ..Identity::default()
        },
        Err(_) => Identity::default(),
    };
    let peer = match pod {
        Some(p) => Identity::of_volume(peer, p),
        None => peer,
    };
    serve(broker, stream, peer, shutdown).await
}
