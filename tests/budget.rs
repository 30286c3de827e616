//! The node's share among pools: a cgroup per pool whose memory limit
//! kills a leaking server without harming anything else, and a node-wide
//! process budget that many pools take turns in without ever exceeding it
//! or stopping a busy process.
//!
//! Needs root (cgroups are created under the broker's own, which must be
//! delegated; CI runs as root in a container whose cgroups are writable):
//! without them the memory test fails, saying so.

#[path = "support/harness.rs"]
mod harness;

use harness::*;
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[tokio::test]
async fn a_leaking_server_is_killed_by_its_pools_memory_limit_alone() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "needs root: pool cgroups are made under the broker's delegated cgroup"
    );
    let mut leaky = fixture_pool("leaky", &[]);
    leaky.limits.memory = Some(64 << 20);
    let b = TestBroker::start(vec![leaky, fixture_pool("other", &[])]).await;
    let status = b.broker.node_description();
    assert!(
        status
            .iter()
            .any(|l| l.starts_with("cgroups: one per pool")),
        "this machine must give the broker cgroups: {status:?}"
    );
    b.wait_idle("leaky", 1).await;
    b.wait_idle("other", 1).await;
    let other_pid = pid_of(&text_of(
        &lease(&b.client("other"), &tool(1, "whoami", json!({})), None)
            .await
            .1[0],
    ));

    let (_, msgs) = lease(
        &b.client("leaky"),
        &tool(2, "alloc", json!({"bytes": 512u64 << 20})),
        None,
    )
    .await;
    let err = msgs
        .last()
        .and_then(|m| m.pointer("/error/message"))
        .and_then(|m| m.as_str())
        .unwrap_or_else(|| panic!("the allocation must fail: {msgs:?}"))
        .to_string();
    assert!(
        err.contains("memory limit") && err.contains("limits.memory = 64 MiB"),
        "the error names the limit: {err}"
    );
    // The pool replaces its process; the other pool never noticed.
    b.wait_idle("leaky", 1).await;
    let (_, msgs) = lease(
        &b.client("leaky"),
        &tool(3, "echo", json!({"text": "back"})),
        None,
    )
    .await;
    assert_eq!(text_of(&msgs[0]), "back");
    let (_, msgs) = lease(&b.client("other"), &tool(4, "whoami", json!({})), None).await;
    assert_eq!(
        pid_of(&text_of(&msgs[0])),
        other_pid,
        "other pool untouched"
    );
    let m = b.metrics.render();
    assert!(
        m.contains("mcp_broker_exits_total{pool=\"leaky\",reason=\"crashed\"} 1"),
        "{m}"
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_pools_take_turns_in_a_budget_of_ten_processes() {
    const POOLS: usize = 50;
    const BUDGET: usize = 10;
    let pools = (0..POOLS)
        .map(|i| {
            let mut p = fixture_pool(&format!("p{i}"), &[]);
            p.max = 1;
            p.queue_timeout = Duration::from_secs(60);
            p
        })
        .collect();
    let b = TestBroker::start_with(pools, |s| s.node.max_processes = Some(BUDGET)).await;

    // Sample the live server processes (by the test's tag) all along.
    let stop = Arc::new(AtomicBool::new(false));
    let most = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (stop, most, tag) = (stop.clone(), most.clone(), b.tag.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let n = procs_with_tag(&tag).len();
                most.fetch_max(n, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    // Warm-up fills the budget and no more.
    wait_until(Duration::from_secs(20), || {
        b.broker
            .pools()
            .iter()
            .map(|p| p.status().idle)
            .sum::<usize>()
            == BUDGET
    })
    .await;

    // Every pool gets two requests at once; each holds its process a while.
    let mut calls = Vec::new();
    for i in 0..POOLS {
        for j in 0..2 {
            let c = b.client(&format!("p{i}"));
            calls.push(tokio::spawn(async move {
                let (_, msgs) = lease(&c, &tool(j, "sleep", json!({"ms": 20})), None).await;
                msgs
            }));
        }
    }
    for (n, call) in calls.into_iter().enumerate() {
        let msgs = call.await.unwrap();
        let last = msgs.last().expect("an answer");
        assert!(
            last.get("result").is_some(),
            "request {n} failed (a busy process stopped, or starved): {last}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let most = most.load(Ordering::Relaxed);
    assert!(
        most <= BUDGET,
        "{most} server processes at once, budget {BUDGET}"
    );
    assert!(most >= BUDGET / 2, "the budget was used ({most} at most)");
    let m = b.metrics.render();
    let evictions: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("mcp_broker_node_evictions_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(
        evictions > 0.0 || m.contains("reason=\"budget\""),
        "pools made room for each other: {m}"
    );
    b.stop().await;
}

#[tokio::test]
async fn tenant_pools_are_capped_and_reaped_when_idle() {
    let mut iso = fixture_pool("iso", &[]);
    iso.isolate = mcp_broker::policy::Isolate::Namespace;
    let b = TestBroker::start_with(vec![iso], |s| {
        s.node.max_tenant_pools = 2;
        s.node.tenant_idle_timeout = Duration::from_secs(2);
    })
    .await;
    b.broker.set_token_reviewer(Tokens);
    let dir = tempfile::tempdir().unwrap();
    let call = |ns: &str, name: &str| {
        let path = dir.path().join(ns);
        std::fs::write(&path, format!("token-{ns}")).unwrap();
        let c = b.client("iso").with_token_file(path);
        let msg = tool(1, name, json!({}));
        async move {
            let (_, msgs) = lease(&c, &msg, None).await;
            text_of(msgs.last().expect("an answer"))
        }
    };
    let metric = |b: &TestBroker, line: &str| b.metrics.render().lines().any(|l| l == line);
    let first_a = call("a", "identity").await;
    call("b", "whoami").await;
    // A third tenant: the least recently used idle tenant pool (a) makes room.
    call("c", "whoami").await;
    assert!(metric(
        &b,
        "mcp_broker_tenant_pools_reaped_total{reason=\"cap\"} 1"
    ));
    // Unused tenant pools go after tenant_idle_timeout.
    wait_until(Duration::from_secs(20), || {
        metric(&b, "mcp_broker_node{what=\"tenant_pools\"} 0")
    })
    .await;
    assert!(metric(
        &b,
        "mcp_broker_tenant_pools_reaped_total{reason=\"idle\"} 2"
    ));
    // Tenant a comes back: a fresh pool, the same user and home as before.
    assert_eq!(call("a", "identity").await, first_a);
    b.stop().await;
}
