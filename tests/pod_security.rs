//! The example workload (daemonset/example/) passes the Pod Security
//! Standards' "restricted" profile, checked rule by rule against the
//! published standard (kubernetes.io/docs/concepts/security/pod-security-standards,
//! "latest"): no installable validator implements it, so the rules are
//! written out here, each with the field it reads. The broker's DaemonSet,
//! which needs hostPath and uid 0, must fail it, and so must the example
//! with any one restricted thing added: the check can fail.

use serde_json::{json, Value};

/// Capabilities "baseline" lets a container add.
const BASELINE_CAPS: [&str; 13] = [
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];
/// Volume types "restricted" allows.
const RESTRICTED_VOLUMES: [&str; 8] = [
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
];
/// Sysctls "baseline" allows.
const SAFE_SYSCTLS: [&str; 9] = [
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
];
const SELINUX_TYPES: [&str; 5] = [
    "",
    "container_t",
    "container_init_t",
    "container_kvm_t",
    "container_engine_t",
];

fn load(path: &str) -> Value {
    let text = std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn is_true(v: &Value) -> bool {
    v.as_bool() == Some(true)
}

/// Every violation of "restricted" (baseline included) in pod spec `pod`.
fn restricted_violations(pod: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let mut bad = |rule: &str, what: String| out.push(format!("{rule}: {what}"));
    let psc = &pod["securityContext"];
    let containers: Vec<&Value> = ["containers", "initContainers", "ephemeralContainers"]
        .iter()
        .flat_map(|k| pod[k].as_array().into_iter().flatten())
        .collect();
    let name = |c: &Value| c["name"].as_str().unwrap_or("?").to_string();

    // Baseline.
    for (field, rule) in [
        ("hostNetwork", "Host Namespaces"),
        ("hostPID", "Host Namespaces"),
        ("hostIPC", "Host Namespaces"),
    ] {
        if is_true(&pod[field]) {
            bad(rule, field.into());
        }
    }
    if is_true(&psc["windowsOptions"]["hostProcess"]) {
        bad("HostProcess", "pod".into());
    }
    for v in pod["volumes"].as_array().into_iter().flatten() {
        let kind = v
            .as_object()
            .and_then(|o| o.keys().find(|k| *k != "name").cloned())
            .unwrap_or_default();
        if kind == "hostPath" {
            bad("HostPath Volumes", format!("volume {}", v["name"]));
        }
        if !RESTRICTED_VOLUMES.contains(&kind.as_str()) {
            bad("Volume Types", format!("volume {} is {kind}", v["name"]));
        }
    }
    for s in psc["sysctls"].as_array().into_iter().flatten() {
        if !SAFE_SYSCTLS.contains(&s["name"].as_str().unwrap_or("")) {
            bad("Sysctls", s["name"].to_string());
        }
    }
    let selinux = |sc: &Value, who: &str, bad: &mut dyn FnMut(&str, String)| {
        let o = &sc["seLinuxOptions"];
        if !SELINUX_TYPES.contains(&o["type"].as_str().unwrap_or(""))
            || !o["user"].is_null()
            || !o["role"].is_null()
        {
            bad("SELinux", who.into());
        }
        let t = sc["appArmorProfile"]["type"]
            .as_str()
            .unwrap_or("RuntimeDefault");
        if t != "RuntimeDefault" && t != "Localhost" {
            bad("AppArmor", who.into());
        }
        if sc["seccompProfile"]["type"] == "Unconfined" {
            bad("Seccomp", format!("{who} Unconfined"));
        }
        if sc["runAsUser"] == 0 {
            bad("Running as Non-root user", format!("{who} runAsUser 0"));
        }
    };
    selinux(psc, "pod", &mut bad);
    let pod_non_root = is_true(&psc["runAsNonRoot"]);
    let pod_seccomp = matches!(
        psc["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault" | "Localhost")
    );
    for c in &containers {
        let sc = &c["securityContext"];
        let who = format!("container {}", name(c));
        selinux(sc, &who, &mut bad);
        if is_true(&sc["privileged"]) {
            bad("Privileged Containers", who.clone());
        }
        if is_true(&sc["windowsOptions"]["hostProcess"]) {
            bad("HostProcess", who.clone());
        }
        if sc["procMount"].as_str().is_some_and(|m| m != "Default") {
            bad("/proc Mount Type", who.clone());
        }
        for p in c["ports"].as_array().into_iter().flatten() {
            if p["hostPort"].as_u64().is_some_and(|n| n != 0) {
                bad("Host Ports", who.clone());
            }
        }
        let add: Vec<&str> = sc["capabilities"]["add"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if add.iter().any(|a| !BASELINE_CAPS.contains(a)) {
            bad("Capabilities", format!("{who} adds {add:?}"));
        }
        // Restricted.
        if add.iter().any(|a| *a != "NET_BIND_SERVICE") {
            bad("Capabilities (restricted)", format!("{who} adds {add:?}"));
        }
        let drops_all = sc["capabilities"]["drop"]
            .as_array()
            .is_some_and(|d| d.iter().any(|x| x == "ALL"));
        if !drops_all {
            bad(
                "Capabilities (restricted)",
                format!("{who} does not drop ALL"),
            );
        }
        if sc["allowPrivilegeEscalation"] != json!(false) {
            bad("Privilege Escalation", who.clone());
        }
        let non_root = match sc["runAsNonRoot"].as_bool() {
            Some(v) => v,
            None => pod_non_root,
        };
        if !non_root {
            bad("Running as Non-root", who.clone());
        }
        let seccomp = match sc["seccompProfile"]["type"].as_str() {
            Some(t) => t == "RuntimeDefault" || t == "Localhost",
            None => pod_seccomp,
        };
        if !seccomp {
            bad("Seccomp (restricted)", who.clone());
        }
    }
    out
}

/// A rule and a change to the example's pod spec that breaks it.
type Mutation = (&'static str, fn(&mut Value));

fn example() -> Value {
    load("daemonset/example/deployment.yaml")
}

#[test]
fn the_example_workload_passes_restricted_in_a_restricted_namespace() {
    let ns = load("daemonset/example/namespace.yaml");
    assert_eq!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "restricted",
        "the example namespace enforces restricted"
    );
    let d = example();
    assert_eq!(d["metadata"]["namespace"], ns["metadata"]["name"]);
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(restricted_violations(pod), Vec::<String>::new());
    let csi = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["csi"].is_object())
        .expect("the broker is reached through a csi volume");
    assert_eq!(csi["csi"]["driver"], "csi.mcp-broker.dev");
}

#[test]
fn the_check_fails_what_restricted_forbids() {
    let broker = load("daemonset/daemonset.yaml");
    let v = restricted_violations(&broker["spec"]["template"]["spec"]);
    for rule in [
        "HostPath Volumes",
        "Running as Non-root user",
        "Capabilities (restricted)",
    ] {
        assert!(v.iter().any(|s| s.starts_with(rule)), "{rule}: {v:?}");
    }
    let mutations: [Mutation; 6] = [
        ("HostPath Volumes", |p| {
            p["volumes"]
                .as_array_mut()
                .unwrap()
                .push(json!({"name": "h", "hostPath": {"path": "/run/mcp-broker"}}))
        }),
        ("Privilege Escalation", |p| {
            p["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = json!(true)
        }),
        ("Running as Non-root", |p| {
            p["initContainers"][0]["securityContext"]["runAsNonRoot"] = json!(false)
        }),
        ("Host Namespaces", |p| p["hostPID"] = json!(true)),
        ("Seccomp", |p| {
            p["containers"][0]["securityContext"]["seccompProfile"] = json!({"type": "Unconfined"})
        }),
        ("Capabilities (restricted)", |p| {
            p["containers"][0]["securityContext"]["capabilities"] = json!({"add": ["CHOWN"]})
        }),
    ];
    for (rule, mutate) in mutations {
        let mut d = example();
        mutate(&mut d["spec"]["template"]["spec"]);
        let v = restricted_violations(&d["spec"]["template"]["spec"]);
        assert!(v.iter().any(|s| s.starts_with(rule)), "{rule}: {v:?}");
    }
}
