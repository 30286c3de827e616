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

/// Reads until the broker closes or goes quiet for `quiet`.
async fn read_all(s: &mut UnixStream, quiet: Duration) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(quiet, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return String::from_utf8_lossy(&out).into_owned(),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

async fn exchange(b: &TestBroker, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(&b.socket).await.unwrap();
    s.write_all(bytes).await.unwrap();
    read_all(&mut s, Duration::from_millis(1500)).await
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
    let mut s = UnixStream::connect(&b.socket).await.unwrap();
    // Two requests in one write, then a third on the same connection.
    let two = format!(
        "{}{}",
        post("fx", &echo(1, "a"), ""),
        post("fx", &echo(2, "b"), "")
    );
    s.write_all(two.as_bytes()).await.unwrap();
    let reply = read_all(&mut s, Duration::from_millis(500)).await;
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
    s.write_all(post("fx", &echo(3, "c"), "").as_bytes())
        .await
        .unwrap();
    let reply = read_all(&mut s, Duration::from_millis(500)).await;
    assert_eq!(text_of(&answers(&reply)[0]), "c");
    // `connection: close` is honoured.
    s.write_all(post("fx", &echo(4, "d"), "connection: close\r\n").as_bytes())
        .await
        .unwrap();
    let reply = read_all(&mut s, Duration::from_secs(5)).await;
    assert!(reply.contains("connection: close"), "{reply}");
    assert_eq!(text_of(&answers(&reply)[0]), "d");
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
    let hold = tokio::spawn({
        let c = b.client("fx");
        async move { lease(&c, &tool(1, "sleep", json!({"ms": 3000})), None).await }
    });
    wait_until(Duration::from_secs(5), || pool.status().busy == 1).await;
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
    assert!(!hold.is_finished(), "the hold ended early");
    let (_, msgs) = hold.await.unwrap();
    assert_eq!(msgs.last().unwrap()["id"], 1);
    b.stop().await;
}
