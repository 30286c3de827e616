//! The lease API's errors and the one place they become HTTP answers: a
//! status and a JSON-RPC error body (`Retry-After` on `503`).

use crate::jsonrpc::{self, codes};
use crate::pool::{ModeError, PoolError};
use crate::web::{self, Body};
use ::http::{Response, StatusCode};
use serde_json::Value;

/// Everything that can go wrong answering one API request; each variant maps
/// to exactly one HTTP status here and nowhere else.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("no pool named {0:?}")]
    UnknownPool(String),
    #[error("{0}")]
    Pool(#[from] PoolError),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    HeadTooLarge(String),
    #[error("{0}")]
    Process(String),
    #[error("the broker is shutting down")]
    Draining,
    #[error("no lease {0:?} is in flight (it ended or never existed)")]
    UnknownLease(String),
    #[error("lease id {0:?} is already in use")]
    LeaseConflict(String),
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("not allowed: {0}")]
    NotAllowed(String),
    /// A session named a mode the pool does not allow, or another mode
    /// than it uses already.
    #[error("{0}")]
    Mode(crate::pool::ModeError),
    #[error("{0}")]
    State(#[from] crate::broker::affinity::StateError),
}

impl ApiError {
    pub(in crate::broker) fn status(&self) -> StatusCode {
        match self {
            ApiError::UnknownPool(_) | ApiError::UnknownLease(_) | ApiError::NotFound => {
                StatusCode::NOT_FOUND
            }
            ApiError::Pool(PoolError::QueueTimeout { .. }) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Pool(PoolError::ProcessGone { .. }) => StatusCode::GONE,
            ApiError::State(_) => StatusCode::BAD_REQUEST,
            ApiError::Pool(_) | ApiError::Draining => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::HeadTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::Process(_) => StatusCode::BAD_GATEWAY,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::LeaseConflict(_) => StatusCode::CONFLICT,
            ApiError::NotAllowed(_) | ApiError::Mode(ModeError::NotAllowed { .. }) => {
                StatusCode::FORBIDDEN
            }
            ApiError::Mode(ModeError::Switched { .. }) => StatusCode::CONFLICT,
        }
    }

    fn code(&self) -> i64 {
        match self {
            ApiError::UnknownPool(_) => codes::UNKNOWN_POOL,
            ApiError::Pool(PoolError::QueueFull { .. }) => codes::QUEUE_FULL,
            ApiError::Pool(PoolError::QueueTimeout { .. }) => codes::QUEUE_TIMEOUT,
            ApiError::Pool(PoolError::Failing { .. }) => codes::POOL_FAILING,
            ApiError::Pool(PoolError::ProcessGone { .. }) => codes::PROCESS_GONE,
            ApiError::State(_) => codes::INVALID_PARAMS,
            ApiError::Pool(PoolError::Closed { .. }) | ApiError::Draining => {
                codes::BROKER_UNAVAILABLE
            }
            ApiError::BadRequest(_) => codes::INVALID_REQUEST,
            ApiError::TooLarge(_) => codes::MESSAGE_TOO_LARGE,
            ApiError::Process(_) => codes::PROCESS_EXITED,
            ApiError::NotAllowed(_) | ApiError::Mode(ModeError::NotAllowed { .. }) => {
                codes::NOT_ALLOWED
            }
            ApiError::Mode(ModeError::Switched { .. }) => codes::INVALID_REQUEST,
            ApiError::UnknownLease(_)
            | ApiError::HeadTooLarge(_)
            | ApiError::LeaseConflict(_)
            | ApiError::NotFound
            | ApiError::MethodNotAllowed => codes::INVALID_REQUEST,
        }
    }

    /// The HTTP response: a JSON-RPC error for request `id`.
    pub fn into_response(self, id: Value) -> Response<Body> {
        let mut r = web::json(
            self.status(),
            &jsonrpc::error(id, self.code(), self.to_string()),
        );
        if r.status() == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut().insert(
                ::http::header::RETRY_AFTER,
                ::http::HeaderValue::from_static("1"),
            );
        }
        r
    }
}
