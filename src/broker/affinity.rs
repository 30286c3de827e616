//! Multi-round-trip affinity: the broker's envelope around a server's
//! `requestState`.
//!
//! A 2026-07-28 server that needs client input answers a request with an
//! `InputRequiredResult` carrying a `requestState` that often only the
//! issuing process can read (the official Python SDK 2.x seals it under a
//! key made at process start). The client's retry echoes the state, and in a
//! pool it must reach that same process. Rather than keep a table of states,
//! the broker wraps each state before the result leaves it:
//!
//! ```text
//! mcpb-s1.<process id>.<expiry, unix seconds>.<mac>.<the server's state>
//! ```
//!
//! The MAC (HMAC-SHA256 under a key made at broker start) covers the pool
//! (for an isolated pool that is the tenant's pool), the caller's identity,
//! the process, the expiry and the server's own state. On a retry
//! [`Sealer::open`] checks all of it and gives back the process to reach and
//! the state to hand it. Invariants: a client cannot choose a process (the
//! id is signed), cannot use another caller's or another pool's state, and
//! cannot use one after its expiry; the server sees exactly the state it
//! issued. Process ids are never reused within one broker's life, so a
//! state cannot reach a newer process that happens to share an id.

use crate::policy::Identity;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Prefix of states sealed by a broker.
pub const PREFIX: &str = "mcpb-s1.";

type HmacSha256 = Hmac<Sha256>;

/// Why a retry's `requestState` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("requestState is malformed")]
    Malformed,
    #[error(
        "requestState was not issued to this caller by this broker (altered, another caller's, \
         or from before a broker restart); send the original request again without requestState"
    )]
    Forged,
    #[error("requestState has expired; send the original request again without requestState")]
    Expired,
}

/// Seals and opens `requestState` envelopes with one broker's key.
pub struct Sealer {
    key: [u8; 32],
}

impl Default for Sealer {
    fn default() -> Self {
        Self::new()
    }
}

/// The caller as the envelope binds it: the verified ServiceAccount when
/// there is one, else the socket peer's uid.
pub fn caller_key(who: &Identity) -> String {
    match (&who.kube, who.uid) {
        (Some(k), _) => format!("sa:{}/{}", k.namespace, k.service_account),
        (None, Some(uid)) => format!("uid:{uid}"),
        (None, None) => "-".into(),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

impl Sealer {
    /// A sealer with `key` (the previous image's, across an in-place
    /// upgrade, so `requestState`s it sealed stay valid).
    pub fn with_key(key: [u8; 32]) -> Self {
        Self { key }
    }

    /// The key, for the next image of an in-place upgrade.
    pub fn key(&self) -> [u8; 32] {
        self.key
    }

    /// A sealer with a fresh random key.
    pub fn new() -> Self {
        let mut key = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut key);
        Self { key }
    }

    fn mac(&self, pool: &str, caller: &str, process: u64, exp: u64, state: &str) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("any key length works");
        for part in [pool, caller, &process.to_string(), &exp.to_string()] {
            mac.update(part.as_bytes());
            mac.update(b"\n");
        }
        mac.update(state.as_bytes());
        mac
    }

    /// Wraps `state`, issued by `process` of `pool` for `caller`, valid for `ttl`.
    pub fn seal(
        &self,
        pool: &str,
        caller: &str,
        process: u64,
        ttl: Duration,
        state: &str,
    ) -> String {
        let exp = unix_now() + ttl.as_secs().max(1);
        let sig = self
            .mac(pool, caller, process, exp, state)
            .finalize()
            .into_bytes();
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sig);
        format!("{PREFIX}{process}.{exp}.{sig}.{state}")
    }

    /// Checks an envelope; returns the process it names and the server's state.
    pub fn open(
        &self,
        pool: &str,
        caller: &str,
        sealed: &str,
    ) -> Result<(u64, String), StateError> {
        let rest = sealed.strip_prefix(PREFIX).ok_or(StateError::Malformed)?;
        let mut parts = rest.splitn(4, '.');
        let (Some(process), Some(exp), Some(sig), Some(state)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(StateError::Malformed);
        };
        let process: u64 = process.parse().map_err(|_| StateError::Malformed)?;
        let exp: u64 = exp.parse().map_err(|_| StateError::Malformed)?;
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| StateError::Malformed)?;
        self.mac(pool, caller, process, exp, state)
            .verify_slice(&sig)
            .map_err(|_| StateError::Forged)?;
        if exp < unix_now() {
            return Err(StateError::Expired);
        }
        Ok((process, state.to_string()))
    }

    /// For a retry carrying a sealed `params.requestState`: checks it,
    /// restores the server's own state in `msg` and returns the process the
    /// retry must reach. `Ok(None)` when the request carries no sealed state.
    pub fn open_request(
        &self,
        msg: &mut Value,
        pool: &str,
        caller: &str,
    ) -> Result<Option<u64>, StateError> {
        let Some(slot) = msg.pointer_mut("/params/requestState") else {
            return Ok(None);
        };
        let Some(sealed) = slot.as_str().filter(|s| s.starts_with(PREFIX)) else {
            return Ok(None);
        };
        let (process, state) = self.open(pool, caller, sealed)?;
        *slot = Value::String(state);
        Ok(Some(process))
    }

    /// For a final response: when it is an `InputRequiredResult` with a
    /// `requestState`, seals the state in place and returns until when the
    /// process must stay reachable.
    pub fn seal_response(
        &self,
        msg: &mut Value,
        pool: &str,
        caller: &str,
        process: u64,
        ttl: Duration,
    ) -> Option<Instant> {
        let result = msg.get_mut("result")?.as_object_mut()?;
        if result.get("resultType").and_then(Value::as_str) != Some("input_required") {
            return None;
        }
        let state = result.get_mut("requestState")?;
        let sealed = self.seal(pool, caller, process, ttl, state.as_str()?);
        *state = Value::String(sealed);
        Some(Instant::now() + ttl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const TTL: Duration = Duration::from_secs(60);

    #[test]
    fn round_trips_and_binds_pool_caller_and_process() {
        let s = Sealer::new();
        let sealed = s.seal("p", "uid:1", 7, TTL, "server.state.with.dots");
        assert_eq!(
            s.open("p", "uid:1", &sealed),
            Ok((7, "server.state.with.dots".to_string()))
        );
        assert_eq!(s.open("q", "uid:1", &sealed), Err(StateError::Forged));
        assert_eq!(s.open("p", "uid:2", &sealed), Err(StateError::Forged));
        let other_process = sealed
            .replacen(".7.", ".8.", 1)
            .replacen("mcpb-s1.7", "mcpb-s1.8", 1);
        assert_eq!(
            s.open("p", "uid:1", &other_process),
            Err(StateError::Forged)
        );
        let altered = format!("{sealed}x");
        assert_eq!(s.open("p", "uid:1", &altered), Err(StateError::Forged));
        assert_eq!(
            Sealer::new().open("p", "uid:1", &sealed),
            Err(StateError::Forged),
            "another broker's key"
        );
        assert_eq!(
            s.open("p", "uid:1", "mcpb-s1.x"),
            Err(StateError::Malformed)
        );
    }

    #[test]
    fn expired_states_are_refused() {
        let s = Sealer::new();
        let exp = 1u64;
        let sig = s.mac("p", "c", 3, exp, "st").finalize().into_bytes();
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sig);
        let sealed = format!("{PREFIX}3.{exp}.{sig}.st");
        assert_eq!(s.open("p", "c", &sealed), Err(StateError::Expired));
    }

    #[test]
    fn seals_only_input_required_results_and_restores_on_retry() {
        let s = Sealer::new();
        let mut plain = json!({"jsonrpc":"2.0","id":1,"result":{"content":[],"requestState":"x"}});
        assert!(s.seal_response(&mut plain, "p", "c", 1, TTL).is_none());
        assert_eq!(plain["result"]["requestState"], "x");
        let mut ask = json!({"jsonrpc":"2.0","id":1,"result":{
            "resultType":"input_required","inputRequests":{},"requestState":"abc"}});
        assert!(s.seal_response(&mut ask, "p", "c", 42, TTL).is_some());
        let sealed = ask["result"]["requestState"].as_str().unwrap().to_string();
        assert!(sealed.starts_with(PREFIX));
        let mut retry = json!({"jsonrpc":"2.0","id":2,"method":"tools/call",
            "params":{"name":"t","requestState": sealed,"inputResponses":{}}});
        assert_eq!(s.open_request(&mut retry, "p", "c"), Ok(Some(42)));
        assert_eq!(retry["params"]["requestState"], "abc");
        let mut raw = json!({"jsonrpc":"2.0","id":3,"method":"tools/call",
            "params":{"requestState":"server-own"}});
        assert_eq!(
            s.open_request(&mut raw, "p", "c"),
            Ok(None),
            "unsealed states pass through"
        );
        assert_eq!(raw["params"]["requestState"], "server-own");
    }
}
