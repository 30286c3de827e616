//! The config file as written: serde structs that mirror the TOML exactly.
//!
//! Every struct denies unknown fields so a typo is an error, not a silently
//! ignored setting. Values stay as strings and options here; [`super`] turns
//! them into a validated [`super::Config`] with durations and defaults.

use serde::Deserialize;
use std::collections::BTreeMap;

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
}

/// `[broker]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBroker {
    pub socket: Option<String>,
    pub socket_mode: Option<String>,
    pub socket_group: Option<String>,
    pub metrics_listen: Option<String>,
    pub drain_timeout: Option<String>,
    pub max_message_size: Option<usize>,
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
    pub mode: Option<String>,
    pub min_idle: Option<usize>,
    pub max: Option<usize>,
    pub max_inflight: Option<usize>,
    pub queue_limit: Option<usize>,
    pub queue_timeout: Option<String>,
    pub request_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub init_timeout: Option<String>,
    pub session_idle_timeout: Option<String>,
    pub stop_grace: Option<String>,
    pub protocol: Option<String>,
    /// Capabilities declared to servers at warm-up (a TOML table).
    pub client_capabilities: Option<toml::Table>,
    /// Accepted in the schema so the error can say it is not supported yet.
    pub allow: Option<toml::Value>,
    /// Accepted in the schema so the error can say it is not supported yet.
    pub isolate: Option<String>,
}
