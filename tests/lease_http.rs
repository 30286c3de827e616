//! The lease API's HTTP/1.1 framing, byte by byte over the Unix socket: the
//! broker's own codec (Content-Length bodies, keep-alive, pipelining, hang-up
//! while queued, limits) and the hand-over to hyper for every other shape
//! (chunked bodies, HTTP/1.0, `Expect`).

#[path = "support/harness.rs"]
mod harness;

use harness::*;
use serde_json::{json, Value};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// How long one response may take: a failure bound, not a quiet period.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// The length of the first whole HTTP/1.x response in `buf` (framed by its
/// content-length or chunked encoding; `head_only` for a HEAD request), or
/// `None` while it is incomplete or runs until the connection closes.
fn response_len(buf: &[u8], head_only: bool) -> Option<usize> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut r = httparse::Response::new(&mut headers);
    let head = match r.parse(buf).expect("a well-formed response head") {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return None,
    };
    let code = r.code.unwrap_or(0);
    if head_only || code < 200 || code == 204 || code == 304 {
        return Some(head);
    }
    let header = |name: &str| {
        r.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
    };
    if let Some(len) = header("content-length") {
        let end = head + len.trim().parse::<usize>().expect("numeric content-length");
        return (buf.len() >= end).then_some(end);
    }
    if !header("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        return None;
    }
    let mut at = head;
    loop {
        let line = buf[at..].windows(2).position(|w| w == b"\r\n")?;
        let size = std::str::from_utf8(&buf[at..at + line]).expect("chunk size");
        let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16)
            .expect("hex chunk size");
        at += line + 2 + size + 2;
        if buf.len() < at {
            return None;
        }
        if size == 0 {
            return Some(at);
        }
    }
}

/// A connection to the lease API and what it has sent but was not read yet.
struct Conn {
    s: UnixStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(b: &TestBroker) -> Conn {
        Conn {
            s: UnixStream::connect(&b.socket).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.unwrap();
    }

    /// Reads one more byte chunk; false at end of stream.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(ANSWER_WITHIN, self.s.read(&mut chunk))
            .await
            .expect("the broker answers in time")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    /// The next whole response (to a HEAD request when `head_only`).
    async fn response(&mut self, head_only: bool) -> String {
        loop {
            if let Some(n) = response_len(&self.buf, head_only) {
                let r: Vec<u8> = self.buf.drain(..n).collect();
                return String::from_utf8_lossy(&r).into_owned();
            }
            if !self.fill().await {
                // Framed by the end of the connection.
                assert!(!self.buf.is_empty(), "the broker closed without answering");
                let r = std::mem::take(&mut self.buf);
                return String::from_utf8_lossy(&r).into_owned();
            }
        }
    }

    /// Asserts that the broker closes the connection with nothing more.
    async fn closed(&mut self) {
        while self.fill().await {}
        assert!(
            self.buf.is_empty(),
            "more after the response: {}",
            String::from_utf8_lossy(&self.buf)
        );
    }
}

/// Sends `bytes` on a fresh connection and returns the one response.
async fn exchange(b: &TestBroker, bytes: &[u8]) -> String {
    let mut c = Conn::open(b).await;
    c.send(bytes).await;
    c.response(bytes.starts_with(b"HEAD ")).await
}

fn post(pool: &str, body: &str, extra: &str) -> String {
    format!(
        "POST /v1/pools/{pool}/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{extra}content-length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn echo(id: u64, text: &str) -> String {
    tool(id, "echo", json!({"text": text})).to_string()
}

/// The JSON lines of every response body in `reply` that carry an `id`.
fn answers(reply: &str) -> Vec<Value> {
    reply
        .split(['\n', '\r'])
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .filter(|v| v.get("id").is_some())
        .collect()
}

#[tokio::test]
async fn keep_alive_and_pipelined_requests_are_answered_in_order() {
    let b = TestBroker::start(vec![fixture_pool("fx", &[])]).await;
    b.wait_idle("fx", 1).await;
    let mut s = Conn::open(&b).await;
    // Two requests in one write, then a third on the same connection.
    let two = format!(
        "{}{}",
        post("fx", &echo(1, "a"), ""),
        post("fx", &echo(2, "b"), "")
    );
    s.send(two.as_bytes()).await;
    let mut reply = s.response(false).await;
    reply += &s.response(false).await;
    assert_eq!(reply.matches("HTTP/1.1 200 OK").count(), 2, "{reply}");
    assert!(
        reply.contains("content-length: "),
        "answered with a length: {reply}"
    );
    let got = answers(&reply);
    assert_eq!(got.len(), 2, "{reply}");
    assert_eq!(
        (text_of(&got[0]), text_of(&got[1])),
        ("a".into(), "b".into())
    );
    s.send(post("fx", &echo(3, "c"), "").as_bytes()).await;
    let reply = s.response(false).await;
    assert_eq!(text_of(&answers(&reply)[0]), "c");
    // `connection: close` is honoured.
    s.send(post("fx", &echo(4, "d"), "connection: close\r\n").as_bytes())
        .await;
    let reply = s.response(false).await;
    assert!(reply.contains("connection: close"), "{reply}");
    assert_eq!(text_of(&answers(&reply)[0]), "d");
    s.closed().await;
    b.stop().await;
}

#[tokio::test]
async fn other_http_shapes_are_served_by_the_fallback() {
    let b = TestBroker::start(vec![fixture_pool("fx", &[])]).await;
    b.wait_idle("fx", 1).await;
    // A chunked request body.
    let body = echo(5, "chunked");
    let chunked = format!(
        "POST /v1/pools/fx/messages HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
    let reply = exchange(&b, chunked.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(text_of(&answers(&reply)[0]), "chunked");
    // A pretty-printed body: the process still gets it on one line (the
    // broker takes line breaks the parsed way, never as text).
    let pretty = serde_json::to_string_pretty(&tool(6, "echo", json!({"text": "pretty"}))).unwrap();
    assert!(pretty.contains('\n'));
    let reply = exchange(&b, post("fx", &pretty, "").as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(text_of(&answers(&reply)[0]), "pretty");
    // HTTP/1.0 and HEAD.
    let reply = exchange(&b, b"GET /livez HTTP/1.0\r\n\r\n").await;
    assert!(
        reply.starts_with("HTTP/1.0 200") || reply.starts_with("HTTP/1.1 200"),
        "{reply}"
    );
    assert!(reply.ends_with("ok\n"), "{reply}");
    let reply = exchange(&b, b"HEAD /livez HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 405"), "{reply}");
    b.stop().await;
}

#[tokio::test]
async fn malformed_and_oversized_requests_get_clear_refusals() {
    let b = TestBroker::start(vec![fixture_pool("fx", &[])]).await;
    b.wait_idle("fx", 1).await;
    let reply = exchange(&b, b"GARBAGE\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(reply.contains("malformed"), "{reply}");
    let reply = exchange(
        &b,
        b"POST /v1/pools/fx/messages HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    let head = format!(
        "GET /livez HTTP/1.1\r\nx-big: {}\r\n\r\n",
        "a".repeat(70_000)
    );
    let reply = exchange(&b, head.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply}");
    let many: String = (0..80).map(|i| format!("x-{i}: y\r\n")).collect();
    let reply = exchange(&b, format!("GET /livez HTTP/1.1\r\n{many}\r\n").as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply}");
    // A body announced over the message limit is refused unread.
    let reply = exchange(
        &b,
        b"POST /v1/pools/fx/messages HTTP/1.1\r\ncontent-length: 999999999\r\n\r\n{",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(reply.contains("connection: close"), "{reply}");
    let m = b.metrics.render();
    assert!(
        m.contains("mcp_broker_rejections_total{pool=\"fx\",reason=\"too_large\"} 1"),
        "{m}"
    );
    // The broker keeps serving.
    let (_, msgs) = lease(
        &b.client("fx"),
        &tool(6, "echo", json!({"text": "ok"})),
        None,
    )
    .await;
    assert_eq!(text_of(&msgs[0]), "ok");
    b.stop().await;
}

#[tokio::test]
async fn hanging_up_while_queued_leaves_the_queue() {
    let mut p = fixture_pool("fx", &[]);
    p.max = 1;
    let b = TestBroker::start(vec![p]).await;
    b.wait_idle("fx", 1).await;
    let pool = b.broker.pool("fx").unwrap().clone();
    // The only process stays busy until the end of the test.
    let c = b.client("fx");
    let hold = Held::start(&c, 1).await;
    let mut waiting = Vec::new();
    for i in 0..3 {
        let mut s = UnixStream::connect(&b.socket).await.unwrap();
        s.write_all(post("fx", &echo(10 + i, "q"), "").as_bytes())
            .await
            .unwrap();
        waiting.push(s);
    }
    wait_until(Duration::from_secs(5), || pool.status().waiting == 3).await;
    drop(waiting);
    // Gone from the queue at once, not when the process comes free.
    wait_until(Duration::from_secs(1), || pool.status().waiting == 0).await;
    assert_eq!(pool.status().busy, 1, "the process is still held");
    let fin = hold.finish(&c, "held").await;
    assert_eq!(fin["id"], 1);
    b.stop().await;
}

/// Reads until the broker closes the connection (EOF or reset); panics if
/// it is still open after `within`.
async fn closed_within(s: &mut UnixStream, within: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(within, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the connection is still open after {within:?}"),
        }
    }
}

#[tokio::test]
async fn slow_heads_bodies_and_idle_connections_are_closed_after_their_timeouts() {
    let b = TestBroker::start_with(vec![fixture_pool("fx", &[])], |s| {
        s.front_door.header_timeout = Duration::from_millis(300);
        s.front_door.body_timeout = Duration::from_millis(300);
        s.front_door.keepalive_timeout = Duration::from_millis(300);
    })
    .await;
    // A head that never completes.
    let mut slow = UnixStream::connect(&b.socket).await.unwrap();
    slow.write_all(b"GET /livez HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let got = closed_within(&mut slow, ANSWER_WITHIN).await;
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    // A body that never arrives whole.
    let mut partial = UnixStream::connect(&b.socket).await.unwrap();
    partial
        .write_all(b"POST /v1/pools/fx/messages HTTP/1.1\r\ncontent-length: 100\r\n\r\n{")
        .await
        .unwrap();
    closed_within(&mut partial, ANSWER_WITHIN).await;
    // A kept-alive connection is answered, then closed once idle.
    let mut idle = UnixStream::connect(&b.socket).await.unwrap();
    idle.write_all(b"GET /livez HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let got = closed_within(&mut idle, ANSWER_WITHIN).await;
    assert!(
        String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    b.stop().await;
}
