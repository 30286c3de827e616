//! `mcp-broker-connect`: the stdio shim alone, for hosts that keep one per
//! session. Same flags and behaviour as `mcp-broker connect` (which
//! re-executes into this binary when it sits beside it); it links only the
//! shim's code, so each session's shim keeps a few MiB resident instead of
//! the node daemon's pages (`mcp_broker::shim::cli` says why that matters).
//!
//! Logging is a level from `MCP_BROKER_LOG` (`error`..`trace`, default
//! `info`), to stderr: stdout carries JSON-RPC only.

use clap::Parser;
use mcp_broker::shim::cli::{self, ConnectArgs};
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;
use tracing::level_filters::LevelFilter;

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
    let level = std::env::var("MCP_BROKER_LOG")
        .ok()
        .and_then(|v| v.parse::<LevelFilter>().ok())
        .unwrap_or(LevelFilter::INFO);
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .init();
    // `mcp-broker-connect connect ...` reads as `mcp-broker connect ...`.
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == "connect") {
        argv.remove(1);
    }
    let cli = Cli::parse_from(argv);
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
        let exe = cli::full_exe_for_slim().map_err(|e| e.to_string())?;
        cli::run(cli.args, &exe, shutdown)
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
