//! Held leases: bridging a handshake-era server's server→client request
//! (sampling, elicitation, roots) to a 2026-07-28 client, which cannot
//! receive requests and instead gets an `InputRequiredResult` and retries
//! (a *multi-round-trip* request in the 2026-07-28 revision's terms).
//!
//! The lease stays open while the proxy waits for the retry: the process is
//! still inside the original request, blocked on its question. The retry
//! carries `requestState`, which names the held lease and is HMAC-signed
//! with a per-proxy random key, so no client can forge one or redirect
//! another client's lease; it also expires. A held lease that is not resumed
//! in time is dropped, which cancels the request at the process. The number
//! of held leases is bounded.

use super::flow::{self, Accept, ClientSide, Flow};
use super::Proxy;
use crate::jsonrpc::{self, codes};
use crate::web::Body;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Prefix of request states minted by this proxy.
const STATE_PREFIX: &str = "mcpb1.";
/// The single input key the proxy uses per round.
const INPUT_KEY: &str = "input";
/// How long a held lease waits for the client's retry.
pub const DEFAULT_HOLD_TIMEOUT: Duration = Duration::from_secs(120);
/// Leases held at most at once.
pub const DEFAULT_MAX_HELD: usize = 1024;

type HmacSha256 = Hmac<Sha256>;

struct HeldLease {
    flow: Flow,
    server_request_id: Value,
    expires: Instant,
}

/// The held leases of one proxy.
pub struct Held {
    key: [u8; 32],
    max: usize,
    timeout: Duration,
    map: Mutex<HashMap<String, HeldLease>>,
}

impl Held {
    /// An empty table with a fresh random signing key.
    pub fn new(max: usize, timeout: Duration) -> Self {
        let mut key = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut key);
        Self {
            key,
            max,
            timeout,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn sign(&self, payload: &str) -> String {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("any key length works");
        mac.update(payload.as_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    }

    fn state_for(&self, hold_id: &str, pool: &str) -> String {
        let exp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            + self.timeout.as_secs();
        let payload = format!("{hold_id}.{exp}.{pool}");
        format!("{STATE_PREFIX}{hold_id}.{exp}.{}", self.sign(&payload))
    }

    /// The hold id a state names, if the signature and expiry check out.
    fn verify(&self, state: &str, pool: &str) -> Option<String> {
        let rest = state.strip_prefix(STATE_PREFIX)?;
        let mut parts = rest.splitn(3, '.');
        let (id, exp, sig) = (parts.next()?, parts.next()?, parts.next()?);
        let payload = format!("{id}.{exp}.{pool}");
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("any key length works");
        mac.update(payload.as_bytes());
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(sig)
            .ok()?;
        mac.verify_slice(&sig).ok()?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
        (exp.parse::<u64>().ok()? >= now).then(|| id.to_string())
    }

    /// Drops held leases whose client never came back (cancelling them).
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        let mut map = self.map.lock().expect("lock");
        let before = map.len();
        map.retain(|_, h| h.expires > now);
        before - map.len()
    }

    /// Leases currently held.
    pub fn len(&self) -> usize {
        self.map.lock().expect("lock").len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// True when `params` resume a request this proxy holds.
pub fn is_resume(params: &Value) -> bool {
    params
        .get("requestState")
        .and_then(Value::as_str)
        .is_some_and(|s| s.starts_with(STATE_PREFIX))
}

/// Parks `flow` waiting on server request `req`; returns the
/// `InputRequiredResult` response for the client.
pub async fn hold(flow: Flow, req: Value) -> Value {
    let proxy = flow.proxy.clone();
    let held = &proxy.held;
    let client_id = flow.client_id.clone();
    let server_request_id = req.get("id").cloned().unwrap_or(Value::Null);
    let method = jsonrpc::method_of(&req).to_string();
    if held.len() >= held.max {
        flow.refuse(server_request_id, &method).await;
        return jsonrpc::error(
            client_id,
            codes::QUEUE_FULL,
            "too many requests are waiting for client input at this proxy; retry later",
        );
    }
    let hold_id = uuid::Uuid::new_v4().simple().to_string();
    let state = held.state_for(&hold_id, proxy.backend.pool());
    let params = req.get("params").cloned().unwrap_or(json!({}));
    held.map.lock().expect("lock").insert(
        hold_id,
        HeldLease {
            flow,
            server_request_id,
            expires: Instant::now() + held.timeout,
        },
    );
    jsonrpc::result(
        client_id,
        json!({
            "resultType": "input_required",
            "inputRequests": {INPUT_KEY: {"method": method, "params": params}},
            "requestState": state,
        }),
    )
}

/// Resumes a held lease with the client's retry; the answer continues the
/// original lease's stream under the retry's id.
pub async fn resume(
    proxy: &Arc<Proxy>,
    id: Value,
    method: &str,
    params: &Value,
    capabilities: Value,
    accept: Accept,
) -> Result<hyper::Response<Body>, super::error::ProxyError> {
    let state = params
        .get("requestState")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let hold_id = proxy.held.verify(state, proxy.backend.pool());
    let found = hold_id.and_then(|h| proxy.held.map.lock().expect("lock").remove(&h));
    let Some(h) = found else {
        return Ok(crate::web::json(
            ::http::StatusCode::OK,
            &jsonrpc::error(
                id,
                codes::INVALID_PARAMS,
                "requestState is invalid, expired or already used; send the original request again",
            ),
        ));
    };
    let mut flow = h.flow;
    if flow.method != method {
        return Err(super::error::ProxyError::Invalid(format!(
            "requestState belongs to a {} request, not {method}",
            flow.method
        )));
    }
    let answer = match params.pointer(&format!("/inputResponses/{INPUT_KEY}")) {
        Some(r) => jsonrpc::result(h.server_request_id, r.clone()),
        None => jsonrpc::error(
            h.server_request_id,
            codes::INVALID_PARAMS,
            "the client sent no input for this request",
        ),
    };
    if let Some(token) = &flow.token {
        proxy.backend.deliver(token, &answer).await?;
    }
    flow.client_id = id;
    flow.client = ClientSide::Modern { capabilities };
    Ok(flow::respond(flow, accept).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_verify_only_unaltered_and_for_their_pool() {
        let h = Held::new(4, Duration::from_secs(60));
        let s = h.state_for("abc", "pool-a");
        assert_eq!(h.verify(&s, "pool-a").as_deref(), Some("abc"));
        assert_eq!(h.verify(&s, "pool-b"), None);
        let forged = s.replace("abc", "abd");
        assert_eq!(h.verify(&forged, "pool-a"), None);
        let other = Held::new(4, Duration::from_secs(60));
        assert_eq!(other.verify(&s, "pool-a"), None, "another proxy's key");
        assert!(is_resume(&json!({"requestState": s})));
        assert!(!is_resume(&json!({"requestState": "server-own-state"})));
    }

    #[test]
    fn expired_states_fail() {
        let h = Held::new(4, Duration::ZERO);
        let s = h.state_for("abc", "p");
        // exp == now is still valid within the same second; a past one is not.
        let past = format!("{STATE_PREFIX}abc.1.{}", h.sign("abc.1.p"));
        assert!(h.verify(&past, "p").is_none());
        let _ = s;
    }
}
