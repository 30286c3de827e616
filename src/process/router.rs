//! The per-process routing table: which message belongs to which request.
//!
//! Invariants:
//! * Every request written to a process gets a fresh process-side id (a
//!   counter that never repeats for the life of the process), so a response
//!   can only ever match the request it answers; a late response to a
//!   cancelled or timed-out request finds no entry and is dropped.
//! * Progress tokens are rewritten the same way, so two clients using the
//!   same token on one process never see each other's progress.
//! * Server→client requests get broker ids that name the process, so a
//!   client's answer reaches the process that asked.
//! * A lease has at most `max_server_requests` server→client requests
//!   waiting for the client; one more is answered to the process with an
//!   error at once, so a runaway server cannot grow the table.
//! * A message that cannot be tied to exactly one request (a log line while
//!   several requests are in flight) is dropped and counted, never guessed.
//!
//! The table is plain data with no I/O: [`Router::route`] returns an
//! [`Action`] and the caller performs it.

use crate::jsonrpc::{self, codes, Kind};
use serde_json::{json, Value};
use std::collections::HashMap;
use tokio::sync::{mpsc, oneshot};

/// A message for the consumer of one lease.
#[derive(Debug)]
pub enum LeaseEvent {
    /// A notification or server→client request, in order.
    Message(Value),
    /// The response: the last event of the lease.
    Final(Reply),
}

/// A response for a lease's caller, with the caller's id in place.
#[derive(Debug)]
pub enum Reply {
    /// Parsed (and possibly made by the broker).
    Parsed(Value),
    /// The process's line as it was written, only the id swapped
    /// ([`jsonrpc::raw`]); one NDJSON line, ending in `\n`.
    Raw {
        /// The line.
        line: bytes::Bytes,
        /// It is an error response.
        is_error: bool,
    },
}

impl Reply {
    /// True for an error response.
    pub fn is_error(&self) -> bool {
        match self {
            Reply::Parsed(v) => jsonrpc::is_error(v),
            Reply::Raw { is_error, .. } => *is_error,
        }
    }
}

/// A client request on its way to a process.
#[derive(Debug)]
pub enum Outgoing {
    /// Parsed: its id and progress token are rewritten in the tree.
    Parsed(Value),
    /// Kept as its text: only its id changes ([`jsonrpc::raw`]). Boxed:
    /// this enum is part of every waiting request's state, which a
    /// `Value` (32 bytes) bounds.
    Raw(Box<jsonrpc::raw::RawRequest>),
}

impl Outgoing {
    /// The caller's id.
    pub fn id(&self) -> Value {
        match self {
            Outgoing::Parsed(v) => v.get("id").cloned().unwrap_or(Value::Null),
            Outgoing::Raw(r) => r.id.clone(),
        }
    }

    /// The request parsed (for the rare edits beyond its id); see
    /// [`jsonrpc::raw::RawRequest::to_value`] for how that can fail.
    pub fn into_value(self) -> Result<Value, serde_json::Error> {
        match self {
            Outgoing::Parsed(v) => Ok(v),
            Outgoing::Raw(r) => r.to_value(),
        }
    }
}

/// Sender half of a lease's event stream.
pub type LeaseSink = mpsc::Sender<LeaseEvent>;

/// What the reader must do with one message from the process.
#[derive(Debug)]
pub enum Action {
    /// Deliver to a lease.
    ToLease(LeaseSink, LeaseEvent),
    /// Write this message back to the process.
    Reply(Value),
    /// Answer the broker's own request.
    Internal(oneshot::Sender<Value>, Value),
    /// Not tied to any request: publish on the process's event channel.
    Event(Value),
    /// Drop it; the string says why (a metrics label).
    Drop(&'static str),
}

enum Waiter {
    Lease(u64),
    Internal(oneshot::Sender<Value>),
}

struct LeaseRoute {
    sink: LeaseSink,
    proc_id: u64,
    client_id: Value,
    progress_key: Option<String>,
    answered: bool,
}

impl LeaseRoute {
    /// Hands the lease its response (already carrying the caller's id).
    fn finish(&self, reply: Reply) -> Action {
        Action::ToLease(self.sink.clone(), LeaseEvent::Final(reply))
    }
}

/// Whom a response from the process answers, once taken off the pending table.
enum Answered<'a> {
    /// A lease's request (now marked answered).
    Lease(&'a LeaseRoute),
    /// One of the broker's own requests.
    Internal(oneshot::Sender<Value>),
}

/// Default cap on server→client requests waiting per lease.
pub const DEFAULT_MAX_SERVER_REQUESTS: usize = crate::config::DEFAULT_MAX_SERVER_REQUESTS;

/// Routing state for one process.
pub struct Router {
    worker_id: u64,
    max_server_requests: usize,
    next: u64,
    pending: HashMap<u64, Waiter>,
    leases: HashMap<u64, LeaseRoute>,
    progress: HashMap<String, (u64, Value)>,
    server_reqs: HashMap<String, (u64, Value)>,
}

/// Why a client message could not be delivered into a lease.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum DeliverError {
    #[error("the lease has ended")]
    LeaseGone,
    #[error("no server request with id {0} is waiting on this lease")]
    UnknownServerRequest(String),
    #[error("only responses and notifications can be sent into a lease")]
    NotAllowed,
}

impl Router {
    /// An empty table for worker `worker_id`.
    pub fn new(worker_id: u64) -> Self {
        Self {
            worker_id,
            max_server_requests: DEFAULT_MAX_SERVER_REQUESTS,
            next: 0,
            pending: HashMap::new(),
            leases: HashMap::new(),
            progress: HashMap::new(),
            server_reqs: HashMap::new(),
        }
    }

    /// Sets the cap on server→client requests waiting per lease (min 1).
    pub fn set_max_server_requests(&mut self, n: usize) {
        self.max_server_requests = n.max(1);
    }

    /// Continues ids after `last` (a process adopted from the previous
    /// image keeps its numbering, so a late answer never matches a new
    /// request).
    pub fn resume_after(&mut self, last: u64) {
        self.next = self.next.max(last);
    }

    /// The last id handed out.
    pub fn last_id(&self) -> u64 {
        self.next
    }

    fn fresh(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    /// Requests written but not yet answered.
    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// Registers a client request and rewrites `msg` in place for the process.
    /// Returns the lease id.
    pub fn begin(&mut self, msg: &mut Value, sink: LeaseSink) -> u64 {
        let lid = self.fresh();
        let proc_id = self.fresh();
        let client_id = msg.get("id").cloned().unwrap_or(Value::Null);
        msg["id"] = Value::from(proc_id);
        let mut progress_key = None;
        if let Some(token) = jsonrpc::progress_token_mut(msg) {
            let orig = std::mem::replace(token, Value::from(proc_id));
            let key = jsonrpc::key_of(token);
            self.progress.insert(key.clone(), (lid, orig));
            progress_key = Some(key);
        }
        self.register(lid, proc_id, client_id, progress_key, sink);
        lid
    }

    /// Registers a client request kept as its text (it carries no progress
    /// token, [`jsonrpc::raw::RawRequest`]). Returns the lease id and the
    /// line to write, with the process-side id in place.
    pub fn begin_raw(&mut self, req: &jsonrpc::raw::RawRequest, sink: LeaseSink) -> (u64, Vec<u8>) {
        let lid = self.fresh();
        let proc_id = self.fresh();
        let line = req.line_with_id(&Value::from(proc_id));
        self.register(lid, proc_id, req.id.clone(), None, sink);
        (lid, line)
    }

    fn register(
        &mut self,
        lid: u64,
        proc_id: u64,
        client_id: Value,
        progress_key: Option<String>,
        sink: LeaseSink,
    ) {
        self.pending.insert(proc_id, Waiter::Lease(lid));
        self.leases.insert(
            lid,
            LeaseRoute {
                sink,
                proc_id,
                client_id,
                progress_key,
                answered: false,
            },
        );
    }

    /// Registers a broker-internal request; returns the message to write.
    pub fn internal(&mut self, method: &str, params: Value, tx: oneshot::Sender<Value>) -> Value {
        let id = self.fresh();
        self.pending.insert(id, Waiter::Internal(tx));
        jsonrpc::request(Value::from(id), method, params)
    }

    /// The process-side id of a lease's request.
    pub fn proc_id(&self, lid: u64) -> Option<u64> {
        self.leases.get(&lid).map(|l| l.proc_id)
    }

    /// Forgets a lease. Returns true if its request was still unanswered.
    pub fn end(&mut self, lid: u64) -> bool {
        let Some(route) = self.leases.remove(&lid) else {
            return false;
        };
        if let Some(key) = route.progress_key {
            self.progress.remove(&key);
        }
        self.server_reqs.retain(|_, (l, _)| *l != lid);
        self.pending.remove(&route.proc_id).is_some()
    }

    /// Rewrites a client's message sent into lease `lid` for the process.
    pub fn deliver(&mut self, lid: u64, mut msg: Value) -> Result<Value, DeliverError> {
        let route = self.leases.get(&lid).ok_or(DeliverError::LeaseGone)?;
        match jsonrpc::classify(&msg) {
            Ok(Kind::Response { id }) => {
                let key = match &id {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                match self.server_reqs.get(&key) {
                    Some((l, _)) if *l == lid => {
                        let (_, orig) = self.server_reqs.remove(&key).expect("present");
                        msg["id"] = orig;
                        Ok(msg)
                    }
                    _ => Err(DeliverError::UnknownServerRequest(key)),
                }
            }
            Ok(Kind::Notification { method }) => {
                if method == "notifications/cancelled" {
                    if let Some(params) = msg.get_mut("params") {
                        params["requestId"] = Value::from(route.proc_id);
                    }
                }
                Ok(msg)
            }
            _ => Err(DeliverError::NotAllowed),
        }
    }

    /// The single lease still waiting for its response, if exactly one is.
    fn sole_open_lease(&self) -> Option<u64> {
        let mut open = self.leases.iter().filter(|(_, l)| !l.answered);
        match (open.next(), open.next()) {
            (Some((lid, _)), None) => Some(*lid),
            _ => None,
        }
    }

    /// Decides where one message from the process goes.
    pub fn route(&mut self, mut msg: Value) -> Action {
        let kind = match jsonrpc::classify(&msg) {
            Ok(k) => k,
            Err(_) => return Action::Drop("invalid_jsonrpc"),
        };
        match kind {
            Kind::Response { id } => {
                let Some(pid) = id.as_u64() else {
                    return Action::Drop("late_response");
                };
                match self.answered(pid) {
                    Some(Answered::Internal(tx)) => Action::Internal(tx, msg),
                    Some(Answered::Lease(route)) => {
                        msg["id"] = route.client_id.clone();
                        route.finish(Reply::Parsed(msg))
                    }
                    None => Action::Drop("late_response"),
                }
            }
            Kind::Request { id, method } => {
                if method == "ping" {
                    return Action::Reply(jsonrpc::result(id, json!({})));
                }
                let Some(lid) = self.sole_open_lease() else {
                    if method == "roots/list" {
                        // No client attached: the honest answer is "no roots".
                        return Action::Reply(jsonrpc::result(id, json!({"roots": []})));
                    }
                    let why = if self.leases.is_empty() {
                        "no client request is in flight on this process"
                    } else {
                        "several client requests are in flight on this process (max_inflight > 1), so the broker cannot tell which client to ask"
                    };
                    return Action::Reply(jsonrpc::error(
                        id,
                        codes::INTERNAL_ERROR,
                        format!("mcp-broker cannot route {method}: {why}"),
                    ));
                };
                let waiting = self.server_reqs.values().filter(|(l, _)| *l == lid).count();
                if waiting >= self.max_server_requests {
                    return Action::Reply(jsonrpc::error(
                        id,
                        codes::INTERNAL_ERROR,
                        format!(
                            "mcp-broker refused {method}: this request already has {waiting} \
                             server requests waiting for the client (max_server_requests = {})",
                            self.max_server_requests
                        ),
                    ));
                }
                let n = self.fresh();
                let broker_id = format!("mcp-broker-{}-{n}", self.worker_id);
                self.server_reqs.insert(broker_id.clone(), (lid, id));
                msg["id"] = Value::String(broker_id);
                let route = &self.leases[&lid];
                Action::ToLease(route.sink.clone(), LeaseEvent::Message(msg))
            }
            Kind::Notification { method } => self.route_notification(&method, msg),
        }
    }

    /// Takes the waiter of process-side id `proc_id`: `None` when nobody
    /// waits (a late or unknown response), else the lease it answers (marked
    /// answered) or the broker's own request. The one place a response is
    /// matched to its request, parsed or not.
    fn answered(&mut self, proc_id: u64) -> Option<Answered<'_>> {
        match self.pending.remove(&proc_id)? {
            Waiter::Internal(tx) => Some(Answered::Internal(tx)),
            Waiter::Lease(lid) => {
                let route = self.leases.get_mut(&lid)?;
                route.answered = true;
                Some(Answered::Lease(route))
            }
        }
    }

    /// Routes a response read without parsing ([`jsonrpc::raw::response_head`]):
    /// as [`Router::route`] would the parsed `line`, with the caller's id
    /// spliced into the bytes.
    pub fn route_response(&mut self, head: &jsonrpc::raw::ResponseHead, line: &[u8]) -> Action {
        match self.answered(head.id) {
            Some(Answered::Lease(route)) => {
                let line = jsonrpc::raw::with_id(line, head.id_at.clone(), &route.client_id);
                route.finish(Reply::Raw {
                    line: line.into(),
                    is_error: head.is_error,
                })
            }
            // The broker's own requests are rare: parse their answers.
            Some(Answered::Internal(tx)) => match serde_json::from_slice(line) {
                Ok(msg) => Action::Internal(tx, msg),
                Err(_) => Action::Drop("invalid_jsonrpc"),
            },
            None => Action::Drop("late_response"),
        }
    }

    fn route_notification(&mut self, method: &str, mut msg: Value) -> Action {
        match method {
            "notifications/progress" => {
                let key = msg
                    .get("params")
                    .and_then(|p| p.get("progressToken"))
                    .map(jsonrpc::key_of);
                let Some((lid, orig)) = key.and_then(|k| self.progress.get(&k).cloned()) else {
                    return Action::Drop("progress");
                };
                let Some(route) = self.leases.get(&lid) else {
                    return Action::Drop("progress");
                };
                msg["params"]["progressToken"] = orig;
                Action::ToLease(route.sink.clone(), LeaseEvent::Message(msg))
            }
            m if m.ends_with("/list_changed") || m == "notifications/resources/updated" => {
                Action::Event(msg)
            }
            "notifications/cancelled" => {
                // The server withdrawing one of its own requests to the client.
                let rid = msg.get("params").and_then(|p| p.get("requestId")).cloned();
                let found = rid.and_then(|rid| {
                    self.server_reqs
                        .iter()
                        .find(|(_, (_, orig))| *orig == rid)
                        .map(|(k, (lid, _))| (k.clone(), *lid))
                });
                match found {
                    Some((broker_id, lid)) => {
                        self.server_reqs.remove(&broker_id);
                        msg["params"]["requestId"] = Value::String(broker_id);
                        let route = &self.leases[&lid];
                        Action::ToLease(route.sink.clone(), LeaseEvent::Message(msg))
                    }
                    None => Action::Drop("cancelled"),
                }
            }
            _ => match self.sole_open_lease() {
                Some(lid) => {
                    Action::ToLease(self.leases[&lid].sink.clone(), LeaseEvent::Message(msg))
                }
                None => Action::Drop("notification"),
            },
        }
    }

    /// Fails the request with process-side id `proc_id` (its response could
    /// not be read, e.g. it was over the size limit).
    pub fn fail_one(&mut self, proc_id: u64, code: i64, message: &str) -> Action {
        match self.answered(proc_id) {
            Some(Answered::Lease(route)) => {
                let err = jsonrpc::error(route.client_id.clone(), code, message);
                route.finish(Reply::Parsed(err))
            }
            Some(Answered::Internal(tx)) => {
                Action::Internal(tx, jsonrpc::error(Value::from(proc_id), code, message))
            }
            None => Action::Drop("late_response"),
        }
    }

    /// Fails every unanswered lease (the process is gone).
    pub fn fail_all(&mut self, message: &str) -> Vec<Action> {
        let mut out = Vec::new();
        for route in self.leases.values_mut() {
            if !route.answered {
                route.answered = true;
                let err = jsonrpc::error(route.client_id.clone(), codes::PROCESS_EXITED, message);
                out.push(route.finish(Reply::Parsed(err)));
            }
        }
        self.pending.clear();
        out
    }
}

#[cfg(test)]
mod tests;
