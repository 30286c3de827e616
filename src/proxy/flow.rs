//! One client request riding one lease, and how it becomes an HTTP answer.
//!
//! A [`Flow`] reads the lease's messages and decides, per message, what the
//! client sees: notifications pass through, the final response gets the
//! client's id (and, for 2026-07-28 clients, `resultType` and cache fields),
//! and server→client requests go to the client over SSE (handshake era) or
//! become an `InputRequiredResult` (stateless era, see [`super::held`]).
//!
//! [`respond`] picks the response shape: when the first thing the lease
//! yields is the response itself, a plain JSON answer (the cheap common
//! case); otherwise an SSE stream that carries every message in order. If the
//! client goes away, dropping the lease stream makes the broker cancel the
//! request at the process.

use super::backend::Lines;
use super::session::Session;
use super::{ask, held, modern, sse, Proxy};
use crate::jsonrpc::{self, codes, Kind};
use crate::web::{self, Body};
use ::http::{Response, StatusCode};
use bytes::Bytes;
use serde_json::{json, Value};
use std::sync::Arc;

/// SSE events buffered towards a client.
const SSE_BUFFER: usize = 16;

/// Who the client is, for deciding how server messages reach it.
#[derive(Clone)]
pub enum ClientSide {
    /// A handshake-era client with a session.
    Legacy(Arc<Session>),
    /// A 2026-07-28 client and the capabilities this request declared.
    Modern { capabilities: Value },
}

/// What the client accepts as a response.
#[derive(Debug, Clone, Copy)]
pub struct Accept {
    pub json: bool,
    pub sse: bool,
}

/// One step of a flow.
pub enum Step {
    /// A notification for the client.
    Notify(Value),
    /// A server→client request for a handshake-era client (id tracked).
    ServerRequest(Value),
    /// A server→client request for a stateless client: hold the lease.
    Hold(Value),
    /// The response; the flow is over.
    Final(Value),
    /// A stateless server's `InputRequiredResult` for a handshake-era client:
    /// ask the client over SSE, then retry ([`super::ask`]).
    NeedInput(Value),
}

/// A client request in flight on a lease.
pub struct Flow {
    pub proxy: Arc<Proxy>,
    pub lines: Lines,
    pub token: Option<String>,
    pub client_id: Value,
    pub method: String,
    pub client: ClientSide,
    /// The request as sent, kept when the proxy may have to retry it with
    /// the client's input (see [`super::ask`]).
    pub retry: Option<Value>,
    /// The request, kept for one replay when it is safe to repeat (see
    /// [`is_safe_to_replay`]) and the broker connection breaks before the
    /// client saw anything.
    pub replay: Option<Bytes>,
    /// Whether the client has seen a message of this flow.
    pub emitted: bool,
}

/// Methods that only read, so running them twice is harmless: after a
/// broker restart they are sent again instead of failing. Everything else
/// (a `tools/call` above all) may have had effects and is never repeated.
pub fn is_safe_to_replay(method: &str) -> bool {
    matches!(
        method,
        "ping"
            | "tools/list"
            | "resources/list"
            | "resources/templates/list"
            | "resources/read"
            | "prompts/list"
            | "prompts/get"
            | "completion/complete"
            | "server/discover"
    )
}

/// Which client capability a server→client request needs.
pub fn capability_for(method: &str) -> Option<&'static str> {
    match method {
        "sampling/createMessage" => Some("sampling"),
        "elicitation/create" => Some("elicitation"),
        "roots/list" => Some("roots"),
        _ => None,
    }
}

impl Flow {
    /// The next thing the client should see.
    pub async fn step(&mut self) -> Step {
        loop {
            let msg = match self.lines.next().await {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    if self.replay().await {
                        continue;
                    }
                    return Step::Final(jsonrpc::error(
                        self.client_id.clone(),
                        codes::INTERNAL_ERROR,
                        e,
                    ));
                }
                None => {
                    if self.replay().await {
                        continue;
                    }
                    return Step::Final(jsonrpc::error(
                        self.client_id.clone(),
                        codes::BROKER_UNAVAILABLE,
                        "the broker connection ended before the server answered (the broker \
                         restarted?); the request was not retried because it may have had effects",
                    ));
                }
            };
            match jsonrpc::classify(&msg) {
                Ok(Kind::Response { .. }) => {
                    let code = msg.pointer("/error/code").and_then(Value::as_i64);
                    let lost = code == Some(codes::PROCESS_EXITED)
                        || code == Some(codes::BROKER_UNAVAILABLE);
                    if lost && self.replay().await {
                        continue;
                    }
                    let input_required = msg.pointer("/result/resultType").and_then(Value::as_str)
                        == Some("input_required");
                    if input_required
                        && self.retry.is_some()
                        && matches!(self.client, ClientSide::Legacy(_))
                    {
                        return Step::NeedInput(msg);
                    }
                    return Step::Final(self.finish(msg));
                }
                Ok(Kind::Notification { .. }) => {
                    self.emitted = true;
                    return Step::Notify(msg);
                }
                Ok(Kind::Request { id, method }) => {
                    let cap = capability_for(&method);
                    let declared = match (&self.client, cap) {
                        (_, None) => false,
                        (ClientSide::Legacy(s), Some(c)) => s.has_capability(c),
                        (ClientSide::Modern { capabilities }, Some(c)) => {
                            capabilities.get(c).is_some_and(|v| !v.is_null())
                        }
                    };
                    if !declared {
                        self.refuse(id, &method).await;
                        continue;
                    }
                    match &self.client {
                        ClientSide::Legacy(s) => {
                            let token = self.token.clone().unwrap_or_default();
                            if !s.track_server_request(&id, &token) {
                                self.refuse(id, &method).await;
                                continue;
                            }
                            self.emitted = true;
                            return Step::ServerRequest(msg);
                        }
                        ClientSide::Modern { .. } => return Step::Hold(msg),
                    }
                }
                Err(_) => continue,
            }
        }
    }

    /// Sends the request again on a fresh lease after the broker connection
    /// broke, once, for read-only methods the client has seen nothing of.
    async fn replay(&mut self) -> bool {
        if self.emitted {
            return false;
        }
        let Some(msg) = self.replay.take() else {
            return false;
        };
        let session = match &self.client {
            ClientSide::Legacy(s) => Some(s.id.clone()),
            ClientSide::Modern { .. } => None,
        };
        let id = super::backend::new_lease_id();
        if let ClientSide::Legacy(s) = &self.client {
            s.track_request(&self.client_id, &id);
        }
        match self
            .proxy
            .backend
            .lease_text(msg, session.as_deref(), &id)
            .await
        {
            Ok(l) if l.status == StatusCode::OK => {
                tracing::info!(method = %self.method, "broker connection broke; replayed the read-only request");
                self.lines = l.lines;
                self.token = Some(id);
                true
            }
            _ => false,
        }
    }

    /// Answers a server→client request the client cannot take.
    pub async fn refuse(&self, id: Value, method: &str) {
        if let Some(token) = &self.token {
            let err = jsonrpc::error(
                id,
                codes::METHOD_NOT_FOUND,
                format!("the client did not declare the capability {method} needs"),
            );
            let _ = self.proxy.backend.deliver(token, &err).await;
        }
    }

    /// The response as the client's JSON body straight from its line, when
    /// it is the next message and [`Flow::finish`] would change nothing but
    /// its id: a handshake-era client, a success, no `InputRequiredResult`.
    /// The common case, without parsing the answer
    /// ([`jsonrpc::raw`]).
    async fn plain_final(&mut self) -> Option<Bytes> {
        if !matches!(self.client, ClientSide::Legacy(_)) {
            return None;
        }
        let line = self.lines.peek().await?;
        let head = jsonrpc::raw::answer_head(line)?;
        if head.is_error || jsonrpc::raw::may_require_input(line) {
            return None;
        }
        let mut body = jsonrpc::raw::with_id(line, head.id_at, &self.client_id);
        body.pop(); // its newline
        self.lines.skip();
        Some(body.into())
    }

    fn finish(&self, mut msg: Value) -> Value {
        msg["id"] = self.client_id.clone();
        match &self.client {
            ClientSide::Modern { .. } => modern::complete_result(&self.method, &mut msg),
            ClientSide::Legacy(_) => {
                if msg.pointer("/result/resultType").and_then(Value::as_str)
                    == Some("input_required")
                {
                    return jsonrpc::error(
                        self.client_id.clone(),
                        codes::INTERNAL_ERROR,
                        "the server asked for client input with a 2026-07-28 InputRequiredResult, \
                         which this proxy cannot relay to a handshake-era session; connect with a 2026-07-28 client",
                    );
                }
            }
        }
        msg
    }

    pub(super) fn done(self) {
        self.forget();
        self.lines.drain_in_background();
    }

    fn forget(&self) {
        if let ClientSide::Legacy(s) = &self.client {
            s.untrack_request(&self.client_id);
            if let Some(t) = &self.token {
                s.forget_lease(t);
            }
        }
    }
}

/// The HTTP status for a final message in a JSON answer.
fn final_status(flow: &Flow, msg: &Value) -> StatusCode {
    let not_found =
        msg.pointer("/error/code").and_then(Value::as_i64) == Some(codes::METHOD_NOT_FOUND);
    match flow.client {
        ClientSide::Modern { .. } if not_found => StatusCode::NOT_FOUND,
        _ => StatusCode::OK,
    }
}

/// Runs `flow` and answers the client.
pub async fn respond(mut flow: Flow, accept: Accept) -> Response<Body> {
    if let Some(body) = flow.plain_final().await {
        flow.done();
        return web::response(StatusCode::OK, "application/json", web::full(body));
    }
    let first = flow.step().await;
    let first = match first {
        Step::Final(m) => {
            let status = final_status(&flow, &m);
            flow.done();
            return web::json(status, &m);
        }
        Step::Hold(req) => {
            let result = held::hold(flow, req).await;
            return web::json(StatusCode::OK, &result);
        }
        other => other,
    };
    if !accept.sse {
        // JSON only: notifications have nowhere to go; server requests are refused.
        let mut step = first;
        loop {
            match step {
                Step::Final(m) => {
                    let status = final_status(&flow, &m);
                    flow.done();
                    return web::json(status, &m);
                }
                Step::Hold(req) => return web::json(StatusCode::OK, &held::hold(flow, req).await),
                Step::NeedInput(_) => {
                    let err = ask::needs_sse(&flow);
                    flow.done();
                    return web::json(StatusCode::OK, &err);
                }
                Step::ServerRequest(req) => {
                    if let (Some(id), Some(m)) = (
                        req.get("id").cloned(),
                        req.get("method").and_then(Value::as_str),
                    ) {
                        if let ClientSide::Legacy(s) = &flow.client {
                            s.take_server_request(&id);
                        }
                        flow.refuse(id, m).await;
                    }
                }
                Step::Notify(_) => {}
            }
            step = flow.step().await;
        }
    }
    let (tx, body) = web::channel_body(SSE_BUFFER);
    let tracker = flow.proxy.tracker.clone();
    let open = crate::metrics::GaugeGuard::new(
        flow.proxy
            .metrics
            .sse_streams
            .with_label_values(&["response"]),
    );
    tracker.spawn(async move {
        let _open = open;
        let mut step = first;
        let mut keepalive = sse::keepalive();
        loop {
            let (event, last) = match step {
                Step::Final(m) => (sse::event(&m), true),
                Step::Hold(req) => {
                    let m = held::hold(flow, req).await;
                    let _ = tx.send(sse::event(&m)).await;
                    return;
                }
                Step::Notify(m) | Step::ServerRequest(m) => (sse::event(&m), false),
                Step::NeedInput(m) => match ask::gather(&mut flow, &tx, m).await {
                    Ok(()) => (Bytes::new(), false),
                    Err(fin) => (sse::event(&fin), true),
                },
            };
            if (!event.is_empty() && tx.send(event).await.is_err()) || last {
                break;
            }
            let next = loop {
                tokio::select! {
                    s = flow.step() => break Some(s),
                    _ = keepalive.tick() => {
                        if tx.send(sse::KEEPALIVE_COMMENT).await.is_err() { break None; }
                    }
                    _ = tx.closed() => break None,
                }
            };
            match next {
                Some(s) => step = s,
                // The client left: dropping the flow cancels the lease.
                None => break,
            }
        }
        flow.done();
    });
    sse::response(body)
}

/// A JSON-RPC success with an empty result (for locally answered pings).
pub fn empty_result(id: Value) -> Value {
    jsonrpc::result(id, json!({}))
}
