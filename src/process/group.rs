//! Process-group signalling and exit detection that never races with reaping.
//!
//! Every server process leads its own process group, so one `killpg` reaches
//! `npx` and the `node` it started. The group id stays reserved while the
//! leader is an unreaped zombie, so the broker always signals the group
//! *before* it reaps the leader; a pidfd tells it the leader exited without
//! reaping it, which closes the pid-reuse race.
//!
//! [`Group`] is the crate's one way to signal a child it spawned (the pools'
//! server processes and the benchmark's daemons, peers and stdio servers):
//! * every signal is sent under a lock that [`Group::reap`] takes before it
//!   reaps, and none is sent once the leader may have been reaped, so a
//!   signal can never reach a group (or a process) that reused the id;
//! * reaping always goes through [`Group::reap`] or [`Group::try_reap`],
//!   which SIGKILL what is left of the group first (the leader is still
//!   unreaped then, so the id is still ours).

use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::os::fd::OwnedFd;
use std::process::ExitStatus;
use std::sync::Mutex;
use std::time::Duration;
use tokio::io::unix::AsyncFd;

/// How often exit is polled for when no pidfd is available.
const EXIT_POLL: Duration = Duration::from_millis(50);

/// The process group led by a child this process spawned with
/// `process_group(0)` and has not reaped yet.
pub struct Group {
    /// The leader's pid, which is the group id; 0 if unknown (then nothing
    /// is ever signalled).
    pgid: u32,
    /// Whether the leader may have been reaped. Held while signalling, so
    /// reaping cannot start in the middle of a signal.
    reaped: Mutex<bool>,
    watch: ExitWatch,
}

impl Group {
    /// The group `child` leads. `child` must have been spawned with
    /// `process_group(0)`; call this in a tokio runtime (the exit watch
    /// registers a pidfd with it).
    pub fn leader(child: &tokio::process::Child) -> Self {
        Self::of(child.id().unwrap_or(0))
    }

    /// The group led by `pid`, a child of this process that leads its own
    /// group and is not reaped: one spawned by this process's previous image
    /// (before an in-place upgrade), adopted after `execve`. Call it in a
    /// tokio runtime.
    pub fn of(pgid: u32) -> Self {
        Self {
            pgid,
            reaped: Mutex::new(false),
            watch: ExitWatch::new(pgid),
        }
    }

    /// Sends `sig` to every process in the group, unless the leader may have
    /// been reaped; a group that is already gone is fine.
    pub fn signal(&self, sig: Signal) {
        self.send(sig, |pid| killpg(pid, sig));
    }

    /// Sends `sig` to the leader alone, with the same guard as [`Self::signal`].
    pub fn signal_leader(&self, sig: Signal) {
        self.send(sig, |pid| kill(pid, sig));
    }

    fn send(&self, sig: Signal, call: impl FnOnce(Pid) -> nix::Result<()>) {
        if self.pgid <= 1 {
            return; // never signal init's group or "every process"
        }
        let reaped = self.reaped.lock().unwrap_or_else(|e| e.into_inner());
        if !*reaped {
            // ESRCH (everyone in the group has exited) is fine.
            if let Err(e) = call(Pid::from_raw(self.pgid as i32)) {
                tracing::trace!(pgid = self.pgid, ?sig, "signal not sent: {e}");
            }
        }
    }

    /// Resolves once the leader has exited (it is not reaped).
    pub async fn exited(&self) {
        self.watch.wait().await
    }

    /// Whether the leader has exited (without reaping it).
    pub fn has_exited(&self) -> bool {
        self.watch.has_exited()
    }

    /// SIGKILLs whatever is left of the group (the leader too, if it still
    /// runs), then reaps the leader. Nothing is signalled through `self`
    /// afterwards.
    pub async fn reap(&self, child: &mut tokio::process::Child) -> std::io::Result<ExitStatus> {
        self.finish();
        child.wait().await
    }

    /// [`Self::reap`] for a leader this image did not spawn (no
    /// `tokio::process::Child`): SIGKILLs the rest of the group, waits for
    /// the leader's exit on its pidfd, then reaps it with `waitpid`.
    pub async fn reap_pid(&self) -> std::io::Result<ExitStatus> {
        use std::os::unix::process::ExitStatusExt;
        self.finish();
        if self.pgid <= 1 {
            return Err(std::io::Error::other("no process to reap"));
        }
        let pid = Pid::from_raw(self.pgid as i32);
        loop {
            self.watch.wait().await;
            match nix::sys::wait::waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => return Ok(ExitStatus::from_raw(code << 8)),
                Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(ExitStatus::from_raw(sig as i32)),
                Ok(_) => tokio::time::sleep(EXIT_POLL).await,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// [`Self::reap`] if the leader has exited, else `Ok(None)` and nothing
    /// happens (like `Child::try_wait`).
    pub fn try_reap(
        &self,
        child: &mut tokio::process::Child,
    ) -> std::io::Result<Option<ExitStatus>> {
        if !self.has_exited() {
            return Ok(None);
        }
        self.finish();
        child.try_wait()
    }

    /// The last signal: the leader is not reaped yet, so the group id cannot
    /// have been reused; after this nothing is signalled.
    fn finish(&self) {
        let mut reaped = self.reaped.lock().unwrap_or_else(|e| e.into_inner());
        if !*reaped && self.pgid > 1 {
            let _ = killpg(Pid::from_raw(self.pgid as i32), Signal::SIGKILL);
        }
        *reaped = true;
    }
}

/// Resolves when process `pid` (a child of this process) has exited,
/// without reaping it.
struct ExitWatch {
    pid: u32,
    fd: Option<AsyncFd<OwnedFd>>,
}

impl ExitWatch {
    /// Opens a pidfd for `pid` (Linux 5.3+); without one, [`Self::wait`]
    /// polls `waitid(WNOWAIT)`.
    fn new(pid: u32) -> Self {
        let fd = rustix::process::Pid::from_raw(pid as i32)
            .and_then(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok())
            .and_then(|owned| {
                // SAFETY: the AsyncFd takes ownership of `owned`, a valid open
                // pidfd, and keeps it open until the AsyncFd is dropped;
                // OwnedFd::as_raw_fd always returns that same fd.
                unsafe { AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) }
                    .ok()
            });
        Self { pid, fd }
    }

    /// Waits until the process has exited (or, with a pidfd, until the
    /// runtime it is registered with shuts down).
    async fn wait(&self) {
        match &self.fd {
            Some(fd) => {
                let _ = fd.readable().await;
            }
            None => {
                while !self.has_exited() {
                    tokio::time::sleep(EXIT_POLL).await;
                }
            }
        }
    }

    /// Whether the process has exited: `waitid(WEXITED | WNOHANG | WNOWAIT)`
    /// leaves it waitable. A pid that is not (or no longer) a waitable child
    /// counts as exited.
    fn has_exited(&self) -> bool {
        if self.pid == 0 {
            return true;
        }
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        match waitid(Id::Pid(Pid::from_raw(self.pid as i32)), flags) {
            Ok(WaitStatus::StillAlive) => false,
            Ok(_) => true,
            Err(nix::errno::Errno::ECHILD) => true,
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;
    use tokio::io::AsyncBufReadExt;

    const LIMIT: Duration = Duration::from_secs(10);

    /// The state letter of `/proc/<pid>/stat` (`Z` for a zombie), if any.
    fn state(pid: u32) -> Option<char> {
        crate::process::stat::read(pid).map(|s| s.state)
    }

    fn spawn(script: &str) -> tokio::process::Child {
        tokio::process::Command::new("sh")
            .args(["-c", script])
            .stdout(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    }

    #[tokio::test]
    async fn the_group_is_killed_before_its_leader_is_reaped() {
        let mut child = spawn("sleep 600 & echo $!");
        let group = Group::leader(&child);
        let leader = child.id().unwrap();
        let mut line = String::new();
        tokio::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .await
            .unwrap();
        let straggler: u32 = line.trim().parse().unwrap();
        tokio::time::timeout(LIMIT, group.exited()).await.unwrap();
        assert!(group.has_exited());
        assert_eq!(state(leader), Some('Z'), "exited, not reaped");
        assert!(state(straggler).is_some_and(|s| s != 'Z'), "still running");
        assert!(group.reap(&mut child).await.unwrap().success());
        assert!(*group.reaped.lock().unwrap(), "nothing is signalled now");
        let start = std::time::Instant::now();
        // Killed (a zombie until init reaps it, or gone).
        while state(straggler).is_some_and(|s| s != 'Z') {
            assert!(start.elapsed() < LIMIT, "the straggler survived");
            tokio::time::sleep(EXIT_POLL).await;
        }
    }

    #[tokio::test]
    async fn try_reap_leaves_a_running_leader_alone() {
        let mut child = spawn("exec sleep 600");
        let group = Group::leader(&child);
        assert!(group.try_reap(&mut child).unwrap().is_none());
        assert!(!group.has_exited());
        assert!(!*group.reaped.lock().unwrap());
        group.signal(Signal::SIGTERM);
        tokio::time::timeout(LIMIT, group.exited()).await.unwrap();
        let status = group.try_reap(&mut child).unwrap().expect("reaped");
        assert_eq!(status.signal(), Some(Signal::SIGTERM as i32));
    }

    #[tokio::test]
    async fn without_a_pidfd_exit_is_polled_and_nothing_is_reaped() {
        let mut child = spawn("exec sleep 0.2");
        let pid = child.id().unwrap();
        let watch = ExitWatch { pid, fd: None };
        assert!(!watch.has_exited());
        tokio::time::timeout(LIMIT, watch.wait()).await.unwrap();
        assert_eq!(state(pid), Some('Z'), "exited, not reaped");
        assert!(child.wait().await.unwrap().success());
    }
}
