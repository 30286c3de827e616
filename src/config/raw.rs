//! The config file as written: serde structs that mirror the TOML exactly.
//!
//! Every struct denies unknown fields so a typo is an error, not a silently
//! ignored setting. Enums and durations are typed here, so serde reports a
//! bad value with its line and the accepted spellings; [`super`] applies
//! defaults and the cross-field checks into a validated [`super::Config`].

use super::{Mode, Protocol};
use crate::policy::Isolate;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// `[broker] identity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentityKind {
    /// Callers are identified by socket peer credentials only.
    None,
    /// ServiceAccount tokens are verified with the TokenReview API.
    Kubernetes,
}

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Daemon settings.
    #[serde(default)]
    pub broker: RawBroker,
    /// The pools, `[[pool]]` tables.
    #[serde(default)]
    pub pool: Vec<RawPool>,
    /// The CSI node plugin, when the section is present.
    pub csi: Option<super::csi::RawCsi>,
}

/// `[broker]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBroker {
    pub socket: Option<String>,
    pub socket_mode: Option<String>,
    pub socket_group: Option<String>,
    pub metrics_listen: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub drain_timeout: Option<Duration>,
    pub max_message_size: Option<usize>,
    /// Front-door limits ([`super::front_door`]). `read_timeout` (the
    /// first release's name) still reads as the head timeout.
    #[serde(default, with = "humantime_serde", alias = "read_timeout")]
    pub header_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub body_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub keepalive_timeout: Option<Duration>,
    pub max_connections: Option<usize>,
    pub max_connections_per_peer: Option<usize>,
    pub token_review_rate: Option<u32>,
    pub token_review_burst: Option<u32>,
    /// `none` or `kubernetes` (verify ServiceAccount tokens with TokenReview).
    pub identity: Option<IdentityKind>,
    /// Audience the proxies' projected tokens are minted for.
    pub token_audience: Option<String>,
    /// Longest reuse of a token verdict.
    #[serde(default, with = "humantime_serde")]
    pub token_cache_ttl: Option<Duration>,
    /// Identify callers' pods by socket peer credentials.
    pub peer_identity: Option<bool>,
    /// Node whose pods are indexed (default: `NODE_NAME`).
    pub node_name: Option<String>,
    /// `auto` (a uid per pool and tenant when the broker can switch users)
    /// or `off`.
    pub isolation: Option<Isolation>,
    /// uids (and gids) given to pools, `"FIRST-LAST"`.
    pub uid_range: Option<String>,
    /// Where the broker keeps pool users' homes and its uid assignments.
    pub state_dir: Option<String>,
    /// `auto` (a cgroup per pool when the broker's cgroup is delegated) or `off`.
    pub cgroups: Option<Isolation>,
    /// Server processes across every pool at most.
    pub max_processes: Option<usize>,
    /// Resident memory of server processes across every pool at most.
    pub max_memory: Option<toml::Value>,
    /// Pools started for isolated tenants, across every pool, at most.
    pub max_tenant_pools: Option<usize>,
    /// A tenant's pool that served nothing this long is stopped.
    #[serde(default, with = "humantime_serde")]
    pub tenant_idle_timeout: Option<Duration>,
}

/// `[broker] isolation` and `cgroups`: use the mechanism where it is
/// available, or never.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// On whenever the broker can (say at start when it cannot, and why).
    #[default]
    Auto,
    /// Off.
    Off,
}

/// `[pool.limits]`: the pool's share of the node, enforced by its cgroup.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// memory.max of the pool's cgroup: bytes or a string such as "512MiB".
    pub memory: Option<toml::Value>,
    /// pids.max: processes and threads of the whole pool.
    pub pids: Option<u64>,
    /// cpu.weight (1-10000, 100 is the kernel's default).
    pub cpu_weight: Option<u32>,
}

/// One `[[pool]]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    pub name: Option<String>,
    pub command: Option<String>,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub mode: Option<Mode>,
    /// The modes host sessions may ask for (`mode` among them).
    pub modes: Option<Vec<Mode>>,
    pub min_idle: Option<usize>,
    pub max: Option<usize>,
    pub max_inflight: Option<usize>,
    pub queue_limit: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub queue_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub request_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub init_timeout: Option<Duration>,
    /// How long the `server/discover` probe waits before `initialize`.
    #[serde(default, with = "humantime_serde")]
    pub probe_timeout: Option<Duration>,
    /// How long a sealed `requestState` stays valid.
    #[serde(default, with = "humantime_serde")]
    pub request_state_ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub session_idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub stop_grace: Option<Duration>,
    pub protocol: Option<Protocol>,
    /// Capabilities declared to servers at warm-up (a TOML table).
    pub client_capabilities: Option<toml::Table>,
    /// Who may lease from the pool.
    pub allow: Option<Vec<crate::policy::Rule>>,
    /// `none`, `namespace` or `service_account`.
    pub isolate: Option<Isolate>,
    /// Server→client requests waiting per lease at most.
    pub max_server_requests: Option<usize>,
    /// `[pool.sandbox]`: what the pool's processes may do.
    pub sandbox: Option<RawSandbox>,
    /// `[pool.limits]`: memory, pids and CPU weight of the whole pool.
    pub limits: Option<RawLimits>,
}

/// `[pool.sandbox]`: restrictions applied to each process before `exec`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSandbox {
    /// User name or numeric uid to run as.
    pub user: Option<String>,
    /// Group name or numeric gid to run as.
    pub group: Option<String>,
    /// Start from an empty environment.
    pub env_clear: Option<bool>,
    /// Broker variables passed through when `env_clear` is set.
    pub env_allow: Option<Vec<String>>,
    /// RLIMIT_NOFILE.
    pub max_open_files: Option<u64>,
    /// RLIMIT_AS: bytes, as a number or a string such as "512MiB".
    pub max_address_space: Option<toml::Value>,
    /// RLIMIT_NPROC (counted per user by the kernel).
    pub max_processes: Option<u64>,
    /// PR_SET_NO_NEW_PRIVS.
    pub no_new_privileges: Option<bool>,
    /// "host" (default) or "none".
    pub network: Option<Network>,
}

/// The network a process sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// The broker's own network (no change).
    #[default]
    Host,
    /// A fresh network namespace with only a loopback interface (down).
    None,
}
