//! The control socket beside the lease socket (`<socket>.ctl`): a new
//! broker takes the listening sockets over, `mcp-broker upgrade` asks for
//! an in-place upgrade.
//!
//! Access: only the broker's own uid and root. The socket is 0600 and owned
//! by the broker (not the lease socket's group: that group may lease, it
//! must not take the broker's sockets, and under the shipped systemd unit
//! the broker's user cannot chown to it), and every peer's uid is checked
//! with `SO_PEERCRED` as well.
//! A take-over is two-phase: the old broker sends its listeners and keeps
//! accepting until the new one acknowledges that it accepts too; a new
//! broker that dies before its ack leaves the old one serving. Every wait
//! is bounded.

use super::registry::Listeners;
use super::wire::{self, Message, WireError};
use crate::broker::socket::{self, ListenError};
use nix::sys::socket::{getsockopt, sockopt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Longest wait for a peer's request once it connected.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for the new broker's ack after the listeners were sent.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// What the control socket asks of the serving broker.
pub enum Event {
    /// A new broker accepts on our sockets now: stop accepting and drain.
    HandedOff,
    /// Re-execute in place; the requester (if any) waits on the stream.
    Upgrade(Option<UnixStream>),
}

/// Why a handoff request failed, as the requester sees it.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("cannot reach the control socket {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("the broker refused: {0}")]
    Refused(String),
    #[error("unexpected answer {0}")]
    Unexpected(String),
    #[error("{0}")]
    Listen(#[from] ListenError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Peer(String),
}

/// The control socket's path for lease socket `socket`.
pub fn path_for(socket: &Path) -> PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(".ctl");
    PathBuf::from(p)
}

/// The control socket's mode: the broker's user only.
pub const CONTROL_MODE: u32 = 0o600;

/// Binds the control socket beside `socket`.
pub fn bind(socket: &Path) -> Result<UnixListener, ListenError> {
    socket::bind(&path_for(socket), CONTROL_MODE, None)
}

/// Checks that the peer of `stream` runs as our uid or root.
fn check_peer(stream: &UnixStream) -> Result<(), String> {
    let cred = getsockopt(stream, sockopt::PeerCredentials)
        .map_err(|e| format!("cannot read peer credentials: {e}"))?;
    let me = nix::unistd::geteuid().as_raw();
    if cred.uid() == me || cred.uid() == 0 {
        Ok(())
    } else {
        Err(format!(
            "peer uid {} is neither the broker's ({me}) nor root",
            cred.uid()
        ))
    }
}

/// Serves the control socket until `stop`, passing requests on as events.
pub async fn serve(
    listener: Arc<UnixListener>,
    listeners: Listeners,
    events: mpsc::Sender<Event>,
    stop: CancellationToken,
) {
    crate::web::accept_until(&*listener, &stop, "control", |(stream, _)| {
        tokio::spawn(handle(stream, listeners.clone(), events.clone()));
    })
    .await;
}

async fn handle(stream: UnixStream, listeners: Listeners, events: mpsc::Sender<Event>) {
    if let Err(why) = check_peer(&stream) {
        tracing::warn!("control socket: refused: {why}");
        let _ = wire::send(&stream, &Message::Refused { error: why }, &[]).await;
        return;
    }
    let msg = match tokio::time::timeout(REQUEST_TIMEOUT, wire::recv(&stream)).await {
        Err(_) => return,
        Ok(Err(e)) => {
            tracing::warn!("control socket: refused a request: {e}");
            wire::refuse(&stream, &e).await;
            return;
        }
        Ok(Ok((msg, _fds))) => msg,
    };
    match msg {
        Message::Takeover => {
            let names = listeners.names();
            let sent = wire::send(&stream, &Message::Listeners { names }, &listeners.fds()).await;
            if let Err(e) = sent {
                tracing::warn!("handoff: cannot send the listeners: {e}; still serving");
                return;
            }
            match tokio::time::timeout(ACK_TIMEOUT, wire::recv(&stream)).await {
                Ok(Ok((Message::Ack, _))) => {
                    tracing::info!("handoff: the new broker accepts now; draining");
                    let _ = events.send(Event::HandedOff).await;
                }
                Ok(Ok((other, _))) => {
                    tracing::warn!("handoff abandoned ({other:?} instead of ack); still serving")
                }
                Ok(Err(e)) => {
                    tracing::warn!("handoff abandoned by the new broker ({e}); still serving")
                }
                Err(_) => tracing::warn!("handoff: no ack within {ACK_TIMEOUT:?}; still serving"),
            }
        }
        Message::Upgrade => {
            let _ = events.send(Event::Upgrade(Some(stream))).await;
        }
        other => {
            let error = format!("unexpected request {other:?}");
            let _ = wire::send(&stream, &Message::Refused { error }, &[]).await;
        }
    }
}

async fn connect(socket: &Path) -> Result<UnixStream, HandoffError> {
    let path = path_for(socket);
    let stream = UnixStream::connect(&path)
        .await
        .map_err(|source| HandoffError::Connect {
            path: path.display().to_string(),
            source,
        })?;
    check_peer(&stream).map_err(HandoffError::Peer)?;
    Ok(stream)
}

/// Listeners taken over from the old broker, not yet acknowledged.
pub struct Taken {
    pub listeners: Listeners,
    stream: UnixStream,
}

impl Taken {
    /// Tells the old broker we accept now: it stops accepting and drains.
    pub async fn ack(self) -> Result<(), WireError> {
        wire::send(&self.stream, &Message::Ack, &[]).await
    }
}

/// Asks the broker serving `socket` for its listening sockets.
pub async fn take_over(socket: &Path) -> Result<Taken, HandoffError> {
    let stream = connect(socket).await?;
    wire::send(&stream, &Message::Takeover, &[]).await?;
    let (msg, fds) = tokio::time::timeout(REQUEST_TIMEOUT, wire::recv(&stream))
        .await
        .map_err(|_| HandoffError::Timeout(REQUEST_TIMEOUT))??;
    match msg {
        Message::Listeners { names } => Ok(Taken {
            listeners: Listeners::from_fds(names, fds)?,
            stream,
        }),
        Message::Refused { error } => Err(HandoffError::Refused(error)),
        other => Err(HandoffError::Unexpected(format!("{other:?}"))),
    }
}

/// Asks the broker serving `socket` to upgrade in place and waits up to
/// `limit` for the new image; returns its pid.
pub async fn upgrade(socket: &Path, limit: Duration) -> Result<u32, HandoffError> {
    let stream = connect(socket).await?;
    wire::send(&stream, &Message::Upgrade, &[]).await?;
    let (msg, _) = tokio::time::timeout(limit, wire::recv(&stream))
        .await
        .map_err(|_| HandoffError::Timeout(limit))??;
    match msg {
        Message::Upgraded { pid } => Ok(pid),
        Message::Refused { error } => Err(HandoffError::Refused(error)),
        other => Err(HandoffError::Unexpected(format!("{other:?}"))),
    }
}
