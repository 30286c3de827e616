//! `[broker]` front-door limits: how long a lease API connection may take
//! to send its request, how many connections are open, and how often
//! callers may make the broker ask the API server about a token.
//!
//! The defaults match common servers' (nginx: 60 s for a head and for a
//! body), so no legitimate client is cut off, while one peer can no longer
//! hold connections open forever, exhaust the broker's file descriptors, or
//! turn every bad token into a TokenReview call.

use super::raw::RawBroker;
use super::ConfigError;
use std::time::Duration;

/// Default time a connection has to send a complete request head.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time a request has to send its whole body after its head.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time a kept-alive connection may sit idle between requests.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default cap on open lease API connections (each waiting request holds
/// one, so this is above any pool's queue).
pub const DEFAULT_MAX_CONNECTIONS: usize = 16_384;
/// Default cap on open lease API connections of one peer (a pod, else a uid).
pub const DEFAULT_MAX_CONNECTIONS_PER_PEER: usize = 4_096;
/// Default TokenReview calls per second (cache misses only).
pub const DEFAULT_TOKEN_REVIEW_RATE: u32 = 20;
/// Default burst of TokenReview calls above the rate.
pub const DEFAULT_TOKEN_REVIEW_BURST: u32 = 100;

/// Validated front-door limits.
#[derive(Debug, Clone, PartialEq)]
pub struct FrontDoor {
    /// A request head must be complete within this of connecting (or of
    /// its first byte on a kept-alive connection); bytes do not extend it.
    pub header_timeout: Duration,
    /// A body must be complete within this of its head.
    pub body_timeout: Duration,
    /// A kept-alive connection must start its next request within this.
    pub keepalive_timeout: Duration,
    /// Open connections at most (beyond: `503`, closed).
    pub max_connections: usize,
    /// Open connections of one peer at most (beyond: `429`, closed).
    pub max_connections_per_peer: usize,
    /// TokenReview calls per second, sustained.
    pub token_review_rate: u32,
    /// TokenReview calls allowed at once above the rate.
    pub token_review_burst: u32,
}

impl Default for FrontDoor {
    fn default() -> Self {
        Self {
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_peer: DEFAULT_MAX_CONNECTIONS_PER_PEER,
            token_review_rate: DEFAULT_TOKEN_REVIEW_RATE,
            token_review_burst: DEFAULT_TOKEN_REVIEW_BURST,
        }
    }
}

/// The front-door limits of `b`, defaults filled in.
pub fn from_raw(b: &RawBroker) -> Result<FrontDoor, ConfigError> {
    let bad = |field, msg: &str| ConfigError::Invalid {
        at: "[broker]".into(),
        field,
        msg: msg.into(),
    };
    let d = FrontDoor::default();
    let door = FrontDoor {
        header_timeout: b.header_timeout.unwrap_or(d.header_timeout),
        body_timeout: b.body_timeout.unwrap_or(d.body_timeout),
        keepalive_timeout: b.keepalive_timeout.unwrap_or(d.keepalive_timeout),
        max_connections: b.max_connections.unwrap_or(d.max_connections),
        max_connections_per_peer: b
            .max_connections_per_peer
            .unwrap_or(d.max_connections_per_peer),
        token_review_rate: b.token_review_rate.unwrap_or(d.token_review_rate),
        token_review_burst: b.token_review_burst.unwrap_or(d.token_review_burst),
    };
    for (field, t) in [
        ("header_timeout", door.header_timeout),
        ("body_timeout", door.body_timeout),
        ("keepalive_timeout", door.keepalive_timeout),
    ] {
        if t.is_zero() {
            return Err(bad(field, "must be longer than 0s"));
        }
    }
    if door.max_connections == 0 {
        return Err(bad("max_connections", "must be at least 1"));
    }
    if door.max_connections_per_peer == 0 || door.max_connections_per_peer > door.max_connections {
        return Err(bad(
            "max_connections_per_peer",
            "must be between 1 and max_connections",
        ));
    }
    if door.token_review_rate == 0 {
        return Err(bad("token_review_rate", "must be at least 1 per second"));
    }
    Ok(door)
}
