//! Newline-delimited message framing with a hard size limit.
//!
//! stdio MCP servers write one JSON-RPC message per line; the lease API
//! streams the same way. [`LineSplitter`] turns arbitrary byte chunks into
//! lines without ever buffering more than `max` bytes: a longer line is
//! discarded as it streams past and reported as [`Frame::Oversized`], keeping
//! only a short head and tail so the caller can still find the message's `id`
//! (servers put it first or last) and fail the right request.

use bytes::{Buf, Bytes, BytesMut};

/// Bytes kept from the start and end of an oversized line.
const KEEP: usize = 256;

/// One unit produced by [`LineSplitter`].
#[derive(Debug, PartialEq)]
pub enum Frame {
    /// A complete line, without its `\n` (and without a trailing `\r`).
    Line(Bytes),
    /// A line longer than the limit; it was discarded.
    Oversized {
        /// Total length of the discarded line.
        len: usize,
        /// The first bytes of the line.
        head: Bytes,
        /// The last bytes of the line.
        tail: Bytes,
    },
}

/// Splits a byte stream into lines of at most `max` bytes.
#[derive(Debug)]
pub struct LineSplitter {
    buf: BytesMut,
    max: usize,
    /// Set while discarding an oversized line: (length so far, head, tail).
    discarding: Option<(usize, Bytes, Vec<u8>)>,
}

impl LineSplitter {
    /// A splitter that refuses lines longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            max,
            discarding: None,
        }
    }

    /// Feeds a chunk and appends every frame it completes to `out`.
    pub fn push(&mut self, mut chunk: &[u8], out: &mut Vec<Frame>) {
        while !chunk.is_empty() {
            let nl = chunk.iter().position(|&b| b == b'\n');
            let (part, rest, complete) = match nl {
                Some(i) => (&chunk[..i], &chunk[i + 1..], true),
                None => (chunk, &chunk[chunk.len()..], false),
            };
            chunk = rest;
            if let Some((len, _, tail)) = self.discarding.as_mut() {
                *len += part.len();
                tail.extend_from_slice(part);
                if tail.len() > KEEP {
                    tail.drain(..tail.len() - KEEP);
                }
            } else if self.buf.len() + part.len() > self.max {
                let held = std::mem::take(&mut self.buf);
                let mut head = held[..held.len().min(KEEP)].to_vec();
                let room = KEEP - head.len();
                head.extend_from_slice(&part[..part.len().min(room)]);
                let mut tail = Vec::with_capacity(KEEP);
                if part.len() < KEEP {
                    tail.extend_from_slice(&held[held.len().saturating_sub(KEEP - part.len())..]);
                }
                tail.extend_from_slice(&part[part.len().saturating_sub(KEEP)..]);
                self.discarding = Some((held.len() + part.len(), Bytes::from(head), tail));
            } else {
                self.buf.extend_from_slice(part);
            }
            if complete {
                if let Some((len, head, tail)) = self.discarding.take() {
                    out.push(Frame::Oversized {
                        len,
                        head,
                        tail: Bytes::from(tail),
                    });
                } else {
                    let mut line = self.buf.split().freeze();
                    if line.last() == Some(&b'\r') {
                        line.truncate(line.len() - 1);
                    }
                    out.push(Frame::Line(line));
                }
            }
        }
    }

    /// Ends the stream: an unterminated last line becomes a frame.
    pub fn finish(&mut self, out: &mut Vec<Frame>) {
        if self.discarding.is_some() || !self.buf.is_empty() {
            self.push(b"\n", out);
        }
    }

    /// Bytes of an unfinished line currently held.
    pub fn pending(&self) -> usize {
        self.buf.remaining()
    }
}

/// Finds a numeric or string `"id"` member in a fragment of JSON text.
///
/// Used only on the head and tail of an oversized line, where a full parse is
/// impossible. Returns the id as JSON text (`7` or `"abc"`).
pub fn sniff_id(fragment: &[u8]) -> Option<serde_json::Value> {
    let text = String::from_utf8_lossy(fragment);
    let mut from = 0;
    while let Some(pos) = text[from..].find("\"id\"") {
        let after = &text[from + pos + 4..];
        let after = after.trim_start();
        if let Some(rest) = after.strip_prefix(':') {
            let rest = rest.trim_start();
            if let Some(s) = rest.strip_prefix('"') {
                if let Some(end) = s.find('"') {
                    return Some(serde_json::Value::String(s[..end].to_string()));
                }
            } else {
                let digits: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_digit() || *c == '-')
                    .collect();
                if let Ok(n) = digits.parse::<i64>() {
                    return Some(serde_json::Value::from(n));
                }
            }
        }
        from += pos + 4;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(max: usize, chunks: &[&[u8]]) -> Vec<Frame> {
        let mut s = LineSplitter::new(max);
        let mut out = Vec::new();
        for c in chunks {
            s.push(c, &mut out);
        }
        out
    }

    #[test]
    fn splits_across_chunks() {
        let out = run(100, &[b"ab", b"c\nde", b"f\r\n", b"\n"]);
        assert_eq!(
            out,
            vec![
                Frame::Line(Bytes::from_static(b"abc")),
                Frame::Line(Bytes::from_static(b"def")),
                Frame::Line(Bytes::new()),
            ]
        );
    }

    #[test]
    fn discards_oversized_and_recovers() {
        let big = vec![b'x'; 1000];
        let out = run(10, &[b"{\"id\":5,", &big, b"}\nok\n"]);
        match &out[0] {
            Frame::Oversized { len, head, tail } => {
                assert_eq!(*len, 8 + 1000 + 1);
                assert!(head.starts_with(b"{\"id\":5"));
                assert!(tail.ends_with(b"x}"));
                assert_eq!(sniff_id(head), Some(serde_json::json!(5)));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(out[1], Frame::Line(Bytes::from_static(b"ok")));
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn exact_limit_is_allowed() {
        let out = run(3, &[b"abc\nabcd\n"]);
        assert_eq!(out[0], Frame::Line(Bytes::from_static(b"abc")));
        assert!(matches!(out[1], Frame::Oversized { len: 4, .. }));
    }

    #[test]
    fn sniffs_ids() {
        assert_eq!(
            sniff_id(b"\"result\":{},\"id\": 42}"),
            Some(serde_json::json!(42))
        );
        assert_eq!(
            sniff_id(b"{\"id\":\"r-1\",\"x"),
            Some(serde_json::json!("r-1"))
        );
        assert_eq!(sniff_id(b"{\"ids\":1}"), None);
        assert_eq!(sniff_id(b"no id here"), None);
    }
}
