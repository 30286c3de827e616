//! Binding the lease API socket: stale-file cleanup, permissions, group; or
//! taking over a socket that systemd passed (socket activation).
//!
//! Access to the socket *is* access to every pool, so its mode and group are
//! set before the first connection can be accepted (bind under a restrictive
//! umask, then chmod/chown). An inherited socket ([`inherited`]) was created
//! by systemd with the unit's `SocketMode=`/`SocketGroup=`; the broker leaves
//! it as it is and never removes it.

use std::io;
use std::os::fd::{FromRawFd, RawFd};
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
    // SAFETY: umask only changes this process's file-creation mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above; restores the previous mask.
    unsafe { libc::umask(old) };
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
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: getgrnam reads a NUL-terminated string; the result is read at once.
    let gr = unsafe { libc::getgrnam(c.as_ptr()) };
    if gr.is_null() {
        None
    } else {
        // SAFETY: non-null pointer to a valid group entry.
        Some(unsafe { (*gr).gr_gid })
    }
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
        1 => adopt(LISTEN_FDS_START).map(Some),
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

/// Checks that `fd` is a listening Unix stream socket and wraps it.
fn adopt(fd: RawFd) -> Result<UnixListener, ListenError> {
    let bad = |what: String| ListenError::Inherited(format!("fd {fd}: {what}"));
    let domain = sockopt(fd, libc::SO_DOMAIN).map_err(|e| bad(format!("not a socket ({e})")))?;
    if domain != libc::AF_UNIX {
        return Err(bad(format!(
            "address family {domain}, not AF_UNIX (use ListenStream=/path in the .socket unit)"
        )));
    }
    let ty = sockopt(fd, libc::SO_TYPE).map_err(|e| bad(e.to_string()))?;
    if ty != libc::SOCK_STREAM {
        return Err(bad(format!(
            "socket type {ty}, not SOCK_STREAM (use ListenStream=)"
        )));
    }
    if sockopt(fd, libc::SO_ACCEPTCONN).map_err(|e| bad(e.to_string()))? == 0 {
        return Err(bad("not listening (Accept=no is required)".into()));
    }
    // SAFETY: fcntl on an fd we checked is an open socket; flags only.
    let ok = unsafe {
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) == 0
            && libc::fcntl(
                fd,
                libc::F_SETFL,
                libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK,
            ) == 0
    };
    if !ok {
        return Err(bad(format!("fcntl: {}", io::Error::last_os_error())));
    }
    // SAFETY: the fd is an open listening socket passed to this process by
    // its activator and owned by nothing else here; the listener takes it.
    let std_listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
    UnixListener::from_std(std_listener).map_err(|e| bad(e.to_string()))
}

/// An integer `SOL_SOCKET` option of `fd`.
fn sockopt(fd: RawFd, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut val: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: val/len point to a c_int-sized buffer and its length.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut val as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r == 0 {
        Ok(val)
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn adopt_refuses_what_is_not_a_listening_unix_socket() {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(adopt(file.as_raw_fd())
            .unwrap_err()
            .to_string()
            .contains("not a socket"));
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(adopt(tcp.as_raw_fd())
            .unwrap_err()
            .to_string()
            .contains("AF_UNIX"));
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(adopt(a.as_raw_fd())
            .unwrap_err()
            .to_string()
            .contains("not listening"));
    }

    #[tokio::test]
    async fn adopt_takes_a_listening_unix_socket_and_sets_cloexec() {
        use std::os::fd::IntoRawFd;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let fd = std::os::unix::net::UnixListener::bind(&path)
            .unwrap()
            .into_raw_fd();
        // SAFETY: clearing FD_CLOEXEC on our own fd, as an activator leaves it.
        unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
        let l = adopt(fd).unwrap();
        // SAFETY: reading the flags of an open fd.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
        let c = tokio::net::UnixStream::connect(&path).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        drop((c, s));
    }
}
