//! How a starting broker gets its listening sockets: from its previous
//! image (an in-place upgrade), from systemd (socket activation), by
//! binding, or by taking them over from the broker already serving the
//! path, after warming its own pools so no request meets a cold start.
//!
//! A take-over the old broker refuses (another handoff version, no control
//! socket: an older broker) falls back to the behaviour before take-overs
//! existed: the new broker stops its processes and exits, saying why.

use super::control::{self, HandoffError, Taken};
use super::registry::{Listeners, CONTROL, LEASE};
use super::upgrade::{self, Inherited};
use crate::broker::socket::{self, ListenError};
use crate::broker::Broker;
use crate::config::BrokerSettings;
use crate::pool::adopt::PoolState;
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What a starting broker found.
pub enum Opened {
    /// Listeners it holds (bound, from systemd, or from its previous
    /// image), the paths it removes at exit, and pool states to adopt.
    Ready {
        listeners: Listeners,
        remove_at_exit: Vec<PathBuf>,
        previous: Vec<PoolState>,
        upgraded: Option<Box<Inherited>>,
    },
    /// Another broker serves the socket: warm up, then take over.
    InUse,
}

/// Why a broker could not get its sockets.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Listen(#[from] ListenError),
    #[error("{0}")]
    Upgrade(#[from] upgrade::UpgradeError),
    #[error("another broker is already listening on {path} and the take-over failed: {why}")]
    Refused { path: String, why: HandoffError },
}

/// Opens the broker's listeners: previous image, systemd, or bind.
pub fn open(settings: &BrokerSettings) -> Result<Opened, StartError> {
    if let Some(up) = upgrade::inherited()? {
        return Ok(Opened::Ready {
            listeners: up.listeners.clone(),
            remove_at_exit: up.remove_at_exit.clone(),
            previous: up.pools.clone(),
            upgraded: Some(Box::new(up)),
        });
    }
    let (mode, group) = (settings.socket_mode, settings.socket_group.as_deref());
    let mut listeners = Listeners::default();
    let mut remove_at_exit = Vec::new();
    let path = match socket::inherited()? {
        Some(l) => {
            tracing::info!("using the lease API socket passed by systemd (socket activation)");
            let path = l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(PathBuf::from))
                .unwrap_or_else(|| settings.socket.clone());
            listeners.insert(LEASE, l);
            path
        }
        None => match socket::bind(&settings.socket, mode, group) {
            Ok(l) => {
                listeners.insert(LEASE, l);
                remove_at_exit.push(settings.socket.clone());
                settings.socket.clone()
            }
            Err(ListenError::InUse(_)) => return Ok(Opened::InUse),
            Err(e) => return Err(e.into()),
        },
    };
    match control::bind(&path) {
        Ok(l) => {
            listeners.insert(CONTROL, l);
            remove_at_exit.push(control::path_for(&path));
        }
        Err(e) => tracing::warn!("no control socket (no take-over or upgrade): {e}"),
    }
    Ok(Opened::Ready {
        listeners,
        remove_at_exit,
        previous: Vec::new(),
        upgraded: None,
    })
}

/// Waits until every pool has `min_idle` warm processes, `limit` passes or
/// `shutdown` fires; true when warm.
pub async fn warm(broker: &Broker, limit: Duration, shutdown: &CancellationToken) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let warm = broker
            .pools()
            .iter()
            .all(|p| p.status().idle >= p.config().min_idle);
        if warm {
            return true;
        }
        if shutdown.is_cancelled() || tokio::time::Instant::now() >= deadline {
            return false;
        }
        // Bounded poll of the pools' counts while they warm.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Warms `broker`'s pools, then takes the listeners of the broker serving
/// `settings.socket` over. On failure the caller drains `broker`.
pub async fn take_over(
    broker: &Broker,
    settings: &BrokerSettings,
    shutdown: &CancellationToken,
) -> Result<(Taken, Vec<PathBuf>), StartError> {
    let path = settings.socket.clone();
    let limit = broker
        .pools()
        .iter()
        .map(|p| p.config().init_timeout)
        .max()
        .unwrap_or_default();
    tracing::info!(socket = %path.display(), "another broker serves this socket: warming up before taking over");
    let started = std::time::Instant::now();
    if !warm(broker, limit, shutdown).await && !shutdown.is_cancelled() {
        tracing::warn!("pools not fully warm after {limit:?}; taking over anyway");
    }
    let refused = |why| StartError::Refused {
        path: path.display().to_string(),
        why,
    };
    if shutdown.is_cancelled() {
        return Err(refused(HandoffError::Refused("shutting down".into())));
    }
    let asked = std::time::Instant::now();
    let taken = control::take_over(&path).await.map_err(refused)?;
    if taken.listeners.get(LEASE).is_none() {
        return Err(refused(HandoffError::Unexpected(
            "no lease listener among the sockets passed".into(),
        )));
    }
    tracing::info!(warmed_in = ?asked.duration_since(started), handoff_in = ?asked.elapsed(), names = ?taken.listeners.names(), "took the listening sockets over");
    Ok((taken, vec![path.clone(), control::path_for(&path)]))
}
