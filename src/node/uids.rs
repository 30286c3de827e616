//! A uid (and gid of the same number) per pool and per tenant, each with a
//! private home.
//!
//! Why: processes of one uid can read each other's `/proc/<pid>/{fd,environ,
//! mem}` and files; a uid per pool is what keeps one pool's server (or a
//! compromised npm release inside it) out of another pool's JSON-RPC,
//! secrets and caches.
//!
//! Invariants:
//! * Assignments live in `<state_dir>/uids` (`<uid> <key>` lines), read and
//!   rewritten under an exclusive `flock`, so brokers sharing a state dir
//!   (tests, a take-over) agree, and a pool keeps its uid (and the caches in
//!   its home) across restarts.
//! * A uid is never handed to another key: what a former tenant left in its
//!   home cannot reach the next one. Running out is an error naming
//!   `uid_range`.
//! * Homes are `<state_dir>/homes/<uid>`, mode 0700, owned by the uid; the
//!   directories above are 0711 (reachable, not listable).

use crate::config::NodeSettings;
use nix::fcntl::{Flock, FlockArg};
use nix::unistd::{chown, Gid, Uid};
use std::collections::HashMap;
use std::io::Write;
use std::ops::RangeInclusive;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Who a pool's processes run as, and where their files go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    /// uid, and gid of the same number.
    pub uid: u32,
    /// The private home (also TMPDIR's and the caches' parent).
    pub home: PathBuf,
}

impl RunAs {
    /// The variables that point programs at the private home: HOME, a
    /// TMPDIR inside it, the XDG directories, and the npm, uv and pip
    /// caches by name (set in the broker's environment, they would point
    /// every pool at one shared cache).
    pub fn env(&self) -> Vec<(&'static str, PathBuf)> {
        let h = &self.home;
        vec![
            ("HOME", h.clone()),
            ("TMPDIR", h.join("tmp")),
            ("XDG_CACHE_HOME", h.join(".cache")),
            ("XDG_CONFIG_HOME", h.join(".config")),
            ("XDG_DATA_HOME", h.join(".local/share")),
            ("XDG_STATE_HOME", h.join(".local/state")),
            ("npm_config_cache", h.join(".npm")),
            ("UV_CACHE_DIR", h.join(".cache/uv")),
            ("PIP_CACHE_DIR", h.join(".cache/pip")),
        ]
    }
}

/// Why a uid could not be given.
#[derive(Debug, thiserror::Error)]
pub enum UidError {
    #[error("state_dir {path}: {reason}")]
    StateDir { path: String, reason: String },
    #[error("every uid of uid_range {first}-{last} is assigned already; widen [broker] uid_range")]
    Exhausted { first: u32, last: u32 },
    #[error("home {path} is owned by uid {owner}, not {uid}; remove it or fix its owner")]
    ForeignHome { path: String, owner: u32, uid: u32 },
}

/// The assigner of one broker.
pub struct Uids {
    range: RangeInclusive<u32>,
    state_dir: PathBuf,
    /// Keys already prepared by this broker (skips the file on reuse).
    known: Mutex<HashMap<String, RunAs>>,
}

impl Uids {
    /// Prepares `state_dir` and `state_dir/homes` (0711).
    pub fn open(s: &NodeSettings) -> Result<Uids, UidError> {
        let dir = &s.state_dir;
        let err = |reason: String| UidError::StateDir {
            path: dir.display().to_string(),
            reason,
        };
        for d in [dir.clone(), dir.join("homes")] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o711)
                .create(&d)
                .map_err(|e| err(e.to_string()))?;
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o711))
                .map_err(|e| err(e.to_string()))?;
        }
        unreachable_by_others(dir).map_err(err)?;
        Ok(Uids {
            range: s.uid_range.clone(),
            state_dir: dir.clone(),
            known: Mutex::new(HashMap::new()),
        })
    }

    /// The uid and home of `key` (a pool name, or `pool@tenant`), assigned
    /// on first use; the home exists and belongs to the uid on return.
    pub fn assign(&self, key: &str) -> Result<RunAs, UidError> {
        if let Some(r) = self.known.lock().expect("lock").get(key) {
            return Ok(r.clone());
        }
        let uid = self.assign_in_file(key)?;
        let home = self.state_dir.join("homes").join(uid.to_string());
        prepare_home(&home, uid)?;
        let r = RunAs { uid, home };
        self.known
            .lock()
            .expect("lock")
            .insert(key.to_string(), r.clone());
        Ok(r)
    }

    fn assign_in_file(&self, key: &str) -> Result<u32, UidError> {
        let path = self.state_dir.join("uids");
        let err = |reason: String| UidError::StateDir {
            path: path.display().to_string(),
            reason,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| err(e.to_string()))?;
        // Blocking, but held only for one read and one short append.
        let mut file =
            Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| err(e.to_string()))?;
        let text = std::fs::read_to_string(&path).map_err(|e| err(e.to_string()))?;
        let mut highest = None;
        for line in text.lines() {
            let Some((n, k)) = line.split_once(' ') else {
                continue;
            };
            let Ok(n) = n.parse::<u32>() else { continue };
            if k == key {
                return Ok(n);
            }
            if self.range.contains(&n) {
                highest = Some(highest.map_or(n, |h: u32| h.max(n)));
            }
        }
        let uid = match highest {
            None => *self.range.start(),
            Some(h) if h < *self.range.end() => h + 1,
            Some(_) => {
                return Err(UidError::Exhausted {
                    first: *self.range.start(),
                    last: *self.range.end(),
                })
            }
        };
        writeln!(file, "{uid} {key}").map_err(|e| err(e.to_string()))?;
        file.sync_data().map_err(|e| err(e.to_string()))?;
        Ok(uid)
    }
}

/// Creates `home` (0700) with `tmp` and `.cache` inside, all owned by
/// `uid`; an existing home must already belong to `uid`.
fn prepare_home(home: &Path, uid: u32) -> Result<(), UidError> {
    let err = |p: &Path, e: std::io::Error| UidError::StateDir {
        path: p.display().to_string(),
        reason: e.to_string(),
    };
    match std::fs::metadata(home) {
        Ok(m) if m.uid() == uid => return Ok(()),
        Ok(m) if m.uid() != 0 => {
            return Err(UidError::ForeignHome {
                path: home.display().to_string(),
                owner: m.uid(),
                uid,
            })
        }
        // Ours (a previous start died half-way): finish it below.
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(home, e)),
    }
    // Inner directories first, the home's own owner last: a home owned by
    // the uid is a finished one.
    for d in [home.to_path_buf(), home.join("tmp"), home.join(".cache")] {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&d)
            .map_err(|e| err(&d, e))?;
    }
    let owner = (Some(Uid::from_raw(uid)), Some(Gid::from_raw(uid)));
    for d in [home.join("tmp"), home.join(".cache"), home.to_path_buf()] {
        chown(&d, owner.0, owner.1).map_err(|e| err(&d, e.into()))?;
    }
    Ok(())
}

/// Pool users must reach their homes through `dir` but never write it:
/// every ancestor must be searchable by others and not writable by them
/// (unless sticky, like /tmp).
fn unreachable_by_others(dir: &Path) -> Result<(), String> {
    for a in dir.ancestors() {
        let Ok(m) = std::fs::metadata(a) else {
            continue;
        };
        let mode = m.mode();
        if mode & 0o001 == 0 {
            return Err(format!(
                "{} is not searchable by other users (mode {:o}); pool users could not reach their homes",
                a.display(),
                mode & 0o7777
            ));
        }
        if a != dir && mode & 0o002 != 0 && mode & 0o1000 == 0 {
            return Err(format!(
                "{} is writable by every user; a pool user could replace the state directory",
                a.display()
            ));
        }
    }
    Ok(())
}

/// Capabilities (bits of `CapEff`) the broker needs to run pools under
/// their own uids: CAP_CHOWN (homes), CAP_KILL (signal other uids'
/// processes), CAP_SETGID and CAP_SETUID (switch in the child).
pub const NEEDED_CAPS: [(u32, &str); 4] = [
    (0, "CAP_CHOWN"),
    (5, "CAP_KILL"),
    (6, "CAP_SETGID"),
    (7, "CAP_SETUID"),
];

/// The needed capabilities the broker lacks (empty: it can isolate).
pub fn missing_caps() -> Vec<&'static str> {
    let eff = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        })
        .unwrap_or(0);
    NEEDED_CAPS
        .iter()
        .filter(|(bit, _)| eff & (1 << bit) == 0)
        .map(|(_, name)| *name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &Path) -> NodeSettings {
        NodeSettings {
            state_dir: dir.join("state"),
            uid_range: 70_000..=70_001,
            ..NodeSettings::default()
        }
    }

    /// Needs root (chown to another uid).
    #[test]
    fn assigns_stable_uids_and_private_homes() {
        if !nix::unistd::geteuid().is_root() {
            panic!("this test needs root (it chowns homes to other uids)");
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let u = Uids::open(&settings(dir.path())).unwrap();
        let a = u.assign("a").unwrap();
        let b = u.assign("b").unwrap();
        assert_eq!((a.uid, b.uid), (70_000, 70_001));
        let m = std::fs::metadata(&a.home).unwrap();
        assert_eq!((m.uid(), m.mode() & 0o777), (70_000, 0o700));
        // A second broker on the same state dir agrees, and the range is full.
        let again = Uids::open(&settings(dir.path())).unwrap();
        assert_eq!(again.assign("b").unwrap(), b);
        assert!(matches!(again.assign("c"), Err(UidError::Exhausted { .. })));
    }

    #[test]
    fn a_state_dir_others_cannot_reach_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let e = Uids::open(&settings(dir.path())).err().unwrap().to_string();
        assert!(e.contains("not searchable"), "{e}");
    }
}
