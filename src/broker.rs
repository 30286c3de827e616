//! The node daemon: every configured pool plus the lease API on a Unix socket.
//!
//! [`Broker::start`] builds the pools (they begin warming at once);
//! [`Broker::serve`] answers the lease API on a listener until the shutdown
//! token fires, then drains: it stops accepting, refuses new leases, waits up
//! to `drain_timeout` for in-flight leases, stops every process and removes
//! the socket. The wire contract lives in [`api`]; one lease's life in
//! [`lease`].

pub mod api;
pub mod lease;
pub mod listen;

use crate::config::{BrokerSettings, Config};
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::process::Worker;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
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
    /// The process serving the lease.
    pub worker: Arc<Worker>,
    /// The lease's id inside that process's router.
    pub lid: u64,
    /// The pool it came from.
    pub pool: String,
    /// Fired when the client cancels the request.
    pub cancel: CancellationToken,
}

/// The broker: pools, live leases and shutdown state.
pub struct Broker {
    settings: BrokerSettings,
    pools: BTreeMap<String, Pool>,
    leases: Mutex<HashMap<String, LeaseRef>>,
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
        let pools = config
            .pools
            .into_iter()
            .map(|mut cfg| {
                cfg.max_message_size = config.broker.max_message_size;
                let name = cfg.name.clone();
                let pool = Pool::start(
                    cfg,
                    metrics.clone(),
                    tracker.clone(),
                    pools_shutdown.clone(),
                    ids.clone(),
                );
                (name, pool)
            })
            .collect();
        Arc::new(Broker {
            settings: config.broker,
            pools,
            leases: Mutex::new(HashMap::new()),
            metrics,
            tracker,
            pools_shutdown,
            draining: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            idle: Notify::new(),
        })
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
    pub fn pool(&self, name: &str) -> Option<&Pool> {
        self.pools.get(name)
    }

    /// Every pool, by name.
    pub fn pools(&self) -> impl Iterator<Item = &Pool> {
        self.pools.values()
    }

    /// True once every pool that keeps warm processes has one warm.
    pub fn ready(&self) -> bool {
        !self.is_draining()
            && self
                .pools
                .values()
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
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        conns.spawn(api::serve_connection(self.clone(), stream, shutdown.clone()));
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
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
