//! The CSI node plugin, with the tests playing the kubelet: a tonic client
//! calls the Identity and Node services on the plugin socket with the pod
//! info the kubelet sends (`podInfoOnMount`), then the pod's side (the real
//! proxy, or a lease client) connects through the published socket.
#![cfg(feature = "csi")]

#[path = "support/harness.rs"]
mod harness;

use harness::*;
use mcp_broker::config::csi::CsiSettings;
use mcp_broker::csi::proto::identity_client::IdentityClient;
use mcp_broker::csi::proto::node_client::NodeClient;
use mcp_broker::csi::proto::volume_capability as vc;
use mcp_broker::csi::proto::*;
use mcp_broker::csi::volume::{self as vol, SOCKET_NAME};
use mcp_broker::csi::Plugin;
use mcp_broker::jsonrpc::codes;
use mcp_broker::policy::{Isolate, Rule};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::Code;

/// The plugin's side of a test: its settings, a running plugin, and a
/// kubelet-like client.
struct Kubelet {
    settings: CsiSettings,
    dir: tempfile::TempDir,
    plugin: Option<(Plugin, CancellationToken)>,
    node: NodeClient<Channel>,
    identity: IdentityClient<Channel>,
}

async fn channel(path: PathBuf) -> Channel {
    tonic::transport::Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
        .expect("plugin socket reachable")
}

impl Kubelet {
    async fn start(b: &TestBroker) -> Kubelet {
        let dir = tempfile::tempdir().unwrap();
        let settings = CsiSettings {
            endpoint: dir.path().join("plugin/csi.sock"),
            state_dir: dir.path().join("plugin"),
            node_id: "node-1".into(),
            driver_name: "csi.mcp-broker.dev".into(),
        };
        let (plugin, token) = Self::plugin(b, &settings).await;
        let ch = channel(settings.endpoint.clone()).await;
        Kubelet {
            settings,
            dir,
            plugin: Some((plugin, token)),
            node: NodeClient::new(ch.clone()),
            identity: IdentityClient::new(ch),
        }
    }

    async fn plugin(b: &TestBroker, s: &CsiSettings) -> (Plugin, CancellationToken) {
        let token = CancellationToken::new();
        let p = Plugin::start(b.broker.clone(), s.clone(), token.clone())
            .await
            .expect("plugin starts");
        (p, token)
    }

    /// Stops the plugin as broker shutdown does.
    async fn stop(&mut self) {
        let (p, token) = self.plugin.take().expect("running");
        token.cancel();
        tokio::time::timeout(Duration::from_secs(20), p.stopped())
            .await
            .expect("plugin stops");
    }

    /// Starts the plugin again on `b` with the same settings and state.
    async fn restart(&mut self, b: &TestBroker) {
        self.plugin = Some(Self::plugin(b, &self.settings).await);
        let ch = channel(self.settings.endpoint.clone()).await;
        self.node = NodeClient::new(ch.clone());
        self.identity = IdentityClient::new(ch);
    }

    /// Where the kubelet would ask to publish pod `uid`'s volume.
    fn target(&self, uid: &str) -> PathBuf {
        self.dir.path().join(format!("pods/{uid}/mount"))
    }

    async fn publish(&mut self, r: NodePublishVolumeRequest) -> Result<(), tonic::Status> {
        self.node.node_publish_volume(r).await.map(|_| ())
    }

    async fn unpublish(&mut self, volume_id: &str, target: &Path) -> Result<(), tonic::Status> {
        self.node
            .node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: volume_id.into(),
                target_path: target.display().to_string(),
            })
            .await
            .map(|_| ())
    }
}

/// A publish request as the kubelet sends it for an ephemeral inline
/// volume of pod `ns/name` (uid `uid`, service account `sa`), plus `extra`
/// volume attributes from the pod spec.
fn request(
    k: &Kubelet,
    pod: (&str, &str, &str, &str),
    extra: &[(&str, &str)],
) -> NodePublishVolumeRequest {
    request_at(&k.target(pod.2), pod, extra)
}

/// [`request`] for the target path `target`.
fn request_at(
    target: &Path,
    pod: (&str, &str, &str, &str),
    extra: &[(&str, &str)],
) -> NodePublishVolumeRequest {
    let (ns, name, uid, sa) = pod;
    let mut ctx: std::collections::HashMap<String, String> = [
        (vol::POD_NAMESPACE, ns),
        (vol::POD_NAME, name),
        (vol::POD_UID, uid),
        (vol::SERVICE_ACCOUNT, sa),
        (vol::EPHEMERAL, "true"),
    ]
    .iter()
    .chain(extra)
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    ctx.retain(|_, v| !v.is_empty());
    NodePublishVolumeRequest {
        volume_id: format!("csi-{uid}"),
        target_path: target.display().to_string(),
        volume_capability: Some(VolumeCapability {
            access_mode: Some(vc::AccessMode {
                mode: vc::access_mode::Mode::SingleNodeWriter as i32,
            }),
            access_type: Some(vc::AccessType::Mount(vc::MountVolume::default())),
        }),
        readonly: false,
        volume_context: ctx,
        ..Default::default()
    }
}

const POD_A: (&str, &str, &str, &str) = ("team-a", "agent-0", "uid-a", "agent");
const POD_B: (&str, &str, &str, &str) = ("team-b", "agent-0", "uid-b", "agent");

/// A lease client on pod `uid`'s socket.
fn pod_client(k: &Kubelet, uid: &str, pool: &str) -> mcp_broker::proxy::backend::Backend {
    pod_backend(&k.target(uid), pool)
}

/// A lease client on the socket in volume directory `target`.
fn pod_backend(target: &Path, pool: &str) -> mcp_broker::proxy::backend::Backend {
    mcp_broker::proxy::backend::Backend::new(
        target.join(SOCKET_NAME),
        pool.into(),
        16 << 20,
        std::sync::Arc::new(mcp_broker::metrics::Metrics::new()),
    )
}

async fn whoami(c: &mcp_broker::proxy::backend::Backend) -> Value {
    let (status, msgs) = lease(c, &tool(1, "whoami", json!({})), None).await;
    let last = msgs.last().cloned().unwrap_or(Value::Null);
    assert!(
        status == 200 || last.get("error").is_some(),
        "{status} {last}"
    );
    last
}

/// Leases `whoami` expecting the policy error; returns its message.
async fn denied(c: &mcp_broker::proxy::backend::Backend) -> String {
    let r = whoami(c).await;
    assert_eq!(code_of(&r), codes::NOT_ALLOWED, "{r}");
    r["error"]["message"].as_str().unwrap().to_string()
}

/// Leases `whoami` expecting an answer; returns the answering pid.
async fn served(c: &mcp_broker::proxy::backend::Backend) -> u32 {
    pid_of(&text_of(&whoami(c).await))
}

/// A broker with `pools` and the plugin on it.
async fn start(pools: Vec<mcp_broker::config::PoolConfig>) -> (TestBroker, Kubelet) {
    let b = TestBroker::start(pools).await;
    let k = Kubelet::start(&b).await;
    (b, k)
}

/// Stops the plugin, then the broker (which checks no process is left).
async fn stop_all(mut k: Kubelet, b: TestBroker) {
    k.stop().await;
    b.stop().await;
}

fn namespace_pool(name: &str, ns: &str) -> mcp_broker::config::PoolConfig {
    let mut p = fixture_pool(name, &[]);
    p.allow = Some(vec![Rule {
        namespace: Some(ns.into()),
        ..Rule::default()
    }]);
    p
}

#[tokio::test]
async fn a_published_socket_serves_its_pod_as_the_kubelet_named_it() {
    let mut sa = fixture_pool("per-sa", &[]);
    sa.isolate = Isolate::ServiceAccount;
    sa.min_idle = 0;
    let (b, mut k) = start(vec![
        namespace_pool("time", "team-a"),
        namespace_pool("github", "team-b"),
        sa,
    ])
    .await;
    let (mut id, mut id2) = (k.identity.clone(), k.identity.clone());
    let (mut node, mut node2) = (k.node.clone(), k.node.clone());
    let (info, probe, node_info, caps) = tokio::try_join!(
        id.get_plugin_info(GetPluginInfoRequest {}),
        id2.probe(ProbeRequest {}),
        node.node_get_info(NodeGetInfoRequest {}),
        node2.node_get_capabilities(NodeGetCapabilitiesRequest {}),
    )
    .unwrap();
    assert_eq!(info.into_inner().name, "csi.mcp-broker.dev");
    assert_eq!(probe.into_inner().ready, Some(true));
    assert_eq!(node_info.into_inner().node_id, "node-1");
    let caps = caps.into_inner();
    assert!(caps.capabilities.is_empty(), "no stage/unstage");

    let r = request(&k, POD_A, &[]);
    k.publish(r).await.unwrap();
    let r = request(&k, POD_B, &[]);
    k.publish(r).await.unwrap();
    let sock = k.target("uid-a").join(SOCKET_NAME);
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let meta = std::fs::metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o666);

    // The real proxy, pointed at pod A's socket, leases from "time"
    // (allowed for namespace team-a) with no token.
    b.wait_idle("time", 1).await;
    let px = TestProxy::start_with(&sock, "time", |_| {}).await;
    let s = initialize(&px.url, "2025-06-18", json!({})).await;
    let r = send(
        "POST",
        &px.url,
        &[JSON_SSE, CT_JSON, ("mcp-session-id", &s)],
        &tool(1, "whoami", json!({})).to_string(),
    )
    .await
    .json();
    assert!(text_of(&r).starts_with("pid="), "{r}");
    px.stop().await;

    // "github" allows team-b only: pod A gets the policy error naming it;
    // pod B, on its own socket, is served.
    let msg = denied(&pod_client(&k, "uid-a", "github")).await;
    assert!(msg.contains("pod team-a/agent-0"), "{msg}");
    b.wait_idle("github", 1).await;
    served(&pod_client(&k, "uid-b", "github")).await;
    denied(&pod_client(&k, "uid-b", "time")).await;

    // `isolate = "service_account"`: the two pods get separate processes.
    let a = served(&pod_client(&k, "uid-a", "per-sa")).await;
    let b2 = served(&pod_client(&k, "uid-b", "per-sa")).await;
    assert_ne!(a, b2, "two service accounts share no process");
    assert!(
        b.broker.pool("per-sa@team-a.agent").is_none(),
        "tenants are not top-level pools"
    );
    let m = b.metrics.render();
    assert!(m.contains("per-sa@team-a.agent"), "tenant pool of pod A");
    assert!(m.contains("per-sa@team-b.agent"), "tenant pool of pod B");

    k.unpublish("csi-uid-a", &k.target("uid-a")).await.unwrap();
    k.unpublish("csi-uid-b", &k.target("uid-b")).await.unwrap();
    stop_all(k, b).await;
}

#[tokio::test]
async fn volume_pools_only_narrow_what_policy_allows() {
    let (b, mut k) = start(vec![
        namespace_pool("time", "team-a"),
        namespace_pool("echo", "team-a"),
        namespace_pool("github", "team-b"),
    ])
    .await;
    let r = request(&k, POD_A, &[("pools", "time,github")]);
    k.publish(r).await.unwrap();
    b.wait_idle("time", 1).await;
    served(&pod_client(&k, "uid-a", "time")).await;
    // Allowed by policy, not listed by the volume.
    let msg = denied(&pod_client(&k, "uid-a", "echo")).await;
    assert!(msg.contains("CSI volume allows only"), "{msg}");
    // Listed by the volume, not allowed by policy: still denied.
    denied(&pod_client(&k, "uid-a", "github")).await;
    // A pool the broker does not have, or an unknown attribute: refused.
    let bad = request(&k, POD_B, &[("pools", "nope")]);
    let e = k.publish(bad).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("\"nope\""), "{e:?}");
    let bad = request(&k, POD_B, &[("pool", "time")]);
    assert_eq!(
        k.publish(bad).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert!(
        !k.target("uid-b").exists(),
        "a refused publish creates nothing"
    );
    k.unpublish("csi-uid-a", &k.target("uid-a")).await.unwrap();
    stop_all(k, b).await;
}

#[tokio::test]
async fn publish_and_unpublish_follow_the_spec() {
    let (b, mut k) = start(vec![namespace_pool("time", "team-a")]).await;
    let a = request(&k, POD_A, &[]);

    // Missing arguments.
    for (what, r) in [
        (
            "volume_id",
            NodePublishVolumeRequest {
                volume_id: String::new(),
                ..a.clone()
            },
        ),
        (
            "target_path",
            NodePublishVolumeRequest {
                target_path: String::new(),
                ..a.clone()
            },
        ),
        (
            "volume_capability",
            NodePublishVolumeRequest {
                volume_capability: None,
                ..a.clone()
            },
        ),
    ] {
        let e = k.publish(r).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
        assert!(e.message().contains(what), "{e:?}");
    }
    let no_pod_info = request(&k, ("team-a", "", "uid-a", "agent"), &[]);
    let e = k.publish(no_pod_info).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("podInfoOnMount"), "{e:?}");

    // Publish twice: the same arguments are OK (and change nothing), others
    // at the same path ALREADY_EXISTS, another path FAILED_PRECONDITION.
    k.publish(a.clone()).await.unwrap();
    k.publish(a.clone()).await.unwrap();
    let other_args = NodePublishVolumeRequest {
        readonly: true,
        ..a.clone()
    };
    assert_eq!(
        k.publish(other_args).await.unwrap_err().code(),
        Code::AlreadyExists
    );
    let other_path = NodePublishVolumeRequest {
        target_path: k.target("elsewhere").display().to_string(),
        ..a.clone()
    };
    assert_eq!(
        k.publish(other_path).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    let same_path_other_id = NodePublishVolumeRequest {
        volume_id: "csi-other".into(),
        ..a.clone()
    };
    assert_eq!(
        k.publish(same_path_other_id).await.unwrap_err().code(),
        Code::AlreadyExists
    );
    b.wait_idle("time", 1).await;
    served(&pod_client(&k, "uid-a", "time")).await;

    // Unpublish: missing arguments, another volume's path, then twice.
    let e = k.unpublish("", &k.target("uid-a")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = k.unpublish("csi-uid-a", Path::new("")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = k
        .unpublish("csi-other", &k.target("uid-a"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(
        k.target("uid-a").join(SOCKET_NAME).exists(),
        "another id touches nothing"
    );
    k.unpublish("csi-uid-a", &k.target("uid-a")).await.unwrap();
    assert!(!k.target("uid-a").exists(), "socket and directory removed");
    k.unpublish("csi-uid-a", &k.target("uid-a")).await.unwrap();
    let gone = pod_client(&k, "uid-a", "time")
        .lease(&tool(1, "whoami", json!({})), None, "x")
        .await;
    assert!(gone.is_err(), "nothing listens after unpublish");

    // The stage/stats/expand RPCs are not offered.
    let e = k
        .node
        .node_stage_volume(NodeStageVolumeRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented);
    stop_all(k, b).await;
}

#[tokio::test]
async fn unpublish_ends_the_pods_leases() {
    let mut p = namespace_pool("held", "team-a");
    p.min_idle = 1;
    p.max = 1;
    let (b, mut k) = start(vec![p]).await;
    let r = request(&k, POD_A, &[]);
    k.publish(r).await.unwrap();
    b.wait_idle("held", 1).await;
    let c = pod_client(&k, "uid-a", "held");
    let mut held = Held::start(&c, 7).await;
    assert_eq!(
        b.broker.pool("held").unwrap().status().idle,
        0,
        "the lease holds the process"
    );
    k.unpublish("csi-uid-a", &k.target("uid-a")).await.unwrap();
    // The pod's connection is gone: its lease ends, its process is free.
    let next = tokio::time::timeout(Duration::from_secs(10), held.lease.lines.next())
        .await
        .expect("the lease ends");
    assert!(!matches!(next, Some(Ok(_))), "no more messages: {next:?}");
    b.wait_idle("held", 1).await;
    stop_all(k, b).await;
}

#[tokio::test]
async fn a_restarted_broker_serves_published_sockets_again() {
    let team_b_only = namespace_pool("github", "team-b");
    let (b, mut k) = start(vec![namespace_pool("time", "team-a"), team_b_only]).await;
    let r = request(&k, POD_A, &[]);
    k.publish(r).await.unwrap();
    let r = request(&k, POD_B, &[]);
    k.publish(r).await.unwrap();
    b.wait_idle("time", 1).await;
    served(&pod_client(&k, "uid-a", "time")).await;

    k.stop().await;
    assert!(
        k.target("uid-a").join(SOCKET_NAME).exists(),
        "the socket stays for the next broker"
    );
    // Pod B goes while no broker runs: the kubelet cleaned its directory.
    std::fs::remove_dir_all(k.target("uid-b")).unwrap();
    let b = b.restart_after(Duration::ZERO).await;
    k.restart(&b).await;

    b.wait_idle("time", 1).await;
    served(&pod_client(&k, "uid-a", "time")).await;
    // Still pod A's identity: the team-b pool refuses it by name.
    let msg = denied(&pod_client(&k, "uid-a", "github")).await;
    assert!(msg.contains("pod team-a/agent-0"), "{msg}");
    let state = std::fs::read_to_string(k.settings.state_dir.join("volumes.json")).unwrap();
    assert!(
        state.contains("csi-uid-a") && !state.contains("csi-uid-b"),
        "{state}"
    );
    // The dropped volume's unpublish is still OK (idempotent).
    k.unpublish("csi-uid-b", &k.target("uid-b")).await.unwrap();
    k.unpublish("csi-uid-a", &k.target("uid-a")).await.unwrap();
    stop_all(k, b).await;
}

/// `mcp-broker serve` with `config`, its output discarded.
fn spawn_serve(config: &Path) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_mcp-broker"))
        .args(["serve", "--config"])
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// SIGTERM, then waits (bounded) for a clean exit.
async fn sigterm(mut child: std::process::Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let mut status = None;
    wait_until(Duration::from_secs(20), || {
        status = child.try_wait().unwrap();
        status.is_some()
    })
    .await;
    assert!(status.unwrap().success(), "{status:?}");
}

/// The daemon as deployed: `[csi]` in its config file turns the plugin on,
/// and a restart of the process (an upgrade) keeps a pod's socket working.
#[tokio::test]
async fn the_daemon_serves_csi_from_its_config_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let (config, endpoint) = daemon_config(dir.path(), &tag);
    let target = dir.path().join("pods/uid-a/mount");
    let pod = pod_backend(&target, "time");

    let daemon = spawn_serve(&config);
    wait_until(Duration::from_secs(10), || {
        std::os::unix::net::UnixStream::connect(&endpoint).is_ok()
    })
    .await;
    let mut node = NodeClient::new(channel(endpoint.clone()).await);
    let info = node.node_get_info(NodeGetInfoRequest {}).await.unwrap();
    assert_eq!(info.into_inner().node_id, "node-9");
    node.node_publish_volume(request_at(&target, POD_A, &[]))
        .await
        .unwrap();
    let first = served(&pod).await;
    sigterm(daemon).await;
    assert!(target.join(SOCKET_NAME).exists(), "the pod's socket stays");
    assert_no_procs(&tag).await;
    let daemon = spawn_serve(&config);
    wait_until(Duration::from_secs(10), || {
        std::os::unix::net::UnixStream::connect(&endpoint).is_ok()
    })
    .await;
    let again = served(&pod).await;
    assert_ne!(first, again, "a new broker's process answered");
    // Still pod A, as the kubelet named it before the restart.
    let msg = denied(&pod_backend(&target, "github")).await;
    assert!(msg.contains("pod team-a/agent-0"), "{msg}");
    unpublish_and_stop(&endpoint, &target, daemon, &tag).await;
}

/// Unpublishes pod A's volume through the daemon's endpoint (its socket
/// directory goes), then stops the daemon: nothing of the test is left.
async fn unpublish_and_stop(
    endpoint: &Path,
    target: &Path,
    daemon: std::process::Child,
    tag: &str,
) {
    let mut node = NodeClient::new(channel(endpoint.to_path_buf()).await);
    node.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: "csi-uid-a".into(),
        target_path: target.display().to_string(),
    })
    .await
    .unwrap();
    assert!(!target.exists());
    sigterm(daemon).await;
    assert_no_procs(tag).await;
}

/// `[csi]` daemon config in `dir` (endpoint under `dir/plugin`); returns
/// the config file and the endpoint.
fn daemon_config(dir: &Path, tag: &str) -> (PathBuf, PathBuf) {
    let endpoint = dir.join("plugin/csi.sock");
    let config = dir.join("broker.toml");
    std::fs::write(
        &config,
        format!(
            "[broker]\nsocket = \"{}\"\nmetrics_listen = \"\"\ndrain_timeout = \"2s\"\n\
             [csi]\nendpoint = \"{}\"\nstate_dir = \"{}\"\nnode_id = \"node-9\"\n\
             [[pool]]\nname = \"time\"\ncommand = \"{}\"\nmin_idle = 1\n\
             allow = [{{ namespace = \"team-a\" }}]\nenv = {{ {TAG_VAR} = \"{tag}\" }}\n\
             [[pool]]\nname = \"github\"\ncommand = \"{}\"\nmin_idle = 0\n\
             allow = [{{ namespace = \"team-b\" }}]\n",
            dir.join("b.sock").display(),
            endpoint.display(),
            dir.join("plugin").display(),
            env!("CARGO_BIN_EXE_mcp-fixture"),
            env!("CARGO_BIN_EXE_mcp-fixture"),
        ),
    )
    .unwrap();
    (config, endpoint)
}

/// A take-over by a new broker (a DaemonSet rollout with maxSurge) keeps the
/// CSI endpoint and a pod's socket working: the new broker binds both anew,
/// and the old one, leaving, does not remove the new broker's files.
#[tokio::test]
async fn a_take_over_keeps_the_plugin_and_the_pods_socket() {
    let dir = tempfile::tempdir().unwrap();
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let (config, endpoint) = daemon_config(dir.path(), &tag);
    let target = dir.path().join("pods/uid-a/mount");
    let pod = pod_backend(&target, "time");
    let mut old = spawn_serve(&config);
    wait_until(Duration::from_secs(10), || {
        std::os::unix::net::UnixStream::connect(&endpoint).is_ok()
    })
    .await;
    let mut node = NodeClient::new(channel(endpoint.clone()).await);
    node.node_publish_volume(request_at(&target, POD_A, &[]))
        .await
        .unwrap();
    served(&pod).await;

    let new = spawn_serve(&config);
    // The old broker hands its listeners over, drains and exits.
    let mut status = None;
    wait_until(Duration::from_secs(30), || {
        status = old.try_wait().unwrap();
        status.is_some()
    })
    .await;
    assert!(status.unwrap().success(), "{status:?}");
    assert!(endpoint.exists(), "the new broker's endpoint is left alone");
    served(&pod).await;
    let msg = denied(&pod_backend(&target, "github")).await;
    assert!(msg.contains("pod team-a/agent-0"), "{msg}");
    let mut node = NodeClient::new(channel(endpoint.clone()).await);
    let info = node.node_get_info(NodeGetInfoRequest {}).await.unwrap();
    assert_eq!(info.into_inner().node_id, "node-9");
    unpublish_and_stop(&endpoint, &target, new, &tag).await;
}
