//! A pool's life: the maintenance loop (warm to `min_idle`, grow for
//! waiters, retire idle surplus, back off after failures), warming one
//! process, watching it until it exits, and closing the pool.
//!
//! Invariant: every process the pool starts is either in its slots, being
//! stopped, or reaped; `starting` counts each warm-up exactly once.

use super::state::{backoff, Slot, FAILING_THRESHOLD, STABLE_AFTER};
use super::{warm, Pool, MAINTAIN_EVERY};
use crate::node::budget::Permit;
use crate::process::Process;
use crate::protocol::Era;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

impl Pool {
    pub(super) async fn maintain(self) {
        loop {
            let now = Instant::now();
            let (spawn, demand, retire, next) = {
                let mut st = self.inner.state.lock().expect("lock");
                if st.slots.values().any(|s| s.worker.uptime() >= STABLE_AFTER) {
                    st.failures = 0;
                }
                let retire = st.to_retire(&self.inner.cfg, now);
                if !retire.is_empty() {
                    self.dispatch(&mut st);
                }
                let spawn = if self.is_frozen() {
                    0
                } else {
                    st.to_spawn(&self.inner.cfg, now)
                };
                let demand = st.untargeted_waiters() > 0;
                st.starting += spawn;
                self.update_gauges(&st);
                let next = if st.failures > 0 && st.next_spawn_at > now {
                    (st.next_spawn_at - now).min(MAINTAIN_EVERY)
                } else {
                    MAINTAIN_EVERY
                };
                (spawn, demand, retire, next)
            };
            for w in retire {
                self.retire(w, "idle");
            }
            // Outside the state lock: making room may stop another pool's
            // idle process (which takes that pool's lock).
            let permits = if spawn > 0 {
                self.permits(spawn, demand)
            } else {
                Vec::new()
            };
            if permits.len() < spawn {
                let mut st = self.inner.state.lock().expect("lock");
                st.starting -= spawn - permits.len();
                self.update_gauges(&st);
            }
            for permit in permits {
                self.inner.tracker.spawn(self.clone().warm_one(permit));
            }
            tokio::select! {
                _ = self.inner.shutdown.cancelled() => break,
                _ = self.inner.wake.notified() => {}
                _ = tokio::time::sleep(next) => {}
            }
        }
        self.close().await;
    }

    async fn warm_one(self, permit: Permit) {
        let cfg = &self.inner.cfg;
        let id = self.inner.ids.fetch_add(1, Ordering::Relaxed) + 1;
        self.inner
            .metrics
            .spawns
            .with_label_values(&[self.name()])
            .inc();
        let plan = warm::Plan {
            protocol: cfg.protocol,
            learned: self.learned_era(),
            timeout: cfg.init_timeout,
            probe_timeout: cfg.probe_timeout,
        };
        let spawned = match &self.inner.placement {
            Ok(place) => Process::spawn(
                cfg,
                id,
                self.inner.metrics.clone(),
                &self.inner.tracker,
                place,
                Some(permit),
            ),
            Err(e) => Err(crate::process::ProcessError::Spawn {
                command: cfg.command.clone(),
                reason: e.clone(),
            }),
        };
        let result = match spawned {
            Err(e) => Err((None, e.to_string())),
            Ok(w) => {
                let hs = tokio::select! {
                    r = warm::handshake(&w, plan, &cfg.client_capabilities) => r,
                    _ = self.inner.shutdown.cancelled() => Err(warm::WarmError::ShuttingDown),
                };
                match hs {
                    Ok(hs) => Ok((w, hs)),
                    Err(e @ warm::WarmError::ProbeKilled(_)) => {
                        // Not the command's failure: the next process is
                        // started at once, with initialize.
                        tracing::info!(pool = %cfg.name, pid = w.pid, "{e}; starting the next process with initialize");
                        self.learn(Era::Legacy, "a process exited on the server/discover probe");
                        {
                            let mut st = self.inner.state.lock().expect("lock");
                            st.starting -= 1;
                            self.update_gauges(&st);
                        }
                        self.inner
                            .metrics
                            .exits
                            .with_label_values(&[self.name(), "probe_refused"])
                            .inc();
                        w.stop(cfg.stop_grace).await;
                        self.inner.wake.notify_one();
                        return;
                    }
                    Err(e) => Err((Some(w), e.to_string())),
                }
            }
        };
        let to_stop: Option<Arc<Process>> = {
            let mut st = self.inner.state.lock().expect("lock");
            st.starting -= 1;
            match result {
                Ok((w, hs)) if !st.closed => {
                    self.learn(hs.era, "from a warm process");
                    *self.inner.handshake.lock().expect("lock") = Some(Arc::new(hs));
                    st.last_error = None;
                    st.slots.insert(id, Slot::new(w.clone()));
                    self.dispatch(&mut st);
                    self.update_gauges(&st);
                    drop(st);
                    tracing::info!(pool = %cfg.name, pid = w.pid, "process warm");
                    self.inner.tracker.spawn(self.clone().watch(w));
                    None
                }
                Ok((w, _)) => {
                    drop(st);
                    Some(w)
                }
                Err((w, error)) => {
                    st.failures += 1;
                    st.next_spawn_at = Instant::now() + backoff(st.failures);
                    let error = match &w {
                        Some(w) if w.is_exited() => format!("{error} ({})", w.exit_reason()),
                        _ => error,
                    };
                    tracing::warn!(pool = %cfg.name, failures = st.failures, retry_in = ?backoff(st.failures), "process failed to start: {error}");
                    st.last_error = Some(error.clone());
                    if st.slots.is_empty() && st.failures >= FAILING_THRESHOLD {
                        // Nobody will be served soon: fail the queue with the reason.
                        st.waiters.clear();
                        self.set_queue_gauge(&st);
                    }
                    self.update_gauges(&st);
                    drop(st);
                    self.inner
                        .metrics
                        .exits
                        .with_label_values(&[self.name(), "start_failed"])
                        .inc();
                    w
                }
            }
        };
        if let Some(w) = to_stop {
            w.stop(cfg.stop_grace).await;
        }
        self.inner.wake.notify_one();
    }

    /// Forwards a warm process's unsolicited notifications and notices its exit.
    pub(super) async fn watch(self, w: Arc<Process>) {
        let mut events = w.subscribe();
        loop {
            tokio::select! {
                ev = events.recv() => match ev {
                    Ok(ev) => { let _ = self.inner.notifications.send((w.id, ev)); }
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => { w.wait_exit().await; break; }
                },
                _ = w.wait_exit() => break,
            }
        }
        let crashed = {
            let mut st = self.inner.state.lock().expect("lock");
            let crashed = match st.slots.remove(&w.id) {
                Some(slot) => {
                    if let Some(s) = &slot.session {
                        st.bound.remove(s);
                    }
                    true
                }
                None => false, // retired on purpose
            };
            if crashed {
                if w.uptime() < STABLE_AFTER && !w.was_leased() {
                    st.failures += 1;
                    st.next_spawn_at = Instant::now() + backoff(st.failures);
                }
                st.last_error = Some(format!("process {} {}", w.pid, w.exit_reason()));
            }
            // Retries waiting for this process learn it is gone.
            self.dispatch(&mut st);
            self.update_gauges(&st);
            crashed
        };
        if crashed {
            tracing::warn!(pool = %self.name(), pid = w.pid, "process {}; replacing", w.exit_reason());
            self.inner
                .metrics
                .exits
                .with_label_values(&[self.name(), "crashed"])
                .inc();
        }
        self.inner.wake.notify_one();
    }

    /// Stops accepting, fails the queue, stops every process (after in-flight
    /// leases finish when the pool is retired gracefully).
    async fn close(&self) {
        {
            let mut st = self.inner.state.lock().expect("lock");
            st.closed = true;
            st.waiters.clear();
        }
        if self.inner.graceful.load(Ordering::Acquire) {
            let limit = Instant::now() + self.inner.cfg.request_timeout + Duration::from_secs(5);
            while Instant::now() < limit && self.status().busy > 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let workers: Vec<Arc<Process>> = {
            let mut st = self.inner.state.lock().expect("lock");
            st.slots.drain().map(|(_, s)| s.worker).collect()
        };
        let grace = self.inner.cfg.stop_grace;
        futures::future::join_all(workers.iter().map(|w| w.stop(grace))).await;
        if let Ok(crate::node::Placement {
            cgroup: Some(cg), ..
        }) = &self.inner.placement
        {
            cg.remove().await;
        }
    }
}
