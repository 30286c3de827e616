//! Resource readings from `/proc`: CPU time and resident memory of this
//! process's server threads, of child processes, and of process trees.
//!
//! Everything here is best effort: a process that exits between listing and
//! reading simply contributes nothing, and a missing `/proc` yields zeros.

use std::collections::HashMap;

/// Clock ticks per second for `/proc/*/stat` times.
fn ticks_per_sec() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    }
}

/// The fields of a `stat` line after the `(comm)` part, plus the comm.
fn stat_fields(text: &str) -> Option<(String, Vec<&str>)> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    let rest = text.get(close + 1..)?;
    Some((comm, rest.split_whitespace().collect()))
}

/// Field `i` of a `stat` line (after the comm), a time in clock ticks, in
/// seconds.
fn secs(fields: &[&str], i: usize) -> f64 {
    fields
        .get(i)
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        / ticks_per_sec()
}

/// CPU seconds (user + system) from a `stat` line; with `children`, the
/// reaped children's times instead.
fn cpu_of(fields: &[&str], children: bool) -> f64 {
    // After the comm: state is index 0, utime 11, stime 12, cutime 13, cstime 14.
    let (a, b) = if children { (13, 14) } else { (11, 12) };
    secs(fields, a) + secs(fields, b)
}

/// User CPU seconds from a `stat` line.
fn user_of(fields: &[&str]) -> f64 {
    secs(fields, 11)
}

/// CPU seconds (all, user) used by threads of this process whose name
/// starts with `prefix`. User time alone is steadier across runs than the
/// total on a VM, whose cost of waking a thread varies by the minute.
pub fn thread_cpu_user(prefix: &str) -> (f64, f64) {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return (0.0, 0.0);
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|t| {
            let (comm, f) = stat_fields(&t)?;
            comm.starts_with(prefix)
                .then(|| (cpu_of(&f, false), user_of(&f)))
        })
        .fold((0.0, 0.0), |(a, u), (a1, u1)| (a + a1, u + u1))
}

/// CPU seconds (all, user) of process `pid`.
pub fn proc_cpu_user(pid: u32) -> (f64, f64) {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|t| stat_fields(&t).map(|(_, f)| (cpu_of(&f, false), user_of(&f))))
        .unwrap_or((0.0, 0.0))
}

/// CPU seconds of this process's reaped children.
pub fn reaped_children_cpu() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|t| stat_fields(&t).map(|(_, f)| cpu_of(&f, true)))
        .unwrap_or(0.0)
}

/// CPU seconds of process `pid`.
pub fn proc_cpu(pid: u32) -> f64 {
    proc_cpu_user(pid).0
}

/// A numeric field of `/proc/PID/status` (`key` with its colon, e.g.
/// `"VmHWM:"`), in bytes for `kB` fields, as is otherwise; 0 if gone.
pub fn status_bytes(pid: &str, key: &str) -> u64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0;
    };
    let Some(v) = s.lines().find_map(|l| l.strip_prefix(key)) else {
        return 0;
    };
    let v = v.trim();
    match v.strip_suffix("kB") {
        Some(kb) => kb.trim().parse::<u64>().map(|k| k * 1024).unwrap_or(0),
        None => v.parse().unwrap_or(0),
    }
}

/// Resident memory of `pid` in bytes (`VmRSS`), 0 if gone.
pub fn rss(pid: &str) -> u64 {
    status_bytes(pid, "VmRSS:")
}

/// Every live process that descends from `root` (excluding `root`).
pub fn descendants(root: u32) -> Vec<u32> {
    use crate::process::stat;
    let parent: HashMap<u32, u32> = stat::pids()
        .filter_map(|pid| Some((pid, stat::read(pid).filter(stat::Stat::live)?.ppid)))
        .collect();
    let mut out = Vec::new();
    for &pid in parent.keys() {
        let mut p = pid;
        for _ in 0..64 {
            match parent.get(&p) {
                Some(&pp) if pp == root => {
                    out.push(pid);
                    break;
                }
                Some(&pp) if pp > 1 => p = pp,
                _ => break,
            }
        }
    }
    out
}

/// CPU seconds per pid, for computing deltas across a step.
pub fn cpu_map(pids: &[u32]) -> HashMap<u32, f64> {
    pids.iter().map(|&p| (p, proc_cpu(p))).collect()
}

/// CPU seconds spent between `before` and now by `pids` (new pids count
/// from zero).
pub fn cpu_delta(before: &HashMap<u32, f64>, pids: &[u32]) -> f64 {
    pids.iter()
        .map(|&p| (proc_cpu(p) - before.get(&p).copied().unwrap_or(0.0)).max(0.0))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_spaces_in_comm() {
        let line = "12 (a b) S 1 12 12 0 -1 0 0 0 0 0 250 150 7 3 20 0";
        let (comm, f) = stat_fields(line).unwrap();
        assert_eq!(comm, "a b");
        assert_eq!(f[0], "S");
        assert!((cpu_of(&f, false) * ticks_per_sec() - 400.0).abs() < 1e-9);
        assert!((cpu_of(&f, true) * ticks_per_sec() - 10.0).abs() < 1e-9);
        assert!((user_of(&f) * ticks_per_sec() - 250.0).abs() < 1e-9);
    }

    #[test]
    fn reads_self() {
        assert!(rss("self") > 0);
        assert!(status_bytes("self", "VmHWM:") > 0);
        assert!(status_bytes("self", "Threads:") >= 1);
        assert!(descendants(u32::MAX).is_empty());
    }
}
