//! A lease's entry in the broker's lease table, by the caller-scoped id
//! that `POST /v1/leases/{id}` names it with.
//!
//! Invariant: an entry lives exactly as long as its [`Registration`]; the
//! id is scoped to the caller that chose it ([`scoped`]), so no caller can
//! reach (or even detect) another's lease.

use super::super::error::ApiError;
use super::super::{Broker, LeaseRef};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// A lease id or session key as the broker keeps it: scoped to the caller
/// that chose it, so a caller that learns another's id or key finds nothing
/// (the same answer as for an id that never existed), and two callers
/// choosing the same key never meet.
pub fn scoped(caller: &str, key: &str) -> String {
    // Sized once: `format!` grew it two or three times (per request).
    let mut s = String::with_capacity(caller.len() + 1 + key.len());
    s.push_str(caller);
    s.push('\n');
    s.push_str(key);
    s
}

/// A lease's entry in the broker's table, removed when dropped: while it is
/// there, `POST /v1/leases/{id}` reaches the lease (a cancellation even
/// while the request still waits for a process).
pub(super) struct Registration {
    broker: Arc<Broker>,
    id: String,
}

impl Registration {
    /// Registers lease `shown` of a caller under its scoped key `id`.
    pub(super) fn new(
        broker: &Arc<Broker>,
        id: String,
        shown: &str,
    ) -> Result<(Self, CancellationToken), ApiError> {
        let cancel = CancellationToken::new();
        let mut table = broker.leases.lock().expect("lock");
        if table.contains_key(&id) {
            return Err(ApiError::LeaseConflict(shown.to_string()));
        }
        table.insert(
            id.clone(),
            LeaseRef {
                process: None,
                cancel: cancel.clone(),
            },
        );
        drop(table);
        let reg = Registration {
            broker: broker.clone(),
            id,
        };
        Ok((reg, cancel))
    }

    pub(super) fn attach(&self, worker: &Arc<crate::process::Process>, lid: u64) {
        if let Some(r) = self.broker.leases.lock().expect("lock").get_mut(&self.id) {
            r.process = Some((worker.clone(), lid));
        }
    }

    pub(super) fn remove(&self) {
        self.broker.leases.lock().expect("lock").remove(&self.id);
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.remove();
    }
}
