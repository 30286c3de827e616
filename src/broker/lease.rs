//! One lease: request-attach, response-detach.
//!
//! [`run`] takes a process from the pool, writes the request, and streams
//! every message the process emits for it (progress, logs, server→client
//! requests) as NDJSON, ending with the response. The process goes back to
//! the pool the moment the response is routed. Invariants:
//! * the stream always ends with exactly one response for the caller's id:
//!   the server's, or a broker error (timeout, process exit, …);
//! * a lease that ends without a response (timeout, caller gone) sends
//!   `notifications/cancelled` and checks the process still answers `ping`
//!   before it serves anyone else; a process that does not is replaced.

use super::api::{ApiError, LEASE_HEADER};
use super::{Broker, LeaseRef};
use crate::config::Mode;
use crate::http::{self, Body};
use crate::jsonrpc::{self, codes};
use crate::pool::{LeaseGuard, Pool};
use crate::process::router::LeaseEvent;
use crate::protocol::{self, Era};
use ::http::{HeaderValue, Response, StatusCode};
use bytes::Bytes;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

/// Events buffered per lease before notifications are dropped (counted).
const LEASE_EVENTS: usize = 64;
/// Lines buffered towards the caller.
const BODY_LINES: usize = 16;
/// How long a process has to answer `ping` after an abandoned request.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);
/// MCP methods used as metric labels; anything else is "other", so clients
/// cannot blow up label cardinality.
const KNOWN_METHODS: &[&str] = &[
    "tools/call",
    "tools/list",
    "resources/list",
    "resources/read",
    "resources/templates/list",
    "resources/subscribe",
    "resources/unsubscribe",
    "prompts/list",
    "prompts/get",
    "completion/complete",
    "logging/setLevel",
    "ping",
    "server/discover",
    "subscriptions/listen",
];

fn method_label(method: &str) -> &'static str {
    KNOWN_METHODS
        .iter()
        .find(|m| **m == method)
        .copied()
        .unwrap_or("other")
}

/// The JSON description of a pool served by `GET /v1/pools`.
pub fn describe(pool: &Pool) -> Value {
    let c = pool.config();
    let hs = pool
        .handshake()
        .map(|h| json!({"era": h.era, "protocolVersion": h.protocol_version, "result": h.result}));
    json!({
        "name": c.name,
        "mode": c.mode.as_str(),
        "min_idle": c.min_idle,
        "max": c.max,
        "max_inflight": c.max_inflight,
        "request_timeout_ms": c.request_timeout.as_millis() as u64,
        "status": pool.status(),
        "handshake": hs,
    })
}

/// How a lease ended.
enum End {
    Answered { error: bool },
    TimedOut,
    CallerGone,
    Cancelled,
}

/// Runs one request on one process and returns the streaming response.
pub async fn run(
    broker: Arc<Broker>,
    pool: Pool,
    session: Option<String>,
    msg: Value,
    method: String,
) -> Result<Response<Body>, ApiError> {
    let started = Instant::now();
    let name = pool.config().name.clone();
    let outcome = |o: &str| {
        broker
            .metrics()
            .requests
            .with_label_values(&[&name, o])
            .inc()
    };
    let guard = match pool.acquire(session.as_deref()).await {
        Ok(g) => g,
        Err(e) => {
            let kind = match &e {
                crate::pool::PoolError::QueueFull { .. } => "queue_full",
                crate::pool::PoolError::QueueTimeout { .. } => "queue_timeout",
                crate::pool::PoolError::Failing { .. } => "pool_failing",
                crate::pool::PoolError::Closed { .. } => "closed",
            };
            outcome(kind);
            let reason = if kind == "closed" { "draining" } else { kind };
            broker
                .metrics()
                .rejections
                .with_label_values(&[&name, reason])
                .inc();
            return Err(e.into());
        }
    };
    let client_id = msg.get("id").cloned().unwrap_or(Value::Null);
    let mut msg = msg;
    if pool.handshake().is_some_and(|h| h.era == Era::Stateless) {
        // Callers need not know the era: a stateless server gets the envelope
        // it requires (with no client capabilities unless the caller gave some).
        protocol::ensure_stateless_meta(&mut msg, &json!({}), &protocol::client_info());
    }
    let (sink, events) = mpsc::channel(LEASE_EVENTS);
    let begun = tokio::time::timeout(
        pool.config().request_timeout,
        guard.worker().begin(msg, sink),
    )
    .await;
    let lid = match begun {
        Ok(Ok(lid)) => lid,
        Ok(Err(e)) => {
            outcome("process_exited");
            return Err(ApiError::Process(format!(
                "the server process could not take the request: {e}"
            )));
        }
        Err(_) => {
            // Its stdin stayed full for a whole request_timeout: the process
            // no longer reads; replace it.
            outcome("timeout");
            let mut guard = guard;
            guard.discard();
            guard.worker().kill();
            return Err(ApiError::Process(
                "the server process stopped reading its input; it is being replaced".into(),
            ));
        }
    };
    let token = uuid::Uuid::new_v4().simple().to_string();
    let cancel = CancellationToken::new();
    broker.leases.lock().expect("lock").insert(
        token.clone(),
        LeaseRef {
            worker: guard.worker().clone(),
            lid,
            pool: name.clone(),
            cancel: cancel.clone(),
        },
    );
    broker.lease_started();
    let (tx, body) = http::channel_body(BODY_LINES);
    let timeout = pool.config().request_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let lease = Lease {
        cancel,
        timeout,
        broker: broker.clone(),
        guard,
        lid,
        token: token.clone(),
        client_id,
        method,
        pool: name,
        started,
    };
    broker.tracker.spawn(lease.pump(events, tx, deadline));
    let mut r = http::response(StatusCode::OK, "application/x-ndjson", body);
    r.headers_mut().insert(
        LEASE_HEADER,
        HeaderValue::from_str(&token).expect("hex token is a valid header"),
    );
    Ok(r)
}

struct Lease {
    cancel: CancellationToken,
    timeout: Duration,
    broker: Arc<Broker>,
    guard: LeaseGuard,
    lid: u64,
    token: String,
    client_id: Value,
    method: String,
    pool: String,
    started: Instant,
}

fn line(v: &Value) -> Bytes {
    let mut b = serde_json::to_vec(v).expect("Value serializes");
    b.push(b'\n');
    Bytes::from(b)
}

impl Lease {
    async fn pump(
        self,
        mut events: mpsc::Receiver<LeaseEvent>,
        tx: mpsc::Sender<Bytes>,
        deadline: tokio::time::Instant,
    ) {
        let send = |v: &Value| tokio::time::timeout_at(deadline, tx.send(line(v)));
        let end = loop {
            tokio::select! {
                biased;
                ev = events.recv() => match ev {
                    Some(LeaseEvent::Message(m)) => match send(&m).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => break End::CallerGone,
                        Err(_) => break End::TimedOut,
                    },
                    Some(LeaseEvent::Final(m)) => {
                        let error = jsonrpc::is_error(&m);
                        // The caller may be gone already; the answer is settled either way.
                        let _ = send(&m).await;
                        break End::Answered { error };
                    }
                    None => break End::Answered { error: true },
                },
                _ = tokio::time::sleep_until(deadline) => break End::TimedOut,
                _ = self.cancel.cancelled() => break End::Cancelled,
                _ = tx.closed() => break End::CallerGone,
            }
        };
        let broker = self.broker.clone();
        broker.leases.lock().expect("lock").remove(&self.token);
        let metrics = self.broker.metrics().clone();
        let label = match &end {
            End::Answered { error: false } => "ok",
            End::Answered { error: true } => "error",
            End::TimedOut => "timeout",
            End::CallerGone | End::Cancelled => "cancelled",
        };
        metrics
            .requests
            .with_label_values(&[&self.pool, label])
            .inc();
        metrics
            .request_duration
            .with_label_values(&[&self.pool, method_label(&self.method)])
            .observe(self.started.elapsed().as_secs_f64());
        match end {
            End::Answered { .. } => {
                self.guard.worker().end(self.lid);
            }
            End::TimedOut => {
                let after = self.timeout;
                let err = jsonrpc::error(
                    self.client_id.clone(),
                    codes::REQUEST_TIMEOUT,
                    format!(
                        "the server did not answer {} within {after:?} (request_timeout); the request was cancelled",
                        self.method
                    ),
                );
                let _ = tx.try_send(line(&err));
                drop(tx);
                self.settle("request_timeout", true).await;
            }
            End::CallerGone => self.settle("client disconnected", true).await,
            End::Cancelled => {
                let err = jsonrpc::error(
                    self.client_id.clone(),
                    codes::CANCELLED,
                    "the request was cancelled by the client",
                );
                let _ = tx.try_send(line(&err));
                drop(tx);
                self.settle("client cancellation", false).await;
            }
        }
        broker.lease_ended();
    }

    /// Cancels the abandoned request and makes sure the process is healthy
    /// before it goes back to the pool.
    async fn settle(mut self, reason: &str, send_cancel: bool) {
        let w = self.guard.worker().clone();
        if send_cancel {
            w.cancel(self.lid, reason).await;
        }
        if w.end(self.lid) && w.call("ping", json!({}), SETTLE_TIMEOUT).await.is_err() {
            tracing::warn!(pool = %self.pool, pid = w.pid, "process did not settle after {reason}; replacing it");
            self.broker
                .metrics()
                .exits
                .with_label_values(&[&self.pool, "stuck"])
                .inc();
            self.guard.discard();
            w.kill();
        }
    }
}

/// A client notification sent to a pool (not into a lease). Exclusive
/// sessions forward it to their process; elsewhere no single process owns
/// the session, so it is dropped and counted.
pub async fn notify(pool: &Pool, session: Option<&str>, msg: Value) {
    let bound = match (pool.config().mode, session) {
        (Mode::Exclusive, Some(s)) => pool.bound_worker(s),
        _ => None,
    };
    match bound {
        Some(w) => {
            let _ = w.send(&msg).await;
        }
        None => {
            tracing::trace!(pool = %pool.config().name, "client notification with no owning process dropped");
        }
    }
}

/// `GET /v1/pools/{pool}/events`: server notifications not tied to a request,
/// from the session's own process in exclusive pools, else from every process.
pub fn events(broker: &Broker, pool: &Pool, session: Option<String>) -> Response<Body> {
    let mut rx = pool.subscribe();
    let (tx, body) = http::channel_body(BODY_LINES);
    let pool = pool.clone();
    let exclusive = pool.config().mode == Mode::Exclusive;
    broker.tracker.spawn(async move {
        loop {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Ok((wid, msg)) => {
                        if exclusive {
                            let mine = session.as_deref().and_then(|s| pool.bound_worker(s)).map(|w| w.id);
                            if mine != Some(wid) { continue; }
                        }
                        if tx.send(line(&msg)).await.is_err() { break; }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::debug!("events stream lagged by {n} messages");
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                _ = tx.closed() => break,
            }
        }
    });
    http::response(StatusCode::OK, "application/x-ndjson", body)
}
