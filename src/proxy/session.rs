//! Handshake-era client sessions (`Mcp-Session-Id`).
//!
//! A session records what its client declared at `initialize` and which
//! leases are in flight for it, so that a `notifications/cancelled` or an
//! answer to a server→client request reaches the right process. The table is
//! bounded (`max_sessions`) and sessions idle past the timeout are swept;
//! per-session maps are bounded too, so no client can grow proxy memory
//! without limit.

use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// In-flight requests or pending server requests tracked per session.
const MAX_TRACKED_PER_SESSION: usize = 1024;

/// One client session.
pub struct Session {
    /// The `Mcp-Session-Id`.
    pub id: String,
    /// The protocol version agreed at initialize.
    pub protocol_version: String,
    /// The client's declared capabilities.
    pub capabilities: Value,
    /// The client's `clientInfo`.
    pub client_info: Value,
    state: Mutex<SessionState>,
    /// `GET /mcp` streams of this session open now.
    pub streams: Arc<std::sync::atomic::AtomicUsize>,
}

#[derive(Default)]
struct SessionState {
    last_seen: Option<Instant>,
    /// Whether any request followed `initialize`.
    used: bool,
    /// Client request id (key form) → lease token.
    inflight: HashMap<String, String>,
    /// Server request id sent to the client → lease token.
    server_requests: HashMap<String, String>,
    /// Questions the proxy itself asked the client (bridging a stateless
    /// server's InputRequiredResult) → who waits for the answer.
    inputs: HashMap<String, oneshot::Sender<Value>>,
}

impl Session {
    /// Marks the session used now.
    pub fn touch(&self) {
        self.state.lock().expect("lock").last_seen = Some(Instant::now());
    }

    /// Whether the client declared capability `name` (e.g. "sampling").
    pub fn has_capability(&self, name: &str) -> bool {
        self.capabilities.get(name).is_some_and(|v| !v.is_null())
    }

    /// Records that client request `id` runs as lease `token`.
    pub fn track_request(&self, id: &Value, token: &str) {
        let mut st = self.state.lock().expect("lock");
        if st.inflight.len() < MAX_TRACKED_PER_SESSION {
            st.inflight
                .insert(crate::jsonrpc::key_of(id), token.to_string());
        }
    }

    /// Forgets client request `id`.
    pub fn untrack_request(&self, id: &Value) {
        self.state
            .lock()
            .expect("lock")
            .inflight
            .remove(&crate::jsonrpc::key_of(id));
    }

    /// The lease running client request `id`.
    pub fn lease_of_request(&self, id: &Value) -> Option<String> {
        self.state
            .lock()
            .expect("lock")
            .inflight
            .get(&crate::jsonrpc::key_of(id))
            .cloned()
    }

    /// Records a server→client request sent on this session; false if the
    /// session already has too many pending.
    pub fn track_server_request(&self, id: &Value, token: &str) -> bool {
        let mut st = self.state.lock().expect("lock");
        if st.server_requests.len() >= MAX_TRACKED_PER_SESSION {
            return false;
        }
        st.server_requests
            .insert(crate::jsonrpc::key_of(id), token.to_string());
        true
    }

    /// Takes the lease waiting for the answer to server request `id`.
    pub fn take_server_request(&self, id: &Value) -> Option<String> {
        self.state
            .lock()
            .expect("lock")
            .server_requests
            .remove(&crate::jsonrpc::key_of(id))
    }

    /// Registers a question the proxy asks the client; false when too many
    /// are pending.
    pub fn expect_input(&self, id: &str, tx: oneshot::Sender<Value>) -> bool {
        let mut st = self.state.lock().expect("lock");
        st.inputs.retain(|_, t| !t.is_closed());
        if st.inputs.len() >= MAX_TRACKED_PER_SESSION {
            return false;
        }
        st.inputs
            .insert(crate::jsonrpc::key_of(&Value::from(id)), tx);
        true
    }

    /// Hands the client's answer to whoever asked; false if nobody did.
    pub fn answer_input(&self, id: &Value, msg: Value) -> bool {
        let tx = self
            .state
            .lock()
            .expect("lock")
            .inputs
            .remove(&crate::jsonrpc::key_of(id));
        tx.is_some_and(|tx| tx.send(msg).is_ok())
    }

    /// Forgets every server request of lease `token` (the lease ended).
    pub fn forget_lease(&self, token: &str) {
        self.state
            .lock()
            .expect("lock")
            .server_requests
            .retain(|_, t| t != token);
    }

    /// Marks that the client made a request (beyond `initialize` and its
    /// notifications): the session now lives for the whole idle timeout.
    pub fn mark_used(&self) {
        self.state.lock().expect("lock").used = true;
    }

    fn used(&self) -> bool {
        self.state.lock().expect("lock").used
    }

    fn idle_for(&self, now: Instant) -> Duration {
        let st = self.state.lock().expect("lock");
        st.last_seen
            .map(|t| now.duration_since(t))
            .unwrap_or_default()
    }
}

/// How long a session that made no request after `initialize` is kept: a
/// bare `initialize` must not hold a place in the session table for the
/// whole idle timeout (a client that comes back later gets `404` and, as
/// the spec asks, initializes again).
pub const UNUSED_SESSION_TIMEOUT: Duration = Duration::from_secs(300);

/// Why a session could not be created.
#[derive(Debug, thiserror::Error)]
#[error("the proxy already holds {0} sessions (max_sessions); retry later")]
pub struct TooManySessions(pub usize);

/// All sessions of one proxy.
pub struct Sessions {
    max: usize,
    idle_timeout: Duration,
    /// A session that made no request after `initialize` goes after this.
    unused_timeout: Duration,
    map: Mutex<HashMap<String, Arc<Session>>>,
}

impl Sessions {
    /// An empty table.
    pub fn new(max: usize, idle_timeout: Duration) -> Self {
        Self {
            max,
            idle_timeout,
            unused_timeout: idle_timeout.min(UNUSED_SESSION_TIMEOUT),
            map: Mutex::new(HashMap::new()),
        }
    }

    /// Creates a session with a fresh unguessable id.
    pub fn create(
        &self,
        protocol_version: String,
        capabilities: Value,
        client_info: Value,
    ) -> Result<Arc<Session>, TooManySessions> {
        let mut map = self.map.lock().expect("lock");
        if map.len() >= self.max {
            return Err(TooManySessions(self.max));
        }
        let s = Arc::new(Session {
            id: uuid::Uuid::new_v4().simple().to_string(),
            protocol_version,
            capabilities,
            client_info,
            state: Mutex::new(SessionState::default()),
            streams: Arc::default(),
        });
        s.touch();
        map.insert(s.id.clone(), s.clone());
        Ok(s)
    }

    /// Looks a session up and marks it used.
    pub fn get(&self, id: &str) -> Option<Arc<Session>> {
        let s = self.map.lock().expect("lock").get(id).cloned();
        if let Some(s) = &s {
            s.touch();
        }
        s
    }

    /// Removes a session.
    pub fn remove(&self, id: &str) -> Option<Arc<Session>> {
        self.map.lock().expect("lock").remove(id)
    }

    /// Number of open sessions.
    pub fn len(&self) -> usize {
        self.map.lock().expect("lock").len()
    }

    /// True when no session is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes and returns sessions idle past the timeout.
    pub fn sweep(&self) -> Vec<Arc<Session>> {
        let now = Instant::now();
        let mut map = self.map.lock().expect("lock");
        let expired: Vec<String> = map
            .iter()
            .filter(|(_, s)| {
                let limit = if s.used() {
                    self.idle_timeout
                } else {
                    self.unused_timeout
                };
                s.idle_for(now) >= limit
            })
            .map(|(k, _)| k.clone())
            .collect();
        expired.into_iter().filter_map(|k| map.remove(&k)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bounded_and_swept() {
        let t = Sessions::new(2, Duration::ZERO);
        let a = t.create("2025-11-25".into(), json!({}), json!({})).unwrap();
        t.create("2025-11-25".into(), json!({}), json!({})).unwrap();
        assert!(t.create("2025-11-25".into(), json!({}), json!({})).is_err());
        assert!(t.get(&a.id).is_some());
        assert_eq!(t.sweep().len(), 2);
        assert!(t.is_empty());
    }

    #[test]
    fn tracks_requests_by_typed_id() {
        let t = Sessions::new(1, Duration::from_secs(60));
        let s = t
            .create("2025-11-25".into(), json!({"sampling": {}}), json!({}))
            .unwrap();
        assert!(s.has_capability("sampling"));
        assert!(!s.has_capability("roots"));
        s.track_request(&json!(1), "lease-a");
        assert_eq!(s.lease_of_request(&json!(1)).as_deref(), Some("lease-a"));
        assert_eq!(s.lease_of_request(&json!("1")), None);
        s.track_server_request(&json!("srv-1"), "lease-a");
        s.forget_lease("lease-a");
        assert_eq!(s.take_server_request(&json!("srv-1")), None);
    }

    #[test]
    fn unused_sessions_go_first() {
        let mut t = Sessions::new(4, Duration::from_secs(3600));
        t.unused_timeout = Duration::ZERO;
        let bare = t.create("2025-11-25".into(), json!({}), json!({})).unwrap();
        let busy = t.create("2025-11-25".into(), json!({}), json!({})).unwrap();
        t.get(&busy.id).expect("open").mark_used();
        let swept: Vec<String> = t.sweep().into_iter().map(|s| s.id.clone()).collect();
        assert_eq!(swept, vec![bare.id.clone()]);
        assert!(t.get(&busy.id).is_some());
    }
}
