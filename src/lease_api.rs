//! The lease API contract: everything both sides of the broker's Unix
//! socket agree on, and nothing else.
//!
//! The broker ([`crate::broker`]) serves it; the thin proxy
//! ([`crate::proxy`]) and other clients consume it. Neither side imports the
//! other: both import this module. It holds the paths, the header names and
//! their value rules, the pool description as serde types, and the broker's
//! own JSON-RPC error codes. It does no I/O.
//!
//! | request | answer |
//! |---|---|
//! | `GET /v1/pools` | JSON array of [`PoolDescription`] |
//! | `GET /v1/pools/{pool}` | one [`PoolDescription`] |
//! | `POST /v1/pools/{pool}/messages` (one JSON-RPC message) | request: `200`, `application/x-ndjson`: every message the process emits for it, the response last; header [`LEASE_HEADER`]. Notification: `202` |
//! | `POST /v1/leases/{lease}` (a response or notification) | `202`: delivered to the process holding the lease |
//! | `DELETE /v1/pools/{pool}/sessions/{session}` | `204`: session ended (exclusive process discarded) |
//! | `GET /v1/pools/{pool}/events` | NDJSON stream of server notifications not tied to a request; with [`HOLD_QUERY`] and a session, the session ends when the stream closes |
//! | `POST /v1/on-demand` ([`OnDemandRequest`]) | `200` [`OnDemandPool`]: the pool for that command, created on first use. Only a per-user broker (`mcp-broker user-broker`) answers it; any other broker refuses with `403` ([`codes::NOT_ALLOWED`]) |
//! | `GET /livez`, `/readyz`, `/metrics` | health and Prometheus text |
//!
//! Failures before a process was reached answer with an HTTP error status
//! and a JSON-RPC error body carrying the caller's id; the codes are in
//! [`codes`]. The NDJSON stream of a lease is made of JSON-RPC messages as
//! the server sent them (ids and progress tokens restored to the caller's),
//! one per line, and always ends with exactly one response for the
//! caller's id.

use crate::config::{Mode, Protocol};
use crate::protocol::Era;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The body of a lease API answer handed over in-process.
pub type LocalBody =
    http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, std::convert::Infallible>;

/// An answer of [`LocalApi::request`].
pub type LocalAnswer<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = http::Response<LocalBody>> + Send + 'a>>;

/// The lease API served in this process (`mcp-broker up`): the same
/// requests and answers as over the socket, without the socket. The broker
/// implements it, the proxy calls it; neither names the other.
pub trait LocalApi: Send + Sync + std::fmt::Debug {
    /// Answers one lease API request. Dropping the answer (or its body)
    /// before the end counts as the caller hanging up.
    fn request(&self, req: http::Request<http_body_util::Full<bytes::Bytes>>) -> LocalAnswer<'_>;
}

/// Header binding a message to a client session (sticky and exclusive
/// pools); 1 to [`MAX_SESSION_KEY`] visible ASCII bytes.
pub const SESSION_HEADER: &str = "mcp-broker-session";
/// Header naming the mode a session uses the pool in (`shared`, `sticky`
/// or `exclusive`); only with [`SESSION_HEADER`]. The pool must allow it
/// (its `modes`, listed in [`PoolDescription::modes`]); a session keeps
/// the mode it named first until it ends. Without it: the pool's `mode`.
pub const MODE_HEADER: &str = "mcp-broker-mode";
/// Header carrying the lease id: chosen by the caller on the request (so it
/// can cancel before the first answer), echoed on the answer.
pub const LEASE_HEADER: &str = "mcp-broker-lease";
/// [`SESSION_HEADER`], [`MODE_HEADER`] and [`LEASE_HEADER`] as header
/// names, made once instead of parsed from the string on every request.
pub static SESSION_NAME: http::HeaderName = http::HeaderName::from_static(SESSION_HEADER);
/// See [`SESSION_NAME`].
pub static MODE_NAME: http::HeaderName = http::HeaderName::from_static(MODE_HEADER);
/// See [`SESSION_NAME`].
pub static LEASE_NAME: http::HeaderName = http::HeaderName::from_static(LEASE_HEADER);
/// Longest accepted session key.
pub const MAX_SESSION_KEY: usize = 256;
/// The pool list.
pub const POOLS_PATH: &str = "/v1/pools";
/// Query of `GET /v1/pools/{pool}/events`: the caller holds its session
/// with this stream, which ends the session when it closes (the caller
/// exited, even by `SIGKILL`), as `DELETE .../sessions/{session}` would.
pub const HOLD_QUERY: &str = "hold=1";
/// Where on-demand pools are asked for (per-user brokers only).
pub const ON_DEMAND_PATH: &str = "/v1/on-demand";

/// The broker's own JSON-RPC error codes. JSON-RPC reserves -32768..-32000
/// and MCP claims -32020..-32099 of it, so these live just outside, in
/// -31001..-31011, where no spec revision can collide with them. Part of the
/// public contract: never renumbered.
pub mod codes {
    /// The pool's wait queue is full; retry later.
    pub const QUEUE_FULL: i64 = -31001;
    /// No process became free within the pool's `queue_timeout`.
    pub const QUEUE_TIMEOUT: i64 = -31002;
    /// The process did not answer within the pool's `request_timeout`.
    pub const REQUEST_TIMEOUT: i64 = -31003;
    /// The process exited (or was replaced) while serving the request.
    pub const PROCESS_EXITED: i64 = -31004;
    /// A message exceeded the size limit.
    pub const MESSAGE_TOO_LARGE: i64 = -31005;
    /// The pool named does not exist.
    pub const UNKNOWN_POOL: i64 = -31006;
    /// The broker could not be reached or is shutting down.
    pub const BROKER_UNAVAILABLE: i64 = -31007;
    /// The caller is not allowed to use this pool.
    pub const NOT_ALLOWED: i64 = -31008;
    /// The pool cannot start processes (its command keeps failing).
    pub const POOL_FAILING: i64 = -31009;
    /// The request was cancelled by the client.
    pub const CANCELLED: i64 = -31010;
    /// The process that issued a retry's `requestState` has ended; send the
    /// original request again without the state.
    pub const PROCESS_GONE: i64 = -31011;
}

/// `/v1/pools/{pool}`.
pub fn pool_path(pool: &str) -> String {
    format!("{POOLS_PATH}/{pool}")
}

/// `/v1/pools/{pool}/messages`: where requests and notifications go.
pub fn messages_path(pool: &str) -> String {
    format!("{POOLS_PATH}/{pool}/messages")
}

/// `/v1/pools/{pool}/events`: server notifications not tied to a request
/// (the wire path keeps the name it shipped with).
pub fn notifications_path(pool: &str) -> String {
    format!("{POOLS_PATH}/{pool}/events")
}

/// `/v1/pools/{pool}/sessions/{session}`: `DELETE` ends the session.
pub fn session_path(pool: &str, session: &str) -> String {
    format!("{POOLS_PATH}/{pool}/sessions/{session}")
}

/// `/v1/leases/{lease}`: answers and notifications into a running lease.
pub fn lease_path(lease: &str) -> String {
    format!("/v1/leases/{lease}")
}

/// A lease id: 16 to 64 of `[A-Za-z0-9_-]`.
pub fn valid_lease_id(s: &str) -> bool {
    (16..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A fresh random lease id: 128 bits from the thread's CSPRNG (seeded by
/// the OS) as 32 hex digits, without a `getrandom` call per request.
pub fn new_lease_id() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let n = rand::random::<u128>();
    // 32 hex digits, most significant first (as `{:032x}`, without the
    // formatting machinery: one of these is made per request).
    (0..32)
        .rev()
        .map(|i| char::from(HEX[((n >> (4 * i)) & 0xf) as usize]))
        .collect()
}

/// A session key: 1 to [`MAX_SESSION_KEY`] visible ASCII bytes.
pub fn valid_session_key(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_SESSION_KEY && s.bytes().all(|b| b.is_ascii_graphic())
}

/// What `GET /v1/pools/{pool}` says about a pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolDescription {
    pub name: String,
    /// The mode of sessions that name none.
    pub mode: Mode,
    /// Every mode a session may name ([`MODE_HEADER`]), `mode` first.
    /// Empty from brokers that predate it: then only `mode`.
    #[serde(default)]
    pub modes: Vec<Mode>,
    /// The pool's `protocol` setting (how processes are warmed).
    pub protocol: Protocol,
    /// The era the pool learned its server speaks, once a process warmed.
    pub learned_era: Option<Era>,
    pub min_idle: usize,
    pub max: usize,
    pub max_inflight: usize,
    pub request_timeout_ms: u64,
    pub status: PoolStatus,
    /// The cached handshake of a warm process; `None` until one warmed.
    pub handshake: Option<Handshake>,
}

/// A warm process's handshake, cached by the pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Handshake {
    /// Which protocol era the server speaks.
    pub era: Era,
    /// The protocol version the server settled on.
    #[serde(rename = "protocolVersion")]
    pub protocol_version: String,
    /// The server's `InitializeResult` (legacy) or discover result (stateless).
    pub result: Value,
}

/// A pool's process and queue counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStatus {
    pub idle: usize,
    pub busy: usize,
    pub starting: usize,
    pub waiting: usize,
    pub failures: u32,
    pub last_error: Option<String>,
}

/// `POST /v1/on-demand`: the pool that runs exactly this command. Two
/// requests get the same pool when every field is equal.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnDemandRequest {
    /// The program (looked up in the broker's `PATH` when not a path).
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    /// Absolute working directory of the server.
    pub cwd: String,
    /// The only variables the server gets besides the broker's base set
    /// (`PATH`, `HOME`, `USER`, `LOGNAME`, `LANG`, `TMPDIR`).
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// How host sessions share the pool's processes.
    pub mode: Mode,
}

/// The answer to [`OnDemandRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OnDemandPool {
    /// The pool's name, for the other lease API paths.
    pub pool: String,
    /// Whether this request created it.
    pub created: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lease_ids_and_session_keys() {
        let (a, b) = (new_lease_id(), new_lease_id());
        assert!(valid_lease_id(&a) && a != b, "{a} {b}");
        assert!(
            a.len() == 32
                && a.bytes()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert!(!valid_lease_id("short"));
        assert!(!valid_lease_id(&"x".repeat(65)));
        assert!(!valid_lease_id("abcdefghijklmnop/"));
        assert!(valid_session_key("s-1"));
        assert!(!valid_session_key(""));
        assert!(!valid_session_key("a b"));
        assert!(!valid_session_key(&"k".repeat(MAX_SESSION_KEY + 1)));
    }

    #[test]
    fn header_names_and_mode_spellings_match_the_wire() {
        assert_eq!(SESSION_NAME.as_str(), SESSION_HEADER);
        assert_eq!(MODE_NAME.as_str(), MODE_HEADER);
        assert_eq!(LEASE_NAME.as_str(), LEASE_HEADER);
        for m in [Mode::Shared, Mode::Sticky, Mode::Exclusive] {
            // The spelling the proxy sends is the one config, flags and
            // the broker's header check read.
            assert_eq!(serde_json::to_value(m).unwrap(), m.as_str());
            let clap = clap::ValueEnum::to_possible_value(&m).unwrap();
            assert_eq!(clap.get_name(), m.as_str());
            assert_eq!(m.to_string(), m.as_str());
        }
    }

    #[test]
    fn descriptions_round_trip_with_the_wire_spelling() {
        let d = PoolDescription {
            name: "p".into(),
            mode: Mode::Sticky,
            modes: vec![Mode::Sticky, Mode::Shared],
            protocol: Protocol::Auto,
            learned_era: Some(Era::Stateless),
            min_idle: 1,
            max: 2,
            max_inflight: 1,
            request_timeout_ms: 5,
            status: PoolStatus::default(),
            handshake: Some(Handshake {
                era: Era::Stateless,
                protocol_version: "2026-07-28".into(),
                result: json!({}),
            }),
        };
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(v["mode"], "sticky");
        assert_eq!(v["modes"], json!(["sticky", "shared"]));
        assert_eq!(v["protocol"], "auto");
        assert_eq!(v["learned_era"], "stateless");
        assert_eq!(v["handshake"]["protocolVersion"], "2026-07-28");
        assert_eq!(serde_json::from_value::<PoolDescription>(v).unwrap(), d);
    }
}
