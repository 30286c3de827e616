//! Handing free processes to waiting requests, under the pool's mutex:
//! retries to the process they must reach first, then everyone else in
//! fair order ([`super::fair`]), each by its session's mode.
//!
//! Invariant: a waiter leaves the queue only to be handed a process (or
//! told its target is gone); a hand-off to a waiter that left is undone
//! as if it never happened (the process keeps its freshness and owner).

use super::state::{State, Target, Waiter};
use super::{fair, Pool, PoolError};
use crate::config::Mode;

impl Pool {
    /// Hands free processes to waiters: retries to the process they must
    /// reach first (failing those whose process is gone), then the rest,
    /// round-robin across callers.
    pub(super) fn dispatch(&self, st: &mut State) {
        let cfg = &self.inner.cfg;
        let mut i = 0;
        // Retries that must reach one process first (none, usually: then
        // the queue is not scanned at all).
        while st.waiters.targeted() > 0 && i < st.waiters.len() {
            if st.waiters[i].tx.is_closed() {
                st.waiters.remove(i);
                continue;
            }
            let Some(id) = st.waiters[i].target else {
                i += 1;
                continue;
            };
            let session = st.waiters[i].session.clone();
            match st.pick_target(cfg, id, session.as_deref()) {
                Target::Ready => {
                    let waiter = st.waiters.remove(i).expect("index valid");
                    self.hand_over(st, waiter, id);
                }
                Target::Gone => {
                    let waiter = st.waiters.remove(i).expect("index valid");
                    let _ = waiter.tx.send(Err(PoolError::ProcessGone {
                        pool: cfg.name.clone(),
                    }));
                }
                Target::Busy => i += 1,
            }
        }
        self.dispatch_fairly(st);
        fair::prune(st);
        self.set_queue_gauge(st);
    }

    /// Hands free processes to the untargeted waiters in fair order (see
    /// [`fair`]).
    fn dispatch_fairly(&self, st: &mut State) {
        let cfg = &self.inner.cfg;
        // Nothing has room: nobody can be served (pools that allow
        // exclusive sessions pick by session, so they always look).
        let by_session = cfg.allows(Mode::Exclusive);
        if st.waiters.is_empty() || (!by_session && st.pick(cfg, None).is_none()) {
            return;
        }
        if !by_session && st.waiters.callers() == 1 && st.waiters.targeted() == 0 {
            // One caller: fair order is arrival order. Serve from the
            // front until a waiter finds no room (the general path below
            // stops there too), without sorting or rebuilding the queue.
            while let Some(w) = st.waiters.front() {
                let session = w.session.clone();
                let Some(id) = st.pick(cfg, session.as_deref()) else {
                    break;
                };
                let waiter = st.waiters.pop_front().expect("front exists");
                fair::served(st, &waiter.caller);
                self.hand_over(st, waiter, id);
            }
            return;
        }
        let order = fair::order(st);
        let mut waiters: Vec<Option<Waiter>> =
            st.waiters.take_all().into_iter().map(Some).collect();
        for i in order {
            let session = waiters[i].as_ref().and_then(|w| w.session.clone());
            match st.pick(cfg, session.as_deref()) {
                Some(id) => {
                    let waiter = waiters[i].take().expect("each index once");
                    fair::served(st, &waiter.caller);
                    self.hand_over(st, waiter, id);
                }
                None if by_session => {}
                None => break,
            }
        }
        for w in waiters.into_iter().flatten() {
            st.waiters.push_back(w);
        }
    }

    /// Gives process `id` to `waiter`, or takes it back if the waiter left.
    fn hand_over(&self, st: &mut State, waiter: Waiter, id: u64) {
        let cfg = &self.inner.cfg;
        let session = waiter.session.as_deref();
        let fresh = !st.slots[&id].used;
        let worker = st.take(cfg, id, session);
        let mut guard = self.guard(worker, session);
        // Disarmed while in flight: if the send fails we undo by
        // hand (we hold the lock; Drop would deadlock).
        guard.armed = false;
        if let Err(back) = waiter.tx.send(Ok(guard)) {
            if let Ok(mut back) = back {
                back.armed = false;
            }
            st.untake(id);
            let exclusive = st.mode_of(cfg, session) == Mode::Exclusive;
            let slot = st.slots.get_mut(&id).expect("present");
            if slot.inflight == 0 {
                // As it was: still fresh, nobody's.
                slot.used = !fresh;
                slot.alone = false;
                if let (true, Some(s)) = (exclusive, session) {
                    slot.session = None;
                    st.bound.remove(s);
                }
            }
        }
    }
}
