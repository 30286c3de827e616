//! `[csi]`: the broker as a CSI node plugin (docs/kubernetes.md).
//!
//! Validated here so a bad endpoint, state directory, node id or driver
//! name stops the daemon at start with the field named, instead of a
//! kubelet that silently never registers the plugin.

use super::ConfigError;
use serde::Deserialize;
use std::path::PathBuf;

/// The plugin's gRPC socket, where node-driver-registrar and the kubelet
/// find it (the DaemonSet mounts the plugin directory at `/csi`).
pub const DEFAULT_CSI_ENDPOINT: &str = "/csi/csi.sock";
/// Where the published volumes are recorded, so a restarted broker serves
/// them again.
pub const DEFAULT_CSI_STATE_DIR: &str = "/csi";
/// The CSI driver name (the `CSIDriver` object's name).
pub const DEFAULT_CSI_DRIVER_NAME: &str = "csi.mcp-broker.dev";
/// Longest node id the CSI spec allows (`NodeGetInfoResponse.node_id`).
const MAX_NODE_ID: usize = 256;
/// Room in `sockaddr_un.sun_path` (108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// `[csi]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCsi {
    pub endpoint: Option<String>,
    pub state_dir: Option<String>,
    pub node_id: Option<String>,
    pub driver_name: Option<String>,
}

/// The validated `[csi]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsiSettings {
    /// The gRPC socket the kubelet calls.
    pub endpoint: PathBuf,
    /// Directory of the published-volumes state file.
    pub state_dir: PathBuf,
    /// This node's id (`NodeGetInfo`), the node name by default.
    pub node_id: String,
    /// The driver name (`GetPluginInfo`).
    pub driver_name: String,
}

impl RawCsi {
    /// Applies defaults (`node_id` from `NODE_NAME`) and checks every field.
    pub fn validate(self) -> Result<CsiSettings, ConfigError> {
        self.validate_with(std::env::var("NODE_NAME").ok())
    }

    fn validate_with(self, node_name: Option<String>) -> Result<CsiSettings, ConfigError> {
        let bad = |field: &'static str, msg: String| ConfigError::Invalid {
            at: "[csi]".into(),
            field,
            msg,
        };
        let endpoint = PathBuf::from(self.endpoint.as_deref().unwrap_or(DEFAULT_CSI_ENDPOINT));
        if !endpoint.is_absolute() || endpoint.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(bad(
                "endpoint",
                format!(
                    "{:?} must be an absolute socket path of at most {MAX_SOCKET_PATH} bytes",
                    endpoint.display()
                ),
            ));
        }
        let state_dir = PathBuf::from(self.state_dir.as_deref().unwrap_or(DEFAULT_CSI_STATE_DIR));
        if !state_dir.is_absolute() {
            return Err(bad(
                "state_dir",
                format!("{:?} must be an absolute path", state_dir.display()),
            ));
        }
        let node_id = self.node_id.or(node_name).unwrap_or_default();
        if node_id.is_empty() || node_id.len() > MAX_NODE_ID {
            return Err(bad(
                "node_id",
                format!(
                    "must be 1 to {MAX_NODE_ID} bytes: set node_id, or NODE_NAME (the \
                     DaemonSet sets it from spec.nodeName)"
                ),
            ));
        }
        let driver_name = self
            .driver_name
            .unwrap_or_else(|| DEFAULT_CSI_DRIVER_NAME.into());
        if !driver_name_ok(&driver_name) {
            return Err(bad(
                "driver_name",
                format!(
                    "{driver_name:?} must be at most 63 characters, letters, digits, '-' and \
                     '.', beginning and ending with a letter or digit (CSI spec)"
                ),
            ));
        }
        Ok(CsiSettings {
            endpoint,
            state_dir,
            node_id,
            driver_name,
        })
    }
}

/// The CSI spec's rule for `GetPluginInfoResponse.name`.
fn driver_name_ok(n: &str) -> bool {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    n.len() <= 63
        && edge(n.chars().next())
        && edge(n.chars().last())
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(raw: RawCsi, node: Option<&str>) -> &'static str {
        match raw.validate_with(node.map(String::from)) {
            Err(ConfigError::Invalid { field, .. }) => field,
            other => panic!("expected an invalid field, got {other:?}"),
        }
    }

    #[test]
    fn defaults_take_the_node_name() {
        let s = RawCsi::default()
            .validate_with(Some("node-1".into()))
            .unwrap();
        assert_eq!(s.endpoint, PathBuf::from(DEFAULT_CSI_ENDPOINT));
        assert_eq!(s.state_dir, PathBuf::from(DEFAULT_CSI_STATE_DIR));
        assert_eq!(s.node_id, "node-1");
        assert_eq!(s.driver_name, DEFAULT_CSI_DRIVER_NAME);
    }

    #[test]
    fn bad_fields_are_named() {
        assert_eq!(field(RawCsi::default(), None), "node_id");
        let rel = RawCsi {
            endpoint: Some("csi.sock".into()),
            ..RawCsi::default()
        };
        assert_eq!(field(rel, Some("n")), "endpoint");
        let long = RawCsi {
            endpoint: Some(format!("/{}", "x".repeat(120))),
            ..RawCsi::default()
        };
        assert_eq!(field(long, Some("n")), "endpoint");
        let dir = RawCsi {
            state_dir: Some("state".into()),
            ..RawCsi::default()
        };
        assert_eq!(field(dir, Some("n")), "state_dir");
        for name in ["-a.b", "a_b", "", &"a".repeat(64)] {
            let r = RawCsi {
                driver_name: Some(name.into()),
                ..RawCsi::default()
            };
            assert_eq!(field(r, Some("n")), "driver_name", "{name:?}");
        }
    }
}
