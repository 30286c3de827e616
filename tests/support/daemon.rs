//! `mcp-broker serve` as a child process for the upgrade and signal tests:
//! a config with a fixture pool (and optionally server-everything), the
//! broker's log in a file to wait on, its children and open fds from
//! /proc, and a steady load of lease API sessions that records every
//! answer's process and every failure.
#![allow(dead_code)]

use super::harness::{poll_blocking, TAG_VAR};
use mcp_broker::metrics::Metrics;
use mcp_broker::proxy::backend::{new_lease_id, Backend};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub const BIN: &str = env!("CARGO_BIN_EXE_mcp-broker");
pub const FIXTURE: &str = env!("CARGO_BIN_EXE_mcp-fixture");

/// server-everything's entry point under target/interop (installed by
/// scripts/install-test-deps.sh; its absence fails the test).
pub fn everything_js() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(
        "target/interop/node/node_modules/@modelcontextprotocol/server-everything/dist/index.js",
    );
    assert!(
        p.exists(),
        "{} is missing: run scripts/install-test-deps.sh",
        p.display()
    );
    p
}

/// Writes a broker config in `dir`: pool `fx` (the fixture, `fx` processes
/// exactly) and, when `everything` > 0, pool `everything` (server-everything
/// through node, that many processes). Pools never grow (`max = min_idle`),
/// so any process beyond their size would be a spawn.
pub fn config(dir: &Path, tag: &str, fx: usize, everything: usize, drain: &str) -> PathBuf {
    let sock = dir.join("broker.sock");
    let mut text = format!(
        "[broker]\nsocket = \"{}\"\ndrain_timeout = \"{drain}\"\n\
         [[pool]]\nname = \"fx\"\ncommand = \"{FIXTURE}\"\nmin_idle = {fx}\nmax = {fx}\n\
         stop_grace = \"500ms\"\nenv = {{ {TAG_VAR} = \"{tag}\" }}\n",
        sock.display()
    );
    if everything > 0 {
        text += &format!(
            "[[pool]]\nname = \"everything\"\ncommand = \"node\"\nargs = [\"{}\", \"stdio\"]\n\
             min_idle = {everything}\nmax = {everything}\ninit_timeout = \"60s\"\n\
             stop_grace = \"2s\"\nenv = {{ {TAG_VAR} = \"{tag}\" }}\n",
            everything_js().display()
        );
    }
    let p = dir.join("broker.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// A `mcp-broker serve` child whose stderr goes to a log file.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `serve --config cfg`, logging to `dir/<name>.log`.
    pub fn start(cfg: &Path, dir: &Path, name: &str) -> Daemon {
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(cfg)
            .env("MCP_BROKER_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Daemon { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log so far.
    pub fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How often `needle` occurs in the log.
    pub fn count(&self, needle: &str) -> usize {
        self.text().matches(needle).count()
    }

    /// Waits (up to `limit`) until `needle` occurs `n` times in the log.
    pub fn wait_log(&self, needle: &str, n: usize, limit: Duration) {
        assert!(
            poll_blocking(limit, || self.count(needle) >= n),
            "{needle:?} did not appear {n} times within {limit:?}; log:\n{}",
            self.text()
        );
    }

    /// Sends `sig`.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), sig);
    }

    /// Waits (up to `limit`) for the exit; None if it did not exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let mut status = None;
        poll_blocking(limit, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        status
    }

    /// Direct children (the pools' process leaders).
    pub fn children(&self) -> BTreeSet<u32> {
        children_of(self.pid())
    }

    /// Open fds.
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Live (non-zombie) children of `pid`.
pub fn children_of(pid: u32) -> BTreeSet<u32> {
    use mcp_broker::process::stat;
    stat::pids()
        .filter(|p| stat::read(*p).is_some_and(|s| s.ppid == pid && s.live()))
        .collect()
}

/// What one load session saw.
#[derive(Default, Debug)]
pub struct Seen {
    pub ok: usize,
    pub failed: Vec<String>,
    /// Fixture processes that answered.
    pub pids: BTreeSet<u32>,
    /// How long each call but a session's first took, for `cargo bench
    /// --bench upgrade` (tests never judge time).
    pub latencies: Vec<Duration>,
}

/// One call through a lease: the final message's result, or why not.
pub async fn call(c: &Backend, msg: &Value) -> Result<Value, String> {
    let mut l = c
        .lease(msg, None, &new_lease_id())
        .await
        .map_err(|e| format!("lease: {e}"))?;
    if l.status != 200 {
        let mut body = Vec::new();
        while let Some(m) = l.lines.next().await {
            body.push(m.map(|v| v.to_string()).unwrap_or_else(|e| e));
        }
        return Err(format!("status {}: {body:?}", l.status));
    }
    let mut last = None;
    while let Some(m) = l.lines.next().await {
        last = Some(m.map_err(|e| format!("line: {e}"))?);
    }
    let last = last.ok_or("no response")?;
    match last.get("result") {
        Some(r) if r.get("isError") != Some(&json!(true)) => Ok(r.clone()),
        _ => Err(format!("not a result: {last}")),
    }
}

/// Steady load: `n` sessions on `socket`, each with its own connections,
/// calling in a loop until stopped: fixture `whoami` and a 50 ms `sleep`
/// (so leases are always in flight), and server-everything's `echo` when
/// `everything` is set.
pub struct Load {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<Seen>>,
}

impl Load {
    pub fn start(socket: &Path, n: usize, everything: bool) -> Load {
        let stop = CancellationToken::new();
        let tasks = (0..n)
            .map(|i| {
                let (socket, stop) = (socket.to_path_buf(), stop.clone());
                tokio::spawn(async move {
                    let client = |pool: &str| {
                        Backend::new(
                            socket.clone(),
                            pool.into(),
                            1 << 20,
                            Arc::new(Metrics::new()),
                        )
                    };
                    let (fx, ev) = (client("fx"), client("everything"));
                    let mut seen = Seen::default();
                    let mut k = 0u64;
                    while !stop.is_cancelled() {
                        k += 1;
                        let started = std::time::Instant::now();
                        let r = match (k + i as u64) % 4 {
                            0 => call(
                                &fx,
                                &json!({"jsonrpc":"2.0","id":k,"method":"tools/call",
                                "params":{"name":"sleep","arguments":{"ms":50}}}),
                            )
                            .await
                            .map(|_| ()),
                            1 if everything => call(
                                &ev,
                                &json!({"jsonrpc":"2.0","id":k,"method":"tools/call",
                                "params":{"name":"echo","arguments":{"message":"hi"}}}),
                            )
                            .await
                            .map(|_| ()),
                            _ => call(
                                &fx,
                                &json!({"jsonrpc":"2.0","id":k,"method":"tools/call",
                                "params":{"name":"whoami","arguments":{}}}),
                            )
                            .await
                            .map(|r| {
                                let t = r["content"][0]["text"].as_str().unwrap_or("").to_string();
                                seen.pids.insert(super::harness::pid_of(&t));
                            }),
                        };
                        // A session's first call also sets up its connections.
                        if k > 1 {
                            seen.latencies.push(started.elapsed());
                        }
                        match r {
                            Ok(()) => seen.ok += 1,
                            Err(e) => seen.failed.push(e),
                        }
                    }
                    seen
                })
            })
            .collect();
        Load { stop, tasks }
    }

    /// Stops the sessions (each finishes its call) and merges what they saw.
    pub async fn finish(self) -> Seen {
        self.stop.cancel();
        let mut all = Seen::default();
        for t in self.tasks {
            let s = tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .expect("load session ended")
                .unwrap();
            all.ok += s.ok;
            all.failed.extend(s.failed);
            all.pids.extend(s.pids);
            all.latencies.extend(s.latencies);
        }
        all
    }
}

/// The answering processes so far is not known until [`Load::finish`];
/// this waits until `n` more calls succeeded overall, by watching a
/// fresh session (proof the broker serves).
pub async fn served(socket: &Path) -> u32 {
    let c = Backend::new(
        socket.to_path_buf(),
        "fx".into(),
        1 << 20,
        Arc::new(Metrics::new()),
    );
    let r = call(
        &c,
        &json!({"jsonrpc":"2.0","id":1,"method":"tools/call",
        "params":{"name":"whoami","arguments":{}}}),
    )
    .await
    .expect("the broker serves");
    super::harness::pid_of(r["content"][0]["text"].as_str().unwrap())
}
