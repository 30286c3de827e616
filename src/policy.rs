//! Who may lease which pool, and which callers share processes.
//!
//! Every lease API request carries an [`Identity`]: the peer credentials of
//! the Unix socket connection (always), and, when the broker verifies
//! Kubernetes ServiceAccount tokens, the caller's namespace and service
//! account ([`tokenreview`]). A connection on a pod's own CSI socket
//! carries the pod the kubelet named ([`VolumePod`]) instead: its namespace
//! and service account fill the same Kubernetes part, so rules and
//! `isolate` treat it like a verified token, and its volume's `pools` list
//! can only narrow what the rules allow ([`VolumePod::permits`]). A pool's `allow` list is a list of [`Rule`]s;
//! a caller may use the pool when any rule matches (all fields of a rule
//! must match). No `allow` list means: anyone who can open the socket.
//! Invariant: a rule naming a Kubernetes field never matches an identity
//! without a verified Kubernetes part, so a missing or bad token fails
//! closed.
//!
//! `isolate` gives each namespace or service account its own warm
//! processes ([`Isolate::tenant`]), so a process never carries one tenant's
//! state into another tenant's answers.

pub mod cgroup;
#[cfg(feature = "kubernetes")]
pub mod pods;
#[cfg(feature = "kubernetes")]
pub mod tokenreview;

use serde::Deserialize;
use std::fmt;
use std::future::Future;
use std::pin::Pin;

/// Verifies a presented ServiceAccount token (the TokenReview API in
/// builds with the `kubernetes` feature; mocks in tests).
pub trait TokenVerifier: Send + Sync + 'static {
    /// Who `token` belongs to, or why it names nobody.
    fn verify<'a>(
        &'a self,
        token: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<KubeIdentity, String>> + Send + 'a>>;
}

/// Finds a caller's pod (`peer_identity`) by the pod UID its connection's
/// peer process showed at accept ([`cgroup`]).
pub trait PodLookup: Send + Sync + 'static {
    /// The pod with `uid`, if it runs on this node.
    fn by_uid(&self, uid: &str) -> Option<PodIdentity>;
}

/// What the broker knows about a caller's pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodIdentity {
    pub kube: KubeIdentity,
    pub labels: std::collections::BTreeMap<String, String>,
}

/// A verified Kubernetes caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeIdentity {
    /// The caller's namespace.
    pub namespace: String,
    /// The caller's service account name.
    pub service_account: String,
}

/// The pod a CSI volume was published for, as the kubelet named it
/// (`podInfoOnMount`); fixed for every connection on that pod's socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumePod {
    /// Namespace and service account.
    pub kube: KubeIdentity,
    /// Pod name.
    pub name: String,
    /// Pod uid.
    pub uid: String,
    /// The volume's `pools` attribute: the only pools this pod may lease
    /// (still subject to `allow`); `None`: every pool policy allows.
    pub pools: Option<std::collections::BTreeSet<String>>,
}

impl VolumePod {
    /// Whether the volume's own pool list lets the pod lease `pool`.
    pub fn permits(&self, pool: &str) -> bool {
        self.pools.as_ref().is_none_or(|p| p.contains(pool))
    }
}

/// Everything the broker knows about a caller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// Peer uid of the socket connection.
    pub uid: Option<u32>,
    /// Peer gid of the socket connection.
    pub gid: Option<u32>,
    /// Peer pid (for logs).
    pub pid: Option<i32>,
    /// UID of the peer's pod, read once at accept (`peer_identity`).
    pub pod_uid: Option<String>,
    /// Set when a ServiceAccount token was verified.
    pub kube: Option<KubeIdentity>,
    /// Why a presented token gave no identity (for the denial message).
    pub kube_error: Option<String>,
    /// Labels of the caller's pod, when it was found by peer credentials.
    pub pod_labels: Option<std::collections::BTreeMap<String, String>>,
    /// Set on a pod's own CSI socket: the pod the kubelet named. `kube`
    /// then holds its namespace and service account, and no token or peer
    /// lookup changes them.
    pub volume_pod: Option<std::sync::Arc<VolumePod>>,
}

impl Identity {
    /// A caller on the CSI socket of `pod`, with the connection's peer
    /// credentials `peer`.
    pub fn of_volume(peer: Identity, pod: std::sync::Arc<VolumePod>) -> Identity {
        Identity {
            kube: Some(pod.kube.clone()),
            kube_error: None,
            pod_labels: None,
            volume_pod: Some(pod),
            ..peer
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.volume_pod, &self.kube) {
            (Some(p), _) => write!(
                f,
                "pod {}/{} (service account {}/{})",
                p.kube.namespace, p.name, p.kube.namespace, p.kube.service_account
            )?,
            (None, Some(k)) => write!(f, "service account {}/{}", k.namespace, k.service_account)?,
            (None, None) => write!(f, "an unauthenticated caller")?,
        }
        if let Some(e) = &self.kube_error {
            write!(f, " [{e}]")?;
        }
        if let (Some(u), Some(g)) = (self.uid, self.gid) {
            write!(f, " (uid {u}, gid {g})")?;
        }
        Ok(())
    }
}

/// One `allow` entry; every field given must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Caller's namespace.
    pub namespace: Option<String>,
    /// Caller's service account as `namespace/name`.
    pub service_account: Option<String>,
    /// Peer uid.
    pub uid: Option<u32>,
    /// Peer gid.
    pub gid: Option<u32>,
    /// Labels the caller's pod must carry (needs `peer_identity`).
    pub pod_labels: Option<std::collections::BTreeMap<String, String>>,
}

impl Rule {
    /// True when the rule names a Kubernetes field.
    pub fn needs_kubernetes(&self) -> bool {
        self.namespace.is_some() || self.service_account.is_some() || self.pod_labels.is_some()
    }

    /// Checks the rule's own shape; the message names the bad field.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if *self == Rule::default() {
            return Err((
                "allow",
                "an empty rule would allow everyone; omit `allow` instead".into(),
            ));
        }
        if let Some(sa) = &self.service_account {
            let ok = sa
                .split_once('/')
                .is_some_and(|(ns, n)| !ns.is_empty() && !n.is_empty() && !n.contains('/'));
            if !ok {
                return Err((
                    "allow.service_account",
                    format!("{sa:?} must be \"namespace/name\""),
                ));
            }
        }
        Ok(())
    }

    /// Whether `who` satisfies every field of the rule.
    pub fn matches(&self, who: &Identity) -> bool {
        let kube = who.kube.as_ref();
        self.namespace
            .as_ref()
            .is_none_or(|ns| kube.is_some_and(|k| &k.namespace == ns))
            && self.service_account.as_ref().is_none_or(|sa| {
                kube.is_some_and(|k| {
                    sa.split_once('/') == Some((k.namespace.as_str(), k.service_account.as_str()))
                })
            })
            && self.uid.is_none_or(|u| who.uid == Some(u))
            && self.gid.is_none_or(|g| who.gid == Some(g))
            && self.pod_labels.as_ref().is_none_or(|want| {
                who.pod_labels
                    .as_ref()
                    .is_some_and(|have| want.iter().all(|(k, v)| have.get(k) == Some(v)))
            })
    }
}

/// Whether `who` may use a pool with `allow` (`None`: no restriction).
pub fn allowed(allow: Option<&[Rule]>, who: &Identity) -> bool {
    allow.is_none_or(|rules| rules.iter().any(|r| r.matches(who)))
}

/// How a pool separates callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Isolate {
    /// All callers share the pool's processes.
    #[default]
    None,
    /// Each namespace gets its own processes.
    Namespace,
    /// Each service account gets its own processes.
    ServiceAccount,
}

impl Isolate {
    /// The tenant key for `who`: `Ok(None)` when the pool is shared by all,
    /// `Err` when isolation needs a Kubernetes identity the caller lacks.
    pub fn tenant(self, who: &Identity) -> Result<Option<String>, String> {
        let kube = || {
            who.kube
                .as_ref()
                .ok_or_else(|| "this pool isolates callers by Kubernetes identity; present a ServiceAccount token".to_string())
        };
        match self {
            Isolate::None => Ok(None),
            Isolate::Namespace => Ok(Some(kube()?.namespace.clone())),
            Isolate::ServiceAccount => {
                let k = kube()?;
                Ok(Some(format!("{}.{}", k.namespace, k.service_account)))
            }
        }
    }

    /// True when isolation needs verified Kubernetes identities.
    pub fn needs_kubernetes(self) -> bool {
        self != Isolate::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kube(ns: &str, sa: &str) -> Identity {
        Identity {
            uid: Some(1000),
            gid: Some(100),
            pid: Some(7),
            pod_uid: None,
            kube: Some(KubeIdentity {
                namespace: ns.into(),
                service_account: sa.into(),
            }),
            kube_error: None,
            pod_labels: None,
            volume_pod: None,
        }
    }

    #[test]
    fn rules_match_all_their_fields() {
        let r = Rule {
            namespace: Some("team-a".into()),
            uid: Some(1000),
            ..Rule::default()
        };
        assert!(r.matches(&kube("team-a", "x")));
        assert!(!r.matches(&kube("team-b", "x")));
        let sa = Rule {
            service_account: Some("team-b/agent".into()),
            ..Rule::default()
        };
        assert!(sa.matches(&kube("team-b", "agent")));
        assert!(!sa.matches(&kube("team-b", "other")));
        assert!(!sa.matches(&kube("team-c", "agent")));
    }

    #[test]
    fn kubernetes_rules_fail_closed_without_a_token() {
        let anon = Identity {
            uid: Some(0),
            gid: Some(0),
            ..Identity::default()
        };
        let r = Rule {
            namespace: Some("team-a".into()),
            ..Rule::default()
        };
        assert!(!r.matches(&anon));
        assert!(!allowed(Some(&[r]), &anon));
        assert!(allowed(None, &anon));
        assert!(allowed(
            Some(&[Rule {
                uid: Some(0),
                ..Rule::default()
            }]),
            &anon
        ));
    }

    #[test]
    fn pod_label_rules_need_the_pod() {
        let r = Rule {
            pod_labels: Some([("app".to_string(), "agent".to_string())].into()),
            ..Rule::default()
        };
        let mut who = kube("team-a", "agent");
        assert!(!r.matches(&who), "no pod found: fail closed");
        who.pod_labels = Some(
            [
                ("app".to_string(), "agent".to_string()),
                ("x".to_string(), "y".to_string()),
            ]
            .into(),
        );
        assert!(r.matches(&who));
        who.pod_labels = Some([("app".to_string(), "other".to_string())].into());
        assert!(!r.matches(&who));
    }

    #[test]
    fn a_volume_pod_is_a_kubernetes_identity_its_pools_only_narrow() {
        let pod = std::sync::Arc::new(VolumePod {
            kube: KubeIdentity {
                namespace: "team-a".into(),
                service_account: "agent".into(),
            },
            name: "agent-0".into(),
            uid: "u1".into(),
            pools: Some(["time".to_string()].into()),
        });
        let who = Identity::of_volume(Identity::default(), pod.clone());
        let r = Rule {
            service_account: Some("team-a/agent".into()),
            ..Rule::default()
        };
        assert!(r.matches(&who));
        assert_eq!(
            Isolate::ServiceAccount.tenant(&who),
            Ok(Some("team-a.agent".into()))
        );
        assert!(pod.permits("time"));
        assert!(!pod.permits("github"));
        assert!(who.to_string().starts_with("pod team-a/agent-0"), "{who}");
    }

    #[test]
    fn rules_are_validated() {
        assert!(Rule::default().validate().is_err());
        let bad = Rule {
            service_account: Some("agent".into()),
            ..Rule::default()
        };
        assert_eq!(bad.validate().unwrap_err().0, "allow.service_account");
    }

    #[test]
    fn tenants() {
        let who = kube("team-a", "agent");
        assert_eq!(Isolate::None.tenant(&who), Ok(None));
        assert_eq!(Isolate::Namespace.tenant(&who), Ok(Some("team-a".into())));
        assert_eq!(
            Isolate::ServiceAccount.tenant(&who),
            Ok(Some("team-a.agent".into()))
        );
        assert!(Isolate::Namespace.tenant(&Identity::default()).is_err());
    }
}
