//! Config reload without restart: pools added, changed and removed while
//! leases are in flight; invalid configs change nothing.

#[path = "support/harness.rs"]
mod harness;

use harness::*;
use mcp_broker::broker::reload;
use serde_json::json;
use std::time::Duration;

fn pool_toml(name: &str, tag: &str, max: usize) -> String {
    format!(
        "[[pool]]\nname = \"{name}\"\ncommand = \"{}\"\nmax = {max}\nstop_grace = \"500ms\"\nenv = {{ {TAG_VAR} = \"{tag}\" }}\n",
        env!("CARGO_BIN_EXE_mcp-fixture")
    )
}

#[tokio::test]
async fn pools_reconcile_and_in_flight_leases_finish() {
    let mut a = fixture_pool("a", &[]);
    a.max = 4;
    a.stop_grace = Duration::from_millis(500);
    let b = TestBroker::start(vec![a]).await;
    b.wait_idle("a", 1).await;
    let tag = b.tag.clone();

    // Unchanged `a` (same settings as started) + new `b`.
    let text = format!("{}{}", pool_toml("a", &tag, 4), pool_toml("b", &tag, 2));
    let s = reload::apply(&b.broker, &text).expect("valid config");
    assert_eq!(s.added, vec!["b"]);
    assert_eq!(s.unchanged, vec!["a"]);
    b.wait_idle("b", 1).await;
    let (_, m) = lease(
        &b.client("b"),
        &tool(1, "echo", json!({"text": "new pool"})),
        None,
    )
    .await;
    assert_eq!(text_of(&m[0]), "new pool");

    // Change `a` while a lease runs on the old one (until the test answers
    // its server's request): it finishes, and the replacement serves new
    // leases from other processes.
    let ca = b.client("a");
    let held = Held::start(&ca, 2).await;
    let (_, m) = lease(&ca, &tool(3, "whoami", json!({})), None).await;
    let old_pid = text_of(&m[0]);
    let text = format!("{}{}", pool_toml("a", &tag, 3), pool_toml("b", &tag, 2));
    let s = reload::apply(&b.broker, &text).unwrap();
    assert_eq!(s.changed, vec!["a"]);
    assert_eq!(b.broker.pool("a").unwrap().config().max, 3);
    let (_, m) = lease(&ca, &tool(4, "whoami", json!({})), None).await;
    assert_ne!(
        text_of(&m[0]).split(' ').next(),
        old_pid.split(' ').next(),
        "served by the new pool"
    );
    let fin = held.finish(&ca, "across").await;
    assert_eq!(fin["id"], 2);
    assert_eq!(
        text_of(&fin),
        "across",
        "in-flight lease finished across the reload"
    );

    // Invalid config: refused, nothing changes.
    assert!(reload::apply(&b.broker, "[[pool]]\nname = \"a\"\n").is_none());
    assert!(b.broker.pool("b").is_some());

    // Remove `b`: its processes stop.
    let s = reload::apply(&b.broker, &pool_toml("a", &tag, 3)).unwrap();
    assert_eq!(s.removed, vec!["b"]);
    let (status, _) = lease(&b.client("b"), &tool(5, "echo", json!({"text": "x"})), None).await;
    assert_eq!(status, 404);
    wait_until(Duration::from_secs(10), || procs_with_tag(&tag).len() <= 3).await;
    let m = b.metrics.render();
    assert!(
        m.contains("mcp_broker_config_reloads_total{result=\"applied\"} 3"),
        "reload count"
    );
    assert!(m.contains("mcp_broker_config_reloads_total{result=\"invalid\"} 1"));
    b.stop().await;
}

#[tokio::test]
async fn watch_picks_up_file_changes() {
    let b = TestBroker::start(vec![]).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.toml");
    std::fs::write(&path, "").unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(reload::watch(
        b.broker.clone(),
        path.clone(),
        Vec::new(),
        Duration::from_millis(50),
        stop.clone(),
        None,
    ));
    std::fs::write(&path, pool_toml("late", &b.tag, 1)).unwrap();
    wait_until(Duration::from_secs(10), || b.broker.pool("late").is_some()).await;
    b.wait_idle("late", 1).await;
    stop.cancel();
    task.await.unwrap();
    b.stop().await;
}
