//! What a lease API request's head says about its caller's session and
//! lease: the session key (scoped to the caller), the mode the session
//! uses the pool in, and the caller's own lease id. Each value is checked
//! here, so a malformed one is refused before the body is read.

use super::super::lease;
use super::ApiError;
use crate::config::Mode;
use crate::lease_api::{
    LEASE_HEADER, LEASE_NAME, MAX_SESSION_KEY, MODE_HEADER, MODE_NAME, SESSION_HEADER, SESSION_NAME,
};
use crate::pool::Pool;

/// The session a request belongs to, if any, and the mode it named.
pub(super) struct Session {
    /// The session key, scoped to its caller: another caller naming the
    /// same key reaches a different session (see [`lease::scoped`]).
    pub key: Option<String>,
    /// The mode named with [`MODE_HEADER`].
    pub mode: Option<Mode>,
}

impl Session {
    /// Reads [`SESSION_HEADER`] and [`MODE_HEADER`].
    pub fn of(headers: &::http::HeaderMap, caller: &str) -> Result<Self, ApiError> {
        let key = session_of(headers, caller)?;
        let mode = match headers.get(&MODE_NAME) {
            None => None,
            Some(v) => {
                let m = v
                    .to_str()
                    .ok()
                    .and_then(|s| <Mode as clap::ValueEnum>::from_str(s, false).ok());
                Some(m.ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "{MODE_HEADER} must be \"shared\", \"sticky\" or \"exclusive\""
                    ))
                })?)
            }
        };
        if mode.is_some() && key.is_none() {
            return Err(ApiError::BadRequest(format!(
                "{MODE_HEADER} names a session's mode: send it with {SESSION_HEADER}"
            )));
        }
        Ok(Self { key, mode })
    }

    /// Records the session's mode in `pool` (the pool it resolved to):
    /// refused when the pool does not allow it.
    pub fn join(&self, pool: &Pool) -> Result<(), ApiError> {
        match (&self.key, self.mode) {
            (Some(k), Some(m)) => pool.join(k, m).map_err(ApiError::Mode),
            _ => Ok(()),
        }
    }
}

/// The session key of a request, scoped to its caller.
fn session_of(headers: &::http::HeaderMap, caller: &str) -> Result<Option<String>, ApiError> {
    match headers.get(&SESSION_NAME) {
        None => Ok(None),
        Some(v) => {
            let s = v
                .to_str()
                .map_err(|_| ApiError::BadRequest(format!("{SESSION_HEADER} must be ASCII")))?;
            if !crate::lease_api::valid_session_key(s) {
                return Err(ApiError::BadRequest(format!(
                    "{SESSION_HEADER} must be 1 to {MAX_SESSION_KEY} visible ASCII bytes"
                )));
            }
            Ok(Some(lease::scoped(caller, s)))
        }
    }
}

/// The caller's own id for the lease (header `mcp-broker-lease`), so it can
/// cancel the request before the first answer arrives.
pub(super) fn lease_id_of(headers: &::http::HeaderMap) -> Result<Option<String>, ApiError> {
    match headers.get(&LEASE_NAME) {
        None => Ok(None),
        Some(v) => match v.to_str() {
            Ok(s) if crate::lease_api::valid_lease_id(s) => Ok(Some(s.to_string())),
            _ => Err(ApiError::BadRequest(format!(
                "{LEASE_HEADER} must be 16 to 64 of [A-Za-z0-9_-]"
            ))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mode_needs_a_session_and_a_known_name() {
        let mut h = ::http::HeaderMap::new();
        h.insert(MODE_HEADER, "exclusive".parse().unwrap());
        let e = Session::of(&h, "c").err().expect("no session");
        assert!(e.to_string().contains(SESSION_HEADER));
        h.insert(SESSION_HEADER, "s1".parse().unwrap());
        let s = Session::of(&h, "c").expect("valid");
        assert_eq!(s.mode, Some(Mode::Exclusive));
        assert_eq!(s.key.as_deref(), Some("c\ns1"));
        h.insert(MODE_HEADER, "pooled".parse().unwrap());
        let e = Session::of(&h, "c").err().expect("unknown mode");
        assert!(e.to_string().contains("exclusive"));
    }
}
