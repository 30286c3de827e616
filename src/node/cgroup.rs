//! A cgroup per pool: `memory`, `pids` and `cpu` limits for the whole pool,
//! so a leaking server is killed by its own pool's limit instead of taking
//! the broker (and every other pool) down with it.
//!
//! Works on the unified hierarchy (cgroup v2, what current distributions
//! and Kubernetes nodes run) and on the legacy per-controller hierarchies
//! (v1, still found on older hosts and in some sandboxes). The broker needs
//! its own cgroup delegated (systemd `Delegate=yes`; a writable cgroupfs in
//! a container); [`Cgroups::detect`] tries and says why not.
//!
//! Invariants:
//! * v2's "no internal processes" rule: the broker moves itself into a
//!   `broker` leaf before enabling controllers for its subtree, once per
//!   process (several brokers in one process, as in tests, share it).
//! * A child joins its pool's cgroup between fork and exec (it writes `0`
//!   into descriptors opened before the fork), before it drops privileges,
//!   so nothing the server runs escapes the limit.
//! * A pool's cgroup is removed when the pool closes, after every process
//!   in it is killed (v2 `cgroup.kill`; v1 each listed pid).

use crate::config::PoolLimits;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

const ROOT: &str = "/sys/fs/cgroup";

/// Which hierarchy the pools' cgroups live in.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Layout {
    /// cgroup v2: one directory per cgroup, under the broker's own.
    V2(PathBuf),
    /// cgroup v1: a parent per controller (memory, pids, cpu).
    V1(Vec<(Controller, PathBuf)>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Controller {
    Memory,
    Pids,
    Cpu,
}

/// The broker's cgroup parent for pools, when it has one.
#[derive(Debug)]
pub struct Cgroups {
    layout: Layout,
    /// Unique per broker in this process: `b<pid>-<n>`.
    prefix: String,
    /// Pool cgroups made so far: a reloaded pool's replacement gets a cgroup
    /// of its own, so removing the old one cannot touch the new processes.
    made: AtomicU64,
}

/// One pool's cgroup.
#[derive(Debug)]
pub struct PoolCgroup {
    layout: Layout,
    dirs: Vec<PathBuf>,
    limits: PoolLimits,
    /// OOM kills already attributed to a process.
    oom_seen: AtomicU64,
}

static SETUP: OnceLock<Result<Layout, String>> = OnceLock::new();
static SEQ: AtomicU64 = AtomicU64::new(0);

impl Cgroups {
    /// Finds (once per process) where pool cgroups can be made, or why not.
    pub fn detect() -> Result<Cgroups, String> {
        let layout = SETUP.get_or_init(|| setup(Path::new(ROOT))).clone()?;
        let prefix = format!(
            "b{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        Ok(Cgroups {
            layout,
            prefix,
            made: AtomicU64::new(0),
        })
    }

    /// Which hierarchy is used, for the start-up log.
    pub fn describe(&self) -> String {
        match &self.layout {
            Layout::V2(p) => format!("cgroup v2 under {}", p.display()),
            Layout::V1(c) => format!(
                "cgroup v1 ({})",
                c.iter()
                    .map(|(k, p)| format!("{k:?}: {}", p.display()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// Creates pool `name`'s cgroup with `limits`.
    pub fn create(&self, name: &str, limits: &PoolLimits) -> Result<PoolCgroup, String> {
        let n = self.made.fetch_add(1, Ordering::Relaxed);
        let leaf = format!("{}-{n}-{}", self.prefix, sanitize(name));
        let dirs: Vec<PathBuf> = match &self.layout {
            Layout::V2(parent) => vec![parent.join(leaf)],
            Layout::V1(c) => c.iter().map(|(_, p)| p.join(&leaf)).collect(),
        };
        for d in &dirs {
            match std::fs::create_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(format!("cannot create {}: {e}", d.display())),
            }
        }
        let cg = PoolCgroup {
            layout: self.layout.clone(),
            dirs,
            limits: limits.clone(),
            oom_seen: AtomicU64::new(0),
        };
        cg.apply()?;
        cg.oom_seen.store(cg.oom_kills(), Ordering::Relaxed);
        Ok(cg)
    }
}

impl PoolCgroup {
    fn file(&self, c: Controller, name: &str) -> Option<PathBuf> {
        match &self.layout {
            Layout::V2(_) => Some(self.dirs[0].join(name)),
            Layout::V1(cs) => cs
                .iter()
                .position(|(k, _)| *k == c)
                .map(|i| self.dirs[i].join(name)),
        }
    }

    fn apply(&self) -> Result<(), String> {
        let v2 = matches!(self.layout, Layout::V2(_));
        let l = &self.limits;
        let mut writes: Vec<(Controller, &str, String)> = Vec::new();
        if let Some(m) = l.memory {
            if v2 {
                writes.push((Controller::Memory, "memory.max", m.to_string()));
                // Without this, the limit would push the pool into swap first.
                writes.push((Controller::Memory, "memory.swap.max", "0".into()));
            } else {
                writes.push((Controller::Memory, "memory.limit_in_bytes", m.to_string()));
            }
        }
        if let Some(p) = l.pids {
            writes.push((Controller::Pids, "pids.max", p.to_string()));
        }
        if let Some(w) = l.cpu_weight {
            if v2 {
                writes.push((Controller::Cpu, "cpu.weight", w.to_string()));
            } else {
                // v1 shares: 1024 is the default, as weight 100 is in v2.
                let shares = (u64::from(w) * 1024 / 100).max(2);
                writes.push((Controller::Cpu, "cpu.shares", shares.to_string()));
            }
        }
        for (c, name, value) in writes {
            let Some(path) = self.file(c, name) else {
                return Err(format!(
                    "limits: the {c:?} controller is not available to the broker"
                ));
            };
            match std::fs::write(&path, &value) {
                Ok(()) => {}
                // No swap accounting on this kernel: nothing to limit.
                Err(_) if name == "memory.swap.max" && !path.exists() => {}
                Err(e) => return Err(format!("cannot write {value} to {}: {e}", path.display())),
            }
        }
        Ok(())
    }

    /// Opens the `cgroup.procs` files a new child writes itself into
    /// (before the fork; the child only writes).
    pub fn procs_files(&self) -> Result<Vec<OwnedFd>, String> {
        self.dirs
            .iter()
            .map(|d| {
                let p = d.join("cgroup.procs");
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .map(OwnedFd::from)
                    .map_err(|e| format!("cannot open {}: {e}", p.display()))
            })
            .collect()
    }

    /// OOM kills inside the pool's cgroup so far.
    fn oom_kills(&self) -> u64 {
        let (file, key) = match self.layout {
            Layout::V2(_) => ("memory.events", "oom_kill"),
            Layout::V1(_) => ("memory.oom_control", "oom_kill"),
        };
        self.file(Controller::Memory, file)
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|t| {
                t.lines().find_map(|l| {
                    let (k, v) = l.split_once(' ')?;
                    (k == key).then(|| v.trim().parse().ok()).flatten()
                })
            })
            .unwrap_or(0)
    }

    /// If the pool's memory limit killed a process since the last call, the
    /// reason to give (a process that died of SIGKILL asks).
    pub fn oom_reason(&self) -> Option<String> {
        let now = self.oom_kills();
        let before = self.oom_seen.swap(now, Ordering::Relaxed);
        (now > before).then(|| {
            format!(
                "was killed by the pool's memory limit (limits.memory = {} MiB)",
                self.limits.memory.unwrap_or(0) >> 20
            )
        })
    }

    /// Kills whatever is still inside and removes the cgroup (bounded).
    pub async fn remove(&self) {
        for attempt in 0..50 {
            match &self.layout {
                Layout::V2(_) => {
                    let _ = std::fs::write(self.dirs[0].join("cgroup.kill"), "1");
                }
                Layout::V1(_) => {
                    for d in &self.dirs {
                        for pid in read_pids(d) {
                            let _ = nix::sys::signal::kill(
                                nix::unistd::Pid::from_raw(pid),
                                nix::sys::signal::Signal::SIGKILL,
                            );
                        }
                    }
                }
            }
            let mut left = false;
            for d in &self.dirs {
                if d.exists() && std::fs::remove_dir(d).is_err() {
                    left = true;
                }
            }
            if !left {
                return;
            }
            if attempt == 49 {
                tracing::warn!(cgroup = %self.dirs[0].display(), "pool cgroup still busy; left in place");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn read_pids(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect()
}

/// Finds the broker's own cgroup(s) under `root` and makes them able to
/// hold pool cgroups.
fn setup(root: &Path) -> Result<Layout, String> {
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    if root.join("cgroup.controllers").exists() {
        let path = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or("no cgroup v2 entry in /proc/self/cgroup")?;
        return setup_v2(&root.join(path.trim_start_matches('/')));
    }
    let mut found = Vec::new();
    for (c, name) in [
        (Controller::Memory, "memory"),
        (Controller::Pids, "pids"),
        (Controller::Cpu, "cpu"),
    ] {
        let Some(path) = own.lines().find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
            ctrls.split(',').any(|x| x == name).then_some(path)
        }) else {
            continue;
        };
        let mount = [name, "cpu,cpuacct", "cpuacct,cpu"]
            .iter()
            .map(|m| root.join(m))
            .find(|m| m.is_dir() && (c == Controller::Cpu || m.ends_with(name)))
            .unwrap_or_else(|| root.join(name));
        let dir = mount.join(path.trim_start_matches('/'));
        if probe_writable(&dir) {
            found.push((c, dir));
        }
    }
    if !found.iter().any(|(c, _)| *c == Controller::Memory) {
        return Err(format!(
            "no writable cgroup found under {} (not delegated to the broker)",
            root.display()
        ));
    }
    Ok(Layout::V1(found))
}

fn setup_v2(own: &Path) -> Result<Layout, String> {
    // Re-executed in place (an upgrade keeps the pid): this process sits in
    // the `broker` leaf it moved itself into, and its parent is set up.
    if let Some(parent) = own.parent().filter(|_| own.ends_with("broker")) {
        let enabled =
            std::fs::read_to_string(parent.join("cgroup.subtree_control")).unwrap_or_default();
        if enabled.split_whitespace().any(|c| c == "memory") {
            return Ok(Layout::V2(parent.to_path_buf()));
        }
    }
    let controllers = std::fs::read_to_string(own.join("cgroup.controllers"))
        .map_err(|e| format!("cannot read {}: {e}", own.display()))?;
    for needed in ["memory", "pids"] {
        if !controllers.split_whitespace().any(|c| c == needed) {
            return Err(format!(
                "the {needed} controller is not delegated to {}",
                own.display()
            ));
        }
    }
    if !probe_writable(own) {
        return Err(format!("{} is not writable (not delegated)", own.display()));
    }
    // Leave the broker's own cgroup empty so it may delegate controllers.
    let leaf = own.join("broker");
    let _ = std::fs::create_dir(&leaf);
    std::fs::write(leaf.join("cgroup.procs"), std::process::id().to_string())
        .map_err(|e| format!("cannot move the broker into {}: {e}", leaf.display()))?;
    let wanted: Vec<&str> = ["memory", "pids", "cpu"]
        .into_iter()
        .filter(|c| controllers.split_whitespace().any(|x| x == *c))
        .collect();
    let line = wanted
        .iter()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ");
    std::fs::write(own.join("cgroup.subtree_control"), &line).map_err(|e| {
        format!(
            "cannot enable {line} in {}: {e} (other processes share the broker's cgroup?)",
            own.display()
        )
    })?;
    Ok(Layout::V2(own.to_path_buf()))
}

/// True if a cgroup can be created (and removed) under `dir`.
fn probe_writable(dir: &Path) -> bool {
    let probe = dir.join(format!("mcpb-probe-{}", std::process::id()));
    let ok = std::fs::create_dir(&probe).is_ok();
    let _ = std::fs::remove_dir(&probe);
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_safe_path_segments() {
        assert_eq!(sanitize("github@team-a/x"), "github_team-a_x");
        assert_eq!(sanitize(&"a".repeat(100)).len(), 64);
    }
}
