//! Pools (and tenants) as the attacker in one of them sees each other: a
//! child of pool A (or of tenant X) tries to read `/proc/<pid>/{environ,fd,
//! mem}` of a child of pool B (tenant Y), to write into B's home and cache,
//! and to reach or replace the broker's socket. Every attempt must fail,
//! while the same operations on its own files succeed (so a broken probe
//! cannot pass for isolation).
//!
//! Needs root (the broker switches users only with CAP_SETUID/SETGID, and
//! CI runs as root): without it the tests fail, saying so.

#[path = "support/harness.rs"]
mod harness;

use harness::*;
use mcp_broker::config::sandbox::Principal;
use mcp_broker::policy::Isolate;
use mcp_broker::proxy::backend::Backend;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "tests/isolation.rs needs root: the broker gives pools their own uids only when it can switch users"
    );
}

/// Calls tool `name` on `pool` with a fresh lease; returns its text.
async fn call_text(b: &TestBroker, pool: &str, name: &str, args: Value) -> String {
    let (status, msgs) = lease(&b.client(pool), &tool(1, name, args), None).await;
    assert_eq!(status, 200, "{msgs:?}");
    text_of(msgs.last().expect("a response"))
}

/// `uid`, `home` and the pid of the pool's (only) process.
async fn whois(b: &TestBroker, pool: &str) -> (u32, String, u32) {
    let id = call_text(b, pool, "identity", json!({})).await;
    let fields: HashMap<&str, &str> = id.split(' ').filter_map(|kv| kv.split_once('=')).collect();
    let pid = call_text(b, pool, "whoami", json!({})).await;
    let pid = pid
        .strip_prefix("pid=")
        .and_then(|p| p.split(' ').next())
        .and_then(|p| p.parse().ok())
        .unwrap();
    (
        fields["uid"].parse().unwrap(),
        fields["home"].to_string(),
        pid,
    )
}

async fn probe(b: &TestBroker, pool: &str, op: &str, path: &str) -> String {
    call_text(b, pool, "probe", json!({"op": op, "path": path})).await
}

/// Pool `from` attacks the process `pid` and the home `home` of another pool.
async fn assert_walled_off(b: &TestBroker, from: &str, pid: u32, home: &str) {
    for (op, path) in [
        ("read", format!("/proc/{pid}/environ")),
        ("read", format!("/proc/{pid}/mem")),
        ("read", format!("/proc/{pid}/fd/0")),
        ("list", format!("/proc/{pid}/fd")),
        ("list", home.to_string()),
        ("write", format!("{home}/planted")),
        ("write", format!("{home}/.cache/planted")),
        ("write", format!("{home}/tmp/planted")),
    ] {
        let r = probe(b, from, op, &path).await;
        assert!(r.starts_with("denied:"), "{from}: {op} {path}: {r}");
    }
}

#[tokio::test]
async fn pools_run_as_their_own_users_and_cannot_reach_each_other() {
    require_root();
    let mut root = fixture_pool("root", &[]);
    root.sandbox.user = Some(Principal::Id(0));
    let b = TestBroker::start(vec![fixture_pool("a", &[]), fixture_pool("b", &[]), root]).await;
    b.wait_idle("a", 1).await;
    b.wait_idle("b", 1).await;
    let (uid_a, home_a, pid_a) = whois(&b, "a").await;
    let (uid_b, home_b, pid_b) = whois(&b, "b").await;
    assert_ne!(uid_a, uid_b, "a uid per pool");
    assert!(
        uid_a >= 2_000_000_000 && uid_b >= 2_000_000_000,
        "from the default range"
    );
    assert_ne!(home_a, home_b, "a home per pool");
    let tmp = call_text(&b, "a", "identity", json!({})).await;
    assert!(tmp.contains(&format!("tmpdir={home_a}/tmp")), "{tmp}");

    // Controls: the probe works on the pool's own files.
    let own = probe(&b, "a", "read", &format!("/proc/{pid_a}/environ")).await;
    assert!(own.starts_with("ok:"), "own environ: {own}");
    let own = probe(&b, "a", "write", &format!("{home_a}/.cache/mine")).await;
    assert!(own.starts_with("ok:"), "own cache: {own}");

    assert_walled_off(&b, "a", pid_b, &home_b).await;
    assert_walled_off(&b, "b", pid_a, &home_a).await;

    // The broker's socket: neither reachable nor replaceable.
    let sock = b.socket.display().to_string();
    let dir = b.socket.parent().unwrap().display().to_string();
    for (op, path) in [
        ("connect", sock.clone()),
        ("unlink", sock.clone()),
        ("write", format!("{dir}/evil.sock")),
        ("list", format!("{dir}/state/homes")),
        ("write", format!("{dir}/state/uids")),
    ] {
        let r = probe(&b, "a", op, &path).await;
        assert!(r.starts_with("denied:"), "{op} {path}: {r}");
    }
    assert!(b.socket.exists(), "the socket is still there");
    // Even with the socket opened to everyone, a pool's user is turned away.
    std::fs::set_permissions(&b.socket, PermissionsExt::from_mode(0o666)).unwrap();
    let r = probe(&b, "a", "lease_api", &sock).await;
    assert!(r.starts_with("denied:"), "lease API from a pool user: {r}");
    // Control: a pool explicitly run as root (`sandbox.user`) is answered.
    let r = probe(&b, "root", "lease_api", &sock).await;
    assert!(
        r.starts_with("ok: HTTP/1.1 200"),
        "lease API from root: {r}"
    );
    b.stop().await;
}

#[tokio::test]
async fn tenants_of_an_isolated_pool_cannot_reach_each_other() {
    require_root();
    let mut iso = fixture_pool("iso", &[]);
    iso.isolate = Isolate::Namespace;
    let b = TestBroker::start(vec![iso]).await;
    b.broker.set_token_reviewer(Tokens);
    let dir = tempfile::tempdir().unwrap();
    let as_tenant = |ns: &str| {
        let path = dir.path().join(ns);
        std::fs::write(&path, format!("token-{ns}")).unwrap();
        b.client("iso").with_token_file(path)
    };
    let (x, y) = (as_tenant("x"), as_tenant("y"));
    let call = |c: &Backend, name: &str, args: Value| {
        let (c, msg) = (c.clone(), tool(1, name, args));
        async move {
            let (status, msgs) = lease(&c, &msg, None).await;
            assert_eq!(status, 200, "{msgs:?}");
            text_of(msgs.last().expect("a response"))
        }
    };
    let ident = |t: String| -> HashMap<String, String> {
        t.split(' ')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let ix = ident(call(&x, "identity", json!({})).await);
    let iy = ident(call(&y, "identity", json!({})).await);
    assert_ne!(ix["uid"], iy["uid"], "a uid per tenant");
    assert_ne!(ix["home"], iy["home"], "a home per tenant");
    let pid_y = pid_of(&call(&y, "whoami", json!({})).await);
    let home_y = &iy["home"];
    for (op, path) in [
        ("read", format!("/proc/{pid_y}/environ")),
        ("read", format!("/proc/{pid_y}/fd/0")),
        ("list", format!("/proc/{pid_y}/fd")),
        ("write", format!("{home_y}/planted")),
        ("write", format!("{home_y}/.cache/planted")),
    ] {
        let r = call(&x, "probe", json!({"op": op, "path": path})).await;
        assert!(r.starts_with("denied:"), "tenant x: {op} {path}: {r}");
    }
    b.stop().await;
}
