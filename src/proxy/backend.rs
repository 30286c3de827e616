//! The proxy's client for the broker's lease API (HTTP/1.1 over the Unix
//! socket, kept-alive connections from [`uds`]; or a broker in this process,
//! see [`link`]).
//!
//! Connection failures are retried with backoff for a bounded time: a failed
//! connect means no byte reached the broker, so even a `tools/call` is safe
//! to retry, and a broker restart costs clients latency rather than errors.
//! Anything after the connect is never retried here.

mod lines;
mod link;
mod token;
mod uds;

use crate::config::Mode;
use crate::jsonrpc::{self, codes};
pub use crate::lease_api::new_lease_id;
use crate::lease_api::{self, PoolDescription, LEASE_NAME, MODE_NAME, SESSION_NAME};
use crate::metrics::Metrics;
use crate::protocol::Era;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
pub use lines::Lines;
use link::{ApiBody, Link};
use serde_json::Value;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
pub use token::TokenFile;

/// How long connect failures are retried before the request fails.
const CONNECT_RETRY_FOR: Duration = Duration::from_secs(5);
/// Sends of one request on connections the broker closed under it, at most.
const MAX_RESENDS: u32 = 3;
/// First retry delay; doubles up to [`CONNECT_RETRY_MAX`].
const CONNECT_RETRY_BASE: Duration = Duration::from_millis(50);
const CONNECT_RETRY_MAX: Duration = Duration::from_millis(800);
/// How long a fetched pool description is reused.
const POOL_INFO_TTL: Duration = Duration::from_secs(5);
/// Longest time for non-streaming API calls.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Failures talking to the broker.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    #[error("the broker at {socket} is unreachable: {reason}")]
    Unreachable { socket: String, reason: String },
    #[error("the broker answered {status}: {body}")]
    Status { status: StatusCode, body: String },
    #[error("the broker's answer was malformed: {0}")]
    Malformed(String),
    #[error("pool {0:?} has no warm process yet")]
    NotWarm(String),
    /// The pool cannot serve what the caller asked for (a shim's `--mode`).
    #[error("{0}")]
    Unsupported(String),
}

/// What the proxy needs to know about its pool: the parts of its
/// [`PoolDescription`] a warm pool has.
#[derive(Debug, Clone)]
pub struct PoolInfo {
    /// How the pool shares processes between sessions that name no mode.
    pub mode: Mode,
    /// Every mode a session may name, `mode` first.
    pub modes: Vec<Mode>,
    /// The era the pool's server speaks.
    pub era: Era,
    /// The version the server settled on at warm-up.
    pub protocol_version: String,
    /// The server's InitializeResult or DiscoverResult.
    pub result: Value,
}

/// A started lease: the broker's status and its message stream.
pub struct Lease {
    /// HTTP status of the lease API answer (200 when a process took it).
    pub status: StatusCode,
    /// `Retry-After` from the broker, if any.
    pub retry_after: Option<String>,
    /// Token for answers and cancellation, when a process took the request.
    pub token: Option<String>,
    /// The messages, the response last.
    pub lines: Lines,
}

/// The pool description and when it was fetched.
type CachedInfo = Option<(Instant, Arc<PoolInfo>)>;

/// A cheap-to-clone handle on the broker.
#[derive(Clone)]
pub struct Backend {
    link: Link,
    socket: PathBuf,
    pool: String,
    max_message: usize,
    info: Arc<Mutex<CachedInfo>>,
    metrics: Arc<Metrics>,
    token: Option<Arc<TokenFile>>,
    /// The mode named with every session ([`lease_api::MODE_HEADER`]).
    mode: Option<Mode>,
    /// Where messages go, parsed once (not per request); a pool name that
    /// makes no valid path fails every call, as it would parsed each time.
    messages: Result<http::Uri, String>,
}

/// A lease API path, or one parsed already.
trait AsPath {
    fn uri(self) -> Result<http::Uri, BackendError>;
}

impl AsPath for &str {
    fn uri(self) -> Result<http::Uri, BackendError> {
        http::Uri::try_from(self).map_err(|e| BackendError::Malformed(e.to_string()))
    }
}

impl AsPath for &String {
    fn uri(self) -> Result<http::Uri, BackendError> {
        self.as_str().uri()
    }
}

impl AsPath for &Result<http::Uri, String> {
    fn uri(self) -> Result<http::Uri, BackendError> {
        self.clone().map_err(BackendError::Malformed)
    }
}

impl Backend {
    /// A client for pool `pool` of the broker on `socket`.
    pub fn new(socket: PathBuf, pool: String, max_message: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            link: Link::Socket(uds::UdsClient::new(socket.clone())),
            socket,
            messages: http::Uri::try_from(lease_api::messages_path(&pool))
                .map_err(|e| e.to_string()),
            pool,
            max_message,
            info: Arc::new(Mutex::new(None)),
            metrics,
            token: None,
            mode: None,
        }
    }

    /// Presents the token in `path` (`Authorization: Bearer`) on every call.
    pub fn with_token_file(mut self, path: PathBuf) -> Self {
        self.token = Some(Arc::new(TokenFile::new(path)));
        self
    }

    /// Names `mode` as the mode of every session this client sends.
    pub fn with_mode(mut self, mode: Mode) -> Self {
        self.mode = Some(mode);
        self
    }

    /// Calls `broker`, in this process, instead of the socket.
    pub fn with_local(mut self, broker: Arc<dyn crate::lease_api::LocalApi>) -> Self {
        self.link = Link::Local(broker);
        self
    }

    /// The pool name.
    pub fn pool(&self) -> &str {
        &self.pool
    }

    async fn send(
        &self,
        method: Method,
        path: impl AsPath,
        session: Option<&str>,
        lease: Option<&str>,
        body: Bytes,
    ) -> Result<http::Response<ApiBody>, BackendError> {
        let uri = path.uri()?;
        let started = Instant::now();
        let mut delay = CONNECT_RETRY_BASE;
        let mut resent = 0;
        loop {
            let mut req = Request::builder()
                .method(method.clone())
                .uri(uri.clone())
                .header(http::header::HOST, HeaderValue::from_static("localhost"));
            if let Some(s) = session {
                req = req.header(&SESSION_NAME, s);
                if let Some(m) = self.mode {
                    req = req.header(&MODE_NAME, HeaderValue::from_static(m.as_str()));
                }
            }
            if let Some(l) = lease {
                req = req.header(&LEASE_NAME, l);
            }
            if let Some(t) = self.token.as_ref().and_then(|t| t.get()) {
                req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
            }
            if !body.is_empty() {
                req = req.header(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
            }
            let req = req
                .body(Full::new(body.clone()))
                .map_err(|e| BackendError::Malformed(e.to_string()))?;
            match self.link.request(req).await {
                Ok(r) => return Ok(r),
                Err(e) if e.is_connect() && started.elapsed() < CONNECT_RETRY_FOR => {
                    self.metrics
                        .broker_errors
                        .with_label_values(&["connect_retry"])
                        .inc();
                    self.metrics
                        .broker_reconnects
                        .with_label_values(&[&self.pool])
                        .inc();
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(CONNECT_RETRY_MAX);
                }
                // A kept-alive connection the broker closed (an upgrade
                // closes idle ones) just as this request went out: no
                // response head came, so no lease began; sending it again
                // (on another connection) is safe.
                Err(e) if resent < MAX_RESENDS && e.is_unsent() => {
                    resent += 1;
                    self.metrics
                        .broker_errors
                        .with_label_values(&["resent"])
                        .inc();
                }
                Err(e) => {
                    self.metrics
                        .broker_errors
                        .with_label_values(&["unreachable"])
                        .inc();
                    return Err(BackendError::Unreachable {
                        socket: self.socket.display().to_string(),
                        reason: error_chain(&e),
                    });
                }
            }
        }
    }

    async fn get_json(&self, path: &str) -> Result<Value, BackendError> {
        self.call_json(Method::GET, path, Bytes::new()).await
    }

    /// Asks the per-user broker for the on-demand pool of `req` (creating
    /// it on first use); refused by any other broker.
    pub async fn on_demand_pool(
        &self,
        req: &lease_api::OnDemandRequest,
    ) -> Result<lease_api::OnDemandPool, BackendError> {
        let body = serde_json::to_vec(req).map_err(|e| BackendError::Malformed(e.to_string()))?;
        let v = self
            .call_json(Method::POST, lease_api::ON_DEMAND_PATH, Bytes::from(body))
            .await?;
        serde_json::from_value(v).map_err(|e| BackendError::Malformed(e.to_string()))
    }

    /// One call with a JSON answer, bounded by [`CALL_TIMEOUT`].
    async fn call_json(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<Value, BackendError> {
        let fut = async {
            let r = self.send(method, path, None, None, body).await?;
            let status = r.status();
            let body = http_body_util::Limited::new(r.into_body(), self.max_message)
                .collect()
                .await
                .map_err(|e| BackendError::Malformed(e.to_string()))?
                .to_bytes();
            if !status.is_success() {
                return Err(BackendError::Status {
                    status,
                    body: String::from_utf8_lossy(&body).into_owned(),
                });
            }
            serde_json::from_slice(&body).map_err(|e| BackendError::Malformed(e.to_string()))
        };
        tokio::time::timeout(CALL_TIMEOUT, fut)
            .await
            .unwrap_or_else(|_| {
                Err(BackendError::Malformed(
                    "the broker did not answer in time".into(),
                ))
            })
    }

    /// The pool's description and cached handshake (fetched at most every
    /// few seconds). Fails with [`BackendError::NotWarm`] before the first
    /// process finished warming. Shared, not copied: every client request
    /// reads it.
    pub async fn pool_info(&self) -> Result<Arc<PoolInfo>, BackendError> {
        if let Some((at, info)) = self.info.lock().expect("lock").as_ref() {
            if at.elapsed() < POOL_INFO_TTL {
                return Ok(info.clone());
            }
        }
        let v = self.get_json(&lease_api::pool_path(&self.pool)).await?;
        let d: PoolDescription = serde_json::from_value(v)
            .map_err(|e| BackendError::Malformed(format!("pool description: {e}")))?;
        let Some(hs) = d.handshake else {
            return Err(BackendError::NotWarm(self.pool.clone()));
        };
        // A broker that predates `modes` serves sessions in its `mode` only.
        let modes = if d.modes.is_empty() {
            vec![d.mode]
        } else {
            d.modes
        };
        let info = Arc::new(PoolInfo {
            mode: d.mode,
            modes,
            era: hs.era,
            protocol_version: hs.protocol_version,
            result: hs.result,
        });
        *self.info.lock().expect("lock") = Some((Instant::now(), info.clone()));
        Ok(info)
    }

    /// [`Self::pool_info`], waiting up to `wait` for the pool to warm.
    pub async fn pool_info_wait(&self, wait: Duration) -> Result<Arc<PoolInfo>, BackendError> {
        let deadline = Instant::now() + wait;
        loop {
            match self.pool_info().await {
                Err(BackendError::NotWarm(_)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                other => return other,
            }
        }
    }

    /// Submits one message; for a request, the lease streams its messages.
    /// `id` (from [`new_lease_id`]) names the lease before the broker
    /// answers, so the client can cancel it while it waits or runs.
    pub async fn lease(
        &self,
        msg: &Value,
        session: Option<&str>,
        id: &str,
    ) -> Result<Lease, BackendError> {
        let body = Bytes::from(serde_json::to_vec(msg).expect("Value serializes"));
        self.lease_text(body, session, id).await
    }

    /// [`Backend::lease`] for a message already serialized.
    pub async fn lease_text(
        &self,
        body: Bytes,
        session: Option<&str>,
        id: &str,
    ) -> Result<Lease, BackendError> {
        let r = self
            .send(Method::POST, &self.messages, session, Some(id), body)
            .await?;
        let header = |name: &http::HeaderName| {
            r.headers()
                .get(name)
                .and_then(|v: &http::HeaderValue| v.to_str().ok())
                .map(str::to_string)
        };
        Ok(Lease {
            status: r.status(),
            token: header(&LEASE_NAME),
            retry_after: header(&http::header::RETRY_AFTER),
            lines: self.lines(r.into_body()),
        })
    }

    /// Submits a client notification to the pool (`202`: forwarded to the
    /// session's process in exclusive pools, else dropped by the broker).
    /// Bounded by the call timeout.
    pub async fn notify(&self, msg: &Value, session: Option<&str>) -> Result<(), BackendError> {
        let body = Bytes::from(serde_json::to_vec(msg).expect("Value serializes"));
        let fut = async {
            let r = self
                .send(Method::POST, &self.messages, session, None, body)
                .await?;
            let status = r.status();
            let body = http_body_util::Limited::new(r.into_body(), self.max_message)
                .collect()
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                .unwrap_or_default();
            if status == StatusCode::ACCEPTED {
                Ok(())
            } else {
                Err(BackendError::Status { status, body })
            }
        };
        tokio::time::timeout(CALL_TIMEOUT, fut)
            .await
            .unwrap_or_else(|_| {
                Err(BackendError::Malformed(
                    "the broker did not answer in time".into(),
                ))
            })
    }

    fn lines(&self, body: ApiBody) -> Lines {
        Lines::new(body, self.max_message + 1024)
    }

    /// Sends a client's answer or notification into a lease.
    pub async fn deliver(&self, token: &str, msg: &Value) -> Result<(), BackendError> {
        let body = Bytes::from(serde_json::to_vec(msg).expect("Value serializes"));
        let r = self
            .send(
                Method::POST,
                &lease_api::lease_path(token),
                None,
                None,
                body,
            )
            .await?;
        let status = r.status();
        let _ = r.into_body().collect().await;
        if status.is_success() {
            Ok(())
        } else {
            Err(BackendError::Status {
                status,
                body: "lease gone".into(),
            })
        }
    }

    /// Ends a session at the broker (exclusive processes are discarded).
    pub async fn end_session(&self, session: &str) {
        let path = lease_api::session_path(&self.pool, session);
        if let Ok(r) = self
            .send(Method::DELETE, &path, None, None, Bytes::new())
            .await
        {
            let _ = r.into_body().collect().await;
        }
    }

    /// The pool's stream of server notifications not tied to a request.
    pub async fn notifications(&self, session: Option<&str>) -> Result<Lines, BackendError> {
        self.events(lease_api::notifications_path(&self.pool), session)
            .await
    }

    /// The same stream, holding `session`: the broker ends the session when
    /// it closes (this process exited, however it did).
    pub async fn hold_session(&self, session: &str) -> Result<Lines, BackendError> {
        let path = format!(
            "{}?{}",
            lease_api::notifications_path(&self.pool),
            lease_api::HOLD_QUERY
        );
        self.events(path, Some(session)).await
    }

    async fn events(&self, path: String, session: Option<&str>) -> Result<Lines, BackendError> {
        let r = self
            .send(Method::GET, &path, session, None, Bytes::new())
            .await?;
        if !r.status().is_success() {
            return Err(BackendError::Status {
                status: r.status(),
                body: String::new(),
            });
        }
        Ok(self.lines(r.into_body()))
    }

    /// True when the broker answers and the pool has a warm process.
    pub async fn ready(&self) -> Result<(), BackendError> {
        *self.info.lock().expect("lock") = None;
        self.pool_info().await.map(|_| ())
    }
}

/// A JSON-RPC error for request `id` describing a backend failure.
pub fn error_response(id: Value, e: &BackendError) -> Value {
    let code = match e {
        BackendError::Unreachable { .. } | BackendError::NotWarm(_) => codes::BROKER_UNAVAILABLE,
        BackendError::Unsupported(_) => codes::INVALID_REQUEST,
        _ => codes::INTERNAL_ERROR,
    };
    jsonrpc::error(id, code, e.to_string())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
