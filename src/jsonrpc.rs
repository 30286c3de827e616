//! JSON-RPC 2.0 message classification and error construction.
//!
//! Every message that crosses the broker is classified exactly once, here, so
//! that routing code can match on a [`Kind`] instead of probing JSON fields.
//! Error codes the broker itself produces live in [`codes`]; they are part of
//! the public wire contract (documented in README) and must not be renumbered.

use serde_json::{json, Map, Value};

pub mod raw;

/// Error codes: the JSON-RPC standard ones, the MCP ones we produce, and
/// (re-exported) the broker's own from [`crate::lease_api::codes`].
pub mod codes {
    /// Invalid JSON was received.
    pub const PARSE_ERROR: i64 = -32700;
    /// The JSON sent is not a valid request object.
    pub const INVALID_REQUEST: i64 = -32600;
    /// The method does not exist.
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// Invalid method parameters.
    pub const INVALID_PARAMS: i64 = -32602;
    /// Internal error.
    pub const INTERNAL_ERROR: i64 = -32603;
    pub use crate::lease_api::codes::*;
    /// MCP 2026-07-28: a header does not match the body.
    pub const HEADER_MISMATCH: i64 = -32020;
    /// MCP 2026-07-28: unsupported protocol version.
    pub const UNSUPPORTED_VERSION: i64 = -32022;
}

/// What a JSON-RPC message is, by the fields it carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// Has `method` and `id`: expects exactly one response.
    Request { id: Value, method: String },
    /// Has `method`, no `id`: no response.
    Notification { method: String },
    /// Has `id` and `result` or `error`, no `method`.
    Response { id: Value },
}

/// Why a value is not a usable JSON-RPC message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClassifyError {
    #[error("message is not a JSON object")]
    NotObject,
    #[error("`jsonrpc` must be \"2.0\"")]
    BadVersion,
    #[error("`method` must be a string")]
    BadMethod,
    #[error("`id` must be a string or an integer")]
    BadId,
    #[error("message has neither `method` nor `result`/`error`")]
    Shapeless,
}

/// Classifies one decoded message.
pub fn classify(v: &Value) -> Result<Kind, ClassifyError> {
    let obj = v.as_object().ok_or(ClassifyError::NotObject)?;
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(ClassifyError::BadVersion);
    }
    let id = match obj.get("id") {
        None => None,
        Some(id) if id_allowed(id, obj.contains_key("error")) => Some(id.clone()),
        Some(_) => return Err(ClassifyError::BadId),
    };
    match (obj.get("method"), id) {
        (Some(Value::String(m)), Some(id)) => Ok(Kind::Request {
            id,
            method: m.clone(),
        }),
        (Some(Value::String(m)), None) => Ok(Kind::Notification { method: m.clone() }),
        (Some(_), _) => Err(ClassifyError::BadMethod),
        (None, Some(id)) if obj.contains_key("result") || obj.contains_key("error") => {
            Ok(Kind::Response { id })
        }
        (None, _) => Err(ClassifyError::Shapeless),
    }
}

/// Whether `id` is a usable JSON-RPC id: a string or an integer, or `null`
/// in a message that carries `error` (the answer to an unparseable
/// request). `has_error`: the message has an `error` member.
pub fn id_allowed(id: &Value, has_error: bool) -> bool {
    match id {
        Value::String(_) => true,
        Value::Number(n) => n.is_i64() || n.is_u64(),
        Value::Null => has_error,
        _ => false,
    }
}

/// `msg` as one NDJSON line (compact, ending in `\n`): how messages go to
/// a process and into a lease's answer.
pub fn line(msg: &Value) -> Vec<u8> {
    let mut line = serde_json::to_vec(msg).expect("Value serializes");
    line.push(b'\n');
    line
}

/// The method a message names; empty when it names none (or not as a string).
pub fn method_of(v: &Value) -> &str {
    v.get("method").and_then(Value::as_str).unwrap_or_default()
}

/// Builds an error response for request `id`.
pub fn error(id: Value, code: i64, message: impl Into<String>) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message.into()}})
}

/// Builds an error response carrying a `data` member.
pub fn error_with_data(id: Value, code: i64, message: impl Into<String>, data: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message.into(), "data": data}})
}

/// Builds a success response.
pub fn result(id: Value, result: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}

/// Builds a request.
pub fn request(id: Value, method: &str, params: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
}

/// Builds a notification.
pub fn notification(method: &str, params: Value) -> Value {
    json!({"jsonrpc": "2.0", "method": method, "params": params})
}

/// The `params._meta` object of a message, if any.
pub fn meta(v: &Value) -> Option<&Map<String, Value>> {
    v.get("params")?.get("_meta")?.as_object()
}

/// Mutable access to `params._meta.progressToken`, if present.
pub fn progress_token_mut(v: &mut Value) -> Option<&mut Value> {
    v.get_mut("params")?
        .get_mut("_meta")?
        .get_mut("progressToken")
}

/// True when a message is an error response.
pub fn is_error(v: &Value) -> bool {
    v.get("error").is_some()
}

/// A stable string key for an id or progress token (`1` and `"1"` differ).
pub fn key_of(v: &Value) -> String {
    use std::fmt::Write;
    // Sized once: `format!` grew it two or three times (twice per request).
    match v {
        Value::String(s) => {
            let mut k = String::with_capacity(2 + s.len());
            k.push_str("s:");
            k.push_str(s);
            k
        }
        other => {
            let mut k = String::with_capacity(24);
            k.push_str("n:");
            let _ = write!(k, "{other}");
            k
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_each_kind() {
        let r = json!({"jsonrpc":"2.0","id":1,"method":"tools/list"});
        assert_eq!(
            classify(&r).unwrap(),
            Kind::Request {
                id: json!(1),
                method: "tools/list".into()
            }
        );
        let n = json!({"jsonrpc":"2.0","method":"notifications/initialized"});
        assert!(matches!(classify(&n).unwrap(), Kind::Notification { .. }));
        let ok = json!({"jsonrpc":"2.0","id":"a","result":{}});
        assert_eq!(classify(&ok).unwrap(), Kind::Response { id: json!("a") });
        let err = json!({"jsonrpc":"2.0","id":null,"error":{"code":1,"message":"x"}});
        assert_eq!(classify(&err).unwrap(), Kind::Response { id: Value::Null });
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(classify(&json!([1])), Err(ClassifyError::NotObject));
        assert_eq!(
            classify(&json!({"id":1,"method":"x"})),
            Err(ClassifyError::BadVersion)
        );
        assert_eq!(
            classify(&json!({"jsonrpc":"2.0","id":1.5,"method":"x"})),
            Err(ClassifyError::BadId)
        );
        assert_eq!(
            classify(&json!({"jsonrpc":"2.0","id":{},"method":"x"})),
            Err(ClassifyError::BadId)
        );
        assert_eq!(
            classify(&json!({"jsonrpc":"2.0","method":7})),
            Err(ClassifyError::BadMethod)
        );
        assert_eq!(
            classify(&json!({"jsonrpc":"2.0","id":1})),
            Err(ClassifyError::Shapeless)
        );
        assert_eq!(
            classify(&json!({"jsonrpc":"2.0","id":null,"result":1})),
            Err(ClassifyError::BadId)
        );
    }

    #[test]
    fn keys_distinguish_types() {
        assert_ne!(key_of(&json!(1)), key_of(&json!("1")));
        assert_eq!(key_of(&json!(7)), key_of(&json!(7)));
        assert_eq!(key_of(&json!("ab")), "s:ab");
        assert_eq!(key_of(&json!(-12)), "n:-12");
        assert_eq!(
            key_of(&json!(18446744073709551615u64)),
            "n:18446744073709551615"
        );
    }
}
