//! Per-pool access policy and tenant isolation through the real proxy and
//! broker: peer-uid rules with no Kubernetes, and ServiceAccount identities
//! verified by TokenReview against a mock API server.

#[path = "support/harness.rs"]
mod harness;

use harness::*;
use http::{Request, Response};
use kube::client::Body;
use mcp_broker::jsonrpc::codes;
use mcp_broker::policy::tokenreview::{TokenReviewer, DEFAULT_AUDIENCE};
use mcp_broker::policy::{Isolate, Rule};
use serde_json::{json, Value};
use std::time::Duration;

fn my_uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

async fn call(px: &TestProxy, text: &str) -> Value {
    let s = initialize(&px.url, "2025-06-18", json!({})).await;
    let r = send(
        "POST",
        &px.url,
        &[JSON_SSE, CT_JSON, ("mcp-session-id", &s)],
        &tool(1, "whoami", json!({"x": text})).to_string(),
    )
    .await;
    r.json()
}

#[tokio::test]
async fn peer_uid_rules_allow_and_deny() {
    let mut mine = fixture_pool("mine", &[]);
    mine.allow = Some(vec![Rule {
        uid: Some(my_uid()),
        ..Rule::default()
    }]);
    let mut theirs = fixture_pool("theirs", &[]);
    theirs.allow = Some(vec![Rule {
        uid: Some(my_uid() + 4242),
        ..Rule::default()
    }]);
    let b = TestBroker::start(vec![mine, theirs]).await;
    b.wait_idle("mine", 1).await;
    b.wait_idle("theirs", 1).await;
    let ok = TestProxy::start(&b, "mine").await;
    let denied = TestProxy::start(&b, "theirs").await;
    assert!(text_of(&call(&ok, "a").await).starts_with("pid="));
    let r = call(&denied, "b").await;
    assert_eq!(code_of(&r), codes::NOT_ALLOWED);
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("\"theirs\"") && msg.contains(&format!("uid {}", my_uid())),
        "{msg}"
    );
    let m = b.metrics.render();
    assert!(
        m.contains("mcp_broker_policy_denials_total{pool=\"theirs\"} 1"),
        "denial counted"
    );
    ok.stop().await;
    denied.stop().await;
    b.stop().await;
}

/// A reviewer whose mock API server knows `token-<ns>` as `<ns>/agent`.
fn mock_reviewer() -> TokenReviewer {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let body = req.into_body().collect_bytes().await.unwrap();
            let sent: Value = serde_json::from_slice(&body).unwrap();
            let token = sent["spec"]["token"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let status = match token.strip_prefix("token-") {
                Some(ns) => json!({"authenticated": true, "audiences": [DEFAULT_AUDIENCE],
                    "user": {"username": format!("system:serviceaccount:{ns}:agent")}}),
                None => json!({"authenticated": false, "error": "invalid bearer token"}),
            };
            let answer = json!({"apiVersion":"authentication.k8s.io/v1","kind":"TokenReview",
                "metadata":{},"spec":sent["spec"],"status":status});
            send.send_response(
                Response::builder()
                    .body(Body::from(answer.to_string().into_bytes()))
                    .unwrap(),
            );
        }
    });
    TokenReviewer::new(
        kube::Client::new(svc, "default"),
        DEFAULT_AUDIENCE.into(),
        Duration::from_secs(60),
        mcp_broker::config::front_door::DEFAULT_TOKEN_REVIEW_RATE,
        mcp_broker::config::front_door::DEFAULT_TOKEN_REVIEW_BURST,
    )
}

async fn proxy_with_token(
    b: &TestBroker,
    pool: &str,
    dir: &std::path::Path,
    token: &str,
) -> TestProxy {
    let path = dir.join(format!("{pool}-{token}"));
    std::fs::write(&path, token).unwrap();
    TestProxy::start_with(&b.socket, pool, |s| s.token_file = Some(path)).await
}

#[tokio::test]
async fn service_accounts_are_allowed_denied_and_isolated() {
    let mut team_a = fixture_pool("team-a-only", &[]);
    team_a.allow = Some(vec![Rule {
        namespace: Some("team-a".into()),
        ..Rule::default()
    }]);
    let mut iso = fixture_pool("isolated", &[]);
    iso.isolate = Isolate::Namespace;
    let b = TestBroker::start(vec![team_a, iso]).await;
    b.broker.set_token_reviewer(mock_reviewer());
    b.wait_idle("team-a-only", 1).await;
    let dir = tempfile::tempdir().unwrap();

    let a = proxy_with_token(&b, "team-a-only", dir.path(), "token-team-a").await;
    let bb = proxy_with_token(&b, "team-a-only", dir.path(), "token-team-b").await;
    let bad = proxy_with_token(&b, "team-a-only", dir.path(), "forged").await;
    assert!(text_of(&call(&a, "1").await).starts_with("pid="));
    let r = call(&bb, "2").await;
    assert_eq!(code_of(&r), codes::NOT_ALLOWED);
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("service account team-b/agent"),
        "{r}"
    );
    let r = call(&bad, "3").await;
    assert_eq!(code_of(&r), codes::NOT_ALLOWED);
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("invalid bearer token"),
        "{r}"
    );

    // Isolation: each namespace gets its own processes.
    let ia = proxy_with_token(&b, "isolated", dir.path(), "token-team-a").await;
    let ib = proxy_with_token(&b, "isolated", dir.path(), "token-team-b").await;
    let pid = |v: Value| text_of(&v).split(' ').next().unwrap().to_string();
    let mut pids_a = std::collections::HashSet::new();
    let mut pids_b = std::collections::HashSet::new();
    for i in 0..4 {
        pids_a.insert(pid(call(&ia, &format!("a{i}")).await));
        pids_b.insert(pid(call(&ib, &format!("b{i}")).await));
    }
    assert!(
        pids_a.is_disjoint(&pids_b),
        "tenants never share a process: {pids_a:?} {pids_b:?}"
    );
    assert!(
        b.broker.pool("isolated@team-a").is_none(),
        "tenant pools are not listed as pools"
    );
    // No token: isolation cannot place the caller.
    let anon = TestProxy::start(&b, "isolated").await;
    assert_eq!(code_of(&call(&anon, "x").await), codes::NOT_ALLOWED);
    for p in [a, bb, bad, ia, ib, anon] {
        p.stop().await;
    }
    b.stop().await;
}

#[tokio::test]
async fn lease_ids_and_session_keys_belong_to_their_caller() {
    let mut p = fixture_pool("x", &[]);
    p.mode = mcp_broker::config::Mode::Exclusive;
    p.min_idle = 2;
    p.max = 4;
    let b = TestBroker::start(vec![p]).await;
    b.broker.set_token_reviewer(Tokens);
    b.wait_idle("x", 2).await;
    let dir = tempfile::tempdir().unwrap();
    let client = |token: &str| {
        let path = dir.path().join(token);
        std::fs::write(&path, token).unwrap();
        b.client("x").with_token_file(path)
    };
    let (a, other) = (client("token-a"), client("token-b"));
    let id = mcp_broker::lease_api::new_lease_id();
    let running = {
        let (a, id) = (a.clone(), id.clone());
        tokio::spawn(async move {
            let msg = tool(1, "sleep", json!({"ms": 1500}));
            let mut l = a.lease(&msg, Some("s"), &id).await.unwrap();
            let mut last = Value::Null;
            while let Some(m) = l.lines.next().await {
                last = m.unwrap();
            }
            last
        })
    };
    let pool = b.broker.pool("x").unwrap();
    wait_until(Duration::from_secs(5), || pool.status().busy == 1).await;
    // Another caller who learned the id cannot cancel the lease: to it the
    // lease does not exist.
    let cancel = json!({"jsonrpc":"2.0","method":"notifications/cancelled",
        "params":{"requestId":1,"reason":"hijack"}});
    match other.deliver(&id, &cancel).await {
        Err(mcp_broker::proxy::backend::BackendError::Status { status, .. }) => {
            assert_eq!(status, 404)
        }
        r => panic!("another caller reached the lease: {r:?}"),
    }
    // It may use the same lease id and session key for its own lease: they
    // are its own, and its session gets a process of its own.
    let (status, msgs) = {
        let mut l = other
            .lease(&tool(2, "whoami", json!({})), Some("s"), &id)
            .await
            .unwrap();
        let mut out = Vec::new();
        while let Some(m) = l.lines.next().await {
            out.push(m.unwrap());
        }
        (l.status, out)
    };
    assert_eq!(status, 200, "{msgs:?}");
    let theirs = text_of(msgs.last().unwrap());
    let done = running.await.unwrap();
    assert!(
        done.get("result").is_some(),
        "the lease ran to its end: {done}"
    );
    let (_, mine) = lease(&a, &tool(3, "whoami", json!({})), Some("s")).await;
    let mine = text_of(mine.last().unwrap());
    let pid = |s: &str| s.split_whitespace().next().unwrap().to_string();
    assert_ne!(
        pid(&mine),
        pid(&theirs),
        "same session key, different callers"
    );
    b.stop().await;
}
