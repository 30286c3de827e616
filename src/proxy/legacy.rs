//! Clients of the handshake era (2024-11-05 through 2025-11-25).
//!
//! `initialize` is answered from the pool's cached handshake, with no process
//! touched, and opens a session (`Mcp-Session-Id`). Later requests must carry
//! that session; each becomes a lease bound to it (so sticky and exclusive
//! pools keep their affinity). Notifications and answers to server requests
//! get `202`. `DELETE` ends the session and, in exclusive pools, its process.

use super::backend::PoolInfo;
use super::error::ProxyError;
use super::flow::{self, Accept, ClientSide};
use super::session::Session;
use super::Proxy;
use crate::jsonrpc::raw::{mentions_protocol_version, RawRequest};
use crate::jsonrpc::{self, Kind};
use crate::protocol::{self, Era};
use crate::web::{self, Body};
use ::http::{HeaderMap, HeaderValue, Response, StatusCode};
use bytes::Bytes;
use serde_json::{json, Value};
use std::sync::Arc;

/// Header carrying the session id.
pub const SESSION_ID: &str = "mcp-session-id";

fn accepted() -> Response<Body> {
    web::response(StatusCode::ACCEPTED, "text/plain", web::empty())
}

/// The session a request names: 400 without the header, 404 if unknown.
pub fn session(proxy: &Proxy, headers: &HeaderMap) -> Result<Arc<Session>, ProxyError> {
    let id = headers
        .get(SESSION_ID)
        .and_then(|v| v.to_str().ok())
        .ok_or(ProxyError::SessionRequired)?;
    proxy.sessions.get(id).ok_or(ProxyError::UnknownSession)
}

fn check_version_header(headers: &HeaderMap) -> Result<(), ProxyError> {
    match headers
        .get("mcp-protocol-version")
        .map(|v| v.to_str().unwrap_or(""))
    {
        None => Ok(()),
        Some(v) if protocol::era_of(v) == Some(Era::Legacy) => Ok(()),
        Some(v) => Err(ProxyError::Invalid(format!(
            "unsupported MCP-Protocol-Version {v:?} for a session"
        ))),
    }
}

/// The `InitializeResult` a handshake-era client gets, from the pool's
/// cached handshake and the client's `initialize` params: the version
/// negotiated by [`protocol::negotiate_legacy`], the server's capabilities,
/// serverInfo and instructions (read from a discover result when the pool's
/// server is stateless). Shared with the stdio shim ([`crate::shim`]).
pub fn initialize_result(info: &PoolInfo, params: &Value) -> Value {
    let requested = params.get("protocolVersion").and_then(Value::as_str);
    let version = protocol::negotiate_legacy(requested, &info.protocol_version);
    let server_info = match info.era {
        Era::Legacy => info.result.get("serverInfo").cloned(),
        Era::Stateless => info
            .result
            .pointer("/_meta/io.modelcontextprotocol~1serverInfo")
            .cloned(),
    }
    .unwrap_or(json!({"name": "mcp-broker", "version": env!("CARGO_PKG_VERSION")}));
    let mut result = json!({
        "protocolVersion": version,
        "capabilities": info.result.get("capabilities").cloned().unwrap_or(json!({})),
        "serverInfo": server_info,
    });
    if let Some(i) = info.result.get("instructions") {
        result["instructions"] = i.clone();
    }
    result
}

async fn initialize(proxy: &Arc<Proxy>, id: Value, msg: &Value) -> Response<Body> {
    let info = match proxy.backend.pool_info_wait(proxy.settings.warm_wait).await {
        Ok(i) => i,
        Err(e) => return ProxyError::Backend(e).into_response(id),
    };
    let params = msg.get("params").cloned().unwrap_or(json!({}));
    let result = initialize_result(&info, &params);
    let version = result["protocolVersion"]
        .as_str()
        .unwrap_or(protocol::LATEST_LEGACY)
        .to_string();
    let session = match proxy.sessions.create(
        version,
        params.get("capabilities").cloned().unwrap_or(json!({})),
        params.get("clientInfo").cloned().unwrap_or(json!({})),
    ) {
        Ok(s) => s,
        Err(e) => return ProxyError::Busy(e.to_string()).into_response(id),
    };
    proxy
        .metrics
        .sessions
        .with_label_values(&[proxy.backend.pool()])
        .inc();
    let mut r = web::json(StatusCode::OK, &jsonrpc::result(id, result));
    r.headers_mut().insert(
        SESSION_ID,
        HeaderValue::from_str(&session.id).expect("hex id is a valid header"),
    );
    r
}

/// Whether the pool's servers are of the stateless era (they need the
/// envelope a handshake-era client's requests lack).
async fn serves_stateless(proxy: &Proxy) -> bool {
    proxy
        .backend
        .pool_info()
        .await
        .is_ok_and(|i| i.era == Era::Stateless)
}

/// Answers a handshake-era client's plain request from its text, without
/// parsing it ([`RawRequest`]): a request whose only change on the way is
/// its id, which the broker makes. `None` for anything else (a 2026-07-28
/// client, `initialize`, a locally answered `ping`, a stateless server's
/// pool that needs the envelope added), which [`post`] takes parsed.
pub async fn post_plain(
    proxy: &Arc<Proxy>,
    headers: &HeaderMap,
    body: &Bytes,
    accept: Accept,
) -> Option<Response<Body>> {
    if headers
        .get("mcp-protocol-version")
        .map(HeaderValue::as_bytes)
        == Some(protocol::STATELESS_VERSION.as_bytes())
    {
        return None;
    }
    // `params._meta["io.modelcontextprotocol/protocolVersion"]` marks a
    // 2026-07-28 client ([`super::modern::is_modern`]). The name can only
    // be hidden by `\u` escapes past its `/`, which `RawRequest` refuses.
    if mentions_protocol_version(body) {
        return None;
    }
    let (raw, method) = RawRequest::parse(body.clone())?;
    if method == "initialize" || method == "ping" {
        return None;
    }
    if serves_stateless(proxy).await {
        return None;
    }
    let session = match check_version_header(headers).and_then(|_| session(proxy, headers)) {
        Ok(s) => s,
        Err(e) => return Some(e.into_response(raw.id)),
    };
    session.mark_used();
    let sid = session.id.clone();
    let out = super::Outbound {
        text: body.clone(),
        id: raw.id,
        method,
        retry: None,
    };
    let client = ClientSide::Legacy(session);
    Some(super::forward(proxy, out, Some(&sid), client, accept).await)
}

/// Answers one POST from a handshake-era client.
pub async fn post(
    proxy: &Arc<Proxy>,
    headers: &HeaderMap,
    mut msg: Value,
    accept: Accept,
) -> Response<Body> {
    let id = msg.get("id").cloned().unwrap_or(Value::Null);
    let kind = match jsonrpc::classify(&msg) {
        Ok(k) => k,
        Err(e) => return ProxyError::Invalid(e.to_string()).into_response(id),
    };
    if let Kind::Request { method, .. } = &kind {
        if method == "initialize" {
            return initialize(proxy, id, &msg).await;
        }
    }
    let session = match check_version_header(headers).and_then(|_| session(proxy, headers)) {
        Ok(s) => s,
        Err(e) => return e.into_response(id),
    };
    if matches!(kind, Kind::Request { .. }) {
        session.mark_used();
    }
    match kind {
        Kind::Request { method, .. } if method == "ping" => {
            web::json(StatusCode::OK, &flow::empty_result(id))
        }
        Kind::Request { .. } => {
            let stateless = serves_stateless(proxy).await;
            if stateless {
                // A stateless server learns what the client said at initialize.
                protocol::ensure_stateless_meta(
                    &mut msg,
                    &session.capabilities,
                    &session.client_info,
                );
            }
            let sid = session.id.clone();
            let out = super::Outbound::parsed(msg, stateless);
            super::forward(proxy, out, Some(&sid), ClientSide::Legacy(session), accept).await
        }
        Kind::Notification { method } => {
            match method.as_str() {
                "notifications/initialized" => {}
                "notifications/cancelled" => {
                    let rid = msg
                        .pointer("/params/requestId")
                        .cloned()
                        .unwrap_or(Value::Null);
                    if let Some(token) = session.lease_of_request(&rid) {
                        let _ = proxy.backend.deliver(&token, &msg).await;
                    }
                }
                _ => {
                    // Exclusive pools hand it to the session's process.
                    if let Err(e) = proxy.backend.notify(&msg, Some(&session.id)).await {
                        tracing::debug!("client notification not delivered: {e}");
                    }
                }
            }
            accepted()
        }
        Kind::Response { id: rid } if session.answer_input(&rid, msg.clone()) => accepted(),
        Kind::Response { id: rid } => match session.take_server_request(&rid) {
            Some(token) => match proxy.backend.deliver(&token, &msg).await {
                Ok(()) => accepted(),
                Err(e) => ProxyError::Invalid(format!(
                    "the request this answers is no longer waiting: {e}"
                ))
                .into_response(Value::Null),
            },
            None => ProxyError::Invalid(format!(
                "no server request with id {rid} is waiting for an answer"
            ))
            .into_response(Value::Null),
        },
    }
}

/// `DELETE /mcp`: ends the session.
pub async fn delete(proxy: &Arc<Proxy>, headers: &HeaderMap) -> Response<Body> {
    match session(proxy, headers) {
        Ok(s) => {
            proxy.end_session(&s).await;
            web::response(StatusCode::OK, "text/plain", web::empty())
        }
        Err(e) => e.into_response(Value::Null),
    }
}
