//! Applies a pool's `[pool.sandbox]` to a child between fork and exec.
//!
//! The job is split in two so the child does nothing unsafe:
//! * [`prepare`] runs in the broker: it resolves user and group names,
//!   checks privileges, builds every argument (rlimit values, the group
//!   list, the uid map line) and opens a close-on-exec report pipe.
//! * [`Prepared::apply`] runs in the forked child (tokio's `pre_exec`) and
//!   makes only async-signal-safe system calls on memory prepared before the
//!   fork: `unshare`, `open`/`write`/`close`, `setrlimit`, `setgroups`,
//!   `setgid`, `setuid`, `prctl`. No allocation, no locks.
//!
//! Invariants:
//! * A step that fails aborts the spawn (the process never runs its command
//!   unrestricted); the failing step and errno travel back through the report
//!   pipe so the spawn error names what failed and why (std only carries the
//!   errno).
//! * The order is fixed: network namespace first (it may need root), then
//!   rlimits, then groups/gid/uid (dropping root last but one), then
//!   no-new-privileges.
//! * The environment is decided in the broker ([`apply_env`]): with
//!   `env_clear` the child gets only the allowlisted broker variables plus
//!   the pool's own `env`.

use crate::config::sandbox::{Network, Principal, SandboxConfig};
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Why a sandbox could not be set up.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SandboxError {
    /// The broker lacks a privilege the sandbox needs.
    #[error("sandbox.{field} needs root (the broker runs as uid {euid})")]
    NeedsRoot { field: &'static str, euid: u32 },
    /// A user or group does not exist.
    #[error("sandbox.{field}: no such {kind} {name}")]
    Unknown {
        field: &'static str,
        kind: &'static str,
        name: String,
    },
    /// The child could not apply a step.
    #[error("sandbox: {step} failed in the child: {reason}")]
    Child { step: &'static str, reason: String },
    /// The report pipe could not be created.
    #[error("sandbox: cannot create the report pipe: {0}")]
    Pipe(String),
}

/// Steps the child reports by index.
const STEPS: [&str; 8] = [
    "network = \"none\" (unshare(CLONE_NEWNET), then unshare(CLONE_NEWUSER|CLONE_NEWNET); \
     the broker needs CAP_SYS_ADMIN or unprivileged user namespaces)",
    "max_open_files (setrlimit RLIMIT_NOFILE)",
    "max_address_space (setrlimit RLIMIT_AS)",
    "max_processes (setrlimit RLIMIT_NPROC)",
    "group (setgroups/setgid)",
    "user (setuid)",
    "no_new_privileges (prctl PR_SET_NO_NEW_PRIVS)",
    "unknown step",
];
const STEP_NET: u8 = 0;
const STEP_GID: u8 = 4;
const STEP_UID: u8 = 5;
const STEP_NNP: u8 = 6;

/// Everything the child needs, computed before the fork.
#[derive(Debug)]
pub struct Prepared {
    network_none: bool,
    try_plain_netns: bool,
    uid_map: Vec<u8>,
    rlimits: Vec<(u8, libc::__rlimit_resource_t, u64)>,
    groups: Option<Vec<libc::gid_t>>,
    gid: Option<libc::gid_t>,
    uid: Option<libc::uid_t>,
    no_new_privs: bool,
    report_read: OwnedFd,
    report_write: OwnedFd,
}

fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let c = CString::new(name).ok()?;
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; `buf` outlives `pw`'s use.
    let rc =
        unsafe { libc::getpwnam_r(c.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) };
    (rc == 0 && !out.is_null()).then_some((pw.pw_uid, pw.pw_gid))
}

fn lookup_group(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    let mut gr: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: as in lookup_user.
    let rc =
        unsafe { libc::getgrnam_r(c.as_ptr(), &mut gr, buf.as_mut_ptr(), buf.len(), &mut out) };
    (rc == 0 && !out.is_null()).then_some(gr.gr_gid)
}

/// Resolves `cfg` for a child of a broker running as `euid`. Returns `None`
/// when the sandbox restricts nothing that needs the fork hook.
pub fn prepare(cfg: &SandboxConfig, euid: u32) -> Result<Option<Prepared>, SandboxError> {
    let needs_hook = cfg.user.is_some()
        || cfg.group.is_some()
        || cfg.max_open_files.is_some()
        || cfg.max_address_space.is_some()
        || cfg.max_processes.is_some()
        || cfg.no_new_privileges
        || cfg.network == Network::None;
    if !needs_hook {
        return Ok(None);
    }
    let root = euid == 0;
    let mut uid = None;
    let mut gid = None;
    if let Some(u) = &cfg.user {
        if !root {
            return Err(SandboxError::NeedsRoot {
                field: "user",
                euid,
            });
        }
        let (id, primary) = match u {
            Principal::Id(n) => (*n, *n),
            Principal::Name(name) => lookup_user(name).ok_or_else(|| SandboxError::Unknown {
                field: "user",
                kind: "user",
                name: u.to_string(),
            })?,
        };
        uid = Some(id);
        gid = Some(primary);
    }
    if let Some(g) = &cfg.group {
        if !root {
            return Err(SandboxError::NeedsRoot {
                field: "group",
                euid,
            });
        }
        gid = Some(match g {
            Principal::Id(n) => *n,
            Principal::Name(name) => lookup_group(name).ok_or_else(|| SandboxError::Unknown {
                field: "group",
                kind: "group",
                name: g.to_string(),
            })?,
        });
    }
    let mut rlimits = Vec::new();
    for (step, res, v) in [
        (1, libc::RLIMIT_NOFILE, cfg.max_open_files),
        (2, libc::RLIMIT_AS, cfg.max_address_space),
        (3, libc::RLIMIT_NPROC, cfg.max_processes),
    ] {
        if let Some(v) = v {
            rlimits.push((step, res, v));
        }
    }
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(SandboxError::Pipe(
            std::io::Error::last_os_error().to_string(),
        ));
    }
    // SAFETY: the kernel just created these fds; we own them.
    let (report_read, report_write) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok(Some(Prepared {
        network_none: cfg.network == Network::None,
        try_plain_netns: root,
        uid_map: format!("{euid} {euid} 1").into_bytes(),
        rlimits,
        groups: gid.map(|g| vec![g]),
        gid,
        uid,
        no_new_privs: cfg.no_new_privileges,
        report_read,
        report_write,
    }))
}

/// Applies `cfg`'s environment rules to `cmd`, then the pool's own `env`.
pub fn apply_env(
    cmd: &mut tokio::process::Command,
    cfg: &SandboxConfig,
    env: &std::collections::BTreeMap<String, String>,
) {
    if cfg.env_clear {
        cmd.env_clear();
        for name in &cfg.env_allow {
            if let Some(v) = std::env::var_os(name) {
                cmd.env(name, v);
            }
        }
    }
    cmd.envs(env);
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EPERM)
}

impl Prepared {
    /// Sends step and errno to the broker and returns the error for std.
    fn fail(&self, step: u8, err: i32) -> std::io::Error {
        let mut msg = [0u8; 5];
        msg[0] = step;
        msg[1..].copy_from_slice(&err.to_ne_bytes());
        // SAFETY: write(2) on an fd we own with a valid buffer; signal-safe.
        unsafe {
            libc::write(
                self.report_write.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
            )
        };
        std::io::Error::from_raw_os_error(err)
    }

    fn write_uid_map(&self) {
        // SAFETY: open/write/close with valid NUL-terminated path and buffer.
        unsafe {
            let fd = libc::open(
                c"/proc/self/uid_map".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            if fd >= 0 {
                libc::write(fd, self.uid_map.as_ptr().cast(), self.uid_map.len());
                libc::close(fd);
            }
        }
    }

    /// Runs in the forked child, before exec. Async-signal-safe only.
    pub fn apply(&self) -> std::io::Result<()> {
        // SAFETY (whole fn): plain system calls on memory prepared before the
        // fork; nothing allocates or takes a lock.
        unsafe {
            if self.network_none {
                let plain = self.try_plain_netns && libc::unshare(libc::CLONE_NEWNET) == 0;
                if !plain {
                    if libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) != 0 {
                        return Err(self.fail(STEP_NET, errno()));
                    }
                    self.write_uid_map();
                }
            }
            for &(step, res, v) in &self.rlimits {
                let lim = libc::rlimit {
                    rlim_cur: v,
                    rlim_max: v,
                };
                if libc::setrlimit(res, &lim) != 0 {
                    return Err(self.fail(step, errno()));
                }
            }
            if let Some(groups) = &self.groups {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0 {
                    return Err(self.fail(STEP_GID, errno()));
                }
            }
            if let Some(gid) = self.gid {
                if libc::setgid(gid) != 0 {
                    return Err(self.fail(STEP_GID, errno()));
                }
            }
            if let Some(uid) = self.uid {
                if libc::setuid(uid) != 0 {
                    return Err(self.fail(STEP_UID, errno()));
                }
            }
            if self.no_new_privs && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(self.fail(STEP_NNP, errno()));
            }
        }
        Ok(())
    }

    /// After a failed spawn: the step the child reported, if any, as an
    /// error that names it.
    pub fn child_error(&self) -> Option<SandboxError> {
        let mut msg = [0u8; 5];
        // SAFETY: read(2) into a valid buffer on a non-blocking fd we own.
        let n = unsafe { libc::read(self.report_read.as_raw_fd(), msg.as_mut_ptr().cast(), 5) };
        if n != 5 {
            return None;
        }
        let step = STEPS[usize::from(msg[0]).min(STEPS.len() - 1)];
        let err = i32::from_ne_bytes([msg[1], msg[2], msg[3], msg[4]]);
        Some(SandboxError::Child {
            step,
            reason: std::io::Error::from_raw_os_error(err).to_string(),
        })
    }
}

/// The broker's effective uid.
pub fn euid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_to_do_without_restrictions() {
        assert!(prepare(&SandboxConfig::default(), 1000).unwrap().is_none());
        let env_only = SandboxConfig {
            env_clear: true,
            ..SandboxConfig::default()
        };
        assert!(prepare(&env_only, 1000).unwrap().is_none());
    }

    #[test]
    fn user_needs_root() {
        let c = SandboxConfig {
            user: Some(Principal::Name("nobody".into())),
            ..SandboxConfig::default()
        };
        let e = prepare(&c, 1000).unwrap_err();
        assert_eq!(
            e,
            SandboxError::NeedsRoot {
                field: "user",
                euid: 1000
            }
        );
        assert!(e.to_string().contains("needs root"), "{e}");
    }

    #[test]
    fn unknown_user_is_named() {
        let c = SandboxConfig {
            user: Some(Principal::Name("no-such-user-mcpb".into())),
            ..SandboxConfig::default()
        };
        let e = prepare(&c, 0).unwrap_err().to_string();
        assert!(
            e.contains("no such user") && e.contains("no-such-user-mcpb"),
            "{e}"
        );
    }

    #[test]
    fn numeric_ids_and_limits_resolve() {
        let c = SandboxConfig {
            user: Some(Principal::Id(4242)),
            max_open_files: Some(64),
            no_new_privileges: true,
            ..SandboxConfig::default()
        };
        let p = prepare(&c, 0).unwrap().unwrap();
        assert_eq!((p.uid, p.gid), (Some(4242), Some(4242)));
        assert_eq!(p.rlimits.len(), 1);
        assert!(p.child_error().is_none(), "nothing reported yet");
    }
}
