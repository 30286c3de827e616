//! Attacks on the front door, each made on purpose: slowloris (a byte a
//! second) and 1,000 idle connections against the lease API and the proxy,
//! connections over the caps, bodies sent to a pool the caller may not use,
//! and one caller flooding a pool's queue. Every time legitimate callers
//! must keep getting answers (bounded waits, no timing thresholds).
//!
//! Privilege: `lease_api_connection_caps_are_per_peer` needs root (it runs
//! a client as uid 65534 to be a second peer); the others run as anyone.
//! The proxy tests connect from 127.0.0.2 to be a second peer (Linux
//! routes all of 127/8 to loopback).
//! Lease ids and session keys bound to their caller: tests/policy.rs.

#[path = "support/harness.rs"]
mod harness;

use harness::*;
use mcp_broker::jsonrpc::codes;
use serde_json::json;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UnixStream};

/// Longest wait for anything the test expects to happen.
const WAIT: Duration = Duration::from_secs(20);
/// The attacker's cadence: one byte of a head per this.
const TRICKLE: Duration = Duration::from_secs(1);

/// Reads until the peer closes; panics if it is still open after [`WAIT`].
async fn read_to_close<S: AsyncReadExt + Unpin>(s: &mut S) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(WAIT, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return String::from_utf8_lossy(&got).into_owned(),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("still open after {WAIT:?}"),
        }
    }
}

/// Slowloris: starts a head, then sends one more byte per [`TRICKLE`]
/// for as long as the server keeps the connection; returns the bytes sent.
async fn trickle<S: AsyncReadExt + AsyncWriteExt + Unpin>(mut s: S) -> usize {
    let mut sent = 0;
    if s.write_all(b"GET /livez HTTP/1.1\r\nx-slow: ")
        .await
        .is_err()
    {
        return sent;
    }
    let mut buf = [0u8; 64];
    loop {
        tokio::select! {
            r = s.read(&mut buf) => if matches!(r, Ok(0) | Err(_)) { return sent },
            _ = tokio::time::sleep(TRICKLE) => {
                if s.write_all(b"a").await.is_err() {
                    return sent;
                }
                sent += 1;
            }
        }
    }
}

/// Waits for every attack task: each must have been cut off by the server.
async fn all_closed(tasks: Vec<tokio::task::JoinHandle<usize>>) {
    let done = tokio::time::timeout(WAIT, futures::future::join_all(tasks))
        .await
        .expect("the server closed every slow connection although bytes kept coming");
    assert!(done.into_iter().all(|r| r.is_ok()));
}

async fn echo(c: &mcp_broker::proxy::backend::Backend, i: u64) {
    let text = format!("ping-{i}");
    let msg = tool(i, "echo", json!({"text": text}));
    let call = lease(c, &msg, None);
    let (status, msgs) = tokio::time::timeout(WAIT, call).await.expect("answered");
    assert_eq!(status, 200, "{msgs:?}");
    assert_eq!(text_of(msgs.last().unwrap()), text);
}

#[tokio::test]
async fn lease_api_slowloris_and_idle_connections_leave_callers_served() {
    let b = TestBroker::start_with(vec![fixture_pool("fx", &[])], |s| {
        s.front_door.header_timeout = Duration::from_secs(3);
        s.front_door.keepalive_timeout = Duration::from_secs(3);
    })
    .await;
    b.wait_idle("fx", 1).await;
    let mut idle = Vec::new();
    for _ in 0..1000 {
        idle.push(UnixStream::connect(&b.socket).await.unwrap());
    }
    let slow: Vec<_> = (0..20)
        .map(|_| {
            let path = b.socket.clone();
            tokio::spawn(async move { trickle(UnixStream::connect(path).await.unwrap()).await })
        })
        .collect();
    let c = b.client("fx");
    for i in 0..20 {
        echo(&c, i).await;
    }
    // The slow heads are cut off at header_timeout although bytes kept
    // coming, and the idle connections too.
    all_closed(slow).await;
    for s in &mut idle {
        assert_eq!(read_to_close(s).await, "", "closed without an answer");
    }
    echo(&c, 99).await;
    b.stop().await;
}

/// `GET /livez` on a kept-alive connection; true when answered 200.
async fn livez(s: &mut UnixStream) -> bool {
    if s.write_all(b"GET /livez HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 512];
    match tokio::time::timeout(WAIT, s.read(&mut buf)).await {
        Ok(Ok(n)) => buf[..n].starts_with(b"HTTP/1.1 200"),
        _ => false,
    }
}

/// Runs one `tools/call` through `mcp-broker connect` as uid/gid `id`;
/// returns the answer's text.
async fn call_as(id: u32, socket: &std::path::Path, pool: &str) -> String {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_mcp-broker"))
        .args(["connect", "--pool", pool, "--socket"])
        .arg(socket)
        .uid(id)
        .gid(id)
        .env("MCP_BROKER_LOG", "warn")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("mcp-broker connect starts");
    let init = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{
        "protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}});
    let note = json!({"jsonrpc":"2.0","method":"notifications/initialized"});
    let call = tool(1, "whoami", json!({}));
    let mut stdin = child.stdin.take().unwrap();
    for m in [init, note, call] {
        stdin.write_all(format!("{m}\n").as_bytes()).await.unwrap();
    }
    let mut out = String::new();
    let mut stdout = child.stdout.take().unwrap();
    let mut buf = [0u8; 4096];
    while !out.lines().any(|l| l.contains("\"id\":1")) {
        match tokio::time::timeout(WAIT, stdout.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.push_str(&String::from_utf8_lossy(&buf[..n])),
            r => panic!("no answer as uid {id}: {r:?}; got {out}"),
        }
    }
    drop(stdin);
    let _ = tokio::time::timeout(WAIT, child.wait()).await;
    let line = out.lines().find(|l| l.contains("\"id\":1")).unwrap();
    text_of(&serde_json::from_str(line).unwrap())
}

#[tokio::test]
async fn lease_api_connection_caps_are_per_peer() {
    // Needs root: the second peer is a client running as uid 65534.
    let b = TestBroker::start_with(vec![fixture_pool("fx", &[])], |s| {
        s.front_door.max_connections_per_peer = 50;
        s.front_door.max_connections = 100;
    })
    .await;
    b.wait_idle("fx", 1).await;
    let dir = b.socket.parent().unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(&b.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let mut mine = Vec::new();
    for _ in 0..50 {
        let mut s = UnixStream::connect(&b.socket).await.unwrap();
        assert!(livez(&mut s).await, "within the cap");
        mine.push(s);
    }
    // One more from the same peer: 429 with a JSON error, then closed.
    let mut over = UnixStream::connect(&b.socket).await.unwrap();
    let got = read_to_close(&mut over).await;
    assert!(got.starts_with("HTTP/1.1 429"), "{got}");
    let body: serde_json::Value = serde_json::from_str(got.split("\r\n\r\n").nth(1).unwrap())
        .unwrap_or_else(|e| panic!("JSON error body: {e}: {got}"));
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("too many connections from this peer (at most 50)"),
        "{body}"
    );
    // Another peer is served meanwhile.
    assert!(call_as(65534, &b.socket, "fx").await.starts_with("pid="));
    // A place given back is taken again.
    drop(mine.pop());
    let path = b.socket.clone();
    let mut again = None;
    for _ in 0..100 {
        let mut s = UnixStream::connect(&path).await.unwrap();
        if livez(&mut s).await {
            again = Some(s);
            break;
        }
    }
    assert!(again.is_some(), "a closed connection gives its place back");
    b.stop().await;
}

#[tokio::test]
async fn a_denied_body_is_never_read() {
    let mut locked = fixture_pool("locked", &[]);
    locked.allow = Some(vec![mcp_broker::policy::Rule {
        uid: Some(4242),
        ..Default::default()
    }]);
    let b = TestBroker::start(vec![locked]).await;
    // A megabyte announced, not one byte of it sent: refused from the head.
    let mut s = UnixStream::connect(&b.socket).await.unwrap();
    s.write_all(
        b"POST /v1/pools/locked/messages HTTP/1.1\r\ncontent-type: application/json\r\n\
          content-length: 1000000\r\n\r\n",
    )
    .await
    .unwrap();
    let got = read_to_close(&mut s).await;
    assert!(got.starts_with("HTTP/1.1 403"), "{got}");
    assert!(got.contains("may not use pool \\\"locked\\\""), "{got}");
    // Another caller's (or no) lease: not found, from the head too.
    let mut s = UnixStream::connect(&b.socket).await.unwrap();
    s.write_all(b"POST /v1/leases/0123456789abcdef0123 HTTP/1.1\r\ncontent-length: 100000\r\n\r\n")
        .await
        .unwrap();
    let got = read_to_close(&mut s).await;
    assert!(got.starts_with("HTTP/1.1 404"), "{got}");
    b.stop().await;
}

#[tokio::test]
async fn one_caller_flooding_a_queue_leaves_another_served() {
    let mut p = fixture_pool("fx", &[]);
    p.min_idle = 1;
    p.max = 1;
    p.queue_limit = 8;
    p.queue_timeout = WAIT;
    let b = TestBroker::start(vec![p]).await;
    b.broker.set_token_reviewer(Tokens);
    b.wait_idle("fx", 1).await;
    let dir = tempfile::tempdir().unwrap();
    let client = |token: &str| {
        let path = dir.path().join(token);
        std::fs::write(&path, token).unwrap();
        b.client("fx").with_token_file(path)
    };
    let (flooder, other) = (client("token-a"), client("token-b"));
    // Far more requests than the queue holds, each keeping the one process
    // busy for a while.
    let flood: Vec<_> = (0..40)
        .map(|i| {
            let c = flooder.clone();
            tokio::spawn(
                async move { lease(&c, &tool(i, "sleep", json!({"ms": 100})), None).await },
            )
        })
        .collect();
    b.wait_status("fx", |s| s.waiting >= 8).await;
    // The other caller still gets its place in the queue, and its turn.
    for i in 0..3 {
        let text = format!("b-{i}");
        let msg = tool(100 + i, "echo", json!({"text": text}));
        let call = lease(&other, &msg, None);
        let (status, msgs) = tokio::time::timeout(WAIT, call).await.expect("answered");
        assert_eq!(status, 200, "{msgs:?}");
        assert_eq!(text_of(msgs.last().unwrap()), text);
    }
    let mut full = 0;
    for t in flood {
        let (status, msgs) = tokio::time::timeout(WAIT, t).await.unwrap().unwrap();
        if status == 503 {
            assert_eq!(code_of(msgs.last().unwrap()), codes::QUEUE_FULL, "{msgs:?}");
            full += 1;
        }
    }
    assert!(
        full > 0,
        "the flooder was over the queue: some got queue full"
    );
    b.stop().await;
}

/// A TCP connection to `to` from `from` (another loopback address is
/// another peer).
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(format!("{from}:0").parse().unwrap()).unwrap();
    s.connect(to).await.unwrap()
}

fn addr_of(px: &TestProxy) -> SocketAddr {
    px.base.trim_start_matches("http://").parse().unwrap()
}

async fn mcp_call(url: &str, session: &str, i: u64) {
    let h = [JSON_SSE, CT_JSON, ("mcp-session-id", session)];
    let text = format!("px-{i}");
    let body = tool(i, "echo", json!({"text": text})).to_string();
    let r = send("POST", url, &h, &body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(text_of(&r.json()), text);
}

#[tokio::test]
async fn proxy_slowloris_and_idle_connections_leave_callers_served() {
    let b = TestBroker::start(vec![fixture_pool("fx", &[])]).await;
    b.wait_idle("fx", 1).await;
    let px = TestProxy::start_with(&b.socket, "fx", |s| {
        s.header_timeout = Duration::from_secs(3);
    })
    .await;
    let to = addr_of(&px);
    let mut idle = Vec::new();
    for _ in 0..1000 {
        idle.push(connect_from("127.0.0.2", to).await);
    }
    let slow: Vec<_> = (0..20)
        .map(|_| tokio::spawn(async move { trickle(connect_from("127.0.0.2", to).await).await }))
        .collect();
    let session = initialize(&px.url, "2025-11-25", json!({})).await;
    for i in 0..20 {
        mcp_call(&px.url, &session, i).await;
    }
    all_closed(slow).await;
    for s in &mut idle {
        read_to_close(s).await;
    }
    mcp_call(&px.url, &session, 99).await;
    px.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn proxy_connection_caps_are_per_address() {
    let b = TestBroker::start(vec![fixture_pool("fx", &[])]).await;
    b.wait_idle("fx", 1).await;
    let px = TestProxy::start_with(&b.socket, "fx", |s| {
        s.max_connections_per_peer = 10;
        s.max_connections = 20;
    })
    .await;
    let to = addr_of(&px);
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(connect_from("127.0.0.2", to).await);
    }
    let mut over = connect_from("127.0.0.2", to).await;
    let got = read_to_close(&mut over).await;
    assert!(got.starts_with("HTTP/1.1 429"), "{got}");
    assert!(got.contains("at most 10"), "{got}");
    // Another address is served.
    let session = initialize(&px.url, "2025-11-25", json!({})).await;
    mcp_call(&px.url, &session, 1).await;
    // Over the total: 503.
    for _ in 0..10 {
        held.push(connect_from("127.0.0.3", to).await);
    }
    let mut over = connect_from("127.0.0.4", to).await;
    let got = read_to_close(&mut over).await;
    assert!(got.starts_with("HTTP/1.1 503"), "{got}");
    drop(held);
    px.stop().await;
    b.stop().await;
}
