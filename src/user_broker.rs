//! `mcp-broker user-broker`: one user's own broker, holding on-demand pools
//! for the commands that user's MCP hosts name (`mcp-broker connect --
//! CMD ARGS...`).
//!
//! Invariants:
//! * Its socket lives in a directory only its user can enter ([`dir`]:
//!   `$XDG_RUNTIME_DIR/mcp-broker`, else `/tmp/mcp-broker-UID`, mode 0700,
//!   verified owned by the user) with mode 0600; and the broker serves only
//!   peers whose `SO_PEERCRED` uid is its own, so a command it runs is one
//!   its own user asked for.
//! * It is the only kind of broker that creates on-demand pools.
//! * It starts from `systemd --user` socket activation ([`socket::inherited`])
//!   or binds the socket itself; a shim starts it in the background on
//!   first use ([`autostart`]), serialized by a lock file in the same
//!   directory.
//! * Its pid is in `broker.pid` next to the socket while it runs.

pub mod autostart;
pub mod dir;

use crate::broker::on_demand::{self, OnDemandSettings};
use crate::broker::{socket, Broker};
use crate::config::{BrokerSettings, Config};
use crate::metrics::Metrics;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// The socket's file name inside the per-user directory.
pub const SOCKET_NAME: &str = "broker.sock";
/// The pid file's name inside the per-user directory.
pub const PID_NAME: &str = "broker.pid";

/// Why the per-user broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum UserBrokerError {
    #[error(transparent)]
    Dir(#[from] dir::DirError),
    #[error(transparent)]
    Listen(#[from] socket::ListenError),
    #[error("cannot write {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// The per-user broker's socket: `--socket`, else the default in [`dir`].
pub fn socket_path(given: Option<&Path>) -> Result<PathBuf, dir::DirError> {
    match given {
        Some(p) => Ok(p.to_path_buf()),
        None => Ok(dir::default_dir()?.join(SOCKET_NAME)),
    }
}

/// Runs the per-user broker on `socket` until `shutdown`.
pub async fn run(
    socket_arg: Option<PathBuf>,
    settings: OnDemandSettings,
    shutdown: CancellationToken,
) -> Result<(), UserBrokerError> {
    let uid = nix::unistd::getuid().as_raw();
    let (listener, path, remove) = match socket::inherited()? {
        Some(l) => {
            let p = l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(PathBuf::from))
                .unwrap_or_default();
            tracing::info!("using the socket passed by systemd (socket activation)");
            (l, p, false)
        }
        None => {
            let path = socket_path(socket_arg.as_deref())?;
            if let Some(d) = path.parent() {
                dir::prepare(d)?;
            }
            (socket::bind(&path, 0o600, None)?, path, true)
        }
    };
    let pid_file = path.with_file_name(PID_NAME);
    std::fs::write(&pid_file, format!("{}\n", std::process::id())).map_err(|source| {
        UserBrokerError::Io {
            path: pid_file.display().to_string(),
            source,
        }
    })?;
    let cfg = Config {
        broker: BrokerSettings {
            socket: path.clone(),
            socket_mode: 0o600,
            metrics_listen: None,
            ..BrokerSettings::default()
        },
        pools: Vec::new(),
    };
    let broker = Broker::start(cfg, Arc::new(Metrics::new()));
    broker.restrict_to_uid(uid);
    broker.enable_on_demand(settings.clone());
    tokio::spawn(on_demand::reaper(broker.clone(), shutdown.clone()));
    tracing::info!(
        socket = %path.display(),
        uid,
        idle_timeout = ?settings.idle_timeout,
        "per-user broker listening"
    );
    broker
        .serve(listener, remove.then(|| path.clone()), shutdown)
        .await;
    let _ = std::fs::remove_file(&pid_file);
    Ok(())
}
