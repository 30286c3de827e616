//! `mcp-broker check`'s summary of a validated config: the daemon's
//! settings and every pool as resolved (defaults applied).

use super::Config;

/// A human-readable summary of a validated config (for `check`).
pub fn describe(c: &Config) -> String {
    use std::fmt::Write;
    let b = &c.broker;
    let mut out = String::new();
    let _ = writeln!(out, "config OK: {} pool(s)", c.pools.len());
    let _ =
        writeln!(
        out,
        "broker: socket={} mode={:o} group={} metrics={} drain_timeout={:?} max_message_size={}",
        b.socket.display(),
        b.socket_mode,
        b.socket_group.as_deref().unwrap_or("-"),
        b.metrics_listen.map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
        b.drain_timeout,
        b.max_message_size
    );
    match &b.kubernetes {
        Some(k) => {
            let _ = writeln!(
                out,
                "identity: kubernetes (token audience {:?}, cache {:?}, peer_identity {})",
                k.audience, k.cache_ttl, k.peer_identity
            );
        }
        None => {
            let _ = writeln!(out, "identity: socket peer credentials only");
        }
    }
    let n = &b.node;
    let isolation = match (n.isolation, crate::node::uids::missing_caps()) {
        (super::raw::Isolation::Off, _) => {
            "off: pools are NOT isolated from each other".to_string()
        }
        (_, m) if m.is_empty() => format!(
            "a uid per pool and tenant from {}-{}, homes under {}",
            n.uid_range.start(),
            n.uid_range.end(),
            n.state_dir.display()
        ),
        (_, m) => format!(
            "none here: pools are NOT isolated from each other (the broker lacks {})",
            m.join(", ")
        ),
    };
    let _ = writeln!(out, "isolation: {isolation}");
    let _ = writeln!(
        out,
        "node budget: max_processes={} max_memory={} max_tenant_pools={} tenant_idle_timeout={:?} cgroups={:?}",
        n.max_processes.map_or("unlimited".into(), |v| v.to_string()),
        n.max_memory.map_or("unlimited".into(), |v| format!("{} MiB", v >> 20)),
        n.max_tenant_pools,
        n.tenant_idle_timeout,
        n.cgroups
    );
    if let Some(csi) = &b.csi {
        let _ = writeln!(
            out,
            "csi: driver {} node {:?} endpoint={} state_dir={} (pods' sockets carry the kubelet's pod identity)",
            csi.driver_name,
            csi.node_id,
            csi.endpoint.display(),
            csi.state_dir.display()
        );
    }
    for p in &c.pools {
        let _ = writeln!(
            out,
            "pool {:?}: {} {:?} mode={} min_idle={} max={} max_inflight={} queue_limit={} queue_timeout={:?} request_timeout={:?} idle_timeout={:?}",
            p.name, p.command, p.args, p.mode, p.min_idle, p.max, p.max_inflight,
            p.queue_limit, p.queue_timeout, p.request_timeout, p.idle_timeout
        );
        if let Some(rules) = &p.allow {
            let _ = writeln!(out, "  allow: {rules:?}");
        }
        let _ = writeln!(
            out,
            "  protocol={} init_timeout={:?} probe_timeout={:?} request_state_ttl={:?}{}{}",
            p.protocol,
            p.init_timeout,
            p.probe_timeout,
            p.request_state_ttl,
            p.cwd
                .as_ref()
                .map(|d| format!(" cwd={}", d.display()))
                .unwrap_or_default(),
            if p.env.is_empty() {
                String::new()
            } else {
                format!(" env={:?}", p.env.keys().collect::<Vec<_>>())
            },
        );
        if p.isolate != crate::policy::Isolate::None {
            let _ = writeln!(out, "  isolate: {:?}", p.isolate);
        }
        if !p.limits.is_empty() {
            let _ = writeln!(out, "  limits: {:?}", p.limits);
        }
    }
    out
}
