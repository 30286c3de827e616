use super::*;

const UID: &str = "6f1c2b7e-0d3a-4c55-9a8e-1b2c3d4e5f60";
const UID_: &str = "6f1c2b7e_0d3a_4c55_9a8e_1b2c3d4e5f60";
const CTR: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn uid(text: &str) -> Option<String> {
    pod_uid_from_cgroup(text)
}

#[test]
fn systemd_driver_cgroup_v2_containerd_and_crio() {
    for qos in ["besteffort", "burstable"] {
        let containerd = format!(
            "0::/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{UID_}.slice/cri-containerd-{CTR}.scope\n"
        );
        assert_eq!(uid(&containerd).as_deref(), Some(UID), "{containerd}");
        let crio = format!(
            "0::/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{UID_}.slice/crio-{CTR}.scope\n"
        );
        assert_eq!(uid(&crio).as_deref(), Some(UID), "{crio}");
        let conmon = format!(
            "0::/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{UID_}.slice/crio-conmon-{CTR}.scope\n"
        );
        assert_eq!(uid(&conmon).as_deref(), Some(UID), "{conmon}");
    }
    // Guaranteed pods sit directly under kubepods.slice.
    let guaranteed =
        format!("0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CTR}.scope\n");
    assert_eq!(uid(&guaranteed).as_deref(), Some(UID));
    // kind: the kubelet's cgroup root is kubelet.slice.
    let kind = format!(
        "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/\
         kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CTR}.scope\n"
    );
    assert_eq!(uid(&kind).as_deref(), Some(UID));
}

#[test]
fn systemd_driver_cgroup_v1_every_controller_agrees() {
    let p = format!(
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/docker-{CTR}.scope"
    );
    let text = format!("12:pids:{p}\n11:memory:{p}\n4:cpu,cpuacct:{p}\n1:name=systemd:{p}\n0::/\n");
    assert_eq!(uid(&text).as_deref(), Some(UID));
    // Controllers naming two different pods: no answer.
    let other = p.replace("1b2c3d4e5f60", "1b2c3d4e5f61");
    assert_eq!(uid(&format!("12:pids:{p}\n11:memory:{other}\n")), None);
}

#[test]
fn cgroupfs_driver_v1_and_v2() {
    for qos in ["besteffort/", "burstable/", ""] {
        let v1 = format!("11:memory:/kubepods/{qos}pod{UID}/{CTR}\n4:cpu,cpuacct:/kubepods/{qos}pod{UID}/{CTR}\n");
        assert_eq!(uid(&v1).as_deref(), Some(UID), "{v1}");
        let v2 = format!("0::/kubepods/{qos}pod{UID}/{CTR}\n");
        assert_eq!(uid(&v2).as_deref(), Some(UID), "{v2}");
        let kind = format!("0::/kubelet/kubepods/{qos}pod{UID}/{CTR}\n");
        assert_eq!(uid(&kind).as_deref(), Some(UID), "{kind}");
    }
}

#[test]
fn paths_seen_from_a_cgroup_namespace() {
    // The broker's own container is the namespace root: other pods show
    // relative to it.
    let sibling =
        format!("0::/../../kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CTR}.scope\n");
    assert_eq!(uid(&sibling).as_deref(), Some(UID));
    let other_qos = format!(
        "0::/../../../kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CTR}.scope\n"
    );
    assert_eq!(uid(&other_qos).as_deref(), Some(UID));
    let cgroupfs = format!("0::/../../besteffort/pod{UID}/{CTR}\n");
    assert_eq!(uid(&cgroupfs).as_deref(), Some(UID));
    // What follows the `..` must still be the kubelet's chain.
    let stray = format!("0::/../../user.slice/kubepods-besteffort-pod{UID_}.slice\n");
    assert_eq!(uid(&stray), None);
}

#[test]
fn uid_lookalikes_outside_the_kubelet_hierarchy_are_refused() {
    for text in [
        "0::/user.slice/user-1000.slice/session-2.scope\n".to_string(),
        "0::/system.slice/podman.service\n".to_string(),
        "0::/\n".to_string(),
        "".to_string(),
        // A user's own delegated cgroup named like a pod.
        format!("0::/user.slice/user-1000.slice/user@1000.service/app.slice/pod{UID}\n"),
        format!("0::/user.slice/user-1000.slice/user@1000.service/kubepods/pod{UID}/x\n"),
        format!("0::/system.slice/kubepods-besteffort-pod{UID_}.slice/x.scope\n"),
        // A systemd slice out of its chain.
        format!("0::/kubepods.slice/kubepods-besteffort-pod{UID_}.slice/x.scope\n"),
        // Another container runtime's root in front of the hierarchy.
        format!("0::/docker/{CTR}/kubepods/besteffort/pod{UID}/{CTR}\n"),
        // Not a QoS class.
        format!("0::/kubepods/tenant/pod{UID}/{CTR}\n"),
        // Malformed UIDs.
        format!("0::/kubepods/besteffort/pod{}/{CTR}\n", UID.to_uppercase()),
        format!("0::/kubepods/besteffort/pod{}/{CTR}\n", &UID[1..]),
        format!("0::/kubepods/besteffort/pod{UID_}/{CTR}\n"),
        format!("0::/kubepods.slice/kubepods-pod{UID}.slice/x.scope\n"),
    ] {
        assert_eq!(uid(&text), None, "{text}");
    }
}

#[test]
fn a_pod_that_nests_cgroups_stays_itself() {
    // Cgroups a privileged pod creates inside its own (named like another
    // pod) do not change whose it is.
    let nested = format!(
        "0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CTR}.scope/kubepods-pod00000000_0000_0000_0000_000000000000.slice\n"
    );
    assert_eq!(uid(&nested).as_deref(), Some(UID));
}

#[test]
fn live_processes_only() {
    let me = live_cgroup(std::process::id() as i32).expect("this process is alive");
    assert!(me.contains("::") || me.contains(':'), "{me}");
    assert_eq!(live_cgroup(0), None);
    assert_eq!(live_cgroup(-1), None);
    // A child that exited (reaped): its pid no longer names it.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id() as i32;
    child.wait().unwrap();
    assert_eq!(live_cgroup(pid), None);
}
