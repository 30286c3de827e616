//! MCP protocol versions and the two eras the broker bridges.
//!
//! Through 2025-11-25 a connection starts with `initialize` (the *legacy*
//! era); the 2026-07-28 revision is *stateless*: no handshake, each request
//! carries its protocol version and client capabilities in `params._meta`,
//! and `server/discover` describes the server. This module holds the version
//! lists and the messages the broker itself sends when it warms a process;
//! it does no I/O.

use serde_json::{json, Value};

/// The stateless revision.
pub const STATELESS_VERSION: &str = "2026-07-28";
/// Handshake-era versions we accept from clients, oldest first.
pub const LEGACY_VERSIONS: &[&str] = &["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"];
/// The newest handshake-era version; what the broker asks servers for.
pub const LATEST_LEGACY: &str = "2025-11-25";
/// `_meta` key carrying the protocol version of a stateless request.
pub const META_PROTOCOL_VERSION: &str = "io.modelcontextprotocol/protocolVersion";
/// `_meta` key carrying the client's capabilities on a stateless request.
pub const META_CLIENT_CAPABILITIES: &str = "io.modelcontextprotocol/clientCapabilities";
/// `_meta` key carrying the client's implementation info on a stateless request.
pub const META_CLIENT_INFO: &str = "io.modelcontextprotocol/clientInfo";

/// Which handshake a server (or client) speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Era {
    /// `initialize` + sessions (2025-11-25 and before).
    Legacy,
    /// `server/discover`, no sessions (2026-07-28).
    Stateless,
}

/// The era a protocol version string belongs to, if we know it.
pub fn era_of(version: &str) -> Option<Era> {
    if version == STATELESS_VERSION {
        Some(Era::Stateless)
    } else if LEGACY_VERSIONS.contains(&version) {
        Some(Era::Legacy)
    } else {
        None
    }
}

/// What the broker tells servers about itself as a client.
pub fn client_info() -> Value {
    json!({"name": "mcp-broker", "version": env!("CARGO_PKG_VERSION")})
}

/// Capabilities the broker declares when warming a process. It declares what
/// a client *might* offer, so servers keep those features on; when the real
/// client lacks one, the proxy answers the server's request with an error.
pub fn client_capabilities() -> Value {
    json!({"roots": {"listChanged": true}, "sampling": {}, "elicitation": {}})
}

/// `params` of the broker's warm-up `initialize`, declaring `capabilities`.
pub fn initialize_params(capabilities: &Value) -> Value {
    json!({
        "protocolVersion": LATEST_LEGACY,
        "capabilities": capabilities,
        "clientInfo": client_info(),
    })
}

/// The `_meta` a stateless request carries.
pub fn stateless_meta(capabilities: &Value, info: &Value) -> Value {
    json!({
        META_PROTOCOL_VERSION: STATELESS_VERSION,
        META_CLIENT_CAPABILITIES: capabilities,
        META_CLIENT_INFO: info,
    })
}

/// Adds the stateless `_meta` envelope keys a request lacks, so a
/// 2026-07-28 server accepts it; keys already present are kept.
pub fn ensure_stateless_meta(msg: &mut Value, capabilities: &Value, info: &Value) {
    let Some(obj) = msg.as_object_mut() else {
        return;
    };
    let params = obj.entry("params").or_insert_with(|| json!({}));
    let Some(params) = params.as_object_mut() else {
        return;
    };
    let meta = params.entry("_meta").or_insert_with(|| json!({}));
    let (Some(meta), Value::Object(add)) =
        (meta.as_object_mut(), stateless_meta(capabilities, info))
    else {
        return;
    };
    for (k, v) in add {
        meta.entry(k).or_insert(v);
    }
}

/// `params` of the broker's warm-up `server/discover`.
pub fn discover_params(capabilities: &Value) -> Value {
    json!({"_meta": stateless_meta(capabilities, &client_info())})
}

/// The stateless version a discover result offers, if it is one we speak.
pub fn pick_stateless_version(result: &Value) -> Option<String> {
    let offered = result
        .get("supportedVersions")
        .or_else(|| result.get("protocolVersions"))
        .and_then(Value::as_array);
    match offered {
        Some(list) => list
            .iter()
            .filter_map(Value::as_str)
            .find(|v| *v == STATELESS_VERSION)
            .map(str::to_string),
        None => result
            .get("protocolVersion")
            .and_then(Value::as_str)
            .filter(|v| *v == STATELESS_VERSION)
            .map(str::to_string),
    }
}

/// The legacy version to answer a client's `initialize` with, given the
/// version the client asked for and the one the pool's server settled on.
///
/// The spec lets a server answer with the requested version when it supports
/// it, else with another it supports. We accept any known legacy version not
/// newer than the server's; otherwise we offer the server's own.
pub fn negotiate_legacy(requested: Option<&str>, server: &str) -> String {
    let rank = |v: &str| LEGACY_VERSIONS.iter().position(|x| *x == v);
    match (requested.and_then(rank), rank(server)) {
        (Some(r), Some(s)) if r <= s => LEGACY_VERSIONS[r].to_string(),
        (Some(r), None) => LEGACY_VERSIONS[r].to_string(),
        _ if era_of(server) == Some(Era::Legacy) => server.to_string(),
        _ => LATEST_LEGACY.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiates_legacy_versions() {
        assert_eq!(
            negotiate_legacy(Some("2025-03-26"), "2025-06-18"),
            "2025-03-26"
        );
        assert_eq!(
            negotiate_legacy(Some("2025-11-25"), "2025-06-18"),
            "2025-06-18"
        );
        assert_eq!(
            negotiate_legacy(Some("1999-01-01"), "2025-06-18"),
            "2025-06-18"
        );
        assert_eq!(negotiate_legacy(None, "2025-06-18"), "2025-06-18");
        // A stateless server behind a legacy client: the client's version wins.
        assert_eq!(
            negotiate_legacy(Some("2025-06-18"), STATELESS_VERSION),
            "2025-06-18"
        );
        assert_eq!(
            negotiate_legacy(Some("bogus"), STATELESS_VERSION),
            LATEST_LEGACY
        );
    }

    #[test]
    fn fills_missing_envelope_only() {
        let mut m = json!({"jsonrpc":"2.0","id":1,"method":"tools/list"});
        ensure_stateless_meta(&mut m, &json!({}), &client_info());
        assert_eq!(
            m["params"]["_meta"][META_PROTOCOL_VERSION],
            STATELESS_VERSION
        );
        let mut k = json!({"params":{"_meta":{META_CLIENT_CAPABILITIES: {"sampling":{}}, "progressToken": 3}}});
        ensure_stateless_meta(&mut k, &json!({}), &client_info());
        assert_eq!(
            k["params"]["_meta"][META_CLIENT_CAPABILITIES],
            json!({"sampling":{}})
        );
        assert_eq!(k["params"]["_meta"]["progressToken"], 3);
        let mut bad = json!({"params": [1]});
        ensure_stateless_meta(&mut bad, &json!({}), &client_info());
        assert_eq!(bad["params"], json!([1]));
    }

    #[test]
    fn picks_stateless_version() {
        let r = json!({"supportedVersions": ["2026-07-28", "2027-01-01"]});
        assert_eq!(
            pick_stateless_version(&r).as_deref(),
            Some(STATELESS_VERSION)
        );
        assert_eq!(
            pick_stateless_version(&json!({"supportedVersions": ["x"]})),
            None
        );
        assert_eq!(pick_stateless_version(&json!({})), None);
    }
}
