//! Input limits, each hit on purpose: HTTP head and body size at the proxy,
//! message size, sessions per proxy, and server→client requests waiting per
//! lease. Every one must answer with a clear error and leave the rest of the
//! system serving.

#[path = "support/harness.rs"]
mod harness;

use harness::*;
use mcp_broker::jsonrpc::codes;
use mcp_broker::process::router::{Action, LeaseEvent, Router};
use serde_json::{json, Value};

fn hdrs(session: &str) -> Vec<(&'static str, String)> {
    vec![
        (JSON_SSE.0, JSON_SSE.1.to_string()),
        (CT_JSON.0, CT_JSON.1.to_string()),
        ("mcp-session-id", session.to_string()),
    ]
}

async fn post(url: &str, h: &[(&'static str, String)], body: &str) -> Reply {
    let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    send("POST", url, &h, body).await
}

#[tokio::test]
async fn header_and_body_limits_at_the_proxy() {
    let b = TestBroker::start(vec![fixture_pool("fx", &[])]).await;
    b.wait_idle("fx", 1).await;
    let px = TestProxy::start_with(&b.socket, "fx", |s| {
        s.max_header_bytes = 16 * 1024;
        s.max_body = 4096;
    })
    .await;
    let url = px.url.clone();
    let session = initialize(&url, "2025-11-25", json!({})).await;
    let echo = tool(1, "echo", json!({"text": "ok"})).to_string();
    // Within both limits.
    let mut h = hdrs(&session);
    h.push(("x-padding", "p".repeat(4 * 1024)));
    let r = post(&url, &h, &echo).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // A head over the limit: 431, the proxy keeps serving.
    let mut h = hdrs(&session);
    h.push(("x-padding", "p".repeat(32 * 1024)));
    let r = post(&url, &h, &echo).await;
    assert_eq!(r.status, 431, "{}", r.body);
    // A body over the limit: 413 with a JSON-RPC error naming the limit.
    let big = tool(2, "echo", json!({"text": "x".repeat(8 * 1024)})).to_string();
    let r = post(&url, &hdrs(&session), &big).await;
    assert_eq!(r.status, 413, "{}", r.body);
    let e = r.json();
    assert_eq!(e["error"]["code"], codes::INVALID_REQUEST);
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("4096-byte limit"),
        "{e}"
    );
    let r = post(&url, &hdrs(&session), &echo).await;
    assert_eq!(text_of(&r.json()), "ok", "still serving");
    px.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn message_size_limit_answers_with_a_clear_error() {
    let b = TestBroker::start_with(vec![fixture_pool("fx", &[])], |s| {
        s.max_message_size = 64 * 1024;
    })
    .await;
    b.wait_idle("fx", 1).await;
    let px = TestProxy::start_with(&b.socket, "fx", |_| {}).await;
    let url = px.url.clone();
    let session = initialize(&url, "2025-11-25", json!({})).await;
    let huge = tool(7, "huge", json!({"bytes": 256 * 1024})).to_string();
    let r = post(&url, &hdrs(&session), &huge).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let e = r.json();
    assert_eq!(e["id"], 7);
    assert_eq!(e["error"]["code"], codes::MESSAGE_TOO_LARGE, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("65536-byte"),
        "{e}"
    );
    let ok = post(
        &url,
        &hdrs(&session),
        &tool(8, "echo", json!({"text": "after"})).to_string(),
    )
    .await;
    assert_eq!(text_of(&ok.json()), "after");
    px.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn sessions_per_proxy_are_capped() {
    let b = TestBroker::start(vec![fixture_pool("fx", &[])]).await;
    b.wait_idle("fx", 1).await;
    let px = TestProxy::start_with(&b.socket, "fx", |s| s.max_sessions = 2).await;
    let url = px.url.clone();
    let s1 = initialize(&url, "2025-11-25", json!({})).await;
    let _s2 = initialize(&url, "2025-11-25", json!({})).await;
    let body = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name":"test","version":"1"}}});
    let r = send("POST", &url, &[JSON_SSE, CT_JSON], &body.to_string()).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.header("retry-after").is_some());
    assert!(r.body.contains("max_sessions"), "{}", r.body);
    // Ending one makes room.
    let r = send("DELETE", &url, &[("mcp-session-id", s1.as_str())], "").await;
    assert!(r.status < 300, "{}", r.status);
    let _s3 = initialize(&url, "2025-11-25", json!({})).await;
    px.stop().await;
    b.stop().await;
}

#[test]
fn server_requests_per_lease_are_capped() {
    let mut r = Router::new(1);
    r.set_max_server_requests(3);
    let (tx, _rx) = tokio::sync::mpsc::channel(16);
    let mut req = tool(1, "sample", json!({"prompt": "p"}));
    let lid = r.begin(&mut req, tx);
    let ask = |n: u32| json!({"jsonrpc":"2.0","id":format!("s-{n}"),"method":"sampling/createMessage","params":{}});
    let mut broker_ids = Vec::new();
    for n in 0..3 {
        match r.route(ask(n)) {
            Action::ToLease(_, LeaseEvent::Message(m)) => broker_ids.push(m["id"].clone()),
            other => panic!("request {n} should reach the client: {other:?}"),
        }
    }
    let refused = match r.route(ask(3)) {
        Action::Reply(m) => m,
        other => panic!("the fourth must be refused to the server: {other:?}"),
    };
    assert_eq!(refused["id"], "s-3");
    assert_eq!(refused["error"]["code"], codes::INTERNAL_ERROR);
    let msg = refused["error"]["message"].as_str().unwrap();
    assert!(msg.contains("max_server_requests = 3"), "{msg}");
    // The client answers one: room for one more.
    let answer = json!({"jsonrpc":"2.0","id":broker_ids[0],"result":{}});
    let back: Value = r.deliver(lid, answer).unwrap();
    assert_eq!(back["id"], "s-0");
    assert!(matches!(r.route(ask(4)), Action::ToLease(..)));
    assert!(matches!(r.route(ask(5)), Action::Reply(_)));
}

#[test]
fn limit_flags_are_validated() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mcp-broker"))
        .args(["up", "--max-header-bytes", "100", "--", "true"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--max-header-bytes") && err.contains("8192"),
        "{err}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mcp-broker"))
        .args(["proxy", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--max-body-bytes", "--max-header-bytes", "--max-sessions"] {
        assert!(help.contains(flag), "{flag} missing from proxy --help");
    }
}

#[test]
fn pool_limit_config_is_validated() {
    let cfg = mcp_broker::config::Config::from_toml(
        "[[pool]]\nname = \"p\"\ncommand = \"x\"\nmax_server_requests = 0\n",
    );
    let e = cfg.unwrap_err().to_string();
    assert!(
        e.contains("pool \"p\"") && e.contains("max_server_requests"),
        "{e}"
    );
    let ok =
        mcp_broker::config::Config::from_toml("[[pool]]\nname = \"p\"\ncommand = \"x\"\n").unwrap();
    assert_eq!(ok.pools[0].max_server_requests, 64);
}

#[tokio::test]
async fn notification_streams_are_capped_per_session_and_in_all() {
    let b = TestBroker::start(vec![fixture_pool("fx", &[])]).await;
    b.wait_idle("fx", 1).await;
    let px = TestProxy::start_with(&b.socket, "fx", |s| {
        s.max_streams = 2;
        s.max_streams_per_session = 1;
    })
    .await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let open = |session: String| {
        let client = client.clone();
        let url = px.url.clone();
        async move {
            let req = http::Request::get(&url)
                .header("accept", "text/event-stream")
                .header("mcp-session-id", session)
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            client.request(req).await.unwrap()
        }
    };
    let (s1, s2, s3) = (
        initialize(&px.url, "2025-06-18", json!({})).await,
        initialize(&px.url, "2025-06-18", json!({})).await,
        initialize(&px.url, "2025-06-18", json!({})).await,
    );
    let first = open(s1.clone()).await;
    assert_eq!(first.status(), 200);
    let again = open(s1.clone()).await;
    assert_eq!(again.status(), 429, "a second stream of one session");
    let second = open(s2).await;
    assert_eq!(second.status(), 200);
    let third = open(s3).await;
    assert_eq!(third.status(), 429, "over the proxy's total");
    // Closing a stream gives its place back.
    drop(first);
    let gauge = px.metrics.sse_streams.with_label_values(&["listen"]);
    wait_until(std::time::Duration::from_secs(5), || gauge.get() == 1).await;
    let reopened = open(s1).await;
    assert_eq!(reopened.status(), 200);
    drop((second, reopened));
    px.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_foreign_host_on_a_loopback_listener_is_refused() {
    let b = TestBroker::start(vec![fixture_pool("fx", &[])]).await;
    b.wait_idle("fx", 1).await;
    let px = TestProxy::start(&b, "fx").await;
    let init = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{
        "protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}});
    // DNS rebinding: a page's own name resolving to 127.0.0.1.
    let r = send(
        "POST",
        &px.url,
        &[JSON_SSE, CT_JSON, ("host", "evil.example:8080")],
        &init.to_string(),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("evil.example"), "{}", r.body);
    let ok = send("POST", &px.url, &[JSON_SSE, CT_JSON], &init.to_string()).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    px.stop().await;
    b.stop().await;
}
