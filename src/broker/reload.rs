//! Picking up config changes without a restart.
//!
//! [`watch`] re-reads the config file on SIGHUP and whenever its content
//! changes (polled, so it also sees Kubernetes ConfigMap updates, which swap
//! a symlink rather than write the file). A valid new config reconciles the
//! pools through [`super::Broker::reload`]; an invalid one is logged with the
//! field it names and the running pools stay as they are. Daemon-wide
//! `[broker]` settings (socket, metrics address, …) need a restart; a change
//! to them is reported, not applied.

use super::Broker;
use crate::config::Config;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often the config file is checked for changes.
pub const DEFAULT_POLL: Duration = Duration::from_secs(2);

/// What a reload did, by pool name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    pub unchanged: Vec<String>,
}

/// Watches `path` until `shutdown`, reloading on change or SIGHUP.
/// `loaded` is the content the running pools came from. `hup` is notified
/// on SIGHUP by the signal thread (`shutdown::start`); without it the
/// watcher installs tokio's handler.
pub async fn watch(
    broker: Arc<Broker>,
    path: PathBuf,
    loaded: Vec<u8>,
    poll: Duration,
    shutdown: CancellationToken,
    hup_notify: Option<Arc<tokio::sync::Notify>>,
) {
    let mut hup = match hup_notify {
        Some(_) => None,
        None => tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok(),
    };
    let mut last = Some(loaded);
    loop {
        let forced = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(poll) => false,
            _ = async {
                match (&hup_notify, hup.as_mut()) {
                    (Some(n), _) => n.notified().await,
                    (None, Some(h)) => { h.recv().await; }
                    (None, None) => std::future::pending::<()>().await,
                }
            } => true,
        };
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(path = %path.display(), "cannot read config for reload: {e}");
                continue;
            }
        };
        if !forced && last.as_deref() == Some(&text[..]) {
            continue;
        }
        last = Some(text.clone());
        apply(&broker, &String::from_utf8_lossy(&text));
    }
}

/// Validates `text` and reconciles the broker's pools with it.
pub fn apply(broker: &Broker, text: &str) -> Option<Summary> {
    let metrics = broker.metrics();
    let cfg = match Config::from_toml(text) {
        Ok(c) => c,
        Err(e) => {
            metrics.config_reloads.with_label_values(&["invalid"]).inc();
            tracing::error!("config reload refused, keeping the running pools: {e}");
            return None;
        }
    };
    if cfg.broker != *broker.settings() {
        tracing::warn!("[broker] settings changed; they take effect at the next restart");
    }
    let summary = broker.reload(cfg.pools);
    metrics.config_reloads.with_label_values(&["applied"]).inc();
    tracing::info!(
        added = ?summary.added,
        removed = ?summary.removed,
        changed = ?summary.changed,
        "config reloaded"
    );
    Some(summary)
}
