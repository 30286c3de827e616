//! Reading a server's output pipes line by line: stdout into frames for
//! the router, stderr into the log (bounded lines, never the whole pipe).

use crate::framing::{Frame, LineSplitter};
use tokio::io::{AsyncRead, AsyncReadExt};

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
