//! A pool across the broker's in-place upgrade: what the next image needs
//! ([`PoolState`]: its processes, their exclusive sessions, the cached
//! handshake and learned era) and how it starts the pool around them.
//!
//! While the broker prepares the exec the pool is *frozen*: the maintenance
//! loop starts no process, so nothing spawned inherits the fds whose
//! `FD_CLOEXEC` the upgrade clears. Invariant: a state is adopted only by a
//! pool whose config is unchanged (same fingerprint); otherwise its
//! processes are strays the next image stops.

use super::state::Slot;
use super::{Handshake, Pool};
use crate::config::PoolConfig;
use crate::metrics::Metrics;
use crate::process::adopt::ProcessState;
use crate::process::Process;
use crate::protocol::Era;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// One pool as the next image adopts it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolState {
    pub name: String,
    /// The config it ran with ([`fingerprint`]).
    pub fingerprint: String,
    pub handshake: Option<Handshake>,
    pub era: Option<Era>,
    pub processes: Vec<AdoptedProcess>,
}

/// A process and the exclusive session bound to it, if any.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdoptedProcess {
    pub process: ProcessState,
    pub session: Option<String>,
    /// It served a lease: never given to a new exclusive session.
    #[serde(default)]
    pub used: bool,
}

/// A config's identity: adopted processes must run the same command with
/// the same settings.
pub fn fingerprint(cfg: &PoolConfig) -> String {
    format!("{cfg:?}")
}

impl Pool {
    /// Stops (or resumes) starting processes.
    pub fn freeze(&self, on: bool) {
        self.inner.frozen.store(on, Ordering::Release);
        if !on {
            self.inner.wake.notify_one();
        }
    }

    /// Whether the pool is frozen.
    pub(super) fn is_frozen(&self) -> bool {
        self.inner.frozen.load(Ordering::Acquire)
    }

    /// Processes being started now.
    pub fn starting(&self) -> usize {
        self.inner.state.lock().expect("lock").starting
    }

    /// Every live process of the pool (for the upgrade's fd bookkeeping).
    pub fn processes(&self) -> Vec<Arc<Process>> {
        let st = self.inner.state.lock().expect("lock");
        st.slots.values().map(|s| s.worker.clone()).collect()
    }

    /// What the next image needs to adopt this pool.
    pub fn export(&self) -> PoolState {
        let st = self.inner.state.lock().expect("lock");
        let processes = st
            .slots
            .values()
            .filter_map(|s| {
                Some(AdoptedProcess {
                    process: s.worker.export()?,
                    session: s.session.clone(),
                    used: s.used,
                })
            })
            .collect();
        PoolState {
            name: self.inner.cfg.name.clone(),
            fingerprint: fingerprint(&self.inner.cfg),
            handshake: self.handshake().map(|h| (*h).clone()),
            era: self.learned_era(),
            processes,
        }
    }

    /// Starts a pool around the processes of `state` (adopting each; one
    /// that cannot be adopted is left as a stray). Returns the pool and the
    /// pids it adopted.
    pub fn start_adopted(
        cfg: PoolConfig,
        metrics: Arc<Metrics>,
        tracker: TaskTracker,
        shutdown: CancellationToken,
        ids: Arc<AtomicU64>,
        node: Arc<crate::node::Node>,
        state: &PoolState,
    ) -> (Pool, Vec<u32>) {
        let pool = Pool::create(cfg, metrics, tracker.clone(), shutdown, ids.clone(), node);
        let place = pool.inner.placement.clone().unwrap_or_default();
        let mut adopted = Vec::new();
        {
            let mut st = pool.inner.state.lock().expect("lock");
            for p in &state.processes {
                // The process exists: it counts in the budget, full or not.
                let permit = pool.inner.node.budget().reserve_existing();
                let w = match Process::adopt(
                    &pool.inner.cfg,
                    &p.process,
                    pool.inner.metrics.clone(),
                    &tracker,
                    &place,
                    permit,
                ) {
                    Ok(w) => w,
                    Err(e) => {
                        tracing::warn!(pool = %state.name, "not adopted: {e}");
                        continue;
                    }
                };
                ids.fetch_max(w.id, Ordering::Relaxed);
                adopted.push(w.pid);
                let mut slot = Slot::new(w.clone());
                slot.used = p.used;
                if let Some(s) = &p.session {
                    // Only exclusive sessions are bound.
                    let now = Instant::now();
                    st.bound.insert(s.clone(), (w.id, now));
                    st.modes
                        .insert(s.clone(), (crate::config::Mode::Exclusive, now));
                    slot.session = Some(s.clone());
                }
                st.slots.insert(w.id, slot);
                tracker.spawn(pool.clone().watch(w));
            }
            pool.update_gauges(&st);
        }
        *pool.inner.handshake.lock().expect("lock") = state.handshake.clone().map(Arc::new);
        if let Some(era) = state.era {
            pool.learn(era, "from the previous image");
        }
        tracker.spawn(pool.clone().maintain());
        (pool, adopted)
    }
}
