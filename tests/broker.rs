//! The broker daemon against the fixture server, over the real lease API:
//! warm-up, parallelism, multiplexing, every failure mode, modes, shutdown.

#[path = "support/harness.rs"]
mod harness;

use harness::*;
use mcp_broker::config::Mode;
use mcp_broker::jsonrpc::codes;
use mcp_broker::proxy::backend::{new_lease_id, Backend};
use serde_json::json;
use std::collections::HashSet;
use std::time::{Duration, Instant};

#[tokio::test]
async fn warms_and_caches_handshake() {
    let mut p = fixture_pool("fx", &[]);
    p.min_idle = 2;
    let b = TestBroker::start(vec![p]).await;
    b.wait_idle("fx", 2).await;
    let c = b.client("fx");
    let info = c.pool_info().await.unwrap();
    assert_eq!(info.protocol_version, "2025-11-25");
    assert_eq!(info.result["serverInfo"]["name"], "mcp-fixture");
    assert_eq!(procs_with_tag(&b.tag).len(), 2);
    let (status, msgs) = lease(&c, &tool(1, "echo", json!({"text": "hi"})), None).await;
    assert_eq!(status, 200);
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0]["id"], 1);
    assert_eq!(text_of(&msgs[0]), "hi");
    b.stop().await;
}

#[tokio::test]
async fn stateless_servers_are_discovered() {
    let b = TestBroker::start(vec![fixture_pool("fx", &["--era", "stateless"])]).await;
    b.wait_idle("fx", 1).await;
    let info = b.client("fx").pool_info().await.unwrap();
    assert_eq!(info.era, mcp_broker::protocol::Era::Stateless);
    assert_eq!(info.protocol_version, "2026-07-28");
    b.stop().await;
}

#[tokio::test]
async fn pool_of_four_runs_sixteen_requests_in_parallel() {
    let mut p = fixture_pool("fx", &[]);
    p.min_idle = 4;
    p.max = 4;
    let b = TestBroker::start(vec![p]).await;
    b.wait_idle("fx", 4).await;
    let c = b.client("fx");
    let started = Instant::now();
    let calls = (0..16).map(|i| {
        let c = c.clone();
        async move { lease(&c, &tool(i, "sleep", json!({"ms": 300})), None).await }
    });
    let results = futures::future::join_all(calls).await;
    let elapsed = started.elapsed();
    for (i, (status, msgs)) in results.iter().enumerate() {
        assert_eq!(*status, 200);
        assert_eq!(msgs.last().unwrap()["id"], i as u64);
        assert_eq!(text_of(msgs.last().unwrap()), "slept 300");
    }
    // Four rounds of 300 ms at best; serial would be 4.8 s. A loose bound
    // that only parallel execution can meet (not a performance assertion).
    assert!(elapsed >= Duration::from_millis(1150), "{elapsed:?}");
    assert!(
        elapsed < Duration::from_millis(3500),
        "requests were not parallel: {elapsed:?}"
    );
    assert_eq!(procs_with_tag(&b.tag).len(), 4, "never more than max");
    b.stop().await;
}

#[tokio::test]
async fn max_inflight_multiplexes_sessions_without_crossing() {
    let mut p = fixture_pool("fx", &[]);
    p.min_idle = 1;
    p.max = 1;
    p.max_inflight = 16;
    let b = TestBroker::start(vec![p]).await;
    b.wait_idle("fx", 1).await;
    let c = b.client("fx");
    let calls = (0..16).map(|i| {
        let c = c.clone();
        async move {
            // Every client uses the same request id and progress token: the
            // broker must rewrite both per process and map them back.
            let mut msg = tool(7, "sleep", json!({"ms": 200 + (i * 7) % 50, "steps": 2}));
            msg["params"]["_meta"] = json!({"progressToken": "same"});
            let session = format!("s{i}");
            let echo_msg = tool(7, "echo", json!({"text": format!("client-{i}")}));
            let slow = lease(&c, &msg, Some(&session));
            let echo = lease(&c, &echo_msg, Some(&session));
            let ((s1, m1), (s2, m2)) = tokio::join!(slow, echo);
            (i, s1, m1, s2, m2)
        }
    });
    let pids: HashSet<_> = procs_with_tag(&b.tag).into_iter().collect();
    for (i, s1, m1, s2, m2) in futures::future::join_all(calls).await {
        assert_eq!((s1, s2), (200, 200));
        assert_eq!(m2.len(), 1);
        assert_eq!(m2[0]["id"], 7);
        assert_eq!(text_of(&m2[0]), format!("client-{i}"), "crossed response");
        let progress: Vec<_> = m1
            .iter()
            .filter(|m| m["method"] == "notifications/progress")
            .collect();
        assert_eq!(
            progress.len(),
            2,
            "each client sees only its own progress: {m1:?}"
        );
        assert!(progress
            .iter()
            .all(|p| p["params"]["progressToken"] == "same"));
        assert_eq!(m1.last().unwrap()["id"], 7);
    }
    assert_eq!(pids.len(), 1, "all on one process");
    b.stop().await;
}

#[tokio::test]
async fn queue_full_is_immediate_and_queue_timeout_is_bounded() {
    let mut p = fixture_pool("fx", &[]);
    p.min_idle = 1;
    p.max = 1;
    p.queue_limit = 1;
    p.queue_timeout = Duration::from_millis(300);
    let b = TestBroker::start(vec![p]).await;
    b.wait_idle("fx", 1).await;
    let c = b.client("fx");
    // The only process stays busy until the end of the test.
    let busy = Held::start(&c, 1).await;
    let queued = tokio::spawn({
        let c = c.clone();
        async move { lease(&c, &tool(2, "echo", json!({"text": "q"})), None).await }
    });
    b.wait_status("fx", |s| s.waiting == 1).await;
    let (status, msgs) = lease(&c, &tool(3, "echo", json!({"text": "x"})), None).await;
    assert_eq!(status, 503);
    assert_eq!(code_of(&msgs[0]), codes::QUEUE_FULL);
    assert_eq!(msgs[0]["id"], 3);
    let (status, msgs) = queued.await.unwrap();
    assert_eq!(status, 504);
    assert_eq!(code_of(&msgs[0]), codes::QUEUE_TIMEOUT);
    assert!(msgs[0]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("queue_timeout"));
    let fin = busy.finish(&c, "done").await;
    assert_eq!(fin["id"], 1);
    assert_eq!(text_of(&fin), "done");
    b.stop().await;
}

#[tokio::test]
async fn request_timeout_cancels_and_pool_recovers() {
    let mut p = fixture_pool("fx", &[]);
    p.max = 1;
    p.request_timeout = Duration::from_millis(300);
    let b = TestBroker::start(vec![p]).await;
    b.wait_idle("fx", 1).await;
    let c = b.client("fx");
    let (status, msgs) = lease(&c, &tool(1, "hang", json!({})), None).await;
    assert_eq!(status, 200);
    assert_eq!(code_of(msgs.last().unwrap()), codes::REQUEST_TIMEOUT);
    assert_eq!(msgs.last().unwrap()["id"], 1);
    let (_, msgs) = lease(&c, &tool(2, "echo", json!({"text": "after"})), None).await;
    assert_eq!(text_of(&msgs[0]), "after");
    b.stop().await;
}

// Multi-threaded, as the daemon runs: the lease that ends on the crash
// gives its process back on one thread while the reaper runs on another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_fails_only_its_request_and_is_replaced() {
    // `fx`: two processes with room for one request each, so a crash and
    // another request run side by side. `solo`: one process, so a request
    // waits in the queue behind the one that crashes it.
    let mut fx = fixture_pool("fx", &[]);
    fx.min_idle = 2;
    fx.max = 2;
    let mut solo = fixture_pool("solo", &[]);
    solo.max = 1;
    let b = TestBroker::start(vec![fx, solo]).await;
    b.wait_idle("fx", 2).await;
    b.wait_idle("solo", 1).await;
    let crashes = |pool: &str| b.metrics.exits.with_label_values(&[pool, "crashed"]).get();
    let (c, s) = (b.client("fx"), b.client("solo"));
    let whoami = |c: Backend, id: u64| async move {
        let (status, msgs) = lease(&c, &tool(id, "whoami", json!({})), None).await;
        assert_eq!(status, 200, "{msgs:?}");
        text_of(&msgs[0])
    };
    let solo_pid = pid_of(&whoami(s.clone(), 1).await);
    let fx_pids = || -> HashSet<u32> {
        let mut p: HashSet<u32> = procs_with_tag(&b.tag).into_iter().collect();
        p.remove(&solo_pid);
        p
    };

    // 1. A request on another process of the pool runs through the crash.
    let before = fx_pids();
    assert_eq!(before.len(), 2, "{before:?}");
    let other = Held::start(&c, 2).await;
    // The only process with room left is the other one: the crash goes there.
    let (status, msgs) = lease(&c, &tool(3, "crash", json!({})), None).await;
    assert_eq!(status, 200);
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert_eq!(code_of(&msgs[0]), codes::PROCESS_EXITED);
    assert_eq!(msgs[0]["id"], 3);
    wait_until(Duration::from_secs(10), || crashes("fx") == 1).await;
    let after = fx_pids();
    let gone: Vec<u32> = before.difference(&after).copied().collect();
    let kept: Vec<u32> = before.intersection(&after).copied().collect();
    assert_eq!(
        (gone.len(), kept.len()),
        (1, 1),
        "only the crashing process ended: {before:?} -> {after:?}"
    );
    let message = msgs[0]["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("process {} ", gone[0])),
        "the error names the process that crashed: {message}"
    );
    let fin = other.finish(&c, "unharmed").await;
    assert_eq!(fin["id"], 2);
    assert_eq!(text_of(&fin), "unharmed");
    b.wait_idle("fx", 2).await;
    let now = fx_pids();
    assert!(now.contains(&kept[0]), "the survivor still runs: {now:?}");
    assert!(!now.contains(&gone[0]) && now.len() == 2, "{now:?}");

    // 2. A request queued behind the crashing one is served by the
    // replacement, not failed with it.
    let mut dying = s
        .lease(
            &tool(4, "crash", json!({"ask": true})),
            None,
            &new_lease_id(),
        )
        .await
        .unwrap();
    let ask = dying.lines.next().await.unwrap().unwrap();
    assert_eq!(ask["method"], "roots/list", "{}", short(&ask));
    let queued = tokio::spawn(whoami(s.clone(), 5));
    b.wait_status("solo", |st| st.busy == 1 && st.waiting == 1)
        .await;
    // Answering lets the process exit while its request is in flight.
    let token = dying.token.clone().unwrap();
    s.deliver(
        &token,
        &json!({"jsonrpc": "2.0", "id": ask["id"], "result": {"roots": []}}),
    )
    .await
    .unwrap();
    let fin = dying.lines.next().await.unwrap().unwrap();
    assert_eq!(fin["id"], 4);
    assert_eq!(code_of(&fin), codes::PROCESS_EXITED);
    let who = queued.await.unwrap();
    assert_ne!(pid_of(&who), solo_pid, "served by the replacement: {who}");
    assert!(who.ends_with("calls=1"), "a fresh process: {who}");
    wait_until(Duration::from_secs(10), || crashes("solo") == 1).await;
    assert_eq!(crashes("fx"), 1, "one crash in fx");
    b.stop().await;
}

#[tokio::test]
async fn garbage_on_stdout_is_skipped_and_counted() {
    let b = TestBroker::start(vec![fixture_pool("fx", &["--garbage-at-start"])]).await;
    b.wait_idle("fx", 1).await;
    let c = b.client("fx");
    let (_, msgs) = lease(&c, &tool(1, "garbage", json!({"lines": 3})), None).await;
    assert_eq!(text_of(&msgs[0]), "ok");
    let m = b.metrics.render();
    let skipped: u64 = m
        .lines()
        .find(|l| l.starts_with("mcp_broker_skipped_lines_total{kind=\"not_json\",pool=\"fx\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        skipped >= 5,
        "2 at start + 3 from the tool, got {skipped}: {m}"
    );
    b.stop().await;
}

#[tokio::test]
async fn oversized_messages_fail_cleanly_both_ways() {
    let b = TestBroker::start_with(vec![fixture_pool("fx", &[])], |s| {
        s.max_message_size = 64 * 1024
    })
    .await;
    b.wait_idle("fx", 1).await;
    let c = b.client("fx");
    let (status, msgs) = lease(&c, &tool(1, "huge", json!({"bytes": 200_000})), None).await;
    assert_eq!(status, 200);
    assert_eq!(code_of(&msgs[0]), codes::MESSAGE_TOO_LARGE);
    assert_eq!(msgs[0]["id"], 1);
    let (_, msgs) = lease(&c, &tool(2, "huge", json!({"bytes": 1000})), None).await;
    assert_eq!(text_of(&msgs[0]).len(), 1000, "same process keeps serving");
    let big = "y".repeat(100_000);
    let (status, msgs) = lease(&c, &tool(3, "echo", json!({"text": big})), None).await;
    assert_eq!(status, 413);
    assert_eq!(code_of(&msgs[0]), codes::MESSAGE_TOO_LARGE);
    b.stop().await;
}

#[tokio::test]
async fn failing_command_backs_off_and_reports() {
    let mut p = fixture_pool("fx", &["--fail-start"]);
    p.queue_timeout = Duration::from_millis(500);
    let b = TestBroker::start(vec![p]).await;
    let pool = b.broker.pool("fx").unwrap().clone();
    wait_until(Duration::from_secs(10), || pool.status().failures >= 3).await;
    let third = Instant::now();
    let st = pool.status();
    assert_eq!(st.failures, 3, "{st:?}");
    assert!(
        st.last_error.as_deref().unwrap_or("").contains("exited"),
        "{st:?}"
    );
    let c = b.client("fx");
    let (status, msgs) = lease(&c, &tool(1, "echo", json!({"text": "x"})), None).await;
    assert!(status == 503 || status == 504, "{status}");
    let code = code_of(&msgs[0]);
    assert!(
        code == codes::POOL_FAILING || code == codes::QUEUE_TIMEOUT,
        "{msgs:?}"
    );
    // Backoff: the next start waits backoff(failures) after a failure
    // (1 s after the third), one probe at a time. Measured between two
    // observed failures; half the delay is a bound only backoff can meet
    // (a command that fails at once would be restarted within milliseconds).
    wait_until(Duration::from_secs(10), || pool.status().failures >= 4).await;
    let gap = third.elapsed();
    let delay = mcp_broker::pool::state::backoff(3);
    assert!(gap >= delay / 2, "restarted after {gap:?}: no backoff");
    let spawns = b.metrics.spawns.with_label_values(&["fx"]).get();
    assert!(spawns <= 5, "spawned {spawns} times for 4 failures");
    b.stop().await;
}

#[tokio::test]
async fn server_requests_and_answers_flow_through_the_lease() {
    let b = TestBroker::start(vec![fixture_pool("fx", &[])]).await;
    b.wait_idle("fx", 1).await;
    let c = b.client("fx");
    let mut l = c
        .lease(
            &tool(1, "sample", json!({"prompt": "2+2?"})),
            None,
            &new_lease_id(),
        )
        .await
        .unwrap();
    let token = l.token.clone().expect("lease token");
    let req = l.lines.next().await.unwrap().unwrap();
    assert_eq!(req["method"], "sampling/createMessage");
    let answer = json!({"jsonrpc":"2.0","id":req["id"],"result":{"role":"assistant","content":{"type":"text","text":"4"},"model":"m"}});
    c.deliver(&token, &answer).await.unwrap();
    let fin = l.lines.next().await.unwrap().unwrap();
    assert_eq!(fin["id"], 1);
    assert_eq!(text_of(&fin), "4");
    assert!(l.lines.next().await.is_none());
    assert!(c.deliver(&token, &answer).await.is_err(), "lease is over");
    b.stop().await;
}

#[tokio::test]
async fn caller_disconnect_cancels_and_frees_the_process() {
    let mut p = fixture_pool("fx", &[]);
    p.max = 1;
    let b = TestBroker::start(vec![p]).await;
    b.wait_idle("fx", 1).await;
    let c = b.client("fx");
    let mut msg = tool(1, "sleep", json!({"ms": 30_000, "steps": 30}));
    msg["params"]["_meta"] = json!({"progressToken": 1});
    let mut l = c.lease(&msg, None, &new_lease_id()).await.unwrap();
    let first = l.lines.next().await.unwrap().unwrap();
    assert_eq!(
        first["method"],
        "notifications/progress",
        "{}",
        short(&first)
    );
    drop(l);
    let started = Instant::now();
    let (_, msgs) = lease(&c, &tool(2, "echo", json!({"text": "next"})), None).await;
    assert_eq!(text_of(&msgs[0]), "next");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "process was not freed"
    );
    b.stop().await;
}

#[tokio::test]
async fn exclusive_sessions_own_a_process_until_they_end() {
    let mut p = fixture_pool("fx", &[]);
    p.mode = Mode::Exclusive;
    p.min_idle = 2;
    p.max = 4;
    let b = TestBroker::start(vec![p]).await;
    b.wait_idle("fx", 2).await;
    let c = b.client("fx");
    let who = |s: &'static str| {
        let c = c.clone();
        async move { text_of(&lease(&c, &tool(1, "whoami", json!({})), Some(s)).await.1[0]) }
    };
    let a1 = who("a").await;
    let b1 = who("b").await;
    let a2 = who("a").await;
    let pid = |s: &str| s.split_whitespace().next().unwrap().to_string();
    assert_eq!(pid(&a1), pid(&a2), "session keeps its process");
    assert_ne!(pid(&a1), pid(&b1), "sessions never share");
    assert!(a2.ends_with("calls=2"));
    let old: u32 = pid(&a1).trim_start_matches("pid=").parse().unwrap();
    c.end_session("a").await;
    wait_until(Duration::from_secs(5), || {
        !procs_with_tag(&b.tag).contains(&old)
    })
    .await;
    let a3 = who("a").await;
    assert_ne!(pid(&a3), pid(&a1), "a new session gets a fresh process");
    assert!(a3.ends_with("calls=1"));
    b.stop().await;
}

#[tokio::test]
async fn sticky_sessions_return_to_their_process() {
    let mut p = fixture_pool("fx", &[]);
    p.mode = Mode::Sticky;
    p.min_idle = 3;
    p.max = 3;
    let b = TestBroker::start(vec![p]).await;
    b.wait_idle("fx", 3).await;
    let c = b.client("fx");
    let mut seen = HashSet::new();
    for i in 0..5 {
        let (_, m) = lease(&c, &tool(i, "whoami", json!({})), Some("s1")).await;
        seen.insert(
            text_of(&m[0])
                .split_whitespace()
                .next()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(seen.len(), 1, "{seen:?}");
    b.stop().await;
}

#[tokio::test]
async fn idle_processes_above_min_idle_are_stopped() {
    let mut p = fixture_pool("fx", &[]);
    p.min_idle = 1;
    p.max = 3;
    p.idle_timeout = Duration::from_millis(300);
    let b = TestBroker::start(vec![p]).await;
    b.wait_idle("fx", 1).await;
    let c = b.client("fx");
    let calls = (0..3).map(|i| {
        let c = c.clone();
        async move { lease(&c, &tool(i, "sleep", json!({"ms": 400})), None).await }
    });
    futures::future::join_all(calls).await;
    let peak = procs_with_tag(&b.tag).len();
    assert!(peak >= 2, "grew under load: {peak}");
    let tag = b.tag.clone();
    wait_until(Duration::from_secs(10), || procs_with_tag(&tag).len() == 1).await;
    b.stop().await;
}

#[tokio::test]
async fn shutdown_drains_in_flight_and_kills_process_groups() {
    let mut p = fixture_pool("fx", &["--ignore-sigterm"]);
    p.min_idle = 1;
    let b = TestBroker::start(vec![p]).await;
    b.wait_idle("fx", 1).await;
    let c = b.client("fx");
    let (_, m) = lease(&c, &tool(1, "spawn_child", json!({})), None).await;
    let grandchild: u32 = text_of(&m[0]).trim().parse().unwrap();
    let tag = b.tag.clone();
    // The grandchild may still be between fork and exec: poll briefly.
    wait_until(Duration::from_secs(5), || {
        procs_with_tag(&tag).contains(&grandchild)
    })
    .await;
    // A call on its process (its first progress says so) when shutdown begins.
    let mut msg = tool(2, "sleep", json!({"ms": 500, "steps": 2}));
    msg["params"]["_meta"] = json!({"progressToken": 1});
    let mut inflight = c.lease(&msg, None, &new_lease_id()).await.unwrap();
    let first = inflight.lines.next().await.unwrap().unwrap();
    assert_eq!(
        first["method"],
        "notifications/progress",
        "{}",
        short(&first)
    );
    b.begin_shutdown();
    let mut last = first;
    while let Some(m) = inflight.lines.next().await {
        last = m.unwrap();
    }
    assert_eq!(inflight.status.as_u16(), 200);
    assert_eq!(last["id"], 2);
    assert_eq!(
        text_of(&last),
        "slept 500",
        "in-flight lease finished during drain"
    );
    // stop() asserts the socket is gone and no process (grandchild included,
    // despite ignoring SIGTERM) is left.
    b.stop().await;
}

#[tokio::test]
async fn bad_lease_api_input_gets_clear_errors() {
    let b = TestBroker::start(vec![fixture_pool("fx", &[])]).await;
    b.wait_idle("fx", 1).await;
    let c = b.client("fx");
    let (status, msgs) = lease(&b.client("nope"), &tool(1, "echo", json!({})), None).await;
    assert_eq!(status, 404);
    assert_eq!(code_of(&msgs[0]), codes::UNKNOWN_POOL);
    let (status, msgs) = lease(
        &c,
        &json!({"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}),
        None,
    )
    .await;
    assert_eq!(status, 400);
    assert!(msgs[0]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("initialized by the broker"));
    let (status, _) = lease(&c, &json!({"jsonrpc":"1.0","id":1,"method":"x"}), None).await;
    assert_eq!(status, 400);
    let (status, msgs) = lease(
        &c,
        &json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"nosuch"}}),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(code_of(&msgs[0]), -32602, "server errors pass through");
    b.stop().await;
}

#[tokio::test]
async fn a_queued_request_is_cancelled_by_its_lease_id() {
    let mut p = fixture_pool("fx", &[]);
    p.max = 1;
    let b = TestBroker::start(vec![p]).await;
    b.wait_idle("fx", 1).await;
    let c = b.client("fx");
    // The only process stays busy until the end of the test.
    let hold = Held::start(&c, 1).await;
    // The caller names the lease, so it can cancel before any answer.
    let id = new_lease_id();
    let queued = tokio::spawn({
        let (c, id) = (c.clone(), id.clone());
        async move {
            let mut l = c
                .lease(&tool(2, "echo", json!({"text": "q"})), None, &id)
                .await
                .unwrap();
            (l.status.as_u16(), l.lines.next().await.unwrap().unwrap())
        }
    });
    b.wait_status("fx", |s| s.waiting == 1).await;
    // A live lease id cannot be taken twice; malformed ids are refused.
    let mut dup = c
        .lease(&tool(3, "echo", json!({"text": "d"})), None, &id)
        .await
        .unwrap();
    assert_eq!(dup.status.as_u16(), 409);
    assert_eq!(
        code_of(&dup.lines.next().await.unwrap().unwrap()),
        codes::INVALID_REQUEST
    );
    let bad = c
        .lease(&tool(4, "echo", json!({"text": "b"})), None, "not an id")
        .await
        .unwrap();
    assert_eq!(bad.status.as_u16(), 400);
    let cancel =
        json!({"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":2}});
    c.deliver(&id, &cancel).await.unwrap();
    // Answered while the process is still held: the cancellation did not
    // wait for it to come free.
    let (status, answer) = queued.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(answer["id"], 2);
    assert_eq!(code_of(&answer), codes::CANCELLED);
    let st = b.broker.pool("fx").unwrap().status();
    assert_eq!((st.busy, st.waiting), (1, 0), "{st:?}");
    let fin = hold.finish(&c, "held").await;
    assert_eq!(fin["id"], 1);
    assert_eq!(text_of(&fin), "held");
    // A lease id nobody holds is refused.
    let id = new_lease_id();
    let gone = c.deliver(&id, &cancel).await;
    assert!(gone.is_err(), "unknown lease accepted");
    b.stop().await;
}
