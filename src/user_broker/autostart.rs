//! Starting the per-user broker on first use, from a shim.
//!
//! Many shims may find no broker at the same moment (an agent starting ten
//! servers at once). Exactly one must start it:
//! 1. a shim that can connect to the socket is done;
//! 2. else it takes an exclusive `flock` on `broker.lock` in the same
//!    directory (bounded wait) and connects again: whoever held the lock may
//!    have started the broker meanwhile;
//! 3. still nothing: the socket file, if any, is stale (a connect failed), so
//!    it is removed under the lock, and the broker is started detached (its
//!    own session, stdin from `/dev/null`, output appended to `broker.log`);
//! 4. the lock is held until the new broker accepts connections (bounded),
//!    so waiting shims find it running.

use super::{dir, PID_NAME};
use nix::fcntl::{Flock, FlockArg};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The lock file's name inside the per-user directory.
pub const LOCK_NAME: &str = "broker.lock";
/// The log file's name inside the per-user directory.
pub const LOG_NAME: &str = "broker.log";
/// Longest wait for another shim's start to finish (the lock).
const LOCK_WAIT: Duration = Duration::from_secs(20);
/// Longest wait for a started broker to accept connections.
const START_WAIT: Duration = Duration::from_secs(15);
/// Poll interval of both waits.
const POLL: Duration = Duration::from_millis(10);

/// What [`ensure_running`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Started {
    /// A broker was already listening.
    Already,
    /// This call started it.
    ByUs,
}

/// Why no per-user broker could be reached or started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Dir(#[from] dir::DirError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("another mcp-broker connect held {path} for {LOCK_WAIT:?} while starting the per-user broker")]
    LockTimeout { path: String },
    #[error("the per-user broker exited at start ({status}); see {log}")]
    Exited { status: String, log: String },
    #[error("the per-user broker did not listen on {socket} within {START_WAIT:?}; see {log}")]
    NotListening { socket: String, log: String },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StartError + 'a {
    move |source| StartError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

/// Makes sure a per-user broker listens on `socket`, starting `exe
/// user-broker --socket SOCKET ARGS...` in the background when none does.
pub fn ensure_running(socket: &Path, exe: &Path, args: &[String]) -> Result<Started, StartError> {
    if UnixStream::connect(socket).is_ok() {
        return Ok(Started::Already);
    }
    let d = socket.parent().unwrap_or(Path::new("."));
    dir::prepare(d)?;
    let _lock = lock(&d.join(LOCK_NAME))?;
    // Whoever held the lock before may have started it.
    if UnixStream::connect(socket).is_ok() {
        return Ok(Started::Already);
    }
    // Nothing answers: a socket file left is stale (its broker died).
    match std::fs::remove_file(socket) {
        Ok(()) => {
            tracing::info!(socket = %socket.display(), "removed a stale per-user broker socket")
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("cannot remove the stale socket", socket)(e)),
    }
    let log_path = d.join(LOG_NAME);
    let mut child = spawn(socket, exe, args, &log_path)?;
    let log = log_path.display().to_string();
    let deadline = Instant::now() + START_WAIT;
    loop {
        if UnixStream::connect(socket).is_ok() {
            tracing::info!(pid = child.id(), socket = %socket.display(), "started the per-user broker");
            return Ok(Started::ByUs);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(StartError::Exited {
                status: status.to_string(),
                log,
            });
        }
        if Instant::now() >= deadline {
            return Err(StartError::NotListening {
                socket: socket.display().to_string(),
                log,
            });
        }
        std::thread::sleep(POLL);
    }
}

/// Takes the exclusive lock on `path`, waiting at most [`LOCK_WAIT`].
fn lock(path: &Path) -> Result<Flock<File>, StartError> {
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(io("cannot open the lock file", path))?;
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => return Ok(l),
            Err((f, nix::errno::Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                file = f;
                std::thread::sleep(POLL);
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(StartError::LockTimeout {
                    path: path.display().to_string(),
                })
            }
            Err((_, e)) => return Err(io("cannot lock", path)(e.into())),
        }
    }
}

/// Starts the broker detached: its own session (no signal from the host's
/// terminal or process group reaches it), output to `log`.
fn spawn(
    socket: &Path,
    exe: &Path,
    args: &[String],
    log: &Path,
) -> Result<std::process::Child, StartError> {
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(log)
        .map_err(io("cannot open the log file", log))?;
    let err = out
        .try_clone()
        .map_err(io("cannot open the log file", log))?;
    let mut cmd = Command::new(exe);
    cmd.arg("user-broker")
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .current_dir("/");
    // SAFETY: runs in the forked child before exec; setsid(2) is
    // async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    cmd.spawn().map_err(io("cannot start", exe))
}

/// The pid a running per-user broker wrote next to `socket`, if any.
pub fn running_pid(socket: &Path) -> Option<i32> {
    let p: PathBuf = socket.with_file_name(PID_NAME);
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}
