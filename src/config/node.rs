//! `[broker]`'s node-wide settings and `[pool.limits]`, validated: how the
//! broker separates pools from each other and shares the node among them.
//!
//! Defaults isolate: a uid per pool and a cgroup per pool whenever the
//! broker can have them ([`crate::node`] decides at start and says so).
//! Budgets default to none (a node's size is the operator's to state).

use super::raw::{Isolation, RawBroker, RawLimits};
use super::sandbox::size_value;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

/// uids and gids handed to pools: far above login users (1000-60000),
/// systemd's dynamic users (61184-65519) and the usual `/etc/subuid`
/// ranges, below 2^31 so no tool misreads them as negative.
pub const DEFAULT_UID_RANGE: RangeInclusive<u32> = 2_000_000_000..=2_000_065_535;
/// Pool users' homes and the uid assignments.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/mcp-broker";
/// Tenant pools across every isolated pool at most.
pub const DEFAULT_MAX_TENANT_POOLS: usize = 64;
/// A tenant pool that served nothing this long is stopped.
pub const DEFAULT_TENANT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// Node-wide isolation and budgets.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSettings {
    /// A uid per pool and tenant when the broker can switch users.
    pub isolation: Isolation,
    /// Where pool uids come from.
    pub uid_range: RangeInclusive<u32>,
    /// Homes (`homes/<uid>`) and `uids` (the assignments, kept across restarts).
    pub state_dir: PathBuf,
    /// A cgroup per pool when the broker's own cgroup is delegated.
    pub cgroups: Isolation,
    /// Server processes across all pools at most; `None`: no limit.
    pub max_processes: Option<usize>,
    /// Resident bytes of server processes across all pools at most.
    pub max_memory: Option<u64>,
    /// Tenant pools at most (the least recently used idle one makes room).
    pub max_tenant_pools: usize,
    /// Idle time after which a tenant pool is stopped.
    pub tenant_idle_timeout: Duration,
}

impl Default for NodeSettings {
    fn default() -> Self {
        Self {
            isolation: Isolation::Auto,
            uid_range: DEFAULT_UID_RANGE,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            cgroups: Isolation::Auto,
            max_processes: None,
            max_memory: None,
            max_tenant_pools: DEFAULT_MAX_TENANT_POOLS,
            tenant_idle_timeout: DEFAULT_TENANT_IDLE_TIMEOUT,
        }
    }
}

/// A pool's limits, applied to its cgroup (or as rlimits without one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolLimits {
    /// memory.max: bytes the whole pool may use.
    pub memory: Option<u64>,
    /// pids.max: tasks the whole pool may run.
    pub pids: Option<u64>,
    /// cpu.weight: the pool's CPU share under contention.
    pub cpu_weight: Option<u32>,
}

impl PoolLimits {
    /// True when nothing is limited.
    pub fn is_empty(&self) -> bool {
        *self == PoolLimits::default()
    }
}

/// Parses `"FIRST-LAST"`.
pub fn parse_uid_range(s: &str) -> Result<RangeInclusive<u32>, String> {
    let bad = || format!("{s:?} is not a range like \"2000000000-2000065535\"");
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let a: u32 = a.trim().parse().map_err(|_| bad())?;
    let b: u32 = b.trim().parse().map_err(|_| bad())?;
    if a == 0 || a > b || b == u32::MAX {
        return Err(format!(
            "{s:?}: the range must be non-empty, exclude 0 (root) and 4294967295"
        ));
    }
    if a < 1000 {
        return Err(format!(
            "{s:?} starts among system accounts (below 1000); pick an unused range"
        ));
    }
    Ok(a..=b)
}

/// Validates the node-wide keys of `[broker]`; an error names the field.
pub fn from_raw(b: &RawBroker) -> Result<NodeSettings, (&'static str, String)> {
    let mut n = NodeSettings {
        isolation: b.isolation.unwrap_or_default(),
        cgroups: b.cgroups.unwrap_or_default(),
        max_processes: b.max_processes,
        max_tenant_pools: b.max_tenant_pools.unwrap_or(DEFAULT_MAX_TENANT_POOLS),
        tenant_idle_timeout: b.tenant_idle_timeout.unwrap_or(DEFAULT_TENANT_IDLE_TIMEOUT),
        ..NodeSettings::default()
    };
    if let Some(r) = &b.uid_range {
        n.uid_range = parse_uid_range(r).map_err(|m| ("uid_range", m))?;
    }
    if let Some(d) = &b.state_dir {
        if !d.starts_with('/') {
            return Err(("state_dir", format!("{d:?} must be an absolute path")));
        }
        n.state_dir = PathBuf::from(d);
    }
    if n.max_processes == Some(0) {
        return Err(("max_processes", "must be at least 1".into()));
    }
    if n.max_tenant_pools == 0 {
        return Err(("max_tenant_pools", "must be at least 1".into()));
    }
    n.max_memory = b
        .max_memory
        .as_ref()
        .map(|v| size_value("max_memory", v))
        .transpose()?;
    Ok(n)
}

/// Validates `[pool.limits]`; the field names carry the `limits.` prefix.
pub fn limits_from_raw(r: &RawLimits) -> Result<PoolLimits, (&'static str, String)> {
    let memory = r
        .memory
        .as_ref()
        .map(|v| size_value("limits.memory", v))
        .transpose()?;
    if memory.is_some_and(|m| m < 8 << 20) {
        return Err(("limits.memory", "must be at least 8MiB".into()));
    }
    if r.pids == Some(0) {
        return Err(("limits.pids", "must be at least 1".into()));
    }
    if r.cpu_weight.is_some_and(|w| !(1..=10_000).contains(&w)) {
        return Err(("limits.cpu_weight", "must be between 1 and 10000".into()));
    }
    Ok(PoolLimits {
        memory,
        pids: r.pids,
        cpu_weight: r.cpu_weight,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_ranges() {
        assert_eq!(parse_uid_range("70000-70009"), Ok(70000..=70009));
        assert!(parse_uid_range("0-10").is_err());
        assert!(parse_uid_range("500-600").unwrap_err().contains("system"));
        assert!(parse_uid_range("9-3").is_err());
        assert!(parse_uid_range("abc").is_err());
        assert!(parse_uid_range("5000-4294967295").is_err());
    }

    #[test]
    fn limits() {
        let r = RawLimits {
            memory: Some(toml::Value::String("64MiB".into())),
            pids: Some(32),
            cpu_weight: Some(50),
        };
        let l = limits_from_raw(&r).unwrap();
        assert_eq!(l.memory, Some(64 << 20));
        let tiny = RawLimits {
            memory: Some(toml::Value::Integer(1024)),
            ..RawLimits::default()
        };
        assert_eq!(limits_from_raw(&tiny).unwrap_err().0, "limits.memory");
        let weight = RawLimits {
            cpu_weight: Some(0),
            ..RawLimits::default()
        };
        assert_eq!(limits_from_raw(&weight).unwrap_err().0, "limits.cpu_weight");
    }
}
