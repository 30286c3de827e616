//! The slim client binaries, and `mcp-broker`'s re-exec into them.
//!
//! Why: a host keeps one stdio shim per session, and a pod keeps one HTTP
//! proxy beside its workload, for as long as they live; their resident set
//! is paid per session and per pod. The full `mcp-broker` maps the whole
//! node daemon (Kubernetes client, CSI, upgrades, bench); the pages a shim
//! or a proxy touches are scattered across it, and the kernel maps
//! neighbouring pages with every fault, so most of their RSS was code they
//! never run. `mcp-broker-connect` and `mcp-broker-proxy` link only their
//! own part of the same library. `mcp-broker connect|proxy ...` re-executes
//! into the one beside it (same pid and arguments) and runs in-process
//! when there is none, so configs may name either.

use std::ffi::OsString;
use std::path::PathBuf;

/// The full binary (node daemon, per-user broker, bench).
pub const FULL: &str = "mcp-broker";

/// The stdio shim alone (`mcp-broker connect`).
pub const SHIM: &str = "mcp-broker-connect";
/// The HTTP proxy alone (`mcp-broker proxy`).
pub const PROXY: &str = "mcp-broker-proxy";
/// Set by the re-exec: the full binary (an on-demand shim starts the
/// per-user broker with it). Also honoured when a host runs a slim binary
/// from somewhere else.
pub const FULL_EXE_ENV: &str = "MCP_BROKER_EXE";
/// Set to anything but `0` to keep `mcp-broker connect|proxy` in-process.
pub const NO_SLIM_ENV: &str = "MCP_BROKER_NO_SLIM";

/// Replaces this process with `name` beside it, given `args`, and never
/// returns when that works. Returns `None` when there is no such binary (or
/// `MCP_BROKER_NO_SLIM` is set), the error of a failed attempt otherwise:
/// the caller then runs in-process. Call it first thing in `main`, before
/// any thread or runtime exists.
pub fn exec_beside(name: &str, args: &[OsString]) -> Option<std::io::Error> {
    use std::os::unix::process::CommandExt;
    if std::env::var_os(NO_SLIM_ENV).is_some_and(|v| v != "0") {
        return None;
    }
    let me = std::env::current_exe().ok()?;
    let slim = me.with_file_name(name);
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

/// The full `mcp-broker` binary, which an on-demand shim starts the
/// per-user broker with: `$MCP_BROKER_EXE`, else this executable, unless it
/// is a slim one: then `mcp-broker` beside it.
pub fn full_exe() -> std::io::Result<PathBuf> {
    if let Some(p) = std::env::var_os(FULL_EXE_ENV).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let me = std::env::current_exe()?;
    let slim = me.file_name().is_some_and(|n| n == SHIM || n == PROXY);
    Ok(if slim { me.with_file_name(FULL) } else { me })
}

/// The start of a slim binary's `main`: logging to stderr at the level in
/// `MCP_BROKER_LOG` (`error`..`trace`, default `info`; stdout may carry
/// JSON-RPC), and its arguments, with a leading `subcommand` dropped so
/// that `mcp-broker-X X ...` reads as `mcp-broker X ...`.
pub fn start(subcommand: &str) -> Vec<OsString> {
    use tracing::level_filters::LevelFilter;
    let level = std::env::var("MCP_BROKER_LOG")
        .ok()
        .and_then(|v| v.parse::<LevelFilter>().ok())
        .unwrap_or(LevelFilter::INFO);
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .init();
    let mut argv: Vec<OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == subcommand) {
        argv.remove(1);
    }
    argv
}
