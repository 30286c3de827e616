//! The proxy's handshake-era Streamable HTTP rules, over raw HTTP, against
//! the fixture server behind a real broker.

#[path = "support/harness.rs"]
mod harness;

use harness::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

async fn setup(args: &[&str], max: usize) -> (TestBroker, TestProxy) {
    let mut p = fixture_pool("fx", args);
    p.max = max;
    let b = TestBroker::start(vec![p]).await;
    b.wait_idle("fx", 1).await;
    let px = TestProxy::start(&b, "fx").await;
    (b, px)
}

fn hdrs(session: &str) -> Vec<(&str, &str)> {
    vec![
        JSON_SSE,
        CT_JSON,
        ("mcp-session-id", session),
        ("mcp-protocol-version", "2025-06-18"),
    ]
}

async fn post(url: &str, session: &str, msg: &Value) -> Reply {
    send("POST", url, &hdrs(session), &msg.to_string()).await
}

#[tokio::test]
async fn initialize_is_answered_from_cache_and_negotiates() {
    let (b, px) = setup(&[], 2).await;
    let before = procs_with_tag(&b.tag);
    let body = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{
        "protocolVersion":"2025-03-26","capabilities":{},"clientInfo":{"name":"t","version":"1"}}});
    let r = send("POST", &px.url, &[JSON_SSE, CT_JSON], &body.to_string()).await;
    assert_eq!(r.status, 200);
    assert!(r.header("mcp-session-id").unwrap().len() >= 32);
    let v = r.json();
    assert_eq!(v["result"]["protocolVersion"], "2025-03-26");
    assert_eq!(v["result"]["serverInfo"]["name"], "mcp-fixture");
    assert_eq!(v["result"]["capabilities"]["tools"]["listChanged"], true);
    let body = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{
        "protocolVersion":"1999-01-01","capabilities":{},"clientInfo":{"name":"t","version":"1"}}});
    let v = send("POST", &px.url, &[JSON_SSE, CT_JSON], &body.to_string())
        .await
        .json();
    assert_eq!(
        v["result"]["protocolVersion"], "2025-11-25",
        "unknown version: server's own"
    );
    assert_eq!(
        procs_with_tag(&b.tag),
        before,
        "no process started for a handshake"
    );
    px.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn session_lifecycle() {
    let (b, px) = setup(&[], 2).await;
    let s = initialize(&px.url, "2025-06-18", json!({})).await;
    let note = json!({"jsonrpc":"2.0","method":"notifications/initialized"});
    assert_eq!(post(&px.url, &s, &note).await.status, 202);
    let r = post(&px.url, &s, &tool(1, "echo", json!({"text":"hi"}))).await;
    assert_eq!(r.status, 200);
    assert!(r.content_type().starts_with("application/json"));
    assert_eq!(text_of(&r.json()), "hi");
    let ping = post(
        &px.url,
        &s,
        &json!({"jsonrpc":"2.0","id":2,"method":"ping"}),
    )
    .await;
    assert_eq!(ping.json()["result"], json!({}));
    // No session: 400; unknown session: 404.
    let r = send(
        "POST",
        &px.url,
        &[JSON_SSE, CT_JSON],
        &tool(3, "echo", json!({"text":"x"})).to_string(),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        post(&px.url, "nope", &tool(4, "echo", json!({"text":"x"})))
            .await
            .status,
        404
    );
    // DELETE ends it.
    let r = send("DELETE", &px.url, &[("mcp-session-id", &s)], "").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        post(&px.url, &s, &tool(5, "echo", json!({"text":"x"})))
            .await
            .status,
        404
    );
    assert_eq!(
        send("DELETE", &px.url, &[("mcp-session-id", &s)], "")
            .await
            .status,
        404
    );
    px.stop().await;
    b.stop().await;
}

/// Plain requests and answers cross proxy and broker as text with only
/// their ids swapped (`jsonrpc::raw`); escapes send a message the parsed
/// way. Both must give the client its own id and the server's answer.
#[tokio::test]
async fn plain_and_escaped_requests_keep_ids_and_text() {
    let (b, px) = setup(&[], 1).await;
    let s = initialize(&px.url, "2025-06-18", json!({})).await;
    let odd_id = "q\"1 ✓";
    let text = "line\n\"quoted\" ünïcode";
    // Pretty-printed, members in an unusual order: taken as text.
    let plain = serde_json::to_string_pretty(&json!({
        "params": {"name": "echo", "arguments": {"text": text}},
        "method": "tools/call", "id": odd_id, "jsonrpc": "2.0"}))
    .unwrap();
    // The same request with a `\u` escape: taken parsed.
    let escaped = plain.replacen("ünïcode", "\\u00fcn\\u00efcode", 1);
    assert_ne!(plain, escaped);
    for body in [&plain, &escaped] {
        let r = send("POST", &px.url, &hdrs(&s), body).await;
        assert_eq!(r.status, 200, "{body}");
        let v = r.json();
        assert_eq!(v["id"], odd_id, "{body}");
        assert_eq!(text_of(&v), text, "{body}");
    }
    // A numeric id stays a number.
    let r = post(&px.url, &s, &tool(41, "echo", json!({"text": "n"}))).await;
    assert_eq!(r.json()["id"], 41);
    px.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn progress_rides_sse_in_order_and_json_only_clients_get_json() {
    let (b, px) = setup(&[], 2).await;
    let s = initialize(&px.url, "2025-06-18", json!({})).await;
    let mut msg = tool(1, "sleep", json!({"ms": 300, "steps": 3}));
    msg["params"]["_meta"] = json!({"progressToken": "p1"});
    let r = post(&px.url, &s, &msg).await;
    assert!(
        r.content_type().starts_with("text/event-stream"),
        "{}",
        r.content_type()
    );
    let msgs = sse_messages(&r.body);
    assert_eq!(msgs.len(), 4, "{msgs:?}");
    for (i, m) in msgs[..3].iter().enumerate() {
        assert_eq!(m["method"], "notifications/progress");
        assert_eq!(m["params"]["progressToken"], "p1");
        assert_eq!(m["params"]["progress"], (i + 1) as u64);
    }
    assert_eq!(msgs[3]["id"], 1);
    let r = send(
        "POST",
        &px.url,
        &[
            ("accept", "application/json"),
            CT_JSON,
            ("mcp-session-id", &s),
        ],
        &msg.to_string(),
    )
    .await;
    assert!(r.content_type().starts_with("application/json"));
    assert_eq!(text_of(&r.json()), "slept 300");
    px.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn sampling_round_trip_over_sse() {
    let (b, px) = setup(&[], 2).await;
    let s = initialize(&px.url, "2025-06-18", json!({"sampling": {}})).await;
    let msgs = sse_round_trip(
        &px.url,
        &s,
        &tool(9, "sample", json!({"prompt": "2+2?"})),
        |req| {
            assert_eq!(req["method"], "sampling/createMessage");
            assert_eq!(req["params"]["messages"][0]["content"]["text"], "2+2?");
            json!({"role": "assistant", "content": {"type": "text", "text": "4"}, "model": "m"})
        },
    )
    .await;
    assert_eq!(text_of(msgs.last().unwrap()), "4");
    // The answer cannot be delivered twice.
    let again = json!({"jsonrpc":"2.0","id":msgs[0]["id"],"result":{}});
    assert_eq!(post(&px.url, &s, &again).await.status, 400);
    // Without the capability the server's request is refused for the client.
    let s2 = initialize(&px.url, "2025-06-18", json!({})).await;
    let r = post(&px.url, &s2, &tool(10, "sample", json!({"prompt": "x"}))).await;
    assert!(text_of(&r.json()).starts_with("error"), "{}", r.body);
    px.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn cancellation_frees_the_process() {
    let (b, px) = setup(&[], 1).await;
    let s = initialize(&px.url, "2025-06-18", json!({})).await;
    let slow = tokio::spawn({
        let (url, s) = (px.url.clone(), s.clone());
        async move { post(&url, &s, &tool(1, "sleep", json!({"ms": 60_000}))).await }
    });
    // On the process (the proxy tracks a request before it sends it).
    b.wait_status("fx", |st| st.busy == 1).await;
    let cancel = json!({"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":1,"reason":"user"}});
    assert_eq!(post(&px.url, &s, &cancel).await.status, 202);
    let started = Instant::now();
    let r = post(&px.url, &s, &tool(2, "echo", json!({"text":"next"}))).await;
    assert_eq!(text_of(&r.json()), "next");
    assert!(started.elapsed() < Duration::from_secs(10));
    let slow = slow.await.unwrap();
    assert_eq!(code_of(&slow.json()), mcp_broker::jsonrpc::codes::CANCELLED);
    px.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn get_stream_carries_list_changed() {
    let (b, px) = setup(&[], 2).await;
    let s = initialize(&px.url, "2025-06-18", json!({})).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let req = http::Request::get(&px.url)
        .header("accept", "text/event-stream")
        .header("mcp-session-id", &s)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    // The proxy answers only once the broker's event stream is open (and
    // the broker subscribes before it answers): nothing to wait for.
    assert_eq!(
        px.metrics.sse_streams.with_label_values(&["listen"]).get(),
        1
    );
    let r = post(&px.url, &s, &tool(1, "list_changed", json!({}))).await;
    assert_eq!(text_of(&r.json()), "ok");
    use http_body_util::BodyExt;
    let mut body = resp.into_body();
    let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let msgs = sse_messages(&String::from_utf8_lossy(&frame.into_data().unwrap()));
    assert_eq!(msgs[0]["method"], "notifications/tools/list_changed");
    // GET needs a session and an SSE Accept.
    assert_eq!(
        send("GET", &px.url, &[("accept", "text/event-stream")], "")
            .await
            .status,
        405
    );
    assert_eq!(
        send(
            "GET",
            &px.url,
            &[("accept", "application/json"), ("mcp-session-id", &s)],
            ""
        )
        .await
        .status,
        406
    );
    drop(body);
    px.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn bad_input_gets_clear_errors() {
    let (b, px) = setup(&[], 2).await;
    let s = initialize(&px.url, "2025-06-18", json!({})).await;
    let h = hdrs(&s);
    let r = send("POST", &px.url, &h, "{not json").await;
    assert_eq!(r.status, 400);
    assert_eq!(code_of(&r.json()), -32700);
    let r = send("POST", &px.url, &h, "[]").await;
    assert_eq!(r.status, 400);
    assert!(r.body.contains("batch"));
    let r = send(
        "POST",
        &px.url,
        &[
            JSON_SSE,
            ("content-type", "text/plain"),
            ("mcp-session-id", &s),
        ],
        "{}",
    )
    .await;
    assert_eq!(r.status, 415);
    let r = send(
        "POST",
        &px.url,
        &[("accept", "text/html"), CT_JSON, ("mcp-session-id", &s)],
        "{}",
    )
    .await;
    assert_eq!(r.status, 406);
    let mut evil = h.clone();
    evil.push(("origin", "https://evil.example"));
    assert_eq!(
        send(
            "POST",
            &px.url,
            &evil,
            &tool(1, "echo", json!({"text":"x"})).to_string()
        )
        .await
        .status,
        403
    );
    let big = "x".repeat(17 << 20);
    assert_eq!(send("POST", &px.url, &h, &big).await.status, 413);
    let r = send(
        "POST",
        &px.url,
        &h,
        &json!({"jsonrpc":"2.0","id":1}).to_string(),
    )
    .await;
    assert_eq!(r.status, 400);
    let mut wrong = h.clone();
    wrong[3] = ("mcp-protocol-version", "1999-01-01");
    assert_eq!(
        send(
            "POST",
            &px.url,
            &wrong,
            &tool(1, "echo", json!({"text":"x"})).to_string()
        )
        .await
        .status,
        400
    );
    assert_eq!(send("PUT", &px.url, &h, "{}").await.status, 405);
    assert_eq!(
        send("GET", &format!("{}/nope", px.base), &[], "")
            .await
            .status,
        404
    );
    // The proxy still serves after all that.
    assert_eq!(
        text_of(
            &post(&px.url, &s, &tool(2, "echo", json!({"text":"ok"})))
                .await
                .json()
        ),
        "ok"
    );
    px.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn broker_errors_map_to_clear_answers() {
    let mut p = fixture_pool("fx", &[]);
    p.max = 1;
    p.queue_limit = 1;
    let b = TestBroker::start(vec![p]).await;
    b.wait_idle("fx", 1).await;
    let px = TestProxy::start(&b, "fx").await;
    let s = initialize(&px.url, "2025-06-18", json!({})).await;
    // The only process is held (straight at the broker), one call queues
    // behind it, and the queue is full.
    let direct = b.client("fx");
    let hold = Held::start(&direct, 1).await;
    let queued = tokio::spawn({
        let (url, s) = (px.url.clone(), s.clone());
        async move { post(&url, &s, &tool(4, "echo", json!({"text":"queued"}))).await }
    });
    b.wait_status("fx", |st| st.waiting == 1).await;
    let r = post(&px.url, &s, &tool(5, "echo", json!({"text":"x"}))).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after").as_deref(), Some("1"));
    assert_eq!(r.json()["id"], 5);
    assert_eq!(code_of(&r.json()), mcp_broker::jsonrpc::codes::QUEUE_FULL);
    hold.finish(&direct, "done").await;
    assert_eq!(text_of(&queued.await.unwrap().json()), "queued");
    let r = post(&px.url, &s, &tool(6, "crash", json!({}))).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        code_of(&r.json()),
        mcp_broker::jsonrpc::codes::PROCESS_EXITED
    );
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("exited"));
    b.stop().await;
    // Broker gone: a clear 503 after the bounded reconnect window.
    let r = post(&px.url, &s, &tool(7, "echo", json!({"text":"x"}))).await;
    assert_eq!(r.status, 503);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("unreachable"));
    assert_eq!(
        send("GET", &format!("{}/readyz", px.base), &[], "")
            .await
            .status,
        503
    );
    px.stop().await;
}
