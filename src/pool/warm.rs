//! Warm-up: bring a fresh process to the point where it can take requests.
//!
//! Legacy servers (protocol 2025-11-25 and before) get `initialize` and
//! `notifications/initialized`; stateless servers (2026-07-28) need no
//! handshake and are asked `server/discover`. With `protocol = "auto"` the
//! broker probes `server/discover` first and falls back to `initialize`, as
//! the official Python SDK 2.x client does. The answer is cached by the pool
//! so the proxy can answer clients' handshakes without touching a process.

use crate::config::Protocol;
use crate::process::{Worker, WorkerError};
use crate::protocol::{self, Era};
use serde_json::{json, Value};
use std::time::Duration;

/// What a warm process told the broker about itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Handshake {
    /// Which protocol era the server speaks.
    pub era: Era,
    /// The protocol version the server settled on.
    pub protocol_version: String,
    /// The server's `InitializeResult` (legacy) or discover result (stateless).
    pub result: Value,
}

impl Handshake {
    /// `serverInfo` from the cached result.
    pub fn server_info(&self) -> Value {
        self.result.get("serverInfo").cloned().unwrap_or(json!({}))
    }

    /// `capabilities` from the cached result.
    pub fn capabilities(&self) -> Value {
        self.result
            .get("capabilities")
            .cloned()
            .unwrap_or(json!({}))
    }

    /// `instructions` from the cached result, if any.
    pub fn instructions(&self) -> Option<Value> {
        self.result.get("instructions").cloned()
    }
}

/// Errors during warm-up.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WarmError {
    #[error("{0}")]
    Worker(#[from] WorkerError),
    #[error("the server refused {method}: {error}")]
    Refused { method: &'static str, error: Value },
    #[error("the server's {method} result is malformed: {why}")]
    Malformed { method: &'static str, why: String },
}

/// Runs the handshake `protocol` asks for on `w` within `timeout`.
pub async fn handshake(
    w: &Worker,
    protocol: Protocol,
    capabilities: &Value,
    timeout: Duration,
) -> Result<Handshake, WarmError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
    if protocol != Protocol::Legacy {
        match discover(w, capabilities, left()).await {
            Ok(h) => return Ok(h),
            Err(e) if protocol == Protocol::Stateless => return Err(e),
            Err(WarmError::Worker(e @ WorkerError::Exited(_))) => return Err(e.into()),
            Err(e) => tracing::debug!(
                pid = w.pid,
                "server/discover probe failed ({e}); using initialize"
            ),
        }
    }
    initialize(w, capabilities, left()).await
}

async fn discover(
    w: &Worker,
    capabilities: &Value,
    timeout: Duration,
) -> Result<Handshake, WarmError> {
    let resp = w
        .call(
            "server/discover",
            protocol::discover_params(capabilities),
            timeout,
        )
        .await?;
    let result = ok_result(resp, "server/discover")?;
    let version =
        protocol::pick_stateless_version(&result).ok_or_else(|| WarmError::Malformed {
            method: "server/discover",
            why: "no supported stateless protocol version offered".into(),
        })?;
    Ok(Handshake {
        era: Era::Stateless,
        protocol_version: version,
        result,
    })
}

async fn initialize(
    w: &Worker,
    capabilities: &Value,
    timeout: Duration,
) -> Result<Handshake, WarmError> {
    let resp = w
        .call(
            "initialize",
            protocol::initialize_params(capabilities),
            timeout,
        )
        .await?;
    let result = ok_result(resp, "initialize")?;
    let version = result
        .get("protocolVersion")
        .and_then(Value::as_str)
        .ok_or_else(|| WarmError::Malformed {
            method: "initialize",
            why: "missing protocolVersion".into(),
        })?
        .to_string();
    w.send(&crate::jsonrpc::notification(
        "notifications/initialized",
        json!({}),
    ))
    .await?;
    Ok(Handshake {
        era: Era::Legacy,
        protocol_version: version,
        result,
    })
}

fn ok_result(resp: Value, method: &'static str) -> Result<Value, WarmError> {
    if let Some(error) = resp.get("error") {
        return Err(WarmError::Refused {
            method,
            error: error.clone(),
        });
    }
    match resp.get("result") {
        Some(r) if r.is_object() => Ok(r.clone()),
        _ => Err(WarmError::Malformed {
            method,
            why: "result is not an object".into(),
        }),
    }
}
