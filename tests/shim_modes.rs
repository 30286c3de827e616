//! `mcp-broker connect --pool NAME --mode M`: each host session names its
//! mode on a pool that allows several (`modes`). Real binary, real broker,
//! the fixture server (whose `whoami` tool names its pid).

#[path = "support/harness.rs"]
mod harness;
#[path = "support/stdio_host.rs"]
mod stdio_host;

use harness::*;
use mcp_broker::config::Mode;
use mcp_broker::jsonrpc::codes;
use serde_json::json;
use std::time::Duration;
use stdio_host::{Host, WAIT};

/// Pool "mixed": shared, also allowing exclusive sessions; pool "plain":
/// shared only (no `modes`).
async fn broker() -> TestBroker {
    let mut mixed = fixture_pool("mixed", &[]);
    mixed.min_idle = 1;
    mixed.max = 4;
    mixed.modes = vec![Mode::Shared, Mode::Exclusive];
    let mut plain = fixture_pool("plain", &[]);
    plain.min_idle = 1;
    plain.max = 1;
    let b = TestBroker::start(vec![mixed, plain]).await;
    b.wait_idle("mixed", 1).await;
    b.wait_idle("plain", 1).await;
    b
}

/// The pid of the process that answers the host's `whoami`.
async fn whoami(h: &mut Host, id: u64) -> u32 {
    let (_, r) = h.call(&tool(id, "whoami", json!({}))).await;
    pid_of(&text_of(&r))
}

async fn host(b: &TestBroker, mode: &str) -> Host {
    let mut h = Host::spawn(b, "mixed", &["--mode", mode]).await;
    let init = h.initialize(json!({})).await;
    assert_eq!(
        init["result"]["serverInfo"]["name"], "mcp-fixture",
        "{init}"
    );
    h
}

#[tokio::test]
async fn exclusive_sessions_own_a_process_on_a_shared_pool() {
    let b = broker().await;
    let mut a = host(&b, "exclusive").await;
    let pa = whoami(&mut a, 1).await;
    let mut x = host(&b, "exclusive").await;
    let px = whoami(&mut x, 1).await;
    assert_ne!(pa, px, "each exclusive session has a process of its own");
    let mut s = host(&b, "shared").await;
    for id in 2..5 {
        // Interleaved: every exclusive session stays on its process, and
        // the shared session is served meanwhile, by neither of theirs.
        assert_eq!(whoami(&mut a, id).await, pa);
        assert_eq!(whoami(&mut x, id).await, px);
        let ps = whoami(&mut s, id).await;
        assert!(
            ps != pa && ps != px,
            "shared lease on {ps}, bound: {pa} {px}"
        );
    }
    // An exclusive host that exits takes its process with it.
    assert!(a.close(WAIT).await.success());
    wait_until(Duration::from_secs(10), || {
        !procs_with_tag(&b.tag).contains(&pa)
    })
    .await;
    assert!(procs_with_tag(&b.tag).contains(&px), "the other one stays");
    assert_eq!(whoami(&mut x, 9).await, px);
    let ps = whoami(&mut s, 9).await;
    assert!(ps != pa && ps != px);
    let discarded = b
        .metrics
        .exits
        .with_label_values(&["mixed", "session_ended"])
        .get();
    assert_eq!(discarded, 1, "one session ended, one process discarded");
    assert!(x.close(WAIT).await.success());
    assert!(s.close(WAIT).await.success());
    b.stop().await;
}

#[tokio::test]
async fn a_mode_the_pool_does_not_allow_is_refused_clearly() {
    let b = broker().await;
    // The shim: at initialize, naming the pool, the mode and the setting.
    let mut h = Host::spawn(&b, "plain", &["--mode", "exclusive"]).await;
    let init = h.initialize(json!({})).await;
    assert_eq!(code_of(&init), codes::INVALID_REQUEST, "{init}");
    let msg = init["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("\"plain\"") && msg.contains("--mode exclusive") && msg.contains("`modes`"),
        "{msg}"
    );
    assert!(h.close(WAIT).await.success());
    // The lease API: 403, whatever client asks.
    let c = b.client("plain").with_mode(Mode::Exclusive);
    let (status, msgs) = lease(&c, &tool(1, "whoami", json!({})), Some("s1")).await;
    assert_eq!(status, 403, "{msgs:?}");
    let err = &msgs[0];
    assert_eq!(err["id"], 1);
    assert_eq!(code_of(err), codes::NOT_ALLOWED);
    let text = err["error"]["message"].as_str().unwrap_or_default();
    assert!(
        text.contains("\"plain\"") && text.contains("\"exclusive\"") && text.contains("`modes`"),
        "{text}"
    );
    // A session keeps its mode: the mixed pool refuses a switch.
    let shared = b.client("mixed").with_mode(Mode::Shared);
    let (status, _) = lease(&shared, &tool(2, "whoami", json!({})), Some("s2")).await;
    assert_eq!(status, 200);
    let excl = b.client("mixed").with_mode(Mode::Exclusive);
    let (status, msgs) = lease(&excl, &tool(3, "whoami", json!({})), Some("s2")).await;
    assert_eq!(status, 409, "{msgs:?}");
    // Shared use of a plain shared pool works as before.
    let mut h = Host::spawn(&b, "plain", &["--mode", "shared"]).await;
    h.initialize(json!({})).await;
    let (_, r) = h.call(&tool(1, "echo", json!({"text": "shared"}))).await;
    assert_eq!(text_of(&r), "shared");
    assert!(h.close(WAIT).await.success());
    b.stop().await;
}
