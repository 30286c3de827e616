//! The lease API called in-process, for `mcp-broker up` (broker and proxy
//! in one process): the proxy's requests go to the same [`api::handle`] the
//! socket connections end in, without the socket, the HTTP codec on both
//! sides, and the connection task switches between them.
//!
//! Invariants: the caller's identity is what the kernel reports for a peer
//! in this process (our own uid, gid and pid), so policies decide exactly as
//! for the socket; the body limit is enforced by the same read as on the
//! socket; a caller that drops the answer (or its body) ends the lease as
//! abandoned, as a hang-up on the socket does.

use super::{api, Broker};
use crate::lease_api::{LocalAnswer, LocalApi};
use crate::policy::Identity;
use ::http::Request;
use bytes::Bytes;
use http_body_util::Full;
use std::fmt;
use std::sync::Arc;

/// A handle on a broker in this process.
#[derive(Clone)]
pub struct Local {
    broker: Arc<Broker>,
    peer: Identity,
}

impl fmt::Debug for Local {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Local").field("peer", &self.peer).finish()
    }
}

impl Local {
    /// A handle on `broker` whose callers are this process.
    pub fn new(broker: Arc<Broker>) -> Self {
        let peer = Identity {
            uid: Some(nix::unistd::getuid().as_raw()),
            gid: Some(nix::unistd::getgid().as_raw()),
            pid: Some(nix::unistd::getpid().as_raw()),
            ..Identity::default()
        };
        Self { broker, peer }
    }
}

impl LocalApi for Local {
    fn request(&self, req: Request<Full<Bytes>>) -> LocalAnswer<'_> {
        let (broker, peer) = (self.broker.clone(), self.peer.clone());
        Box::pin(async move {
            // Decided from the head, as on the socket.
            match api::admit(&broker, &req, peer).await {
                Ok(who) => api::handle(broker, req, who).await,
                Err(e) => e.into_response(serde_json::Value::Null),
            }
        })
    }
}
