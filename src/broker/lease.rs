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

use super::error::ApiError;
use super::Broker;
use crate::config::Mode;
use crate::jsonrpc::raw::RawRequest;
use crate::jsonrpc::{self, codes};
use crate::lease_api::{PoolDescription, LEASE_NAME};
use crate::pool::{LeaseGuard, Pool};
use crate::process::router::{LeaseEvent, Outgoing, Reply};
use crate::protocol::{self, Era};
use crate::web::{self, Body};
use ::http::{HeaderValue, Response, StatusCode};
use bytes::Bytes;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

mod registration;
pub use registration::scoped;
use registration::Registration;

/// Events buffered per lease before notifications are dropped (counted).
const LEASE_EVENTS: usize = 64;
/// Lines buffered towards the caller.
const BODY_LINES: usize = 16;
/// How long a process has to answer `ping` after an abandoned request.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);
/// The description of a pool served by `GET /v1/pools`.
pub fn describe(pool: &Pool) -> PoolDescription {
    let c = pool.config();
    PoolDescription {
        name: c.name.clone(),
        mode: c.mode,
        modes: c.allowed_modes(),
        protocol: c.protocol,
        learned_era: pool.learned_era(),
        min_idle: c.min_idle,
        max: c.max,
        max_inflight: c.max_inflight,
        request_timeout_ms: u64::try_from(c.request_timeout.as_millis()).unwrap_or(u64::MAX),
        status: pool.status(),
        handshake: pool.handshake().map(|h| (*h).clone()),
    }
}

/// How a lease ended.
enum End {
    Answered {
        error: bool,
    },
    /// The process's event stream ended without a response (it died).
    Lost,
    TimedOut,
    CallerGone,
    Cancelled,
}

/// Runs one request on one process and returns its response: the answer
/// alone when it is the first thing the process sends, else a stream.
/// `id` is the caller's lease id (header `mcp-broker-lease`), or `None` for
/// a fresh one; `caller` the caller's identity as a `requestState` binds it
/// (see [`super::affinity`]).
pub async fn run(
    broker: Arc<Broker>,
    pool: Pool,
    session: Option<String>,
    msg: Outgoing,
    method: String,
    id: Option<String>,
    caller: String,
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
    // A retry of a multi-round-trip request goes to the process that
    // issued its requestState, which gets its own state back.
    // (A raw request carries no requestState: it was parsed otherwise.)
    let (target, msg) = match msg {
        Outgoing::Parsed(mut msg) => match broker.sealer.open_request(&mut msg, &name, &caller) {
            Ok(t) => (t, Outgoing::Parsed(msg)),
            Err(e) => {
                outcome("invalid_state");
                return Err(e.into());
            }
        },
        raw => (None, raw),
    };
    let token = id.unwrap_or_else(crate::lease_api::new_lease_id);
    let (reg, cancel) = Registration::new(&broker, scoped(&caller, &token), &token)?;
    let client_id = msg.id();
    let (acquired, msg) = match pool.try_acquire(session.as_deref(), target) {
        Some(g) => (Ok(g), msg),
        None => {
            // It waits: keep the message as its JSON text meanwhile (a parsed
            // message is ~2 KiB of maps, its text a tenth of that), which is
            // most of what 10,000 queued requests cost.
            let queued = match msg {
                // A copy of its own size: a body read from a connection may
                // share a much larger read buffer.
                Outgoing::Raw(raw) => Box::from(raw.text()),
                Outgoing::Parsed(msg) => serde_json::to_vec(&msg)
                    .expect("Value serializes")
                    .into_boxed_slice(),
            };
            let g = tokio::select! {
                biased;
                g = pool.acquire(session.as_deref(), target, &caller) => g,
                _ = cancel.cancelled() => {
                    outcome("cancelled");
                    return Ok(answer(&token, web::full(line(&cancelled(client_id)))));
                }
            };
            // Read again the way it came in: a plain request stays text.
            let text = Bytes::from(queued.into_vec());
            let msg = match RawRequest::parse(text.clone()) {
                Some((raw, _method)) => Outgoing::Raw(Box::new(raw)),
                None => match serde_json::from_slice(&text) {
                    Ok(m) => Outgoing::Parsed(m),
                    Err(e) => return Err(ApiError::BadRequest(format!("request: {e}"))),
                },
            };
            (g, msg)
        }
    };
    let guard = match acquired {
        Ok(g) => g,
        Err(e) => {
            let kind = match &e {
                crate::pool::PoolError::QueueFull { .. } => "queue_full",
                crate::pool::PoolError::QueueTimeout { .. } => "queue_timeout",
                crate::pool::PoolError::Failing { .. } => "pool_failing",
                crate::pool::PoolError::Closed { .. } => "closed",
                crate::pool::PoolError::ProcessGone { .. } => "process_gone",
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
    let msg = if pool.handshake().is_some_and(|h| h.era == Era::Stateless) {
        // Callers need not know the era: a stateless server gets the envelope
        // it requires (with no client capabilities unless the caller gave some).
        let mut msg = msg
            .into_value()
            .map_err(|e| ApiError::BadRequest(format!("request: {e}")))?;
        protocol::ensure_stateless_meta(&mut msg, &json!({}), &protocol::client_info());
        Outgoing::Parsed(msg)
    } else {
        msg
    };
    let (sink, mut events) = mpsc::channel(LEASE_EVENTS);
    // Boxed: not live while the request waits, but inline it would make
    // every waiting request's state larger.
    let begun = tokio::time::timeout(
        pool.config().request_timeout,
        Box::pin(guard.process().begin(msg, sink)),
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
            guard.process().kill();
            return Err(ApiError::Process(
                "the server process stopped reading its input; it is being replaced".into(),
            ));
        }
    };
    reg.attach(guard.process(), lid);
    broker.lease_started();
    let timeout = pool.config().request_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut lease = Armed(Some(Lease {
        cancel,
        timeout,
        broker: broker.clone(),
        guard,
        lid,
        reg,
        client_id,
        method,
        pool: name,
        caller,
        state_ttl: pool.config().request_state_ttl,
        started,
    }));
    // Wait for the first message here, in the connection's own task: most
    // leases yield just the response, which then goes out with the head in
    // one write, with a length instead of chunks (one wake-up at the proxy,
    // no stream to end). If hyper drops this future (the caller hung up),
    // `Armed` ends the lease as abandoned.
    let first = lease.next(&mut events, deadline).await;
    let body = match first {
        Next::Message(m) => {
            // A streaming lease: the rest is pumped by its own task, which
            // keeps enforcing the deadline even while the caller reads slowly.
            let (tx, body) = web::channel_body(BODY_LINES);
            let _ = tx.try_send(line(&m));
            let lease = lease.0.take().expect("armed until here");
            broker.tracker.spawn(lease.pump(events, tx, deadline));
            body
        }
        Next::End(end, answer) => {
            let mut lease = lease.0.take().expect("armed until here");
            let answer = answer.map(|m| lease.final_line(m));
            // With requests waiting, ending the lease hands the process to
            // the next one: let it write its request to the process before
            // this answer goes out, so the server works while the answer
            // travels (a busy pool of one served ~25% more requests).
            let handed = pool.has_waiters();
            let owed = lease.end(end);
            if handed {
                crate::runtime::after_woken().await;
            }
            web::full(answer.or(owed).unwrap_or_default())
        }
    };
    Ok(answer(&token, body))
}

/// The lease API's `200` answer for lease `token`.
fn answer(token: &str, body: Body) -> Response<Body> {
    let mut r = web::response(StatusCode::OK, "application/x-ndjson", body);
    r.headers_mut().insert(
        LEASE_NAME.clone(),
        HeaderValue::from_str(token).expect("lease ids are valid header values"),
    );
    r
}

/// The answer to a request its caller cancelled.
fn cancelled(id: Value) -> Value {
    jsonrpc::error(
        id,
        codes::CANCELLED,
        "the request was cancelled by the client",
    )
}

struct Lease {
    cancel: CancellationToken,
    timeout: Duration,
    broker: Arc<Broker>,
    guard: LeaseGuard,
    lid: u64,
    reg: Registration,
    client_id: Value,
    method: String,
    pool: String,
    /// The caller as a sealed `requestState` binds it.
    caller: String,
    state_ttl: Duration,
    started: Instant,
}

/// A lease whose caller may still hang up: dropped while armed, it ends as
/// abandoned (the request is cancelled and the process settled).
struct Armed(Option<Lease>);

impl Armed {
    async fn next(
        &mut self,
        events: &mut mpsc::Receiver<LeaseEvent>,
        deadline: tokio::time::Instant,
    ) -> Next {
        let cancel = &self.0.as_ref().expect("armed").cancel;
        next_event(events, deadline, cancel).await
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        if let Some(lease) = self.0.take() {
            lease.end(End::CallerGone);
        }
    }
}

/// What a lease yields next.
enum Next {
    /// A notification or server→client request for the caller.
    Message(Value),
    /// The lease is over; the response when the process answered.
    End(End, Option<Reply>),
}

async fn next_event(
    events: &mut mpsc::Receiver<LeaseEvent>,
    deadline: tokio::time::Instant,
    cancel: &CancellationToken,
) -> Next {
    tokio::select! {
        biased;
        ev = events.recv() => match ev {
            Some(LeaseEvent::Message(m)) => Next::Message(m),
            Some(LeaseEvent::Final(m)) => Next::End(
                End::Answered { error: m.is_error() },
                Some(m),
            ),
            None => Next::End(End::Lost, None),
        },
        _ = tokio::time::sleep_until(deadline) => Next::End(End::TimedOut, None),
        _ = cancel.cancelled() => Next::End(End::Cancelled, None),
    }
}

fn line(v: &Value) -> Bytes {
    Bytes::from(jsonrpc::line(v))
}

impl Lease {
    /// The response's line for the caller. An `InputRequiredResult`'s
    /// `requestState` is sealed so the retry finds this process, which is
    /// kept until the state expires.
    fn final_line(&mut self, reply: Reply) -> Bytes {
        let mut m = match reply {
            Reply::Parsed(m) => m,
            Reply::Raw { line, .. } if !jsonrpc::raw::may_require_input(&line) => return line,
            Reply::Raw { line, .. } => match serde_json::from_slice(&line) {
                Ok(m) => m,
                Err(_) => return line,
            },
        };
        let process = self.guard.process().id;
        let sealer = &self.broker.sealer;
        if let Some(until) =
            sealer.seal_response(&mut m, &self.pool, &self.caller, process, self.state_ttl)
        {
            self.guard.pin(until);
        }
        line(&m)
    }

    /// Streams everything after the first message until the lease ends.
    async fn pump(
        mut self,
        mut events: mpsc::Receiver<LeaseEvent>,
        tx: mpsc::Sender<Bytes>,
        deadline: tokio::time::Instant,
    ) {
        let send = |b: Bytes| tokio::time::timeout_at(deadline, tx.send(b));
        let end = loop {
            tokio::select! {
                biased;
                next = next_event(&mut events, deadline, &self.cancel) => match next {
                    Next::Message(m) => match send(line(&m)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => break End::CallerGone,
                        Err(_) => break End::TimedOut,
                    },
                    Next::End(end, answer) => {
                        if let Some(a) = answer {
                            // The caller may be gone already; the answer is settled either way.
                            let a = self.final_line(a);
                            let _ = send(a).await;
                        }
                        break end;
                    }
                },
                _ = tx.closed() => break End::CallerGone,
            }
        };
        if let Some(owed) = self.end(end) {
            let _ = tx.try_send(owed);
        }
    }

    /// Ends the lease: unregisters and counts it, and gives the process back
    /// (after settling it in the background when the request was abandoned).
    /// Returns the error line the caller is owed, if any.
    fn end(self, end: End) -> Option<Bytes> {
        let broker = self.broker.clone();
        self.reg.remove();
        let metrics = broker.metrics();
        let label = match &end {
            End::Answered { error: false } => "ok",
            End::Answered { error: true } | End::Lost => "error",
            End::TimedOut => "timeout",
            End::CallerGone | End::Cancelled => "cancelled",
        };
        metrics
            .requests
            .with_label_values(&[&self.pool, label])
            .inc();
        metrics
            .request_duration
            .with_label_values(&[
                &self.pool,
                crate::metrics::Metrics::method_label(&self.method),
            ])
            .observe(self.started.elapsed().as_secs_f64());
        let (owed, settle) = match end {
            End::Answered { .. } => {
                self.guard.process().end(self.lid);
                drop(self);
                broker.lease_ended();
                return None;
            }
            End::Lost => (
                Some(jsonrpc::error(
                    self.client_id.clone(),
                    codes::PROCESS_EXITED,
                    "the server process ended before it answered",
                )),
                None,
            ),
            End::TimedOut => (
                Some(jsonrpc::error(
                    self.client_id.clone(),
                    codes::REQUEST_TIMEOUT,
                    format!(
                        "the server did not answer {} within {:?} (request_timeout); the request was cancelled",
                        self.method, self.timeout
                    ),
                )),
                Some(("request_timeout", true)),
            ),
            End::CallerGone => (None, Some(("client disconnected", true))),
            End::Cancelled => (
                Some(cancelled(self.client_id.clone())),
                Some(("client cancellation", false)),
            ),
        };
        match settle {
            // Not on the caller's time: the answer goes out now.
            Some((reason, send_cancel)) if tokio::runtime::Handle::try_current().is_ok() => {
                let b = broker.clone();
                broker.tracker.spawn(async move {
                    self.settle(reason, send_cancel).await;
                    b.lease_ended();
                });
            }
            _ => {
                self.guard.process().end(self.lid);
                drop(self);
                broker.lease_ended();
            }
        }
        owed.map(|v| line(&v))
    }

    /// Cancels the abandoned request and makes sure the process is healthy
    /// before it goes back to the pool.
    async fn settle(mut self, reason: &str, send_cancel: bool) {
        let w = self.guard.process().clone();
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
    let bound = match (pool.mode_of(session), session) {
        (Mode::Exclusive, Some(s)) => pool.bound_process(s),
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
/// from the session's own process for an exclusive session, else from every
/// process.
/// With `hold`, the session ends when the stream does (its caller is gone).
pub fn notifications(
    broker: &Broker,
    pool: &Pool,
    session: Option<String>,
    hold: bool,
) -> Response<Body> {
    let mut rx = pool.subscribe();
    let (tx, body) = web::channel_body(BODY_LINES);
    let pool = pool.clone();
    broker.tracker.spawn(async move {
        loop {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Ok((wid, msg)) => {
                        if pool.mode_of(session.as_deref()) == Mode::Exclusive {
                            let mine = session.as_deref().and_then(|s| pool.bound_process(s)).map(|w| w.id);
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
        if let (true, Some(s)) = (hold, &session) {
            tracing::debug!(pool = %pool.config().name, "session holder left: ending the session");
            pool.end_session(s);
        }
    });
    web::response(StatusCode::OK, "application/x-ndjson", body)
}
