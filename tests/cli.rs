//! The `mcp-broker` binary as a user runs it: `check`, `serve` with SIGTERM,
//! and flag errors.

#[path = "support/harness.rs"]
mod harness;

use harness::{poll_blocking, poll_until, procs_with_tag, send, CT_JSON, JSON_SSE, TAG_VAR};
use serde_json::json;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_mcp-broker");
const FIXTURE: &str = env!("CARGO_BIN_EXE_mcp-fixture");

fn config(dir: &std::path::Path, text: &str) -> std::path::PathBuf {
    let p = dir.join("broker.toml");
    std::fs::File::create(&p)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    p
}

#[test]
fn check_prints_resolved_pools() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(
        dir.path(),
        "[broker]\nsocket = \"/tmp/x.sock\"\n[[pool]]\nname = \"everything\"\ncommand = \"npx\"\nargs = [\"-y\", \"@modelcontextprotocol/server-everything\"]\nmode = \"sticky\"\nmin_idle = 2\nmax = 8\n",
    );
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&c)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("config OK: 1 pool(s)"), "{text}");
    assert!(
        text.contains("pool \"everything\"")
            && text.contains("mode=sticky")
            && text.contains("max=8"),
        "{text}"
    );
}

#[test]
fn check_names_the_bad_field() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(
        dir.path(),
        "[[pool]]\nname = \"p\"\ncommand = \"x\"\nmin_idle = 9\nmax = 2\n",
    );
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&c)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("pool \"p\"") && err.contains("min_idle"),
        "{err}"
    );
    let out = Command::new(BIN)
        .args(["check", "--config", "/nonexistent.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8(out.stderr)
        .unwrap()
        .contains("/nonexistent.toml"));
}

#[test]
fn up_rejects_bad_flags() {
    let out = Command::new(BIN)
        .args(["up", "--mode", "pooled", "--", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8(out.stderr).unwrap().contains("pooled"));
    let out = Command::new(BIN)
        .args(["up", "--min-idle", "5", "--max", "2", "--", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8(out.stderr).unwrap().contains("min_idle"));
}

/// `mcp-broker serve` on `sock` with one pool `fx` of the fixture (`pool`:
/// more of its settings), once its socket exists.
fn serve_fixture(dir: &std::path::Path, sock: &std::path::Path, pool: &str) -> std::process::Child {
    let c = config(
        dir,
        &format!(
            "[broker]\nsocket = \"{}\"\nmetrics_listen = \"127.0.0.1:0\"\ndrain_timeout = \"2s\"\n[[pool]]\nname = \"fx\"\ncommand = \"{FIXTURE}\"\n{pool}",
            sock.display()
        ),
    );
    let child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&c)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        poll_blocking(Duration::from_secs(10), || sock.exists()),
        "socket never appeared"
    );
    child
}

#[test]
fn serve_runs_until_sigterm_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("b.sock");
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let mut child = serve_fixture(
        dir.path(),
        &sock,
        &format!("min_idle = 2\nenv = {{ {TAG_VAR} = \"{tag}\" }}\n"),
    );
    // A second broker on the same socket takes it over (tests/upgrade.rs).
    // SIGTERM with the pool's processes running: they go with the broker.
    assert!(
        poll_blocking(Duration::from_secs(10), || procs_with_tag(&tag).len() == 2),
        "the pool never started: {:?}",
        procs_with_tag(&tag)
    );
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let mut status = None;
    assert!(
        poll_blocking(Duration::from_secs(15), || {
            status = child.try_wait().unwrap();
            status.is_some()
        }),
        "broker did not exit on SIGTERM"
    );
    assert!(status.unwrap().success());
    assert!(!sock.exists(), "socket removed");
    assert_eq!(
        procs_with_tag(&tag),
        Vec::<u32>::new(),
        "processes left behind"
    );
}

/// `mcp-broker proxy` becomes the slim `mcp-broker-proxy` beside it (same
/// pid) and serves a pod's MCP clients as before; with
/// `MCP_BROKER_NO_SLIM=1` it stays the full binary.
#[tokio::test]
async fn proxy_runs_as_the_slim_proxy_beside_it() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("b.sock");
    let mut broker = serve_fixture(dir.path(), &sock, "min_idle = 1\n");
    for (no_slim, want) in [("0", "/mcp-broker-proxy"), ("1", "/mcp-broker")] {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut proxy = Command::new(BIN)
            .args(["proxy", "--pool", "fx", "--socket"])
            .arg(&sock)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("MCP_BROKER_NO_SLIM", no_slim)
            .env("MCP_BROKER_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        // Listening once a connection is accepted; then a real session.
        assert!(
            poll_until(Duration::from_secs(10), || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            })
            .await,
            "the proxy never listened"
        );
        let url = format!("http://127.0.0.1:{port}/mcp");
        let init = json!({"jsonrpc":"2.0","id":1,"method":"initialize","params":{
            "protocolVersion":"2025-06-18","capabilities":{},
            "clientInfo":{"name":"t","version":"1"}}});
        let r = send("POST", &url, &[JSON_SSE, CT_JSON], &init.to_string()).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            r.json()["result"]["serverInfo"]["name"],
            "mcp-fixture",
            "{}",
            r.body
        );
        let exe = std::fs::read_link(format!("/proc/{}/exe", proxy.id())).unwrap();
        assert!(
            exe.display().to_string().ends_with(want),
            "MCP_BROKER_NO_SLIM={no_slim}: {}",
            exe.display()
        );
        let pid = nix::unistd::Pid::from_raw(proxy.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        assert!(proxy.wait().unwrap().success());
    }
    let pid = nix::unistd::Pid::from_raw(broker.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(broker.wait().unwrap().success());
}
