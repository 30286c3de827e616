//! Binding the lease API socket: stale-file cleanup, permissions, group.
//!
//! Access to the socket *is* access to every pool, so its mode and group are
//! set before the first connection can be accepted (bind under a restrictive
//! umask, then chmod/chown).

use std::io;
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
