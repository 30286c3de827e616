//! `mcp-broker-connect`: the stdio shim alone, for hosts that keep one per
//! session. Same flags and behaviour as `mcp-broker connect` (which
//! re-executes into this binary when it sits beside it); it links only the
//! shim's code, so each session's shim keeps a few MiB resident instead of
//! the node daemon's pages (`mcp_broker::slim` says why that matters).
//!
//! Logging is a level from `MCP_BROKER_LOG` (`error`..`trace`, default
//! `info`), to stderr: stdout carries JSON-RPC only.

use clap::Parser;
use mcp_broker::shim::cli::{self, ConnectArgs};
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "mcp-broker-connect",
    version,
    about = "A stdio MCP server that leases from a warm pool of mcp-broker per request"
)]
struct Cli {
    #[command(flatten)]
    args: ConnectArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(mcp_broker::slim::start("connect"));
    if let Err(e) = mcp_broker::shutdown::block() {
        eprintln!("mcp-broker-connect: cannot block signals: {e}");
        return ExitCode::FAILURE;
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mcp-broker-connect: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = rt.block_on(async {
        let shutdown = CancellationToken::new();
        let _signals = mcp_broker::shutdown::start(shutdown.clone())
            .map_err(|e| format!("cannot start the signal thread: {e}"))?;
        cli::run(cli.args, shutdown)
            .await
            .map_err(|e| e.to_string())
    });
    // stdin is read on a blocking thread that cannot be interrupted: it
    // must not hold up the exit.
    rt.shutdown_background();
    match code {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mcp-broker-connect: {e}");
            ExitCode::FAILURE
        }
    }
}
