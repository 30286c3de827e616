//! Typed, validated configuration for the broker daemon.
//!
//! [`raw`] mirrors the TOML; [`Config::from_toml`] validates it into the
//! types the rest of the crate uses, so no other module ever sees a missing
//! value or an unparsed duration. Every error names the pool and the field.

pub mod csi;
mod describe;
pub mod front_door;
mod modes;
pub use modes::Mode;
pub mod node;
pub mod raw;
pub mod sandbox;

pub use describe::describe;
pub use front_door::FrontDoor;
pub use node::{NodeSettings, PoolLimits};
use raw::{RawConfig, RawPool};
pub use sandbox::SandboxConfig;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Default path of the lease API socket.
pub const DEFAULT_SOCKET: &str = "/run/mcp-broker/broker.sock";
/// Default permission bits of the socket file.
pub const DEFAULT_SOCKET_MODE: u32 = 0o660;
/// Default metrics/health listener (the port ToolHive's diagnostics use), on
/// loopback: exposing it beyond the node is a choice (the DaemonSet's
/// config makes it, for the scraper and the kubelet's probes).
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";
/// Default time to let in-flight leases finish on shutdown.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default largest JSON-RPC message, in bytes, in either direction.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;
/// Default warm idle processes per pool.
pub const DEFAULT_MIN_IDLE: usize = 1;
/// Default process cap per pool.
pub const DEFAULT_MAX: usize = 4;
/// Default concurrent requests one process takes.
pub const DEFAULT_MAX_INFLIGHT: usize = 1;
/// Default waiting requests per pool.
pub const DEFAULT_QUEUE_LIMIT: usize = 256;
/// Default longest wait for a free process.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default longest time a process may take to answer.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Default idle time after which processes above `min_idle` stop.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Default time a new process has to start and finish its handshake.
pub const DEFAULT_INIT_TIMEOUT: Duration = Duration::from_secs(60);
/// Default idle time after which an exclusive/sticky session is forgotten.
pub const DEFAULT_SESSION_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Default cap on server→client requests (sampling, elicitation, roots)
/// waiting for the client per lease; more are refused to the server.
pub const DEFAULT_MAX_SERVER_REQUESTS: usize = 64;
/// Default audience of the projected ServiceAccount tokens proxies present.
pub const DEFAULT_TOKEN_AUDIENCE: &str = "mcp-broker";
/// Default longest reuse of a token verdict.
pub const DEFAULT_TOKEN_CACHE_TTL: Duration = Duration::from_secs(300);
/// Default time a `server/discover` probe waits before the same process is
/// sent `initialize` (`protocol = "auto"`). Short: servers that ignore the
/// probe would otherwise spend the whole warm-up on it.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Default validity of a sealed `requestState`: how long a client may take
/// to retry a multi-round-trip request, and how long its process is kept.
pub const DEFAULT_REQUEST_STATE_TTL: Duration = Duration::from_secs(600);
/// Default time between SIGTERM and SIGKILL when stopping a process.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(3);

/// A config problem, naming where it is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
    #[error("{at}: `{field}`: {msg}")]
    Invalid {
        at: String,
        field: &'static str,
        msg: String,
    },
}

/// Which MCP era the broker should expect a pool's server to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Probe `server/discover`, fall back to `initialize`.
    #[default]
    Auto,
    /// Only `initialize` (2025-11-25 and before).
    Legacy,
    /// Only `server/discover` (2026-07-28, stateless).
    Stateless,
}

/// The config and flag spelling of a value enum (one source: its
/// `clap::ValueEnum` names, which the serde names match).
fn spelling(v: &impl clap::ValueEnum) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_string())
        .unwrap_or_default()
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&spelling(self))
    }
}

/// Daemon-wide settings.
#[derive(Debug, Clone, PartialEq)]
pub struct BrokerSettings {
    /// Lease API socket path.
    pub socket: PathBuf,
    /// Permission bits for the socket file.
    pub socket_mode: u32,
    /// Group to own the socket file, if any.
    pub socket_group: Option<String>,
    /// Metrics/health listener; `None` disables it.
    pub metrics_listen: Option<SocketAddr>,
    /// How long shutdown waits for in-flight leases.
    pub drain_timeout: Duration,
    /// Largest message accepted from a client or a process.
    pub max_message_size: usize,
    /// Timeouts and connection caps of the lease API, and the TokenReview
    /// rate limit.
    pub front_door: FrontDoor,
    /// Kubernetes token verification; `None` when callers are identified by
    /// socket peer credentials only.
    pub kubernetes: Option<KubeSettings>,
    /// Isolation between pools and the node-wide budget.
    pub node: NodeSettings,
    /// The CSI node plugin (`[csi]`); `None` when the section is absent.
    pub csi: Option<csi::CsiSettings>,
}

/// `[broker] identity = "kubernetes"`.
#[derive(Debug, Clone, PartialEq)]
pub struct KubeSettings {
    /// Token audience the broker accepts.
    pub audience: String,
    /// Longest reuse of a verdict.
    pub cache_ttl: Duration,
    /// Identify callers' pods from socket peer credentials (needs hostPID).
    pub peer_identity: bool,
    /// The node whose pods are indexed (`NODE_NAME` by default).
    pub node_name: Option<String>,
}

impl Default for BrokerSettings {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(DEFAULT_SOCKET),
            socket_mode: DEFAULT_SOCKET_MODE,
            socket_group: None,
            metrics_listen: Some(DEFAULT_METRICS_LISTEN.parse().expect("valid default")),
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            front_door: FrontDoor::default(),
            kubernetes: None,
            node: NodeSettings::default(),
            csi: None,
        }
    }
}

/// One validated pool.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    pub name: String,
    pub command: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<PathBuf>,
    /// How sessions that name no mode use the pool.
    pub mode: Mode,
    /// Other modes a session may ask for (`modes`); empty: only `mode`.
    /// Read through [`PoolConfig::allows`].
    pub modes: Vec<Mode>,
    pub min_idle: usize,
    pub max: usize,
    pub max_inflight: usize,
    pub queue_limit: usize,
    pub queue_timeout: Duration,
    pub request_timeout: Duration,
    pub idle_timeout: Duration,
    pub init_timeout: Duration,
    /// How long the `server/discover` probe waits (`protocol = "auto"`).
    pub probe_timeout: Duration,
    /// How long a sealed `requestState` stays valid.
    pub request_state_ttl: Duration,
    pub session_idle_timeout: Duration,
    pub stop_grace: Duration,
    pub protocol: Protocol,
    pub max_message_size: usize,
    /// Capabilities the broker declares for clients when warming a process.
    pub client_capabilities: serde_json::Value,
    /// Who may lease; `None`: anyone who can reach the socket.
    pub allow: Option<Vec<crate::policy::Rule>>,
    /// Separate warm processes per caller identity.
    pub isolate: crate::policy::Isolate,
    /// Server→client requests waiting for the client per lease at most.
    pub max_server_requests: usize,
    /// Restrictions applied to every process (`[pool.sandbox]`).
    pub sandbox: SandboxConfig,
    /// The pool's cgroup limits (`[pool.limits]`).
    pub limits: PoolLimits,
}

impl PoolConfig {
    /// A pool with every default, for `up` and tests.
    pub fn new(name: &str, command: &str, args: Vec<String>) -> Self {
        Self {
            name: name.to_string(),
            command: command.to_string(),
            args,
            env: BTreeMap::new(),
            cwd: None,
            mode: Mode::Shared,
            modes: Vec::new(),
            min_idle: DEFAULT_MIN_IDLE,
            max: DEFAULT_MAX,
            max_inflight: DEFAULT_MAX_INFLIGHT,
            queue_limit: DEFAULT_QUEUE_LIMIT,
            queue_timeout: DEFAULT_QUEUE_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            init_timeout: DEFAULT_INIT_TIMEOUT,
            probe_timeout: DEFAULT_PROBE_TIMEOUT,
            request_state_ttl: DEFAULT_REQUEST_STATE_TTL,
            session_idle_timeout: DEFAULT_SESSION_IDLE_TIMEOUT,
            stop_grace: DEFAULT_STOP_GRACE,
            protocol: Protocol::Auto,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            client_capabilities: crate::protocol::client_capabilities(),
            allow: None,
            isolate: crate::policy::Isolate::None,
            max_server_requests: DEFAULT_MAX_SERVER_REQUESTS,
            sandbox: SandboxConfig::default(),
            limits: PoolLimits::default(),
        }
    }

    /// Checks the cross-field rules shared by the file and the `up` flags.
    pub fn check(&self) -> Result<(), ConfigError> {
        let at = format!("pool {:?}", self.name);
        let bad = |field, msg: &str| ConfigError::Invalid {
            at: at.clone(),
            field,
            msg: msg.to_string(),
        };
        if self.command.trim().is_empty() {
            return Err(bad("command", "must not be empty"));
        }
        if self.max == 0 {
            return Err(bad("max", "must be at least 1"));
        }
        if self.min_idle > self.max {
            return Err(bad(
                "min_idle",
                &format!(
                    "{} is greater than max ({}); min_idle must be <= max",
                    self.min_idle, self.max
                ),
            ));
        }
        if self.max_inflight == 0 {
            return Err(bad("max_inflight", "must be at least 1"));
        }
        modes::check(self).map_err(|msg| bad("modes", &msg))?;
        if self.mode == Mode::Exclusive && self.max_inflight > 1 {
            // A session owns its process; sharing slots would break that.
            return Err(bad(
                "max_inflight",
                "exclusive pools serve one session per process; use max_inflight = 1",
            ));
        }
        for (field, d) in [
            ("queue_timeout", self.queue_timeout),
            ("request_timeout", self.request_timeout),
            ("init_timeout", self.init_timeout),
            ("probe_timeout", self.probe_timeout),
            ("request_state_ttl", self.request_state_ttl),
        ] {
            if d.is_zero() {
                return Err(bad(field, "must be greater than zero"));
            }
        }
        if self.probe_timeout >= self.init_timeout {
            return Err(bad(
                "probe_timeout",
                &format!(
                    "{:?} leaves no time for initialize within init_timeout ({:?})",
                    self.probe_timeout, self.init_timeout
                ),
            ));
        }
        for (key, value) in &self.env {
            if key.is_empty() || key.contains('=') || key.contains('\0') || value.contains('\0') {
                return Err(bad(
                    "env",
                    &format!("{key:?} is not a valid variable name (no '=' or NUL, not empty)"),
                ));
            }
        }
        if self.cwd.as_ref().is_some_and(|d| d.as_os_str().is_empty()) {
            return Err(bad("cwd", "must not be empty"));
        }
        Ok(())
    }
}

/// The whole validated config.
#[derive(Debug, Clone)]
pub struct Config {
    pub broker: BrokerSettings,
    pub pools: Vec<PoolConfig>,
}

/// Parses a duration such as `30s`, `5m`, `1h30m`, `250ms`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration ({e}); use e.g. \"250ms\", \"30s\", \"5m\""))
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text)
    }

    /// Parses and validates config text.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: RawConfig) -> Result<Config, ConfigError> {
        let b = raw.broker;
        let front_door = front_door::from_raw(&b)?;
        let at = || "[broker]".to_string();
        let node = node::from_raw(&b).map_err(|(field, msg)| ConfigError::Invalid {
            at: at(),
            field,
            msg,
        })?;
        let socket_mode = match b.socket_mode {
            None => DEFAULT_SOCKET_MODE,
            Some(s) => u32::from_str_radix(s.trim_start_matches("0o"), 8)
                .ok()
                .filter(|m| *m <= 0o777)
                .ok_or_else(|| ConfigError::Invalid {
                    at: at(),
                    field: "socket_mode",
                    msg: format!("{s:?} is not an octal mode like \"0660\""),
                })?,
        };
        let metrics_listen = match b.metrics_listen.as_deref() {
            None => Some(DEFAULT_METRICS_LISTEN.parse().expect("valid default")),
            Some("") => None,
            Some(s) => Some(s.parse().map_err(|_| ConfigError::Invalid {
                at: at(),
                field: "metrics_listen",
                msg: format!("{s:?} is not an address like \"0.0.0.0:9464\" (\"\" disables)"),
            })?),
        };
        let max_message_size = b.max_message_size.unwrap_or(DEFAULT_MAX_MESSAGE_SIZE);
        if max_message_size < 1024 {
            return Err(ConfigError::Invalid {
                at: at(),
                field: "max_message_size",
                msg: "must be at least 1024 bytes".into(),
            });
        }
        let broker = BrokerSettings {
            node,
            socket: PathBuf::from(b.socket.unwrap_or_else(|| DEFAULT_SOCKET.to_string())),
            socket_mode,
            socket_group: b.socket_group,
            metrics_listen,
            drain_timeout: b.drain_timeout.unwrap_or(DEFAULT_DRAIN_TIMEOUT),
            front_door,
            max_message_size,
            csi: raw.csi.map(csi::RawCsi::validate).transpose()?,
            kubernetes: match b.identity {
                None | Some(raw::IdentityKind::None) if b.peer_identity == Some(true) => {
                    return Err(ConfigError::Invalid {
                        at: at(),
                        field: "peer_identity",
                        msg: "needs identity = \"kubernetes\" (pods are looked up in the API)"
                            .into(),
                    })
                }
                None | Some(raw::IdentityKind::None) => None,
                Some(raw::IdentityKind::Kubernetes) => Some(KubeSettings {
                    audience: b
                        .token_audience
                        .unwrap_or_else(|| DEFAULT_TOKEN_AUDIENCE.into()),
                    cache_ttl: b.token_cache_ttl.unwrap_or(DEFAULT_TOKEN_CACHE_TTL),
                    peer_identity: b.peer_identity.unwrap_or(false),
                    node_name: b.node_name.or_else(|| std::env::var("NODE_NAME").ok()),
                })
                .filter(|k| !k.peer_identity || k.node_name.is_some())
                .ok_or_else(|| ConfigError::Invalid {
                    at: at(),
                    field: "node_name",
                    msg: "peer_identity needs the node name: set node_name or NODE_NAME".into(),
                })
                .map(Some)?,
            },
        };
        let mut seen = HashSet::new();
        let mut pools = Vec::new();
        for (i, p) in raw.pool.into_iter().enumerate() {
            let peer = broker.kubernetes.as_ref().is_some_and(|k| k.peer_identity);
            // Kubernetes identities come from verified tokens or from the
            // kubelet (pods' CSI sockets).
            let kube = broker.kubernetes.is_some() || broker.csi.is_some();
            let pool = pool_from_raw(i, p, max_message_size, kube, peer)?;
            if !seen.insert(pool.name.clone()) {
                return Err(ConfigError::Invalid {
                    at: format!("pool {:?}", pool.name),
                    field: "name",
                    msg: "duplicate pool name".into(),
                });
            }
            pools.push(pool);
        }
        Ok(Config { broker, pools })
    }
}

/// A pool from `up`'s flags, validated exactly like a `[[pool]]` table.
pub fn pool_from_flags(p: RawPool, max_message_size: usize) -> Result<PoolConfig, ConfigError> {
    pool_from_raw(0, p, max_message_size, false, false)
}

fn pool_from_raw(
    index: usize,
    p: RawPool,
    max_message_size: usize,
    kube: bool,
    peer_identity: bool,
) -> Result<PoolConfig, ConfigError> {
    let name = p.name.clone().unwrap_or_default();
    let at = if name.is_empty() {
        format!("pool #{}", index + 1)
    } else {
        format!("pool {name:?}")
    };
    let bad = |field: &'static str, msg: String| ConfigError::Invalid {
        at: at.clone(),
        field,
        msg,
    };
    if name.is_empty() {
        return Err(bad("name", "is required".into()));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(bad(
            "name",
            format!("{name:?} may only contain letters, digits, '-', '_' and '.'"),
        ));
    }
    let needs_kube = |field: &'static str| {
        bad(
            field,
            "matching Kubernetes identities needs [broker] identity = \"kubernetes\" \
             or a [csi] section"
                .into(),
        )
    };
    if let Some(rules) = &p.allow {
        if rules.is_empty() {
            return Err(bad(
                "allow",
                "an empty list allows nobody; omit `allow` to allow every caller".into(),
            ));
        }
        for r in rules {
            r.validate().map_err(|(field, msg)| bad(field, msg))?;
            if r.needs_kubernetes() && !kube {
                return Err(needs_kube("allow"));
            }
            if r.pod_labels.is_some() && !peer_identity {
                return Err(bad(
                    "allow.pod_labels",
                    "matching pod labels needs [broker] peer_identity = true".into(),
                ));
            }
        }
    }
    let isolate = p.isolate.unwrap_or_default();
    if isolate.needs_kubernetes() && !kube {
        return Err(needs_kube("isolate"));
    }
    let mut c = PoolConfig::new(&name, p.command.as_deref().unwrap_or(""), p.args.clone());
    c.env = p.env.clone();
    c.cwd = p.cwd.as_ref().map(PathBuf::from);
    c.mode = p.mode.unwrap_or_default();
    c.modes = p.modes.clone().unwrap_or_default();
    c.min_idle = p.min_idle.unwrap_or(DEFAULT_MIN_IDLE);
    c.max = p.max.unwrap_or(DEFAULT_MAX.max(c.min_idle));
    c.max_inflight = p.max_inflight.unwrap_or(DEFAULT_MAX_INFLIGHT);
    c.queue_limit = p.queue_limit.unwrap_or(DEFAULT_QUEUE_LIMIT);
    c.queue_timeout = p.queue_timeout.unwrap_or(DEFAULT_QUEUE_TIMEOUT);
    c.request_timeout = p.request_timeout.unwrap_or(DEFAULT_REQUEST_TIMEOUT);
    c.idle_timeout = p.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT);
    c.init_timeout = p.init_timeout.unwrap_or(DEFAULT_INIT_TIMEOUT);
    c.probe_timeout = p.probe_timeout.unwrap_or(DEFAULT_PROBE_TIMEOUT);
    c.request_state_ttl = p.request_state_ttl.unwrap_or(DEFAULT_REQUEST_STATE_TTL);
    c.session_idle_timeout = p
        .session_idle_timeout
        .unwrap_or(DEFAULT_SESSION_IDLE_TIMEOUT);
    c.stop_grace = p.stop_grace.unwrap_or(DEFAULT_STOP_GRACE);
    c.protocol = p.protocol.unwrap_or_default();
    c.max_message_size = max_message_size;
    c.allow = p.allow.clone();
    c.isolate = isolate;
    if let Some(caps) = &p.client_capabilities {
        c.client_capabilities = serde_json::to_value(caps)
            .ok()
            .filter(serde_json::Value::is_object)
            .ok_or_else(|| {
                bad(
                    "client_capabilities",
                    "must be a table, e.g. { sampling = {} }".into(),
                )
            })?;
    }
    c.max_server_requests = p.max_server_requests.unwrap_or(DEFAULT_MAX_SERVER_REQUESTS);
    if c.max_server_requests == 0 {
        return Err(bad("max_server_requests", "must be at least 1".into()));
    }
    if let Some(sb) = &p.sandbox {
        c.sandbox = sandbox::from_raw(sb).map_err(|(field, msg)| bad(field, msg))?;
    }
    if let Some(l) = &p.limits {
        c.limits = node::limits_from_raw(l).map_err(|(field, msg)| bad(field, msg))?;
    }
    c.check()?;
    Ok(c)
}

#[cfg(test)]
mod tests;
