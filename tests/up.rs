//! `mcp-broker up` exposes what a config file can: the protocol era, the
//! server's environment and working directory, and the warm-up timeouts,
//! validated by the same code with the same messages as `[[pool]]` tables.

#[path = "support/harness.rs"]
mod harness;

use harness::*;
use serde_json::json;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_mcp-broker");
const FIXTURE: &str = env!("CARGO_BIN_EXE_mcp-fixture");

fn up_error(flags: &[&str]) -> String {
    let out = Command::new(BIN)
        .arg("up")
        .args(flags)
        .args(["--", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "up {flags:?} was accepted");
    String::from_utf8(out.stderr).unwrap()
}

fn check_error(pool_lines: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("b.toml");
    let text = format!("[[pool]]\nname = \"default\"\ncommand = \"x\"\n{pool_lines}\n");
    std::fs::File::create(&p)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{pool_lines} was accepted");
    String::from_utf8(out.stderr).unwrap()
}

/// The message after the common `pool "default": ` prefix.
fn message(stderr: &str) -> String {
    let at = stderr.find("`").expect("names a field");
    stderr[at..].trim().to_string()
}

#[test]
fn flags_pass_the_config_files_checks_with_its_messages() {
    for (flags, file) in [
        (&["--init-timeout", "0s"][..], "init_timeout = \"0s\""),
        (&["--probe-timeout", "2m"][..], "probe_timeout = \"2m\""),
        (
            &["--min-idle", "5", "--max", "2"][..],
            "min_idle = 5\nmax = 2",
        ),
        (&["--env", "=x"][..], "env = { \"\" = \"x\" }"),
    ] {
        let (up, check) = (up_error(flags), check_error(file));
        assert!(up.contains("pool \"default\""), "{up}");
        assert_eq!(message(&up), message(&check), "{flags:?}");
    }
}

#[test]
fn bad_spellings_name_what_is_accepted() {
    let up = up_error(&["--protocol", "modern"]);
    let file = check_error("protocol = \"modern\"");
    for e in [&up, &file] {
        assert!(
            e.contains("modern") && e.contains("auto") && e.contains("stateless"),
            "{e}"
        );
    }
    let up = up_error(&["--init-timeout", "soon"]);
    let file = check_error("init_timeout = \"soon\"");
    for e in [&up, &file] {
        assert!(e.contains("soon") && e.contains("duration"), "{e}");
    }
    assert!(up_error(&["--env", "NOVALUE"]).contains("KEY=VALUE"));
}

#[tokio::test]
async fn env_cwd_and_protocol_reach_the_server() {
    // `marker` exists only in the chosen directory: the server starts only
    // if it runs there.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("marker"), b"").unwrap();
    let script = format!("test -f marker && exec {FIXTURE} --era both");
    let up = Up::start(|c| {
        c.args(["--protocol", "legacy"])
            .args(["--env", "GREETING=hello=world", "--env", "OTHER=2"])
            .arg("--cwd")
            .arg(dir.path())
            .args(["--init-timeout", "20s", "--", "sh", "-c", &script]);
    })
    .await;
    let base = up.base.clone();
    let url = format!("{base}/mcp");
    let session = initialize(&url, "2025-06-18", json!({})).await;
    let call = tool(1, "env", json!({"name": "GREETING"}));
    let r = send(
        "POST",
        &url,
        &[JSON_SSE, CT_JSON, ("mcp-session-id", &session)],
        &call.to_string(),
    )
    .await;
    assert_eq!(text_of(&r.json()), "hello=world", "{}", r.body);
    // --protocol legacy: the fixture speaks both eras, and was warmed with
    // initialize, not server/discover.
    let metrics = send("GET", &format!("{base}/metrics"), &[], "").await.body;
    assert!(
        metrics.contains(r#"mcp_broker_pool_era{era="legacy",pool="default"} 1"#),
        "{metrics}"
    );
    up.stop();
}

/// `mcp-broker up` on a free loopback port, ready (every pool warm).
struct Up {
    child: std::process::Child,
    base: String,
}

impl Up {
    /// Starts `up --listen …` with the arguments `args` adds.
    async fn start(args: impl FnOnce(&mut Command)) -> Up {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let listen = format!("127.0.0.1:{port}");
        let mut cmd = Command::new(BIN);
        cmd.args(["up", "--listen", &listen]);
        args(&mut cmd);
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let base = format!("http://{listen}");
        wait_for_ready(&base).await;
        Up { child, base }
    }

    /// SIGTERM, then asserts a clean exit.
    fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        assert!(self.child.wait().unwrap().success());
    }
}

/// Polls `/readyz` (the pool has a warm process) for up to 20 s.
async fn wait_for_ready(base: &str) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let start = std::time::Instant::now();
    loop {
        let uri: http::Uri = format!("{base}/readyz").parse().unwrap();
        if let Ok(r) = client.get(uri).await {
            if r.status() == 200 {
                return;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "up never became ready"
        );
        // The poll interval of this bounded wait.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn up_with_a_config_serves_every_pool_at_its_own_path() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("up.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[pool]]\nname = \"a\"\ncommand = \"{FIXTURE}\"\n\n[[pool]]\nname = \"b\"\ncommand = \"{FIXTURE}\"\nmode = \"sticky\"\n"
        ),
    )
    .unwrap();
    let up = Up::start(|c| {
        c.arg("--config").arg(&cfg);
    })
    .await;
    let base = up.base.clone();
    let list = send("GET", &format!("{base}/servers"), &[], "")
        .await
        .json();
    assert_eq!(
        list,
        json!([{"name": "a", "path": "/servers/a/mcp"}, {"name": "b", "path": "/servers/b/mcp"}])
    );
    let mut pids = Vec::new();
    for name in ["a", "b"] {
        let url = format!("{base}/servers/{name}/mcp");
        let session = initialize(&url, "2025-06-18", json!({})).await;
        let r = send(
            "POST",
            &url,
            &[JSON_SSE, CT_JSON, ("mcp-session-id", &session)],
            &tool(1, "whoami", json!({})).to_string(),
        )
        .await;
        pids.push(
            text_of(&r.json())
                .split_whitespace()
                .next()
                .unwrap()
                .to_string(),
        );
    }
    assert_ne!(pids[0], pids[1], "each pool has processes of its own");
    // Two pools: no default endpoint, and unknown pools are not found.
    let init = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{
        "protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}});
    for path in ["/mcp", "/servers/zzz/mcp"] {
        let r = send(
            "POST",
            &format!("{base}{path}"),
            &[JSON_SSE, CT_JSON],
            &init.to_string(),
        )
        .await;
        assert_eq!(r.status, 404, "{path}");
    }
    up.stop();
}
