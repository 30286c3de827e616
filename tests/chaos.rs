//! Chaos soak: many sessions of mixed traffic through the real proxy and
//! broker while a chaos driver SIGKILLs children, requests hang, print
//! garbage, answer over the size limit, clients drop mid-stream, and the
//! broker restarts once.
//!
//! Invariants, checked on every request: exactly one answer (its response
//! or a JSON-RPC error with a code and a message), never another request's
//! data (every echo carries a unique token), nothing after the answer.
//! Afterwards: pools back at `min_idle`, no leaked processes, file
//! descriptors and memory back near their baseline. It prints
//! `soak: requests=N kills=N errors={kind: n} crossed=0 lost=0 leaked=0`.
//!
//! Runs ~45 s by default; `MCP_BROKER_SOAK_SECS=3600 cargo test --release
//! --test chaos -- --nocapture` soaks for an hour.

#[path = "support/harness.rs"]
mod harness;

use bytes::Bytes;
use harness::*;
use http_body_util::{BodyExt, Full};
use mcp_broker::jsonrpc::codes;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SESSIONS: usize = 16;
const MIN_IDLE: usize = 3;
const MAX_MESSAGE: usize = 256 * 1024;
/// Longest a client waits for one answer before counting it lost.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

#[derive(Default)]
struct Tally {
    requests: AtomicU64,
    answered: AtomicU64,
    dropped: AtomicU64,
    crossed: AtomicU64,
    lost: AtomicU64,
    kills: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    failures: Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, what: String) {
        let mut f = self.failures.lock().unwrap();
        if f.len() < 20 {
            f.push(what);
        }
    }
}

fn kind_of(code: i64) -> String {
    match code {
        codes::REQUEST_TIMEOUT => "request_timeout".into(),
        codes::PROCESS_EXITED => "process_exited".into(),
        codes::MESSAGE_TOO_LARGE => "too_large".into(),
        codes::BROKER_UNAVAILABLE => "broker_unavailable".into(),
        codes::QUEUE_FULL => "queue_full".into(),
        codes::QUEUE_TIMEOUT => "queue_timeout".into(),
        codes::POOL_FAILING => "pool_failing".into(),
        codes::INTERNAL_ERROR => "internal".into(),
        other => format!("code_{other}"),
    }
}

/// One kind of request and what its answer must look like.
#[derive(Debug, Clone, Copy)]
enum Act {
    Echo,
    Sleep,
    Hang,
    Garbage,
    HugeOver,
    HugeUnder,
    DropMidStream,
}

fn pick(rng: &mut impl Rng) -> Act {
    match rng.gen_range(0..100) {
        0..=54 => Act::Echo,
        55..=72 => Act::Sleep,
        73..=75 => Act::Hang,
        76..=83 => Act::Garbage,
        84..=87 => Act::HugeOver,
        88..=93 => Act::HugeUnder,
        _ => Act::DropMidStream,
    }
}

/// Posts one message on a session; returns every message of the answer.
async fn exchange(
    client: &Client,
    url: &str,
    session: &str,
    msg: &Value,
) -> Result<(u16, Vec<Value>), String> {
    let req = http::Request::post(url)
        .header("accept", "application/json, text/event-stream")
        .header("content-type", "application/json")
        .header("mcp-session-id", session)
        .body(Full::new(Bytes::from(msg.to_string())))
        .map_err(|e| e.to_string())?;
    let fut = async {
        let r = client
            .request(req)
            .await
            .map_err(|e| format!("send: {e}"))?;
        let status = r.status().as_u16();
        let sse = r
            .headers()
            .get("content-type")
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        let body = r
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        let text = String::from_utf8_lossy(&body);
        let msgs = if sse {
            sse_messages(&text)
        } else {
            vec![serde_json::from_str(&text).map_err(|e| format!("not JSON ({e}): {text}"))?]
        };
        Ok((status, msgs))
    };
    tokio::time::timeout(ANSWER_WITHIN, fut)
        .await
        .unwrap_or_else(|_| Err("no answer in time".into()))
}

/// Starts a request and walks away after the first bytes of its stream.
async fn drop_mid_stream(client: &Client, url: &str, session: &str, msg: &Value) {
    let req = http::Request::post(url)
        .header("accept", "text/event-stream")
        .header("content-type", "application/json")
        .header("mcp-session-id", session)
        .body(Full::new(Bytes::from(msg.to_string())))
        .unwrap();
    if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(10), client.request(req)).await {
        let mut body = r.into_body();
        let _ = tokio::time::timeout(Duration::from_millis(300), body.frame()).await;
    }
}

/// Checks the answer to `msg` (request `id`, action `act`, echo `token`).
fn check(t: &Tally, act: Act, id: &Value, token: &str, status: u16, msgs: &[Value]) {
    let finals: Vec<&Value> = msgs.iter().filter(|m| m.get("method").is_none()).collect();
    if finals.len() != 1 {
        t.fail(format!("{act:?} {id}: {} answers: {msgs:?}", finals.len()));
        t.crossed
            .fetch_add(u64::from(finals.len() > 1), Ordering::Relaxed);
        t.lost
            .fetch_add(u64::from(finals.is_empty()), Ordering::Relaxed);
        return;
    }
    let last = msgs.last().unwrap();
    if !std::ptr::eq(finals[0], last) {
        t.fail(format!("{act:?} {id}: messages after the answer: {msgs:?}"));
    }
    let m = finals[0];
    if m["id"] != *id {
        t.crossed.fetch_add(1, Ordering::Relaxed);
        t.fail(format!("{act:?}: answer for {} reached {id}", m["id"]));
        return;
    }
    t.answered.fetch_add(1, Ordering::Relaxed);
    if let Some(err) = m.get("error") {
        let code = err["code"].as_i64();
        let clear = code.is_some() && err["message"].as_str().is_some_and(|s| !s.is_empty());
        if !clear {
            t.fail(format!("{act:?} {id}: unclear error {m}"));
        }
        *t.errors
            .lock()
            .unwrap()
            .entry(kind_of(code.unwrap_or(0)))
            .or_default() += 1;
        return;
    }
    if status != 200 {
        t.fail(format!("{act:?} {id}: result with status {status}"));
    }
    let text = m
        .pointer("/result/content/0/text")
        .and_then(Value::as_str)
        .unwrap_or("");
    let ok = match act {
        Act::Echo => text == token,
        Act::Sleep => text.starts_with("slept "),
        Act::Garbage => text == "ok",
        Act::HugeUnder => text.len() == 64 * 1024 && text.bytes().all(|b| b == b'x'),
        Act::Hang | Act::HugeOver | Act::DropMidStream => false,
    };
    if !ok {
        t.crossed.fetch_add(1, Ordering::Relaxed);
        t.fail(format!("{act:?} {id}: wrong result {}", short(m)));
    }
}

async fn session_worker(n: usize, url: String, deadline: Instant, t: Arc<Tally>) {
    let client: Client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(2))
            .build_http();
    let session = initialize(&url, "2025-11-25", json!({})).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(n as u64 * 7919 + 1);
    let mut k = 0u64;
    while Instant::now() < deadline {
        k += 1;
        let id = json!(format!("s{n}-r{k}"));
        let token = format!("tok-{n}-{k}-{}", rng.gen::<u32>());
        let act = pick(&mut rng);
        let msg = match act {
            Act::Echo => tool(id.clone(), "echo", json!({"text": token})),
            Act::Sleep => {
                let mut m = tool(
                    id.clone(),
                    "sleep",
                    json!({"ms": rng.gen_range(20..250), "steps": 2}),
                );
                m["params"]["_meta"] = json!({"progressToken": token});
                m
            }
            Act::Hang => tool(id.clone(), "hang", json!({})),
            Act::Garbage => tool(id.clone(), "garbage", json!({"lines": 4})),
            Act::HugeOver => tool(id.clone(), "huge", json!({"bytes": MAX_MESSAGE * 2})),
            Act::HugeUnder => tool(id.clone(), "huge", json!({"bytes": 64 * 1024})),
            Act::DropMidStream => {
                let mut m = tool(id.clone(), "sleep", json!({"ms": 600, "steps": 3}));
                m["params"]["_meta"] = json!({"progressToken": token});
                m
            }
        };
        t.requests.fetch_add(1, Ordering::Relaxed);
        if let Act::DropMidStream = act {
            drop_mid_stream(&client, &url, &session, &msg).await;
            t.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        match exchange(&client, &url, &session, &msg).await {
            Ok((status, msgs)) => check(&t, act, &id, &token, status, &msgs),
            Err(e) => {
                t.lost.fetch_add(1, Ordering::Relaxed);
                t.fail(format!("{act:?} {id}: {e}"));
            }
        }
    }
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn soak_pool() -> mcp_broker::config::PoolConfig {
    let mut p = fixture_pool("fx", &[]);
    p.min_idle = MIN_IDLE;
    p.max = 8;
    p.request_timeout = Duration::from_millis(1500);
    p.queue_timeout = Duration::from_secs(10);
    p.stop_grace = Duration::from_millis(200);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_soak() {
    let secs: u64 = std::env::var("MCP_BROKER_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(45);
    let fds_before = fd_count();
    let mut b = TestBroker::start_with(vec![soak_pool()], |s| {
        s.max_message_size = MAX_MESSAGE;
        s.drain_timeout = Duration::from_millis(500);
    })
    .await;
    b.wait_idle("fx", MIN_IDLE).await;
    let px = TestProxy::start(&b, "fx").await;
    // Warm the code paths once so the memory baseline is fair.
    let s = initialize(&px.url, "2025-11-25", json!({})).await;
    let r = send(
        "POST",
        &px.url,
        &[JSON_SSE, CT_JSON, ("mcp-session-id", s.as_str())],
        &tool(0, "echo", json!({"text": "warm"})).to_string(),
    )
    .await;
    assert_eq!(text_of(&r.json()), "warm");
    let rss_before = rss_kib();

    let t = Arc::new(Tally::default());
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let workers: Vec<_> = (0..SESSIONS)
        .map(|n| tokio::spawn(session_worker(n, px.url.clone(), deadline, t.clone())))
        .collect();
    // The chaos driver: SIGKILL a random child every 150–600 ms, restart
    // the broker once, about 40% of the way in.
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut restarted = false;
    while Instant::now() < deadline {
        // The driver's pace (part of the scenario, not synchronisation).
        tokio::time::sleep(Duration::from_millis(rng.gen_range(150..600))).await;
        if !restarted && start.elapsed() >= Duration::from_secs(secs) * 2 / 5 {
            restarted = true;
            b = b.restart_after(Duration::from_millis(200)).await;
            continue;
        }
        let pids = procs_with_tag(&b.tag);
        if pids.is_empty() {
            continue;
        }
        let pid = pids[rng.gen_range(0..pids.len())];
        // A pid of a process this test started (it may have just exited).
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).is_ok() {
            t.kills.fetch_add(1, Ordering::Relaxed);
        }
    }
    for w in workers {
        tokio::time::timeout(ANSWER_WITHIN * 2, w)
            .await
            .expect("session worker finished")
            .expect("session worker did not panic");
    }
    assert!(restarted, "the broker was restarted once");

    // Settle: pools back at min_idle, memory near its baseline.
    let pool = b.broker.pool("fx").unwrap().clone();
    wait_until(Duration::from_secs(30), || {
        let s = pool.status();
        s.idle >= MIN_IDLE && s.busy == 0
    })
    .await;
    let running = procs_with_tag(&b.tag).len();
    assert!(running <= 8, "{running} processes for a pool of max 8");
    // Memory and descriptors come back as the last tasks wind down: wait
    // (bounded) for the limits asserted below rather than a fixed time.
    let rss_limit = rss_before + 128 * 1024;
    poll_until(Duration::from_secs(5), || rss_kib() <= rss_limit).await;
    let rss_after = rss_kib();
    px.stop().await;
    let tag = b.tag.clone();
    b.stop().await; // asserts that no tagged process is left
    let leaked = procs_with_tag(&tag).len();
    let fds_limit = fds_before + 8;
    poll_until(Duration::from_secs(5), || fd_count() <= fds_limit).await;
    let fds_after = fd_count();

    let errors = t.errors.lock().unwrap().clone();
    let errs: Vec<String> = errors.iter().map(|(k, n)| format!("{k}: {n}")).collect();
    let line = format!(
        "soak: secs={secs} requests={} answered={} dropped={} kills={} errors={{{}}} crossed={} lost={} leaked={leaked} fds={fds_before}->{fds_after} rss_kib={rss_before}->{rss_after}",
        t.requests.load(Ordering::Relaxed),
        t.answered.load(Ordering::Relaxed),
        t.dropped.load(Ordering::Relaxed),
        t.kills.load(Ordering::Relaxed),
        errs.join(", "),
        t.crossed.load(Ordering::Relaxed),
        t.lost.load(Ordering::Relaxed),
    );
    // Straight to stderr, past the test harness's capture, so CI logs show it.
    let _ = writeln!(std::io::stderr(), "{line}");
    let failures = t.failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{line}\nviolations:\n{}",
        failures.join("\n")
    );
    assert_eq!(t.crossed.load(Ordering::Relaxed), 0, "{line}");
    assert_eq!(t.lost.load(Ordering::Relaxed), 0, "{line}");
    assert_eq!(leaked, 0, "{line}");
    assert!(t.kills.load(Ordering::Relaxed) > 0, "{line}");
    assert!(t.requests.load(Ordering::Relaxed) > 100, "{line}");
    for kind in ["request_timeout", "too_large"] {
        assert!(
            errors.contains_key(kind),
            "the soak exercised {kind}: {line}"
        );
    }
    assert!(fds_after <= fds_limit, "file descriptors leaked: {line}");
    assert!(
        rss_after <= rss_limit,
        "memory did not come back near its baseline: {line}"
    );
}

/// One fixture process (`args`) behind a broker that drains for only
/// 300 ms, a proxy, and an open session on it.
async fn one_process_behind_a_proxy(args: &[&str]) -> (TestBroker, TestProxy, String) {
    let mut p = fixture_pool("fx", args);
    p.min_idle = 1;
    p.max = 1;
    p.stop_grace = Duration::from_millis(200);
    let b = TestBroker::start_with(vec![p], |s| s.drain_timeout = Duration::from_millis(300)).await;
    b.wait_idle("fx", 1).await;
    let px = TestProxy::start(&b, "fx").await;
    let s = initialize(&px.url, "2025-11-25", json!({})).await;
    (b, px, s)
}

#[tokio::test]
async fn broker_restart_answers_in_flight_call_and_never_retries_it() {
    let (b, px, s) = one_process_behind_a_proxy(&[]).await;
    let url = px.url.clone();
    let session = s.clone();
    let inflight = tokio::spawn(async move {
        let h = [JSON_SSE, CT_JSON, ("mcp-session-id", session.as_str())];
        let started = Instant::now();
        let r = send(
            "POST",
            &url,
            &h,
            &tool(1, "sleep", json!({"ms": 4000})).to_string(),
        )
        .await;
        (r.json(), started.elapsed())
    });
    let pool = b.broker.pool("fx").unwrap().clone();
    wait_until(Duration::from_secs(10), || pool.status().busy == 1).await;
    let b = b.restart_after(Duration::from_millis(100)).await;
    let (answer, took) = inflight.await.unwrap();
    assert_eq!(answer["id"], 1);
    let code = code_of(&answer);
    assert!(
        code == codes::PROCESS_EXITED || code == codes::BROKER_UNAVAILABLE,
        "a clear error for the in-flight call: {answer}"
    );
    assert!(
        took < Duration::from_secs(3),
        "answered at the restart, not after the sleep: {took:?}"
    );
    // The new broker's process never saw the call again: this is its first.
    b.wait_idle("fx", 1).await;
    let h = [JSON_SSE, CT_JSON, ("mcp-session-id", s.as_str())];
    let who = send(
        "POST",
        &px.url,
        &h,
        &tool(2, "whoami", json!({})).to_string(),
    )
    .await;
    assert!(text_of(&who.json()).ends_with("calls=1"), "{}", who.body);

    // A call made while the broker is down reached no broker yet: the
    // proxy retries the connect and the call succeeds once it is back.
    let url = px.url.clone();
    let session = s.clone();
    let socket = b.socket.clone();
    let retries = px.metrics.broker_reconnects.with_label_values(&["fx"]);
    let retries_before = retries.get();
    let b2 = tokio::spawn(b.restart_after(Duration::from_millis(1500)));
    // Down once the old broker removed its socket; the next one binds it
    // 1.5 s later.
    wait_until(Duration::from_secs(20), || !socket.exists()).await;
    let h = [JSON_SSE, CT_JSON, ("mcp-session-id", session.as_str())];
    let echo = send(
        "POST",
        &url,
        &h,
        &tool(3, "echo", json!({"text": "after"})).to_string(),
    )
    .await;
    assert_eq!(text_of(&echo.json()), "after", "{}", echo.body);
    assert!(
        retries.get() > retries_before,
        "the call found no broker and retried the connect"
    );
    let b = b2.await.unwrap();
    px.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn broker_restart_replays_read_only_requests() {
    let (b, px, s) = one_process_behind_a_proxy(&["--list-delay-ms", "1500"]).await;
    let (url, session) = (px.url.clone(), s.clone());
    let list = tokio::spawn(async move {
        let h = [JSON_SSE, CT_JSON, ("mcp-session-id", session.as_str())];
        let body = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/list"});
        send("POST", &url, &h, &body.to_string()).await.json()
    });
    let pool = b.broker.pool("fx").unwrap().clone();
    wait_until(Duration::from_secs(10), || pool.status().busy == 1).await;
    // The restart kills the process serving the list; the proxy sends the
    // read-only request again to the new broker instead of failing it.
    let b = b.restart_after(Duration::from_millis(100)).await;
    let answer = list.await.unwrap();
    assert_eq!(answer["id"], 7);
    let tools = answer["result"]["tools"]
        .as_array()
        .unwrap_or_else(|| panic!("replayed: {answer}"));
    assert!(tools.iter().any(|t| t["name"] == "echo"));
    px.stop().await;
    b.stop().await;
}
