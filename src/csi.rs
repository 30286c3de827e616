//! The broker as a CSI node plugin for ephemeral inline volumes: each pod
//! that mounts a `csi:` volume of this driver gets a socket of its own, and
//! every connection on it is that pod (namespace, service account, name,
//! uid as the kubelet named them; docs/kubernetes.md).
//!
//! Layout: [`identity`] and [`node`] are the two gRPC services served on
//! the plugin endpoint; [`volume`] checks what a publish carries;
//! [`registry`] owns the per-pod listeners; [`state`] records published
//! volumes so [`Plugin::start`] restores them after a restart.
//!
//! Invariants: the pods' sockets are served by the same [`Broker`] as the
//! node socket, so policy, isolation, draining and metrics are the same;
//! on broker shutdown the plugin stops answering and the pods' sockets stop
//! accepting, but volumes stay recorded and their sockets in place: the
//! next broker serves them again. A recorded volume whose target path is
//! gone (the pod went while no broker ran) is dropped at start.

mod identity;
mod node;
pub mod proto;
pub mod registry;
pub mod state;
pub mod volume;

use crate::broker::Broker;
use crate::config::csi::CsiSettings;
use registry::Registry;
use state::State;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

/// Why the plugin could not start.
#[derive(Debug, thiserror::Error)]
pub enum CsiError {
    #[error("CSI endpoint: {0}")]
    Endpoint(#[from] crate::broker::socket::ListenError),
    #[error("CSI state: {0}")]
    State(#[from] state::StateError),
}

/// A running plugin.
pub struct Plugin {
    /// The pods' listeners.
    pub registry: Arc<Registry>,
    server: tokio::task::JoinHandle<()>,
}

/// Mode of the plugin endpoint: the kubelet and the registrar run as root.
const ENDPOINT_MODE: u32 = 0o600;

impl Plugin {
    /// Restores the recorded volumes, binds the endpoint and serves the
    /// Identity and Node services on it until `shutdown`.
    pub async fn start(
        broker: Arc<Broker>,
        settings: CsiSettings,
        shutdown: CancellationToken,
    ) -> Result<Plugin, CsiError> {
        let state = Arc::new(State::open(&settings.state_dir)?);
        let registry = Arc::new(Registry::new(broker.clone(), shutdown.clone()));
        restore(&state, &registry)?;
        // This broker holds the lease socket already (bound, or taken over
        // from a broker that is now draining): the endpoint is ours, even
        // if the old broker still listens on the file it bound.
        let _ = std::fs::remove_file(&settings.endpoint);
        let listener = crate::broker::socket::bind(&settings.endpoint, ENDPOINT_MODE, None)?;
        let node = node::NodeService {
            broker: broker.clone(),
            registry: registry.clone(),
            state,
            node_id: settings.node_id.clone(),
            ops: Default::default(),
        };
        let ident = identity::IdentityService {
            broker,
            driver_name: settings.driver_name.clone(),
        };
        tracing::info!(
            endpoint = %settings.endpoint.display(),
            driver = settings.driver_name,
            node = settings.node_id,
            volumes = registry.len(),
            "CSI node plugin listening"
        );
        let bound = std::fs::metadata(&settings.endpoint).ok().map(|m| m.ino());
        let server = tokio::spawn(serve(bound, listener, settings, ident, node, shutdown));
        Ok(Plugin { registry, server })
    }

    /// Waits for the plugin to stop after shutdown: the endpoint closed,
    /// the pods' connections finished (bounded).
    pub async fn stopped(self) {
        let _ = self.server.await;
        self.registry.wait_stopped().await;
    }
}

async fn serve(
    bound: Option<u64>,
    listener: UnixListener,
    settings: CsiSettings,
    ident: identity::IdentityService,
    node: node::NodeService,
    shutdown: CancellationToken,
) {
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let served = tonic::transport::Server::builder()
        .add_service(proto::identity_server::IdentityServer::new(ident))
        .add_service(proto::node_server::NodeServer::new(node))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
        .await;
    if let Err(e) = served {
        tracing::error!("CSI endpoint failed: {e}");
    }
    // Only our own socket file: after a take-over the path is the new
    // broker's, which the kubelet is using.
    if std::fs::metadata(&settings.endpoint).is_ok_and(|m| Some(m.ino()) == bound) {
        let _ = std::fs::remove_file(&settings.endpoint);
    }
}

/// Serves every recorded volume whose target path still exists; forgets
/// the others and saves what remains.
fn restore(state: &State, registry: &Registry) -> Result<(), CsiError> {
    let recorded = state.load()?;
    let n = recorded.len();
    for v in recorded {
        if !v.target_path.is_dir() {
            tracing::info!(volume = v.volume_id, target = %v.target_path.display(),
                "target path gone while no broker ran: volume dropped");
            continue;
        }
        let id = v.volume_id.clone();
        if let Err(e) = registry.open(v) {
            tracing::warn!(volume = id, "cannot restore the pod socket: {e}");
        }
    }
    if registry.len() != n {
        state.save(registry.volumes())?;
    }
    tracing::info!(
        restored = registry.len(),
        dropped = n - registry.len(),
        "CSI volumes restored"
    );
    Ok(())
}
