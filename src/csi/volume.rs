//! One published volume: what a `NodePublishVolumeRequest` must carry for
//! this plugin, checked into a [`Volume`] (the unit kept in the registry
//! and the state file).
//!
//! Only ephemeral inline volumes with the kubelet's pod info are accepted:
//! the identity every connection on the pod's socket carries comes from
//! these keys, which the kubelet sets itself (`podInfoOnMount: true`),
//! overwriting anything the pod spec wrote under the same names. The one
//! attribute a pod spec may set, `pools`, only narrows.

use super::proto::{volume_capability, NodePublishVolumeRequest};
use crate::policy::{KubeIdentity, VolumePod};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::PathBuf;

/// The kubelet's volume context keys (`podInfoOnMount`).
pub const POD_NAME: &str = "csi.storage.k8s.io/pod.name";
/// Pod namespace key.
pub const POD_NAMESPACE: &str = "csi.storage.k8s.io/pod.namespace";
/// Pod uid key.
pub const POD_UID: &str = "csi.storage.k8s.io/pod.uid";
/// Service account key.
pub const SERVICE_ACCOUNT: &str = "csi.storage.k8s.io/serviceAccount.name";
/// Set to `"true"` for an ephemeral inline volume.
pub const EPHEMERAL: &str = "csi.storage.k8s.io/ephemeral";
/// The pod spec's own attribute: comma-separated pool names.
pub const POOLS: &str = "pools";
/// The kubelet's key prefix; other keys under it are accepted and ignored
/// (newer kubelets may add some, e.g. service account tokens).
const KUBELET_PREFIX: &str = "csi.storage.k8s.io/";
/// The socket's name inside the volume.
pub const SOCKET_NAME: &str = "broker.sock";

/// A published volume. Everything but `volume_id` and `target_path` is
/// what the CSI spec calls the publish's other arguments: a second publish
/// must match them to be idempotent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Volume {
    pub volume_id: String,
    pub target_path: PathBuf,
    pub readonly: bool,
    pub access_mode: i32,
    pub namespace: String,
    pub service_account: String,
    pub pod_name: String,
    pub pod_uid: String,
    pub pools: Option<BTreeSet<String>>,
}

impl Volume {
    /// Checks a publish request; the error is the `INVALID_ARGUMENT`
    /// message. `known_pool` says whether a pool named in `pools` exists.
    pub fn from_request(
        r: &NodePublishVolumeRequest,
        known_pool: impl Fn(&str) -> bool,
    ) -> Result<Volume, String> {
        if r.volume_id.is_empty() {
            return Err("volume_id is required".into());
        }
        if r.target_path.is_empty() {
            return Err("target_path is required".into());
        }
        let target_path = PathBuf::from(&r.target_path);
        if !target_path.is_absolute() {
            return Err(format!("target_path {:?} is not absolute", r.target_path));
        }
        let cap = r
            .volume_capability
            .as_ref()
            .ok_or("volume_capability is required")?;
        match &cap.access_type {
            Some(volume_capability::AccessType::Mount(_)) => {}
            Some(volume_capability::AccessType::Block(_)) => {
                return Err(
                    "block volumes are not supported: the volume is a directory with a socket"
                        .into(),
                )
            }
            None => return Err("volume_capability.access_type is required".into()),
        }
        let access_mode = cap
            .access_mode
            .as_ref()
            .map(|m| m.mode)
            .filter(|m| *m != volume_capability::access_mode::Mode::Unknown as i32)
            .ok_or("volume_capability.access_mode is required")?;
        let ctx = &r.volume_context;
        if ctx.get(EPHEMERAL).map(String::as_str) != Some("true") {
            return Err(format!(
                "only ephemeral inline volumes are served ({EPHEMERAL} is not \"true\"): \
                 use a `csi:` volume in the pod spec"
            ));
        }
        if let Some(k) = ctx
            .keys()
            .find(|k| *k != POOLS && !k.starts_with(KUBELET_PREFIX))
        {
            return Err(format!(
                "unknown volume attribute {k:?} (the only one a pod may set is {POOLS:?})"
            ));
        }
        let pod = |key: &str| -> Result<String, String> {
            ctx.get(key)
                .filter(|v| !v.is_empty())
                .cloned()
                .ok_or_else(|| {
                    format!("volume_context lacks {key}: the CSIDriver needs podInfoOnMount: true")
                })
        };
        let pools = match ctx.get(POOLS) {
            None => None,
            Some(list) => Some(pools(list, &known_pool)?),
        };
        Ok(Volume {
            volume_id: r.volume_id.clone(),
            target_path,
            readonly: r.readonly,
            access_mode,
            namespace: pod(POD_NAMESPACE)?,
            service_account: pod(SERVICE_ACCOUNT)?,
            pod_name: pod(POD_NAME)?,
            pod_uid: pod(POD_UID)?,
            pools,
        })
    }

    /// True when `other` is the same publish but for the target path: the
    /// CSI spec's "P1 = P2".
    pub fn same_arguments(&self, other: &Volume) -> bool {
        Volume {
            target_path: other.target_path.clone(),
            volume_id: other.volume_id.clone(),
            ..self.clone()
        } == *other
    }

    /// The socket the pod connects to.
    pub fn socket(&self) -> PathBuf {
        self.target_path.join(SOCKET_NAME)
    }

    /// The identity every connection on the volume's socket carries.
    pub fn pod(&self) -> VolumePod {
        VolumePod {
            kube: KubeIdentity {
                namespace: self.namespace.clone(),
                service_account: self.service_account.clone(),
            },
            name: self.pod_name.clone(),
            uid: self.pod_uid.clone(),
            pools: self.pools.clone(),
        }
    }
}

/// Parses `pools = "github, time"`: at least one name, each a pool that exists.
fn pools(list: &str, known: impl Fn(&str) -> bool) -> Result<BTreeSet<String>, String> {
    let names: BTreeSet<String> = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    if names.is_empty() {
        return Err(format!(
            "volume attribute {POOLS:?} names no pool (omit it to allow every pool policy allows)"
        ));
    }
    if let Some(n) = names.iter().find(|n| !known(n)) {
        return Err(format!(
            "volume attribute {POOLS:?} names {n:?}, which is no pool of this broker"
        ));
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::super::proto::{volume_capability as vc, VolumeCapability};
    use super::*;

    fn request(ctx: &[(&str, &str)]) -> NodePublishVolumeRequest {
        NodePublishVolumeRequest {
            volume_id: "v1".into(),
            target_path: "/t/mount".into(),
            volume_capability: Some(VolumeCapability {
                access_mode: Some(vc::AccessMode {
                    mode: vc::access_mode::Mode::SingleNodeWriter as i32,
                }),
                access_type: Some(vc::AccessType::Mount(vc::MountVolume::default())),
            }),
            volume_context: ctx
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    const POD: [(&str, &str); 5] = [
        (POD_NAME, "agent-0"),
        (POD_NAMESPACE, "team-a"),
        (POD_UID, "u-1"),
        (SERVICE_ACCOUNT, "agent"),
        (EPHEMERAL, "true"),
    ];

    #[test]
    fn the_kubelets_pod_info_names_the_pod() {
        let mut ctx = POD.to_vec();
        ctx.push((POOLS, " time, github ,"));
        let v = Volume::from_request(&request(&ctx), |_| true).unwrap();
        assert_eq!(v.pod().kube.namespace, "team-a");
        assert_eq!(v.pod().kube.service_account, "agent");
        assert_eq!(v.pod_uid, "u-1");
        assert_eq!(
            v.pools.unwrap().into_iter().collect::<Vec<_>>(),
            ["github", "time"]
        );
    }

    #[test]
    fn what_is_refused() {
        let err =
            |r: NodePublishVolumeRequest| Volume::from_request(&r, |p| p == "time").unwrap_err();
        assert!(err(request(&POD[..4])).contains(EPHEMERAL));
        assert!(err(request(&POD[1..])).contains(POD_NAME));
        let mut ctx = POD.to_vec();
        ctx.push(("pool", "time"));
        assert!(err(request(&ctx)).contains("unknown volume attribute \"pool\""));
        ctx.pop();
        ctx.push((POOLS, "github"));
        assert!(err(request(&ctx)).contains("\"github\""));
        ctx.pop();
        ctx.push((POOLS, " , "));
        assert!(err(request(&ctx)).contains("names no pool"));
        let mut r = request(&POD);
        r.volume_capability.as_mut().unwrap().access_type =
            Some(vc::AccessType::Block(vc::BlockVolume {}));
        assert!(err(r).contains("block"));
        let mut r = request(&POD);
        r.target_path = "rel".into();
        assert!(err(r).contains("absolute"));
    }
}
