//! The lease API: HTTP/1.1 on the broker's Unix socket.
//!
//! The contract itself (paths, headers, descriptions, error codes) is
//! [`crate::lease_api`]; this module serves it. Requests are answered by
//! [`handle`], reached from the broker's own HTTP/1.1 codec
//! (`broker::conn`) or, for rarer request shapes, from hyper.

use super::{lease, Broker};
use crate::policy::Identity;
use crate::pool::Pool;
use crate::web::{self, Body};
use ::http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Value};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

mod head;
mod submit;

use head::{lease_id_of, Session};
use submit::{read_json, read_message, reject, submit, Submitted};

pub use super::error::ApiError;

/// Serves the rest of a connection with hyper (request shapes the lease
/// API's own codec leaves alone, see `broker::conn`).
pub(super) async fn serve_hyper<I>(
    broker: Arc<Broker>,
    io: I,
    peer: Identity,
    shutdown: CancellationToken,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let header_timeout = broker.settings().front_door.header_timeout;
    let svc = hyper::service::service_fn(move |req| {
        let broker = broker.clone();
        let peer = peer.clone();
        async move {
            // hyper reads a body only when asked: admit before handle reads it.
            let r = match admit(&broker, &req, peer).await {
                Ok(who) => handle(broker, req, who).await,
                Err(e) => e.into_response(Value::Null),
            };
            Ok::<_, std::convert::Infallible>(r)
        }
    });
    web::serve_io_with(io, svc, shutdown, MAX_HEADER_BYTES, header_timeout).await
}

/// The answer to a request whose body is announced over `limit` (refused
/// unread): `413`, counted as a rejection when it was sent to a pool.
pub(super) fn too_large(
    broker: &Broker,
    path: &str,
    length: usize,
    limit: usize,
) -> Response<Body> {
    let segs = Segments::of(path);
    if let ["v1", "pools", name, "messages"] = segs.as_slice() {
        if broker.pool(name).is_some() {
            reject(broker, name, "too_large");
        }
    }
    ApiError::TooLarge(format!(
        "request body of {length} bytes exceeds the {limit}-byte limit"
    ))
    .into_response(Value::Null)
}

/// The caller of one request: the connection's peer credentials plus the
/// verified ServiceAccount behind a `Bearer` token, if any.
async fn caller<B>(broker: &Broker, req: &Request<B>, mut who: Identity) -> Identity {
    // A pod's CSI socket: the kubelet named the caller; a token or a peer
    // lookup can neither replace nor add to that.
    if who.volume_pod.is_some() {
        return who;
    }
    let token = req
        .headers()
        .get(::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match (token, broker.token_reviewer()) {
        // Boxed: the TokenReview call is a large future, and every queued
        // lease would otherwise carry room for it (~3 KiB each).
        (Some(t), Some(r)) => match r.verify(t).await {
            Ok(k) => who.kube = Some(k),
            Err(e) => who.kube_error = Some(e),
        },
        (Some(_), None) => {
            who.kube_error = Some("this broker does not verify tokens (identity = \"none\")".into())
        }
        (None, _) => {}
    }
    // The pod the peer was in at accept: its labels, and its identity when no
    // token named one (a token naming another account wins, without labels).
    if let Some(pod) = broker
        .pod_index()
        .and_then(|i| who.pod_uid.as_deref().and_then(|u| i.by_uid(u)))
    {
        match &who.kube {
            None => {
                who.kube = Some(pod.kube);
                who.pod_labels = Some(pod.labels);
            }
            Some(k) if *k == pod.kube => who.pod_labels = Some(pod.labels),
            Some(_) => {}
        }
    }
    who
}

/// The pool `who` gets for `name`: policy checked, tenant pool when isolated.
fn resolve(broker: &Broker, name: &str, who: &Identity) -> Result<Pool, ApiError> {
    let base = broker
        .pool(name)
        .ok_or_else(|| ApiError::UnknownPool(name.to_string()))?;
    let cfg = base.config();
    let deny = |why: String| {
        broker
            .metrics()
            .policy_denials
            .with_label_values(&[name])
            .inc();
        tracing::info!(pool = name, caller = %who, "lease denied: {why}");
        ApiError::NotAllowed(why)
    };
    if !crate::policy::allowed(cfg.allow.as_deref(), who) {
        return Err(deny(format!("{who} may not use pool {name:?}")));
    }
    if let Some(pod) = who.volume_pod.as_ref().filter(|p| !p.permits(name)) {
        let listed: Vec<&str> = pod.pools.iter().flatten().map(String::as_str).collect();
        return Err(deny(format!(
            "{who}: its CSI volume allows only pools {listed:?}, not {name:?}"
        )));
    }
    match cfg.isolate.tenant(who) {
        Ok(None) => Ok(base),
        Ok(Some(t)) => broker.tenant_pool(&base, &t).map_err(ApiError::Process),
        Err(why) => Err(deny(format!("pool {name:?}: {why} ({who})"))),
    }
}

/// Binds `addr` and serves the health endpoints on it ([`serve_health`]).
/// With `retry` (a take-over: the old broker still holds the port until it
/// exits) a failed bind is retried until it succeeds or `shutdown`.
pub async fn bind_and_serve_health(
    broker: Arc<Broker>,
    addr: std::net::SocketAddr,
    retry: bool,
    shutdown: CancellationToken,
) {
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => return serve_health(broker, l, shutdown).await,
            Err(e) if retry && !shutdown.is_cancelled() => {
                tracing::debug!("metrics listener {addr}: {e}; retrying");
                // Bounded by shutdown; the old broker frees the port when it exits.
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(e) => {
                tracing::error!("cannot bind the metrics listener {addr}: {e}");
                return;
            }
        }
    }
}

/// Serves `/livez`, `/readyz` and `/metrics` (only those: the lease API is
/// never reachable over TCP) on `listener` until `shutdown`.
pub async fn serve_health(
    broker: Arc<Broker>,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) {
    let limiter = web::conn_limit::ConnLimiter::new(
        web::HEALTH_MAX_CONNECTIONS,
        web::HEALTH_MAX_CONNECTIONS_PER_PEER,
    );
    web::accept_until(&listener, &shutdown, "metrics", |(stream, peer)| {
        let permit = match limiter.try_acquire(peer.ip()) {
            Ok(p) => p,
            Err(refused) => {
                tokio::spawn(refused.answer(stream));
                return;
            }
        };
        let broker = broker.clone();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let broker = broker.clone();
            async move {
                let r = match (req.method(), req.uri().path()) {
                    (&Method::GET, "/livez" | "/readyz" | "/metrics") => {
                        handle(broker, req, None).await
                    }
                    _ => ApiError::NotFound.into_response(Value::Null),
                };
                Ok::<_, std::convert::Infallible>(r)
            }
        });
        let serve = web::serve_io(stream, svc, shutdown.clone(), MAX_HEADER_BYTES);
        tokio::spawn(async move {
            serve.await;
            drop(permit);
        });
    })
    .await;
}

/// Largest request head (request line and headers) the lease API reads.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Decides from a request's head alone (path, headers, the connection's
/// peer), before any body byte is read, whether it may go on: the caller's
/// identity for the routes that need one (`Some`), or the refusal. A
/// message to a pool the caller may not use is refused here, and so is a
/// message to a lease that is not the caller's (not found, as for one that
/// never existed).
pub(super) async fn admit<B>(
    broker: &Broker,
    req: &Request<B>,
    peer: Identity,
) -> Result<Option<Identity>, ApiError> {
    let segs = Segments::of(req.uri().path());
    let parts = segs.as_slice();
    let needs_caller = matches!(
        (req.method(), parts),
        (&Method::POST, ["v1", "pools", _, "messages"])
            | (&Method::POST, ["v1", "leases", _])
            | (&Method::DELETE, ["v1", "pools", _, "sessions", _])
            | (&Method::GET, ["v1", "pools", _, "events"])
    );
    if !needs_caller {
        return Ok(None);
    }
    let who = caller(broker, req, peer).await;
    match (req.method(), parts) {
        (&Method::POST, ["v1", "pools", name, "messages"]) => {
            resolve(broker, name, &who)?;
        }
        (&Method::POST, ["v1", "leases", id]) => {
            let key = lease::scoped(&super::affinity::caller_key(&who), id);
            if !broker.leases.lock().expect("lock").contains_key(&key) {
                return Err(ApiError::UnknownLease(id.to_string()));
            }
        }
        _ => {}
    }
    Ok(Some(who))
}

/// A request path's segments, without allocating: every route has at most
/// five, so a longer path keeps one more (matching no route).
struct Segments<'a> {
    all: [&'a str; MAX_SEGMENTS + 1],
    len: usize,
}

/// The most segments a route has (`/v1/pools/{pool}/sessions/{key}`).
const MAX_SEGMENTS: usize = 5;

impl<'a> Segments<'a> {
    fn of(path: &'a str) -> Self {
        let mut s = Segments {
            all: [""; MAX_SEGMENTS + 1],
            len: 0,
        };
        for (slot, seg) in s.all.iter_mut().zip(path.trim_matches('/').split('/')) {
            *slot = seg;
            s.len += 1;
        }
        s
    }

    fn as_slice(&self) -> &[&'a str] {
        &self.all[..self.len]
    }
}

/// Answers one lease API request (both connection paths end here), once
/// [`admit`] let it through with `who`.
pub(super) async fn handle<B>(
    broker: Arc<Broker>,
    req: Request<B>,
    mut who: Option<Identity>,
) -> Response<Body>
where
    B: web::ReadableBody,
{
    // The path outlives the request (its body is read below): a clone of
    // the URI shares its bytes.
    let uri = req.uri().clone();
    let segs = Segments::of(uri.path());
    let parts = segs.as_slice();
    let method = req.method().clone();
    let result = match (&method, parts) {
        (&Method::GET, ["livez"]) => Ok(web::text(StatusCode::OK, "ok\n")),
        (&Method::GET, ["readyz"]) => Ok(readyz(&broker)),
        (&Method::GET, ["metrics"]) => Ok(web::response(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            web::full(broker.metrics().render()),
        )),
        (&Method::GET, ["v1", "pools"]) => {
            let all: Vec<_> = broker.pools().iter().map(lease::describe).collect();
            Ok(web::json(
                StatusCode::OK,
                &serde_json::to_value(all).expect("serializes"),
            ))
        }
        (&Method::GET, ["v1", "pools", name]) => broker
            .pool(name)
            .map(|p| {
                let d = serde_json::to_value(lease::describe(&p)).expect("serializes");
                web::json(StatusCode::OK, &d)
            })
            .ok_or_else(|| ApiError::UnknownPool(name.to_string())),
        (&Method::POST, ["v1", "pools", name, "messages"]) => {
            let who = who.take().unwrap_or_default();
            let caller = super::affinity::caller_key(&who);
            // Boxed, sized exactly: inline, the copies rustc keeps of async
            // arguments made every waiting connection's task ~2 KiB larger.
            let head = Session::of(req.headers(), &caller)
                .and_then(|s| Ok((s, lease_id_of(req.headers())?)));
            let (session, lease_id) = match head {
                Ok(h) => h,
                Err(e) => return e.into_response(Value::Null),
            };
            let msg = read_message(&broker, req).await;
            let submitted = submit(&broker, name, msg, &who);
            if let Some((pool, id)) = submitted.pool() {
                if let Err(e) = session.join(pool) {
                    return e.into_response(id);
                }
            }
            let session = session.key;
            return match submitted {
                Submitted::Answer(r) => r,
                Submitted::Request {
                    pool,
                    msg,
                    method,
                    id,
                } => {
                    // Boxed and sized exactly: this is the state a waiting
                    // request keeps (inline, every connection's task would
                    // carry room for it, and rustc's copies of its arguments).
                    let run =
                        lease::run(broker.clone(), pool, session, msg, method, lease_id, caller);
                    match Box::pin(run).await {
                        Ok(r) => r,
                        Err(e) => e.into_response(id),
                    }
                }
                Submitted::Notification { pool, msg } => {
                    // Boxed (like `deliver`): rare, and its write future is large.
                    Box::pin(lease::notify(&pool, session.as_deref(), msg)).await;
                    web::response(StatusCode::ACCEPTED, "text/plain", web::empty())
                }
            };
        }
        // Boxed: a rare path whose write future would make every waiting
        // request's state larger.
        (&Method::POST, ["v1", "leases", id]) => {
            let caller = super::affinity::caller_key(&who.take().unwrap_or_default());
            Box::pin(deliver(&broker, &caller, id.to_string(), req)).await
        }
        (&Method::DELETE, ["v1", "pools", name, "sessions", session]) => {
            let who = who.take().unwrap_or_default();
            let session = lease::scoped(&super::affinity::caller_key(&who), session);
            resolve(&broker, name, &who).map(|p| {
                p.end_session(&session);
                web::response(StatusCode::NO_CONTENT, "text/plain", web::empty())
            })
        }
        (&Method::GET, ["v1", "pools", name, "events"]) => {
            let who = who.take().unwrap_or_default();
            let caller = super::affinity::caller_key(&who);
            let hold = req.uri().query() == Some(crate::lease_api::HOLD_QUERY);
            resolve(&broker, name, &who).and_then(|p| {
                let s = Session::of(req.headers(), &caller)?;
                s.join(&p)?;
                Ok(lease::notifications(&broker, &p, s.key, hold))
            })
        }
        (&Method::POST, ["v1", "on-demand"]) => Box::pin(on_demand(&broker, req)).await,
        (_, ["v1", ..]) | (_, ["livez" | "readyz" | "metrics"]) => Err(ApiError::MethodNotAllowed),
        _ => Err(ApiError::NotFound),
    };
    result.unwrap_or_else(|e| e.into_response(Value::Null))
}

/// `POST /v1/on-demand`: the pool for a command (per-user brokers only).
async fn on_demand<B>(broker: &Broker, req: Request<B>) -> Result<Response<Body>, ApiError>
where
    B: web::ReadableBody,
{
    let body = read_json(broker, req).await?;
    let want: crate::lease_api::OnDemandRequest = serde_json::from_value(body)
        .map_err(|e| ApiError::BadRequest(format!("not an on-demand pool request: {e}")))?;
    let got = broker.on_demand_pool(&want)?;
    Ok(web::json(
        StatusCode::OK,
        &serde_json::to_value(got).expect("serializes"),
    ))
}

fn readyz(broker: &Broker) -> Response<Body> {
    if broker.ready() {
        web::text(StatusCode::OK, "ready\n")
    } else if !broker.is_serving() {
        web::text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: warming up; not holding the lease socket yet\n",
        )
    } else if broker.is_closing() || broker.is_draining() {
        web::text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: handing over or draining\n",
        )
    } else {
        let cold: Vec<String> = broker
            .pools()
            .iter()
            .filter(|p| p.handshake().is_none())
            .map(|p| p.config().name.clone())
            .collect();
        web::text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: no warm process yet in {}\n", cold.join(", ")),
        )
    }
}

/// `POST /v1/leases/{lease}`.
async fn deliver<B>(
    broker: &Broker,
    caller: &str,
    lease: String,
    req: Request<B>,
) -> Result<Response<Body>, ApiError>
where
    B: web::ReadableBody,
{
    let msg = read_json(broker, req).await?;
    // Another caller's lease is not found, exactly like one that ended.
    let key = lease::scoped(caller, &lease);
    let found = broker.leases.lock().expect("lock").get(&key).cloned();
    let Some(l) = found else {
        return Err(ApiError::UnknownLease(lease));
    };
    let cancelled = msg.get("method").and_then(Value::as_str) == Some("notifications/cancelled");
    match &l.process {
        Some((worker, lid)) => worker
            .deliver(*lid, msg)
            .await
            .map_err(|e| ApiError::BadRequest(e.to_string()))?,
        // Still queued: cancelling takes it out of the queue (below).
        None if cancelled => {}
        None => {
            return Err(ApiError::BadRequest(format!(
                "lease {lease:?} has not reached a process yet; only notifications/cancelled can be sent to it"
            )))
        }
    }
    if cancelled {
        // The client no longer wants the answer: end the lease now rather
        // than holding the process until request_timeout.
        l.cancel.cancel();
    }
    Ok(web::json(StatusCode::ACCEPTED, &json!({"delivered": true})))
}
