//! One client request handed to the broker as a lease: the id tracked for
//! cancellation, the request kept for a replay or a retry, and the
//! [`Flow`] that turns the lease's messages into the client's answer.

use super::backend;
use super::error::ProxyError;
use super::flow::{self, Accept, ClientSide, Flow};
use super::Proxy;
use crate::jsonrpc;
use crate::web::{self, Body};
use ::http::{header, Response, StatusCode};
use bytes::Bytes;
use serde_json::Value;
use std::sync::Arc;

/// A client request on its way to the broker.
pub struct Outbound {
    /// Its text as the broker gets it.
    pub text: Bytes,
    /// The client's id.
    pub id: Value,
    /// Its method.
    pub method: String,
    /// The request, kept for a retry with the client's input: a
    /// handshake-era client of a stateless server, whose
    /// InputRequiredResult the proxy answers by asking the client and
    /// retrying.
    pub retry: Option<Value>,
}

impl Outbound {
    /// A parsed request, serialized for the broker; `retryable` keeps it
    /// for a retry ([`Outbound::retry`]).
    pub fn parsed(msg: Value, retryable: bool) -> Outbound {
        Outbound {
            text: Bytes::from(serde_json::to_vec(&msg).expect("Value serializes")),
            id: msg.get("id").cloned().unwrap_or(Value::Null),
            method: jsonrpc::method_of(&msg).to_string(),
            retry: retryable.then_some(msg),
        }
    }
}

/// Turns one client request into a lease and answers with its messages.
/// A plain request from a handshake-era client comes as the bytes it came
/// in ([`super::legacy::post_plain`]); any other, [`Outbound::parsed`].
pub async fn forward(
    proxy: &Arc<Proxy>,
    out: Outbound,
    session: Option<&str>,
    client: ClientSide,
    accept: Accept,
) -> Response<Body> {
    let Outbound {
        text,
        id,
        method,
        retry,
    } = out;
    let replay = flow::is_safe_to_replay(&method).then(|| text.clone());
    // Named before it is sent, so a `notifications/cancelled` finds the
    // lease while it still waits for a process or its first answer.
    let lease_id = backend::new_lease_id();
    let untrack = |client: &ClientSide| {
        if let ClientSide::Legacy(s) = client {
            s.untrack_request(&id);
        }
    };
    if let ClientSide::Legacy(s) = &client {
        s.track_request(&id, &lease_id);
    }
    let lease = match proxy.backend.lease_text(text, session, &lease_id).await {
        Ok(l) => l,
        Err(e) => {
            untrack(&client);
            return ProxyError::Backend(e).into_response(id);
        }
    };
    if lease.status != StatusCode::OK {
        untrack(&client);
        // The broker refused before a process saw the request: one error line.
        let mut lines = lease.lines;
        let mut err = match lines.next().await {
            Some(Ok(v)) if v.get("error").is_some() => v,
            _ => jsonrpc::error(
                id.clone(),
                jsonrpc::codes::BROKER_UNAVAILABLE,
                format!("the broker refused the request ({})", lease.status),
            ),
        };
        err["id"] = id;
        let status = if lease.status == StatusCode::SERVICE_UNAVAILABLE {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        };
        let mut r = web::json(status, &err);
        if status == StatusCode::SERVICE_UNAVAILABLE {
            let ra = lease.retry_after.unwrap_or_else(|| "1".into());
            if let Ok(v) = ra.parse() {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        return r;
    }
    let flow = Flow {
        proxy: proxy.clone(),
        lines: lease.lines,
        token: Some(lease_id),
        client_id: id,
        method,
        client,
        retry,
        replay,
        emitted: false,
    };
    flow::respond(flow, accept).await
}
