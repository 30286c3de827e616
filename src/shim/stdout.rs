//! The shim's stdout: one writer task behind a bounded channel, so lines
//! from concurrent requests never interleave and a host that stops reading
//! slows the shim down instead of growing its memory.

use serde_json::Value;
use std::time::Duration;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// Messages buffered towards stdout.
pub(super) const OUT_BUFFER: usize = 64;
/// Longest wait for room in the stdout channel before a message is dropped
/// (the host stopped reading).
const OUT_WAIT: Duration = Duration::from_secs(30);
/// Bytes gathered into one write at most.
const BATCH: usize = 1 << 20;

/// The shim's handle on stdout: one writer task behind a bounded channel.
#[derive(Clone)]
pub(super) struct Out(pub(super) mpsc::Sender<Value>);

impl Out {
    /// Queues one message for stdout; dropped (and logged) if the host has
    /// not made room within [`OUT_WAIT`] or is gone.
    pub(super) async fn send(&self, msg: Value) {
        match self.0.send_timeout(msg, OUT_WAIT).await {
            Ok(()) => {}
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                tracing::warn!(
                    "the host has not read stdout for {OUT_WAIT:?}; a message was dropped"
                )
            }
            Err(mpsc::error::SendTimeoutError::Closed(_)) => {
                tracing::debug!("stdout is closed; a message was dropped")
            }
        }
    }
}

/// Writes queued messages, one per line, flushing when the queue is empty.
pub(super) async fn writer<W: AsyncWrite + Unpin>(mut w: W, mut rx: mpsc::Receiver<Value>) {
    let mut buf = Vec::new();
    while let Some(msg) = rx.recv().await {
        buf.clear();
        let mut next = Some(msg);
        while let Some(m) = next.take() {
            if serde_json::to_writer(&mut buf, &m).is_ok() {
                buf.push(b'\n');
            }
            if buf.len() < BATCH {
                next = rx.try_recv().ok();
            }
        }
        if w.write_all(&buf).await.is_err() || w.flush().await.is_err() {
            tracing::debug!("stdout closed: the host went away");
            return;
        }
    }
}
