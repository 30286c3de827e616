//! `mcp-broker-proxy`: the per-pod HTTP proxy alone. Same flags and
//! behaviour as `mcp-broker proxy` (which re-executes into this binary when
//! it sits beside it); it links only the proxy's code, so the proxy a pod
//! keeps beside its workload does not map the node daemon's pages
//! (`mcp_broker::slim` says why that matters).
//!
//! Logging: `MCP_BROKER_LOG` as a level (`error`..`trace`, default
//! `info`), to stderr.

use clap::Parser;
use mcp_broker::proxy::cli::{self, ProxyArgs};
use mcp_broker::runtime::{self, Threads};
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "mcp-broker-proxy",
    version,
    about = "MCP Streamable HTTP in front of a pool of mcp-broker, one lease per request"
)]
struct Cli {
    /// Runtime worker threads [default: 1].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
    #[command(flatten)]
    args: ProxyArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(mcp_broker::slim::start("proxy"));
    // Before any thread exists (see mcp_broker::shutdown).
    if let Err(e) = mcp_broker::shutdown::block() {
        eprintln!("mcp-broker-proxy: cannot block signals: {e}");
        return ExitCode::FAILURE;
    }
    let threads = cli
        .threads
        .map_or(runtime::DEFAULT_LEAN_THREADS, usize::from);
    let rt = match runtime::build(Threads::Fixed(threads), "mcp-broker") {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mcp-broker-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        let shutdown = CancellationToken::new();
        let _signals = mcp_broker::shutdown::start(shutdown.clone())?;
        cli::run(cli.args, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mcp-broker-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}
