//! Binding the lease API socket: stale-file cleanup, permissions, group; or
//! taking over a socket that systemd passed (socket activation).
//!
//! Access to the socket *is* access to every pool, so its mode and group are
//! set before the first connection can be accepted (bind under a restrictive
//! umask, then chmod/chown). An inherited socket ([`inherited`]) was created
//! by systemd with the unit's `SocketMode=`/`SocketGroup=`; the broker leaves
//! it as it is and never removes it.

use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::sys::socket::{getsockname, getsockopt, sockopt, AddressFamily, SockType, SockaddrLike};
use nix::sys::stat::{umask, Mode};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use tokio::net::UnixListener;

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("another broker is already listening on {0}")]
    InUse(String),
    #[error("cannot create socket {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("unknown group {0:?} (socket_group)")]
    NoGroup(String),
    /// `LISTEN_FDS`/`LISTEN_PID` are malformed or name an unusable socket.
    #[error("socket activation: {0}")]
    Inherited(String),
}

/// Binds `path` with `mode` and optional `group`, replacing a stale socket.
pub fn bind(path: &Path, mode: u32, group: Option<&str>) -> Result<UnixListener, ListenError> {
    let shown = path.display().to_string();
    let io_err = |source| ListenError::Io {
        path: shown.clone(),
        source,
    };
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(io_err)?;
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ListenError::InUse(shown));
        }
        std::fs::remove_file(path).map_err(io_err)?;
    }
    let old = umask(Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    umask(old);
    let listener = bound.map_err(io_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_err)?;
    if let Some(g) = group {
        let gid = group_id(g).ok_or_else(|| ListenError::NoGroup(g.to_string()))?;
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(io_err)?;
    }
    Ok(listener)
}

fn group_id(name: &str) -> Option<u32> {
    if let Ok(n) = name.parse::<u32>() {
        return Some(n);
    }
    // getgrnam_r: reentrant, unlike getgrnam's static buffer.
    let g = nix::unistd::Group::from_name(name).ok()??;
    Some(g.gid.as_raw())
}

/// The first file descriptor passed by systemd (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// Takes over the lease API socket passed by systemd socket activation
/// (the `sd_listen_fds(3)` protocol), if there is one for this process.
///
/// Returns `Ok(None)` when `LISTEN_FDS` is unset, or `LISTEN_PID` names
/// another process (the variables were inherited from a parent that was
/// activated, not meant for us). Exactly one socket is accepted: fd 3, a
/// listening `AF_UNIX` stream socket. The fd gets `FD_CLOEXEC` (so server
/// processes do not inherit it) and `O_NONBLOCK`. `LISTEN_PID`,
/// `LISTEN_FDS` and `LISTEN_FDNAMES` are removed from the environment in
/// every case, so child processes never see them.
///
/// Call it before spawning threads that read the environment with libc
/// (`serve` calls it before any pool starts).
pub fn inherited() -> Result<Option<UnixListener>, ListenError> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    match passed_fds(pid.as_deref(), fds.as_deref(), std::process::id())? {
        0 => Ok(None),
        1 => adopt_passed().map(Some),
        n => Err(ListenError::Inherited(format!(
            "systemd passed {n} sockets; the broker serves exactly one \
             (one ListenStream= in mcp-broker.socket)"
        ))),
    }
}

/// How many sockets `LISTEN_PID`/`LISTEN_FDS` pass to the process `pid`:
/// 0 when they are absent or meant for another process.
fn passed_fds(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    pid: u32,
) -> Result<usize, ListenError> {
    let Some(fds) = listen_fds else {
        return Ok(0);
    };
    let Some(target) = listen_pid else {
        // sd_listen_fds(3) requires LISTEN_PID; without it the fds are not ours.
        return Ok(0);
    };
    let target: u32 = target.trim().parse().map_err(|_| {
        ListenError::Inherited(format!("LISTEN_PID={target:?} is not a process id"))
    })?;
    if target != pid {
        return Ok(0);
    }
    let n: usize = fds
        .trim()
        .parse()
        .map_err(|_| ListenError::Inherited(format!("LISTEN_FDS={fds:?} is not a count")))?;
    if n > 1024 {
        return Err(ListenError::Inherited(format!(
            "LISTEN_FDS={n} is implausible"
        )));
    }
    Ok(n)
}

/// Takes over fd 3: checks it while only borrowing it, then owns it.
fn adopt_passed() -> Result<UnixListener, ListenError> {
    // SAFETY: `inherited` found LISTEN_PID naming this process and
    // LISTEN_FDS=1, so by sd_listen_fds(3) the activator passed fd 3 open
    // to this process; nothing in the broker opens, closes or claims it
    // (the variables are gone, so this runs once). The borrow ends before
    // ownership is taken below; if the activator broke the protocol and
    // fd 3 is closed, the checks fail with EBADF and nothing is owned.
    let fd = unsafe { BorrowedFd::borrow_raw(LISTEN_FDS_START) };
    check_listener(fd)?;
    // SAFETY: as above, and fd 3 is now known to be an open listening
    // socket that nothing else owns: the listener takes sole ownership.
    let owned = unsafe { OwnedFd::from_raw_fd(LISTEN_FDS_START) };
    into_listener(owned)
}

/// Takes over a listening socket passed by another broker (a handoff or
/// this broker's previous image): checked like systemd's, then owned.
pub fn adopt_fd(fd: OwnedFd) -> Result<UnixListener, ListenError> {
    use std::os::fd::AsFd;
    check_listener(fd.as_fd())?;
    into_listener(fd)
}

/// Checks that `fd` is a listening Unix stream socket and gives it
/// `FD_CLOEXEC` and `O_NONBLOCK`.
fn check_listener(fd: BorrowedFd<'_>) -> Result<(), ListenError> {
    let raw = fd.as_raw_fd();
    let bad = |what: String| ListenError::Inherited(format!("fd {raw}: {what}"));
    // SO_DOMAIN is not in nix; the bound address's family is the same thing.
    let domain = getsockname::<nix::sys::socket::SockaddrStorage>(raw)
        .map(|a| a.family())
        .map_err(|e| bad(format!("not a socket ({e})")))?;
    if domain != Some(AddressFamily::Unix) {
        let family = domain.map_or_else(|| "unknown".into(), |f| format!("{f:?}"));
        return Err(bad(format!(
            "address family {family}, not AF_UNIX (use ListenStream=/path in the .socket unit)"
        )));
    }
    let ty = getsockopt(&fd, sockopt::SockType).map_err(|e| bad(e.to_string()))?;
    if ty != SockType::Stream {
        return Err(bad(format!(
            "socket type {ty:?}, not SOCK_STREAM (use ListenStream=)"
        )));
    }
    if !getsockopt(&fd, sockopt::AcceptConn).map_err(|e| bad(e.to_string()))? {
        return Err(bad("not listening (Accept=no is required)".into()));
    }
    let set_flags = || -> nix::Result<()> {
        fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
        let fl = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
        fcntl(fd, FcntlArg::F_SETFL(fl | OFlag::O_NONBLOCK))?;
        Ok(())
    };
    set_flags().map_err(|e| bad(format!("fcntl: {}", io::Error::from(e))))
}

/// Wraps a socket that passed [`check_listener`].
fn into_listener(fd: OwnedFd) -> Result<UnixListener, ListenError> {
    let raw = fd.as_raw_fd();
    UnixListener::from_std(std::os::unix::net::UnixListener::from(fd))
        .map_err(|e| ListenError::Inherited(format!("fd {raw}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn absent_or_foreign_variables_pass_nothing() {
        assert_eq!(passed_fds(None, None, 42).unwrap(), 0);
        assert_eq!(passed_fds(Some("42"), None, 42).unwrap(), 0);
        assert_eq!(passed_fds(None, Some("1"), 42).unwrap(), 0);
        // Inherited from an activated parent: not ours.
        assert_eq!(passed_fds(Some("41"), Some("1"), 42).unwrap(), 0);
    }

    #[test]
    fn counts_for_this_process() {
        assert_eq!(passed_fds(Some("42"), Some("1"), 42).unwrap(), 1);
        assert_eq!(passed_fds(Some("42"), Some("0"), 42).unwrap(), 0);
        assert_eq!(passed_fds(Some(" 42 "), Some("2\n"), 42).unwrap(), 2);
    }

    #[test]
    fn malformed_variables_are_errors() {
        for (pid, fds) in [("x", "1"), ("42", "one"), ("42", "-1"), ("42", "100000")] {
            let e = passed_fds(Some(pid), Some(fds), 42).unwrap_err();
            assert!(e.to_string().starts_with("socket activation:"), "{e}");
        }
    }

    #[test]
    fn socket_group_by_name_or_number() {
        assert_eq!(group_id("root"), Some(0));
        assert_eq!(group_id("4242"), Some(4242));
        assert_eq!(group_id("no-such-group-mcpb"), None);
    }

    #[test]
    fn check_refuses_what_is_not_a_listening_unix_socket() {
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(check_listener(file.as_fd())
            .unwrap_err()
            .to_string()
            .contains("not a socket"));
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(check_listener(tcp.as_fd())
            .unwrap_err()
            .to_string()
            .contains("AF_UNIX"));
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(check_listener(a.as_fd())
            .unwrap_err()
            .to_string()
            .contains("not listening"));
    }

    #[tokio::test]
    async fn a_listening_unix_socket_is_taken_with_cloexec() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let std_listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        // Clear FD_CLOEXEC, as an activator leaves it.
        fcntl(&std_listener, FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
        check_listener(std_listener.as_fd()).unwrap();
        let flags = fcntl(&std_listener, FcntlArg::F_GETFD).unwrap();
        assert!(FdFlag::from_bits_retain(flags).contains(FdFlag::FD_CLOEXEC));
        let l = into_listener(OwnedFd::from(std_listener)).unwrap();
        let c = tokio::net::UnixStream::connect(&path).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        drop((c, s));
    }
}
