//! The thin proxy: MCP Streamable HTTP at `/mcp` for clients of either
//! protocol era, each request leased from the broker over its Unix socket.
//!
//! The proxy holds no server process. It answers `initialize`,
//! `server/discover` and `ping` itself from the pool's cached handshake, and
//! turns every other request into one lease ([`forward`]). Era-specific rules
//! live in [`legacy`] and [`modern`]; the lease → HTTP answer logic in
//! [`flow`]; every HTTP error in [`error`]. Shutdown stops accepting, lets
//! in-flight exchanges finish (bounded), and ends open streams.

pub mod ask;
pub mod backend;
mod checks;
pub mod cli;
pub mod error;
pub mod flow;
mod forward;
pub mod held;
pub mod legacy;
pub mod modern;
pub mod notifications;
pub mod session;
pub mod sse;

use crate::metrics::Metrics;
use crate::web::{self, Body};
use ::http::{header, HeaderMap, Method, Request, Response, StatusCode};
use backend::Backend;
use error::ProxyError;
pub use forward::{forward, Outbound};
use hyper::body::Incoming;
use serde_json::{json, Value};
use session::{Session, Sessions};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Default MCP listen address: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default cap on open sessions.
pub const DEFAULT_MAX_SESSIONS: usize = 10_000;
/// Default idle time after which a session is forgotten.
pub const DEFAULT_SESSION_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default largest request body.
pub const DEFAULT_MAX_BODY: usize = crate::config::DEFAULT_MAX_MESSAGE_SIZE;
/// Default largest request head (request line plus headers); beyond it the
/// client gets `431 Request Header Fields Too Large`.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// Default cap on open notification streams (`GET /mcp` and
/// `subscriptions/listen`) in all.
pub const DEFAULT_MAX_STREAMS: usize = 1024;
/// Default cap on open `GET /mcp` streams of one session.
pub const DEFAULT_MAX_STREAMS_PER_SESSION: usize = 4;
/// Default cap on open HTTP connections in all.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Default cap on open HTTP connections from one client address.
pub const DEFAULT_MAX_CONNECTIONS_PER_PEER: usize = 1024;
/// Default time a request waits for the pool's first warm process.
pub const DEFAULT_WARM_WAIT: Duration = Duration::from_secs(30);
/// Default time in-flight exchanges get to finish at shutdown.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How often idle sessions and expired held leases are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// Proxy settings.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// Where to serve MCP.
    pub listen: SocketAddr,
    /// The broker's lease API socket.
    pub socket: PathBuf,
    /// A broker in this process (`mcp-broker up`): called directly instead
    /// of over `socket`.
    pub local: Option<Arc<dyn crate::lease_api::LocalApi>>,
    /// The pool to lease from.
    pub pool: String,
    /// `Origin` values allowed besides localhost ones.
    pub allow_origins: Vec<String>,
    /// Open sessions at most.
    pub max_sessions: usize,
    /// Sessions idle this long are forgotten.
    pub session_idle_timeout: Duration,
    /// Largest request body.
    pub max_body: usize,
    /// Largest request head (at least 8192, hyper's minimum).
    pub max_header_bytes: usize,
    /// How long a request waits for the pool to warm.
    pub warm_wait: Duration,
    /// How long shutdown waits for in-flight exchanges.
    pub drain_timeout: Duration,
    /// A projected ServiceAccount token presented to the broker.
    pub token_file: Option<PathBuf>,
    /// `Host` values accepted besides localhost (on a loopback listener);
    /// on other listeners, when given, the only ones accepted.
    pub allow_hosts: Vec<String>,
    /// Open notification streams at most, in all.
    pub max_streams: usize,
    /// Open `GET /mcp` streams of one session at most.
    pub max_streams_per_session: usize,
    /// Open HTTP connections at most (beyond: `503`, closed).
    pub max_connections: usize,
    /// A request head must be complete within this of connecting or of the
    /// previous answer (so idle kept-alive connections close too).
    pub header_timeout: Duration,
    /// Open HTTP connections from one client address at most (beyond:
    /// `429`, closed).
    pub max_connections_per_peer: usize,
}

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.parse().expect("valid default"),
            socket: PathBuf::from(crate::config::DEFAULT_SOCKET),
            local: None,
            pool: String::new(),
            allow_origins: Vec::new(),
            max_sessions: DEFAULT_MAX_SESSIONS,
            session_idle_timeout: DEFAULT_SESSION_IDLE_TIMEOUT,
            max_body: DEFAULT_MAX_BODY,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            warm_wait: DEFAULT_WARM_WAIT,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            allow_hosts: Vec::new(),
            max_streams: DEFAULT_MAX_STREAMS,
            max_streams_per_session: DEFAULT_MAX_STREAMS_PER_SESSION,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_timeout: web::HEADER_READ_TIMEOUT,
            max_connections_per_peer: DEFAULT_MAX_CONNECTIONS_PER_PEER,
            token_file: None,
        }
    }
}

/// Shared proxy state.
pub struct Proxy {
    pub settings: ProxySettings,
    pub backend: Backend,
    pub sessions: Sessions,
    pub held: held::Held,
    pub metrics: Arc<Metrics>,
    pub tracker: TaskTracker,
    pub shutdown: CancellationToken,
    /// Notification streams open now (bounded by `max_streams`).
    pub streams: Arc<std::sync::atomic::AtomicUsize>,
}

/// Serves until `shutdown`, then drains.
pub async fn run(
    settings: ProxySettings,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let pool = settings.pool.clone();
    run_many(settings, vec![pool], metrics, shutdown).await
}

/// Serves every pool in `pools` on one listener until `shutdown`: each at
/// `/servers/NAME/mcp`, and at `/mcp` when there is exactly one; `GET
/// /servers` lists them.
pub async fn run_many(
    settings: ProxySettings,
    pools: Vec<String>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", settings.listen))?;
    match pools.as_slice() {
        [one] => {
            tracing::info!(listen = %settings.listen, pool = %one, socket = %settings.socket.display(), "proxy serving MCP at /mcp")
        }
        _ => {
            tracing::info!(listen = %settings.listen, pools = ?pools, socket = %settings.socket.display(), "proxy serving MCP at /servers/NAME/mcp")
        }
    }
    serve_many(listener, settings, pools, metrics, shutdown).await;
    Ok(())
}

/// Serves on an already bound listener (tests bind port 0).
pub async fn serve(
    listener: tokio::net::TcpListener,
    settings: ProxySettings,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let pool = settings.pool.clone();
    serve_many(listener, settings, vec![pool], metrics, shutdown).await
}

/// The pools one listener serves, by name.
pub struct Gateway {
    proxies: std::collections::BTreeMap<String, Arc<Proxy>>,
    metrics: Arc<Metrics>,
}

/// [`serve`] for several pools of one broker.
pub async fn serve_many(
    listener: tokio::net::TcpListener,
    settings: ProxySettings,
    pools: Vec<String>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let proxies = pools
        .into_iter()
        .map(|pool| {
            let settings = ProxySettings {
                pool: pool.clone(),
                ..settings.clone()
            };
            (
                pool,
                Proxy::start(settings, metrics.clone(), shutdown.clone()),
            )
        })
        .collect();
    let gw = Arc::new(Gateway { proxies, metrics });
    let conns = TaskTracker::new();
    let (limiter, lowered) = web::conn_limit::ConnLimiter::fitted(
        settings.max_connections,
        settings.max_connections_per_peer,
    );
    if let Some(why) = lowered {
        tracing::warn!("MCP listener: {why}");
    }
    web::accept_until(&listener, &shutdown, "MCP", |(stream, peer)| {
        let permit = match limiter.try_acquire(peer.ip()) {
            Ok(p) => p,
            Err(refused) => {
                tracing::debug!(%peer, "MCP connection refused: {refused}");
                conns.spawn(refused.answer(stream));
                return;
            }
        };
        let _ = stream.set_nodelay(true);
        let gw = gw.clone();
        let svc = hyper::service::service_fn(move |req| {
            let gw = gw.clone();
            async move { Ok::<_, std::convert::Infallible>(handle(gw, req).await) }
        });
        let serve = web::serve_io_with(
            stream,
            svc,
            shutdown.clone(),
            settings.max_header_bytes,
            settings.header_timeout,
        );
        conns.spawn(async move {
            serve.await;
            drop(permit);
        });
    })
    .await;
    drop(listener);
    conns.close();
    for p in gw.proxies.values() {
        p.tracker.close();
    }
    let trackers = futures::future::join_all(gw.proxies.values().map(|p| p.tracker.wait()));
    if tokio::time::timeout(settings.drain_timeout, async {
        tokio::join!(conns.wait(), trackers)
    })
    .await
    .is_err()
    {
        tracing::warn!("proxy drain timeout: closing remaining streams");
    }
}

async fn sweeper(proxy: Arc<Proxy>) {
    loop {
        tokio::select! {
            _ = proxy.shutdown.cancelled() => return,
            _ = tokio::time::sleep(SWEEP_EVERY) => {}
        }
        for s in proxy.sessions.sweep() {
            tracing::debug!(session = %s.id, "session idle; ending it");
            proxy.finish_session(&s).await;
        }
        proxy.held.sweep();
    }
}

impl Proxy {
    /// The proxy of one pool, with its session sweeper running.
    pub fn start(
        settings: ProxySettings,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Arc<Proxy> {
        let mut backend = Backend::new(
            settings.socket.clone(),
            settings.pool.clone(),
            settings.max_body,
            metrics.clone(),
        );
        if let Some(path) = &settings.token_file {
            backend = backend.with_token_file(path.clone());
        }
        if let Some(local) = &settings.local {
            backend = backend.with_local(local.clone());
        }
        let proxy = Arc::new(Proxy {
            sessions: Sessions::new(settings.max_sessions, settings.session_idle_timeout),
            held: held::Held::new(held::DEFAULT_MAX_HELD, held::DEFAULT_HOLD_TIMEOUT),
            backend,
            settings,
            metrics,
            tracker: TaskTracker::new(),
            shutdown,
            streams: Arc::default(),
        });
        proxy.tracker.spawn(sweeper(proxy.clone()));
        proxy
    }

    /// Ends a session here and at the broker.
    pub async fn end_session(&self, s: &Session) {
        if self.sessions.remove(&s.id).is_some() {
            self.finish_session(s).await;
        }
    }

    async fn finish_session(&self, s: &Session) {
        self.metrics
            .sessions
            .with_label_values(&[self.backend.pool()])
            .dec();
        self.backend.end_session(&s.id).await;
    }
}

async fn handle(gw: Arc<Gateway>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let pool = path
        .strip_prefix("/servers/")
        .and_then(|rest| rest.strip_suffix("/mcp"))
        .filter(|name| !name.contains('/'));
    let only = match gw.proxies.values().collect::<Vec<_>>().as_slice() {
        [one] => Some((*one).clone()),
        _ => None,
    };
    let r = match (path.as_str(), pool) {
        (_, Some(name)) => match gw.proxies.get(name) {
            Some(p) => mcp(p, req).await,
            None => ProxyError::NotFound.into_response(Value::Null),
        },
        ("/mcp", None) => match &only {
            Some(p) => mcp(p, req).await,
            None => ProxyError::NotFound.into_response(Value::Null),
        },
        ("/servers", None) if method == Method::GET => {
            let list: Vec<Value> = gw
                .proxies
                .keys()
                .map(|name| json!({"name": name, "path": format!("/servers/{name}/mcp")}))
                .collect();
            web::json(StatusCode::OK, &Value::Array(list))
        }
        ("/livez", None) => web::text(StatusCode::OK, "ok\n"),
        ("/readyz", None) => {
            let mut cold = Vec::new();
            for (name, p) in &gw.proxies {
                if let Err(e) = p.backend.ready().await {
                    cold.push(format!("{name}: {e}"));
                }
            }
            if cold.is_empty() {
                web::text(StatusCode::OK, "ready\n")
            } else {
                web::text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {}\n", cold.join("; ")),
                )
            }
        }
        ("/metrics", None) => web::response(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            web::full(gw.metrics.render()),
        ),
        _ => ProxyError::NotFound.into_response(Value::Null),
    };
    gw.metrics
        .http_requests
        .with_label_values(&[http_method_label(&method), r.status().as_str()])
        .inc();
    r
}

/// The metric label of an HTTP method: the methods MCP uses, else `other`,
/// so a client cannot mint label values (series) at will.
fn http_method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::HEAD => "HEAD",
        _ => "other",
    }
}

async fn mcp(proxy: &Arc<Proxy>, req: Request<Incoming>) -> Response<Body> {
    if let Err(e) = checks::origin_and_host(&proxy.settings, req.headers()) {
        return e.into_response(Value::Null);
    }
    let accept = checks::accept_of(req.headers());
    match *req.method() {
        Method::POST => {}
        Method::GET => {
            if legacy_headers(req.headers()) {
                return notifications::get(proxy, req.headers(), accept.sse).await;
            }
            return ProxyError::MethodNotAllowed.into_response(Value::Null);
        }
        Method::DELETE => {
            if legacy_headers(req.headers()) {
                return legacy::delete(proxy, req.headers()).await;
            }
            return ProxyError::MethodNotAllowed.into_response(Value::Null);
        }
        _ => return ProxyError::MethodNotAllowed.into_response(Value::Null),
    }
    if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
        if !ct
            .to_str()
            .unwrap_or("")
            .trim_start()
            .starts_with("application/json")
        {
            return ProxyError::UnsupportedMediaType.into_response(Value::Null);
        }
    }
    if !accept.json && !accept.sse {
        return ProxyError::NotAcceptable(
            "Accept must include application/json or text/event-stream",
        )
        .into_response(Value::Null);
    }
    let (parts, body) = req.into_parts();
    let bytes = match web::read_body(body, proxy.settings.max_body).await {
        Ok(b) => b,
        Err(web::BodyError::TooLarge { limit }) => {
            proxy
                .metrics
                .rejections
                .with_label_values(&[proxy.backend.pool(), "too_large"])
                .inc();
            return ProxyError::TooLarge(limit).into_response(Value::Null);
        }
        Err(e) => return ProxyError::Invalid(e.to_string()).into_response(Value::Null),
    };
    // The common case first: a handshake-era client's plain request goes
    // to the broker as the bytes it came in.
    if let Some(r) = legacy::post_plain(proxy, &parts.headers, &bytes, accept).await {
        return r;
    }
    let msg: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => return ProxyError::Parse(e.to_string()).into_response(Value::Null),
    };
    if msg.is_array() {
        return ProxyError::Invalid(
            "JSON-RPC batches are not supported; send one message per POST".into(),
        )
        .into_response(Value::Null);
    }
    if modern::is_modern(&parts.headers, &msg) {
        modern::post(proxy, &parts.headers, msg, accept).await
    } else {
        legacy::post(proxy, &parts.headers, msg, accept).await
    }
}

/// GET and DELETE belong to sessions; a stateless client gets 405.
fn legacy_headers(h: &HeaderMap) -> bool {
    h.get(legacy::SESSION_ID).is_some()
        && h.get("mcp-protocol-version").and_then(|v| v.to_str().ok())
            != Some(crate::protocol::STATELESS_VERSION)
}
