//! `mcp-broker connect` as an MCP host spawns it: the real binary as a
//! child with piped stdin/stdout, speaking JSON-RPC lines, against the
//! fixture server behind a real broker.

#[path = "support/harness.rs"]
mod harness;
#[path = "support/stdio_host.rs"]
mod stdio_host;

use harness::*;
use mcp_broker::jsonrpc::codes;
use serde_json::{json, Value};
use std::process::Stdio;
use std::time::{Duration, Instant};
use stdio_host::{Host, WAIT};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

async fn broker(max: usize) -> TestBroker {
    let mut p = fixture_pool("fx", &[]);
    p.min_idle = max;
    p.max = max;
    let b = TestBroker::start(vec![p]).await;
    b.wait_idle("fx", max).await;
    b
}

fn vm_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::test]
async fn a_host_session_through_the_shim() {
    let b = broker(2).await;
    let spawned = Instant::now();
    let mut h = Host::spawn(&b, "fx", &[]).await;
    let init = h.initialize(json!({"sampling": {}})).await;
    let init_ms = spawned.elapsed().as_secs_f64() * 1e3;
    // From the pool's cached handshake: the fixture's, at the host's version.
    assert_eq!(
        init["result"]["serverInfo"]["name"], "mcp-fixture",
        "{init}"
    );
    assert_eq!(init["result"]["protocolVersion"], "2025-06-18");
    assert_eq!(init["result"]["instructions"], "fixture");
    assert!(init["result"]["capabilities"]["tools"].is_object());

    let (_, pong) = h
        .call(&json!({"jsonrpc":"2.0","id":"p","method":"ping"}))
        .await;
    assert_eq!(pong["result"], json!({}));

    let (_, list) = h
        .call(&json!({"jsonrpc":"2.0","id":1,"method":"tools/list"}))
        .await;
    let names: Vec<&str> = list["result"]["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert!(
        names.contains(&"echo") && names.contains(&"sample"),
        "{names:?}"
    );

    let (_, echo) = h.call(&tool(2, "echo", json!({"text": "hi"}))).await;
    assert_eq!(text_of(&echo), "hi");

    // The log line reaches stdout before the response.
    let (before, logged) = h.call(&tool(3, "log", json!({"text": "note"}))).await;
    assert_eq!(text_of(&logged), "ok");
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0]["method"], "notifications/message");
    assert_eq!(before[0]["params"]["data"], "note");

    // Sampling: forwarded to the host (which declared it), answered back.
    h.send(&tool(4, "sample", json!({"prompt": "2+2?"}))).await;
    let ask = h.next().await;
    assert_eq!(ask["method"], "sampling/createMessage", "{ask}");
    assert_eq!(ask["params"]["messages"][0]["content"]["text"], "2+2?");
    h.send(&json!({"jsonrpc":"2.0","id":ask["id"].clone(),"result":{
        "role":"assistant","content":{"type":"text","text":"four"},"model":"test"}}))
        .await;
    let sampled = h.next().await;
    assert_eq!(sampled["id"], 4);
    assert_eq!(text_of(&sampled), "four");

    // Roots were not declared: the server is refused, the host asked nothing.
    let (before, roots) = h.call(&tool(5, "roots", json!({}))).await;
    assert!(before.is_empty(), "{before:?}");
    assert!(text_of(&roots).starts_with("error"), "{roots}");

    // Two at once, answered out of order, matched by id; then the slow one
    // is cancelled and ends with the broker's cancellation error.
    h.send(&tool("slow", "sleep", json!({"ms": 60_000}))).await;
    h.send(&tool("fast", "echo", json!({"text": "quick"})))
        .await;
    let first = h.next().await;
    assert_eq!(first["id"], "fast", "{first}");
    assert_eq!(text_of(&first), "quick");
    b.wait_status("fx", |s| s.busy == 1).await;
    let cancelled_at = Instant::now();
    h.send(&json!({"jsonrpc":"2.0","method":"notifications/cancelled",
        "params":{"requestId":"slow","reason":"user"}}))
        .await;
    let slow = h.next().await;
    assert_eq!(slow["id"], "slow", "{slow}");
    assert_eq!(code_of(&slow), codes::CANCELLED);
    assert!(cancelled_at.elapsed() < Duration::from_secs(5));
    b.wait_status("fx", |s| s.busy == 0).await;

    // server/discover from the cache, for either era of host.
    let (_, d) = h
        .call(&json!({"jsonrpc":"2.0","id":6,"method":"server/discover","params":{}}))
        .await;
    assert_eq!(d["result"]["supportedVersions"], json!(["2026-07-28"]));
    assert_eq!(
        d["result"]["_meta"]["io.modelcontextprotocol/serverInfo"]["name"],
        "mcp-fixture"
    );
    // A 2026-07-28 request: its result gets resultType, as from the proxy.
    let modern = json!({"jsonrpc":"2.0","id":7,"method":"tools/call","params":{
        "name":"echo","arguments":{"text":"m"},
        "_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28",
                 "io.modelcontextprotocol/clientCapabilities":{}}}});
    let (_, m) = h.call(&modern).await;
    assert_eq!(text_of(&m), "m");
    assert_eq!(m["result"]["resultType"], "complete");

    // Idle: measured, printed for the report.
    let pid = h.child.id().unwrap();
    let rss = vm_rss_kib(pid).unwrap_or(0);
    eprintln!("shim: spawn to initialize answer {init_ms:.1} ms; idle VmRSS {rss} KiB");

    // EOF with a request in flight: the shim cancels it, ends its session
    // and exits promptly; the pool gets its process back.
    h.send(&tool(8, "sleep", json!({"ms": 60_000}))).await;
    b.wait_status("fx", |s| s.busy == 1).await;
    let closed = Instant::now();
    let status = h.close(Duration::from_secs(5)).await;
    assert!(status.success(), "{status:?}");
    assert!(closed.elapsed() < Duration::from_secs(5));
    b.wait_status("fx", |s| s.busy == 0 && s.idle == 2).await;
    b.stop().await;
}

#[tokio::test]
async fn bad_input_gets_errors_not_a_crash() {
    let b = broker(1).await;
    let mut h = Host::spawn(&b, "fx", &["--max-message-bytes", "1024"]).await;
    h.initialize(json!({})).await;
    h.send_raw(b"{not json").await;
    let e = h.next().await;
    assert_eq!(code_of(&e), codes::PARSE_ERROR);
    assert_eq!(e["id"], Value::Null);
    let big = serde_json::to_vec(&tool(9, "echo", json!({"text": "x".repeat(4000)}))).unwrap();
    h.send_raw(&big).await;
    let e = h.next().await;
    assert_eq!(code_of(&e), codes::MESSAGE_TOO_LARGE, "{e}");
    assert_eq!(e["id"], 9);
    h.send_raw(br#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#)
        .await;
    let e = h.next().await;
    assert_eq!(code_of(&e), codes::INVALID_REQUEST);
    // Still serving.
    let (_, echo) = h.call(&tool(10, "echo", json!({"text": "fine"}))).await;
    assert_eq!(text_of(&echo), "fine");
    assert!(h.close(Duration::from_secs(5)).await.success());
    b.stop().await;
}

#[tokio::test]
async fn sigterm_cancels_in_flight_leases_and_exits() {
    let b = broker(1).await;
    let mut h = Host::spawn(&b, "fx", &[]).await;
    h.initialize(json!({})).await;
    h.send(&tool(1, "sleep", json!({"ms": 60_000}))).await;
    b.wait_status("fx", |s| s.busy == 1).await;
    let pid = nix::unistd::Pid::from_raw(h.child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let ended = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(5), h.child.wait())
        .await
        .expect("the shim exits within 5 s of SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(ended.elapsed() < Duration::from_secs(5));
    b.wait_status("fx", |s| s.busy == 0 && s.idle == 1).await;
    b.stop().await;
}

#[tokio::test]
async fn unreachable_broker_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mcp-broker"))
        .args(["connect", "--pool", "fx", "--socket"])
        .arg(dir.path().join("none.sock"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"initialize\",\"params\":{}}\n")
        .await
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(WAIT, out.next_line())
        .await
        .expect("an answer in time")
        .unwrap()
        .expect("a line");
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["id"], 1);
    assert_eq!(code_of(&v), codes::BROKER_UNAVAILABLE, "{v}");
    drop(stdin);
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("exits at EOF")
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn list_changed_notifications_reach_a_handshake_era_host() {
    let b = broker(2).await;
    let mut host = Host::spawn(&b, "fx", &[]).await;
    host.initialize(json!({})).await;
    // The relay subscribes right after initialize; until it has, a
    // notification is not there to relay, so call until one arrives
    // (bounded: each round is a real call and answer).
    let mut seen = false;
    for i in 0..50 {
        let (before, answer) = host
            .call(&json!({"jsonrpc":"2.0","id":100 + i,"method":"tools/call",
                "params":{"name":"list_changed","arguments":{}}}))
            .await;
        assert_eq!(answer["result"]["content"][0]["text"], "ok", "{answer}");
        let is_it = |m: &Value| m["method"] == "notifications/tools/list_changed";
        if before.iter().any(is_it) {
            seen = true;
            break;
        }
        // It may also come right after the answer: the next call's
        // `before` then holds it.
    }
    assert!(seen, "no notifications/tools/list_changed reached the host");
    let status = host.close(Duration::from_secs(5)).await;
    assert!(status.success());
    b.stop().await;
}

#[tokio::test]
async fn mode_the_pool_cannot_give_is_a_clear_error() {
    let b = broker(1).await;
    // The fixture pool is shared: exclusive use of it is refused at initialize.
    let mut h = Host::spawn(&b, "fx", &["--mode", "exclusive"]).await;
    let init = h.initialize(json!({})).await;
    assert_eq!(code_of(&init), codes::INVALID_REQUEST, "{init}");
    let msg = init["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("does not allow --mode exclusive") && msg.contains("`modes`"),
        "{msg}"
    );
    assert!(h.close(WAIT).await.success());
    // Shared use of a shared pool works.
    let mut h = Host::spawn(&b, "fx", &["--mode", "shared"]).await;
    let init = h.initialize(json!({})).await;
    assert_eq!(
        init["result"]["serverInfo"]["name"], "mcp-fixture",
        "{init}"
    );
    let (_, r) = h.call(&tool(1, "echo", json!({"text": "shared"}))).await;
    assert_eq!(text_of(&r), "shared");
    assert!(h.close(WAIT).await.success());
    b.stop().await;
}

/// The executable a running process was started from.
fn exe_of(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// `mcp-broker connect` becomes the slim `mcp-broker-connect` beside it
/// (same pid, so a host keeps its handle), unless told to stay in-process;
/// both serve the session alike.
#[tokio::test]
async fn connect_runs_as_the_slim_shim_beside_it() {
    let b = broker(1).await;
    for (no_slim, want) in [("0", "/mcp-broker-connect"), ("1", "/mcp-broker")] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mcp-broker"));
        cmd.args(["connect", "--pool", "fx", "--socket"])
            .arg(&b.socket)
            .env("MCP_BROKER_NO_SLIM", no_slim);
        let mut h = Host::spawn_cmd(cmd);
        let init = h.initialize(json!({})).await;
        assert_eq!(init["result"]["serverInfo"]["name"], "mcp-fixture");
        let (_, echo) = h.call(&tool(2, "echo", json!({"text": no_slim}))).await;
        assert_eq!(text_of(&echo), no_slim);
        let exe = exe_of(h.child.id().expect("running"));
        assert!(exe.ends_with(want), "MCP_BROKER_NO_SLIM={no_slim}: {exe}");
        assert!(h.close(Duration::from_secs(5)).await.success());
    }
    // The slim binary is a shim on its own too, with the same flags.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mcp-broker-connect"));
    cmd.args(["--pool", "fx", "--socket"]).arg(&b.socket);
    let mut h = Host::spawn_cmd(cmd);
    let init = h.initialize(json!({})).await;
    assert_eq!(init["result"]["serverInfo"]["name"], "mcp-fixture");
    assert!(h.close(Duration::from_secs(5)).await.success());
    b.stop().await;
}
