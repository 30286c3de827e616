//! Asking a handshake-era client on behalf of a stateless server.
//!
//! A 2026-07-28 server that needs sampling, elicitation or roots answers
//! with an `InputRequiredResult` instead of sending a request. A
//! handshake-era client expects server→client requests instead, so the
//! proxy asks each question on the request's SSE stream, waits (bounded) for
//! the client's answers, POSTed with its session, and retries the original
//! request with `inputResponses` and the server's `requestState`. The retry
//! is a fresh lease; the client sees one request with its questions inline.

use super::flow::{ClientSide, Flow};
use super::held::DEFAULT_HOLD_TIMEOUT;
use super::sse;
use crate::jsonrpc::{self, codes};
use bytes::Bytes;
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, oneshot};

/// The answer for a client that cannot take questions (JSON-only Accept).
pub fn needs_sse(flow: &Flow) -> Value {
    jsonrpc::error(
        flow.client_id.clone(),
        codes::INTERNAL_ERROR,
        "the server needs client input, which this request cannot receive: accept text/event-stream",
    )
}

/// Asks the client every question of `ask` and swaps the flow onto the
/// retried request. `Err` carries the final message for the client.
pub async fn gather(flow: &mut Flow, tx: &mpsc::Sender<Bytes>, ask: Value) -> Result<(), Value> {
    let fail = |msg: String| jsonrpc::error(flow.client_id.clone(), codes::INTERNAL_ERROR, msg);
    let ClientSide::Legacy(session) = flow.client.clone() else {
        return Err(fail(
            "input bridging applies to handshake-era sessions only".into(),
        ));
    };
    let requests = ask
        .pointer("/result/inputRequests")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let mut waiting = Vec::new();
    for (key, req) in requests {
        let method = jsonrpc::method_of(&req).to_string();
        let cap = method.split('/').next().unwrap_or_default();
        if !session.has_capability(cap) {
            return Err(fail(format!(
                "the server needs {method}, but this client did not declare the {cap:?} capability"
            )));
        }
        let id = format!("mcpb-input-{}", uuid::Uuid::new_v4().simple());
        let (otx, orx) = oneshot::channel();
        if !session.expect_input(&id, otx) {
            return Err(fail("too many questions pending for this session".into()));
        }
        let q = json!({"jsonrpc": "2.0", "id": id, "method": method,
            "params": req.get("params").cloned().unwrap_or(json!({}))});
        if tx.send(sse::event(&q)).await.is_err() {
            return Err(fail("the client left".into()));
        }
        waiting.push((key, orx));
    }
    let mut answers = Map::new();
    for (key, rx) in waiting {
        let msg = match tokio::time::timeout(DEFAULT_HOLD_TIMEOUT, rx).await {
            Ok(Ok(m)) => m,
            _ => {
                return Err(fail(format!(
                    "the client did not answer within {DEFAULT_HOLD_TIMEOUT:?}"
                )))
            }
        };
        match msg.get("result") {
            Some(r) => {
                answers.insert(key, r.clone());
            }
            None => {
                let why = msg
                    .pointer("/error/message")
                    .and_then(Value::as_str)
                    .unwrap_or("an error");
                return Err(fail(format!(
                    "the client refused the server's question: {why}"
                )));
            }
        }
    }
    let mut retry = flow.retry.clone().unwrap_or(Value::Null);
    let Some(params) = retry.get_mut("params").and_then(Value::as_object_mut) else {
        return Err(fail(
            "the original request has no params to retry with".into(),
        ));
    };
    params.insert("inputResponses".into(), Value::Object(answers));
    match ask.pointer("/result/requestState") {
        Some(state) => params.insert("requestState".into(), state.clone()),
        None => params.remove("requestState"),
    };
    let lease_id = super::backend::new_lease_id();
    session.track_request(&flow.client_id, &lease_id);
    let lease = flow
        .proxy
        .backend
        .lease(&retry, Some(&session.id), &lease_id)
        .await
        .map_err(|e| fail(e.to_string()))?;
    if lease.status != ::http::StatusCode::OK {
        return Err(fail(format!(
            "the retry was refused by the broker ({})",
            lease.status
        )));
    }
    flow.lines = lease.lines;
    flow.token = Some(lease_id);
    flow.retry = Some(retry);
    Ok(())
}
