//! Process-group signalling and exit detection that never races with reaping.
//!
//! Every server process leads its own process group, so one `killpg` reaches
//! `npx` and the `node` it started. The group id stays reserved while the
//! leader is an unreaped zombie, so the broker always signals the group
//! *before* it reaps the leader; a pidfd tells it the leader exited without
//! reaping it, which closes the pid-reuse race.

use std::os::fd::{FromRawFd, OwnedFd};
use tokio::io::unix::AsyncFd;

/// Sends `sig` to every process in group `pgid`; a missing group is fine.
pub fn kill_group(pgid: u32, sig: i32) {
    if pgid <= 1 {
        return; // never signal init's group or "every process"
    }
    // SAFETY: killpg has no memory-safety preconditions.
    unsafe {
        libc::killpg(pgid as libc::pid_t, sig);
    }
}

/// Resolves when process `pid` has exited, without reaping it.
pub struct ExitWatch {
    fd: Option<AsyncFd<OwnedFd>>,
}

impl ExitWatch {
    /// Opens a pidfd for `pid` (Linux 5.3+); without one, [`Self::wait`] never
    /// resolves and the caller relies on its other signals (stdout EOF).
    pub fn new(pid: u32) -> Self {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        let fd = if raw >= 0 {
            // SAFETY: the kernel just handed us this fd; we own it.
            let owned = unsafe { OwnedFd::from_raw_fd(raw as i32) };
            // SAFETY: `owned` is a valid open fd that the AsyncFd owns until
            // it is dropped, so it keeps referring to the same pidfd.
            unsafe { AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) }.ok()
        } else {
            None
        };
        Self { fd }
    }

    /// Waits until the process has exited.
    pub async fn wait(&self) {
        match &self.fd {
            Some(fd) => {
                let _ = fd.readable().await;
            }
            None => std::future::pending::<()>().await,
        }
    }
}
