//! `mcp-broker connect`: a stdio MCP server that is really a warm pool.
//!
//! An MCP host spawns the shim exactly like the stdio server it replaces and
//! speaks newline-delimited JSON-RPC over the shim's stdin/stdout. The shim
//! holds no server process: it answers `initialize`, `server/discover` and
//! `ping` from the pool's cached handshake (the proxy's rules, reused from
//! [`crate::proxy::legacy`] and [`crate::proxy::modern`]), swallows
//! `notifications/initialized`, and turns every other host request into one
//! lease from the broker ([`request`]); other host notifications go to the
//! pool.
//!
//! Invariants:
//! * stdout carries JSON-RPC only, one message per line, written by one
//!   writer task fed through a bounded channel (logs go to stderr).
//! * Every host request gets exactly one response: the lease's, or an error
//!   the shim makes (broker unreachable, too many in flight, cancelled,
//!   timed out). Its notifications reach stdout before it.
//! * A server→client request reaches the host only when the host declared
//!   the capability it needs; it is forwarded under an id of the shim's own
//!   and the host's answer goes back into the lease that asked, under the
//!   server's id (a 2026-07-28 host gets it as an `InputRequiredResult`,
//!   [`held`]). Otherwise the server gets `-32601`, as from the proxy.
//! * At most [`ShimSettings::max_inflight`] leases run at once; more host
//!   requests wait (bounded in number and time).
//! * A line from the host that is not JSON gets `-32700`; one over the size
//!   limit gets `-31005` (with its id when it can be found); nothing the host
//!   sends can make the shim panic.
//! * Every wait is bounded. At stdin EOF, SIGTERM or SIGINT the shim cancels
//!   every in-flight lease, ends its session at the broker and exits within
//!   a few seconds; if it dies instead, the broker ends the session when the
//!   stream holding it closes ([`Shim::hold_session`]).
//!
//! The shim never imports the broker: it is a lease API client
//! ([`crate::proxy::backend::Backend`]) like the proxy.

pub mod cli;
mod held;
mod mode;
pub mod on_demand;
mod request;
mod stdio;
mod stdout;

use crate::config::Mode;
use crate::framing::{self, Frame, LineSplitter};
use crate::jsonrpc::{self, codes, Kind};
use crate::metrics::Metrics;
use crate::protocol;
use crate::proxy::backend::{self, Backend};
use crate::proxy::{legacy, modern};
pub use mode::mode_fits;
use request::{Host, InFlight};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use stdout::{writer, Out, OUT_BUFFER};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Default leases running at once.
pub const DEFAULT_MAX_INFLIGHT: usize = 64;
/// Host requests waiting for a free slot at most; beyond, `-31001`.
const MAX_WAITING: usize = 1024;
/// Default longest life of one host request (the broker's own
/// `queue_timeout` and `request_timeout` normally end it first).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(600);
/// At shutdown: time in-flight requests get to settle their cancellation.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// At shutdown: time the broker gets to end the session.
const END_SESSION_WAIT: Duration = Duration::from_secs(2);
/// At shutdown: time the writer gets to flush.
const FLUSH_WAIT: Duration = Duration::from_secs(1);
/// Bytes read from stdin at once (longer messages take several reads).
const READ_BUFFER: usize = 16 * 1024;
/// Longest wait for a call into the broker that is not a lease.
const CALL_WAIT: Duration = Duration::from_secs(10);

/// What `mcp-broker connect` is told.
#[derive(Debug, Clone)]
pub struct ShimSettings {
    /// The broker's lease API socket.
    pub socket: PathBuf,
    /// The pool to lease from.
    pub pool: String,
    /// A token presented to the broker (`Authorization: Bearer`).
    pub token_file: Option<PathBuf>,
    /// Largest JSON-RPC message, either direction.
    pub max_message: usize,
    /// Leases running at once.
    pub max_inflight: usize,
    /// How long `initialize` waits for the pool's first warm process.
    pub warm_wait: Duration,
    /// Longest life of one host request.
    pub request_timeout: Duration,
    /// How this host session uses a named pool (`--mode`), sent with its
    /// session; `None`: as the pool is configured (its `mode`). Checked
    /// against the modes the pool allows at first use ([`mode_fits`]).
    pub mode: Option<Mode>,
}

impl Default for ShimSettings {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(crate::config::DEFAULT_SOCKET),
            pool: String::new(),
            token_file: None,
            max_message: crate::config::DEFAULT_MAX_MESSAGE_SIZE,
            max_inflight: DEFAULT_MAX_INFLIGHT,
            warm_wait: crate::proxy::DEFAULT_WARM_WAIT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            mode: None,
        }
    }
}

/// Why the shim stopped reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The host closed stdin.
    Eof,
    /// SIGTERM or SIGINT (the shutdown token).
    Signal,
    /// Reading stdin failed.
    ReadError(String),
}

/// What the host said about itself at `initialize`.
#[derive(Default)]
struct HostInfo {
    capabilities: Value,
    client_info: Value,
}

/// A server→client request forwarded to the host, by the id it got there.
struct Ask {
    /// The lease it came from.
    lease: String,
    /// Its id as the broker streamed it.
    id: Value,
}

/// Shared state of one shim.
struct Shim {
    settings: ShimSettings,
    backend: Backend,
    /// This shim's session key: sticky and exclusive pools keep the host on
    /// one process.
    session: String,
    out: Out,
    host: Mutex<HostInfo>,
    /// Host requests not answered yet, by [`jsonrpc::key_of`] their id.
    inflight: Mutex<HashMap<String, Arc<InFlight>>>,
    /// Server→client requests waiting for the host, by the shim's id.
    asks: Mutex<HashMap<String, Ask>>,
    /// Leases held for a 2026-07-28 host's retry, by request state.
    held: Mutex<HashMap<String, held::Held>>,
    next_ask: AtomicU64,
    /// One permit per running lease.
    slots: Arc<Semaphore>,
    tasks: TaskTracker,
    /// Set once the pool's notifications (`list_changed` and the like) are
    /// relayed to the host; cancelled at stop.
    relaying: CancellationToken,
    relay_started: std::sync::atomic::AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs the shim on the process's stdin and stdout until EOF or `shutdown`.
pub async fn run(settings: ShimSettings, shutdown: CancellationToken) -> Ended {
    serve(settings, stdio::input(), stdio::output(), shutdown).await
}

/// Runs the shim on `input` and `output` until EOF, a read error or
/// `shutdown`; then cancels what is in flight, ends the session at the
/// broker and flushes `output`, all bounded.
pub async fn serve<R, W>(
    settings: ShimSettings,
    mut input: R,
    output: W,
    shutdown: CancellationToken,
) -> Ended
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut backend = Backend::new(
        settings.socket.clone(),
        settings.pool.clone(),
        settings.max_message,
        Arc::new(Metrics::new()),
    );
    if let Some(path) = &settings.token_file {
        backend = backend.with_token_file(path.clone());
    }
    if let Some(mode) = settings.mode {
        backend = backend.with_mode(mode);
    }
    let (tx, rx) = mpsc::channel(OUT_BUFFER);
    let writer = tokio::spawn(writer(output, rx));
    let shim = Arc::new(Shim {
        slots: Arc::new(Semaphore::new(settings.max_inflight.max(1))),
        session: format!("shim-{}", backend::new_lease_id()),
        settings,
        backend,
        out: Out(tx),
        host: Mutex::new(HostInfo::default()),
        inflight: Mutex::new(HashMap::new()),
        asks: Mutex::new(HashMap::new()),
        held: Mutex::new(HashMap::new()),
        next_ask: AtomicU64::new(1),
        tasks: TaskTracker::new(),
        relaying: CancellationToken::new(),
        relay_started: std::sync::atomic::AtomicBool::new(false),
    });
    tracing::debug!(pool = %shim.settings.pool, session = %shim.session, "shim reading stdin");
    let mut splitter = LineSplitter::new(shim.settings.max_message);
    shim.tasks.spawn(shim.clone().hold_session());
    let mut buf = vec![0u8; READ_BUFFER];
    let mut frames = Vec::new();
    let ended = loop {
        let read = tokio::select! {
            r = input.read(&mut buf) => r,
            _ = shutdown.cancelled() => break Ended::Signal,
        };
        let eof = match read {
            Ok(0) => {
                splitter.finish(&mut frames);
                true
            }
            Ok(n) => {
                splitter.push(&buf[..n], &mut frames);
                false
            }
            Err(e) => break Ended::ReadError(e.to_string()),
        };
        for f in frames.drain(..) {
            shim.frame(f).await;
        }
        if eof {
            break Ended::Eof;
        }
    };
    tracing::debug!(?ended, "shim stopping");
    shim.stop(&ended).await;
    let out = shim.out.clone();
    drop(shim);
    drop(out);
    // The writer ends once every sender is gone; a task that outlived the
    // grace period may still hold one, so the flush is bounded too.
    if tokio::time::timeout(FLUSH_WAIT, writer).await.is_err() {
        tracing::debug!("stdout not flushed in time");
    }
    ended
}

impl Shim {
    /// Handles one framed line from the host.
    async fn frame(self: &Arc<Self>, f: Frame) {
        let line = match f {
            Frame::Line(l) => l,
            Frame::Oversized { len, head, tail } => {
                let id = framing::sniff_id(&head).or_else(|| framing::sniff_id(&tail));
                let message = format!(
                    "message of {len} bytes is over the {}-byte limit (--max-message-bytes)",
                    self.settings.max_message
                );
                // The host's answer to a server request: the server gets the error.
                if let Some(ask) = id.as_ref().and_then(|i| self.take_ask(i)) {
                    let err = jsonrpc::error(ask.id, codes::MESSAGE_TOO_LARGE, message);
                    self.deliver(ask.lease, err);
                    return;
                }
                let id = id.unwrap_or(Value::Null);
                self.out
                    .send(jsonrpc::error(id, codes::MESSAGE_TOO_LARGE, message))
                    .await;
                return;
            }
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        let msg: Value = match serde_json::from_slice(&line) {
            Ok(v) => v,
            Err(e) => {
                let err = jsonrpc::error(Value::Null, codes::PARSE_ERROR, format!("not JSON: {e}"));
                return self.out.send(err).await;
            }
        };
        let kind = match jsonrpc::classify(&msg) {
            Ok(k) => k,
            Err(e) => {
                let reason = if msg.is_array() {
                    "JSON-RPC batches are not supported; send one message per line".to_string()
                } else {
                    e.to_string()
                };
                let id = msg
                    .get("id")
                    .filter(|i| i.is_string() || i.is_i64() || i.is_u64())
                    .cloned()
                    .unwrap_or(Value::Null);
                return self
                    .out
                    .send(jsonrpc::error(id, codes::INVALID_REQUEST, reason))
                    .await;
            }
        };
        match kind {
            Kind::Request { id, method } => self.request(id, method, msg).await,
            Kind::Notification { method } => self.notification(&method, msg),
            Kind::Response { id } => match self.take_ask(&id) {
                Some(ask) => {
                    let mut answer = msg;
                    answer["id"] = ask.id;
                    self.deliver(ask.lease, answer);
                }
                None => tracing::debug!(%id, "host answered a server request that is not waiting"),
            },
        }
    }

    async fn request(self: &Arc<Self>, id: Value, method: String, msg: Value) {
        let params = msg.get("params").cloned().unwrap_or(json!({}));
        // A 2026-07-28 host says so on every request; nothing else does.
        let modern_host =
            jsonrpc::meta(&msg).is_some_and(|m| m.contains_key(protocol::META_PROTOCOL_VERSION));
        match method.as_str() {
            "initialize" => {
                {
                    let mut h = lock(&self.host);
                    h.capabilities = params.get("capabilities").cloned().unwrap_or(json!({}));
                    h.client_info = params.get("clientInfo").cloned().unwrap_or(json!({}));
                }
                if !self.relay_started.swap(true, Ordering::AcqRel) {
                    // A handshake-era host hears the pool's notifications
                    // not tied to a request, as it would from the server.
                    self.tasks.spawn(self.clone().relay_notifications());
                }
                let shim = self.clone();
                self.tasks.spawn(async move {
                    let answer = match shim.pool_info().await {
                        Ok(info) => jsonrpc::result(id, legacy::initialize_result(&info, &params)),
                        Err(e) => backend::error_response(id, &e),
                    };
                    shim.out.send(answer).await;
                });
            }
            "ping" => {
                let mut r = jsonrpc::result(id, json!({}));
                if modern_host {
                    modern::complete_result("ping", &mut r);
                }
                self.out.send(r).await;
            }
            "server/discover" => {
                let shim = self.clone();
                self.tasks.spawn(async move {
                    let answer = match shim.pool_info().await {
                        Ok(info) => jsonrpc::result(id, modern::discover_result(&info)),
                        Err(e) => backend::error_response(id, &e),
                    };
                    shim.out.send(answer).await;
                });
            }
            _ => {
                let key = jsonrpc::key_of(&id);
                let entry = Arc::new(InFlight::default());
                if let Some((code, message)) = self.admit(&key, &id, &entry) {
                    return self.out.send(jsonrpc::error(id, code, message)).await;
                }
                let host = if modern_host {
                    let caps = jsonrpc::meta(&msg)
                        .and_then(|m| m.get(protocol::META_CLIENT_CAPABILITIES))
                        .cloned()
                        .unwrap_or(json!({}));
                    Host::Modern(caps)
                } else {
                    Host::Legacy
                };
                let shim = self.clone();
                self.tasks
                    .spawn(request::run(shim, msg, id, method, host, entry));
            }
        }
    }

    /// Registers a host request as in flight, or says why it cannot be.
    fn admit(&self, key: &str, id: &Value, entry: &Arc<InFlight>) -> Option<(i64, String)> {
        let mut inflight = lock(&self.inflight);
        if inflight.contains_key(key) {
            return Some((
                codes::INVALID_REQUEST,
                format!("request id {id} is already in flight"),
            ));
        }
        if inflight.len() >= self.settings.max_inflight + MAX_WAITING {
            return Some((
                codes::QUEUE_FULL,
                format!(
                    "{} requests are already in flight or waiting",
                    inflight.len()
                ),
            ));
        }
        inflight.insert(key.to_string(), entry.clone());
        None
    }

    fn notification(self: &Arc<Self>, method: &str, msg: Value) {
        match method {
            "notifications/initialized" => {}
            "notifications/cancelled" => {
                let rid = msg
                    .pointer("/params/requestId")
                    .cloned()
                    .unwrap_or(Value::Null);
                match lock(&self.inflight).get(&jsonrpc::key_of(&rid)) {
                    Some(entry) => entry.cancel(msg),
                    None => tracing::debug!(%rid, "cancellation for a request not in flight"),
                }
            }
            _ => {
                // Exclusive pools hand it to the session's process.
                let shim = self.clone();
                self.tasks.spawn(async move {
                    if let Err(e) = shim.backend.notify(&msg, shim.lease_session()).await {
                        tracing::debug!("host notification not delivered: {e}");
                    }
                });
            }
        }
    }

    /// The pool's cached handshake, waiting for the first warm process;
    /// refused when the pool does not allow the `--mode` asked for.
    async fn pool_info(&self) -> Result<Arc<backend::PoolInfo>, backend::BackendError> {
        let info = self.backend.pool_info_wait(self.settings.warm_wait).await?;
        match self.settings.mode {
            Some(want) if !mode_fits(want, &info.modes) => Err(backend::BackendError::Unsupported(
                mode::refusal(&self.settings.pool, want, &info),
            )),
            _ => Ok(info),
        }
    }

    /// The session key leases carry (with the `--mode` it named).
    fn lease_session(&self) -> Option<&str> {
        Some(self.session.as_str())
    }

    /// Holds the session with an open stream until stop: if the shim dies
    /// (even by SIGKILL) the broker ends the session when the stream
    /// closes, and a pool with a connected shim is in use, so the per-user
    /// broker does not reap it.
    async fn hold_session(self: Arc<Self>) {
        let held = tokio::select! {
            l = self.backend.hold_session(&self.session) => l,
            _ = self.relaying.cancelled() => return,
        };
        let mut lines = match held {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!("cannot hold the session at the broker: {e}");
                return;
            }
        };
        loop {
            tokio::select! {
                m = lines.next() => if m.is_none() { return },
                _ = self.relaying.cancelled() => return,
            }
        }
    }

    /// The capabilities the host declared at `initialize`.
    fn host_capabilities(&self) -> Value {
        lock(&self.host).capabilities.clone()
    }

    /// What the host said at `initialize` (for a stateless server's `_meta`).
    fn host_meta(&self) -> (Value, Value) {
        let h = lock(&self.host);
        (h.capabilities.clone(), h.client_info.clone())
    }

    /// Records a server→client request forwarded to the host; returns the id
    /// the host sees.
    fn add_ask(&self, lease: &str, id: Value) -> Value {
        let n = self.next_ask.fetch_add(1, Ordering::Relaxed);
        let shim_id = json!(n);
        lock(&self.asks).insert(
            jsonrpc::key_of(&shim_id),
            Ask {
                lease: lease.to_string(),
                id,
            },
        );
        shim_id
    }

    fn take_ask(&self, id: &Value) -> Option<Ask> {
        lock(&self.asks).remove(&jsonrpc::key_of(id))
    }

    /// Forgets the server requests of a finished lease.
    fn forget_asks(&self, lease: &str) {
        lock(&self.asks).retain(|_, a| a.lease != lease);
    }

    /// Sends a host answer into a lease, in the background, bounded.
    fn deliver(self: &Arc<Self>, lease: String, msg: Value) {
        let shim = self.clone();
        self.tasks.spawn(async move {
            match tokio::time::timeout(CALL_WAIT, shim.backend.deliver(&lease, &msg)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!("answer not delivered to lease {lease}: {e}"),
                Err(_) => tracing::debug!("answer to lease {lease} not delivered in time"),
            }
        });
    }

    /// Writes the pool's notifications not tied to a request (for this
    /// session's process in exclusive pools) to the host until stop.
    async fn relay_notifications(self: Arc<Self>) {
        let mut lines = tokio::select! {
            l = self.backend.notifications(self.lease_session()) => match l {
                Ok(l) => l,
                Err(e) => {
                    tracing::debug!("no notification stream from the broker: {e}");
                    return;
                }
            },
            _ = self.relaying.cancelled() => return,
        };
        loop {
            tokio::select! {
                m = lines.next() => match m {
                    Some(Ok(msg)) if msg.get("id").is_none() && msg.get("method").is_some() => {
                        self.out.send(msg).await;
                    }
                    Some(_) => {}
                    None => return,
                },
                _ = self.relaying.cancelled() => return,
            }
        }
    }

    /// Cancels everything in flight, waits (bounded) for it to settle, and
    /// ends the session at the broker.
    async fn stop(&self, why: &Ended) {
        self.relaying.cancel();
        let reason = match why {
            Ended::Eof => "the host closed the connection",
            Ended::Signal => "mcp-broker connect is shutting down",
            Ended::ReadError(_) => "mcp-broker connect cannot read from the host",
        };
        let entries: Vec<Arc<InFlight>> = lock(&self.inflight).values().cloned().collect();
        for e in &entries {
            e.cancel(jsonrpc::notification(
                "notifications/cancelled",
                json!({"reason": reason}),
            ));
        }
        // Held leases end with their streams (the broker cancels them).
        lock(&self.held).clear();
        self.tasks.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::debug!("in-flight requests did not settle in time");
        }
        if tokio::time::timeout(END_SESSION_WAIT, self.backend.end_session(&self.session))
            .await
            .is_err()
        {
            tracing::debug!("the broker did not end the session in time");
        }
    }
}
