//! A pool of warm server processes for one configured command.
//!
//! [`Pool::acquire`] hands out a [`LeaseGuard`] for one request: at once when
//! a process has room, else after queueing (bounded by `queue_limit` and
//! `queue_timeout`). Dropping the guard returns the process. A maintenance
//! task keeps `min_idle` processes warm, grows towards `max` while requests
//! wait, retires idle surplus, and restarts after failures with exponential
//! backoff so a broken command reports itself instead of spinning.
//! Waiting requests get a fair share of the queue per caller ([`fair`]).

pub mod adopt;
mod dispatch;
mod fair;
mod gauges;
mod guard;
mod lifecycle;
mod queue;
mod share;
pub mod state;
pub mod warm;

use crate::config::{Mode, PoolConfig};
use crate::metrics::Metrics;
use crate::node::{Node, Placement};
use crate::process::Process;
use crate::protocol::Era;
pub use guard::LeaseGuard;
use guard::Queued;
use serde_json::Value;
pub use state::ModeError;
use state::{State, Target, Waiter, FAILING_THRESHOLD};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
pub use warm::Handshake;

/// Longest sleep of the maintenance loop between checks.
const MAINTAIN_EVERY: Duration = Duration::from_secs(1);

/// Why no process could be leased.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PoolError {
    #[error("pool {pool:?} has {limit} requests waiting already (queue_limit); retry later")]
    QueueFull { pool: String, limit: usize },
    #[error("no process of pool {pool:?} became free within {after:?} (queue_timeout){}", last_error.as_ref().map(|e| format!("; last start failure: {e}")).unwrap_or_default())]
    QueueTimeout {
        pool: String,
        after: Duration,
        last_error: Option<String>,
    },
    #[error("pool {pool:?} cannot start its server: {error}")]
    Failing { pool: String, error: String },
    #[error("pool {pool:?} is shutting down")]
    Closed { pool: String },
    #[error("the server process of pool {pool:?} that issued this requestState has ended; send the original request again without requestState")]
    ProcessGone { pool: String },
}

struct Inner {
    cfg: PoolConfig,
    state: Mutex<State>,
    handshake: Mutex<Option<Arc<Handshake>>>,
    /// The era the server speaks, once a process told (or died on the
    /// probe): later processes skip the `server/discover` probe.
    learned: Mutex<Option<Era>>,
    wake: Notify,
    notifications: broadcast::Sender<(u64, Value)>,
    metrics: Arc<Metrics>,
    /// This pool's series of the per-lease metrics.
    gauges: gauges::PoolGauges,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    /// Set when the pool is retired by a reload: in-flight leases finish first.
    graceful: std::sync::atomic::AtomicBool,
    /// Set while an in-place upgrade prepares its exec: start nothing.
    frozen: std::sync::atomic::AtomicBool,
    ids: Arc<AtomicU64>,
    /// The node's budget, users and cgroups.
    node: Arc<Node>,
    /// As whom and where processes run; an error keeps the pool failing.
    placement: Result<Placement, String>,
    /// This pool as the node budget sees it.
    share: Arc<share::Share>,
    started: Instant,
}

/// A handle to one pool; cheap to clone.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

pub use crate::lease_api::PoolStatus;

impl Pool {
    /// Creates the pool and starts its maintenance task.
    pub fn start(
        cfg: PoolConfig,
        metrics: Arc<Metrics>,
        tracker: TaskTracker,
        shutdown: CancellationToken,
        ids: Arc<AtomicU64>,
        node: Arc<Node>,
    ) -> Pool {
        let pool = Self::create(cfg, metrics, tracker.clone(), shutdown, ids, node);
        tracker.spawn(pool.clone().maintain());
        pool
    }

    /// The pool without its maintenance task, placed on the node (its
    /// user and cgroup) and counted in the node budget.
    fn create(
        cfg: PoolConfig,
        metrics: Arc<Metrics>,
        tracker: TaskTracker,
        shutdown: CancellationToken,
        ids: Arc<AtomicU64>,
        node: Arc<Node>,
    ) -> Pool {
        let (notifications, _) = broadcast::channel(256);
        let placement = node.place(&cfg);
        if let Err(e) = &placement {
            tracing::error!(pool = %cfg.name, "cannot place the pool's processes: {e}");
        }
        let gauges = gauges::PoolGauges::new(&metrics, &cfg.name);
        let pool = Pool {
            inner: Arc::new_cyclic(|weak| Inner {
                share: share::share_for(&cfg.name, weak),
                node,
                placement,
                cfg,
                state: Mutex::new(State::new()),
                handshake: Mutex::new(None),
                learned: Mutex::new(None),
                wake: Notify::new(),
                notifications,
                gauges,
                metrics,
                tracker: tracker.clone(),
                shutdown,
                graceful: std::sync::atomic::AtomicBool::new(false),
                frozen: std::sync::atomic::AtomicBool::new(false),
                ids,
                started: Instant::now(),
            }),
        };
        pool.join_budget();
        pool
    }

    /// Retires the pool (a reload removed or replaced it): no new leases,
    /// in-flight ones finish (bounded by `request_timeout`), then every
    /// process stops.
    pub fn retire_gracefully(&self) {
        self.inner.graceful.store(true, Ordering::Release);
        self.inner.shutdown.cancel();
    }

    /// The pool's config.
    pub fn config(&self) -> &PoolConfig {
        &self.inner.cfg
    }

    fn name(&self) -> &str {
        &self.inner.cfg.name
    }

    /// The cached handshake of the pool's server, once a process warmed up.
    pub fn handshake(&self) -> Option<Arc<Handshake>> {
        self.inner.handshake.lock().expect("lock").clone()
    }

    /// The era the pool learned its server speaks, if it has.
    pub fn learned_era(&self) -> Option<Era> {
        *self.inner.learned.lock().expect("lock")
    }

    /// Records the server's era; logged and exported once it changes.
    fn learn(&self, era: Era, how: &str) {
        let before = self.inner.learned.lock().expect("lock").replace(era);
        if before != Some(era) {
            tracing::info!(pool = %self.name(), ?era, "server era learned ({how}); later processes skip the probe");
            let g = &self.inner.metrics.pool_era;
            g.with_label_values(&[self.name(), "legacy"])
                .set(i64::from(era == Era::Legacy));
            g.with_label_values(&[self.name(), "stateless"])
                .set(i64::from(era == Era::Stateless));
        }
    }

    /// Current counts.
    pub fn status(&self) -> PoolStatus {
        let st = self.inner.state.lock().expect("lock");
        PoolStatus {
            idle: st.idle(),
            busy: st.slots.values().filter(|s| s.inflight > 0).count(),
            starting: st.starting,
            waiting: st.waiters.len(),
            failures: st.failures,
            last_error: st.last_error.clone(),
        }
    }

    /// Since when the pool has served nothing: its last lease's end (or its
    /// start). `None` while a lease, a waiter or an exclusive session is live.
    pub fn idle_since(&self) -> Option<Instant> {
        let st = self.inner.state.lock().expect("lock");
        let in_use = !st.waiters.is_empty()
            || !st.bound.is_empty()
            || st.slots.values().any(|s| s.inflight > 0);
        (!in_use).then(|| {
            st.slots
                .values()
                .map(|s| s.last_used)
                .fold(self.inner.started, Instant::max)
        })
    }

    /// Notifications not tied to a request, tagged with the process id.
    pub fn subscribe(&self) -> broadcast::Receiver<(u64, Value)> {
        self.inner.notifications.subscribe()
    }

    /// Whether anything uses the pool now: a request running or waiting, a
    /// bound exclusive session, or an open notification stream (a
    /// connected shim holds one).
    pub fn in_use(&self) -> bool {
        if self.inner.notifications.receiver_count() > 0 {
            return true;
        }
        let st = self.inner.state.lock().expect("lock");
        !st.waiters.is_empty() || !st.bound.is_empty() || st.slots.values().any(|s| s.inflight > 0)
    }

    /// Records the mode `session` uses the pool in, for the session's life
    /// (see [`state::State::join`]).
    pub fn join(&self, session: &str, mode: Mode) -> Result<(), ModeError> {
        let mut st = self.inner.state.lock().expect("lock");
        st.join(&self.inner.cfg, session, mode)
    }

    /// The mode `session` uses the pool in: the one it named, else the
    /// pool's `mode`.
    pub fn mode_of(&self, session: Option<&str>) -> Mode {
        let st = self.inner.state.lock().expect("lock");
        st.mode_of(&self.inner.cfg, session)
    }

    /// The process bound to an exclusive session, if any.
    pub fn bound_process(&self, session: &str) -> Option<Arc<Process>> {
        let st = self.inner.state.lock().expect("lock");
        let (id, _) = st.bound.get(session)?;
        st.slots.get(id).map(|s| s.worker.clone())
    }

    /// Whether requests wait in the queue (a process released now goes
    /// straight to one of them).
    pub fn has_waiters(&self) -> bool {
        !self.inner.state.lock().expect("lock").waiters.is_empty()
    }

    /// A process with room for one request of `session` right now, if any;
    /// `None` means [`Self::acquire`] would queue (or fail). `target` names
    /// the process a multi-round-trip retry must reach.
    pub fn try_acquire(&self, session: Option<&str>, target: Option<u64>) -> Option<LeaseGuard> {
        let guard = {
            let mut st = self.inner.state.lock().expect("lock");
            if st.closed {
                return None;
            }
            self.take_now(&mut st, session, target)?
        };
        self.observe_wait(Instant::now());
        Some(guard)
    }

    /// Takes a process with room for `session` (process `target` when
    /// given), if one has room now.
    fn take_now(
        &self,
        st: &mut State,
        session: Option<&str>,
        target: Option<u64>,
    ) -> Option<LeaseGuard> {
        let cfg = &self.inner.cfg;
        let id = match target {
            Some(id) => (st.pick_target(cfg, id, session) == Target::Ready).then_some(id)?,
            None => st.pick(cfg, session)?,
        };
        let worker = st.take(cfg, id, session);
        Some(self.guard(worker, session))
    }

    /// Waits for a process with room for one request of `session`; with a
    /// `target`, for that process only (ahead of new leases for it), and
    /// fails with [`PoolError::ProcessGone`] once it is gone. `caller` (the
    /// caller's identity key) gets its fair share of the queue: over it,
    /// [`PoolError::QueueFull`].
    pub async fn acquire(
        &self,
        session: Option<&str>,
        target: Option<u64>,
        caller: &str,
    ) -> Result<LeaseGuard, PoolError> {
        let started = Instant::now();
        let cfg = &self.inner.cfg;
        let rx = {
            let mut st = self.inner.state.lock().expect("lock");
            if st.closed {
                return Err(PoolError::Closed {
                    pool: cfg.name.clone(),
                });
            }
            if let Some(guard) = self.take_now(&mut st, session, target) {
                drop(st);
                self.observe_wait(started);
                return Ok(guard);
            }
            match target {
                Some(id) if st.pick_target(cfg, id, session) == Target::Gone => {
                    return Err(PoolError::ProcessGone {
                        pool: cfg.name.clone(),
                    });
                }
                Some(_) => {}
                None if st.slots.is_empty() && st.failures >= FAILING_THRESHOLD => {
                    return Err(PoolError::Failing {
                        pool: cfg.name.clone(),
                        error: st.last_error.clone().unwrap_or_default(),
                    });
                }
                None => {}
            }
            if st.waiters.len() >= cfg.queue_limit {
                st.purge_waiters();
            }
            let full = || PoolError::QueueFull {
                pool: cfg.name.clone(),
                limit: cfg.queue_limit,
            };
            match fair::admit(&mut st, caller, cfg.queue_limit) {
                fair::Admit::Yes => {}
                fair::Admit::Displace(w) => {
                    let _ = w.tx.send(Err(full()));
                }
                fair::Admit::No => return Err(full()),
            }
            let (tx, rx) = oneshot::channel();
            st.waiters.push_back(Waiter {
                session: session.map(str::to_string),
                target,
                caller: caller.into(),
                tx,
            });
            self.set_queue_gauge(&st);
            rx
        };
        self.inner.wake.notify_one();
        let mut queued = Queued {
            pool: self,
            rx: Some(rx),
        };
        let rx = queued.rx.as_mut().expect("set above");
        let outcome = tokio::time::timeout(cfg.queue_timeout, rx).await;
        match outcome {
            Ok(Ok(Ok(mut guard))) => {
                queued.rx = None;
                guard.armed = true;
                self.observe_wait(started);
                Ok(guard)
            }
            Ok(Ok(Err(e))) => {
                queued.rx = None;
                Err(e)
            }
            Ok(Err(_)) => {
                queued.rx = None;
                Err(PoolError::Closed {
                    pool: cfg.name.clone(),
                })
            }
            Err(_) => {
                drop(queued);
                let st = self.inner.state.lock().expect("lock");
                Err(PoolError::QueueTimeout {
                    pool: cfg.name.clone(),
                    after: cfg.queue_timeout,
                    last_error: st.last_error.clone(),
                })
            }
        }
    }

    fn observe_wait(&self, started: Instant) {
        self.inner.gauges.wait(started.elapsed().as_secs_f64());
    }

    fn set_queue_gauge(&self, st: &State) {
        self.inner.gauges.queue(st.waiters.len());
    }

    fn guard(&self, worker: Arc<Process>, session: Option<&str>) -> LeaseGuard {
        LeaseGuard {
            inner: self.inner.clone(),
            worker,
            armed: true,
            // A session-less request on an exclusive pool is a session of one.
            discard: self.inner.cfg.mode == Mode::Exclusive && session.is_none(),
            pinned: false,
        }
    }

    /// Keeps process `id` until `until` (a `requestState` it issued is valid
    /// that long): idle shrink spares it.
    fn pin(&self, id: u64, until: Instant) {
        let mut st = self.inner.state.lock().expect("lock");
        if let Some(slot) = st.slots.get_mut(&id) {
            slot.pinned_until = Some(slot.pinned_until.map_or(until, |t| t.max(until)));
        }
    }

    fn release(&self, id: u64, discard: bool, pinned: bool) {
        let mut retired = None;
        {
            let mut st = self.inner.state.lock().expect("lock");
            if let Some(slot) = st.slots.get_mut(&id) {
                slot.inflight = slot.inflight.saturating_sub(1);
                slot.last_used = Instant::now();
                let give_back = !discard
                    && !pinned
                    && slot.session.is_none()
                    && slot.inflight == 0
                    && !slot.pinned(Instant::now())
                    && self.should_yield();
                if discard && pinned && !slot.retire && !slot.worker.is_exited() {
                    // A session of one that the server answered with a
                    // requestState: keep its process for the retry.
                    slot.reserved = true;
                } else if (discard || slot.retire || give_back) && !slot.worker.is_exited() {
                    // An exited process is left to `watch`, which accounts for the crash.
                    slot.retire = true;
                    if slot.inflight == 0 {
                        let slot = st.slots.remove(&id).expect("present");
                        if let Some(s) = &slot.session {
                            st.bound.remove(s);
                        }
                        let why = if discard { "discarded" } else { "budget" };
                        retired = Some((slot.worker, why));
                    }
                }
            }
            self.dispatch(&mut st);
            self.update_gauges(&st);
        }
        if let Some((w, why)) = retired {
            self.retire(w, why);
        }
        self.inner.wake.notify_one();
    }

    fn update_gauges(&self, st: &State) {
        let busy = st.slots.values().filter(|s| s.inflight > 0).count();
        self.inner
            .gauges
            .processes(busy, st.slots.len() - busy, st.starting);
    }

    /// Ends a client session: exclusive processes are discarded, sticky
    /// affinity is forgotten.
    pub fn end_session(&self, session: &str) {
        let w = {
            let mut st = self.inner.state.lock().expect("lock");
            let w = st.end_session(session);
            self.dispatch(&mut st);
            w
        };
        if let Some(w) = w {
            self.retire(w, "session_ended");
        }
        self.inner.wake.notify_one();
    }

    fn retire(&self, w: Arc<Process>, reason: &'static str) {
        self.inner
            .metrics
            .exits
            .with_label_values(&[self.name(), reason])
            .inc();
        let grace = self.inner.cfg.stop_grace;
        self.inner.tracker.spawn(async move { w.stop(grace).await });
    }
}
