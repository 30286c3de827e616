//! Config parsing and validation: every error names the pool and the field.

use super::*;

fn err(text: &str) -> String {
    Config::from_toml(text).unwrap_err().to_string()
}

#[test]
fn full_example_parses_with_defaults() {
    let c = Config::from_toml(
        r#"
        [broker]
        socket = "/tmp/x.sock"
        socket_mode = "0600"
        drain_timeout = "5s"
        [[pool]]
        name = "everything"
        command = "npx"
        args = ["-y", "@modelcontextprotocol/server-everything"]
        env = { LOG_LEVEL = "warn" }
        mode = "sticky"
        min_idle = 2
        max = 8
        queue_timeout = "1m30s"
        [[pool]]
        name = "time"
        command = "mcp-server-time"
        "#,
    )
    .unwrap();
    assert_eq!(c.broker.socket_mode, 0o600);
    assert_eq!(c.broker.drain_timeout, Duration::from_secs(5));
    assert_eq!(c.pools.len(), 2);
    let p = &c.pools[0];
    assert_eq!(p.mode, Mode::Sticky);
    assert_eq!((p.min_idle, p.max), (2, 8));
    assert_eq!(p.queue_timeout, Duration::from_secs(90));
    assert_eq!(p.env["LOG_LEVEL"], "warn");
    let t = &c.pools[1];
    assert_eq!(t.mode, Mode::Shared);
    assert_eq!(t.request_timeout, DEFAULT_REQUEST_TIMEOUT);
    assert_eq!(t.max_inflight, 1);
}

#[test]
fn unknown_field_is_named() {
    let e = err("[[pool]]\nname = \"a\"\ncommand = \"x\"\nmin_idel = 1\n");
    assert!(e.contains("min_idel"), "{e}");
}

#[test]
fn bad_values_name_the_line_and_field() {
    let e = err("[[pool]]\nname = \"a\"\ncommand = \"x\"\nqueue_timeout = \"soon\"\n");
    assert!(
        e.contains("line 4") && e.contains("queue_timeout = \"soon\"") && e.contains("duration"),
        "{e}"
    );
    let e = err("[[pool]]\nname = \"a\"\ncommand = \"x\"\nmode = \"pooled\"\n");
    assert!(
        e.contains("line 4") && e.contains("`shared`, `sticky`, `exclusive`"),
        "{e}"
    );
    let e = err("[[pool]]\nname = \"a\"\ncommand = \"x\"\nisolate = \"pod\"\n");
    assert!(e.contains("`service_account`"), "{e}");
}

#[test]
fn min_idle_above_max_is_refused() {
    let e = err("[[pool]]\nname = \"a\"\ncommand = \"x\"\nmin_idle = 5\nmax = 2\n");
    assert!(e.contains("min_idle") && e.contains("max (2)"), "{e}");
}

#[test]
fn empty_command_is_refused() {
    let e = err("[[pool]]\nname = \"a\"\ncommand = \" \"\n");
    assert!(e.contains("pool \"a\"") && e.contains("command"), "{e}");
    let e = err("[[pool]]\nname = \"a\"\n");
    assert!(e.contains("command"), "{e}");
}

#[test]
fn duplicate_names_are_refused() {
    let e =
        err("[[pool]]\nname = \"a\"\ncommand = \"x\"\n[[pool]]\nname = \"a\"\ncommand = \"y\"\n");
    assert!(e.contains("duplicate"), "{e}");
}

#[test]
fn bad_mode_and_names() {
    assert!(err("[[pool]]\nname = \"a\"\ncommand = \"x\"\nmode = \"pooled\"\n").contains("mode"));
    assert!(err("[[pool]]\nname = \"a b\"\ncommand = \"x\"\n").contains("name"));
    assert!(err("[[pool]]\ncommand = \"x\"\n").contains("pool #1"));
    assert!(err("[[pool]]\nname = \"a\"\ncommand = \"x\"\nmax = 0\n").contains("max"));
    assert!(err("[broker]\nsocket_mode = \"999\"\n").contains("socket_mode"));
    assert!(err("[broker]\nmetrics_listen = \"nope\"\n").contains("metrics_listen"));
}

#[test]
fn policy_fields_are_validated() {
    let e = err("[[pool]]\nname = \"a\"\ncommand = \"x\"\nallow = [{ namespace = \"t\" }]\n");
    assert!(e.contains("allow") && e.contains("identity"), "{e}");
    let e = err("[[pool]]\nname = \"a\"\ncommand = \"x\"\nisolate = \"namespace\"\n");
    assert!(e.contains("isolate"), "{e}");
    let e = err("[broker]\nidentity = \"kubernetes\"\n[[pool]]\nname = \"a\"\ncommand = \"x\"\nallow = [{ service_account = \"agent\" }]\n");
    assert!(e.contains("allow.service_account"), "{e}");
    let e = err("[[pool]]\nname = \"a\"\ncommand = \"x\"\nallow = [{ nmespace = \"t\" }]\n");
    assert!(e.contains("nmespace"), "{e}");
    assert!(err("[[pool]]\nname = \"a\"\ncommand = \"x\"\nallow = []\n").contains("allow"));
    assert!(err("[broker]\nidentity = \"ldap\"\n").contains("identity"));
    let c = Config::from_toml(
        "[broker]\nidentity = \"kubernetes\"\n[[pool]]\nname = \"a\"\ncommand = \"x\"\nisolate = \"service_account\"\nallow = [{ namespace = \"team-a\" }, { uid = 0 }]\n",
    )
    .unwrap();
    assert_eq!(c.broker.kubernetes.as_ref().unwrap().audience, "mcp-broker");
    assert_eq!(c.pools[0].allow.as_ref().unwrap().len(), 2);
    assert_eq!(c.pools[0].isolate, crate::policy::Isolate::ServiceAccount);
    let local = Config::from_toml(
        "[[pool]]\nname = \"a\"\ncommand = \"x\"\nallow = [{ uid = 1000, gid = 100 }]\n",
    )
    .unwrap();
    assert!(local.broker.kubernetes.is_none());
}

#[test]
fn exclusive_requires_single_inflight() {
    let e =
        err("[[pool]]\nname = \"a\"\ncommand = \"x\"\nmode = \"exclusive\"\nmax_inflight = 4\n");
    assert!(e.contains("max_inflight"), "{e}");
}

#[test]
fn durations_parse() {
    assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
    assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
    assert!(parse_duration("5 parsecs").is_err());
}

#[test]
fn client_capabilities_are_configurable() {
    let c =
        Config::from_toml("[[pool]]\nname = \"a\"\ncommand = \"x\"\nclient_capabilities = {}\n")
            .unwrap();
    assert_eq!(c.pools[0].client_capabilities, serde_json::json!({}));
    let c = Config::from_toml(
        "[[pool]]\nname = \"a\"\ncommand = \"x\"\nclient_capabilities = { sampling = {} }\n",
    )
    .unwrap();
    assert_eq!(
        c.pools[0].client_capabilities,
        serde_json::json!({"sampling": {}})
    );
    let d = Config::from_toml("[[pool]]\nname = \"a\"\ncommand = \"x\"\n").unwrap();
    assert!(
        d.pools[0].client_capabilities.get("sampling").is_some(),
        "relays everything by default"
    );
    assert!(
        err("[[pool]]\nname = \"a\"\ncommand = \"x\"\nclient_capabilities = 3\n")
            .contains("client_capabilities")
    );
}

#[test]
fn peer_identity_needs_kubernetes_and_a_node() {
    let e = err("[broker]\npeer_identity = true\n");
    assert!(e.contains("peer_identity"), "{e}");
    let e = err("[broker]\nidentity = \"kubernetes\"\n[[pool]]\nname = \"a\"\ncommand = \"x\"\nallow = [{ pod_labels = { app = \"x\" } }]\n");
    assert!(e.contains("allow.pod_labels"), "{e}");
    let c = Config::from_toml(
        "[broker]\nidentity = \"kubernetes\"\npeer_identity = true\nnode_name = \"n1\"\n[[pool]]\nname = \"a\"\ncommand = \"x\"\nallow = [{ pod_labels = { app = \"x\" } }]\n",
    )
    .unwrap();
    let k = c.broker.kubernetes.unwrap();
    assert!(k.peer_identity);
    assert_eq!(k.node_name.as_deref(), Some("n1"));
}

#[test]
fn front_door_limits_have_defaults_and_name_bad_fields() {
    let c = Config::from_toml("").unwrap();
    assert_eq!(c.broker.front_door, FrontDoor::default());
    assert_eq!(
        c.broker.front_door.header_timeout,
        front_door::DEFAULT_HEADER_TIMEOUT
    );
    let c = Config::from_toml(
        "[broker]\nheader_timeout = \"10s\"\nbody_timeout = \"20s\"\nkeepalive_timeout = \"5s\"\n\
         max_connections = 100\nmax_connections_per_peer = 10\ntoken_review_rate = 5\ntoken_review_burst = 7\n",
    )
    .unwrap();
    let d = c.broker.front_door;
    assert_eq!(d.header_timeout, Duration::from_secs(10));
    assert_eq!(d.body_timeout, Duration::from_secs(20));
    assert_eq!(d.keepalive_timeout, Duration::from_secs(5));
    assert_eq!((d.max_connections, d.max_connections_per_peer), (100, 10));
    assert_eq!((d.token_review_rate, d.token_review_burst), (5, 7));
    for (text, field) in [
        ("header_timeout = \"0s\"", "header_timeout"),
        ("max_connections = 0", "max_connections"),
        (
            "max_connections = 10\nmax_connections_per_peer = 11",
            "max_connections_per_peer",
        ),
        ("token_review_rate = 0", "token_review_rate"),
    ] {
        let e = err(&format!("[broker]\n{text}\n"));
        assert!(e.contains(&format!("`{field}`")), "{e}");
    }
    // The first release's single timeout still reads, as the head timeout.
    let c = Config::from_toml("[broker]\nread_timeout = \"7s\"\n").unwrap();
    assert_eq!(c.broker.front_door.header_timeout, Duration::from_secs(7));
}

#[test]
fn a_csi_section_enables_kubernetes_rules_and_is_checked() {
    let c = Config::from_toml(
        "[csi]\nnode_id = \"n1\"\n[[pool]]\nname = \"a\"\ncommand = \"x\"\nisolate = \"namespace\"\nallow = [{ namespace = \"team-a\" }]\n",
    )
    .unwrap();
    let csi = c.broker.csi.unwrap();
    assert_eq!(csi.node_id, "n1");
    assert!(
        c.broker.kubernetes.is_none(),
        "no token verification needed"
    );
    assert!(err("[csi]\nnode_id = \"n1\"\nendpoint = \"csi.sock\"\n").contains("`endpoint`"));
    assert!(err("[csi]\nnode_id = \"n1\"\nsocket = \"/x\"\n").contains("socket"));
}

#[test]
fn modes_list_what_sessions_may_ask_for() {
    let ok = "[[pool]]\nname = \"a\"\ncommand = \"x\"\nmodes = [\"shared\", \"exclusive\"]\n";
    let p = &Config::from_toml(ok).unwrap().pools[0];
    assert_eq!(p.modes, vec![Mode::Shared, Mode::Exclusive]);
    assert!(p.allows(Mode::Exclusive) && !p.allows(Mode::Sticky));
    let plain = &Config::from_toml("[[pool]]\nname = \"a\"\ncommand = \"x\"\n")
        .unwrap()
        .pools[0];
    assert_eq!(
        plain.allowed_modes(),
        vec![Mode::Shared],
        "default: its mode"
    );
    let e = err("[[pool]]\nname = \"a\"\ncommand = \"x\"\nmodes = [\"shared\", \"pooled\"]\n");
    assert!(e.contains("modes") && e.contains("pooled"), "{e}");
    let e = err("[[pool]]\nname = \"a\"\ncommand = \"x\"\nmodes = [\"exclusive\"]\n");
    assert!(e.contains("`modes`") && e.contains("must include"), "{e}");
}
