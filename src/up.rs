//! `mcp-broker up`: a broker and a proxy in one process: one command as a
//! pool (`up -- CMD`), or every pool of a config file (`up --config FILE`,
//! each at `/servers/NAME/mcp`).
//!
//! The broker listens on a private socket in a fresh temporary directory;
//! the proxy calls the broker's lease API in-process ([`crate::lease_api::LocalApi`],
//! served by [`crate::broker::local`]):
//! the same requests and the same handler as a sidecar's over the socket,
//! without the socket round trip.

use crate::broker::{socket, Broker};
use crate::config::{BrokerSettings, Config, PoolConfig};
use crate::metrics::Metrics;
use crate::proxy::{self, ProxySettings};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Name of the single pool `up` creates.
pub const POOL_NAME: &str = "default";

/// Runs broker and proxy for `pools` until `shutdown`, then drains both.
/// Of `broker`, the socket and the metrics listener are replaced (a private
/// socket; health and metrics are the proxy's).
pub async fn run(
    pools: Vec<PoolConfig>,
    broker: BrokerSettings,
    mut proxy: ProxySettings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    for p in &pools {
        p.check()?;
    }
    let names: Vec<String> = pools.iter().map(|p| p.name.clone()).collect();
    let dir = tempfile_dir()?;
    let socket = dir.join("broker.sock");
    let metrics = Arc::new(Metrics::new());
    let settings = BrokerSettings {
        socket: socket.clone(),
        metrics_listen: None,
        ..broker
    };
    let broker = Broker::start(
        Config {
            broker: settings,
            pools,
        },
        metrics.clone(),
    );
    let listener = socket::bind(&socket, 0o600, None)?;
    proxy.local = Some(Arc::new(crate::broker::local::Local::new(broker.clone())));
    let broker_done = CancellationToken::new();
    let serve = tokio::spawn(broker.serve(listener, Some(socket.clone()), broker_done.clone()));
    proxy.socket = socket;
    let result = proxy::run_many(proxy, names, metrics, shutdown.clone()).await;
    // The proxy has drained its clients; now the broker drains its leases.
    broker_done.cancel();
    let _ = serve.await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(std::path::PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!(
        "mcp-broker-up-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    Ok(dir)
}
