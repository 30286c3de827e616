//! The listening sockets a broker hands on, by name.
//!
//! Today a broker holds two: the lease API socket ([`LEASE`]) and its
//! control socket ([`CONTROL`]); per-pod sockets join under names of their
//! own. A handoff or an upgrade passes every entry, in order, as a list of
//! names with one fd each, so the receiver needs no knowledge of what a
//! name means to carry it on.

use crate::broker::socket::{self, ListenError};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;
use tokio::net::UnixListener;

/// The lease API socket.
pub const LEASE: &str = "lease";
/// The control socket (handoff and upgrade requests).
pub const CONTROL: &str = "control";

/// Named listening sockets; cheap to clone.
#[derive(Clone, Default)]
pub struct Listeners {
    named: Vec<(String, Arc<UnixListener>)>,
}

impl Listeners {
    /// Adds (or replaces) the listener called `name`.
    pub fn insert(&mut self, name: &str, l: UnixListener) {
        self.named.retain(|(n, _)| n != name);
        self.named.push((name.to_string(), Arc::new(l)));
    }

    /// The listener called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<UnixListener>> {
        self.named
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, l)| l.clone())
    }

    /// Every name, in order.
    pub fn names(&self) -> Vec<String> {
        self.named.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Every fd, in the order of [`Self::names`].
    pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
        self.named.iter().map(|(_, l)| l.as_fd()).collect()
    }

    /// Every (name, fd number), for a state that crosses `execve`.
    pub fn raw(&self) -> Vec<(String, RawFd)> {
        self.named
            .iter()
            .map(|(n, l)| (n.clone(), l.as_raw_fd()))
            .collect()
    }

    /// Rebuilds the registry from passed `names` and `fds` (one each, in
    /// order); each fd must be a listening Unix stream socket.
    pub fn from_fds(names: Vec<String>, fds: Vec<OwnedFd>) -> Result<Listeners, ListenError> {
        if names.len() != fds.len() {
            return Err(ListenError::Inherited(format!(
                "{} names for {} file descriptors",
                names.len(),
                fds.len()
            )));
        }
        let mut out = Listeners::default();
        for (name, fd) in names.into_iter().zip(fds) {
            out.insert(&name, socket::adopt_fd(fd)?);
        }
        Ok(out)
    }
}
