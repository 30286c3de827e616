//! `mcp-broker-connect`: the stdio shim alone, for hosts that keep one per
//! session. Same flags and behaviour as `mcp-broker connect` (which
//! re-executes into this binary when it sits beside it); it links only the
//! shim's code, so each session's shim keeps a few MiB resident instead of
//! the node daemon's pages (`mcp_broker::slim` says why that matters).
//!
//! Logging is a level from `MCP_BROKER_LOG` (`error`..`trace`, default
//! `info`), to stderr: stdout carries JSON-RPC only.

use clap::Parser;
use mcp_broker::runtime;
use mcp_broker::shim::cli::{self, ConnectArgs};
use std::process::ExitCode;

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
    // One thread, no workers (the smallest resident set), built here
    // rather than by `runtime::build`, whose multi-threaded branch the shim
    // has no use for.
    let build = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    };
    runtime::run_main("mcp-broker-connect", build, true, |shutdown, _signals| {
        cli::run(cli.args, shutdown)
    })
}
