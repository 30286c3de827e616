//! `relay`: the floor any stdio gateway pays on this machine, measured
//! with the same load generator and server as the other scenarios.
//!
//! The `ceiling`'s bare HTTP endpoint sits in front of one server process:
//! a `tools/call` body is written to the server's stdin as it came (one
//! `write`), and the next response line on its stdout is the HTTP answer,
//! one request at a time. There is no lease, queue, id rewriting, parse or
//! metric — only the TCP and pipe system calls of a pool of 1 and the
//! wake-ups they cause. `pool-1` minus `relay` is what the broker and proxy
//! themselves cost; a target below `relay` is below what this host allows.
//!
//! Invariants: one request is at the server at a time (so answers cannot
//! cross, whatever ids the sessions use); every wait is bounded; the server
//! runs in its own process group, killed whole at [`Relay::stop`].

use super::client::PROTOCOL_VERSION;
use super::targets::{serve_http, trivial_answer, Trivial};
use crate::process::group::Group;
use crate::web;
use ::http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use memchr::memmem::Finder;
use serde_json::{json, Value};
use std::process::Stdio;
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::runtime::{Handle, Runtime};
use tokio::sync::Mutex;

/// Longest line read from the server (a bench bound, not a product one).
const MAX_LINE: usize = 16 << 20;

/// The relay's only look into messages, each searcher built once (so the
/// floor carries no per-request set-up of its own).
struct Needles {
    result: Finder<'static>,
    error: Finder<'static>,
    method: Finder<'static>,
    call: Finder<'static>,
}

static NEEDLES: LazyLock<Needles> = LazyLock::new(|| Needles {
    result: Finder::new(b"\"result\""),
    error: Finder::new(b"\"error\""),
    method: Finder::new(b"\"method\""),
    call: Finder::new(b"\"tools/call\""),
});

/// The server's pipes, held by the one request in flight.
struct Pipes {
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    line: Vec<u8>,
}

impl Pipes {
    /// Writes `msg` as one line and returns the next response line (lines
    /// that are not responses, such as log notifications, are skipped).
    async fn exchange(&mut self, msg: &[u8], limit: Duration) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(msg.len() + 1);
        out.extend_from_slice(msg);
        out.push(b'\n');
        let io = async {
            self.stdin.write_all(&out).await.ok()?;
            loop {
                self.line.clear();
                let n = (&mut self.stdout)
                    .take(MAX_LINE as u64)
                    .read_until(b'\n', &mut self.line)
                    .await
                    .ok()?;
                if n == 0 || !self.line.ends_with(b"\n") {
                    return None;
                }
                let (n, l) = (&*NEEDLES, &self.line);
                let response = n.result.find(l).is_some() || n.error.find(l).is_some();
                if response && n.method.find(l).is_none() {
                    self.line.pop();
                    return Some(std::mem::take(&mut self.line));
                }
            }
        };
        tokio::time::timeout(limit, io).await.ok().flatten()
    }
}

/// The relay: its HTTP endpoint and its server process.
pub struct Relay {
    /// The endpoint; MCP at any path.
    pub http: Trivial,
    child: Child,
    group: Group,
    rt: Handle,
}

impl Relay {
    /// Starts `cmd`, initializes it, and serves the relay on `rt` (the
    /// server's pipes belong to `rt`, as a pool's do to the broker's).
    pub async fn start(rt: &Runtime, cmd: &[String], limit: Duration) -> anyhow::Result<Relay> {
        let handle = rt.handle().clone();
        let cmd = cmd.to_vec();
        rt.spawn(async move { Relay::start_here(handle, cmd, limit).await })
            .await
            .map_err(|e| anyhow::anyhow!("relay start: {e}"))?
    }

    async fn start_here(rt: Handle, cmd: Vec<String>, limit: Duration) -> anyhow::Result<Relay> {
        let (prog, args) = cmd
            .split_first()
            .ok_or_else(|| anyhow::anyhow!("empty server command"))?;
        let mut child = tokio::process::Command::new(prog)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start {prog}: {e}"))?;
        let group = Group::leader(&child);
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            anyhow::bail!("no pipes to {prog}");
        };
        let mut pipes = Pipes {
            stdin,
            stdout: BufReader::with_capacity(256 * 1024, stdout),
            line: Vec::new(),
        };
        let init = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{
            "protocolVersion": PROTOCOL_VERSION, "capabilities": {},
            "clientInfo": {"name":"mcp-broker-bench-relay","version":env!("CARGO_PKG_VERSION")}}});
        let Some(line) = pipes.exchange(init.to_string().as_bytes(), limit).await else {
            anyhow::bail!("{prog}: no answer to initialize within {limit:?}");
        };
        let v: Value = serde_json::from_slice(&line)?;
        anyhow::ensure!(v.get("result").is_some(), "{prog}: initialize failed: {v}");
        let note = b"{\"jsonrpc\":\"2.0\",\"method\":\"notifications/initialized\"}\n";
        pipes.stdin.write_all(note).await?;
        let pipes = Arc::new(Mutex::new(pipes));
        let http = serve_http(&rt, move |req: Request<Incoming>| {
            let pipes = pipes.clone();
            async move { answer(&pipes, req, limit).await }
        })?;
        Ok(Relay {
            http,
            child,
            group,
            rt,
        })
    }

    /// Stops the endpoint, then kills the server's group and reaps it (bounded).
    pub async fn stop(self) {
        let Relay {
            http,
            mut child,
            group,
            rt,
        } = self;
        http.stop().await;
        let reap = rt.spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), group.reap(&mut child)).await;
        });
        let _ = reap.await;
    }
}

/// A `tools/call` goes to the server; anything else is answered here, as
/// the `ceiling` answers it (the server was initialized once, at start).
async fn answer(
    pipes: &Mutex<Pipes>,
    req: Request<Incoming>,
    limit: Duration,
) -> http::Response<web::Body> {
    let post = req.method() == Method::POST;
    let Ok(body) = web::read_body(req.into_body(), 1 << 20).await else {
        return web::text(StatusCode::BAD_REQUEST, "unreadable body");
    };
    if post && NEEDLES.call.find(&body).is_some() {
        let line = pipes.lock().await.exchange(&body, limit).await;
        return match line {
            Some(l) => web::response(StatusCode::OK, "application/json", web::full(l)),
            None => web::text(StatusCode::BAD_GATEWAY, "the server did not answer"),
        };
    }
    let msg = serde_json::from_slice::<Value>(&body).ok();
    match (post, msg.as_ref().and_then(trivial_answer)) {
        (true, Some(a)) => web::json(StatusCode::OK, &a),
        _ => web::response(StatusCode::ACCEPTED, "text/plain", web::empty()),
    }
}
