//! The node-wide budget: server processes and their resident memory across
//! every pool.
//!
//! Why: pools are sized one by one, tenant pools appear per caller, and the
//! node (or the DaemonSet's memory limit) is shared. Without a budget the
//! sum of `min_idle`s decides the broker's footprint.
//!
//! Invariants:
//! * A process is started only with a [`Permit`]; the permit is given back
//!   when the process has been reaped, so the count of live processes never
//!   exceeds `max_processes`.
//! * Keeping processes warm (`min_idle`) never takes from another pool, nor
//!   budget a waiting pool could use;
//!   only a pool with requests waiting may stop another pool's *idle*
//!   process (the least recently used), never a busy one.
//! * While a pool waits for budget, others give their processes back after
//!   each lease instead of serving their own queues first, so pools take
//!   turns instead of the first ten keeping the node.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

/// What the budget needs from a pool.
pub trait Member: Send + Sync {
    /// The pool's name (for logs and the hungry list).
    fn member_name(&self) -> &str;
    /// When its least recently used evictable idle process was last used.
    fn oldest_idle(&self) -> Option<Instant>;
    /// Stops that process; false if it had none by now.
    fn evict_oldest_idle(&self) -> bool;
    /// Resident bytes of its processes.
    fn resident(&self) -> u64;
    /// Tells the pool budget was freed (it may start a process).
    fn wake(&self);
}

/// The node's budget, shared by every pool of a broker.
pub struct Budget {
    max_processes: Option<usize>,
    max_memory: Option<u64>,
    live: AtomicUsize,
    resident: AtomicU64,
    evictions: AtomicU64,
    /// Evicted processes still stopping: their permits are on the way, so
    /// waiting pools do not evict again for the same need.
    stopping: AtomicUsize,
    members: Mutex<Vec<Weak<dyn Member>>>,
    /// Pools waiting for budget, oldest first.
    hungry: Mutex<VecDeque<String>>,
    /// `hungry.len()`, read without the lock on every lease's release.
    hungry_len: AtomicUsize,
}

/// One process's place in the budget; dropping it gives the place back.
pub struct Permit {
    budget: Arc<Budget>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let b = &self.budget;
        b.live.fetch_sub(1, Ordering::AcqRel);
        let _ = b
            .stopping
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        b.wake_all();
    }
}

impl Budget {
    /// A budget of at most `max_processes` processes and `max_memory`
    /// resident bytes (`None`: unlimited; processes are still counted).
    pub fn new(max_processes: Option<usize>, max_memory: Option<u64>) -> Arc<Budget> {
        Arc::new(Budget {
            max_processes,
            max_memory,
            live: AtomicUsize::new(0),
            resident: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            stopping: AtomicUsize::new(0),
            members: Mutex::new(Vec::new()),
            hungry: Mutex::new(VecDeque::new()),
            hungry_len: AtomicUsize::new(0),
        })
    }

    /// Adds a pool (held weakly: a closed pool drops out by itself).
    pub fn join(&self, m: Weak<dyn Member>) {
        let mut ms = self.members.lock().expect("lock");
        ms.retain(|w| w.strong_count() > 0);
        ms.push(m);
    }

    /// Live processes (with permits).
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// The configured process limit.
    pub fn max_processes(&self) -> Option<usize> {
        self.max_processes
    }

    /// The configured memory limit.
    pub fn max_memory(&self) -> Option<u64> {
        self.max_memory
    }

    /// Resident bytes at the last [`Self::sample`].
    pub fn resident(&self) -> u64 {
        self.resident.load(Ordering::Relaxed)
    }

    /// Idle processes stopped to make room for another pool.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    fn memory_full(&self) -> bool {
        self.max_memory.is_some_and(|m| self.resident() >= m)
    }

    /// A permit if the budget has room now.
    pub fn try_reserve(self: &Arc<Self>) -> Option<Permit> {
        if self.memory_full() {
            return None;
        }
        let max = self.max_processes.unwrap_or(usize::MAX);
        self.live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(Permit {
            budget: self.clone(),
        })
    }

    /// A permit for a process that exists already (adopted across an
    /// in-place upgrade): counted even above `max_processes`, which then
    /// only delays new starts.
    pub fn reserve_existing(self: &Arc<Self>) -> Permit {
        self.live.fetch_add(1, Ordering::AcqRel);
        Permit {
            budget: self.clone(),
        }
    }

    /// For keeping a process warm: a permit only from budget nobody waits
    /// for (a pool with requests waiting goes first).
    pub fn try_reserve_spare(self: &Arc<Self>) -> Option<Permit> {
        if self.hungry_len.load(Ordering::Acquire) > 0 {
            return None;
        }
        self.try_reserve()
    }

    /// For a pool with requests waiting: a permit now, or else one idle
    /// process of another pool is stopped (its permit returns when it has
    /// exited, and `me` is woken) and the pool is marked hungry.
    pub fn reserve_for_demand(self: &Arc<Self>, me: &str) -> Option<Permit> {
        if let Some(p) = self.try_reserve() {
            self.fed(me);
            return Some(p);
        }
        let hungry = {
            let mut h = self.hungry.lock().expect("lock");
            if !h.iter().any(|n| n == me) {
                h.push_back(me.to_string());
                self.hungry_len.store(h.len(), Ordering::Release);
            }
            h.len()
        };
        // One process on its way out per waiting pool is enough.
        if self.stopping.load(Ordering::Acquire) < hungry {
            self.evict_lru(Some(me));
        }
        None
    }

    /// `me` got its process: no longer hungry.
    pub fn fed(&self, me: &str) {
        if self.hungry_len.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut h = self.hungry.lock().expect("lock");
        h.retain(|n| n != me);
        self.hungry_len.store(h.len(), Ordering::Release);
    }

    /// Whether a pool other than `me` waits for budget: `me` should give a
    /// process back after its lease instead of keeping it.
    pub fn others_hungry(&self, me: &str) -> bool {
        // The common case (nobody waits) costs one atomic load.
        self.hungry_len.load(Ordering::Acquire) > 0
            && self.hungry.lock().expect("lock").iter().any(|n| n != me)
    }

    /// Stops the least recently used idle process of any pool but `except`.
    fn evict_lru(&self, except: Option<&str>) -> bool {
        let members = self.live_members();
        let victim = members
            .iter()
            .filter(|m| Some(m.member_name()) != except)
            .filter_map(|m| m.oldest_idle().map(|t| (t, m)))
            .min_by_key(|(t, _)| *t);
        match victim {
            Some((_, m)) if m.evict_oldest_idle() => {
                self.evictions.fetch_add(1, Ordering::Relaxed);
                self.stopping.fetch_add(1, Ordering::AcqRel);
                tracing::info!(pool = %m.member_name(), for_pool = except.unwrap_or("memory"), "stopping an idle process to stay within the node budget");
                true
            }
            _ => false,
        }
    }

    /// Measures resident memory; over `max_memory`, stops one idle process
    /// (least recently used) per call.
    pub fn sample(&self) {
        let members = self.live_members();
        let total: u64 = members.iter().map(|m| m.resident()).sum();
        self.resident.store(total, Ordering::Relaxed);
        if self.memory_full() {
            self.evict_lru(None);
        } else if self.max_memory.is_some() {
            // Back under the memory budget: pools held back may start now.
            self.wake_all();
        }
    }

    /// The pools still alive (collected first: no lock is held while a
    /// pool is called).
    fn live_members(&self) -> Vec<Arc<dyn Member>> {
        self.members
            .lock()
            .expect("lock")
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    fn wake_all(&self) {
        let members = self.live_members();
        for m in members {
            m.wake();
        }
    }
}

/// Resident bytes of process `pid` (0 if it is gone).
pub fn resident_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * page_size())
}

fn page_size() -> u64 {
    static SIZE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SIZE.get_or_init(|| {
        nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .map_or(4096, |n| n as u64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake {
        name: String,
        idle: Mutex<Vec<Instant>>,
        woken: AtomicUsize,
        resident: u64,
    }

    impl Member for Fake {
        fn member_name(&self) -> &str {
            &self.name
        }
        fn oldest_idle(&self) -> Option<Instant> {
            self.idle.lock().unwrap().iter().min().copied()
        }
        fn evict_oldest_idle(&self) -> bool {
            let mut v = self.idle.lock().unwrap();
            v.sort();
            !v.is_empty() && {
                v.remove(0);
                true
            }
        }
        fn resident(&self) -> u64 {
            self.resident
        }
        fn wake(&self) {
            self.woken.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn fake(name: &str, idle: Vec<Instant>) -> Arc<Fake> {
        Arc::new(Fake {
            name: name.into(),
            idle: Mutex::new(idle),
            woken: AtomicUsize::new(0),
            resident: 0,
        })
    }

    #[test]
    fn permits_never_exceed_the_limit_and_come_back() {
        let b = Budget::new(Some(2), None);
        let p1 = b.try_reserve().unwrap();
        let _p2 = b.try_reserve().unwrap();
        assert!(b.try_reserve().is_none());
        assert_eq!(b.live(), 2);
        drop(p1);
        assert_eq!(b.live(), 1);
        assert!(b.try_reserve().is_some());
    }

    #[test]
    fn demand_evicts_the_least_recently_used_idle_process_of_another_pool() {
        let b = Budget::new(Some(1), None);
        let t0 = Instant::now();
        let old = fake("old", vec![t0]);
        let new = fake("new", vec![t0 + std::time::Duration::from_secs(5)]);
        let me = fake("me", vec![t0 - std::time::Duration::from_secs(5)]);
        for m in [&old, &new, &me] {
            b.join(Arc::downgrade(&(m.clone() as Arc<dyn Member>)));
        }
        let _held = b.try_reserve().unwrap();
        assert!(b.reserve_for_demand("me").is_none());
        // My own idle process is older, but only other pools give way.
        assert_eq!(
            old.idle.lock().unwrap().len(),
            0,
            "LRU of the others stopped"
        );
        assert_eq!(new.idle.lock().unwrap().len(), 1);
        assert_eq!(me.idle.lock().unwrap().len(), 1);
        assert!(b.others_hungry("old") && !b.others_hungry("me"));
        drop(_held);
        assert!(
            me.woken.load(Ordering::Relaxed) > 0,
            "freed budget wakes pools"
        );
        assert!(b.reserve_for_demand("me").is_some());
        assert!(!b.others_hungry("old"), "fed pools are no longer hungry");
    }

    #[test]
    fn over_the_memory_budget_nothing_starts_and_idle_processes_go() {
        let b = Budget::new(None, Some(100));
        let t0 = Instant::now();
        let heavy = Arc::new(Fake {
            name: "heavy".into(),
            idle: Mutex::new(vec![t0, t0]),
            woken: AtomicUsize::new(0),
            resident: 150,
        });
        b.join(Arc::downgrade(&(heavy.clone() as Arc<dyn Member>)));
        assert!(b.try_reserve().is_some(), "not sampled yet: room");
        b.sample();
        assert_eq!(b.resident(), 150);
        assert!(b.try_reserve().is_none(), "over max_memory: no new process");
        assert_eq!(
            heavy.idle.lock().unwrap().len(),
            1,
            "one idle process stopped per sample"
        );
    }
}
