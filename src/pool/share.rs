//! The pool's side of the node: its place in the node-wide budget
//! ([`crate::node::budget`]) and its placement (user, cgroup).
//!
//! Invariants: the budget calls in here without holding any pool's lock,
//! and the pool calls the budget without holding its own state lock, so
//! pools evicting each other's processes cannot deadlock. Only idle
//! processes that carry nothing for a client are evicted: no lease, no
//! exclusive session, no `requestState` still valid, not reserved.

use super::{Inner, Pool};
use crate::node::budget::{self, Member, Permit};
use std::sync::{Arc, Weak};
use std::time::Instant;

/// A pool as the budget sees it (holds the pool weakly: a closed pool
/// leaves the budget by itself).
pub(super) struct Share {
    name: String,
    inner: Weak<Inner>,
}

impl Share {
    fn pool(&self) -> Option<Pool> {
        self.inner.upgrade().map(|inner| Pool { inner })
    }
}

impl Member for Share {
    fn member_name(&self) -> &str {
        &self.name
    }

    fn oldest_idle(&self) -> Option<Instant> {
        let pool = self.pool()?;
        let st = pool.inner.state.lock().expect("lock");
        let now = Instant::now();
        st.evictable(now).map(|(_, t)| t)
    }

    fn evict_oldest_idle(&self) -> bool {
        let Some(pool) = self.pool() else {
            return false;
        };
        let w = {
            let mut st = pool.inner.state.lock().expect("lock");
            let Some((id, _)) = st.evictable(Instant::now()) else {
                return false;
            };
            let w = st.slots.remove(&id).expect("listed").worker;
            pool.update_gauges(&st);
            w
        };
        pool.retire(w, "budget");
        true
    }

    fn resident(&self) -> u64 {
        let Some(pool) = self.pool() else { return 0 };
        let pids: Vec<u32> = {
            let st = pool.inner.state.lock().expect("lock");
            st.slots.values().map(|s| s.worker.pid).collect()
        };
        pids.into_iter().map(budget::resident_of).sum()
    }

    fn wake(&self) {
        if let Some(pool) = self.pool() {
            pool.inner.wake.notify_one();
        }
    }
}

impl Pool {
    /// Permits for up to `n` new processes: with requests waiting, by
    /// making room in other pools if need be; to keep processes warm,
    /// only from free budget.
    pub(super) fn permits(&self, n: usize, demand: bool) -> Vec<Permit> {
        let budget = self.inner.node.budget();
        let me = self.name();
        if !demand {
            budget.fed(me);
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let p = if demand {
                budget.reserve_for_demand(me)
            } else {
                budget.try_reserve_spare()
            };
            match p {
                Some(p) => out.push(p),
                None => break,
            }
        }
        out
    }

    /// Whether a process just released should be given back to the node
    /// (another pool waits for budget) instead of serving this pool's queue.
    pub(super) fn should_yield(&self) -> bool {
        self.inner.node.budget().others_hungry(self.name())
    }

    /// Registers the pool with the node budget.
    pub(super) fn join_budget(&self) {
        let share: Arc<dyn Member> = self.inner.share.clone();
        self.inner.node.budget().join(Arc::downgrade(&share));
    }
}

/// Makes the budget member for pool `name` (inside `Arc::new_cyclic`).
pub(super) fn share_for(name: &str, weak: &Weak<Inner>) -> Arc<Share> {
    Arc::new(Share {
        name: name.to_string(),
        inner: weak.clone(),
    })
}
