//! Clients of the stateless 2026-07-28 revision.
//!
//! Each POST is self-contained: the protocol version and client capabilities
//! ride in `params._meta` and are mirrored in headers, which are checked
//! against the body (`-32020` on mismatch, `-32022` for an unknown version).
//! `server/discover` is answered from the pool's cached handshake; every
//! other request becomes a lease. Results from a handshake-era server get the
//! fields this revision requires (`resultType`, and `ttlMs`/`cacheScope` on
//! cacheable results), so a legacy stdio server looks like a modern one.

use super::error::ProxyError;
use super::flow::{self, Accept, ClientSide};
use super::{backend::PoolInfo, held, Proxy};
use crate::jsonrpc::{self, Kind};
use crate::protocol::{self, Era, STATELESS_VERSION};
use crate::web::{self, Body};
use ::http::{HeaderMap, Response, StatusCode};
use base64::Engine;
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// Results of these methods must say how long they may be cached.
const CACHEABLE: &[&str] = &[
    "server/discover",
    "tools/list",
    "prompts/list",
    "resources/list",
    "resources/templates/list",
    "resources/read",
];

/// True when a request is of the stateless era (by header or `_meta`).
pub fn is_modern(headers: &HeaderMap, msg: &Value) -> bool {
    let header = headers
        .get("mcp-protocol-version")
        .and_then(|v| v.to_str().ok());
    header == Some(STATELESS_VERSION)
        || jsonrpc::meta(msg).is_some_and(|m| m.contains_key(protocol::META_PROTOCOL_VERSION))
}

/// Adds the fields 2026-07-28 requires on a result, if missing.
pub fn complete_result(method: &str, msg: &mut Value) {
    let Some(result) = msg.get_mut("result").and_then(Value::as_object_mut) else {
        return;
    };
    result
        .entry("resultType")
        .or_insert_with(|| json!("complete"));
    if CACHEABLE.contains(&method) {
        result.entry("ttlMs").or_insert_with(|| json!(0));
        result
            .entry("cacheScope")
            .or_insert_with(|| json!("private"));
    }
}

/// Decodes a header value that may use the `=?base64?…?=` form.
fn header_text(v: &str) -> Option<String> {
    match v
        .strip_prefix("=?base64?")
        .and_then(|r| r.strip_suffix("?="))
    {
        Some(b64) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .ok()
            .and_then(|b| String::from_utf8(b).ok()),
        None => Some(v.to_string()),
    }
}

/// Checks the mirrored headers against the body.
fn validate(headers: &HeaderMap, method: &str, msg: &Value) -> Result<(), ProxyError> {
    let get = |name: &str| headers.get(name).map(|v| v.to_str().unwrap_or("\u{fffd}"));
    let version = get("mcp-protocol-version").ok_or_else(|| {
        ProxyError::HeaderMismatch("MCP-Protocol-Version header is required".into())
    })?;
    if version != STATELESS_VERSION {
        return Err(ProxyError::UnsupportedVersion {
            requested: version.to_string(),
        });
    }
    let meta_version = jsonrpc::meta(msg)
        .and_then(|m| m.get(protocol::META_PROTOCOL_VERSION))
        .and_then(Value::as_str);
    if meta_version != Some(version) {
        return Err(ProxyError::HeaderMismatch(format!(
            "MCP-Protocol-Version header {version:?} does not match params._meta[{:?}] {:?}",
            protocol::META_PROTOCOL_VERSION,
            meta_version
        )));
    }
    match get("mcp-method") {
        Some(m) if m == method => {}
        other => {
            return Err(ProxyError::HeaderMismatch(format!(
                "Mcp-Method header {other:?} does not match body method {method:?}"
            )))
        }
    }
    let name_field = match method {
        "tools/call" | "prompts/get" => Some("name"),
        "resources/read" => Some("uri"),
        _ => None,
    };
    if let Some(field) = name_field {
        let body = msg
            .pointer(&format!("/params/{field}"))
            .and_then(Value::as_str);
        let header = get("mcp-name").and_then(header_text);
        if header.as_deref() != body {
            return Err(ProxyError::HeaderMismatch(format!(
                "Mcp-Name header {header:?} does not match params.{field} {body:?}"
            )));
        }
    }
    Ok(())
}

/// The `server/discover` result for the pool.
pub fn discover_result(info: &PoolInfo) -> Value {
    if info.era == Era::Stateless {
        let mut r = info.result.clone();
        if let Some(o) = r.as_object_mut() {
            o.entry("resultType").or_insert_with(|| json!("complete"));
        }
        return r;
    }
    let r = &info.result;
    let mut out = Map::new();
    out.insert("resultType".into(), json!("complete"));
    out.insert("supportedVersions".into(), json!([STATELESS_VERSION]));
    out.insert(
        "capabilities".into(),
        r.get("capabilities").cloned().unwrap_or(json!({})),
    );
    if let Some(i) = r.get("instructions") {
        out.insert("instructions".into(), i.clone());
    }
    out.insert(
        "_meta".into(),
        json!({"io.modelcontextprotocol/serverInfo": r.get("serverInfo").cloned().unwrap_or(json!({}))}),
    );
    out.insert("ttlMs".into(), json!(0));
    out.insert("cacheScope".into(), json!("private"));
    Value::Object(out)
}

/// Removes the stateless `_meta` keys before a request reaches a
/// handshake-era server, which learned all of it at `initialize`.
pub fn strip_modern_meta(msg: &mut Value) {
    if let Some(meta) = msg
        .get_mut("params")
        .and_then(|p| p.get_mut("_meta"))
        .and_then(Value::as_object_mut)
    {
        meta.retain(|k, _| !k.starts_with("io.modelcontextprotocol/"));
    }
}

/// Answers one POST from a 2026-07-28 client.
pub async fn post(
    proxy: &Arc<Proxy>,
    headers: &HeaderMap,
    mut msg: Value,
    accept: Accept,
) -> Response<Body> {
    let id = msg.get("id").cloned().unwrap_or(Value::Null);
    let (method, kind) = match jsonrpc::classify(&msg) {
        Ok(Kind::Request { method, .. }) => (method, true),
        Ok(Kind::Notification { method }) => (method, false),
        Ok(Kind::Response { .. }) => {
            return ProxyError::Invalid(
                "2026-07-28 clients send no responses; answer input requests by retrying".into(),
            )
            .into_response(id)
        }
        Err(e) => return ProxyError::Invalid(e.to_string()).into_response(id),
    };
    if let Err(e) = validate(headers, &method, &msg) {
        return e.into_response(id);
    }
    if !kind {
        // The revision defines no client notifications over HTTP.
        return web::response(StatusCode::ACCEPTED, "text/plain", web::empty());
    }
    let capabilities = jsonrpc::meta(&msg)
        .and_then(|m| m.get(protocol::META_CLIENT_CAPABILITIES))
        .cloned()
        .unwrap_or(json!({}));
    let info = match proxy.backend.pool_info_wait(proxy.settings.warm_wait).await {
        Ok(i) => i,
        Err(e) => return ProxyError::Backend(e).into_response(id),
    };
    match method.as_str() {
        "server/discover" => {
            return web::json(StatusCode::OK, &jsonrpc::result(id, discover_result(&info)));
        }
        "ping" => {
            let mut r = flow::empty_result(id);
            complete_result("ping", &mut r);
            return web::json(StatusCode::OK, &r);
        }
        "subscriptions/listen" => return super::notifications::modern(proxy, id, &msg).await,
        "initialize" => {
            return ProxyError::Invalid(
                "initialize is not part of 2026-07-28; send requests directly".into(),
            )
            .into_response(id)
        }
        _ => {}
    }
    let params = msg.get("params").cloned().unwrap_or(Value::Null);
    if held::is_resume(&params) {
        return match held::resume(proxy, id.clone(), &method, &params, capabilities, accept).await {
            Ok(r) => r,
            Err(e) => e.into_response(id),
        };
    }
    if info.era == Era::Legacy {
        strip_modern_meta(&mut msg);
    }
    let out = super::Outbound::parsed(msg, false);
    super::forward(
        proxy,
        out,
        None,
        ClientSide::Modern { capabilities },
        accept,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    fn call(name: &str) -> Value {
        json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":name,
            "_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}})
    }

    #[test]
    fn validates_mirrored_headers() {
        let ok = headers(&[
            ("mcp-protocol-version", "2026-07-28"),
            ("mcp-method", "tools/call"),
            ("mcp-name", "echo"),
        ]);
        assert!(validate(&ok, "tools/call", &call("echo")).is_ok());
        assert!(matches!(
            validate(&ok, "tools/call", &call("other")),
            Err(ProxyError::HeaderMismatch(_))
        ));
        let b64 = headers(&[
            ("mcp-protocol-version", "2026-07-28"),
            ("mcp-method", "tools/call"),
            ("mcp-name", "=?base64?w6ljaG8=?="),
        ]);
        assert!(validate(&b64, "tools/call", &call("écho")).is_ok());
        let wrong_method = headers(&[
            ("mcp-protocol-version", "2026-07-28"),
            ("mcp-method", "tools/list"),
        ]);
        assert!(matches!(
            validate(&wrong_method, "tools/call", &call("echo")),
            Err(ProxyError::HeaderMismatch(_))
        ));
        let old = headers(&[
            ("mcp-protocol-version", "2099-01-01"),
            ("mcp-method", "tools/call"),
        ]);
        assert!(matches!(
            validate(&old, "tools/call", &call("echo")),
            Err(ProxyError::UnsupportedVersion { .. })
        ));
    }

    #[test]
    fn completes_results() {
        let mut m = json!({"jsonrpc":"2.0","id":1,"result":{"tools":[]}});
        complete_result("tools/list", &mut m);
        assert_eq!(m["result"]["resultType"], "complete");
        assert_eq!(m["result"]["ttlMs"], 0);
        let mut c =
            json!({"jsonrpc":"2.0","id":1,"result":{"content":[],"resultType":"input_required"}});
        complete_result("tools/call", &mut c);
        assert_eq!(c["result"]["resultType"], "input_required");
        assert!(c["result"].get("ttlMs").is_none());
        let mut e = json!({"jsonrpc":"2.0","id":1,"error":{"code":1,"message":"x"}});
        complete_result("tools/list", &mut e);
        assert!(e.get("result").is_none());
    }

    #[test]
    fn discover_from_legacy_handshake() {
        let info = PoolInfo {
            mode: crate::config::Mode::Shared,
            modes: vec![crate::config::Mode::Shared],
            era: Era::Legacy,
            protocol_version: "2025-06-18".into(),
            result: json!({"protocolVersion":"2025-06-18","capabilities":{"tools":{}},
                "serverInfo":{"name":"s","version":"1"},"instructions":"hi"}),
        };
        let d = discover_result(&info);
        assert_eq!(d["supportedVersions"], json!(["2026-07-28"]));
        assert_eq!(d["capabilities"], json!({"tools":{}}));
        assert_eq!(
            d["_meta"]["io.modelcontextprotocol/serverInfo"]["name"],
            "s"
        );
        assert_eq!(d["instructions"], "hi");
    }
}
