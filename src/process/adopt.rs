//! Carrying a running process across the broker's in-place upgrade.
//!
//! The broker re-executes itself keeping its pid, so its server processes
//! stay its children; what the new image needs is our ends of their pipes
//! (inherited across `execve` because their `FD_CLOEXEC` was cleared) and
//! the few facts in [`ProcessState`]. [`Process::adopt`] rebuilds the
//! process around them and reaps the leader with `waitpid`, since no
//! `tokio::process::Child` exists for it.
//!
//! Invariant: an fd named in a state is owned exactly once, by the process
//! adopted from it; it is checked to be open before it is owned.

use super::{group, Born, Leader, Pipes, Process};
use crate::config::PoolConfig;
use crate::metrics::Metrics;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use serde::{Deserialize, Serialize};
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::task::TaskTracker;

/// What the next image needs to adopt one process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessState {
    pub id: u64,
    pub pid: u32,
    /// Our ends of its stdin, stdout and stderr pipes.
    pub fds: [RawFd; 3],
    /// The router's last id.
    pub router_next: u64,
    /// Milliseconds since it was spawned.
    pub uptime_ms: u64,
}

/// Why a process could not be adopted.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("process {pid}: fd {fd} is not open ({errno})")]
    Closed {
        pid: u32,
        fd: RawFd,
        errno: nix::errno::Errno,
    },
    #[error("process {pid}: fd {fd}: {source}")]
    Io {
        pid: u32,
        fd: RawFd,
        source: std::io::Error,
    },
}

/// Sets or clears `FD_CLOEXEC` on `fd` (the upgrade clears it only on the
/// fds it passes, and sets it back if the exec fails).
pub fn set_cloexec(fd: RawFd, on: bool) -> nix::Result<()> {
    // SAFETY: the borrow lasts for two fcntl calls; a closed fd makes them
    // fail with EBADF, nothing else.
    let b = unsafe { BorrowedFd::borrow_raw(fd) };
    let flags = FdFlag::from_bits_retain(fcntl(b, FcntlArg::F_GETFD)?);
    let flags = if on {
        flags | FdFlag::FD_CLOEXEC
    } else {
        flags - FdFlag::FD_CLOEXEC
    };
    fcntl(b, FcntlArg::F_SETFD(flags)).map(drop)
}

impl Process {
    /// What the next image needs to adopt this process; `None` once it has
    /// exited or its stdin is closed (it is ending: the next image reaps it
    /// as a stray).
    pub fn export(&self) -> Option<ProcessState> {
        if self.is_exited() || self.close_stdin.is_cancelled() {
            return None;
        }
        if self.stdin.try_lock().ok()?.is_none() {
            return None;
        }
        Some(ProcessState {
            id: self.id,
            pid: self.pid,
            fds: self.fds,
            router_next: self.router.lock().expect("lock").last_id(),
            uptime_ms: u64::try_from(self.uptime().as_millis()).unwrap_or(u64::MAX),
        })
    }

    /// Our pipe fds (to clear and restore `FD_CLOEXEC` around an exec).
    pub fn pipe_fds(&self) -> [RawFd; 3] {
        self.fds
    }

    /// Rebuilds a process the previous image spawned, from `st`: takes its
    /// pipe fds (closing them again with `FD_CLOEXEC`) and starts its tasks.
    /// `place` and `permit` tie it to its pool's cgroup (it is in it
    /// already) and to the node budget, as [`Process::spawn`] does.
    pub fn adopt(
        cfg: &PoolConfig,
        st: &ProcessState,
        metrics: Arc<Metrics>,
        tracker: &TaskTracker,
        place: &crate::node::Placement,
        permit: crate::node::budget::Permit,
    ) -> Result<Arc<Process>, AdoptError> {
        let pid = st.pid;
        for &fd in &st.fds {
            set_cloexec(fd, true).map_err(|errno| AdoptError::Closed { pid, fd, errno })?;
        }
        // SAFETY: the previous image passed these fds open across execve
        // (checked just above) and named each in exactly one state; this
        // image has opened nothing in their place (the state is read before
        // anything else opens fds) and nothing else claims them.
        let [i, o, e] = st.fds.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
        let io = |fd: RawFd| move |source| AdoptError::Io { pid, fd, source };
        let pipes = Pipes {
            stdin: tokio::process::ChildStdin::from_std(std::process::ChildStdin::from(i))
                .map_err(io(st.fds[0]))?,
            stdout: tokio::process::ChildStdout::from_std(std::process::ChildStdout::from(o))
                .map_err(io(st.fds[1]))?,
            stderr: tokio::process::ChildStderr::from_std(std::process::ChildStderr::from(e))
                .map_err(io(st.fds[2]))?,
        };
        let spawned_at = Instant::now()
            .checked_sub(Duration::from_millis(st.uptime_ms))
            .unwrap_or_else(Instant::now);
        let born = Born {
            id: st.id,
            pid,
            group: group::Group::of(pid),
            spawned_at,
            router_next: st.router_next,
        };
        tracing::debug!(pool = %cfg.name, pid, "adopted");
        Ok(Self::assemble(
            cfg,
            born,
            pipes,
            Leader::Adopted,
            metrics,
            tracker,
            super::Ties {
                cgroup: place.cgroup.clone(),
                permit: Some(permit),
            },
        ))
    }
}

/// Kills and reaps a child of this process that nothing adopted (a process
/// the previous image was starting or stopping when it re-executed).
pub async fn reap_stray(pid: u32) {
    let g = group::Group::of(pid);
    match g.reap_pid().await {
        Ok(s) => tracing::info!(pid, "stopped a process the previous image left: {s}"),
        Err(e) => tracing::warn!(pid, "cannot reap a process the previous image left: {e}"),
    }
}

/// Children of this process (by `/proc/*/stat`'s parent pid).
pub fn children() -> Vec<u32> {
    let me = std::process::id();
    super::stat::pids()
        .filter(|pid| super::stat::read(*pid).is_some_and(|s| s.ppid == me))
        .collect()
}
