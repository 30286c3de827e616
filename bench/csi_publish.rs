//! CSI publish latency: from the kubelet's `NodePublishVolume` call to its
//! answer, which the plugin sends only once the pod's socket listens (and
//! the state file is synced); side by side with the unpublish that follows
//! and with a bare bind+listen of a Unix socket (the floor).

use criterion::{criterion_group, criterion_main, Criterion};
use mcp_broker::broker::Broker;
use mcp_broker::config::csi::CsiSettings;
use mcp_broker::config::{BrokerSettings, Config};
use mcp_broker::csi::proto::node_client::NodeClient;
use mcp_broker::csi::proto::volume_capability as vc;
use mcp_broker::csi::proto::*;
use mcp_broker::csi::volume as vol;
use mcp_broker::metrics::Metrics;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

fn request(target: &std::path::Path) -> NodePublishVolumeRequest {
    let ctx = [
        (vol::POD_NAMESPACE, "team-a"),
        (vol::POD_NAME, "agent-0"),
        (vol::POD_UID, "uid-a"),
        (vol::SERVICE_ACCOUNT, "agent"),
        (vol::EPHEMERAL, "true"),
    ];
    NodePublishVolumeRequest {
        volume_id: "csi-bench".into(),
        target_path: target.display().to_string(),
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

fn publish(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("pods/uid-a/mount");
    let settings = CsiSettings {
        endpoint: dir.path().join("plugin/csi.sock"),
        state_dir: dir.path().join("plugin"),
        node_id: "bench".into(),
        driver_name: "csi.mcp-broker.dev".into(),
    };
    let shutdown = CancellationToken::new();
    let mut node = rt.block_on(async {
        let broker = Broker::start(
            Config {
                broker: BrokerSettings {
                    metrics_listen: None,
                    ..BrokerSettings::default()
                },
                pools: vec![],
            },
            Arc::new(Metrics::new()),
        );
        let _plugin = mcp_broker::csi::Plugin::start(broker, settings.clone(), shutdown.clone())
            .await
            .expect("plugin");
        let path = settings.endpoint.clone();
        let ch = tonic::transport::Endpoint::try_from("http://[::]:50051")
            .expect("uri")
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }))
            .await
            .expect("plugin socket");
        NodeClient::new(ch)
    });
    let unpublish = NodeUnpublishVolumeRequest {
        volume_id: "csi-bench".into(),
        target_path: target.display().to_string(),
    };
    let mut g = c.benchmark_group("csi");
    g.bench_function("NodePublishVolume until the pod socket listens", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    node.node_publish_volume(request(&target))
                        .await
                        .expect("publish");
                    total += start.elapsed();
                    // Listening: a pod could connect now.
                    drop(
                        tokio::net::UnixStream::connect(target.join(vol::SOCKET_NAME))
                            .await
                            .expect("socket listens"),
                    );
                    node.node_unpublish_volume(unpublish.clone())
                        .await
                        .expect("unpublish");
                }
                total
            })
        })
    });
    g.bench_function("NodePublishVolume + NodeUnpublishVolume", |b| {
        b.to_async(&rt).iter(|| {
            let mut node = node.clone();
            let (p, u) = (request(&target), unpublish.clone());
            async move {
                node.node_publish_volume(p).await.expect("publish");
                node.node_unpublish_volume(u).await.expect("unpublish");
            }
        })
    });
    g.bench_function("floor: bind + listen + close a Unix socket", |b| {
        let floor = dir.path().join("floor");
        b.iter(|| {
            let _ = std::fs::remove_file(&floor);
            drop(std::os::unix::net::UnixListener::bind(&floor).expect("bind"));
        })
    });
    g.finish();
    shutdown.cancel();
}

criterion_group!(benches, publish);
criterion_main!(benches);
