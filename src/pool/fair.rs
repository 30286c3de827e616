//! A fair share of a pool's queue per caller identity.
//!
//! Why: one caller (a runaway agent, or a hostile one) sending requests
//! faster than the pool serves them would otherwise fill the whole queue
//! (`queue_limit`) and starve every other caller of the pool: they would
//! get "queue full" or wait behind thousands of its requests.
//!
//! Two rules, both on the pool's one mutex:
//! * **Admission**: a caller may hold at most `max(1, queue_limit / callers)`
//!   waiters, `callers` counting the distinct callers waiting (itself
//!   included). A caller under its share that finds the queue full takes
//!   the place of the newest waiter of the caller holding the most, which
//!   gets the pool's ordinary "queue full" error. The queue never grows
//!   past `queue_limit`.
//! * **Dispatch**: free processes go round-robin across callers: every
//!   caller's first waiter before anyone's second, and among callers the
//!   one served longest ago first; within a caller, oldest first.
//!
//! The turn record holds only callers with waiters, so it is bounded by
//! the queue.

use super::state::{State, Waiter};
use std::collections::HashMap;
use std::sync::Arc;

/// Whether a new waiter of `caller` may queue.
pub enum Admit {
    /// There is room within the caller's share.
    Yes,
    /// There is room once this waiter (another caller's, over its share)
    /// is refused.
    Displace(Waiter),
    /// The caller holds its share already, or the queue is full of fair
    /// shares.
    No,
}

/// Decides whether `caller` may add a waiter to a queue of `limit`.
pub fn admit(st: &mut State, caller: &str, limit: usize) -> Admit {
    let len = st.waiters.len();
    // Fast path: with fewer waiters than the smallest possible share
    // (every waiter another caller), nobody is over a share.
    if len < limit / (len + 1) {
        return Admit::Yes;
    }
    let mine = st.waiters.count_of(caller);
    let callers = st.waiters.callers() + usize::from(mine == 0);
    let share = (limit / callers).max(1);
    if mine >= share {
        return Admit::No;
    }
    if len < limit {
        return Admit::Yes;
    }
    // Full: take the place of the heaviest caller's newest waiter, if that
    // caller is over the share (its turn-less newest request loses least).
    let Some((heavy, n)) = st.waiters.heaviest() else {
        return Admit::No;
    };
    if n <= share {
        return Admit::No;
    }
    match st.waiters.iter().rposition(|w| *w.caller == *heavy) {
        Some(i) => Admit::Displace(st.waiters.remove(i).expect("index valid")),
        None => Admit::No,
    }
}

/// Indices of the untargeted waiters in the order processes go to them:
/// round by round (each caller's first waiter, then each one's second…),
/// within a round the caller served longest ago first.
pub fn order(st: &State) -> Vec<usize> {
    let mut rank: HashMap<&str, usize> = HashMap::new();
    let mut keys: Vec<(usize, u64, usize)> = Vec::new();
    for (i, w) in st.waiters.iter().enumerate() {
        if w.target.is_some() {
            continue;
        }
        let r = rank.entry(&*w.caller).or_default();
        let turn = st.turns.get(&*w.caller).copied().unwrap_or(0);
        keys.push((*r, turn, i));
        *r += 1;
    }
    keys.sort_unstable();
    keys.into_iter().map(|(_, _, i)| i).collect()
}

/// Records that `caller` was just served.
pub fn served(st: &mut State, caller: &Arc<str>) {
    st.turn_seq += 1;
    st.turns.insert(caller.clone(), st.turn_seq);
}

/// Forgets the turns of callers with no waiter left (bounds the record).
pub fn prune(st: &mut State) {
    if st.turns.len() <= st.waiters.callers() {
        return;
    }
    let (turns, waiters) = (&mut st.turns, &st.waiters);
    turns.retain(|c, _| waiters.count_of(c) > 0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;

    fn push(st: &mut State, caller: &str) {
        let (tx, rx) = oneshot::channel();
        std::mem::forget(rx);
        st.waiters.push_back(Waiter {
            session: None,
            target: None,
            caller: caller.into(),
            tx,
        });
    }

    fn callers(st: &State, idx: &[usize]) -> Vec<String> {
        idx.iter()
            .map(|i| st.waiters[*i].caller.to_string())
            .collect()
    }

    #[test]
    fn one_caller_may_fill_an_otherwise_empty_queue() {
        let mut st = State::new();
        for _ in 0..8 {
            assert!(matches!(admit(&mut st, "a", 8), Admit::Yes));
            push(&mut st, "a");
        }
        assert!(matches!(admit(&mut st, "a", 8), Admit::No), "full");
    }

    #[test]
    fn a_second_caller_displaces_the_flooder_up_to_half() {
        let mut st = State::new();
        for _ in 0..8 {
            push(&mut st, "a");
        }
        for _ in 0..4 {
            match admit(&mut st, "b", 8) {
                Admit::Displace(w) => assert_eq!(&*w.caller, "a"),
                _ => panic!("b is under its share"),
            }
            push(&mut st, "b");
        }
        assert_eq!(st.waiters.len(), 8, "never past the limit");
        assert!(
            matches!(admit(&mut st, "b", 8), Admit::No),
            "b at its share"
        );
        assert!(
            matches!(admit(&mut st, "a", 8), Admit::No),
            "a at its share"
        );
    }

    #[test]
    fn the_share_shrinks_with_more_callers_and_is_at_least_one() {
        let mut st = State::new();
        for c in ["a", "a", "b"] {
            push(&mut st, c);
        }
        // 3 callers with c: share 1 of 3; a holds 2 (over), c displaces it.
        assert!(matches!(admit(&mut st, "c", 3), Admit::Displace(_)));
        push(&mut st, "c");
        assert!(matches!(admit(&mut st, "d", 3), Admit::No), "fair shares");
    }

    #[test]
    fn dispatch_goes_round_robin_least_recently_served_first() {
        let mut st = State::new();
        for c in ["a", "a", "a", "b", "c", "c"] {
            push(&mut st, c);
        }
        served(&mut st, &Arc::from("c"));
        served(&mut st, &Arc::from("a"));
        let got = callers(&st, &order(&st));
        assert_eq!(got, ["b", "c", "a", "c", "a", "a"]);
        // Targeted waiters (retries) are dispatched separately.
        let mut w = st.waiters.remove(3).expect("present");
        w.target = Some(1);
        st.waiters.push_back(w);
        assert!(!order(&st).contains(&5));
        st.waiters.clear();
        prune(&mut st);
        assert!(st.turns.is_empty(), "no waiters, no turns kept");
    }
}
