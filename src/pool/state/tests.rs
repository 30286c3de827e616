//! Unit tests of the pool's state machine: picking, taking, sizing,
//! retiring, sessions and retry targets, on real (`/bin/cat`) processes.

use super::*;
use crate::metrics::Metrics;
use tokio_util::task::TaskTracker;

fn cfg(min_idle: usize, max: usize, inflight: usize) -> PoolConfig {
    let mut c = PoolConfig::new("p", "x", vec![]);
    c.min_idle = min_idle;
    c.max = max;
    c.max_inflight = inflight;
    c.idle_timeout = Duration::from_secs(60);
    c
}

fn mode(mode: Mode, inflight: usize) -> PoolConfig {
    let mut c = cfg(0, 8, inflight);
    c.mode = mode;
    c
}

type Handed = Result<crate::pool::LeaseGuard, crate::pool::PoolError>;

fn waiter(target: Option<u64>) -> (Waiter, oneshot::Receiver<Handed>) {
    let (tx, rx) = oneshot::channel();
    let w = Waiter {
        session: None,
        target,
        caller: "-".into(),
        tx,
    };
    (w, rx)
}

/// Real processes for the slots: `/bin/cat` waits on its stdin, which
/// is all a slot needs (alive, or exited once stopped). Stopped at the
/// end of each test; a test that panics drops them with its runtime,
/// which closes their stdin, and they exit.
struct Cats {
    tracker: TaskTracker,
    metrics: Arc<Metrics>,
    started: Vec<Arc<Process>>,
}

impl Cats {
    fn new() -> Self {
        Self {
            tracker: TaskTracker::new(),
            metrics: Arc::new(Metrics::new()),
            started: Vec::new(),
        }
    }

    fn process(&mut self, id: u64) -> Arc<Process> {
        let cfg = PoolConfig::new("cats", "/bin/cat", vec![]);
        let place = crate::node::Placement::default();
        let w = Process::spawn(&cfg, id, self.metrics.clone(), &self.tracker, &place, None)
            .expect("cat starts");
        self.started.push(w.clone());
        w
    }

    /// A state with an idle slot for each of `ids`, used `at[i]`.
    fn state(&mut self, ids: &[u64], at: &[Instant]) -> State {
        let mut st = State::new();
        for (i, &id) in ids.iter().enumerate() {
            let mut slot = Slot::new(self.process(id));
            slot.last_used = at[i];
            st.slots.insert(id, slot);
        }
        st
    }

    async fn stop(self) {
        for w in &self.started {
            w.stop(Duration::from_secs(2)).await;
        }
        self.tracker.close();
    }
}

fn slot(st: &mut State, id: u64) -> &mut Slot {
    st.slots.get_mut(&id).expect("slot exists")
}

/// `n` instants one second apart, oldest first.
fn times(n: u64) -> (Instant, Vec<Instant>) {
    let t0 = Instant::now();
    (t0, (0..n).map(|k| t0 + Duration::from_secs(k)).collect())
}

fn ids(ws: Vec<Arc<Process>>) -> Vec<u64> {
    let mut v: Vec<u64> = ws.iter().map(|w| w.id).collect();
    v.sort();
    v
}

#[tokio::test]
async fn shared_pick_prefers_least_loaded_then_most_recent() {
    let mut cats = Cats::new();
    let c = mode(Mode::Shared, 2);
    let (_, at) = times(3);
    let mut st = cats.state(&[1, 2, 3], &at);
    assert_eq!(st.pick(&c, None), Some(3), "all idle: the most recent");
    slot(&mut st, 3).inflight = 1;
    assert_eq!(st.pick(&c, None), Some(2), "least loaded first");
    assert_eq!(st.pick(&c, Some("s")), Some(2), "sessions change nothing");
    for id in [1, 2] {
        slot(&mut st, id).inflight = 1;
    }
    assert_eq!(st.pick(&c, None), Some(3), "equal load: the most recent");
    for id in [1, 2, 3] {
        slot(&mut st, id).inflight = 2;
    }
    assert_eq!(st.pick(&c, None), None, "no room anywhere");
    cats.stop().await;
}

#[tokio::test]
async fn pick_skips_reserved_retiring_and_exited_processes() {
    let mut cats = Cats::new();
    let (_, at) = times(4);
    let mut st = cats.state(&[1, 2, 3, 4], &at);
    slot(&mut st, 1).reserved = true;
    slot(&mut st, 2).retire = true;
    st.slots[&3].worker.stop(Duration::from_secs(2)).await;
    assert!(st.slots[&3].worker.is_exited());
    for m in [Mode::Shared, Mode::Sticky, Mode::Exclusive] {
        let c = mode(m, 1);
        assert_eq!(st.pick(&c, None), Some(4), "{m:?}");
        assert_eq!(st.pick(&c, Some("s")), Some(4), "{m:?}");
    }
    st.slots.remove(&4);
    for m in [Mode::Shared, Mode::Sticky, Mode::Exclusive] {
        assert_eq!(st.pick(&mode(m, 1), None), None, "{m:?}");
    }
    cats.stop().await;
}

#[tokio::test]
async fn take_and_untake_count_requests() {
    let mut cats = Cats::new();
    let c = mode(Mode::Shared, 2);
    let (t0, _) = times(0);
    let mut st = cats.state(&[1], &[t0]);
    slot(&mut st, 1).reserved = true;
    let w = st.take(&c, 1, Some("s"));
    assert_eq!(w.id, 1);
    let slot = &st.slots[&1];
    assert_eq!(slot.inflight, 1);
    assert!(slot.last_used > t0, "marked as used");
    assert!(!slot.reserved, "the retry it was kept for took it");
    assert!(slot.session.is_none(), "shared pools bind nobody");
    assert!(st.sticky.is_empty() && st.bound.is_empty());
    st.take(&c, 1, None);
    assert_eq!(st.slots[&1].inflight, 2);
    st.untake(1);
    st.untake(1);
    assert_eq!(st.slots[&1].inflight, 0);
    st.untake(1);
    assert_eq!(st.slots[&1].inflight, 0, "never below zero");
    st.untake(99);
    cats.stop().await;
}

#[tokio::test]
async fn sticky_sessions_return_to_their_process_and_fall_back_when_full() {
    let mut cats = Cats::new();
    let c = mode(Mode::Sticky, 1);
    let (_, at) = times(2);
    let mut st = cats.state(&[1, 2], &at);
    st.take(&c, 1, Some("s"));
    st.untake(1);
    slot(&mut st, 1).last_used = at[0];
    assert_eq!(st.sticky["s"].0, 1);
    assert_eq!(st.pick(&c, None), Some(2), "no affinity: the most recent");
    assert_eq!(st.pick(&c, Some("s")), Some(1), "back to its process");
    slot(&mut st, 1).inflight = 1;
    assert_eq!(st.pick(&c, Some("s")), Some(2), "its process is full");
    st.slots.remove(&1);
    assert_eq!(st.pick(&c, Some("s")), Some(2), "its process is gone");
    // Affinity lapses after session_idle_timeout; end_session forgets it.
    let now = Instant::now();
    let mut c2 = c.clone();
    c2.session_idle_timeout = Duration::from_secs(10);
    st.take(&c2, 2, Some("t"));
    st.untake(2);
    st.take(&c2, 2, Some("u"));
    st.untake(2);
    assert!(st.to_retire(&c2, now + Duration::from_secs(5)).is_empty());
    assert!(st.sticky.contains_key("t"));
    assert!(st.end_session("t").is_none(), "nothing to discard");
    assert!(!st.sticky.contains_key("t") && st.sticky.contains_key("u"));
    assert!(st.to_retire(&c2, now + Duration::from_secs(11)).is_empty());
    assert!(st.sticky.is_empty(), "affinity lapsed");
    assert!(
        st.slots.contains_key(&2),
        "sticky processes are not discarded"
    );
    cats.stop().await;
}

#[tokio::test]
async fn exclusive_sessions_own_their_process_and_never_share_it() {
    let mut cats = Cats::new();
    // Room for several requests: a bound process still goes to no one else.
    let c = mode(Mode::Exclusive, 4);
    let (_, at) = times(2);
    let mut st = cats.state(&[1, 2], &at);
    assert_eq!(
        st.pick(&c, Some("a")),
        Some(2),
        "a free process, most recent"
    );
    st.take(&c, 2, Some("a"));
    assert_eq!(st.slots[&2].session.as_deref(), Some("a"));
    assert_eq!(st.bound["a"].0, 2);
    assert_eq!(st.pick(&c, Some("a")), Some(2), "its own, with room");
    assert_eq!(st.pick(&c, Some("b")), Some(1), "never a bound process");
    assert_eq!(st.pick(&c, None), Some(1));
    st.take(&c, 1, Some("b"));
    assert_eq!(st.pick(&c, Some("c")), None, "every process is bound");
    assert_eq!(st.pick(&c, None), None);
    // Idle but bound: still only for its session.
    st.untake(1);
    assert_eq!(st.pick(&c, Some("c")), None);
    assert_eq!(st.pick(&c, Some("b")), Some(1));
    // Full: the session waits for its own process, not another.
    slot(&mut st, 2).inflight = 4;
    let (_, later) = times(1);
    let mut extra = Slot::new(cats.process(3));
    extra.last_used = later[0];
    st.slots.insert(3, extra);
    assert_eq!(st.pick(&c, Some("a")), None);
    assert_eq!(st.pick(&c, Some("c")), Some(3));
    // A session whose process is gone gets a fresh one.
    st.slots.remove(&2);
    assert_eq!(st.pick(&c, Some("a")), Some(3));
    cats.stop().await;
}

#[tokio::test]
async fn pick_target_says_ready_busy_or_gone() {
    let mut cats = Cats::new();
    let shared = mode(Mode::Shared, 1);
    let (_, at) = times(3);
    let mut st = cats.state(&[1, 2, 3], &at);
    assert_eq!(st.pick_target(&shared, 1, None), Target::Ready);
    slot(&mut st, 1).inflight = 1;
    assert_eq!(st.pick_target(&shared, 1, None), Target::Busy);
    assert_eq!(st.pick_target(&shared, 9, None), Target::Gone, "unknown");
    slot(&mut st, 2).retire = true;
    assert_eq!(st.pick_target(&shared, 2, None), Target::Gone, "retiring");
    st.slots[&3].worker.stop(Duration::from_secs(2)).await;
    assert_eq!(st.pick_target(&shared, 3, None), Target::Gone, "exited");
    // Exclusive: a process bound to another session is not the caller's.
    let excl = mode(Mode::Exclusive, 1);
    let mut st = cats.state(&[4, 5], &at[..2]);
    st.take(&excl, 4, Some("a"));
    st.untake(4);
    assert_eq!(st.pick_target(&excl, 4, Some("a")), Target::Ready);
    assert_eq!(st.pick_target(&excl, 4, Some("b")), Target::Gone);
    assert_eq!(st.pick_target(&excl, 4, None), Target::Gone);
    slot(&mut st, 4).inflight = 1;
    assert_eq!(st.pick_target(&excl, 4, Some("a")), Target::Busy);
    // A process reserved for a retry takes that retry (and pick() does not).
    slot(&mut st, 5).reserved = true;
    assert_eq!(st.pick_target(&excl, 5, None), Target::Ready);
    assert_eq!(st.pick(&excl, None), None);
    cats.stop().await;
}

#[tokio::test]
async fn idle_counts_free_unbound_unreserved_processes() {
    let mut cats = Cats::new();
    let (_, at) = times(4);
    let mut st = cats.state(&[1, 2, 3, 4], &at);
    assert_eq!(st.idle(), 4);
    slot(&mut st, 2).inflight = 1;
    slot(&mut st, 3).session = Some("a".into());
    slot(&mut st, 4).reserved = true;
    assert_eq!(st.idle(), 1);
    // min_idle looks at idle(): a reserved process is not spare.
    assert_eq!(st.to_spawn(&cfg(2, 8, 1), Instant::now()), 1);
    cats.stop().await;
}

#[tokio::test]
async fn idle_surplus_is_retired_after_idle_timeout_down_to_min_idle() {
    let mut cats = Cats::new();
    let c = cfg(1, 8, 1);
    let (t0, at) = times(4);
    let mut st = cats.state(&[1, 2, 3, 4], &at);
    slot(&mut st, 4).inflight = 1;
    slot(&mut st, 4).last_used = t0;
    assert!(
        st.to_retire(&c, t0 + Duration::from_secs(30)).is_empty(),
        "not idle long enough"
    );
    // 61 s after t0: 1 and 2 are past the 60 s idle_timeout, 3 is not.
    let gone = st.to_retire(&c, t0 + Duration::from_secs(61));
    assert_eq!(ids(gone), vec![1, 2]);
    let gone = st.to_retire(&c, t0 + Duration::from_secs(600));
    assert!(gone.is_empty(), "min_idle stays, busy stays");
    let mut left: Vec<u64> = st.slots.keys().copied().collect();
    left.sort();
    assert_eq!(left, vec![3, 4]);
    cats.stop().await;
}

#[tokio::test]
async fn pinned_processes_stay_and_lapsed_reservations_go() {
    let mut cats = Cats::new();
    let c = cfg(0, 8, 1);
    let (t0, at) = times(5);
    let mut st = cats.state(&[1, 2, 3, 4, 5], &at);
    let now = t0 + Duration::from_secs(600);
    // 1: idle, its requestState still valid. 2: idle, nothing pending.
    slot(&mut st, 1).pinned_until = Some(now + Duration::from_secs(1));
    // 3: reserved for a retry whose state expired; 4: one still valid;
    // 5: reserved with no pin (the pin is what keeps it).
    slot(&mut st, 3).reserved = true;
    slot(&mut st, 3).pinned_until = Some(now - Duration::from_secs(1));
    slot(&mut st, 4).reserved = true;
    slot(&mut st, 4).pinned_until = Some(now + Duration::from_secs(1));
    slot(&mut st, 5).reserved = true;
    assert_eq!(ids(st.to_retire(&c, now)), vec![2, 3, 5]);
    let mut left: Vec<u64> = st.slots.keys().copied().collect();
    left.sort();
    assert_eq!(left, vec![1, 4]);
    // Once the pins expire, both go.
    let later = now + Duration::from_secs(2);
    assert_eq!(ids(st.to_retire(&c, later)), vec![1, 4]);
    cats.stop().await;
}

#[tokio::test]
async fn exclusive_sessions_idle_past_their_timeout_lose_their_process() {
    let mut cats = Cats::new();
    let mut c = mode(Mode::Exclusive, 1);
    c.session_idle_timeout = Duration::from_secs(10);
    c.idle_timeout = Duration::from_secs(3600);
    let (_, at) = times(2);
    let mut st = cats.state(&[1, 2], &at);
    st.take(&c, 1, Some("a"));
    st.untake(1);
    st.take(&c, 2, Some("b"));
    let now = Instant::now();
    assert!(st.to_retire(&c, now + Duration::from_secs(5)).is_empty());
    assert_eq!(st.bound.len(), 2);
    let gone = st.to_retire(&c, now + Duration::from_secs(11));
    assert_eq!(ids(gone), vec![1], "the idle one at once");
    assert!(st.bound.is_empty());
    // The busy one is marked: release discards it.
    let busy = &st.slots[&2];
    assert!(busy.retire && busy.session.is_none());
    cats.stop().await;
}

#[tokio::test]
async fn end_session_discards_exclusive_processes_only() {
    let mut cats = Cats::new();
    let excl = mode(Mode::Exclusive, 1);
    let (_, at) = times(2);
    let mut st = cats.state(&[1, 2], &at);
    st.take(&excl, 1, Some("a"));
    st.untake(1);
    st.take(&excl, 2, Some("b"));
    let w = st.end_session("a").expect("idle: discarded now");
    assert_eq!(w.id, 1);
    assert!(!st.slots.contains_key(&1) && !st.bound.contains_key("a"));
    assert!(st.end_session("b").is_none(), "busy: discarded at release");
    assert!(st.slots[&2].retire);
    assert!(st.slots[&2].session.is_none() && st.bound.is_empty());
    assert!(st.end_session("nobody").is_none());
    // Sticky: only the affinity goes.
    let sticky = mode(Mode::Sticky, 1);
    let mut st = cats.state(&[3], &at[..1]);
    st.take(&sticky, 3, Some("s"));
    st.untake(3);
    assert!(st.end_session("s").is_none());
    assert!(st.sticky.is_empty());
    assert!(!st.slots[&3].retire);
    cats.stop().await;
}

#[test]
fn targeted_waiters_do_not_grow_the_pool() {
    let c = cfg(0, 8, 1);
    let now = Instant::now();
    let mut st = State::new();
    let mut rxs = Vec::new();
    for _ in 0..3 {
        let (w, rx) = waiter(Some(7));
        st.waiters.push_back(w);
        rxs.push(rx);
    }
    assert_eq!(st.untargeted_waiters(), 0);
    assert_eq!(st.to_spawn(&c, now), 0, "they wait for their own process");
    let (w, rx) = waiter(None);
    st.waiters.push_back(w);
    rxs.push(rx);
    assert_eq!(st.to_spawn(&c, now), 1);
    // Waiters whose caller left are purged.
    rxs.truncate(2);
    st.purge_waiters();
    assert_eq!(st.waiters.len(), 2);
    assert_eq!(st.to_spawn(&c, now), 0);
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
        st.waiters.push_back(Waiter {
            session: None,
            target: None,
            caller: "-".into(),
            tx,
        });
    }
    assert_eq!(st.to_spawn(&c, now), 3, "capped by max minus starting");
    let c4 = cfg(0, 8, 4);
    let mut st = State::new();
    for _ in 0..9 {
        let (tx, _rx) = oneshot::channel();
        st.waiters.push_back(Waiter {
            session: None,
            target: None,
            caller: "-".into(),
            tx,
        });
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

mod modes;
