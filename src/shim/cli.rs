//! The flags of `mcp-broker connect` and the start-up both of its binaries
//! share: `mcp-broker connect ...` and the slim `mcp-broker-connect ...`.
//!
//! Why two binaries: a host spawns one shim per session and keeps it for
//! the session's life, so its resident set is paid per session. The full
//! `mcp-broker` maps the whole node daemon (Kubernetes client, CSI, bench);
//! the pages a shim touches are scattered across it, and the kernel maps
//! neighbouring pages with every fault, so the shim's RSS is mostly code it
//! never runs. `mcp-broker-connect` links only the shim (the same library
//! code). `mcp-broker connect` re-executes into it when it sits beside the
//! full binary ([`slim_exec`]) and runs in-process otherwise, so a host's
//! config names either and gets the same behaviour.

use super::on_demand::{self, OnDemandArgs, OnDemandError};
use super::{Ended, ShimSettings};
use crate::config::{self, Mode};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

/// The slim shim's file name, beside `mcp-broker`.
pub const SLIM_NAME: &str = "mcp-broker-connect";
/// Set by `mcp-broker connect` when it re-executes into the slim shim: the
/// full binary, which starts the per-user broker. Also honoured when a host
/// runs `mcp-broker-connect` from somewhere else.
pub const FULL_EXE_ENV: &str = "MCP_BROKER_EXE";
/// Set to anything but `0` to keep `mcp-broker connect` in-process.
pub const NO_SLIM_ENV: &str = "MCP_BROKER_NO_SLIM";

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

/// Runs the shim as told until the host goes away or `shutdown`; `full_exe`
/// is the `mcp-broker` binary an on-demand shim starts the per-user broker
/// with.
pub async fn run(
    args: ConnectArgs,
    full_exe: &Path,
    shutdown: CancellationToken,
) -> Result<(), ConnectError> {
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
        on_demand::prepare(&od, full_exe, &mut settings).await?;
    }
    match super::run(settings, shutdown).await {
        Ended::ReadError(e) => Err(ConnectError::Read(e)),
        Ended::Eof | Ended::Signal => Ok(()),
    }
}

/// The full `mcp-broker` binary as seen from the slim shim: `$MCP_BROKER_EXE`,
/// else `mcp-broker` beside this executable.
pub fn full_exe_for_slim() -> Result<PathBuf, OnDemandError> {
    if let Some(p) = std::env::var_os(FULL_EXE_ENV).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let me = std::env::current_exe().map_err(OnDemandError::Exe)?;
    Ok(me.with_file_name("mcp-broker"))
}

/// For `mcp-broker connect ARGS`: replaces this process with the slim shim
/// beside it (`mcp-broker-connect ARGS`, told where the full binary is) and
/// never returns when that works. Returns when there is no slim shim or it
/// cannot be executed (or `MCP_BROKER_NO_SLIM` is set), with the error of a
/// failed attempt: the caller then runs the shim in-process. Call it first
/// thing in `main`, before any thread or runtime exists.
pub fn slim_exec(args: &[OsString]) -> Option<std::io::Error> {
    use std::os::unix::process::CommandExt;
    if std::env::var_os(NO_SLIM_ENV).is_some_and(|v| v != "0") {
        return None;
    }
    let me = std::env::current_exe().ok()?;
    let slim = me.with_file_name(SLIM_NAME);
    if !slim.is_file() {
        return None;
    }
    Some(
        std::process::Command::new(&slim)
            .args(args)
            .env(FULL_EXE_ENV, &me)
            .exec(),
    )
}
