//! Applies a pool's `[pool.sandbox]` to a child between fork and exec.
//!
//! The job is split in two so the child does nothing unsafe:
//! * [`prepare`] runs in the broker: it resolves user and group names,
//!   checks privileges, builds every argument (rlimit values, the group
//!   list, the uid map line) and opens a close-on-exec report pipe.
//! * [`Prepared::apply`] runs in the forked child (tokio's `pre_exec`) and
//!   makes only async-signal-safe system calls on memory prepared before the
//!   fork: `unshare`, `open`/`write`/`close`, `setrlimit`, `setgroups`,
//!   `setgid`, `setuid`, `prctl`. No allocation, no locks. They go through
//!   nix's wrappers, each a single system call on the arguments as given
//!   (the `open` path is a `&CStr`, which nix passes through uncopied).
//!
//! Invariants:
//! * A step that fails aborts the spawn (the process never runs its command
//!   unrestricted); the failing step and errno travel back through the report
//!   pipe so the spawn error names what failed and why (std only carries the
//!   errno).
//! * The order is fixed: the pool's cgroup first (the child still may write
//!   its `cgroup.procs`), then the network namespace (it may need root), then
//!   rlimits, then groups/gid/uid (dropping root last but one), then
//!   no-new-privileges.
//! * The environment is decided in the broker ([`apply_env`]): with
//!   `env_clear` the child gets only the allowlisted broker variables plus
//!   the pool's own `env`.

use crate::config::sandbox::{Network, Principal, SandboxConfig};
use crate::config::PoolLimits;
use crate::node::Placement;
use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::sched::{unshare, CloneFlags};
use nix::sys::resource::{rlim_t, setrlimit, Resource};
use nix::sys::stat::Mode;
use nix::unistd::{setgid, setgroups, setuid, Gid, Uid};
use std::os::fd::OwnedFd;

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
const STEPS: [&str; 9] = [
    "network = \"none\" (unshare(CLONE_NEWNET), then unshare(CLONE_NEWUSER|CLONE_NEWNET); \
     the broker needs CAP_SYS_ADMIN or unprivileged user namespaces)",
    "max_open_files (setrlimit RLIMIT_NOFILE)",
    "max_address_space (setrlimit RLIMIT_AS)",
    "max_processes (setrlimit RLIMIT_NPROC)",
    "group (setgroups/setgid)",
    "user (setuid)",
    "no_new_privileges (prctl PR_SET_NO_NEW_PRIVS)",
    "joining the pool's cgroup (write to cgroup.procs)",
    "unknown step",
];
const STEP_NET: u8 = 0;
const STEP_GID: u8 = 4;
const STEP_UID: u8 = 5;
const STEP_NNP: u8 = 6;
const STEP_CGROUP: u8 = 7;

/// Everything the child needs, computed before the fork.
#[derive(Debug)]
pub struct Prepared {
    network_none: bool,
    try_plain_netns: bool,
    uid_map: Vec<u8>,
    rlimits: Vec<(u8, Resource, rlim_t)>,
    groups: Option<Vec<Gid>>,
    gid: Option<Gid>,
    uid: Option<Uid>,
    no_new_privs: bool,
    /// The pool cgroup's `cgroup.procs` files (one per v1 hierarchy).
    cgroup_procs: Vec<OwnedFd>,
    report_read: OwnedFd,
    report_write: OwnedFd,
}

/// uid and primary gid of user `name` (`getpwnam_r`).
fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let u = nix::unistd::User::from_name(name).ok()??;
    Some((u.uid.as_raw(), u.gid.as_raw()))
}

/// gid of group `name` (`getgrnam_r`).
fn lookup_group(name: &str) -> Option<u32> {
    let g = nix::unistd::Group::from_name(name).ok()??;
    Some(g.gid.as_raw())
}

/// Resolves `cfg` for a child of a broker running as `euid`, placed as
/// `place` says (the pool's own user and cgroup). Without a cgroup the
/// pool's `limits` stand in as rlimits where the sandbox sets none.
/// Returns `None` when nothing needs the fork hook.
pub fn prepare(
    cfg: &SandboxConfig,
    place: &Placement,
    limits: &PoolLimits,
    euid: u32,
) -> Result<Option<Prepared>, SandboxError> {
    let fallback = place.cgroup.is_none();
    let max_address_space = cfg.max_address_space.or(limits.memory.filter(|_| fallback));
    let max_processes = cfg.max_processes.or(limits.pids.filter(|_| fallback));
    let needs_hook = place.run_as.is_some()
        || place.cgroup.is_some()
        || max_address_space.is_some()
        || max_processes.is_some()
        || cfg.user.is_some()
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
    if let Some(r) = &place.run_as {
        uid = Some(r.uid);
        gid = Some(r.uid);
    }
    let cgroup_procs = match &place.cgroup {
        Some(c) => c.procs_files().map_err(|reason| SandboxError::Child {
            step: STEPS[usize::from(STEP_CGROUP)],
            reason,
        })?,
        None => Vec::new(),
    };
    let mut rlimits = Vec::new();
    for (step, res, v) in [
        (1, Resource::RLIMIT_NOFILE, cfg.max_open_files),
        (2, Resource::RLIMIT_AS, max_address_space),
        (3, Resource::RLIMIT_NPROC, max_processes),
    ] {
        if let Some(v) = v {
            rlimits.push((step, res, v));
        }
    }
    let (report_read, report_write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
        .map_err(|e| SandboxError::Pipe(std::io::Error::from(e).to_string()))?;
    Ok(Some(Prepared {
        network_none: cfg.network == Network::None,
        try_plain_netns: root,
        uid_map: format!("{euid} {euid} 1").into_bytes(),
        rlimits,
        groups: gid.map(|g| vec![Gid::from_raw(g)]),
        gid: gid.map(Gid::from_raw),
        uid: uid.map(Uid::from_raw),
        no_new_privs: cfg.no_new_privileges,
        cgroup_procs,
        report_read,
        report_write,
    }))
}

/// Applies `cfg`'s environment rules to `cmd`, then the pool user's home
/// variables, then the pool's own `env` (which wins).
pub fn apply_env(
    cmd: &mut tokio::process::Command,
    cfg: &SandboxConfig,
    place: &Placement,
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
    if let Some(r) = &place.run_as {
        // The broker's runtime directory is not the pool user's.
        cmd.env_remove("XDG_RUNTIME_DIR");
        cmd.envs(r.env());
    }
    cmd.envs(env);
}

impl Prepared {
    /// Sends step and errno to the broker and returns the error for std.
    fn fail(&self, step: u8, err: Errno) -> std::io::Error {
        let err = err as i32;
        let mut msg = [0u8; 5];
        msg[0] = step;
        msg[1..].copy_from_slice(&err.to_ne_bytes());
        // Best effort: the spawn fails with `err` either way.
        let _ = nix::unistd::write(&self.report_write, &msg);
        std::io::Error::from_raw_os_error(err)
    }

    /// Maps this process's uid to itself in the new user namespace (best
    /// effort: without a map the process runs as the overflow uid).
    fn write_uid_map(&self) {
        let flags = OFlag::O_WRONLY | OFlag::O_CLOEXEC;
        // A `&CStr` path is used as it is (nix copies other paths).
        if let Ok(fd) = open(c"/proc/self/uid_map", flags, Mode::empty()) {
            let _ = nix::unistd::write(&fd, &self.uid_map);
        } // dropping `fd` closes it
    }

    /// Runs in the forked child, before exec. Async-signal-safe only: every
    /// call below is a thin nix wrapper that passes memory prepared before
    /// the fork straight to one system call (checked in nix 0.32's source:
    /// no allocation, no lock), and errors are plain `Errno` values.
    pub fn apply(&self) -> std::io::Result<()> {
        // First, while the child may still write the broker's files.
        for fd in &self.cgroup_procs {
            nix::unistd::write(fd, b"0").map_err(|e| self.fail(STEP_CGROUP, e))?;
        }
        if self.network_none {
            let plain = self.try_plain_netns && unshare(CloneFlags::CLONE_NEWNET).is_ok();
            if !plain {
                unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNET)
                    .map_err(|e| self.fail(STEP_NET, e))?;
                self.write_uid_map();
            }
        }
        for &(step, res, v) in &self.rlimits {
            setrlimit(res, v, v).map_err(|e| self.fail(step, e))?;
        }
        if let Some(groups) = &self.groups {
            setgroups(groups).map_err(|e| self.fail(STEP_GID, e))?;
        }
        if let Some(gid) = self.gid {
            setgid(gid).map_err(|e| self.fail(STEP_GID, e))?;
        }
        if let Some(uid) = self.uid {
            setuid(uid).map_err(|e| self.fail(STEP_UID, e))?;
        }
        if self.no_new_privs {
            nix::sys::prctl::set_no_new_privs().map_err(|e| self.fail(STEP_NNP, e))?;
        }
        Ok(())
    }

    /// After a failed spawn: the step the child reported, if any, as an
    /// error that names it.
    pub fn child_error(&self) -> Option<SandboxError> {
        let mut msg = [0u8; 5];
        // Non-blocking: nothing reported reads as EAGAIN.
        if nix::unistd::read(&self.report_read, &mut msg) != Ok(5) {
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
    nix::unistd::geteuid().as_raw()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_to_do_without_restrictions() {
        assert!(prepare(
            &SandboxConfig::default(),
            &Placement::default(),
            &PoolLimits::default(),
            1000
        )
        .unwrap()
        .is_none());
        let env_only = SandboxConfig {
            env_clear: true,
            ..SandboxConfig::default()
        };
        assert!(prepare(
            &env_only,
            &Placement::default(),
            &PoolLimits::default(),
            1000
        )
        .unwrap()
        .is_none());
    }

    #[test]
    fn user_needs_root() {
        let c = SandboxConfig {
            user: Some(Principal::Name("nobody".into())),
            ..SandboxConfig::default()
        };
        let e = prepare(&c, &Placement::default(), &PoolLimits::default(), 1000).unwrap_err();
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
        let e = prepare(&c, &Placement::default(), &PoolLimits::default(), 0)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no such user") && e.contains("no-such-user-mcpb"),
            "{e}"
        );
    }

    #[test]
    fn names_resolve_through_the_reentrant_lookups() {
        assert_eq!(lookup_user("root"), Some((0, 0)));
        assert_eq!(lookup_group("root"), Some(0));
        assert_eq!(lookup_user("no-such-user-mcpb"), None);
        assert_eq!(lookup_group("no-such-group-mcpb"), None);
        assert_eq!(lookup_user("nul\0byte"), None);
    }

    #[test]
    fn numeric_ids_and_limits_resolve() {
        let c = SandboxConfig {
            user: Some(Principal::Id(4242)),
            max_open_files: Some(64),
            no_new_privileges: true,
            ..SandboxConfig::default()
        };
        let p = prepare(&c, &Placement::default(), &PoolLimits::default(), 0)
            .unwrap()
            .unwrap();
        assert_eq!(
            (p.uid, p.gid),
            (Some(Uid::from_raw(4242)), Some(Gid::from_raw(4242)))
        );
        assert_eq!(p.rlimits.len(), 1);
        assert!(p.child_error().is_none(), "nothing reported yet");
    }
}
