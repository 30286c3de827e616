//! The pool's bookkeeping: which processes exist, who waits, who is bound.
//!
//! All of it sits behind one mutex in [`super::Pool`]; the methods here are
//! synchronous and never await, so the lock is held for microseconds.
//! Invariant: a waiter is served only with a slot that has room
//! (`inflight < max_inflight`), and an exclusive slot is only ever handed to
//! the session it is bound to.

use crate::config::{Mode, PoolConfig};
use crate::process::Worker;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Consecutive start failures after which a pool with no live process
/// rejects requests at once instead of queueing them.
pub const FAILING_THRESHOLD: u32 = 3;
/// A process alive this long proves the command works: failures reset.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);
/// First restart delay after a failure; doubles per failure.
pub const BACKOFF_BASE: Duration = Duration::from_millis(250);
/// Longest restart delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Restart delay after `failures` consecutive failures.
pub fn backoff(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let exp = (failures - 1).min(16);
    BACKOFF_BASE.saturating_mul(1 << exp).min(BACKOFF_MAX)
}

/// One ready process.
pub struct Slot {
    pub worker: Arc<Worker>,
    pub inflight: usize,
    pub last_used: Instant,
    /// The exclusive session that owns this process.
    pub session: Option<String>,
    /// Discard the process when its last lease ends.
    pub retire: bool,
}

/// A request waiting for a process.
pub struct Waiter {
    pub session: Option<String>,
    pub tx: oneshot::Sender<super::LeaseGuard>,
}

/// Everything the pool mutex protects.
pub struct State {
    pub slots: HashMap<u64, Slot>,
    pub starting: usize,
    pub waiters: VecDeque<Waiter>,
    /// sticky: session → (worker, last use).
    pub sticky: HashMap<String, (u64, Instant)>,
    /// exclusive: session → (worker, last use).
    pub bound: HashMap<String, (u64, Instant)>,
    pub failures: u32,
    pub next_spawn_at: Instant,
    pub last_error: Option<String>,
    pub closed: bool,
}

impl Default for State {
    fn default() -> Self {
        Self::new()
    }
}

impl State {
    /// An empty pool: no processes, nobody waiting.
    pub fn new() -> Self {
        Self {
            slots: HashMap::new(),
            starting: 0,
            waiters: VecDeque::new(),
            sticky: HashMap::new(),
            bound: HashMap::new(),
            failures: 0,
            next_spawn_at: Instant::now(),
            last_error: None,
            closed: false,
        }
    }

    /// Idle processes not bound to a session.
    pub fn idle(&self) -> usize {
        self.slots
            .values()
            .filter(|s| s.inflight == 0 && s.session.is_none())
            .count()
    }

    /// Drops waiters whose requester gave up.
    pub fn purge_waiters(&mut self) {
        self.waiters.retain(|w| !w.tx.is_closed());
    }

    /// Chooses a process for `session`, if one has room now.
    pub fn pick(&self, cfg: &PoolConfig, session: Option<&str>) -> Option<u64> {
        let has_room = |id: &u64| {
            self.slots.get(id).is_some_and(|s| {
                s.inflight < cfg.max_inflight && !s.retire && !s.worker.is_exited()
            })
        };
        match cfg.mode {
            Mode::Exclusive => {
                if let Some((id, _)) = session.and_then(|s| self.bound.get(s)) {
                    if self.slots.contains_key(id) {
                        return has_room(id).then_some(*id);
                    }
                }
                self.slots
                    .iter()
                    .filter(|(_, s)| {
                        s.inflight == 0 && s.session.is_none() && !s.retire && !s.worker.is_exited()
                    })
                    .max_by_key(|(_, s)| s.last_used)
                    .map(|(id, _)| *id)
            }
            Mode::Sticky | Mode::Shared => {
                if cfg.mode == Mode::Sticky {
                    if let Some((id, _)) = session.and_then(|s| self.sticky.get(s)) {
                        if has_room(id) {
                            return Some(*id);
                        }
                    }
                }
                // Least loaded; among equals the most recently used, so
                // surplus processes stay idle long enough to be retired.
                self.slots
                    .iter()
                    .filter(|(id, _)| has_room(id))
                    .min_by_key(|(_, s)| (s.inflight, std::cmp::Reverse(s.last_used)))
                    .map(|(id, _)| *id)
            }
        }
    }

    /// Marks `id` as serving one more request for `session`.
    pub fn take(&mut self, cfg: &PoolConfig, id: u64, session: Option<&str>) -> Arc<Worker> {
        let now = Instant::now();
        let slot = self.slots.get_mut(&id).expect("picked slot exists");
        slot.inflight += 1;
        slot.last_used = now;
        if let Some(s) = session {
            match cfg.mode {
                Mode::Exclusive => {
                    slot.session = Some(s.to_string());
                    self.bound.insert(s.to_string(), (id, now));
                }
                Mode::Sticky => {
                    self.sticky.insert(s.to_string(), (id, now));
                }
                Mode::Shared => {}
            }
        }
        slot.worker.clone()
    }

    /// Undoes [`Self::take`] for a hand-off that did not happen.
    pub fn untake(&mut self, id: u64) {
        if let Some(slot) = self.slots.get_mut(&id) {
            slot.inflight = slot.inflight.saturating_sub(1);
        }
    }

    /// How many processes to start now.
    pub fn to_spawn(&self, cfg: &PoolConfig, now: Instant) -> usize {
        if self.closed || (self.failures > 0 && now < self.next_spawn_at) {
            return 0;
        }
        let waiting = self.waiters.len().div_ceil(cfg.max_inflight);
        let want = waiting + cfg.min_idle.saturating_sub(self.idle());
        let room = cfg.max.saturating_sub(self.slots.len() + self.starting);
        let n = want.saturating_sub(self.starting).min(room);
        // After a failure, probe with one process at a time.
        if self.failures > 0 {
            n.min(1).min(1usize.saturating_sub(self.starting))
        } else {
            n
        }
    }

    /// Removes and returns processes to retire: idle past `idle_timeout`
    /// beyond `min_idle`, and exclusive sessions idle past their timeout.
    pub fn to_retire(&mut self, cfg: &PoolConfig, now: Instant) -> Vec<Arc<Worker>> {
        let mut out = Vec::new();
        // Exclusive sessions that went quiet: their process is discarded.
        let expired: Vec<String> = self
            .bound
            .iter()
            .filter(|(_, (_, t))| now.duration_since(*t) >= cfg.session_idle_timeout)
            .map(|(s, _)| s.clone())
            .collect();
        for s in expired {
            if let Some(w) = self.end_session(cfg, &s) {
                out.push(w);
            }
        }
        self.sticky
            .retain(|_, (_, t)| now.duration_since(*t) < cfg.session_idle_timeout);
        let mut idle: Vec<(u64, Instant)> = self
            .slots
            .iter()
            .filter(|(_, s)| s.inflight == 0 && s.session.is_none())
            .map(|(id, s)| (*id, s.last_used))
            .collect();
        idle.sort_by_key(|(_, t)| *t);
        let mut surplus = idle.len().saturating_sub(cfg.min_idle);
        for (id, t) in idle {
            if surplus == 0 {
                break;
            }
            if now.duration_since(t) >= cfg.idle_timeout {
                out.push(self.slots.remove(&id).expect("listed").worker);
                surplus -= 1;
            }
        }
        out
    }

    /// Forgets a session; returns an exclusive process to discard (if idle;
    /// a busy one is discarded when its lease ends).
    pub fn end_session(&mut self, cfg: &PoolConfig, session: &str) -> Option<Arc<Worker>> {
        self.sticky.remove(session);
        let (id, _) = self.bound.remove(session)?;
        let slot = self.slots.get_mut(&id)?;
        slot.session = None;
        if cfg.mode == Mode::Exclusive {
            if slot.inflight == 0 {
                return self.slots.remove(&id).map(|s| s.worker);
            }
            // Still busy: release discards it.
            slot.retire = true;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(min_idle: usize, max: usize, inflight: usize) -> PoolConfig {
        let mut c = PoolConfig::new("p", "x", vec![]);
        c.min_idle = min_idle;
        c.max = max;
        c.max_inflight = inflight;
        c.idle_timeout = Duration::from_secs(60);
        c
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(0), Duration::ZERO);
        assert_eq!(backoff(1), BACKOFF_BASE);
        assert_eq!(backoff(2), BACKOFF_BASE * 2);
        assert_eq!(backoff(4), BACKOFF_BASE * 8);
        assert_eq!(backoff(40), BACKOFF_MAX);
    }

    #[test]
    fn spawns_to_min_idle_then_for_waiters_up_to_max() {
        let c = cfg(2, 5, 1);
        let now = Instant::now();
        let mut st = State::new();
        assert_eq!(st.to_spawn(&c, now), 2);
        st.starting = 2;
        assert_eq!(st.to_spawn(&c, now), 0, "already starting");
        for _ in 0..10 {
            let (tx, _rx) = oneshot::channel();
            st.waiters.push_back(Waiter { session: None, tx });
        }
        assert_eq!(st.to_spawn(&c, now), 3, "capped by max minus starting");
        let c4 = cfg(0, 8, 4);
        let mut st = State::new();
        for _ in 0..9 {
            let (tx, _rx) = oneshot::channel();
            st.waiters.push_back(Waiter { session: None, tx });
        }
        assert_eq!(st.to_spawn(&c4, now), 3, "9 waiters / 4 per process");
    }

    #[test]
    fn failures_probe_one_process_at_a_time_after_backoff() {
        let c = cfg(3, 5, 1);
        let now = Instant::now();
        let mut st = State::new();
        st.failures = 2;
        st.next_spawn_at = now + backoff(2);
        assert_eq!(st.to_spawn(&c, now), 0, "still backing off");
        assert_eq!(st.to_spawn(&c, now + backoff(2)), 1, "one probe");
        st.starting = 1;
        assert_eq!(st.to_spawn(&c, now + backoff(2)), 0);
        st.closed = true;
        st.starting = 0;
        assert_eq!(
            st.to_spawn(&c, now + backoff(2)),
            0,
            "closed pools spawn nothing"
        );
    }
}
