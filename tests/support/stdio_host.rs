//! The host side of `mcp-broker connect`: the real binary as a child with
//! piped stdin/stdout, speaking JSON-RPC lines, as an MCP host spawns it.
#![allow(dead_code)]

use crate::harness::TestBroker;
use serde_json::{json, Value};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

/// Longest wait for any one message from the shim.
pub const WAIT: Duration = Duration::from_secs(15);

/// The host's end of a running shim.
pub struct Host {
    pub child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::UnboundedReceiver<Value>,
}

impl Host {
    /// `mcp-broker connect --pool POOL --socket B EXTRA...`.
    pub async fn spawn(b: &TestBroker, pool: &str, extra: &[&str]) -> Host {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mcp-broker"));
        cmd.args(["connect", "--pool", pool, "--socket"])
            .arg(&b.socket)
            .args(extra);
        Self::spawn_cmd(cmd)
    }

    /// Runs `cmd` (an `mcp-broker connect` command line) as a host would.
    pub fn spawn_cmd(mut cmd: Command) -> Host {
        let mut child = cmd
            .env("MCP_BROKER_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("mcp-broker connect starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut r = BufReader::new(stdout).lines();
            while let Ok(Some(l)) = r.next_line().await {
                let v: Value = serde_json::from_str(&l)
                    .unwrap_or_else(|e| panic!("shim wrote a non-JSON line {l:?}: {e}"));
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        Host {
            stdin: child.stdin.take(),
            child,
            lines: rx,
        }
    }

    pub async fn send(&mut self, msg: &Value) {
        self.send_raw(&serde_json::to_vec(msg).unwrap()).await;
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        let w = self.stdin.as_mut().expect("stdin open");
        w.write_all(bytes).await.unwrap();
        w.write_all(b"\n").await.unwrap();
        w.flush().await.unwrap();
    }

    /// The next message the shim writes.
    pub async fn next(&mut self) -> Value {
        tokio::time::timeout(WAIT, self.lines.recv())
            .await
            .expect("a message from the shim in time")
            .expect("the shim's stdout is open")
    }

    /// Sends `msg` and returns the response to it, after the messages that
    /// came before it.
    pub async fn call(&mut self, msg: &Value) -> (Vec<Value>, Value) {
        self.send(msg).await;
        let mut before = Vec::new();
        loop {
            let m = self.next().await;
            if m.get("id") == msg.get("id") && m.get("method").is_none() {
                return (before, m);
            }
            before.push(m);
        }
    }

    pub async fn initialize(&mut self, capabilities: Value) -> Value {
        let (_, r) = self
            .call(
                &json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{
                "protocolVersion":"2025-06-18","capabilities":capabilities,
                "clientInfo":{"name":"shim-test","version":"0"}}}),
            )
            .await;
        self.send(&json!({"jsonrpc":"2.0","method":"notifications/initialized"}))
            .await;
        r
    }

    /// Closes stdin and waits (bounded) for the shim to exit.
    pub async fn close(mut self, limit: Duration) -> std::process::ExitStatus {
        drop(self.stdin.take());
        tokio::time::timeout(limit, self.child.wait())
            .await
            .expect("the shim exits in time")
            .unwrap()
    }
}
