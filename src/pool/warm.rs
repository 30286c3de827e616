//! Warm-up: bring a fresh process to the point where it can take requests.
//!
//! Legacy servers (protocol 2025-11-25 and before) get `initialize` and
//! `notifications/initialized`; stateless servers (2026-07-28) need no
//! handshake and are asked `server/discover`. With `protocol = "auto"` the
//! broker probes `server/discover` first and falls back to `initialize`, as
//! the official Python SDK 2.x client does. The answer is cached by the pool
//! so the proxy can answer clients' handshakes without touching a process.
//!
//! The probe must not cost a pool its warm-up, whatever a server does with
//! it. A server that ignores it gets `initialize` on the same process after
//! `probe_timeout` (the probe's answer still wins if it comes first, for a
//! stateless server that was merely slow to start). A server that exits on
//! it (releases of the Rust SDK rmcp before 2026-07-28 end the process when
//! the first message is not `initialize`) is reported as
//! [`WarmError::ProbeKilled`], and the pool starts the next process with
//! `initialize` directly. Once a pool has learned its server's era, later
//! processes skip the probe.

use crate::config::Protocol;
use crate::process::{Process, ProcessError};
use crate::protocol::{self, Era};
use serde_json::{json, Value};
use std::time::Duration;

/// What a warm process told the broker about itself.
pub use crate::lease_api::Handshake;

/// Errors during warm-up.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WarmError {
    #[error("{0}")]
    Process(#[from] ProcessError),
    #[error("the server refused {method}: {error}")]
    Refused { method: &'static str, error: Value },
    #[error("the server's {method} result is malformed: {why}")]
    Malformed { method: &'static str, why: String },
    #[error(
        "the process exited on the server/discover probe ({0}); it speaks only the handshake era"
    )]
    ProbeKilled(String),
    #[error("the broker is shutting down")]
    ShuttingDown,
}

/// How to warm one process.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// The pool's `protocol` setting.
    pub protocol: Protocol,
    /// The era the pool learned from earlier processes, if any.
    pub learned: Option<Era>,
    /// Spawn plus handshake at most.
    pub timeout: Duration,
    /// How long the `server/discover` probe waits before `initialize`.
    pub probe_timeout: Duration,
}

/// Runs the handshake `plan` asks for on `w`.
pub async fn handshake(
    w: &Process,
    plan: Plan,
    capabilities: &Value,
) -> Result<Handshake, WarmError> {
    let deadline = tokio::time::Instant::now() + plan.timeout;
    let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
    match (plan.protocol, plan.learned) {
        (Protocol::Legacy, _) | (Protocol::Auto, Some(Era::Legacy)) => {
            initialize(w, capabilities, left()).await
        }
        (Protocol::Stateless, _) => discover(w, capabilities, left()).await,
        (Protocol::Auto, Some(Era::Stateless)) => match discover(w, capabilities, left()).await {
            Err(WarmError::Refused { .. } | WarmError::Malformed { .. }) => {
                initialize(w, capabilities, left()).await
            }
            other => other,
        },
        (Protocol::Auto, None) => probe(w, capabilities, plan.probe_timeout, left()).await,
    }
}

/// `server/discover` first; `initialize` on the same process when the probe
/// is refused or unanswered after `probe_timeout`.
async fn probe(
    w: &Process,
    capabilities: &Value,
    probe_timeout: Duration,
    timeout: Duration,
) -> Result<Handshake, WarmError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
    let disc = discover(w, capabilities, timeout);
    tokio::pin!(disc);
    match tokio::time::timeout(probe_timeout.min(timeout), &mut disc).await {
        Ok(Ok(h)) => return Ok(h),
        Ok(Err(WarmError::Process(ProcessError::Exited(why)))) => {
            return Err(WarmError::ProbeKilled(why))
        }
        Ok(Err(e)) => {
            tracing::debug!(
                pid = w.pid,
                "server/discover probe failed ({e}); using initialize"
            );
            return initialize(w, capabilities, left()).await;
        }
        Err(_) => tracing::debug!(
            pid = w.pid,
            "no answer to the server/discover probe within {probe_timeout:?}; sending initialize"
        ),
    }
    // Both are in flight now: the first good answer decides the era.
    let init = initialize(w, capabilities, left());
    tokio::pin!(init);
    let outcome = tokio::select! {
        r = &mut init => match r {
            Ok(h) => Ok(h),
            Err(e) => disc.await.map_err(|_| e),
        },
        r = &mut disc => match r {
            Ok(h) => Ok(h),
            Err(_) => init.await,
        },
    };
    match outcome {
        // Gone before answering either: the probe is what it could not take.
        Err(WarmError::Process(ProcessError::Exited(why))) => Err(WarmError::ProbeKilled(why)),
        other => other,
    }
}

async fn discover(
    w: &Process,
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
    w: &Process,
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
