//! Identifying a caller's pod from the socket's peer credentials.
//!
//! With `peer_identity = true` the broker maps the peer pid of a lease API
//! connection to its pod without any token: `/proc/<pid>/cgroup` names the
//! pod UID (both cgroup drivers and v1/v2 layouts, read once per connection
//! through a pidfd: [`super::cgroup`]), and a reflector of the
//! Pods on this node (`spec.nodeName=$NODE_NAME`) maps the UID to namespace,
//! service account and labels. No API call is made per request: the
//! reflector's store is local. This needs the broker to see peer pids
//! (`hostPID: true` in the DaemonSet); without it the peer pid is 0 and the
//! lookup finds nothing, which fails closed for rules that need a pod.

use super::KubeIdentity;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Api;
use tokio_util::sync::CancellationToken;

pub use super::PodIdentity;

/// A local, reflector-fed index of the Pods on this node.
#[derive(Clone)]
pub struct PodIndex {
    store: Store<Pod>,
}

impl PodIndex {
    /// An index over `store` (fed by [`Self::start`] or, in tests, by hand).
    pub fn new(store: Store<Pod>) -> Self {
        Self { store }
    }

    /// Starts a reflector of the Pods on `node` until `shutdown`.
    pub fn start(client: kube::Client, node: &str, shutdown: CancellationToken) -> PodIndex {
        let (reader, writer) = reflector::store();
        let api: Api<Pod> = Api::all(client);
        let cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let stream = reflector::reflector(writer, watcher(api, cfg))
            .default_backoff()
            .touched_objects();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    ev = stream.next() => match ev {
                        Some(Ok(_)) => {}
                        Some(Err(e)) => tracing::warn!("pod reflector: {e}"),
                        None => return,
                    },
                }
            }
        });
        PodIndex { store: reader }
    }

    /// The pod with `uid`, if it runs on this node.
    pub fn by_uid(&self, uid: &str) -> Option<PodIdentity> {
        self.store
            .state()
            .into_iter()
            .find(|p| p.metadata.uid.as_deref() == Some(uid))
            .map(|p| PodIdentity {
                kube: KubeIdentity {
                    namespace: p.metadata.namespace.clone().unwrap_or_default(),
                    service_account: p
                        .spec
                        .as_ref()
                        .and_then(|s| s.service_account_name.clone())
                        .unwrap_or_else(|| "default".into()),
                },
                labels: p.metadata.labels.clone().unwrap_or_default(),
            })
    }
}

impl super::PodLookup for PodIndex {
    fn by_uid(&self, uid: &str) -> Option<PodIdentity> {
        PodIndex::by_uid(self, uid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    const UID: &str = "6f1c2b7e-0d3a-4c55-9a8e-1b2c3d4e5f60";

    #[test]
    fn reflector_store_maps_uid_to_identity() {
        let (reader, mut writer) = reflector::store::<Pod>();
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some("agent-1".into()),
                namespace: Some("team-a".into()),
                uid: Some(UID.into()),
                labels: Some([("app".to_string(), "agent".to_string())].into()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                service_account_name: Some("agent".into()),
                ..PodSpec::default()
            }),
            ..Pod::default()
        };
        writer.apply_watcher_event(&watcher::Event::Apply(pod));
        let idx = PodIndex::new(reader);
        let got = idx.by_uid(UID).unwrap();
        assert_eq!(got.kube.namespace, "team-a");
        assert_eq!(got.kube.service_account, "agent");
        assert_eq!(got.labels["app"], "agent");
        assert!(idx.by_uid("00000000-0000-0000-0000-000000000000").is_none());
    }
}
