//! One stdio server process spoken to directly: newline JSON-RPC on its
//! stdin/stdout, requests pipelined (the bench's "direct" limit and the
//! spawn-per-request scenario).
//!
//! A writer task batches queued lines before flushing; a reader task routes
//! each response to its waiter by id. Every wait is bounded by the timeout,
//! and the process runs in its own group, killed whole at [`StdioServer::stop`].

use super::client::{check, Outcome, PROTOCOL_VERSION};
use crate::process::group::Group;
use bytes::Bytes;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

/// One stdio server process spoken to directly, requests pipelined.
pub struct StdioServer {
    child: tokio::sync::Mutex<tokio::process::Child>,
    group: Group,
    /// The process id.
    pub pid: u32,
    tx: mpsc::Sender<Bytes>,
    pending: Pending,
    timeout: Duration,
}

impl StdioServer {
    /// Spawns `cmd` (in its own process group) and runs the handshake.
    pub async fn start(cmd: &[String], timeout: Duration) -> anyhow::Result<Self> {
        let (prog, args) = cmd
            .split_first()
            .ok_or_else(|| anyhow::anyhow!("empty server command"))?;
        let mut child = tokio::process::Command::new(prog)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start {prog}: {e}"))?;
        let pid = child.id().unwrap_or(0);
        let group = Group::leader(&child);
        let (stdin, stdout) = match (child.stdin.take(), child.stdout.take()) {
            (Some(i), Some(o)) => (i, o),
            _ => anyhow::bail!("no pipes to {prog}"),
        };
        let (tx, mut rx) = mpsc::channel::<Bytes>(1024);
        tokio::spawn(async move {
            let mut w = tokio::io::BufWriter::new(stdin);
            while let Some(line) = rx.recv().await {
                if w.write_all(&line).await.is_err() {
                    return;
                }
                // Flush only when nothing else is queued: pipelined writes batch.
                if rx.is_empty() && w.flush().await.is_err() {
                    return;
                }
            }
        });
        let pending: Pending = Arc::default();
        let p = pending.clone();
        tokio::spawn(async move {
            let mut r = tokio::io::BufReader::with_capacity(256 * 1024, stdout);
            let mut line = Vec::new();
            loop {
                line.clear();
                match r.read_until(b'\n', &mut line).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let Ok(v) = serde_json::from_slice::<Value>(&line) else {
                    continue;
                };
                let is_response = v.get("result").is_some() || v.get("error").is_some();
                let Some(id) = v.get("id").and_then(Value::as_u64).filter(|_| is_response) else {
                    continue;
                };
                let waiter = p.lock().ok().and_then(|mut m| m.remove(&id));
                if let Some(w) = waiter {
                    let _ = w.send(v);
                }
            }
            // The process is gone: fail everyone still waiting.
            if let Ok(mut m) = p.lock() {
                m.clear();
            }
        });
        let s = Self {
            child: tokio::sync::Mutex::new(child),
            group,
            pid,
            tx,
            pending,
            timeout,
        };
        let init = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{
            "protocolVersion": PROTOCOL_VERSION, "capabilities": {},
            "clientInfo": {"name":"mcp-broker-bench","version":env!("CARGO_PKG_VERSION")}}});
        let answer = s.request(0, Bytes::from(init.to_string())).await;
        match answer {
            Ok(v) if v.get("result").is_some() => {}
            Ok(v) => anyhow::bail!("{prog}: initialize failed: {v}"),
            Err(o) => anyhow::bail!("{prog}: initialize failed: {o:?}"),
        }
        let note = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
        s.send(Bytes::from_static(note.as_bytes())).await;
        Ok(s)
    }

    async fn send(&self, body: Bytes) -> bool {
        let mut line = Vec::with_capacity(body.len() + 1);
        line.extend_from_slice(&body);
        line.push(b'\n');
        self.tx.send(Bytes::from(line)).await.is_ok()
    }

    /// Sends request `id` and waits for its answer.
    pub async fn request(&self, id: u64, body: Bytes) -> Result<Value, Outcome> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut m) = self.pending.lock() {
            m.insert(id, tx);
        }
        if !self.send(body).await {
            return Err(Outcome::Transport);
        }
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(Outcome::Transport),
            Err(_) => {
                if let Ok(mut m) = self.pending.lock() {
                    m.remove(&id);
                }
                Err(Outcome::Timeout)
            }
        }
    }

    /// One checked call.
    pub async fn call(&self, id: u64, body: Bytes, token: Option<&str>) -> Outcome {
        match self.request(id, body).await {
            Ok(v) => check(&v, id, token),
            Err(o) => o,
        }
    }

    /// Kills the process group and reaps the process (bounded); the group
    /// is killed before the reap, and never after it.
    pub async fn stop(&self) {
        let mut c = self.child.lock().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.group.reap(&mut c)).await;
    }
}
