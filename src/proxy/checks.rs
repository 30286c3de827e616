//! What the proxy reads from a request's headers before anything else:
//! who may talk to it at all (the `Origin` of browser requests, the `Host`
//! they were sent to) and which answer shapes the client accepts.
//!
//! Both guard against a web page reaching a local MCP server: a foreign
//! `Origin` is a cross-site request; a foreign `Host` on a loopback
//! listener is DNS rebinding (a page's own name resolving to 127.0.0.1).
//! Localhost names are always allowed; others only when configured.

use super::error::ProxyError;
use super::flow::Accept;
use super::ProxySettings;
use ::http::{header, HeaderMap};

/// The host part of `authority` (`host`, `host:port`, `[v6]:port`).
fn host_of(authority: &str) -> &str {
    let a = authority.trim_end_matches('/');
    if let Some(h) = a.strip_prefix('[') {
        h.split(']').next().unwrap_or("")
    } else {
        a.split(':').next().unwrap_or("")
    }
}

fn is_localhost(host: &str) -> bool {
    matches!(host, "localhost" | "127.0.0.1" | "::1")
}

/// The answer shapes `Accept` allows (both when it is absent or `*/*`).
pub(super) fn accept_of(headers: &HeaderMap) -> Accept {
    let v = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    if v.trim().is_empty() || v.contains("*/*") {
        return Accept {
            json: true,
            sse: true,
        };
    }
    Accept {
        json: v.contains("application/json") || v.contains("application/*"),
        sse: v.contains("text/event-stream") || v.contains("text/*"),
    }
}

/// Checks `Origin` (when present) and `Host` of a request to `/mcp`.
pub(super) fn origin_and_host(
    settings: &ProxySettings,
    headers: &HeaderMap,
) -> Result<(), ProxyError> {
    origin_allowed(settings, headers)?;
    host_allowed(settings, headers)
}

pub(super) fn origin_allowed(
    settings: &ProxySettings,
    headers: &HeaderMap,
) -> Result<(), ProxyError> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let o = origin.to_str().unwrap_or("");
    if settings.allow_origins.iter().any(|a| a == o || a == "*") {
        return Ok(());
    }
    let host = host_of(o.split_once("://").map(|(_, rest)| rest).unwrap_or(""));
    if is_localhost(host) {
        Ok(())
    } else {
        Err(ProxyError::Origin(o.to_string()))
    }
}

/// On a loopback listener, `Host` must name localhost or an allowed host
/// (`--allow-host`); elsewhere only the allowed hosts are enforced, when
/// any are given (a sidecar is reached by Service and pod names).
pub(super) fn host_allowed(
    settings: &ProxySettings,
    headers: &HeaderMap,
) -> Result<(), ProxyError> {
    let loopback = settings.listen.ip().is_loopback();
    if !loopback && settings.allow_hosts.is_empty() {
        return Ok(());
    }
    let given = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let host = host_of(given);
    let allowed = settings
        .allow_hosts
        .iter()
        .any(|a| a == "*" || a.eq_ignore_ascii_case(host) || a.eq_ignore_ascii_case(given));
    if allowed || (loopback && is_localhost(host)) || (loopback && given.is_empty()) {
        Ok(())
    } else {
        Err(ProxyError::Host(given.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(k: &'static str, v: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(k, v.parse().unwrap());
        m
    }

    #[test]
    fn origins() {
        let s = ProxySettings {
            allow_origins: vec!["https://app.example".into()],
            ..ProxySettings::default()
        };
        assert!(origin_allowed(&s, &HeaderMap::new()).is_ok());
        assert!(origin_allowed(&s, &h("origin", "http://localhost:3000")).is_ok());
        assert!(origin_allowed(&s, &h("origin", "http://[::1]:3000")).is_ok());
        assert!(origin_allowed(&s, &h("origin", "https://app.example")).is_ok());
        assert!(origin_allowed(&s, &h("origin", "https://evil.example")).is_err());
        assert!(origin_allowed(&s, &h("origin", "http://localhost.evil.example")).is_err());
    }

    #[test]
    fn hosts() {
        let local = ProxySettings::default();
        assert!(host_allowed(&local, &h("host", "127.0.0.1:8080")).is_ok());
        assert!(host_allowed(&local, &h("host", "localhost:8080")).is_ok());
        assert!(host_allowed(&local, &h("host", "[::1]:8080")).is_ok());
        assert!(host_allowed(&local, &h("host", "evil.example:8080")).is_err());
        let named = ProxySettings {
            allow_hosts: vec!["mcp.internal".into()],
            ..ProxySettings::default()
        };
        assert!(host_allowed(&named, &h("host", "mcp.internal:8080")).is_ok());
        let sidecar = ProxySettings {
            listen: "0.0.0.0:8080".parse().unwrap(),
            ..ProxySettings::default()
        };
        assert!(host_allowed(&sidecar, &h("host", "mcp-agent.ns.svc:8080")).is_ok());
        let pinned = ProxySettings {
            allow_hosts: vec!["mcp-agent.ns.svc".into()],
            ..sidecar
        };
        assert!(host_allowed(&pinned, &h("host", "mcp-agent.ns.svc:8080")).is_ok());
        assert!(host_allowed(&pinned, &h("host", "other:8080")).is_err());
    }

    #[test]
    fn accept_negotiation() {
        let a = accept_of(&h("accept", "application/json, text/event-stream"));
        assert!(a.json && a.sse);
        let j = accept_of(&h("accept", "application/json"));
        assert!(j.json && !j.sse);
        let any = accept_of(&HeaderMap::new());
        assert!(any.json && any.sse);
        let none = accept_of(&h("accept", "text/html"));
        assert!(!none.json && !none.sse);
    }
}
