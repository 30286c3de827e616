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
pub mod on_demand;
pub mod reload;
pub mod socket;
mod tenants;

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
    /// Users, cgroups and the budget shared by every pool.
    node: Arc<crate::node::Node>,
    leases: Mutex<HashMap<String, LeaseRef>>,
    /// Seals servers' `requestState`s so retries reach their process.
    sealer: affinity::Sealer,
    metrics: Arc<Metrics>,
    tracker: TaskTracker,
    pools_shutdown: CancellationToken,
    draining: AtomicBool,
    active: AtomicUsize,
    idle: Notify,
    /// Open lease API connections.
    conns: TaskTracker,
    /// Lease API connections per peer and in all (`[broker]` front door).
    limiter: Arc<crate::web::conn_limit::ConnLimiter<String>>,
    /// Set while handing off or upgrading: answers close their connection.
    closing: AtomicBool,
    /// Set once the broker holds its listening socket.
    serving: AtomicBool,
    /// Set in a per-user broker: its on-demand pools.
    on_demand: std::sync::OnceLock<on_demand::Registry>,
    /// Set in a per-user broker: the only uid whose connections are served.
    owner: std::sync::OnceLock<u32>,
}

impl Broker {
    /// Creates every pool (they start warming immediately).
    pub fn start(config: Config, metrics: Arc<Metrics>) -> Arc<Broker> {
        Self::start_adopting(config, metrics, &[], None).0
    }

    /// Like [`Self::start`], adopting the processes of `previous` (the pool
    /// states an in-place upgrade passed) for every pool whose config is
    /// unchanged, and its `requestState` sealing key. Returns the broker
    /// and the pids it adopted.
    pub fn start_adopting(
        config: Config,
        metrics: Arc<Metrics>,
        previous: &[crate::pool::adopt::PoolState],
        sealer_key: Option<[u8; 32]>,
    ) -> (Arc<Broker>, Vec<u32>) {
        let tracker = TaskTracker::new();
        let pools_shutdown = CancellationToken::new();
        let ids = Arc::new(AtomicU64::new(0));
        let node = crate::node::Node::new(&config.broker.node);
        let door = &config.broker.front_door;
        let (limiter, lowered) = crate::web::conn_limit::ConnLimiter::fitted(
            door.max_connections,
            door.max_connections_per_peer,
        );
        if let Some(why) = lowered {
            tracing::warn!("lease API: {why}");
        }
        let broker = Arc::new(Broker {
            settings: config.broker,
            pools: RwLock::new(BTreeMap::new()),
            tenants: Mutex::new(HashMap::new()),
            reviewer: std::sync::OnceLock::new(),
            pods: std::sync::OnceLock::new(),
            ids,
            node,
            leases: Mutex::new(HashMap::new()),
            sealer: sealer_key.map_or_else(affinity::Sealer::new, affinity::Sealer::with_key),
            metrics,
            tracker,
            pools_shutdown,
            draining: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            idle: Notify::new(),
            conns: TaskTracker::new(),
            limiter,
            closing: AtomicBool::new(false),
            serving: AtomicBool::new(false),
            on_demand: std::sync::OnceLock::new(),
            owner: std::sync::OnceLock::new(),
        });
        let mut adopted = Vec::new();
        let pools = config
            .pools
            .into_iter()
            .map(|mut cfg| {
                cfg.max_message_size = broker.settings.max_message_size;
                let fp = crate::pool::adopt::fingerprint(&cfg);
                let name = cfg.name.clone();
                let pool = match previous
                    .iter()
                    .find(|p| p.name == name && p.fingerprint == fp)
                {
                    Some(state) => {
                        broker.metrics.init_pool(&name);
                        let (pool, pids) = Pool::start_adopted(
                            cfg,
                            broker.metrics.clone(),
                            broker.tracker.clone(),
                            broker.pools_shutdown.child_token(),
                            broker.ids.clone(),
                            broker.node.clone(),
                            state,
                        );
                        adopted.extend(pids);
                        pool
                    }
                    None => broker.start_pool(cfg),
                };
                (name, pool)
            })
            .collect();
        *broker.pools.write().expect("lock") = pools;
        broker.tracker.spawn(tenants::upkeep(
            Arc::downgrade(&broker),
            broker.pools_shutdown.clone(),
        ));
        (broker, adopted)
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
            self.node.clone(),
        )
    }

    /// What the node gives this broker: isolation, cgroups, budget (one
    /// line each, as logged at start).
    pub fn node_description(&self) -> Vec<String> {
        self.node.describe()
    }

    /// Whether `uid` belongs to the pool users this broker hands out.
    pub fn is_pool_user(&self, uid: u32) -> bool {
        self.node.isolates() && self.settings.node.uid_range.contains(&uid)
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

    /// Serves only connections whose peer runs as `uid` (a per-user
    /// broker); others are answered `403` and closed before any request is
    /// read. Called once at startup.
    pub fn restrict_to_uid(&self, uid: u32) {
        let _ = self.owner.set(uid);
    }

    /// The only uid served, when restricted.
    pub fn owner_uid(&self) -> Option<u32> {
        self.owner.get().copied()
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

    /// True once the broker holds its socket and every pool that keeps
    /// warm processes has one warm.
    pub fn ready(&self) -> bool {
        self.serving.load(Ordering::Acquire)
            && !self.is_draining()
            && !self.is_closing()
            && self
                .pools()
                .iter()
                .all(|p| p.config().min_idle == 0 || p.handshake().is_some())
    }

    /// True after shutdown began: new leases are refused.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// True while handing off or upgrading: each answer closes its
    /// connection, so clients reconnect (to the next broker or image).
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// True once the broker accepts on its lease socket.
    pub fn is_serving(&self) -> bool {
        self.serving.load(Ordering::Acquire)
    }

    /// Sets or clears [`Self::is_closing`].
    pub fn set_closing(&self, on: bool) {
        self.closing.store(on, Ordering::Release);
    }

    /// Leases in flight.
    pub fn active_leases(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Open lease API connections.
    pub fn open_connections(&self) -> usize {
        self.conns.len()
    }

    /// Accepts lease API connections on `listener` until `stop`; each is
    /// served until `conn_shutdown` finds it idle (or it ends).
    pub async fn accept(
        self: &Arc<Self>,
        listener: &UnixListener,
        stop: &CancellationToken,
        conn_shutdown: &CancellationToken,
    ) {
        self.serving.store(true, Ordering::Release);
        crate::web::accept_until(listener, stop, "lease API", |(stream, _)| {
            self.conns.spawn(conn::serve_connection(
                self.clone(),
                stream,
                self.limiter.clone(),
                None,
                conn_shutdown.clone(),
            ));
        })
        .await;
    }

    /// Waits up to `limit` until every lease API connection has closed
    /// (with [`Self::set_closing`] each closes after its next answer), or,
    /// with `until_idle`, until no lease is in flight (an upgrade: clients
    /// whose next request waits in the backlog will not use their other
    /// connections until the new image accepts); returns how many are
    /// still open.
    pub async fn quiesce(&self, limit: Duration, until_idle: bool) -> usize {
        let deadline = tokio::time::Instant::now() + limit;
        let done = || self.conns.is_empty() || (until_idle && self.active_leases() == 0);
        while !done() && tokio::time::Instant::now() < deadline {
            // Bounded poll: the tracker has no "became empty" signal that
            // survives reopening.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.conns.len()
    }

    /// Waits up to `limit` for leases in flight to end and warm-ups to
    /// finish; true if both reached zero.
    pub async fn settle(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let starting: usize = self.pools().iter().map(|p| p.starting()).sum();
            if self.active_leases() == 0 && starting == 0 {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            // Bounded poll of two counters owned by other tasks.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Freezes (or thaws) every pool: no process starts while frozen.
    pub fn freeze(&self, on: bool) {
        for p in self.pools() {
            p.freeze(on);
        }
    }

    /// The pools' states and the sealing key, for an in-place upgrade.
    pub fn export(&self) -> (Vec<crate::pool::adopt::PoolState>, [u8; 32]) {
        let pools = self.pools().iter().map(Pool::export).collect();
        (pools, self.sealer.key())
    }

    /// Our pipe fds of every live process (configured pools only).
    pub fn process_fds(&self) -> Vec<std::os::fd::RawFd> {
        self.pools()
            .iter()
            .flat_map(|p| p.processes())
            .flat_map(|w| w.pipe_fds())
            .collect()
    }

    /// Stops the lease API connections that are still open (idle ones
    /// close now, busy ones after their answer) and waits briefly for them.
    pub async fn close_connections(&self, conn_shutdown: &CancellationToken) {
        conn_shutdown.cancel();
        self.conns.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.conns.wait()).await;
        self.conns.reopen();
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
        self.accept(&listener, &shutdown, &shutdown).await;
        drop(listener);
        if let Some(p) = &socket_path {
            let _ = std::fs::remove_file(p);
        }
        self.drain().await;
        self.close_connections(&shutdown).await;
    }

    /// Serves one lease API connection accepted on the CSI socket of `pod`:
    /// every request on it is the pod's. `shutdown` closes it once idle.
    pub async fn serve_pod_connection(
        self: Arc<Self>,
        stream: tokio::net::UnixStream,
        pod: Arc<crate::policy::VolumePod>,
        shutdown: CancellationToken,
    ) {
        let limiter = self.limiter.clone();
        conn::serve_connection(self, stream, limiter, Some(pod), shutdown).await
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
