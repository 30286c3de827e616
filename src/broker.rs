//! The node daemon: every configured pool plus the lease API on a Unix socket.
//!
//! [`Broker::start`] builds the pools (they begin warming at once);
//! [`Broker::serve`] answers the lease API on a listener until the shutdown
//! token fires, then drains: it stops accepting, refuses new leases, waits up
//! to `drain_timeout` for in-flight leases, stops every process and removes
//! the socket. The wire contract lives in [`api`]; one lease's life in
//! [`lease`].

pub mod affinity;
pub mod api;
mod conn;
mod error;
pub mod lease;
pub mod local;
pub mod reload;
pub mod socket;

use crate::config::{BrokerSettings, Config};
use crate::metrics::Metrics;
use crate::policy::{PodLookup, TokenVerifier};
use crate::pool::Pool;
use crate::process::Process;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::net::UnixListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Isolated tenants one pool serves at most.
pub const MAX_TENANTS: usize = 256;
/// How long to wait for pool tasks and reapers after processes were stopped.
const STOP_TASKS_TIMEOUT: Duration = Duration::from_secs(10);

/// A lease that clients may still send answers into.
#[derive(Clone)]
pub struct LeaseRef {
    /// The process serving the lease and the lease's id inside its router;
    /// `None` while the request still waits for a process.
    pub process: Option<(Arc<Process>, u64)>,
    /// Fired when the client cancels the request.
    pub cancel: CancellationToken,
}

/// The broker: pools, live leases and shutdown state.
pub struct Broker {
    settings: BrokerSettings,
    /// Copy-on-write: readers clone a handle; [`Broker::reload`] swaps pools.
    pools: RwLock<BTreeMap<String, Pool>>,
    /// Per-identity pools of `isolate`d pools: base name → tenant → pool.
    tenants: Mutex<HashMap<String, HashMap<String, Pool>>>,
    reviewer: std::sync::OnceLock<Box<dyn TokenVerifier>>,
    pods: std::sync::OnceLock<Box<dyn PodLookup>>,
    ids: Arc<AtomicU64>,
    leases: Mutex<HashMap<String, LeaseRef>>,
    /// Seals servers' `requestState`s so retries reach their process.
    sealer: affinity::Sealer,
    metrics: Arc<Metrics>,
    tracker: TaskTracker,
    pools_shutdown: CancellationToken,
    draining: AtomicBool,
    active: AtomicUsize,
    idle: Notify,
}

impl Broker {
    /// Creates every pool (they start warming immediately).
    pub fn start(config: Config, metrics: Arc<Metrics>) -> Arc<Broker> {
        let tracker = TaskTracker::new();
        let pools_shutdown = CancellationToken::new();
        let ids = Arc::new(AtomicU64::new(0));
        let broker = Arc::new(Broker {
            settings: config.broker,
            pools: RwLock::new(BTreeMap::new()),
            tenants: Mutex::new(HashMap::new()),
            reviewer: std::sync::OnceLock::new(),
            pods: std::sync::OnceLock::new(),
            ids,
            leases: Mutex::new(HashMap::new()),
            sealer: affinity::Sealer::new(),
            metrics,
            tracker,
            pools_shutdown,
            draining: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            idle: Notify::new(),
        });
        let pools = config
            .pools
            .into_iter()
            .map(|cfg| (cfg.name.clone(), broker.start_pool(cfg)))
            .collect();
        *broker.pools.write().expect("lock") = pools;
        broker
    }

    /// Starts one pool (configured, reloaded, or an isolated tenant's) under
    /// the broker's message limit, metrics and shutdown.
    fn start_pool(&self, mut cfg: crate::config::PoolConfig) -> Pool {
        cfg.max_message_size = self.settings.max_message_size;
        self.metrics.init_pool(&cfg.name);
        Pool::start(
            cfg,
            self.metrics.clone(),
            self.tracker.clone(),
            self.pools_shutdown.child_token(),
            self.ids.clone(),
        )
    }

    /// Daemon settings.
    pub fn settings(&self) -> &BrokerSettings {
        &self.settings
    }

    /// The metrics registry the broker reports to.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// A pool by name.
    pub fn pool(&self, name: &str) -> Option<Pool> {
        self.pools.read().expect("lock").get(name).cloned()
    }

    /// Every pool, by name.
    pub fn pools(&self) -> Vec<Pool> {
        self.pools.read().expect("lock").values().cloned().collect()
    }

    /// Installs the ServiceAccount token verifier (`identity = "kubernetes"`).
    pub fn set_token_reviewer(&self, r: impl TokenVerifier) {
        let _ = self.reviewer.set(Box::new(r));
    }

    /// Installs the node's pod index (`peer_identity = true`).
    pub fn set_pod_index(&self, idx: impl PodLookup) {
        let _ = self.pods.set(Box::new(idx));
    }

    /// The pod index, if callers' pods are looked up.
    pub fn pod_index(&self) -> Option<&dyn PodLookup> {
        self.pods.get().map(|b| &**b)
    }

    /// The token verifier, if identities are verified.
    pub fn token_reviewer(&self) -> Option<&dyn TokenVerifier> {
        self.reviewer.get().map(|b| &**b)
    }

    /// The pool of `base` reserved for `tenant` (an `isolate`d pool), started
    /// on first use; at most [`MAX_TENANTS`] per pool.
    pub fn tenant_pool(&self, base: &Pool, tenant: &str) -> Result<Pool, String> {
        let name = &base.config().name;
        let mut all = self.tenants.lock().expect("lock");
        let mine = all.entry(name.clone()).or_default();
        if let Some(p) = mine.get(tenant) {
            return Ok(p.clone());
        }
        if mine.len() >= MAX_TENANTS {
            return Err(format!(
                "pool {name:?} already serves {MAX_TENANTS} isolated tenants"
            ));
        }
        let mut cfg = base.config().clone();
        cfg.name = format!("{name}@{tenant}");
        let pool = self.start_pool(cfg);
        mine.insert(tenant.to_string(), pool.clone());
        Ok(pool)
    }

    /// Reconciles the pools with `configs`: new pools start warming, removed
    /// ones and ones whose config changed are retired gracefully (their
    /// in-flight leases finish; a changed pool's replacement serves new
    /// leases at once), unchanged ones are left alone.
    pub fn reload(&self, configs: Vec<crate::config::PoolConfig>) -> reload::Summary {
        let mut summary = reload::Summary::default();
        let mut retired = Vec::new();
        {
            let mut pools = self.pools.write().expect("lock");
            let mut next = BTreeMap::new();
            for mut cfg in configs {
                cfg.max_message_size = self.settings.max_message_size;
                match pools.remove(&cfg.name) {
                    Some(old) if *old.config() == cfg => {
                        summary.unchanged.push(cfg.name.clone());
                        next.insert(cfg.name.clone(), old);
                        continue;
                    }
                    Some(old) => {
                        summary.changed.push(cfg.name.clone());
                        retired.push(old);
                    }
                    None => summary.added.push(cfg.name.clone()),
                }
                let name = cfg.name.clone();
                next.insert(name, self.start_pool(cfg));
            }
            for (name, old) in std::mem::take(&mut *pools) {
                summary.removed.push(name);
                retired.push(old);
            }
            *pools = next;
        }
        {
            let mut tenants = self.tenants.lock().expect("lock");
            for name in summary.changed.iter().chain(&summary.removed) {
                retired.extend(
                    tenants
                        .remove(name)
                        .into_iter()
                        .flat_map(|m| m.into_values()),
                );
            }
        }
        for p in retired {
            p.retire_gracefully();
        }
        summary
    }

    /// True once every pool that keeps warm processes has one warm.
    pub fn ready(&self) -> bool {
        !self.is_draining()
            && self
                .pools()
                .iter()
                .all(|p| p.config().min_idle == 0 || p.handshake().is_some())
    }

    /// True after shutdown began: new leases are refused.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    fn lease_started(&self) {
        self.active.fetch_add(1, Ordering::AcqRel);
    }

    fn lease_ended(&self) {
        if self.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }

    /// Serves the lease API on `listener` until `shutdown`, then drains and
    /// stops every process. `socket_path`, if given, is removed at the end.
    pub async fn serve(
        self: Arc<Self>,
        listener: UnixListener,
        socket_path: Option<std::path::PathBuf>,
        shutdown: CancellationToken,
    ) {
        let conns = TaskTracker::new();
        crate::web::accept_until(&listener, &shutdown, "lease API", |(stream, _)| {
            conns.spawn(conn::serve_connection(
                self.clone(),
                stream,
                shutdown.clone(),
            ));
        })
        .await;
        drop(listener);
        if let Some(p) = &socket_path {
            let _ = std::fs::remove_file(p);
        }
        self.drain().await;
        conns.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), conns.wait()).await;
    }

    /// Refuses new leases, waits for in-flight ones, stops all processes.
    pub async fn drain(&self) {
        self.draining.store(true, Ordering::Release);
        let deadline = tokio::time::Instant::now() + self.settings.drain_timeout;
        loop {
            let idle = self.idle.notified();
            let n = self.active.load(Ordering::Acquire);
            if n == 0 {
                break;
            }
            tracing::info!(in_flight = n, "draining leases");
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                tracing::warn!(
                    in_flight = n,
                    "drain timeout: stopping processes with leases in flight"
                );
                break;
            }
        }
        self.pools_shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout(STOP_TASKS_TIMEOUT, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("some pool tasks did not finish within {STOP_TASKS_TIMEOUT:?}");
        }
        tracing::info!("all processes stopped");
    }
}
