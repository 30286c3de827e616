//! The one place where proxy failures become HTTP responses.
//!
//! Every failure answers with a JSON-RPC error body (`application/json`, as
//! the official SDKs only read error bodies of that type) carrying the
//! request's id when it is known, and the HTTP status the MCP transport
//! rules give for it.

use super::backend::BackendError;
use crate::jsonrpc::{self, codes};
use crate::protocol::{LEGACY_VERSIONS, STATELESS_VERSION};
use crate::web::{self, Body};
use ::http::{HeaderValue, Response, StatusCode};
use serde_json::{json, Value};

/// A request the proxy refuses or cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("parse error: {0}")]
    Parse(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("{0}")]
    HeaderMismatch(String),
    #[error("unsupported protocol version {requested:?}")]
    UnsupportedVersion { requested: String },
    #[error("method not found: {0}")]
    MethodNotFound(String),
    #[error("not acceptable: {0}")]
    NotAcceptable(&'static str),
    #[error("unsupported media type: the body must be application/json")]
    UnsupportedMediaType,
    #[error("bad request: missing Mcp-Session-Id header (call initialize first)")]
    SessionRequired,
    #[error("session not found: it ended or expired; initialize a new one")]
    UnknownSession,
    #[error("forbidden: origin {0:?} is not allowed")]
    Origin(String),
    #[error("forbidden: host {0:?} is not allowed (--allow-host)")]
    Host(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("request body exceeds the {0}-byte limit")]
    TooLarge(usize),
    #[error("{0}")]
    Busy(String),
    #[error("too many notification streams: {0}")]
    TooManyStreams(String),
    #[error("{0}")]
    Backend(#[from] BackendError),
    #[error("not found")]
    NotFound,
}

impl ProxyError {
    fn status(&self) -> StatusCode {
        use ProxyError::*;
        match self {
            Parse(_)
            | Invalid(_)
            | HeaderMismatch(_)
            | UnsupportedVersion { .. }
            | SessionRequired => StatusCode::BAD_REQUEST,
            MethodNotFound(_) | UnknownSession | NotFound => StatusCode::NOT_FOUND,
            NotAcceptable(_) => StatusCode::NOT_ACCEPTABLE,
            UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Origin(_) | Host(_) => StatusCode::FORBIDDEN,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            TooManyStreams(_) => StatusCode::TOO_MANY_REQUESTS,
            Backend(BackendError::Unreachable { .. } | BackendError::NotWarm(_)) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Backend(_) => StatusCode::BAD_GATEWAY,
        }
    }

    fn body(&self, id: Value) -> Value {
        use ProxyError::*;
        match self {
            Parse(_) => jsonrpc::error(Value::Null, codes::PARSE_ERROR, self.to_string()),
            HeaderMismatch(_) => jsonrpc::error(id, codes::HEADER_MISMATCH, self.to_string()),
            UnsupportedVersion { requested } => {
                let mut supported = vec![STATELESS_VERSION];
                supported.extend(LEGACY_VERSIONS.iter().rev());
                jsonrpc::error_with_data(
                    id,
                    codes::UNSUPPORTED_VERSION,
                    "Unsupported protocol version",
                    json!({"supported": supported, "requested": requested}),
                )
            }
            MethodNotFound(_) => jsonrpc::error(id, codes::METHOD_NOT_FOUND, self.to_string()),
            Busy(_) | TooManyStreams(_) => jsonrpc::error(id, codes::QUEUE_FULL, self.to_string()),
            Backend(e) => super::backend::error_response(id, e),
            _ => jsonrpc::error(id, codes::INVALID_REQUEST, self.to_string()),
        }
    }

    /// The HTTP response for request `id` (`Value::Null` when unknown).
    pub fn into_response(self, id: Value) -> Response<Body> {
        let status = self.status();
        let mut r = web::json(status, &self.body(id));
        if status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert(::http::header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if status == StatusCode::METHOD_NOT_ALLOWED {
            r.headers_mut().insert(
                ::http::header::ALLOW,
                HeaderValue::from_static("GET, POST, DELETE"),
            );
        }
        r
    }
}
