//! In-place upgrade: the broker re-executes its binary keeping its pid and
//! the new image adopts everything.
//!
//! What crosses `execve`: the named listeners, our ends of every server
//! process's pipes, the requester's control connection (to confirm), and a
//! JSON [`UpgradeState`] in a memfd whose fd number is in
//! [`STATE_ENV`]. Only those fds lose `FD_CLOEXEC`, only for the exec; if it
//! fails they get it back and the old image keeps serving. Connections that
//! wait in the listening socket's backlog meanwhile are accepted by the new
//! image: the socket itself never closes.

use super::registry::Listeners;
use crate::broker::socket::ListenError;
use crate::broker::Broker;
use crate::pool::adopt::PoolState;
use crate::process::adopt::set_cloexec;
use crate::shutdown::{ExecPlan, Signals};
use serde::{Deserialize, Serialize};
use std::ffi::{CString, OsString};
use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;
use tokio::net::UnixStream;

/// The environment variable naming the state's fd in the new image.
pub const STATE_ENV: &str = "MCP_BROKER_UPGRADE_FD";
/// Version of [`UpgradeState`]; a new image refuses another one.
const STATE_VERSION: u32 = 1;
/// Largest state the new image reads.
const MAX_STATE: u64 = 64 << 20;

/// Everything the new image needs.
#[derive(Debug, Serialize, Deserialize)]
pub struct UpgradeState {
    pub version: u32,
    pub listeners: Vec<(String, RawFd)>,
    /// Paths the broker removes when it exits (not systemd's socket).
    pub remove_at_exit: Vec<PathBuf>,
    /// The requester's control connection, answered by the new image.
    pub reply: Option<RawFd>,
    pub pools: Vec<PoolState>,
    /// The `requestState` sealing key (hex), so states sealed before the
    /// upgrade still open.
    pub sealer_key: String,
}

/// Why the upgrade did not happen (the old image keeps serving).
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("{0}")]
    Refused(String),
    #[error("cannot pass the state: {0}")]
    State(String),
    #[error("exec {path}: {errno}")]
    Exec {
        path: String,
        errno: nix::errno::Errno,
    },
    #[error("the upgrade state from the previous image: {0}")]
    Inherited(String),
    #[error("{0}")]
    Listen(#[from] ListenError),
}

/// What the new image inherited.
pub struct Inherited {
    pub listeners: Listeners,
    pub remove_at_exit: Vec<PathBuf>,
    pub pools: Vec<PoolState>,
    pub sealer_key: Option<[u8; 32]>,
    reply: Option<UnixStream>,
}

impl Inherited {
    /// Tells the requester the new image serves (best effort).
    pub async fn confirm(&mut self) {
        if let Some(s) = self.reply.take() {
            let pid = std::process::id();
            let _ = super::wire::send(&s, &super::wire::Message::Upgraded { pid }, &[]).await;
        }
    }
}

/// Reads the state a previous image passed, if this image is an upgrade
/// (and removes [`STATE_ENV`] so no child sees it). Call it before anything
/// else opens fds.
pub fn inherited() -> Result<Option<Inherited>, UpgradeError> {
    let Some(v) = std::env::var_os(STATE_ENV) else {
        return Ok(None);
    };
    std::env::remove_var(STATE_ENV);
    let bad = |e: String| UpgradeError::Inherited(e);
    let fd: RawFd = v
        .to_str()
        .and_then(|s| s.parse().ok())
        .filter(|fd| *fd > 2)
        .ok_or_else(|| bad(format!("{STATE_ENV}={v:?} is not an fd")))?;
    set_cloexec(fd, true).map_err(|e| bad(format!("fd {fd}: {e}")))?;
    // SAFETY: the previous image put the state's memfd at this fd number,
    // open across execve (checked just above), and names it nowhere else.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let mut text = Vec::new();
    file.rewind()
        .and_then(|_| (&mut file).take(MAX_STATE).read_to_end(&mut text))
        .map_err(|e| bad(e.to_string()))?;
    drop(file);
    let state: UpgradeState = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
    if state.version != STATE_VERSION {
        return Err(bad(format!(
            "state version {} (this image reads {STATE_VERSION})",
            state.version
        )));
    }
    let own = |fd: RawFd| -> Result<OwnedFd, UpgradeError> {
        set_cloexec(fd, true).map_err(|e| bad(format!("fd {fd}: {e}")))?;
        // SAFETY: passed open across execve (checked above) and named once
        // in the state; nothing in this image has claimed it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    };
    let mut names = Vec::new();
    let mut fds = Vec::new();
    for (name, fd) in state.listeners {
        names.push(name);
        fds.push(own(fd)?);
    }
    let listeners = Listeners::from_fds(names, fds)?;
    let reply = match state.reply {
        Some(fd) => {
            let s = std::os::unix::net::UnixStream::from(own(fd)?);
            s.set_nonblocking(true).map_err(|e| bad(e.to_string()))?;
            UnixStream::from_std(s).ok()
        }
        None => None,
    };
    Ok(Some(Inherited {
        listeners,
        remove_at_exit: state.remove_at_exit,
        pools: state.pools,
        sealer_key: from_hex(&state.sealer_key),
        reply,
    }))
}

/// The binary to execute: `configured`, else the path this one was started
/// from (`/proc/self/exe`, without the " (deleted)" a replaced file gets, so
/// a package update's new binary runs).
fn binary(configured: Option<&PathBuf>) -> PathBuf {
    if let Some(p) = configured {
        return p.clone();
    }
    match std::fs::read_link("/proc/self/exe") {
        Ok(p) => {
            let s = p.as_os_str().to_string_lossy();
            match s.strip_suffix(" (deleted)") {
                Some(stripped) => PathBuf::from(stripped),
                None => p,
            }
        }
        Err(_) => PathBuf::from("/proc/self/exe"),
    }
}

fn cstring(s: OsString) -> Result<CString, UpgradeError> {
    CString::new(s.into_vec()).map_err(|e| UpgradeError::State(e.to_string()))
}

/// Re-executes the broker with everything it serves. Returns only if the
/// upgrade failed; then every fd has its `FD_CLOEXEC` back and the caller
/// resumes serving. The broker must be settled (no lease in flight, no
/// process starting, pools frozen).
pub async fn exec(
    broker: &Broker,
    listeners: &Listeners,
    remove_at_exit: &[PathBuf],
    reply: Option<&UnixStream>,
    signals: &Signals,
    configured: Option<&PathBuf>,
) -> UpgradeError {
    let (pools, key) = broker.export();
    let state = UpgradeState {
        version: STATE_VERSION,
        listeners: listeners.raw(),
        remove_at_exit: remove_at_exit.to_vec(),
        reply: reply.map(|s| s.as_raw_fd()),
        pools,
        sealer_key: key.iter().map(|b| format!("{b:02x}")).collect(),
    };
    let memfd = match nix::sys::memfd::memfd_create(
        c"mcp-broker-upgrade",
        nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
    ) {
        Ok(fd) => std::fs::File::from(fd),
        Err(e) => return UpgradeError::State(format!("memfd_create: {e}")),
    };
    let json = serde_json::to_vec(&state).expect("state serializes");
    if let Err(e) = (&memfd).write_all(&json) {
        return UpgradeError::State(e.to_string());
    }
    let mut passed: Vec<RawFd> = state.listeners.iter().map(|(_, fd)| *fd).collect();
    passed.extend(
        state
            .pools
            .iter()
            .flat_map(|p| &p.processes)
            .flat_map(|p| p.process.fds),
    );
    passed.extend(state.reply);
    passed.push(memfd.as_raw_fd());
    let path = binary(configured);
    let plan = (|| -> Result<ExecPlan, UpgradeError> {
        let mut env: Vec<CString> = std::env::vars_os()
            .filter(|(k, _)| k != STATE_ENV)
            .map(|(k, v)| {
                let mut kv = k;
                kv.push("=");
                kv.push(v);
                cstring(kv)
            })
            .collect::<Result<_, _>>()?;
        env.push(cstring(
            format!("{STATE_ENV}={}", memfd.as_raw_fd()).into(),
        )?);
        Ok(ExecPlan {
            path: cstring(path.clone().into_os_string())?,
            argv: std::env::args_os().map(cstring).collect::<Result<_, _>>()?,
            env,
        })
    })();
    let plan = match plan {
        Ok(p) => p,
        Err(e) => return e,
    };
    let mut cleared = Vec::new();
    for &fd in &passed {
        if let Err(e) = set_cloexec(fd, false) {
            restore(&cleared);
            return UpgradeError::State(format!("fd {fd}: {e}"));
        }
        cleared.push(fd);
    }
    tracing::info!(binary = %path.display(), fds = passed.len(), "upgrading in place: exec");
    let errno = signals.exec(plan).await;
    restore(&cleared);
    UpgradeError::Exec {
        path: path.display().to_string(),
        errno,
    }
}

/// 32 bytes from 64 hex digits.
fn from_hex(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if s.len() != 64 {
        return None;
    }
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn restore(fds: &[RawFd]) {
    for &fd in fds {
        let _ = set_cloexec(fd, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sealing_key_survives_its_hex_form_and_bad_hex_is_refused() {
        let key: [u8; 32] = std::array::from_fn(|i| (i * 37 + 5) as u8);
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(from_hex(&hex), Some(key));
        assert_eq!(from_hex(&hex[..62]), None);
        assert_eq!(from_hex(&"zz".repeat(32)), None);
    }

    #[test]
    fn the_binary_is_the_configured_one_or_ours_without_deleted() {
        let p = PathBuf::from("/opt/x/mcp-broker");
        assert_eq!(binary(Some(&p)), p);
        assert!(!binary(None).to_string_lossy().ends_with(" (deleted)"));
    }
}
