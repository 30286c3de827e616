//! The pool's bookkeeping: which processes exist, who waits, who is bound.
//!
//! All of it sits behind one mutex in [`super::Pool`]; the methods here are
//! synchronous and never await, so the lock is held for microseconds.
//! Invariant: a waiter is served only with a slot that has room
//! (`inflight < max_inflight`), and an exclusive slot is only ever handed to
//! the session it is bound to.
//!
//! Multi-round-trip affinity: a process that issued a `requestState` is
//! *pinned* until that state expires, so idle shrink leaves it alone; a
//! retry carrying the state names its process as a *target* and is served
//! before any new lease for it. A session-less exclusive process that
//! issued a state is *reserved* for the retry instead of being discarded.
//!
//! Modes per session: a session may name its mode ([`State::join`]); one
//! that names none uses the pool's `mode`. Every decision reads the
//! effective mode ([`State::mode_of`]). A process serving an exclusive
//! session (bound, or a session-less lease of an exclusive pool: *alone*)
//! is never picked for anyone else; an exclusive session gets only a
//! process that never served a lease (*fresh*), so it sees what a direct
//! spawn gives it.

use crate::config::{Mode, PoolConfig};
use crate::process::Process;
use std::collections::HashMap;
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
    pub worker: Arc<Process>,
    pub inflight: usize,
    pub last_used: Instant,
    /// The exclusive session that owns this process.
    pub session: Option<String>,
    /// Discard the process when its last lease ends.
    pub retire: bool,
    /// A `requestState` this process issued is valid until then: idle
    /// shrink leaves the process alone.
    pub pinned_until: Option<Instant>,
    /// Exclusive pools: kept for the retry of the session-less request
    /// that was answered with a `requestState`; no other lease gets it.
    pub reserved: bool,
    /// It served a lease: no longer fresh for an exclusive session.
    pub used: bool,
    /// Serving a session-less exclusive lease (a session of one), which
    /// discards it at its end: nobody else may have it meanwhile.
    pub alone: bool,
}

impl Slot {
    /// A freshly warmed process, idle.
    pub fn new(worker: Arc<Process>) -> Self {
        Self {
            worker,
            inflight: 0,
            last_used: Instant::now(),
            session: None,
            retire: false,
            pinned_until: None,
            reserved: false,
            used: false,
            alone: false,
        }
    }

    /// A `requestState` it issued is still valid.
    pub fn pinned(&self, now: Instant) -> bool {
        self.pinned_until.is_some_and(|t| t > now)
    }

    /// Not being retired and not exited.
    pub fn usable(&self) -> bool {
        !self.retire && !self.worker.is_exited()
    }

    /// Free for an exclusive session (or a session of one): usable, idle,
    /// never leased, nobody's.
    pub fn fresh(&self) -> bool {
        !self.used
            && self.inflight == 0
            && self.session.is_none()
            && !self.reserved
            && self.usable()
    }

    /// Open to shared and sticky leases: nobody's own process.
    pub fn open(&self) -> bool {
        self.session.is_none() && !self.alone && !self.reserved && self.usable()
    }
}

/// Whether a retry's target process can take it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// It has room now.
    Ready,
    /// It is alive but busy: wait for it.
    Busy,
    /// It ended, is being retired, or belongs to another session.
    Gone,
}

/// Why a session cannot use the pool in the mode it named.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ModeError {
    #[error("pool {pool:?} does not allow mode \"{mode}\" (it allows {}); add \"{mode}\" to the pool's `modes` setting to allow it", list(allowed))]
    NotAllowed {
        pool: String,
        mode: Mode,
        allowed: Vec<Mode>,
    },
    #[error("this session already uses pool {pool:?} in mode \"{was}\", not \"{mode}\"; a session keeps its mode until it ends")]
    Switched { pool: String, was: Mode, mode: Mode },
}

fn list(modes: &[Mode]) -> String {
    let names: Vec<String> = modes
        .iter()
        .map(|m| format!("{:?}", m.to_string()))
        .collect();
    names.join(", ")
}

/// A request waiting for a process.
pub struct Waiter {
    pub session: Option<String>,
    /// The process a retry must reach (multi-round-trip affinity).
    pub target: Option<u64>,
    /// Who is waiting (the caller key), for the fair share ([`super::fair`]).
    pub caller: Arc<str>,
    pub tx: oneshot::Sender<Result<super::LeaseGuard, super::PoolError>>,
}

/// Everything the pool mutex protects.
pub struct State {
    pub slots: HashMap<u64, Slot>,
    pub starting: usize,
    pub waiters: super::queue::Queue,
    /// Fair dispatch: caller → when it was last served (`turn_seq`), only
    /// for callers with waiters.
    pub turns: HashMap<Arc<str>, u64>,
    pub turn_seq: u64,
    /// sticky: session → (worker, last use).
    pub sticky: HashMap<String, (u64, Instant)>,
    /// exclusive: session → (worker, last use).
    pub bound: HashMap<String, (u64, Instant)>,
    /// Sessions that named their mode: session → (mode, last use).
    pub modes: HashMap<String, (Mode, Instant)>,
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
            waiters: super::queue::Queue::default(),
            turns: HashMap::new(),
            turn_seq: 0,
            sticky: HashMap::new(),
            bound: HashMap::new(),
            modes: HashMap::new(),
            failures: 0,
            next_spawn_at: Instant::now(),
            last_error: None,
            closed: false,
        }
    }

    /// Idle processes not bound to a session or reserved for a retry.
    pub fn idle(&self) -> usize {
        self.slots
            .values()
            .filter(|s| s.inflight == 0 && s.session.is_none() && !s.reserved)
            .count()
    }

    /// Waiters not tied to one process (they may make the pool grow).
    pub fn untargeted_waiters(&self) -> usize {
        self.waiters.untargeted()
    }

    /// Drops waiters whose requester gave up.
    pub fn purge_waiters(&mut self) {
        self.waiters.retain(|w| !w.tx.is_closed());
    }

    /// The mode `session` uses the pool in: the one it named, else the
    /// pool's.
    pub fn mode_of(&self, cfg: &PoolConfig, session: Option<&str>) -> Mode {
        session
            .and_then(|s| self.modes.get(s))
            .map_or(cfg.mode, |(m, _)| *m)
    }

    /// Records that `session` uses the pool in `mode` (for its life).
    /// Refused when the pool does not allow the mode, or the session is
    /// live in another one (a session keeps its mode until it ends).
    pub fn join(&mut self, cfg: &PoolConfig, session: &str, mode: Mode) -> Result<(), ModeError> {
        if !cfg.allows(mode) {
            return Err(ModeError::NotAllowed {
                pool: cfg.name.clone(),
                mode,
                allowed: cfg.allowed_modes(),
            });
        }
        let now = Instant::now();
        match self.modes.get_mut(session) {
            Some((m, _)) if *m != mode => Err(ModeError::Switched {
                pool: cfg.name.clone(),
                was: *m,
                mode,
            }),
            Some((_, t)) => {
                *t = now;
                Ok(())
            }
            None => {
                self.modes.insert(session.to_string(), (mode, now));
                Ok(())
            }
        }
    }

    /// Chooses a process for `session`, if one has room now.
    pub fn pick(&self, cfg: &PoolConfig, session: Option<&str>) -> Option<u64> {
        let has_room = |id: &u64| {
            self.slots
                .get(id)
                .is_some_and(|s| s.inflight < cfg.max_inflight && s.usable() && !s.reserved)
        };
        let mode = self.mode_of(cfg, session);
        match mode {
            Mode::Exclusive => {
                if let Some((id, _)) = session.and_then(|s| self.bound.get(s)) {
                    if self.slots.contains_key(id) {
                        return has_room(id).then_some(*id);
                    }
                }
                self.slots
                    .iter()
                    .filter(|(_, s)| s.fresh())
                    .max_by_key(|(_, s)| s.last_used)
                    .map(|(id, _)| *id)
            }
            Mode::Sticky | Mode::Shared => {
                let open = |id: &u64| has_room(id) && self.slots[id].open();
                if mode == Mode::Sticky {
                    if let Some((id, _)) = session.and_then(|s| self.sticky.get(s)) {
                        if open(id) {
                            return Some(*id);
                        }
                    }
                }
                // Least loaded; among equals (when exclusive sessions may
                // come, which need fresh ones) one that served before; then
                // the most recently used, so surplus processes stay idle
                // long enough to be retired.
                let spare_fresh = cfg.allows(Mode::Exclusive);
                self.slots
                    .iter()
                    .filter(|(id, _)| open(id))
                    .min_by_key(|(_, s)| {
                        let fresh = spare_fresh && !s.used;
                        (s.inflight, fresh, std::cmp::Reverse(s.last_used))
                    })
                    .map(|(id, _)| *id)
            }
        }
    }

    /// Whether process `id` can take a retry of `session` that must reach it.
    pub fn pick_target(&self, cfg: &PoolConfig, id: u64, session: Option<&str>) -> Target {
        let Some(s) = self.slots.get(&id) else {
            return Target::Gone;
        };
        if !s.usable() {
            return Target::Gone;
        }
        if s.session.is_some() && s.session.as_deref() != session {
            // Bound to another session: not this caller's process.
            return Target::Gone;
        }
        if s.inflight < cfg.max_inflight {
            Target::Ready
        } else {
            Target::Busy
        }
    }

    /// Marks `id` as serving one more request for `session`.
    pub fn take(&mut self, cfg: &PoolConfig, id: u64, session: Option<&str>) -> Arc<Process> {
        let now = Instant::now();
        let slot = self.slots.get_mut(&id).expect("picked slot exists");
        slot.inflight += 1;
        slot.last_used = now;
        slot.reserved = false;
        slot.used = true;
        let mode = session
            .and_then(|s| self.modes.get_mut(s))
            .map_or(cfg.mode, |(m, t)| {
                *t = now;
                *m
            });
        slot.alone = mode == Mode::Exclusive && session.is_none();
        if let Some(s) = session {
            match mode {
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

    /// The least recently used process the node budget may stop: idle, and
    /// carrying nothing for a client (no session, no valid `requestState`).
    pub fn evictable(&self, now: Instant) -> Option<(u64, Instant)> {
        self.slots
            .iter()
            .filter(|(_, s)| {
                s.inflight == 0
                    && s.session.is_none()
                    && !s.reserved
                    && !s.pinned(now)
                    && s.usable()
            })
            .map(|(id, s)| (*id, s.last_used))
            .min_by_key(|(_, t)| *t)
    }

    /// How many processes to start now.
    pub fn to_spawn(&self, cfg: &PoolConfig, now: Instant) -> usize {
        if self.closed || (self.failures > 0 && now < self.next_spawn_at) {
            return 0;
        }
        let waiting = self.untargeted_waiters().div_ceil(cfg.max_inflight);
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
    pub fn to_retire(&mut self, cfg: &PoolConfig, now: Instant) -> Vec<Arc<Process>> {
        let mut out = Vec::new();
        // Exclusive sessions that went quiet: their process is discarded.
        let expired: Vec<String> = self
            .bound
            .iter()
            .filter(|(_, (_, t))| now.duration_since(*t) >= cfg.session_idle_timeout)
            .map(|(s, _)| s.clone())
            .collect();
        for s in expired {
            if let Some(w) = self.end_session(&s) {
                out.push(w);
            }
        }
        self.sticky
            .retain(|_, (_, t)| now.duration_since(*t) < cfg.session_idle_timeout);
        // A session's mode lives as long as the session: while it holds a
        // process, waits, or was used within the timeout.
        let (bound, waiters) = (&self.bound, &self.waiters);
        self.modes.retain(|s, (_, t)| {
            now.duration_since(*t) < cfg.session_idle_timeout
                || bound.contains_key(s)
                || waiters.iter().any(|w| w.session.as_deref() == Some(s))
        });
        // Reserved for a retry that never came: the state expired.
        let lapsed: Vec<u64> = self
            .slots
            .iter()
            .filter(|(_, s)| s.reserved && s.inflight == 0 && !s.pinned(now))
            .map(|(id, _)| *id)
            .collect();
        for id in lapsed {
            out.push(self.slots.remove(&id).expect("listed").worker);
        }
        self.make_room_for_fresh(cfg, now, &mut out);
        let mut idle: Vec<(u64, Instant)> = self
            .slots
            .iter()
            .filter(|(_, s)| s.inflight == 0 && s.session.is_none() && !s.reserved)
            .map(|(id, s)| (*id, s.last_used))
            .collect();
        idle.sort_by_key(|(_, t)| *t);
        let mut surplus = idle.len().saturating_sub(cfg.min_idle);
        for (id, t) in idle {
            if surplus == 0 {
                break;
            }
            // A process whose requestState is still valid stays for the retry.
            if now.duration_since(t) >= cfg.idle_timeout && !self.slots[&id].pinned(now) {
                out.push(self.slots.remove(&id).expect("listed").worker);
                surplus -= 1;
            }
        }
        out
    }

    /// Exclusive sessions need a fresh process: when they wait on a pool
    /// at `max` whose idle processes all served leases before, the oldest
    /// of those are retired to make room (an exclusive process counts
    /// against `max` like any other).
    fn make_room_for_fresh(&mut self, cfg: &PoolConfig, now: Instant, out: &mut Vec<Arc<Process>>) {
        let want = self
            .waiters
            .iter()
            .filter(|w| {
                w.target.is_none() && self.mode_of(cfg, w.session.as_deref()) == Mode::Exclusive
            })
            .filter(|w| {
                !w.session
                    .as_ref()
                    .is_some_and(|s| self.bound.contains_key(s))
            })
            .count();
        let have = self.slots.values().filter(|s| s.fresh()).count() + self.starting;
        if want <= have || self.slots.len() + self.starting < cfg.max {
            return;
        }
        let mut stale: Vec<(u64, Instant)> = self
            .slots
            .iter()
            .filter(|(_, s)| s.used && s.inflight == 0 && s.open() && !s.pinned(now))
            .map(|(id, s)| (*id, s.last_used))
            .collect();
        stale.sort_by_key(|(_, t)| *t);
        for (id, _) in stale.into_iter().take(want - have) {
            out.push(self.slots.remove(&id).expect("listed").worker);
        }
    }

    /// Forgets a session; returns an exclusive process to discard (if idle;
    /// a busy one is discarded when its lease ends).
    pub fn end_session(&mut self, session: &str) -> Option<Arc<Process>> {
        self.sticky.remove(session);
        self.modes.remove(session);
        // Only exclusive sessions are bound.
        let (id, _) = self.bound.remove(session)?;
        let slot = self.slots.get_mut(&id)?;
        slot.session = None;
        if slot.inflight == 0 {
            return self.slots.remove(&id).map(|s| s.worker);
        }
        // Still busy: release discards it.
        slot.retire = true;
        None
    }
}

#[cfg(test)]
mod tests;
