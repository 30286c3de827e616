//! Multi-round-trip affinity through the lease API: a stateless server's
//! `InputRequiredResult` comes back with a broker-sealed `requestState`, and
//! the retry reaches the process that issued it. The fixture's state names
//! its own process (as real SDK servers' states do, see
//! `tests/interop/sdk2/test_sdk2_mrtr.py` for the official Python SDK 2.x),
//! so a retry on any other process fails.

#[path = "support/harness.rs"]
mod harness;

use harness::*;
use mcp_broker::config::Mode;
use mcp_broker::jsonrpc::codes;
use mcp_broker::proxy::backend::Backend;
use serde_json::{json, Value};
use std::time::Duration;

/// First round: the `InputRequiredResult` and its (sealed) state.
async fn ask(c: &Backend, id: u64, session: Option<&str>) -> String {
    let (status, msgs) = lease(c, &tool(id, "sample", json!({"prompt": "p"})), session).await;
    assert_eq!(status, 200, "{msgs:?}");
    let last = msgs.last().expect("an answer");
    assert_eq!(last["result"]["resultType"], "input_required", "{last}");
    let state = last["result"]["requestState"].as_str().expect("a state");
    assert!(
        state.starts_with("mcpb-s1."),
        "sealed by the broker: {state}"
    );
    state.to_string()
}

/// The retry carrying `state` and the client's answer `answer`.
fn retry(id: u64, state: &str, answer: &str) -> Value {
    json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{
        "name":"sample","arguments":{"prompt":"p"},"requestState":state,
        "inputResponses":{"q":{"role":"assistant","content":{"type":"text","text":answer}}}}})
}

fn stateless_pool(name: &str, n: usize) -> mcp_broker::config::PoolConfig {
    let mut p = fixture_pool(name, &["--era", "stateless"]);
    p.min_idle = n;
    p.max = n;
    p
}

#[tokio::test]
async fn concurrent_retries_all_reach_their_process() {
    let b = TestBroker::start(vec![stateless_pool("s", 3)]).await;
    b.wait_idle("s", 3).await;
    let c = b.client("s");
    let calls = (0..48u64).map(|i| {
        let c = c.clone();
        async move {
            let state = ask(&c, i, None).await;
            let (_, msgs) = lease(&c, &retry(1000 + i, &state, &format!("answer-{i}")), None).await;
            text_of(msgs.last().unwrap())
        }
    });
    let answers = futures::future::join_all(calls).await;
    for (i, a) in answers.iter().enumerate() {
        assert_eq!(a, &format!("answer-{i}"));
    }
    b.stop().await;
}

#[tokio::test]
async fn a_retry_waits_for_its_busy_process_instead_of_taking_another() {
    let b = TestBroker::start(vec![stateless_pool("s", 2)]).await;
    b.wait_idle("s", 2).await;
    let c = b.client("s");
    let state = ask(&c, 1, None).await;
    // Keep the issuing process busy (it is the most recently used, so a
    // request on an idle pool lands there), then retry: the retry must wait
    // for it although the other process is idle.
    let busy = {
        let c = c.clone();
        tokio::spawn(async move { lease(&c, &tool(2, "sleep", json!({"ms": 3000})), None).await })
    };
    let pool = b.broker.pool("s").unwrap();
    wait_until(Duration::from_secs(5), || pool.status().busy == 1).await;
    let waiting = {
        let c = c.clone();
        tokio::spawn(async move { lease(&c, &retry(3, &state, "late"), None).await })
    };
    // Observable: the retry queues for its busy process while the other
    // process stays idle.
    wait_until(Duration::from_secs(5), || {
        let s = pool.status();
        s.waiting == 1 && s.idle == 1
    })
    .await;
    let (_, msgs) = waiting.await.unwrap();
    assert_eq!(text_of(msgs.last().unwrap()), "late", "{msgs:?}");
    let (_, slept) = busy.await.unwrap();
    assert!(slept.last().unwrap().get("result").is_some());
    b.stop().await;
}

#[tokio::test]
async fn altered_foreign_and_orphaned_states_get_clear_errors() {
    let b = TestBroker::start(vec![stateless_pool("s", 2), stateless_pool("t", 1)]).await;
    b.wait_idle("s", 2).await;
    b.wait_idle("t", 1).await;
    let (s, t) = (b.client("s"), b.client("t"));
    let state = ask(&s, 1, None).await;

    let altered = format!("{state}x");
    let (status, msgs) = lease(&s, &retry(2, &altered, "a"), None).await;
    assert_eq!(status, 400);
    assert_eq!(code_of(&msgs[0]), codes::INVALID_PARAMS, "{msgs:?}");
    assert!(msgs[0]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("without requestState"));

    let (_, msgs) = lease(&t, &retry(3, &state, "a"), None).await;
    assert_eq!(
        code_of(&msgs[0]),
        codes::INVALID_PARAMS,
        "another pool's state: {msgs:?}"
    );

    // The issuing process crashes: the retry is told so, and what to do.
    let (_, crashed) = lease(&s, &tool(4, "crash", json!({})), None).await;
    assert_eq!(code_of(crashed.last().unwrap()), codes::PROCESS_EXITED);
    let exits = b.metrics.exits.with_label_values(&["s", "crashed"]);
    wait_until(Duration::from_secs(5), || exits.get() == 1).await;
    let (status, msgs) = lease(&s, &retry(5, &state, "a"), None).await;
    assert_eq!(status, 410, "{msgs:?}");
    assert_eq!(code_of(&msgs[0]), codes::PROCESS_GONE);
    assert!(msgs[0]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("send the original request again without requestState"));
    b.stop().await;
}

#[tokio::test]
async fn a_pinned_process_outlives_idle_shrink() {
    // Two identical pools that grow to two processes and shrink after
    // 100 ms idle; only in "s" does a process hold a client's state.
    let mk = |name: &str| {
        let mut p = stateless_pool(name, 2);
        p.min_idle = 0;
        p.idle_timeout = Duration::from_millis(100);
        p
    };
    let b = TestBroker::start(vec![mk("s"), mk("ctl")]).await;
    let (s, ctl) = (b.client("s"), b.client("ctl"));
    let state = ask(&s, 1, None).await;
    let (_, _) = lease(&ctl, &tool(1, "echo", json!({"text": "x"})), None).await;
    let (ps, pc) = (b.broker.pool("s").unwrap(), b.broker.pool("ctl").unwrap());
    assert_eq!(ps.status().idle, 1);
    // The control pool's idle process is retired: shrink has run.
    wait_until(Duration::from_secs(10), || pc.status().idle == 0).await;
    wait_until(Duration::from_secs(10), || ps.status().idle == 1).await;
    let (_, msgs) = lease(&s, &retry(2, &state, "kept"), None).await;
    assert_eq!(text_of(msgs.last().unwrap()), "kept", "{msgs:?}");
    b.stop().await;
}

#[tokio::test]
async fn an_exclusive_session_of_one_keeps_its_process_for_the_retry() {
    let mut p = stateless_pool("x", 2);
    p.mode = Mode::Exclusive;
    p.min_idle = 1;
    let b = TestBroker::start(vec![p]).await;
    b.wait_idle("x", 1).await;
    let c = b.client("x");
    // Session-less requests on an exclusive pool are sessions of one: their
    // process is discarded afterwards, unless it issued a state.
    let state = ask(&c, 1, None).await;
    let pool = b.broker.pool("x").unwrap();
    // The reserved process is not idle for anyone else: a spare is warmed.
    wait_until(Duration::from_secs(10), || pool.status().idle == 1).await;
    let (_, other) = lease(&c, &tool(2, "whoami", json!({})), None).await;
    assert!(text_of(other.last().unwrap()).starts_with("pid="));
    let (_, msgs) = lease(&c, &retry(3, &state, "mine"), None).await;
    assert_eq!(text_of(msgs.last().unwrap()), "mine", "{msgs:?}");
    b.stop().await;
}
