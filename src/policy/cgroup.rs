//! The pod a socket peer runs in, from its cgroup, read once per connection.
//!
//! Why a pidfd: a pid names whatever process holds it *now*. The broker
//! reads the peer's `/proc/<pid>/cgroup` once, at accept, through a pidfd
//! opened first: if the process exits before the read is done (so its pid
//! could be someone else's by then), the pidfd says so and the peer gets no
//! pod. Later requests on the connection keep that answer, so a connection
//! whose peer exited never takes on the identity of a process that reuses
//! the pid.
//!
//! Why strict paths: only the kubelet creates cgroups under its pod
//! hierarchy, so a pod UID is believed only where the kubelet puts it: the
//! cgroupfs driver's `[kubelet/]kubepods[/besteffort|/burstable]/pod<uid>`
//! and the systemd driver's slice chain `kubepods.slice/
//! kubepods-<qos>.slice/kubepods-<qos>-pod<uid_with_underscores>.slice`
//! (with kind's `kubelet-` prefix too), cgroup v1 or v2. A path seen from a
//! cgroup namespace (`/../../…`) is accepted when what follows the `..` is
//! the tail of such a chain. Any other segment that merely looks like a UID
//! (a user's own delegated cgroup, a podman unit) gives no pod.

use std::os::fd::AsFd;

/// QoS classes the kubelet nests pods under (guaranteed pods sit directly
/// under `kubepods`).
const QOS: [&str; 2] = ["besteffort", "burstable"];

/// The cgroup text of live process `pid`, read through a pidfd: `None` if
/// the process is gone (or exits while it is read), or `pid` is not one.
pub fn live_cgroup(pid: i32) -> Option<String> {
    if pid <= 0 {
        return None;
    }
    let pid = rustix::process::Pid::from_raw(pid)?;
    let fd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()?;
    let text = std::fs::read_to_string(format!("/proc/{}/cgroup", pid.as_raw_pid())).ok()?;
    // A pidfd polls readable once its process has exited: then the text
    // may belong to a process that took over the pid.
    let mut fds = [nix::poll::PollFd::new(
        fd.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    match nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO) {
        Ok(0) => Some(text),
        _ => None,
    }
}

/// The pod UID in a `/proc/<pid>/cgroup` text, if every line that names a
/// pod names the same one under the kubelet's pod hierarchy.
pub fn pod_uid_from_cgroup(text: &str) -> Option<String> {
    let mut found: Option<String> = None;
    for line in text.lines() {
        let Some(path) = line.splitn(3, ':').nth(2) else {
            continue;
        };
        if let Some(uid) = pod_uid_from_path(path) {
            if found.as_ref().is_some_and(|f| *f != uid) {
                return None;
            }
            found = Some(uid);
        }
    }
    found
}

fn pod_uid_from_path(path: &str) -> Option<String> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let up = segs.iter().take_while(|s| **s == "..").count();
    let segs = &segs[up..];
    systemd_driver(segs, up > 0).or_else(|| cgroupfs_driver(segs, up > 0))
}

/// `…/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/…`: the
/// first pod slice, whose ancestors must be exactly its slice chain (or,
/// seen from a cgroup namespace, the chain's tail).
fn systemd_driver(segs: &[&str], truncated: bool) -> Option<String> {
    let (i, prefix, uid) = segs.iter().enumerate().find_map(|(i, s)| {
        let stem = s.strip_suffix(".slice")?;
        let (prefix, uid) = stem.rsplit_once("-pod")?;
        Some((i, prefix, uid))
    })?;
    let parts: Vec<&str> = prefix.split('-').collect();
    let kubelet_root = match parts.as_slice() {
        ["kubepods"] | ["kubepods", _] => false,
        ["kubelet", "kubepods"] | ["kubelet", "kubepods", _] => true,
        _ => return None,
    };
    if parts.len() == 2 + usize::from(kubelet_root) && !QOS.contains(parts.last()?) {
        return None;
    }
    // systemd nests `a-b-c.slice` in `a-b.slice` in `a.slice`.
    let chain: Vec<String> = (1..=parts.len())
        .map(|n| format!("{}.slice", parts[..n].join("-")))
        .collect();
    let ancestors = &segs[..i];
    let fits = if truncated {
        chain.ends_with(&ancestors.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    } else {
        chain == ancestors
    };
    (fits && valid_uid(uid, '_')).then(|| uid.replace('_', "-"))
}

/// `[kubelet/]kubepods[/besteffort|/burstable]/pod<uid>/…`.
fn cgroupfs_driver(segs: &[&str], truncated: bool) -> Option<String> {
    let i = segs.iter().position(|s| s.starts_with("pod"))?;
    let uid = &segs[i][3..];
    let fits = match &segs[..i] {
        ["kubepods"] | ["kubelet", "kubepods"] => true,
        ["kubepods", q] | ["kubelet", "kubepods", q] => QOS.contains(q),
        [] => truncated,
        [q] => truncated && QOS.contains(q),
        _ => false,
    };
    (fits && valid_uid(uid, '-')).then(|| uid.to_string())
}

/// A Kubernetes UID (8-4-4-4-12 lowercase hex) with `sep` between groups.
fn valid_uid(uid: &str, sep: char) -> bool {
    let groups: Vec<&str> = uid.split(sep).collect();
    groups.len() == 5
        && groups.iter().zip([8, 4, 4, 4, 12]).all(|(g, n)| {
            g.len() == n
                && g.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

#[cfg(test)]
mod tests;
