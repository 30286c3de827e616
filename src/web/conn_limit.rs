//! Connection caps for every server the broker and the proxy run: a total
//! and a per-peer count of open connections.
//!
//! Why: each open connection costs a file descriptor and a task; without a
//! cap one peer opening idle connections exhausts the process's descriptors
//! and nobody else can connect. The per-peer cap keeps one peer from taking
//! the whole total. A connection over a cap is answered at once with a
//! complete HTTP response (`429` over the peer's cap, `503` over the total)
//! carrying a JSON-RPC error, then closed; it never reaches a handler.
//! Invariant: a [`ConnPermit`] is held for the connection's whole life and
//! gives its place back when dropped, so the counts are exact.
//!
//! The caps must fit the process's file descriptors, or the kernel refuses
//! connections before the caps do (and refuses everyone alike):
//! [`ConnLimiter::fitted`] raises the soft `RLIMIT_NOFILE` to the hard one
//! (as Go programs do at start) and lowers the caps to what fits.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Longest a refused connection is kept to deliver its answer.
const REFUSE_WITHIN: Duration = Duration::from_secs(1);
/// Request bytes read (and dropped) after a refusal, so closing the socket
/// does not reset it before the peer read the answer (TCP).
const REFUSE_DRAIN: usize = 64 * 1024;

/// Counts open connections, in all and per peer.
pub struct ConnLimiter<K> {
    total: usize,
    per_peer: usize,
    open: Mutex<(usize, HashMap<K, usize>)>,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("too many connections from this peer (at most {0}); close some and retry")]
    PerPeer(usize),
    #[error("too many open connections (at most {0}); retry later")]
    Total(usize),
}

/// One open connection's place; given back on drop.
pub struct ConnPermit<K: Hash + Eq + Clone> {
    limiter: Arc<ConnLimiter<K>>,
    peer: K,
}

impl<K: Hash + Eq + Clone> ConnLimiter<K> {
    /// At most `total` connections, `per_peer` of them from one peer.
    pub fn new(total: usize, per_peer: usize) -> Arc<Self> {
        Arc::new(Self {
            total,
            per_peer,
            open: Mutex::new((0, HashMap::new())),
        })
    }

    /// Like [`Self::new`], with the caps lowered to fit the file descriptors
    /// this process may open (after raising its soft limit to the hard
    /// one): a quarter of them (at least 256) stays for everything else,
    /// and when the total had to shrink, one peer gets at most half of it.
    /// Says what it changed, for the log.
    pub fn fitted(total: usize, per_peer: usize) -> (Arc<Self>, Option<String>) {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        let soft = match getrlimit(Resource::RLIMIT_NOFILE) {
            Ok((soft, hard)) if soft < hard => {
                match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                    Ok(()) => hard,
                    Err(_) => soft,
                }
            }
            Ok((soft, _)) => soft,
            Err(_) => return (Self::new(total, per_peer), None),
        };
        let soft = usize::try_from(soft).unwrap_or(usize::MAX);
        let room = soft.saturating_sub((soft / 4).max(256)).max(1);
        if total <= room {
            return (Self::new(total, per_peer), None);
        }
        let per = per_peer.min((room / 2).max(1));
        let why = format!(
            "connection caps lowered to fit RLIMIT_NOFILE {soft}: {room} in all (was {total}), \
             {per} per peer (was {per_peer}); raise the file limit to restore them"
        );
        (Self::new(room, per), Some(why))
    }

    /// Takes a place for a connection from `peer`, or says which cap is hit.
    pub fn try_acquire(self: &Arc<Self>, peer: K) -> Result<ConnPermit<K>, Refused> {
        let mut open = self.open.lock().expect("lock");
        if open.0 >= self.total {
            return Err(Refused::Total(self.total));
        }
        let mine = open.1.entry(peer.clone()).or_default();
        if *mine >= self.per_peer {
            return Err(Refused::PerPeer(self.per_peer));
        }
        *mine += 1;
        open.0 += 1;
        Ok(ConnPermit {
            limiter: self.clone(),
            peer,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.lock().expect("lock").0
    }
}

impl<K: Hash + Eq + Clone> Drop for ConnPermit<K> {
    fn drop(&mut self) {
        let mut open = self.limiter.open.lock().expect("lock");
        open.0 -= 1;
        if let Some(n) = open.1.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.peer);
            }
        }
    }
}

impl Refused {
    /// `429` over a peer's cap, `503` over the total.
    pub fn status(&self) -> http::StatusCode {
        match self {
            Refused::PerPeer(_) => http::StatusCode::TOO_MANY_REQUESTS,
            Refused::Total(_) => http::StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The whole HTTP/1.1 answer: a JSON-RPC error, `Retry-After`, close.
    pub fn response_bytes(&self) -> Vec<u8> {
        let body = crate::jsonrpc::error(
            serde_json::Value::Null,
            crate::jsonrpc::codes::BROKER_UNAVAILABLE,
            self.to_string(),
        )
        .to_string();
        let status = self.status();
        format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
             connection: close\r\ncontent-length: {}\r\n\r\n{body}",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            body.len()
        )
        .into_bytes()
    }

    /// Answers `stream` with [`Self::response_bytes`] and closes it, within
    /// a second whatever the peer does.
    pub async fn answer<S: AsyncRead + AsyncWrite + Unpin>(self, mut stream: S) {
        let _ = tokio::time::timeout(REFUSE_WITHIN, async {
            stream.write_all(&self.response_bytes()).await?;
            stream.shutdown().await?;
            let mut sink = [0u8; 4096];
            let mut drained = 0;
            while drained < REFUSE_DRAIN {
                match stream.read(&mut sink).await? {
                    0 => break,
                    n => drained += n,
                }
            }
            Ok::<_, std::io::Error>(())
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_count_per_peer_and_in_all_and_give_places_back() {
        let l = ConnLimiter::new(3, 2);
        let a1 = l.try_acquire("a").unwrap();
        let _a2 = l.try_acquire("a").unwrap();
        assert_eq!(l.try_acquire("a").err(), Some(Refused::PerPeer(2)));
        let _b = l.try_acquire("b").unwrap();
        assert_eq!(l.try_acquire("c").err(), Some(Refused::Total(3)));
        drop(a1);
        assert_eq!(l.open(), 2);
        let _c = l.try_acquire("c").unwrap();
        assert_eq!(l.open(), 3);
    }

    #[test]
    fn caps_fit_the_file_limit() {
        let (l, why) = ConnLimiter::<u8>::fitted(usize::MAX / 2, usize::MAX / 2);
        let why = why.expect("no process may open that many files");
        assert!(why.contains("RLIMIT_NOFILE"), "{why}");
        assert!(l.total < usize::MAX / 2 && l.per_peer <= l.total / 2);
        let (l, why) = ConnLimiter::<u8>::fitted(10, 4);
        assert!(why.is_none());
        assert_eq!((l.total, l.per_peer), (10, 4));
    }

    #[test]
    fn refusals_are_complete_http_answers() {
        let r = String::from_utf8(Refused::PerPeer(8).response_bytes()).unwrap();
        assert!(r.starts_with("HTTP/1.1 429 Too Many Requests\r\n"), "{r}");
        assert!(r.contains("connection: close\r\n"));
        let body = r.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 8"));
        let r = String::from_utf8(Refused::Total(1).response_bytes()).unwrap();
        assert!(r.starts_with("HTTP/1.1 503 "), "{r}");
    }
}
