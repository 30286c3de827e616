//! The `mcp-broker` binary as a user runs it: `check`, `serve` with SIGTERM,
//! and flag errors.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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
    let c = config(
        dir.path(),
        &format!(
            "[broker]\nsocket = \"{}\"\nmetrics_listen = \"127.0.0.1:0\"\ndrain_timeout = \"2s\"\n[[pool]]\nname = \"fx\"\ncommand = \"{FIXTURE}\"\nmin_idle = 2\n",
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
    let start = Instant::now();
    while !sock.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "socket never appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A second broker on the same socket refuses to start.
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&c)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8(out.stderr)
        .unwrap()
        .contains("already listening"));
    std::thread::sleep(Duration::from_millis(500));
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "broker did not exit on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
    assert!(!sock.exists(), "socket removed");
}
