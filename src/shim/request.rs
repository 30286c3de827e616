//! One host request through one lease: wait for a slot, lease, relay the
//! lease's messages to the host in order (notifications, server→client
//! requests), and write the response last.
//!
//! Cancellation (the host's `notifications/cancelled`, or shutdown) is
//! delivered into the running lease, whose broker then ends it with
//! `-31010`; before the lease reached the broker, dropping the lease call
//! closes its connection, which cancels it there too. Either way the host
//! gets one response for its id.

use super::Shim;
use crate::jsonrpc::{self, codes, Kind};
use crate::protocol::{self, Era};
use crate::proxy::backend::{self, Lines};
use crate::proxy::{flow, modern};
use http::StatusCode;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use tokio::time::{sleep_until, timeout, Instant};
use tokio_util::sync::CancellationToken;

use super::{lock, CALL_WAIT};

/// Longest wait for the broker's `-31010` after a cancellation was
/// delivered into a lease.
const CANCEL_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Which era the host speaks, as far as this request goes.
pub(super) enum Host {
    /// Handshake era: capabilities from its `initialize`.
    Legacy,
    /// 2026-07-28: each request carries its own `_meta`, with the
    /// capabilities it declared.
    Modern(Value),
}

/// How a lease's stream stopped.
pub(super) enum Streamed {
    /// Its response (or the error that ends the request).
    Done(Value),
    /// A server→client request for a 2026-07-28 host: asked as an
    /// `InputRequiredResult`, the lease held for the retry ([`super::held`]).
    Ask(Value),
    /// The deadline passed.
    Deadline,
}

/// A host request in flight: cancelled by the host or by shutdown.
#[derive(Default)]
pub(super) struct InFlight {
    cancel: CancellationToken,
    /// The `notifications/cancelled` to deliver into the lease.
    message: Mutex<Option<Value>>,
}

impl InFlight {
    /// Asks the request's task to cancel its lease with `msg`.
    pub(super) fn cancel(&self, msg: Value) {
        lock(&self.message).get_or_insert(msg);
        self.cancel.cancel();
    }
}

/// The error a cancelled request ends with (what the broker answers too).
pub(super) fn cancelled(id: Value) -> Value {
    jsonrpc::error(
        id,
        codes::CANCELLED,
        "the request was cancelled by the client",
    )
}

/// Runs one host request to its response and writes it.
pub(super) async fn run(
    shim: Arc<Shim>,
    msg: Value,
    id: Value,
    method: String,
    host: Host,
    entry: Arc<InFlight>,
) {
    let lease = backend::new_lease_id();
    let last = relay(&shim, msg, &id, &method, &host, &entry, &lease).await;
    // Removed before the response is written, so the host may reuse the id
    // as soon as it sees the answer.
    {
        let mut inflight = lock(&shim.inflight);
        let key = jsonrpc::key_of(&id);
        if inflight.get(&key).is_some_and(|e| Arc::ptr_eq(e, &entry)) {
            inflight.remove(&key);
        }
    }
    shim.forget_asks(&lease);
    shim.out.send(last).await;
}

/// Everything up to the response, which it returns.
async fn relay(
    shim: &Arc<Shim>,
    mut msg: Value,
    id: &Value,
    method: &str,
    host: &Host,
    entry: &InFlight,
    lease: &str,
) -> Value {
    let deadline = Instant::now() + shim.settings.request_timeout;
    let timed_out = || {
        jsonrpc::error(
            id.clone(),
            codes::REQUEST_TIMEOUT,
            format!(
                "no answer within {:?}; the request was cancelled",
                shim.settings.request_timeout
            ),
        )
    };
    if let Some(h) = super::held::take(shim, &msg) {
        return super::held::resume(shim, h, &msg, id, method, host, entry, deadline).await;
    }
    let _permit = tokio::select! {
        p = shim.slots.clone().acquire_owned() => match p {
            Ok(p) => p,
            Err(_) => return cancelled(id.clone()),
        },
        _ = entry.cancel.cancelled() => return cancelled(id.clone()),
        _ = sleep_until(deadline) => return jsonrpc::error(
            id.clone(),
            codes::QUEUE_TIMEOUT,
            format!("{} requests stayed in flight for {:?}", shim.settings.max_inflight, shim.settings.request_timeout),
        ),
    };
    let info = tokio::select! {
        i = shim.pool_info() => match i {
            Ok(i) => i,
            Err(e) => return backend::error_response(id.clone(), &e),
        },
        _ = entry.cancel.cancelled() => return cancelled(id.clone()),
    };
    match (host, info.era) {
        (Host::Modern(_), Era::Legacy) => modern::strip_modern_meta(&mut msg),
        (Host::Legacy, Era::Stateless) => {
            // A stateless server learns what the host said at initialize.
            let (caps, client_info) = shim.host_meta();
            protocol::ensure_stateless_meta(&mut msg, &caps, &client_info);
        }
        _ => {}
    }
    // Dropping this call (cancel, deadline) closes its connection: the
    // broker takes the request out of the queue or cancels it.
    let started = tokio::select! {
        l = shim.backend.lease(&msg, shim.lease_session(), lease) => l,
        _ = entry.cancel.cancelled() => return cancelled(id.clone()),
        _ = sleep_until(deadline) => return timed_out(),
    };
    let started = match started {
        Ok(l) => l,
        Err(e) => return backend::error_response(id.clone(), &e),
    };
    let mut lines = started.lines;
    if started.status != StatusCode::OK {
        // The broker refused before a process saw the request: one error line.
        let mut err = match timeout(CALL_WAIT, lines.next()).await {
            Ok(Some(Ok(v))) if v.get("error").is_some() => v,
            _ => jsonrpc::error(
                id.clone(),
                codes::BROKER_UNAVAILABLE,
                format!("the broker refused the request ({})", started.status),
            ),
        };
        err["id"] = id.clone();
        return err;
    }
    let last = stream(shim, &mut lines, id, method, host, entry, lease, deadline).await;
    conclude(shim, lines, lease, last, id, method, timed_out)
}

/// The host's answer for how a lease's stream stopped; an ask holds the
/// lease (its stream) for the host's retry.
pub(super) fn conclude(
    shim: &Arc<Shim>,
    lines: Lines,
    lease: &str,
    last: Streamed,
    id: &Value,
    method: &str,
    timed_out: impl FnOnce() -> Value,
) -> Value {
    match last {
        Streamed::Done(v) => {
            lines.drain_in_background();
            v
        }
        Streamed::Deadline => {
            lines.drain_in_background();
            timed_out()
        }
        Streamed::Ask(req) => super::held::hold(shim, lines, lease, req, id, method),
    }
}

/// Relays the lease's messages until its response, a question for a
/// 2026-07-28 host, or the deadline.
#[allow(clippy::too_many_arguments)]
pub(super) async fn stream(
    shim: &Arc<Shim>,
    lines: &mut Lines,
    id: &Value,
    method: &str,
    host: &Host,
    entry: &InFlight,
    lease: &str,
    mut deadline: Instant,
) -> Streamed {
    let mut cancel_sent = false;
    loop {
        let next = tokio::select! {
            m = lines.next() => m,
            _ = entry.cancel.cancelled(), if !cancel_sent => {
                cancel_sent = true;
                let mut note = lock(&entry.message).take().unwrap_or_else(|| {
                    jsonrpc::notification("notifications/cancelled", json!({}))
                });
                if let Some(p) = note.get_mut("params").and_then(Value::as_object_mut) {
                    p.entry("requestId").or_insert_with(|| id.clone());
                }
                match timeout(CALL_WAIT, shim.backend.deliver(lease, &note)).await {
                    // The broker ends the lease with -31010: read on for it.
                    Ok(Ok(())) => deadline = deadline.min(Instant::now() + CANCEL_WAIT),
                    // The lease is over or the broker is gone; dropping the
                    // stream cancels whatever is left.
                    _ => return Streamed::Done(cancelled(id.clone())),
                }
                continue;
            }
            _ = sleep_until(deadline) => {
                return if cancel_sent { Streamed::Done(cancelled(id.clone())) } else { Streamed::Deadline };
            }
        };
        let msg = match next {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                return Streamed::Done(jsonrpc::error(id.clone(), codes::INTERNAL_ERROR, e))
            }
            None => {
                return Streamed::Done(jsonrpc::error(
                    id.clone(),
                    codes::BROKER_UNAVAILABLE,
                    "the broker connection ended before the server answered (the broker \
                     restarted?); the request was not retried because it may have had effects",
                ))
            }
        };
        match jsonrpc::classify(&msg) {
            Ok(Kind::Response { .. }) => return Streamed::Done(finish(msg, id, method, host)),
            Ok(Kind::Notification { .. }) => shim.out.send(msg).await,
            Ok(Kind::Request { id: sid, method: m }) => {
                let need = flow::capability_for(&m);
                let declared = match (host, need) {
                    (_, None) => false,
                    (Host::Legacy, Some(c)) => declares(&shim.host_capabilities(), c),
                    (Host::Modern(caps), Some(c)) => declares(caps, c),
                };
                if declared && !cancel_sent && matches!(host, Host::Modern(_)) {
                    // A 2026-07-28 host takes questions as InputRequiredResult.
                    return Streamed::Ask(msg);
                }
                if declared && !cancel_sent {
                    let mut ask = msg;
                    ask["id"] = shim.add_ask(lease, sid);
                    shim.out.send(ask).await;
                } else {
                    let refusal = jsonrpc::error(
                        sid,
                        codes::METHOD_NOT_FOUND,
                        format!("the client did not declare the capability {m} needs"),
                    );
                    let _ = timeout(CALL_WAIT, shim.backend.deliver(lease, &refusal)).await;
                }
            }
            Err(_) => {}
        }
    }
}

pub(super) fn declares(capabilities: &Value, name: &str) -> bool {
    capabilities.get(name).is_some_and(|v| !v.is_null())
}

/// The response as the host gets it: its own id, and the fields its era
/// expects.
pub(super) fn finish(mut msg: Value, id: &Value, method: &str, host: &Host) -> Value {
    msg["id"] = id.clone();
    match host {
        Host::Modern(_) => modern::complete_result(method, &mut msg),
        Host::Legacy => {
            if msg.pointer("/result/resultType").and_then(Value::as_str) == Some("input_required") {
                return jsonrpc::error(
                    id.clone(),
                    codes::INTERNAL_ERROR,
                    "the server asked for client input with a 2026-07-28 InputRequiredResult, \
                     which mcp-broker connect cannot relay to a handshake-era host",
                );
            }
        }
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finish_restores_the_id_and_completes_for_modern_hosts() {
        let m = json!({"jsonrpc":"2.0","id":"x","result":{"tools":[]}});
        let legacy = finish(m.clone(), &json!(7), "tools/list", &Host::Legacy);
        assert_eq!(legacy["id"], 7);
        assert!(legacy["result"].get("resultType").is_none());
        let modern = finish(m, &json!(7), "tools/list", &Host::Modern(json!({})));
        assert_eq!(modern["result"]["resultType"], "complete");
        let ir = json!({"jsonrpc":"2.0","id":1,"result":{"resultType":"input_required"}});
        let e = finish(ir, &json!(2), "tools/call", &Host::Legacy);
        assert_eq!(e["error"]["code"], codes::INTERNAL_ERROR);
        assert_eq!(e["id"], 2);
    }

    #[test]
    fn capabilities_declared_only_when_present_and_not_null() {
        assert!(declares(&json!({"sampling":{}}), "sampling"));
        assert!(!declares(&json!({"sampling":null}), "sampling"));
        assert!(!declares(&json!({}), "roots"));
    }
}
