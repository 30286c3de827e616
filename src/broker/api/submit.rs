//! `POST /v1/pools/{pool}/messages` up to the lease: reading the message
//! (a plain request stays text, [`RawRequest`]; anything else is parsed),
//! and the synchronous checks that decide what becomes of it.
//!
//! Invariant: nothing here waits once the body is read, so none of it is
//! part of the state a queued request keeps.

use super::super::error::ApiError;
use super::super::Broker;
use super::resolve;
use crate::jsonrpc::raw::RawRequest;
use crate::jsonrpc::{self, codes, Kind};
use crate::policy::Identity;
use crate::pool::Pool;
use crate::process::router::Outgoing;
use crate::web::{self, Body};
use ::http::{Request, Response, StatusCode};
use serde_json::Value;

/// The lease API's answer to a body that could not be read.
fn unreadable(e: web::BodyError) -> ApiError {
    match e {
        web::BodyError::TooLarge { .. } => ApiError::TooLarge(e.to_string()),
        other => ApiError::BadRequest(other.to_string()),
    }
}

fn parse(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("body is not JSON: {e}")))
}

/// Reads a JSON body.
pub(super) async fn read_json<B>(broker: &Broker, req: Request<B>) -> Result<Value, ApiError>
where
    B: web::ReadableBody,
{
    let limit = broker.settings().max_message_size;
    let body = web::read_body(req.into_body(), limit).await;
    parse(&body.map_err(unreadable)?)
}

/// Reads a message for a pool: a plain request stays text
/// ([`RawRequest`]), anything else is parsed. (The read is awaited here,
/// not in a helper: every level of `async fn` adds to the state each
/// waiting connection keeps.)
pub(super) async fn read_message<B>(
    broker: &Broker,
    req: Request<B>,
) -> Result<PoolMessage, ApiError>
where
    B: web::ReadableBody,
{
    let limit = broker.settings().max_message_size;
    let body = web::read_body(req.into_body(), limit)
        .await
        .map_err(unreadable)?;
    match RawRequest::parse(body.clone()) {
        Some((raw, method)) => Ok(PoolMessage::Raw(Box::new(raw), method)),
        None => parse(&body).map(PoolMessage::Parsed),
    }
}

/// A message for a pool as read.
pub(super) enum PoolMessage {
    /// A plain request and its method.
    Raw(Box<RawRequest>, String),
    Parsed(Value),
}

/// What to do with a message sent to a pool.
pub(super) enum Submitted {
    /// Answered already (refused, or not a request).
    Answer(Response<Body>),
    /// A request for a process.
    Request {
        pool: Pool,
        msg: Outgoing,
        method: String,
        id: Value,
    },
    /// A client notification.
    Notification { pool: Pool, msg: Value },
}

impl Submitted {
    /// The pool a request or notification goes to, and the id to answer.
    pub(super) fn pool(&self) -> Option<(&Pool, Value)> {
        match self {
            Submitted::Request { pool, id, .. } => Some((pool, id.clone())),
            Submitted::Notification { pool, .. } => Some((pool, Value::Null)),
            Submitted::Answer(_) => None,
        }
    }
}

/// `POST /v1/pools/{pool}/messages`, once the message was read: the checks
/// (synchronous, so none of this is part of a waiting request's state).
pub(super) fn submit(
    broker: &Broker,
    name: &str,
    msg: Result<PoolMessage, ApiError>,
    who: &Identity,
) -> Submitted {
    let msg = match msg {
        Ok(PoolMessage::Raw(raw, method)) => {
            let kind = Kind::Request {
                id: raw.id.clone(),
                method,
            };
            return classified(broker, name, Ok(kind), Outgoing::Raw(raw), who);
        }
        Ok(PoolMessage::Parsed(m)) => m,
        Err(ApiError::BadRequest(m)) => {
            return Submitted::Answer(web::json(
                StatusCode::BAD_REQUEST,
                &jsonrpc::error(Value::Null, codes::PARSE_ERROR, m),
            ))
        }
        Err(e) => {
            if matches!(e, ApiError::TooLarge(_)) && broker.pool(name).is_some() {
                reject(broker, name, "too_large");
            }
            return Submitted::Answer(e.into_response(Value::Null));
        }
    };
    let kind = jsonrpc::classify(&msg);
    classified(broker, name, kind, Outgoing::Parsed(msg), who)
}

/// The rest of [`submit`], once the message is classified.
fn classified(
    broker: &Broker,
    name: &str,
    kind: Result<Kind, jsonrpc::ClassifyError>,
    msg: Outgoing,
    who: &Identity,
) -> Submitted {
    let id = msg.id();
    let pool = match resolve(broker, name, who) {
        Ok(p) => p,
        Err(e) => return Submitted::Answer(e.into_response(id)),
    };
    let refuse = |e: ApiError, id| Submitted::Answer(e.into_response(id));
    match kind {
        Ok(Kind::Request { method, .. }) if method == "initialize" => refuse(
            ApiError::BadRequest(
                "processes are initialized by the broker; read the cached handshake from GET /v1/pools/{pool}".into(),
            ),
            id,
        ),
        Ok(Kind::Request { method, .. }) => {
            if broker.is_draining() {
                reject(broker, name, "draining");
                return refuse(ApiError::Draining, id);
            }
            Submitted::Request {
                pool,
                msg,
                method,
                id,
            }
        }
        Ok(Kind::Notification { .. }) => match msg.into_value() {
            Ok(msg) => Submitted::Notification { pool, msg },
            Err(e) => refuse(ApiError::BadRequest(format!("body is not JSON: {e}")), id),
        },
        Ok(Kind::Response { .. }) => refuse(
            ApiError::BadRequest(
                "responses answer a server request inside a lease: POST them to /v1/leases/{lease}".into(),
            ),
            id,
        ),
        Err(e) => refuse(ApiError::BadRequest(e.to_string()), id),
    }
}

/// Counts a request refused before it reached a process.
pub(super) fn reject(broker: &Broker, pool: &str, reason: &str) {
    broker
        .metrics()
        .rejections
        .with_label_values(&[pool, reason])
        .inc();
}
