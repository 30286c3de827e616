//! On-demand pools: the per-user broker's pools keyed by the command a
//! caller names (`mcp-broker connect -- CMD ARGS...`).
//!
//! Invariants:
//! * Only a broker started as `mcp-broker user-broker` has a [`Registry`]
//!   ([`super::Broker::enable_on_demand`]); every other broker answers the
//!   request with `403`, so a node or system broker never runs a command a
//!   caller names. The per-user broker refuses peers of another uid before
//!   any request is read (`broker::conn`), so the commands it runs are its
//!   own user's.
//! * One pool per distinct [`OnDemandRequest`] (command, args, cwd, chosen
//!   env, mode); concurrent first requests create it once (the registry's
//!   lock covers lookup and insert).
//! * The server's environment is the broker's base set ([`BASE_ENV`]) plus
//!   exactly the variables the caller chose; nothing else of the caller's or
//!   the broker's leaks in.
//! * A pool nobody used for `idle_timeout` (no request, no bound session, no
//!   connected shim) is removed and retired; the registry holds at most
//!   [`MAX_POOLS`] pools.

use super::api::ApiError;
use super::Broker;
use crate::config::{self, raw::RawPool, Mode, PoolConfig};
use crate::lease_api::{OnDemandPool, OnDemandRequest};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How long an on-demand pool stays after its last use.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// On-demand pools one per-user broker holds at most.
pub const MAX_POOLS: usize = 128;
/// Processes one sticky or exclusive on-demand pool runs at most (one per
/// host session, plus the spare).
pub const DEFAULT_MAX_PROCESSES: usize = 16;
/// Processes one shared on-demand pool runs at most (sessions take turns).
pub const DEFAULT_MAX_SHARED: usize = 4;
/// Broker variables every on-demand server gets (when the broker has them).
pub const BASE_ENV: &[&str] = &["PATH", "HOME", "USER", "LOGNAME", "LANG", "TMPDIR"];
/// Longest accepted command line (command plus args), in bytes.
const MAX_COMMAND_BYTES: usize = 64 * 1024;
/// How long a host request waits for a process of an on-demand pool. A
/// burst of exclusive sessions each waits for a cold start of its own, which
/// a spawned server would have made the host wait for too; on a loaded
/// laptop that takes longer than a node pool's queue allows (64 node servers
/// starting at once on 2 cores: ~45 s). Twice the default start timeout.
pub const QUEUE_TIMEOUT: Duration = Duration::from_secs(120);

/// What `mcp-broker user-broker` is told about its on-demand pools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnDemandSettings {
    /// How long a pool stays after its last use.
    pub idle_timeout: Duration,
    /// Processes per sticky or exclusive pool at most.
    pub max_processes: usize,
    /// Processes per shared pool at most.
    pub max_shared: usize,
}

impl Default for OnDemandSettings {
    fn default() -> Self {
        Self {
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_processes: DEFAULT_MAX_PROCESSES,
            max_shared: DEFAULT_MAX_SHARED,
        }
    }
}

/// One on-demand pool's bookkeeping.
struct Entry {
    name: String,
    last_active: Instant,
}

/// The per-user broker's on-demand pools, by request.
pub struct Registry {
    settings: OnDemandSettings,
    pools: Mutex<BTreeMap<OnDemandRequest, Entry>>,
    next: std::sync::atomic::AtomicU64,
}

impl Registry {
    /// An empty registry.
    pub fn new(settings: OnDemandSettings) -> Self {
        Self {
            settings,
            pools: Mutex::new(BTreeMap::new()),
            next: std::sync::atomic::AtomicU64::new(1),
        }
    }

    /// The settings it was made with.
    pub fn settings(&self) -> &OnDemandSettings {
        &self.settings
    }
}

/// The pool config an on-demand request stands for, validated like a
/// `[[pool]]` table.
pub fn pool_config(
    name: &str,
    req: &OnDemandRequest,
    settings: &OnDemandSettings,
    max_message: usize,
) -> Result<PoolConfig, ApiError> {
    if req.command.is_empty() {
        return Err(ApiError::BadRequest("command is empty".into()));
    }
    let len = req.command.len() + req.args.iter().map(String::len).sum::<usize>();
    if len > MAX_COMMAND_BYTES {
        return Err(ApiError::BadRequest(format!(
            "command line of {len} bytes is over the {MAX_COMMAND_BYTES}-byte limit"
        )));
    }
    if !std::path::Path::new(&req.cwd).is_absolute() {
        return Err(ApiError::BadRequest(format!(
            "cwd {:?} is not an absolute path",
            req.cwd
        )));
    }
    let raw = RawPool {
        name: Some(name.to_string()),
        command: Some(req.command.clone()),
        args: req.args.clone(),
        env: req.env.clone(),
        cwd: Some(req.cwd.clone()),
        mode: Some(req.mode),
        // One warm spare: a new host session never waits for a cold start.
        min_idle: Some(1),
        max: Some(match req.mode {
            Mode::Shared => settings.max_shared.max(1),
            Mode::Sticky | Mode::Exclusive => settings.max_processes.max(1),
        }),
        idle_timeout: Some(settings.idle_timeout),
        queue_timeout: Some(QUEUE_TIMEOUT),
        ..RawPool::default()
    };
    let mut cfg = config::pool_from_flags(raw, max_message)
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    cfg.sandbox.env_clear = true;
    cfg.sandbox.env_allow = BASE_ENV.iter().map(|s| s.to_string()).collect();
    Ok(cfg)
}

/// A pool name that says what runs in it: `od-N-PROGRAM`.
fn pool_name(n: u64, req: &OnDemandRequest) -> String {
    let program: String = std::path::Path::new(&req.command)
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(40)
        .collect();
    format!("od-{n}-{program}")
}

impl Broker {
    /// Makes this broker a per-user broker that creates on-demand pools.
    /// Called once at startup, before serving; later calls are ignored.
    pub fn enable_on_demand(&self, settings: OnDemandSettings) {
        let _ = self.on_demand.set(Registry::new(settings));
    }

    /// The pool for `req`, started on first use. Refused unless this is a
    /// per-user broker.
    pub fn on_demand_pool(&self, req: &OnDemandRequest) -> Result<OnDemandPool, ApiError> {
        let Some(reg) = self.on_demand.get() else {
            return Err(ApiError::NotAllowed(
                "this broker does not run commands that callers name; on-demand pools exist \
                 only in a per-user broker (mcp-broker user-broker)"
                    .into(),
            ));
        };
        if self.is_draining() {
            return Err(ApiError::Draining);
        }
        let mut pools = reg.pools.lock().expect("lock");
        if let Some(e) = pools.get_mut(req) {
            if self.pool(&e.name).is_some() {
                e.last_active = Instant::now();
                return Ok(OnDemandPool {
                    pool: e.name.clone(),
                    created: false,
                });
            }
        }
        if pools.len() >= MAX_POOLS {
            return Err(ApiError::NotAllowed(format!(
                "this per-user broker already runs {MAX_POOLS} on-demand pools"
            )));
        }
        let n = reg.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = pool_name(n, req);
        let cfg = pool_config(&name, req, &reg.settings, self.settings.max_message_size)?;
        tracing::info!(pool = %name, command = %req.command, args = ?req.args, mode = %req.mode, "on-demand pool created");
        let pool = self.start_pool(cfg);
        self.pools.write().expect("lock").insert(name.clone(), pool);
        pools.insert(
            req.clone(),
            Entry {
                name: name.clone(),
                last_active: Instant::now(),
            },
        );
        Ok(OnDemandPool {
            pool: name,
            created: true,
        })
    }

    /// Removes on-demand pools idle for `idle_timeout`; returns their names.
    pub fn reap_on_demand(&self, now: Instant) -> Vec<String> {
        let Some(reg) = self.on_demand.get() else {
            return Vec::new();
        };
        let mut pools = reg.pools.lock().expect("lock");
        let mut reaped = Vec::new();
        pools.retain(|_, e| {
            let pool = self.pool(&e.name);
            if pool.as_ref().is_some_and(|p| p.in_use()) {
                e.last_active = now;
                return true;
            }
            if pool.is_some() && now.duration_since(e.last_active) < reg.settings.idle_timeout {
                return true;
            }
            if let Some(p) = self.pools.write().expect("lock").remove(&e.name) {
                p.retire_gracefully();
            }
            reaped.push(e.name.clone());
            false
        });
        reaped
    }
}

/// Reaps idle on-demand pools until `shutdown`.
pub async fn reaper(broker: Arc<Broker>, shutdown: CancellationToken) {
    let Some(idle) = broker.on_demand.get().map(|r| r.settings.idle_timeout) else {
        return;
    };
    let tick = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        for name in broker.reap_on_demand(Instant::now()) {
            tracing::info!(pool = %name, "on-demand pool idle for {idle:?}: retired");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(cmd: &str) -> OnDemandRequest {
        OnDemandRequest {
            command: cmd.into(),
            args: vec!["-x".into()],
            cwd: "/".into(),
            env: BTreeMap::from([("K".into(), "V".into())]),
            mode: Mode::Exclusive,
        }
    }

    #[test]
    fn config_keeps_only_chosen_env_and_one_spare() {
        let c = pool_config("od-1-x", &req("/bin/x"), &OnDemandSettings::default(), 1024).unwrap();
        assert!(c.sandbox.env_clear);
        assert_eq!(c.env.get("K").map(String::as_str), Some("V"));
        assert_eq!(c.min_idle, 1);
        assert_eq!(c.mode, Mode::Exclusive);
        assert_eq!(c.max, DEFAULT_MAX_PROCESSES);
        // A burst of sessions waits for its cold starts, not for a node
        // pool's queue timeout.
        assert_eq!(c.queue_timeout, QUEUE_TIMEOUT);
        let mut shared = req("/bin/x");
        shared.mode = Mode::Shared;
        let c = pool_config("p", &shared, &OnDemandSettings::default(), 1024).unwrap();
        assert_eq!(c.max, DEFAULT_MAX_SHARED);
    }

    #[test]
    fn bad_requests_are_refused_with_a_reason() {
        let mut r = req("");
        assert!(pool_config("p", &r, &OnDemandSettings::default(), 1024)
            .unwrap_err()
            .to_string()
            .contains("command is empty"));
        r = req("x");
        r.cwd = "relative".into();
        assert!(pool_config("p", &r, &OnDemandSettings::default(), 1024)
            .unwrap_err()
            .to_string()
            .contains("absolute"));
    }

    #[test]
    fn names_say_what_runs() {
        assert_eq!(pool_name(3, &req("/usr/bin/npx")), "od-3-npx");
        assert_eq!(pool_name(4, &req("a b/c$d")), "od-4-cd");
    }
}
