//! A lease's answer body read as NDJSON: one JSON-RPC message per line,
//! each bounded, with a way to look at the next line as it came (for the
//! answers relayed unparsed) before deciding to parse it.

use super::link::ApiBody;
use crate::framing::{Frame, LineSplitter};
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::Value;
use std::collections::VecDeque;
use std::time::Duration;

/// NDJSON messages from a lease body, bounded per line.
pub struct Lines {
    body: ApiBody,
    splitter: LineSplitter,
    ready: VecDeque<Frame>,
    /// Frames split from the last chunk (kept to reuse its allocation).
    split: Vec<Frame>,
    /// The stream broke; reported once the lines before it are read.
    broken: Option<String>,
    done: bool,
}

impl Lines {
    /// Lines of `body`, none longer than `max`.
    pub(super) fn new(body: ApiBody, max: usize) -> Self {
        Lines {
            body,
            splitter: LineSplitter::new(max),
            ready: VecDeque::new(),
            split: Vec::new(),
            broken: None,
            done: false,
        }
    }

    /// The next message; `None` at the end of the stream. Lines that are not
    /// JSON or are oversized come back as `Err` with a description.
    pub async fn next(&mut self) -> Option<Result<Value, String>> {
        loop {
            if let Some(f) = self.ready.pop_front() {
                return Some(match f {
                    Frame::Line(l) => {
                        serde_json::from_slice(&l).map_err(|e| format!("bad line from broker: {e}"))
                    }
                    Frame::Oversized { len, .. } => Err(format!(
                        "{len}-byte message from the broker is over the limit"
                    )),
                });
            }
            if let Some(e) = self.broken.take() {
                return Some(Err(e));
            }
            if self.done {
                return None;
            }
            self.fill().await;
        }
    }

    /// The next line as it came, left in place ([`Lines::next`] still
    /// returns it); `None` when the next thing is not a line.
    pub async fn peek(&mut self) -> Option<&Bytes> {
        while self.ready.is_empty() && self.broken.is_none() && !self.done {
            self.fill().await;
        }
        match self.ready.front() {
            Some(Frame::Line(l)) => Some(l),
            _ => None,
        }
    }

    /// Drops the line [`Lines::peek`] returned.
    pub fn skip(&mut self) {
        self.ready.pop_front();
    }

    /// Reads one chunk of the body into lines.
    async fn fill(&mut self) {
        match self.body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    self.splitter.push(&data, &mut self.split);
                }
            }
            Some(Err(e)) => {
                self.done = true;
                self.broken = Some(format!("the lease stream broke: {e}"));
            }
            None => {
                self.done = true;
                self.splitter.finish(&mut self.split);
            }
        }
        self.ready.extend(self.split.drain(..));
    }
}

impl Lines {
    /// Reads the stream to its end in the background (bounded), so the
    /// pooled connection to the broker can be reused: hyper closes a
    /// connection whose response body was dropped unread, and reconnecting
    /// costs every next lease a connect and accept.
    pub fn drain_in_background(mut self) {
        // A lease answered with a length (the common case) is complete once
        // its bytes arrived: nothing left to read.
        if self.done || http_body::Body::is_end_stream(&self.body) {
            return;
        }
        tokio::spawn(async move {
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
                while let Some(Ok(_)) = self.body.frame().await {}
            })
            .await;
        });
    }
}

/// Longest wait for a finished lease's stream to end.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
