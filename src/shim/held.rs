//! Held leases: a handshake-era server's question (sampling, elicitation,
//! roots) to a 2026-07-28 host. Such a host takes no requests on stdio; it
//! gets an `InputRequiredResult` instead and retries the call with the
//! answers and the `requestState` the shim gave it (a multi-round-trip
//! request, as the HTTP proxy does it in [`crate::proxy::held`]).
//!
//! Invariants: the lease stays open while the shim waits for the retry (the
//! process is still inside the request, blocked on its question); a held
//! lease not resumed within [`HOLD_TIMEOUT`], or left at shutdown, is
//! dropped, which cancels it at the broker; at most [`MAX_HELD`] are held.
//! The state is random and only meaningful to this shim, whose one host is
//! the only one who can send it.

use super::request::{self, Host, InFlight};
use super::{lock, Shim, CALL_WAIT};
use crate::jsonrpc::{self, codes};
use crate::proxy::backend::Lines;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How long a held lease waits for the host's retry.
pub const HOLD_TIMEOUT: Duration = Duration::from_secs(120);
/// Leases held at once at most.
pub const MAX_HELD: usize = 64;
/// Prefix of the request states this shim makes.
const PREFIX: &str = "mcpb-shim.";
/// The one input key per round.
const INPUT_KEY: &str = "input";

/// A lease waiting for the host's retry.
pub(super) struct Held {
    lines: Lines,
    lease: String,
    server_id: Value,
    method: String,
}

/// Holds the lease whose server asked `req`; returns the host's
/// `InputRequiredResult` for request `id`.
pub(super) fn hold(
    shim: &Arc<Shim>,
    lines: Lines,
    lease: &str,
    req: Value,
    id: &Value,
    method: &str,
) -> Value {
    let server_id = req.get("id").cloned().unwrap_or(Value::Null);
    let asked = req.get("method").cloned().unwrap_or(Value::Null);
    let params = req.get("params").cloned().unwrap_or(json!({}));
    let state = format!("{PREFIX}{}", uuid::Uuid::new_v4().simple());
    {
        let mut held = lock(&shim.held);
        if held.len() >= MAX_HELD {
            // Dropping `lines` cancels the lease at the broker.
            return jsonrpc::error(
                id.clone(),
                codes::QUEUE_FULL,
                format!("{MAX_HELD} requests already wait for input from this host"),
            );
        }
        let h = Held {
            lines,
            lease: lease.to_string(),
            server_id,
            method: method.to_string(),
        };
        held.insert(state.clone(), h);
    }
    let (shim2, key) = (shim.clone(), state.clone());
    shim.tasks.spawn(async move {
        let until = Instant::now() + HOLD_TIMEOUT;
        tokio::select! {
            _ = tokio::time::sleep_until(until) => {}
            _ = shim2.relaying.cancelled() => {}
        }
        if lock(&shim2.held).remove(&key).is_some() {
            tracing::debug!("a held request was not retried within {HOLD_TIMEOUT:?}; cancelled");
        }
    });
    jsonrpc::result(
        id.clone(),
        json!({
            "resultType": "input_required",
            "inputRequests": {INPUT_KEY: {"method": asked, "params": params}},
            "requestState": state,
        }),
    )
}

/// What a request's `requestState` names: `None` when it is not this
/// shim's (the server's own, passed through); `Some(None)` when it is but
/// is unknown (expired or used).
pub(super) fn take(shim: &Shim, msg: &Value) -> Option<Option<Held>> {
    let state = msg.pointer("/params/requestState")?.as_str()?;
    state
        .starts_with(PREFIX)
        .then(|| lock(&shim.held).remove(state))
}

/// Continues a held lease with the host's retry `msg` (request `id`).
#[allow(clippy::too_many_arguments)]
pub(super) async fn resume(
    shim: &Arc<Shim>,
    h: Option<Held>,
    msg: &Value,
    id: &Value,
    method: &str,
    host: &Host,
    entry: &InFlight,
    deadline: Instant,
) -> Value {
    let invalid = |why: String| jsonrpc::error(id.clone(), codes::INVALID_PARAMS, why);
    let Some(h) = h else {
        return invalid(
            "requestState is invalid, expired or already used; send the original request again"
                .into(),
        );
    };
    if h.method != method {
        return invalid(format!(
            "requestState belongs to a {} request, not {method}",
            h.method
        ));
    }
    let answer = match msg.pointer(&format!("/params/inputResponses/{INPUT_KEY}")) {
        Some(r) => jsonrpc::result(h.server_id.clone(), r.clone()),
        None => jsonrpc::error(
            h.server_id.clone(),
            codes::INVALID_PARAMS,
            "the client sent no input for this request",
        ),
    };
    match tokio::time::timeout(CALL_WAIT, shim.backend.deliver(&h.lease, &answer)).await {
        Ok(Ok(())) => {}
        _ => return jsonrpc::error(
            id.clone(),
            codes::BROKER_UNAVAILABLE,
            "the held request ended before the answer reached it; send the original request again",
        ),
    }
    let Held {
        mut lines, lease, ..
    } = h;
    let last = request::stream(shim, &mut lines, id, method, host, entry, &lease, deadline).await;
    request::conclude(shim, lines, &lease, last, id, method, || {
        jsonrpc::error(
            id.clone(),
            codes::REQUEST_TIMEOUT,
            "no answer in time; the request was cancelled",
        )
    })
}
