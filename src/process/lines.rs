//! Reading a server's output pipes line by line: stdout into frames for
//! the router (plain responses from their bytes, [`jsonrpc::raw`]; the rest
//! parsed), stderr into the log (bounded lines, never the whole pipe).

use super::Process;
use crate::framing::{sniff_id, Frame, LineSplitter};
use crate::jsonrpc::{self, codes};
use serde_json::Value;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::sync::CancellationToken;

/// Longest stderr line kept for the log.
pub(super) const STDERR_LINE_MAX: usize = 8 * 1024;

/// Reads `r` to EOF, calling `f` for every frame.
pub async fn read_lines(mut r: impl AsyncRead + Unpin, max: usize, mut f: impl FnMut(Frame)) {
    let mut splitter = LineSplitter::new(max);
    let mut buf = vec![0u8; 64 * 1024];
    let mut frames = Vec::new();
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                splitter.push(&buf[..n], &mut frames);
                for frame in frames.drain(..) {
                    f(frame);
                }
            }
        }
    }
}

pub(super) async fn log_stderr(pool: String, pid: u32, stderr: impl AsyncRead + Unpin) {
    read_lines(stderr, STDERR_LINE_MAX, |frame| match frame {
        Frame::Line(line) => {
            tracing::info!(target: "mcp_broker::server_stderr", pool = %pool, pid, "{}", String::from_utf8_lossy(&line));
        }
        Frame::Oversized { len, .. } => {
            tracing::info!(target: "mcp_broker::server_stderr", pool = %pool, pid, "<{len}-byte stderr line omitted>");
        }
    })
    .await;
}

/// Routes every message a process writes on stdout until EOF, then
/// cancels `done`.
pub(super) async fn read_stdout(
    worker: Arc<Process>,
    stdout: impl AsyncRead + Unpin,
    done: CancellationToken,
) {
    read_lines(stdout, worker.max_message_size, |frame| match frame {
        Frame::Line(line) => {
            if line.iter().all(u8::is_ascii_whitespace) {
                return;
            }
            // Most lines are plain responses: routed from their bytes.
            if let Some(head) = jsonrpc::raw::response_head(&line) {
                let action = worker.router.lock().expect("lock").route_response(&head, &line);
                worker.perform(action);
                return;
            }
            match serde_json::from_slice::<Value>(&line) {
                Ok(msg) => {
                    let action = worker.router.lock().expect("lock").route(msg);
                    worker.perform(action);
                }
                Err(_) => {
                    worker
                        .metrics
                        .skipped_lines
                        .with_label_values(&[&worker.pool, "not_json"])
                        .inc();
                    let shown = String::from_utf8_lossy(&line[..line.len().min(200)]).into_owned();
                    tracing::debug!(pool = %worker.pool, pid = worker.pid, line = %shown, "skipped non-JSON stdout line");
                }
            }
        }
        Frame::Oversized { len, head, tail } => {
            worker
                .metrics
                .skipped_lines
                .with_label_values(&[&worker.pool, "oversized"])
                .inc();
            tracing::warn!(pool = %worker.pool, pid = worker.pid, len, "stdout message over the size limit");
            let id = sniff_id(&head).or_else(|| sniff_id(&tail)).and_then(|v| v.as_u64());
            if let Some(id) = id {
                let msg = format!(
                    "the server's response was {len} bytes, over the broker's {}-byte message limit",
                    worker.max_message_size
                );
                let action = worker
                    .router
                    .lock()
                    .expect("lock")
                    .fail_one(id, codes::MESSAGE_TOO_LARGE, &msg);
                worker.perform(action);
            }
        }
    })
    .await;
    done.cancel();
}
