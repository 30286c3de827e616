//! Claims on a pool's processes, each giving back what it holds when
//! dropped: [`LeaseGuard`] (a process leased to one request) and `Queued`
//! (a request's place in the queue).

use super::{Inner, Pool};
use crate::process::Process;
use std::sync::Arc;
use tokio::sync::oneshot;

/// A request waiting in the queue. Dropped while still waiting (the caller
/// hung up), it takes its place out of the queue at once, so the depth
/// gauge and `queue_limit` count only live callers.
pub(super) struct Queued<'a> {
    pub(super) pool: &'a Pool,
    pub(super) rx: Option<oneshot::Receiver<Result<LeaseGuard, super::PoolError>>>,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if let Ok(Ok(mut guard)) = rx.try_recv() {
                // Handed a process just as the caller left: give it back
                // (a disarmed guard dropped here would leak the slot).
                guard.armed = true;
                drop(guard);
            }
            let mut st = self.pool.inner.state.lock().expect("lock");
            st.purge_waiters();
            self.pool.set_queue_gauge(&st);
        }
    }
}

/// One request's claim on one process. Dropping it releases the process.
pub struct LeaseGuard {
    pub(super) inner: Arc<Inner>,
    pub(super) worker: Arc<Process>,
    /// Whether dropping it releases the process (off while in flight from
    /// the dispatcher to a waiter, which arms it on receipt).
    pub(super) armed: bool,
    pub(super) discard: bool,
    /// The process issued a `requestState` during this lease.
    pub(super) pinned: bool,
}

impl LeaseGuard {
    /// The process this lease runs on.
    pub fn process(&self) -> &Arc<Process> {
        &self.worker
    }

    /// Asks for the process to be stopped and replaced when the lease ends.
    pub fn discard(&mut self) {
        self.discard = true;
    }

    /// Keeps the process until `until`: it issued a `requestState` that is
    /// valid that long, and the retry must find it (not retired as idle,
    /// not discarded as a finished session of one).
    pub fn pin(&mut self, until: std::time::Instant) {
        self.pinned = true;
        Pool {
            inner: self.inner.clone(),
        }
        .pin(self.worker.id, until);
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if self.armed {
            Pool {
                inner: self.inner.clone(),
            }
            .release(self.worker.id, self.discard, self.pinned);
        }
    }
}
