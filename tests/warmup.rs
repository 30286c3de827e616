//! Warm-up that survives picky servers: real servers built on the official
//! Rust SDK (rmcp 0.8, which exits when its first message is not
//! `initialize`, and rmcp 3, which answers the 2026-07-28 `server/discover`
//! probe; both are example targets of this crate, see `tests/servers/`) and
//! a fixture that never answers the probe. Each must serve its first
//! request within a few seconds although `init_timeout` is a minute; the
//! pool learns its server's era so later processes skip the probe.

#[path = "support/harness.rs"]
mod harness;

use harness::*;
use mcp_broker::config::PoolConfig;
use mcp_broker::protocol::Era;
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Far longer than the bound below: a probe that ate the warm-up budget
/// would blow the bound, not this timeout.
const INIT_TIMEOUT: Duration = Duration::from_secs(60);
/// "Within a few seconds of start" (debug builds, a loaded 2-core CI box).
const FIRST_ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// An example binary of this crate (built by `cargo test --all-targets`).
fn example(name: &str) -> PathBuf {
    let deps = std::env::current_exe().unwrap();
    let p = deps
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name);
    assert!(
        p.exists(),
        "{} missing: build it with `cargo build --examples` (scripts/test does)",
        p.display()
    );
    p
}

fn pool(name: &str, command: PathBuf, args: &[&str], min_idle: usize) -> PoolConfig {
    let mut p = PoolConfig::new(
        name,
        command.to_str().unwrap(),
        args.iter().map(|s| s.to_string()).collect(),
    );
    p.min_idle = min_idle;
    p.max = 3;
    p.init_timeout = INIT_TIMEOUT;
    p.stop_grace = Duration::from_millis(500);
    p
}

/// Starts a broker with `p`, waits for the first answer to `call`, and
/// returns the broker and that answer's text.
async fn first_answer(p: PoolConfig, call: serde_json::Value) -> (TestBroker, String) {
    let name = p.name.clone();
    let started = Instant::now();
    let b = TestBroker::start(vec![p]).await;
    let c = b.client(&name);
    let (status, msgs) = lease(&c, &call, None).await;
    let took = started.elapsed();
    assert_eq!(status, 200, "{msgs:?}");
    assert!(
        took < FIRST_ANSWER_WITHIN,
        "first answer took {took:?} (init_timeout {INIT_TIMEOUT:?})"
    );
    (b, text_of(msgs.last().unwrap()))
}

fn probe_refusals(b: &TestBroker, pool: &str) -> u64 {
    b.metrics
        .exits
        .with_label_values(&[pool, "probe_refused"])
        .get()
}

#[tokio::test]
async fn rmcp_08_dies_on_the_probe_then_warms_with_initialize() {
    let p = pool("r08", example("rmcp08-server"), &[], 1);
    let call = tool(1, "echo", json!({"message": "hi"}));
    let (b, text) = first_answer(p, call).await;
    assert_eq!(text, "echo: hi");
    let pool = b.broker.pool("r08").unwrap();
    assert_eq!(pool.learned_era(), Some(Era::Legacy));
    assert_eq!(pool.handshake().unwrap().era, Era::Legacy);
    // The processes started before the era was known died on the probe
    // (the first, and the one the waiting request asked for), then none:
    // once nothing is starting, every later process gets initialize.
    wait_until(Duration::from_secs(10), || pool.status().starting == 0).await;
    let killed = probe_refusals(&b, "r08");
    assert!((1..=2).contains(&killed), "{killed} died on the probe");
    // Later processes go straight to initialize: grow the pool and check
    // that no further process was lost to the probe.
    let c = b.client("r08");
    let calls = (0..6).map(|i| {
        let c = c.clone();
        async move { lease(&c, &tool(10 + i, "pid", json!({})), None).await }
    });
    for (status, msgs) in futures::future::join_all(calls).await {
        assert_eq!(status, 200);
        assert!(text_of(msgs.last().unwrap()).parse::<u32>().is_ok());
    }
    assert_eq!(probe_refusals(&b, "r08"), killed);
    assert!(b
        .metrics
        .render()
        .contains(r#"mcp_broker_pool_era{era="legacy",pool="r08"} 1"#));
    b.stop().await;
}

#[tokio::test]
async fn rmcp_3_answers_the_probe_and_is_served_stateless() {
    let p = pool("r3", example("rmcp3-server"), &[], 2);
    let (b, text) = first_answer(p, tool(1, "echo", json!({"message": "hi"}))).await;
    assert_eq!(text, "echo: hi");
    let pool = b.broker.pool("r3").unwrap();
    assert_eq!(pool.learned_era(), Some(Era::Stateless));
    assert_eq!(pool.handshake().unwrap().era, Era::Stateless);
    assert_eq!(probe_refusals(&b, "r3"), 0);
    b.wait_idle("r3", 2).await;
    b.stop().await;
}

#[tokio::test]
async fn a_server_that_ignores_the_probe_warms_after_probe_timeout() {
    let fixture = PathBuf::from(env!("CARGO_BIN_EXE_mcp-fixture"));
    let p = pool(
        "quiet",
        fixture,
        &["--era", "legacy", "--silent-before-init"],
        1,
    );
    let (b, text) = first_answer(p, tool(1, "echo", json!({"text": "hi"}))).await;
    assert_eq!(text, "hi");
    let pool = b.broker.pool("quiet").unwrap();
    assert_eq!(pool.learned_era(), Some(Era::Legacy));
    assert_eq!(
        probe_refusals(&b, "quiet"),
        0,
        "the same process got initialize"
    );
    let failed = b
        .metrics
        .exits
        .with_label_values(&["quiet", "start_failed"]);
    assert_eq!(failed.get(), 0, "no process failed its warm-up");
    b.stop().await;
}

#[tokio::test]
async fn a_slow_starting_stateless_server_is_still_recognised() {
    // The probe's answer comes after probe_timeout (the server sleeps
    // first): initialize is sent too, and the first good answer decides.
    let fixture = PathBuf::from(env!("CARGO_BIN_EXE_mcp-fixture"));
    let mut p = pool(
        "slow",
        fixture,
        &["--era", "stateless", "--init-delay-ms", "300"],
        1,
    );
    p.probe_timeout = Duration::from_millis(100);
    let (b, text) = first_answer(p, tool(1, "echo", json!({"text": "hi"}))).await;
    assert_eq!(text, "hi");
    assert_eq!(
        b.broker.pool("slow").unwrap().learned_era(),
        Some(Era::Stateless)
    );
    b.stop().await;
}
