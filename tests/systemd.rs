//! The systemd deployment: the broker under `systemd-socket-activate` leases
//! through the inherited socket (and keeps it out of its children), a
//! connection made while the broker restarts waits in the socket's backlog
//! and is served by the next broker, the
//! units in `systemd/` pass `systemd-analyze verify`, the sysusers file
//! parses, and the shipped configs pass `mcp-broker check`.
//!
//! The systemd tools are required, not optional: a missing one fails the
//! test with the package to install.

#[path = "support/harness.rs"]
mod harness;

use harness::*;
use mcp_broker::metrics::Metrics;
use mcp_broker::proxy::backend::Backend;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_mcp-broker");
const FIXTURE: &str = env!("CARGO_BIN_EXE_mcp-fixture");

/// The repository's root (units and configs live there).
fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The path of a systemd tool, or a failure saying how to install it.
fn require_tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/bin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!(
        "{name} not found: install the Debian package `systemd` \
         (apt-get install systemd; .ci/run does this)"
    );
}

/// Waits (up to `limit`) for `child` to exit.
fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let mut status = None;
    if !poll_blocking(limit, || {
        status = child.try_wait().unwrap();
        status.is_some()
    }) {
        let _ = child.kill();
        panic!("process {} did not exit within {limit:?}", child.id());
    }
    status.unwrap()
}

/// Connections waiting in the accept queue of the listening socket at
/// `path`: Linux lists each in `/proc/net/unix` under the listener's path,
/// in state 02 (connecting: no socket has accepted it yet).
fn backlog(path: &Path) -> usize {
    let path = path.display().to_string();
    std::fs::read_to_string("/proc/net/unix")
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() == 8 && f[5] == "02" && f[7] == path
        })
        .count()
}

/// The `socket:[inode]` link of `pid`'s fd `fd`.
fn fd_link(pid: u32, fd: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// A broker config in `dir` with one fixture pool whose processes carry a
/// fresh leak tag; `socket` is the configured path (an inherited socket wins).
fn write_config(dir: &Path, socket: &Path) -> (PathBuf, String) {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let cfg = dir.join("broker.toml");
    std::fs::write(
        &cfg,
        format!(
            "[broker]\nsocket = \"{}\"\nmetrics_listen = \"\"\ndrain_timeout = \"2s\"\n\
             [[pool]]\nname = \"fx\"\ncommand = \"{FIXTURE}\"\nmin_idle = 1\nstop_grace = \"500ms\"\n\
             env = {{ {TAG_VAR} = \"{tag}\" }}\n",
            socket.display()
        ),
    )
    .unwrap();
    (cfg, tag)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_through_a_socket_passed_by_systemd_socket_activate() {
    let activate = require_tool("systemd-socket-activate");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("b.sock");
    // The config names another path: an inherited socket wins, and the
    // configured one is never created.
    let configured = dir.path().join("configured.sock");
    let (cfg, tag) = write_config(dir.path(), &configured);
    let log = std::fs::File::create(dir.path().join("broker.log")).unwrap();
    // systemd-socket-activate binds the socket, waits for the first
    // connection attempt, then execs the broker (same pid) with LISTEN_FDS=1
    // and LISTEN_PID set, exactly as systemd does for a .socket unit.
    let mut child = Command::new(&activate)
        .arg("-l")
        .arg(&sock)
        .args([BIN, "serve", "--config"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let pid = child.id();
    assert!(
        poll_blocking(Duration::from_secs(10), || sock.exists()),
        "systemd-socket-activate never created {}",
        sock.display()
    );

    // The first connection queues in the backlog while the broker starts and
    // warms its pool; the lease then goes through.
    let client = Backend::new(
        sock.clone(),
        "fx".into(),
        16 << 20,
        Arc::new(Metrics::new()),
    );
    let (status, msgs) = tokio::time::timeout(
        Duration::from_secs(30),
        lease(
            &client,
            &tool(1, "echo", json!({"text": "activated"})),
            None,
        ),
    )
    .await
    .expect("lease answered in time");
    let broker_log = || std::fs::read_to_string(dir.path().join("broker.log")).unwrap_or_default();
    assert_eq!(status, 200, "{}", broker_log());
    assert_eq!(text_of(msgs.last().unwrap()), "activated");
    assert!(
        broker_log().contains("socket activation"),
        "broker did not report the inherited socket:\n{}",
        broker_log()
    );
    assert!(!configured.exists(), "the configured socket was bound too");

    // The broker's children inherit neither the socket nor LISTEN_*.
    let listening = fd_link(pid, 3);
    assert!(listening.starts_with("socket:"), "fd 3 is {listening:?}");
    let kids = procs_with_tag(&tag);
    assert!(!kids.is_empty(), "no fixture process found");
    for kid in kids {
        let env = std::fs::read(format!("/proc/{kid}/environ")).unwrap();
        for kv in env.split(|b| *b == 0) {
            assert!(
                !kv.starts_with(b"LISTEN_"),
                "child {kid} inherited {}",
                String::from_utf8_lossy(kv)
            );
        }
        for fd in std::fs::read_dir(format!("/proc/{kid}/fd"))
            .unwrap()
            .flatten()
        {
            let link = std::fs::read_link(fd.path()).unwrap_or_default();
            assert_ne!(
                link.display().to_string(),
                listening,
                "child {kid} inherited the listening socket"
            );
        }
    }

    // SIGTERM: drain and exit cleanly; the socket belongs to the activator
    // (systemd) and stays.
    sigterm(pid);
    let status = wait_exit(&mut child, Duration::from_secs(20));
    assert!(status.success(), "exit {status:?}:\n{}", broker_log());
    assert!(sock.exists(), "an inherited socket must not be removed");
    assert_no_procs(&tag).await;
}

/// Sends SIGTERM to the child `pid` (spawned by this test, not reaped yet).
fn sigterm(pid: u32) {
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
}

/// Starts `mcp-broker serve` with `listener` as fd 3 and LISTEN_FDS=1 /
/// LISTEN_PID=<its pid>, as systemd does for each start of the service.
fn start_activated(listener: &std::os::unix::net::UnixListener, cfg: &Path, log: &Path) -> Child {
    use std::os::fd::{AsRawFd, BorrowedFd, IntoRawFd};
    use std::os::unix::process::CommandExt;
    let fd = listener.as_raw_fd();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut cmd = Command::new("/bin/sh");
    // `exec` keeps the shell's pid, so $$ is the broker's pid.
    cmd.args([
        "-c",
        "LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" \"$@\"",
        BIN,
        "serve",
        "--config",
    ])
    .arg(cfg)
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(log);
    // SAFETY: dup2 is async-signal-safe; it only rearranges fds in the
    // child. `fd` (the listener) stays open until `spawn` returns, and fd 3
    // is handed to the broker across exec, so the OwnedFd nix returns for
    // it is released, not closed.
    unsafe {
        cmd.pre_exec(move || {
            let _fd3 = nix::unistd::dup2_raw(BorrowedFd::borrow_raw(fd), 3)?.into_raw_fd();
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_wait_in_the_backlog_while_the_broker_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("b.sock");
    let log = dir.path().join("broker.log");
    let (cfg, tag) = write_config(dir.path(), &dir.path().join("configured.sock"));
    // The test plays systemd: it owns the listening socket across restarts.
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let client = Backend::new(
        sock.clone(),
        "fx".into(),
        16 << 20,
        Arc::new(Metrics::new()),
    );
    let echo = |text: &str| tool(1, "echo", json!({ "text": text }));
    let broker_log = || std::fs::read_to_string(&log).unwrap_or_default();

    let mut first = start_activated(&listener, &cfg, &log);
    let (status, msgs) = lease(&client, &echo("first"), None).await;
    assert_eq!(status, 200, "{}", broker_log());
    assert_eq!(text_of(msgs.last().unwrap()), "first");
    sigterm(first.id());
    assert!(
        wait_exit(&mut first, Duration::from_secs(20)).success(),
        "{}",
        broker_log()
    );
    assert!(
        sock.exists(),
        "the broker removed a socket it did not create"
    );

    // No broker runs now: the request is accepted by the kernel and waits.
    let waiting = tokio::spawn({
        let client = client.clone();
        async move { lease(&client, &tool(2, "echo", json!({"text": "queued"})), None).await }
    });
    // Connected and waiting in the listener's backlog, not merely spawned.
    wait_until(Duration::from_secs(10), || backlog(&sock) == 1).await;
    assert!(!waiting.is_finished(), "answered with no broker running");

    let mut second = start_activated(&listener, &cfg, &log);
    let (status, msgs) = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("queued request answered after the restart")
        .unwrap();
    assert_eq!(status, 200, "{}", broker_log());
    assert_eq!(text_of(msgs.last().unwrap()), "queued");
    sigterm(second.id());
    assert!(
        wait_exit(&mut second, Duration::from_secs(20)).success(),
        "{}",
        broker_log()
    );
    assert_no_procs(&tag).await;
}

/// Copies the units to `dir` with the binary path pointing at the built
/// binary: `systemd-analyze verify` checks that ExecStart= is executable.
fn units_for_verify(src: &str, dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(repo().join(src)).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !(name.ends_with(".service") || name.ends_with(".socket")) {
            continue;
        }
        let text = std::fs::read_to_string(e.path()).unwrap();
        assert!(
            name.ends_with(".socket") || text.contains("/usr/local/bin/mcp-broker"),
            "{name} should run /usr/local/bin/mcp-broker"
        );
        let p = dir.join(&name);
        std::fs::write(&p, text.replace("/usr/local/bin/mcp-broker", BIN)).unwrap();
        out.push(p);
    }
    out.sort();
    out
}

#[test]
fn units_pass_systemd_analyze_verify() {
    let analyze = require_tool("systemd-analyze");
    let dir = tempfile::tempdir().unwrap();
    let units = units_for_verify("systemd", dir.path());
    let names: Vec<String> = units
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
        .collect();
    for want in [
        "mcp-broker.service",
        "mcp-broker.socket",
        "mcp-broker-proxy@.service",
    ] {
        assert!(names.iter().any(|n| n == want), "missing {want}: {names:?}");
    }
    verify(&analyze, &units);
}

/// `systemd-analyze verify` passes `units` without a word.
fn verify(analyze: &Path, units: &[PathBuf]) {
    let out = Command::new(analyze)
        .arg("verify")
        .args(units)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // verify exits 0 on warnings such as unknown keys: any output fails.
    assert!(
        out.status.success() && text.trim().is_empty(),
        "systemd-analyze verify: {:?}\n{text}",
        out.status
    );
}

#[test]
fn user_units_pass_verify_and_activate_the_per_user_broker() {
    let analyze = require_tool("systemd-analyze");
    let dir = tempfile::tempdir().unwrap();
    let units = units_for_verify("systemd/user", dir.path());
    assert_eq!(units.len(), 2, "{units:?}");
    verify(&analyze, &units);
    let read = |n: &str| std::fs::read_to_string(repo().join("systemd/user").join(n)).unwrap();
    let socket_unit = read("mcp-broker.socket");
    // The path shims look at by default, only the user may reach it.
    assert!(socket_unit.contains("ListenStream=%t/mcp-broker/broker.sock"));
    assert!(socket_unit.contains("SocketMode=0600") && socket_unit.contains("DirectoryMode=0700"));
    assert!(read("mcp-broker.service").contains("mcp-broker user-broker"));

    // What the units do, played by systemd-socket-activate: the per-user
    // broker takes the socket from LISTEN_FDS and a shim's on-demand pool
    // is served by it (the shim starts no broker of its own).
    let activate = require_tool("systemd-socket-activate");
    let run = tempfile::tempdir().unwrap();
    let own = run.path().join("mcp-broker");
    std::fs::create_dir(&own).unwrap();
    let sock = own.join("broker.sock");
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let mut broker = Command::new(&activate)
        .arg("-l")
        .arg(&sock)
        .args([BIN, "user-broker"])
        .env(TAG_VAR, &tag)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(poll_blocking(Duration::from_secs(10), || sock.exists()));
    let mut shim = Command::new(BIN)
        .args(["connect", "--env"])
        .arg(format!("{TAG_VAR}={tag}"))
        .args(["--", FIXTURE])
        .env("XDG_RUNTIME_DIR", run.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = shim.stdin.take().unwrap();
    let init = json!({"jsonrpc":"2.0","id":1,"method":"initialize","params":{
        "protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"0"}}});
    {
        use std::io::Write;
        writeln!(stdin, "{init}").unwrap();
        writeln!(stdin, "{}", tool(2, "echo", json!({"text": "activated"}))).unwrap();
    }
    // Answers come in any order; the echo's is the one with id 2.
    let answer = {
        use std::io::BufRead;
        std::io::BufReader::new(shim.stdout.take().unwrap())
            .lines()
            .map_while(Result::ok)
            .find(|l| l.contains("\"id\":2"))
            .unwrap_or_default()
    };
    assert!(answer.contains("\"activated\""), "{answer}");
    drop(stdin);
    assert!(wait_exit(&mut shim, Duration::from_secs(10)).success());
    let pid = mcp_broker::user_broker::autostart::running_pid(&sock);
    assert_eq!(
        pid,
        Some(broker.id() as i32),
        "the activated broker served it"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(broker.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(wait_exit(&mut broker, Duration::from_secs(20)).success());
    assert!(sock.exists(), "an inherited socket is systemd's to remove");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(assert_no_procs(&tag));
}

#[test]
fn unit_settings_fit_together() {
    let read = |n: &str| std::fs::read_to_string(repo().join("systemd").join(n)).unwrap();
    let service = read("mcp-broker.service");
    let socket = read("mcp-broker.socket");
    let config = read("broker.toml");
    let value = |text: &str, key: &str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key}= not set"))
            .trim()
            .to_string()
    };
    let listen = value(&socket, "ListenStream");
    assert!(
        config.contains(&format!("socket = \"{listen}\"")),
        "broker.toml's socket should match ListenStream={listen}"
    );
    assert!(config.contains(&format!(
        "socket_group = \"{}\"",
        value(&socket, "SocketGroup")
    )));
    let stop = humantime::parse_duration(&value(&service, "TimeoutStopSec")).unwrap();
    let drain = config
        .lines()
        .find_map(|l| l.strip_prefix("drain_timeout = "))
        .map(|v| humantime::parse_duration(v.trim_matches('"')).unwrap())
        .unwrap();
    assert!(
        stop >= drain + Duration::from_secs(15),
        "TimeoutStopSec ({stop:?}) must exceed drain_timeout ({drain:?}) with room to stop processes"
    );
    // The socket directory must survive a stop of the service while the
    // socket unit keeps listening in it.
    assert_eq!(value(&service, "RuntimeDirectoryPreserve"), "yes");
    assert_eq!(value(&service, "KillMode"), "mixed");
}

#[test]
fn sysusers_file_parses() {
    let sysusers = require_tool("systemd-sysusers");
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("etc")).unwrap();
    let out = Command::new(sysusers)
        .arg(format!("--root={}", root.path().display()))
        .arg("--dry-run")
        .arg(repo().join("systemd/mcp-broker.sysusers.conf"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let text = format!("{}{err}", String::from_utf8_lossy(&out.stdout));
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("Creating user 'mcp-broker'") && text.contains("Creating group 'mcp'"),
        "{text}"
    );
    assert!(!err.contains("ignoring"), "{text}");
}

#[test]
fn shipped_configs_pass_check() {
    for cfg in ["systemd/broker.toml", "daemonset/broker.toml"] {
        // The DaemonSet sets NODE_NAME (the CSI plugin's node_id) from
        // spec.nodeName.
        let out = Command::new(BIN)
            .args(["check", "--config"])
            .arg(repo().join(cfg))
            .env("NODE_NAME", "check-node")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{cfg}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("pool \"everything\": npx") && text.contains("pool \"time\": uvx"),
            "{cfg}: {text}"
        );
    }
}
