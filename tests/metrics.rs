//! Metrics move as traffic says: known traffic (echo calls, a crash, garbage
//! stdout, a queue-full rejection, an oversized body, an open SSE stream, an
//! unreachable broker) through a real broker and proxy, then `/metrics` of
//! both is scraped over HTTP and the counters and histogram counts checked.

#[path = "support/harness.rs"]
mod harness;

use bytes::Bytes;
use harness::*;
use http_body_util::{BodyExt, Full};
use serde_json::json;
use std::time::Duration;

/// The value of the sample `name{labels…}` in Prometheus text (0 if absent).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, "}"));
            if n != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
        .next()
        .unwrap_or(0.0)
}

/// Scrapes the broker's `/metrics` over its Unix socket (the lease API).
async fn scrape_broker(b: &TestBroker) -> String {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, Full<Bytes>>(hyperlocal::UnixConnector);
    let uri: hyper::Uri = hyperlocal::Uri::new(&b.socket, "/metrics").into();
    let r = tokio::time::timeout(Duration::from_secs(10), client.get(uri))
        .await
        .expect("scrape in time")
        .expect("broker reachable");
    assert_eq!(r.status(), 200);
    let body = r.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

async fn scrape_proxy(base: &str) -> String {
    let r = send("GET", &format!("{base}/metrics"), &[], "").await;
    assert_eq!(r.status, 200);
    r.body
}

fn hdrs(session: &str) -> Vec<(&str, &str)> {
    vec![
        JSON_SSE,
        CT_JSON,
        ("mcp-session-id", session),
        ("mcp-protocol-version", "2025-06-18"),
    ]
}

#[tokio::test]
async fn counters_and_histograms_follow_traffic() {
    let mut p = fixture_pool("fx", &[]);
    p.max = 1;
    p.queue_limit = 1;
    let b = TestBroker::start(vec![p]).await;
    b.wait_idle("fx", 1).await;
    let px = TestProxy::start_with(&b.socket, "fx", |s| s.max_body = 4096).await;
    let fx = [("pool", "fx")];

    // Before traffic: per-pool counters exist at zero.
    let m = scrape_broker(&b).await;
    assert!(
        m.contains("mcp_broker_policy_denials_total{pool=\"fx\"} 0"),
        "{m}"
    );
    assert!(m.contains("mcp_broker_rejections_total{pool=\"fx\",reason=\"queue_full\"} 0"));
    assert_eq!(sample(&m, "mcp_broker_spawns_total", &fx), 1.0);
    assert_eq!(
        sample(
            &m,
            "mcp_broker_processes",
            &[("pool", "fx"), ("state", "idle")]
        ),
        1.0
    );

    // Three echo calls in one session.
    let s = initialize(&px.url, "2025-06-18", json!({})).await;
    for i in 0..3 {
        let r = send(
            "POST",
            &px.url,
            &hdrs(&s),
            &tool(i, "echo", json!({"text": "hi"})).to_string(),
        )
        .await;
        assert_eq!(text_of(&r.json()), "hi");
    }
    let m = scrape_broker(&b).await;
    assert_eq!(
        sample(
            &m,
            "mcp_broker_requests_total",
            &[("pool", "fx"), ("outcome", "ok")]
        ),
        3.0
    );
    let calls = [("pool", "fx"), ("method", "tools/call")];
    assert_eq!(
        sample(&m, "mcp_broker_request_duration_seconds_count", &calls),
        3.0
    );
    assert_eq!(sample(&m, "mcp_broker_lease_wait_seconds_count", &fx), 3.0);
    let pm = scrape_proxy(&px.base).await;
    assert_eq!(sample(&pm, "mcp_proxy_sessions", &fx), 1.0);
    assert_eq!(
        sample(
            &pm,
            "mcp_proxy_http_requests_total",
            &[("method", "POST"), ("status", "200")]
        ),
        4.0
    );

    // Garbage on stdout is skipped and counted.
    let r = send(
        "POST",
        &px.url,
        &hdrs(&s),
        &tool(10, "garbage", json!({"lines": 3})).to_string(),
    )
    .await;
    assert_eq!(r.status, 200);
    let m = scrape_broker(&b).await;
    assert_eq!(
        sample(
            &m,
            "mcp_broker_skipped_lines_total",
            &[("pool", "fx"), ("kind", "not_json")]
        ),
        3.0
    );

    // A crash: one error, one exit, one respawn.
    let r = send(
        "POST",
        &px.url,
        &hdrs(&s),
        &tool(11, "crash", json!({})).to_string(),
    )
    .await;
    assert!(r.json().get("error").is_some(), "{}", r.body);
    b.wait_idle("fx", 1).await;
    let m = scrape_broker(&b).await;
    let exits: f64 = m
        .lines()
        .filter(|l| l.starts_with("mcp_broker_exits_total{") && l.contains("pool=\"fx\""))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    assert_eq!(exits, 1.0, "{m}");
    assert_eq!(sample(&m, "mcp_broker_spawns_total", &fx), 2.0);
    assert_eq!(
        sample(
            &m,
            "mcp_broker_requests_total",
            &[("pool", "fx"), ("outcome", "error")]
        ),
        1.0
    );

    // Queue full: one call holds the only process, one waits, one is refused.
    let (url, sid) = (px.url.clone(), s.clone());
    let slow = tokio::spawn(async move {
        send(
            "POST",
            &url,
            &hdrs(&sid),
            &tool(20, "sleep", json!({"ms": 1500})).to_string(),
        )
        .await
    });
    wait_until(Duration::from_secs(10), || {
        b.broker.pool("fx").unwrap().status().busy == 1
    })
    .await;
    let (url, sid) = (px.url.clone(), s.clone());
    let queued = tokio::spawn(async move {
        send(
            "POST",
            &url,
            &hdrs(&sid),
            &tool(21, "echo", json!({"text": "q"})).to_string(),
        )
        .await
    });
    wait_until(Duration::from_secs(10), || {
        b.broker.pool("fx").unwrap().status().waiting == 1
    })
    .await;
    let m = scrape_broker(&b).await;
    assert_eq!(sample(&m, "mcp_broker_queue_depth", &fx), 1.0);
    let refused = send(
        "POST",
        &px.url,
        &hdrs(&s),
        &tool(22, "echo", json!({"text": "x"})).to_string(),
    )
    .await;
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(text_of(&queued.await.unwrap().json()), "q");
    assert_eq!(slow.await.unwrap().status, 200);
    let m = scrape_broker(&b).await;
    assert_eq!(
        sample(
            &m,
            "mcp_broker_rejections_total",
            &[("pool", "fx"), ("reason", "queue_full")]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            "mcp_broker_requests_total",
            &[("pool", "fx"), ("outcome", "queue_full")]
        ),
        1.0
    );
    assert_eq!(sample(&m, "mcp_broker_queue_depth", &fx), 0.0);
    assert_eq!(
        sample(
            &m,
            "mcp_broker_requests_total",
            &[("pool", "fx"), ("outcome", "ok")]
        ),
        6.0
    );
    assert_eq!(
        sample(&m, "mcp_broker_request_duration_seconds_count", &calls),
        7.0
    );
    assert_eq!(sample(&m, "mcp_broker_policy_denials_total", &fx), 0.0);

    // An oversized body is refused at the proxy and counted there.
    let big = tool(30, "echo", json!({"text": "x".repeat(8192)})).to_string();
    assert_eq!(send("POST", &px.url, &hdrs(&s), &big).await.status, 413);
    let pm = scrape_proxy(&px.base).await;
    assert_eq!(
        sample(
            &pm,
            "mcp_broker_rejections_total",
            &[("pool", "fx"), ("reason", "too_large")]
        ),
        1.0
    );

    // An open GET stream is an open SSE stream until the client leaves.
    let sse = [("kind", "listen")];
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let req = http::Request::get(&px.url)
        .header("accept", "text/event-stream")
        .header("mcp-session-id", &s)
        .header("mcp-protocol-version", "2025-06-18")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let stream = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stream.status(), 200);
    wait_until(Duration::from_secs(5), || {
        px.metrics.sse_streams.with_label_values(&["listen"]).get() == 1
    })
    .await;
    assert_eq!(
        sample(&scrape_proxy(&px.base).await, "mcp_proxy_sse_streams", &sse),
        1.0
    );
    drop(stream);
    drop(client);
    wait_until(Duration::from_secs(20), || {
        px.metrics.sse_streams.with_label_values(&["listen"]).get() == 0
    })
    .await;

    // A proxy whose broker is not there retries, and counts each retry.
    let missing = b.socket.with_file_name("absent.sock");
    let lost = TestProxy::start_with(&missing, "fx", |s| s.max_body = 4096).await;
    let body = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{
        "protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}});
    let r = send("POST", &lost.url, &[JSON_SSE, CT_JSON], &body.to_string()).await;
    assert_eq!(r.status, 503, "{}", r.body);
    let lm = scrape_proxy(&lost.base).await;
    assert!(
        sample(&lm, "mcp_proxy_broker_reconnects_total", &fx) >= 2.0,
        "{lm}"
    );
    lost.stop().await;

    px.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn every_pool_series_exists_before_the_first_request() {
    let mut p = fixture_pool("cold", &[]);
    p.min_idle = 0;
    let b = TestBroker::start(vec![p]).await;
    let text = scrape_broker(&b).await;
    for (name, labels) in [
        (
            "mcp_broker_lease_wait_seconds_count",
            vec![("pool", "cold")],
        ),
        (
            "mcp_broker_request_duration_seconds_count",
            vec![("pool", "cold"), ("method", "tools/call")],
        ),
        (
            "mcp_broker_request_duration_seconds_count",
            vec![("pool", "cold"), ("method", "other")],
        ),
        (
            "mcp_broker_requests_total",
            vec![("pool", "cold"), ("outcome", "ok")],
        ),
        ("mcp_broker_spawns_total", vec![("pool", "cold")]),
    ] {
        let series = text
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .find(|l| {
                labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
            });
        assert_eq!(
            series.and_then(|l| l.rsplit_once(' ')).map(|(_, v)| v),
            Some("0"),
            "{name}{labels:?} missing or not zero"
        );
    }
    b.stop().await;
}
