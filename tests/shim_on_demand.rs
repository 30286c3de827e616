//! `mcp-broker connect -- CMD ARGS...`: on-demand pools in a per-user
//! broker that the first shim starts. Real binaries throughout: the shims,
//! the per-user broker they start, and the fixture server it pools.
//!
//! Every test gets its own `XDG_RUNTIME_DIR`, so its per-user broker is its
//! own; the tag in the environment finds every process it started.

#[path = "support/harness.rs"]
mod harness;
#[path = "support/stdio_host.rs"]
mod stdio_host;

use harness::*;
use mcp_broker::lease_api::{codes, OnDemandRequest, PoolDescription};
use mcp_broker::process::stat;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use stdio_host::Host;
use tokio::process::Command;

/// Longest wait for a state the test waits on.
const LIMIT: Duration = Duration::from_secs(20);

/// One test's user: a private runtime dir and a tag.
struct User {
    dir: tempfile::TempDir,
    tag: String,
}

impl User {
    fn new() -> User {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        User {
            dir,
            tag: uuid::Uuid::new_v4().simple().to_string(),
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("mcp-broker/broker.sock")
    }

    /// `connect EXTRA... -- mcp-fixture` in this user's session.
    fn shim(&self, extra: &[&str]) -> Host {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mcp-broker"));
        cmd.arg("connect")
            .args(extra)
            .arg("--env")
            .arg(format!("{TAG_VAR}={}", self.tag))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_mcp-fixture"))
            .env("XDG_RUNTIME_DIR", self.dir.path())
            .env(TAG_VAR, &self.tag);
        Host::spawn_cmd(cmd)
    }

    /// The per-user broker's pid, from its pid file.
    fn broker_pid(&self) -> Option<i32> {
        mcp_broker::user_broker::autostart::running_pid(&self.socket())
    }

    /// Live per-user brokers of this user (by tag and command line).
    fn brokers(&self) -> Vec<u32> {
        let all: Vec<u32> = procs_with_tag(&self.tag)
            .into_iter()
            .filter(|p| {
                std::fs::read(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == b"user-broker"))
            })
            .collect();
        // A server between fork and exec still shows its broker's command
        // line; it is the broker's child, not a broker.
        all.iter()
            .copied()
            .filter(|p| !stat::read(*p).is_some_and(|s| all.contains(&s.ppid)))
            .collect()
    }

    /// Stops the per-user broker and checks that nothing of this test is
    /// left running.
    async fn stop(self) {
        for pid in self.brokers() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        assert_no_procs(&self.tag).await;
    }
}

/// `GET /v1/pools` on `socket`, as raw HTTP/1.1: (status, body).
fn get(socket: &Path, path: &str) -> (u16, String) {
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connects");
    s.set_read_timeout(Some(LIMIT)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
    (status, body.unwrap_or_default())
}

fn pools(socket: &Path) -> Vec<PoolDescription> {
    let (status, body) = get(socket, "/v1/pools");
    assert_eq!(status, 200, "{body}");
    // Content-Length framed: the body is the JSON array.
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// The fixture's pid as a `whoami` call through `h` reports it.
async fn whoami(h: &mut Host, id: u64) -> u32 {
    let (_, r) = h.call(&tool(id, "whoami", json!({}))).await;
    pid_of(&text_of(&r))
}

fn alive(pid: u32) -> bool {
    stat::read(pid).is_some_and(|s| s.live())
}

#[tokio::test]
async fn concurrent_first_use_starts_one_broker_and_one_pool() {
    let u = User::new();
    let mut hosts: Vec<Host> = (0..8).map(|_| u.shim(&[])).collect();
    let mut pids = Vec::new();
    for (i, h) in hosts.iter_mut().enumerate() {
        let init = h.initialize(json!({})).await;
        assert_eq!(
            init["result"]["serverInfo"]["name"], "mcp-fixture",
            "{init}"
        );
        pids.push(whoami(h, i as u64 + 1).await);
    }
    assert_eq!(u.brokers().len(), 1, "exactly one per-user broker");
    assert_eq!(u.broker_pid(), Some(u.brokers()[0] as i32));
    let all = pools(&u.socket());
    assert_eq!(all.len(), 1, "one pool for one command: {all:?}");
    // Exclusive by default: every host session has a process of its own.
    pids.sort();
    pids.dedup();
    assert_eq!(pids.len(), 8, "{pids:?}");
    for h in hosts {
        assert!(h.close(LIMIT).await.success());
    }
    // Their sessions ended: only the warm spare stays.
    let name = all[0].name.clone();
    wait_until(LIMIT, || {
        let p = pools(&u.socket());
        p[0].name == name && p[0].status.busy == 0 && p[0].status.idle == 1
    })
    .await;
    u.stop().await;
}

#[tokio::test]
async fn a_killed_broker_is_replaced_and_its_stale_socket_removed() {
    let u = User::new();
    let mut h = u.shim(&[]);
    h.initialize(json!({})).await;
    whoami(&mut h, 1).await;
    assert!(h.close(LIMIT).await.success());
    let first = u.broker_pid().expect("a pid file");
    // SIGKILL: the socket file stays behind, nothing listens on it.
    let servers: Vec<u32> = procs_with_tag(&u.tag);
    kill(Pid::from_raw(first), Signal::SIGKILL).unwrap();
    for p in servers {
        let _ = kill(Pid::from_raw(p as i32), Signal::SIGKILL);
    }
    wait_until(LIMIT, || !alive(first as u32)).await;
    assert!(u.socket().exists(), "a stale socket is left");
    // A server the broker was forking when it died holds a copy of the
    // listening socket until its exec (close-on-exec) a moment later.
    wait_until(LIMIT, || {
        std::os::unix::net::UnixStream::connect(u.socket()).is_err()
    })
    .await;
    let mut h = u.shim(&[]);
    let init = h.initialize(json!({})).await;
    assert_eq!(
        init["result"]["serverInfo"]["name"], "mcp-fixture",
        "{init}"
    );
    whoami(&mut h, 1).await;
    let second = u.broker_pid().unwrap();
    assert_ne!(first, second);
    // Between fork and exec a new server still shows the broker's command
    // line: wait for the one broker to be alone.
    wait_until(LIMIT, || u.brokers() == vec![second as u32]).await;
    assert!(h.close(LIMIT).await.success());
    u.stop().await;
}

#[tokio::test]
async fn a_stale_socket_from_before_is_handled() {
    let u = User::new();
    std::fs::create_dir(u.dir.path().join("mcp-broker")).unwrap();
    // A socket file nobody listens on (its listener is gone).
    drop(std::os::unix::net::UnixListener::bind(u.socket()).unwrap());
    assert!(u.socket().exists());
    let mut h = u.shim(&["--shared"]);
    h.initialize(json!({})).await;
    let a = whoami(&mut h, 1).await;
    let b = whoami(&mut h, 2).await;
    assert!(alive(a) && alive(b));
    let all = pools(&u.socket());
    assert_eq!(all[0].mode, mcp_broker::config::Mode::Shared);
    assert!(h.close(LIMIT).await.success());
    u.stop().await;
}

/// Ends a shim holding an exclusive process with a request in flight, and
/// checks that the lease ends and the process is discarded.
async fn end_shim_mid_request(how: &str) {
    let u = User::new();
    let mut h = u.shim(&[]);
    h.initialize(json!({})).await;
    let mine = whoami(&mut h, 1).await;
    h.send(&tool(2, "sleep", json!({"ms": 60_000}))).await;
    wait_until(LIMIT, || pools(&u.socket())[0].status.busy == 1).await;
    let shim = Pid::from_raw(h.child.id().unwrap() as i32);
    match how {
        "eof" => {
            let status = h.close(LIMIT).await;
            assert!(status.success(), "{status:?}");
        }
        "sigterm" | "sigkill" => {
            let sig = if how == "sigterm" {
                Signal::SIGTERM
            } else {
                Signal::SIGKILL
            };
            kill(shim, sig).unwrap();
            let status = tokio::time::timeout(LIMIT, h.child.wait())
                .await
                .expect("the shim exits")
                .unwrap();
            assert_eq!(status.success(), how == "sigterm", "{status:?}");
        }
        _ => unreachable!(),
    }
    // No lease held, the session's process gone, only the spare left.
    wait_until(LIMIT, || {
        let p = &pools(&u.socket())[0];
        p.status.busy == 0 && p.status.waiting == 0 && p.status.idle == 1 && !alive(mine)
    })
    .await;
    let broker = u.broker_pid().unwrap() as u32;
    let left: Vec<u32> = procs_with_tag(&u.tag)
        .into_iter()
        .filter(|p| *p != broker)
        .collect();
    assert_eq!(left.len(), 1, "only the warm spare: {left:?}");
    u.stop().await;
}

#[tokio::test]
async fn stdin_eof_mid_request_leaves_no_lease_and_no_process() {
    end_shim_mid_request("eof").await;
}

#[tokio::test]
async fn sigterm_mid_request_leaves_no_lease_and_no_process() {
    end_shim_mid_request("sigterm").await;
}

#[tokio::test]
async fn sigkill_mid_request_leaves_no_lease_and_no_process() {
    end_shim_mid_request("sigkill").await;
}

/// Needs root: starts a per-user broker as uid 65534 and connects as root,
/// which the directory's mode lets through but the broker must not.
#[tokio::test]
async fn the_user_broker_refuses_other_users_needs_root() {
    assert!(
        nix::unistd::getuid().is_root(),
        "this test needs root (CI runs as root)"
    );
    let u = User::new();
    std::fs::set_permissions(u.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = u.socket();
    // The other user's own directory, as its session would have it.
    let own = socket.parent().unwrap();
    std::fs::create_dir(own).unwrap();
    std::os::unix::fs::chown(own, Some(65534), Some(65534)).unwrap();
    let mut broker = Command::new(env!("CARGO_BIN_EXE_mcp-broker"))
        .args(["user-broker", "--socket"])
        .arg(&socket)
        .env(TAG_VAR, &u.tag)
        .uid(65534)
        .gid(65534)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_until(LIMIT, || socket.exists()).await;
    let meta = std::fs::metadata(socket.parent().unwrap()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o700);
    assert_eq!(
        std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Root gets past the file modes; SO_PEERCRED says uid 0, not 65534.
    let (status, body) = get(&socket, "/v1/pools");
    assert_eq!(status, 403, "{body}");
    let err: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(code_of(&err), codes::NOT_ALLOWED, "{err}");
    assert!(body.contains("serves only uid 65534"), "{body}");
    broker.kill().await.unwrap();
    u.stop().await;
}

#[tokio::test]
async fn a_node_broker_never_runs_commands_callers_name() {
    let b = TestBroker::start(vec![fixture_pool("fx", &[])]).await;
    let req = OnDemandRequest {
        command: "/bin/sh".into(),
        args: vec!["-c".into(), "touch /tmp/should-not-exist".into()],
        cwd: "/".into(),
        env: Default::default(),
        mode: mcp_broker::config::Mode::Exclusive,
    };
    let err = b.client("fx").on_demand_pool(&req).await.unwrap_err();
    let shown = err.to_string();
    assert!(shown.contains("403"), "{shown}");
    assert!(shown.contains("per-user broker"), "{shown}");
    assert_eq!(b.broker.pools().len(), 1, "no pool was added");
    // And through the shim: a clear error, no pool.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mcp-broker"));
    cmd.args(["connect", "--socket"])
        .arg(&b.socket)
        .args(["--", "/bin/true"]);
    let out = cmd.output().await.unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does not run commands"), "{stderr}");
    assert_eq!(b.broker.pools().len(), 1);
    b.stop().await;
}

#[tokio::test]
async fn an_unused_on_demand_pool_is_reaped() {
    let u = User::new();
    let socket = u.socket();
    std::fs::create_dir(socket.parent().unwrap()).unwrap();
    let _broker = Command::new(env!("CARGO_BIN_EXE_mcp-broker"))
        .args(["user-broker", "--pool-idle-timeout", "300ms", "--socket"])
        .arg(&socket)
        .env(TAG_VAR, &u.tag)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_until(LIMIT, || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    })
    .await;
    let mut h = u.shim(&["--shared"]);
    h.initialize(json!({})).await;
    let server = whoami(&mut h, 1).await;
    // A connected shim holds the pool, however long it is idle: nothing to
    // wait on for something that must not happen, so three idle timeouts.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(pools(&socket).len(), 1, "reaped while a shim was connected");
    assert!(h.close(LIMIT).await.success());
    // Then nothing uses it: the pool and its processes go.
    wait_until(LIMIT, || pools(&socket).is_empty() && !alive(server)).await;
    // And the next use creates it again.
    let mut h = u.shim(&["--shared"]);
    h.initialize(json!({})).await;
    whoami(&mut h, 1).await;
    assert_eq!(pools(&socket).len(), 1);
    assert!(h.close(LIMIT).await.success());
    // SIGTERM: the broker stops its pool's processes itself.
    u.stop().await;
}
