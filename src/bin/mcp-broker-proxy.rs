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
    let threads = cli
        .threads
        .map_or(runtime::DEFAULT_LEAN_THREADS, usize::from);
    let build = || runtime::build(Threads::Fixed(threads), "mcp-broker");
    runtime::run_main("mcp-broker-proxy", build, false, |shutdown, _signals| {
        cli::run(cli.args, shutdown)
    })
}
