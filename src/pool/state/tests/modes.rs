//! Unit tests of sessions that name their mode on a pool allowing several
//! (`modes`): exclusive sessions get fresh processes of their own that no
//! other lease reaches; shared and sticky leases never wait on them.

use super::*;

/// A shared pool that also allows exclusive sessions.
fn mixed(inflight: usize) -> PoolConfig {
    let mut c = mode(Mode::Shared, inflight);
    c.modes = vec![Mode::Shared, Mode::Exclusive];
    c
}

#[test]
fn sessions_name_only_modes_the_pool_allows_and_keep_them() {
    let c = mixed(1);
    let mut st = State::new();
    assert_eq!(
        st.mode_of(&c, Some("x")),
        Mode::Shared,
        "none named: the pool's"
    );
    st.join(&c, "x", Mode::Exclusive).expect("allowed");
    st.join(&c, "x", Mode::Exclusive).expect("again: the same");
    assert_eq!(st.mode_of(&c, Some("x")), Mode::Exclusive);
    assert_eq!(st.mode_of(&c, None), Mode::Shared);
    let e = st.join(&c, "x", Mode::Shared).unwrap_err().to_string();
    assert!(
        e.contains("already uses") && e.contains("\"exclusive\""),
        "{e}"
    );
    let e = st.join(&c, "y", Mode::Sticky).unwrap_err().to_string();
    assert!(
        e.contains("\"p\"") && e.contains("\"sticky\"") && e.contains("`modes`"),
        "{e}"
    );
    // A pool without `modes` allows its own mode only.
    let plain = mode(Mode::Shared, 1);
    let e = st
        .join(&plain, "z", Mode::Exclusive)
        .unwrap_err()
        .to_string();
    assert!(e.contains("it allows \"shared\""), "{e}");
    assert!(
        !st.modes.contains_key("z"),
        "a refused mode is not recorded"
    );
    st.end_session("x");
    assert!(st.modes.is_empty(), "forgotten with the session");
}

#[tokio::test]
async fn exclusive_sessions_get_fresh_processes_nobody_else_reaches() {
    let mut cats = Cats::new();
    let c = mixed(2);
    let (_, at) = times(3);
    let mut st = cats.state(&[1, 2, 3], &at);
    st.join(&c, "x", Mode::Exclusive).unwrap();
    st.join(&c, "s", Mode::Shared).unwrap();
    // A shared lease prefers... any: all fresh; it takes the most recent.
    assert_eq!(st.pick(&c, Some("s")), Some(3));
    st.take(&c, 3, Some("s"));
    assert!(st.slots[&3].used && st.slots[&3].session.is_none());
    // The exclusive session gets a fresh one, never the used process 3.
    let x = st.pick(&c, Some("x")).expect("a fresh process");
    assert_ne!(x, 3);
    st.take(&c, x, Some("x"));
    assert_eq!(st.bound["x"].0, x);
    assert_eq!(st.slots[&x].session.as_deref(), Some("x"));
    // Its process has room (max_inflight 2) but is nobody else's.
    let other = 3 - x; // 1 or 2: the last fresh one
    slot(&mut st, 3).inflight = 2;
    assert_eq!(
        st.pick(&c, Some("s")),
        Some(other),
        "shared: not x's process"
    );
    assert_eq!(st.pick(&c, None), Some(other));
    slot(&mut st, other).inflight = 2;
    assert_eq!(
        st.pick(&c, Some("s")),
        None,
        "shared waits rather than take x's"
    );
    assert_eq!(st.pick(&c, Some("x")), Some(x), "x keeps its own process");
    assert_eq!(st.pick_target(&c, x, Some("s")), Target::Gone);
    assert_eq!(st.pick_target(&c, x, None), Target::Gone);
    assert_eq!(st.pick_target(&c, x, Some("x")), Target::Ready);
    // A shared lease waiting on a full pool makes it grow.
    let (mut w, _rx) = waiter(None);
    w.session = Some("s".into());
    st.waiters.push_back(w);
    assert_eq!(st.to_spawn(&c, Instant::now()), 1);
    // Its end discards the process (once its lease ends, if busy).
    assert!(st.end_session("x").is_none(), "busy: discarded at release");
    assert!(st.slots[&x].retire && st.bound.is_empty());
    assert_eq!(st.mode_of(&c, Some("x")), Mode::Shared, "forgotten");
    cats.stop().await;
}

#[tokio::test]
async fn a_session_of_one_on_a_mixed_exclusive_pool_is_alone() {
    let mut cats = Cats::new();
    let mut c = mode(Mode::Exclusive, 2);
    c.modes = vec![Mode::Exclusive, Mode::Shared];
    let (_, at) = times(2);
    let mut st = cats.state(&[1, 2], &at);
    st.take(&c, 2, None);
    assert!(st.slots[&2].alone, "a session-less exclusive lease");
    st.join(&c, "s", Mode::Shared).unwrap();
    assert_eq!(
        st.pick(&c, Some("s")),
        Some(1),
        "not the lone lease's process"
    );
    slot(&mut st, 1).inflight = 2;
    assert_eq!(st.pick(&c, Some("s")), None);
    assert_eq!(st.pick(&c, None), None, "no fresh process left");
    cats.stop().await;
}

#[tokio::test]
async fn exclusive_waiters_at_max_retire_used_idle_processes() {
    let mut cats = Cats::new();
    let mut c = mixed(1);
    c.max = 2;
    let (_, at) = times(2);
    let mut st = cats.state(&[1, 2], &at);
    for id in [1, 2] {
        st.take(&c, id, None);
        st.untake(id);
    }
    st.join(&c, "x", Mode::Exclusive).unwrap();
    assert_eq!(st.pick(&c, Some("x")), None, "only used processes");
    let now = Instant::now();
    assert!(st.to_retire(&c, now).is_empty(), "nobody waits: they stay");
    let (mut w, _rx) = waiter(None);
    w.session = Some("x".into());
    st.waiters.push_back(w);
    assert_eq!(st.to_spawn(&c, now), 0, "at max");
    let gone = ids(st.to_retire(&c, now));
    assert_eq!(gone, vec![1], "the least recently used makes room");
    assert_eq!(st.to_spawn(&c, now), 1, "a fresh one for the session");
    // While it starts, nothing more goes.
    st.starting = 1;
    assert!(st.to_retire(&c, now).is_empty());
    cats.stop().await;
}

#[tokio::test]
async fn session_modes_lapse_with_the_session() {
    let mut cats = Cats::new();
    let mut c = mixed(1);
    c.session_idle_timeout = Duration::from_secs(10);
    let (_, at) = times(1);
    let mut st = cats.state(&[1], &at);
    let now = Instant::now();
    st.join(&c, "s", Mode::Shared).unwrap();
    st.join(&c, "w", Mode::Exclusive).unwrap();
    st.join(&c, "x", Mode::Exclusive).unwrap();
    st.take(&c, 1, Some("x"));
    st.untake(1);
    let (mut w, _rx) = waiter(None);
    w.session = Some("w".into());
    st.waiters.push_back(w);
    st.to_retire(&c, now + Duration::from_secs(5));
    assert_eq!(st.modes.len(), 3);
    // Past the timeout: "s" is forgotten, "w" still waits; "x" went quiet
    // too, so its process was discarded with it.
    let gone = ids(st.to_retire(&c, now + Duration::from_secs(11)));
    assert_eq!(gone, vec![1]);
    assert!(!st.modes.contains_key("s") && !st.modes.contains_key("x"));
    assert_eq!(st.mode_of(&c, Some("w")), Mode::Exclusive);
    cats.stop().await;
}
