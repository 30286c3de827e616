//! The serving broker's life between start and exit: accept on the lease
//! socket, answer the control socket, and end in one of three ways.
//!
//! * Shutdown (SIGTERM/SIGINT): stop accepting, remove the socket paths we
//!   own, drain in-flight leases (bounded by `drain_timeout`), stop every
//!   process.
//! * Handed off (a new broker acknowledged our listeners): stop accepting,
//!   leave the paths (the new broker serves them), let open connections end
//!   after their next answer, then drain as above.
//! * Upgrade (`mcp-broker upgrade` or SIGUSR2): stop accepting (new
//!   connections wait in the backlog), freeze the pools, let connections
//!   and leases finish (bounded), then re-execute; if anything fails the
//!   broker thaws and serves on, and the requester hears why.

use super::control::{self, Event};
use super::registry::{Listeners, CONTROL, LEASE};
use super::upgrade;
use crate::broker::Broker;
use crate::shutdown::Signals;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Longest wait for open lease API connections to close on their own
/// before an upgrade (each closes after its next answer; idle ones are
/// closed once no lease is in flight, or after this).
pub const QUIESCE_CONNECTIONS: Duration = Duration::from_secs(2);

/// A broker ready to serve.
pub struct Serving {
    pub broker: Arc<Broker>,
    pub listeners: Listeners,
    /// Paths removed at shutdown (not after a handoff).
    pub remove_at_exit: Vec<PathBuf>,
    /// The signal thread (SIGUSR2 upgrades, exec); `None` in tests that
    /// run a broker in-process, which cannot upgrade in place.
    pub signals: Option<Signals>,
    /// The binary an upgrade executes (default: this one's path).
    pub binary: Option<PathBuf>,
    /// A take-over to acknowledge once accepting (the old broker then
    /// stops accepting and drains).
    pub take_over: Option<control::Taken>,
}

/// How serving ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Shutdown,
    HandedOff,
}

/// Serves until shutdown or a handoff, upgrading in place on request.
pub async fn serve(mut s: Serving, shutdown: CancellationToken) -> Ended {
    let Some(lease) = s.listeners.get(LEASE) else {
        tracing::error!("no lease API listener to serve");
        return Ended::Shutdown;
    };
    let (events_tx, mut events) = mpsc::channel(8);
    loop {
        let stop = shutdown.child_token();
        let conns = shutdown.child_token();
        let accept = {
            let (b, l, stop, conns) =
                (s.broker.clone(), lease.clone(), stop.clone(), conns.clone());
            tokio::spawn(async move { b.accept(&l, &stop, &conns).await })
        };
        if let Some(ctl) = s.listeners.get(CONTROL) {
            tokio::spawn(control::serve(
                ctl,
                s.listeners.clone(),
                events_tx.clone(),
                stop.clone(),
            ));
        }
        if let Some(t) = s.take_over.take() {
            match t.ack().await {
                Ok(()) => tracing::info!("serving; the old broker drains"),
                Err(e) => {
                    tracing::warn!("cannot acknowledge the take-over ({e}); both brokers accept")
                }
            }
        }
        let upgrade_signal = async {
            match &s.signals {
                Some(sig) => sig.upgrade.notified().await,
                None => std::future::pending().await,
            }
        };
        let event = tokio::select! {
            _ = shutdown.cancelled() => None,
            e = events.recv() => e,
            _ = upgrade_signal => Some(Event::Upgrade(None)),
        };
        stop.cancel();
        let _ = accept.await;
        match event {
            None => {
                for p in &s.remove_at_exit {
                    let _ = std::fs::remove_file(p);
                }
                s.broker.drain().await;
                s.broker.close_connections(&conns).await;
                return Ended::Shutdown;
            }
            Some(Event::HandedOff) => {
                s.broker.set_closing(true);
                let limit = s.broker.settings().drain_timeout;
                tokio::select! {
                    left = s.broker.quiesce(limit, false) => if left > 0 {
                        tracing::info!(connections = left, "closing idle connections");
                    },
                    _ = shutdown.cancelled() => {}
                }
                s.broker.close_connections(&conns).await;
                s.broker.drain().await;
                return Ended::HandedOff;
            }
            Some(Event::Upgrade(reply)) => {
                let error = upgrade_once(&s, &conns, reply.as_ref(), &shutdown).await;
                tracing::warn!("upgrade failed, serving on: {error}");
                if let Some(r) = &reply {
                    let msg = super::wire::Message::Refused { error };
                    let _ = super::wire::send(r, &msg, &[]).await;
                }
                if shutdown.is_cancelled() {
                    continue; // the next turn shuts down
                }
            }
        }
    }
}

/// Settles the broker and re-executes; returns why it did not happen.
async fn upgrade_once(
    s: &Serving,
    conns: &CancellationToken,
    reply: Option<&UnixStream>,
    shutdown: &CancellationToken,
) -> String {
    let Some(signals) = &s.signals else {
        return "this broker runs in-process and cannot re-execute".into();
    };
    let started = std::time::Instant::now();
    let broker = &s.broker;
    broker.set_closing(true);
    broker.freeze(true);
    let limit = broker.settings().drain_timeout;
    // A signal while settling wins (the exec itself runs on the signal
    // thread, which checks for shutdown first).
    let settled = tokio::select! {
        s = async {
            broker.quiesce(QUIESCE_CONNECTIONS, true).await;
            broker.close_connections(conns).await;
            broker.settle(limit).await
        } => s,
        _ = shutdown.cancelled() => false,
    };
    let error = if shutdown.is_cancelled() {
        "shutting down".to_string()
    } else if !settled {
        format!("leases still in flight or processes still starting after {limit:?}")
    } else {
        tracing::info!(settled_in = ?started.elapsed(), "settled; passing everything to the new image");
        upgrade::exec(
            broker,
            &s.listeners,
            &s.remove_at_exit,
            reply,
            signals,
            s.binary.as_ref(),
        )
        .await
        .to_string()
    };
    broker.freeze(false);
    broker.set_closing(false);
    error
}
