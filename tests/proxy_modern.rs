//! The proxy's 2026-07-28 (stateless) rules over raw HTTP: header checks,
//! discover, result completion, SSE, cancellation by closing the stream,
//! and multi-round-trip requests bridged to a handshake-era server.

#[path = "support/harness.rs"]
mod harness;

use harness::*;
use mcp_broker::jsonrpc::codes;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const V: &str = "2026-07-28";

async fn setup(args: &[&str], max: usize) -> (TestBroker, TestProxy) {
    let mut p = fixture_pool("fx", args);
    p.max = max;
    let b = TestBroker::start(vec![p]).await;
    b.wait_idle("fx", 1).await;
    let px = TestProxy::start(&b, "fx").await;
    (b, px)
}

fn request(id: u64, method: &str, mut params: Value, caps: Value) -> Value {
    params["_meta"] = json!({
        "io.modelcontextprotocol/protocolVersion": V,
        "io.modelcontextprotocol/clientInfo": {"name": "t", "version": "1"},
        "io.modelcontextprotocol/clientCapabilities": caps,
    });
    json!({"jsonrpc":"2.0","id":id,"method":method,"params":params})
}

async fn post(url: &str, msg: &Value) -> Reply {
    let method = msg["method"].as_str().unwrap().to_string();
    let name = msg["params"]["name"]
        .as_str()
        .or(msg["params"]["uri"].as_str())
        .map(str::to_string);
    let mut h = vec![
        JSON_SSE,
        CT_JSON,
        ("mcp-protocol-version", V),
        ("mcp-method", method.as_str()),
    ];
    if let Some(n) = &name {
        h.push(("mcp-name", n.as_str()));
    }
    send("POST", url, &h, &msg.to_string()).await
}

fn call(id: u64, name: &str, args: Value, caps: Value) -> Value {
    request(
        id,
        "tools/call",
        json!({"name": name, "arguments": args}),
        caps,
    )
}

#[tokio::test]
async fn discover_and_complete_results() {
    let (b, px) = setup(&[], 2).await;
    let r = post(
        &px.url,
        &request(1, "server/discover", json!({}), json!({})),
    )
    .await;
    assert_eq!(r.status, 200);
    let d = r.json()["result"].clone();
    assert_eq!(d["supportedVersions"], json!([V]));
    assert_eq!(d["resultType"], "complete");
    assert_eq!(
        d["_meta"]["io.modelcontextprotocol/serverInfo"]["name"],
        "mcp-fixture"
    );
    assert!(
        r.header("mcp-session-id").is_none(),
        "no sessions in this era"
    );
    let l = post(&px.url, &request(2, "tools/list", json!({}), json!({})))
        .await
        .json();
    assert_eq!(l["result"]["resultType"], "complete");
    assert!(l["result"]["ttlMs"].is_number() && l["result"]["cacheScope"].is_string());
    assert!(l["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["name"] == "echo"));
    let c = post(
        &px.url,
        &call(3, "echo", json!({"text": "modern"}), json!({})),
    )
    .await
    .json();
    assert_eq!(text_of(&c), "modern");
    assert_eq!(c["result"]["resultType"], "complete");
    // A session header from an old client library is ignored.
    let mut h = vec![
        JSON_SSE,
        CT_JSON,
        ("mcp-protocol-version", V),
        ("mcp-method", "tools/call"),
        ("mcp-name", "echo"),
    ];
    h.push(("mcp-session-id", "stale"));
    let r = send(
        "POST",
        &px.url,
        &h,
        &call(4, "echo", json!({"text":"x"}), json!({})).to_string(),
    )
    .await;
    assert_eq!(r.status, 200);
    px.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn header_rules() {
    let (b, px) = setup(&[], 2).await;
    let body = call(1, "echo", json!({"text":"x"}), json!({})).to_string();
    let base = [
        JSON_SSE,
        CT_JSON,
        ("mcp-protocol-version", V),
        ("mcp-method", "tools/call"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut h = base.to_vec();
        h.extend_from_slice(extra);
        h
    };
    let r = send("POST", &px.url, &with(&[("mcp-name", "other")]), &body).await;
    assert_eq!(
        (r.status, code_of(&r.json())),
        (400, codes::HEADER_MISMATCH)
    );
    assert_eq!(r.json()["id"], 1);
    let r = send("POST", &px.url, &base, &body).await;
    assert_eq!(
        (r.status, code_of(&r.json())),
        (400, codes::HEADER_MISMATCH),
        "Mcp-Name required"
    );
    let h = [
        JSON_SSE,
        CT_JSON,
        ("mcp-protocol-version", V),
        ("mcp-method", "tools/list"),
        ("mcp-name", "echo"),
    ];
    let r = send("POST", &px.url, &h, &body).await;
    assert_eq!(
        code_of(&r.json()),
        codes::HEADER_MISMATCH,
        "Mcp-Method must match"
    );
    let mut old = call(2, "echo", json!({"text":"x"}), json!({}));
    old["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"] = json!("2099-01-01");
    let h = [
        JSON_SSE,
        CT_JSON,
        ("mcp-protocol-version", "2099-01-01"),
        ("mcp-method", "tools/call"),
        ("mcp-name", "echo"),
    ];
    let r = send("POST", &px.url, &h, &old.to_string()).await;
    assert_eq!(
        (r.status, code_of(&r.json())),
        (400, codes::UNSUPPORTED_VERSION)
    );
    assert_eq!(r.json()["error"]["data"]["requested"], "2099-01-01");
    assert!(r.json()["error"]["data"]["supported"]
        .as_array()
        .unwrap()
        .contains(&json!(V)));
    let r = send(
        "POST",
        &px.url,
        &with(&[("mcp-name", "echo")]),
        &call(3, "echo", json!({"text":"x"}), json!({})).to_string(),
    )
    .await;
    assert_eq!(r.status, 200);
    let r = post(&px.url, &request(4, "no/such", json!({}), json!({}))).await;
    assert_eq!(
        (r.status, code_of(&r.json())),
        (404, codes::METHOD_NOT_FOUND)
    );
    assert_eq!(
        send("GET", &px.url, &[JSON_SSE, ("mcp-protocol-version", V)], "")
            .await
            .status,
        405
    );
    assert_eq!(
        send("DELETE", &px.url, &[("mcp-protocol-version", V)], "")
            .await
            .status,
        405
    );
    px.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn sse_progress_and_close_to_cancel() {
    let (b, px) = setup(&[], 1).await;
    let mut m = call(1, "sleep", json!({"ms": 300, "steps": 3}), json!({}));
    m["params"]["_meta"]["progressToken"] = json!(1);
    let r = post(&px.url, &m).await;
    let msgs = sse_messages(&r.body);
    assert_eq!(msgs.len(), 4);
    assert_eq!(msgs[3]["result"]["resultType"], "complete");
    // Close a long request's stream: the lone process must be freed.
    let mut m = call(2, "sleep", json!({"ms": 60_000, "steps": 60}), json!({}));
    m["params"]["_meta"]["progressToken"] = json!(2);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let req = http::Request::post(&px.url)
        .header("accept", "application/json, text/event-stream")
        .header("content-type", "application/json")
        .header("mcp-protocol-version", V)
        .header("mcp-method", "tools/call")
        .header("mcp-name", "sleep")
        .body(http_body_util::Full::new(bytes::Bytes::from(m.to_string())))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .unwrap()
        .unwrap();
    use http_body_util::BodyExt;
    let mut body = resp.into_body();
    let _first = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .unwrap();
    drop(body);
    drop(client);
    let started = Instant::now();
    let r = post(&px.url, &call(3, "echo", json!({"text":"free"}), json!({}))).await;
    assert_eq!(text_of(&r.json()), "free");
    assert!(started.elapsed() < Duration::from_secs(10));
    px.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn input_required_round_trip_is_signed_and_single_use() {
    let (b, px) = setup(&[], 2).await;
    let caps = json!({"sampling": {}});
    let r = post(
        &px.url,
        &call(1, "sample", json!({"prompt": "2+2?"}), caps.clone()),
    )
    .await
    .json();
    assert_eq!(r["id"], 1);
    let res = &r["result"];
    assert_eq!(res["resultType"], "input_required");
    let (key, ask) = res["inputRequests"]
        .as_object()
        .unwrap()
        .iter()
        .next()
        .unwrap();
    assert_eq!(ask["method"], "sampling/createMessage");
    assert_eq!(ask["params"]["messages"][0]["content"]["text"], "2+2?");
    let state = res["requestState"].as_str().unwrap().to_string();
    // A forged state is refused and the real one still works.
    let mut forged = call(2, "sample", json!({"prompt": "2+2?"}), caps.clone());
    forged["params"]["requestState"] = json!(format!("{}x", state));
    forged["params"]["inputResponses"] =
        json!({key: {"role":"assistant","content":{"type":"text","text":"5"},"model":"m"}});
    let r = post(&px.url, &forged).await.json();
    assert_eq!(code_of(&r), codes::INVALID_PARAMS);
    let mut retry = call(3, "sample", json!({"prompt": "2+2?"}), caps.clone());
    retry["params"]["requestState"] = json!(state);
    retry["params"]["inputResponses"] =
        json!({key: {"role":"assistant","content":{"type":"text","text":"4"},"model":"m"}});
    let r = post(&px.url, &retry).await.json();
    assert_eq!(r["id"], 3, "answered under the retry's id");
    assert_eq!(text_of(&r), "4");
    assert_eq!(r["result"]["resultType"], "complete");
    let r = post(&px.url, &retry).await.json();
    assert_eq!(code_of(&r), codes::INVALID_PARAMS, "single use");
    // Without the capability, the server's question is refused, not relayed.
    let r = post(
        &px.url,
        &call(4, "sample", json!({"prompt": "x"}), json!({})),
    )
    .await
    .json();
    assert!(text_of(&r).starts_with("error"));
    px.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn stateless_backend_serves_both_eras() {
    let (b, px) = setup(&["--era", "stateless"], 2).await;
    let d = post(
        &px.url,
        &request(1, "server/discover", json!({}), json!({})),
    )
    .await
    .json();
    assert_eq!(d["result"]["supportedVersions"], json!([V]));
    let c = post(&px.url, &call(2, "echo", json!({"text": "m"}), json!({})))
        .await
        .json();
    assert_eq!(text_of(&c), "m");
    // A handshake-era client of a stateless server.
    let s = initialize(&px.url, "2025-06-18", json!({})).await;
    let r = send(
        "POST",
        &px.url,
        &[JSON_SSE, CT_JSON, ("mcp-session-id", &s)],
        &tool(3, "echo", json!({"text": "legacy"})).to_string(),
    )
    .await;
    assert_eq!(text_of(&r.json()), "legacy");
    // The stateless server's InputRequiredResult becomes a sampling request
    // on the legacy client's stream, and the proxy retries with the answer.
    let s = initialize(&px.url, "2025-06-18", json!({"sampling": {}})).await;
    let msgs = sse_round_trip(
        &px.url,
        &s,
        &tool(4, "sample", json!({"prompt": "2+2?"})),
        |req| {
            assert_eq!(req["method"], "sampling/createMessage");
            json!({"role": "assistant", "content": {"type": "text", "text": "4"}, "model": "m"})
        },
    )
    .await;
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    assert_eq!(text_of(&msgs[1]), "4");
    // Without the capability: a clear error, no question.
    let s = initialize(&px.url, "2025-06-18", json!({})).await;
    let r = send(
        "POST",
        &px.url,
        &[JSON_SSE, CT_JSON, ("mcp-session-id", &s)],
        &tool(5, "sample", json!({"prompt": "x"})).to_string(),
    )
    .await;
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("sampling"),
        "{}",
        r.body
    );
    px.stop().await;
    b.stop().await;
}
