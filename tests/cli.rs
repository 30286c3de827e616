//! The `mcp-broker` binary as a user runs it: `check`, `serve` with SIGTERM,
//! and flag errors.

#[path = "support/harness.rs"]
mod harness;

use harness::{poll_blocking, procs_with_tag, TAG_VAR};
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

#[test]
fn serve_runs_until_sigterm_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("b.sock");
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let c = config(
        dir.path(),
        &format!(
            "[broker]\nsocket = \"{}\"\nmetrics_listen = \"127.0.0.1:0\"\ndrain_timeout = \"2s\"\n[[pool]]\nname = \"fx\"\ncommand = \"{FIXTURE}\"\nmin_idle = 2\nenv = {{ {TAG_VAR} = \"{tag}\" }}\n",
            sock.display()
        ),
    );
    let mut child = Command::new(BIN)
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
