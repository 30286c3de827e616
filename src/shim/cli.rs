//! The flags of `mcp-broker connect` and the start-up both of its binaries
//! share: `mcp-broker connect ...` and the slim `mcp-broker-connect ...`
//! ([`crate::slim`] says why there are two).

use super::on_demand::{self, OnDemandArgs, OnDemandError};
use super::{Ended, ShimSettings};
use crate::config::{self, Mode};
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// `mcp-broker connect` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {
    /// The pool to lease from.
    #[arg(long, conflicts_with = "command", required_unless_present = "command")]
    pub pool: Option<String>,
    /// The broker's lease API socket [default: /run/mcp-broker/broker.sock
    /// with --pool; the per-user broker's socket with `-- CMD`].
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// A token file to present to the broker (`Authorization: Bearer`).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// How this host session uses the pool: shared (any process per
    /// request), sticky, or exclusive (a warm process of its own for the
    /// session); on a named pool, one its `modes` setting allows
    /// [default: the pool's mode; exclusive for `-- CMD`].
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// Same as `--mode shared` (for on-demand pools of servers that keep
    /// no per-session state).
    #[arg(long, conflicts_with = "mode")]
    pub shared: bool,
    /// Variable the on-demand server gets: `K` (this process's value) or
    /// `K=V` (repeatable); no other variable is passed.
    #[arg(long = "env", value_name = "K[=V]", requires = "command")]
    pub env: Vec<String>,
    /// Largest JSON-RPC message in bytes, either direction (beyond: a
    /// clear -31005 error).
    #[arg(long, default_value_t = config::DEFAULT_MAX_MESSAGE_SIZE as u64,
          value_parser = clap::value_parser!(u64).range(1024..))]
    pub max_message_bytes: u64,
    /// Requests leased at once; more wait.
    #[arg(long, default_value_t = super::DEFAULT_MAX_INFLIGHT,
          value_parser = clap::value_parser!(usize))]
    pub max_inflight: usize,
    /// The stdio server command and its arguments (an on-demand pool).
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// Why the shim could not serve.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    OnDemand(#[from] OnDemandError),
    #[error("cannot read MCP messages from stdin: {0}")]
    Read(String),
}

/// Runs the shim as told until the host goes away or `shutdown`.
pub async fn run(args: ConnectArgs, shutdown: CancellationToken) -> Result<(), ConnectError> {
    let mode = if args.shared {
        Some(Mode::Shared)
    } else {
        args.mode
    };
    let mut settings = ShimSettings {
        socket: args
            .socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(config::DEFAULT_SOCKET)),
        pool: args.pool.unwrap_or_default(),
        token_file: args.token_file,
        max_message: usize::try_from(args.max_message_bytes).unwrap_or(usize::MAX),
        max_inflight: args.max_inflight.max(1),
        mode,
        ..Default::default()
    };
    if !args.command.is_empty() {
        let od = OnDemandArgs {
            command: args.command,
            env: args.env,
            mode: mode.unwrap_or(Mode::Exclusive),
            socket: args.socket,
        };
        on_demand::prepare(&od, &mut settings).await?;
    }
    match super::run(settings, shutdown).await {
        Ended::ReadError(e) => Err(ConnectError::Read(e)),
        Ended::Eof | Ended::Signal => Ok(()),
    }
}
