//! The `mcp-broker` command line: `serve`, `proxy`, `connect`, `user-broker`,
//! `up`, `check`.
//!
//! Only startup lives here: parse flags, load config, install logging and
//! signal handling, then hand over to the library. Errors here are `anyhow`
//! and end the process with a message naming what is wrong.

use anyhow::Context;
use clap::{Parser, Subcommand};
use mcp_broker::broker::Broker;
use mcp_broker::config::raw::RawPool;
use mcp_broker::config::{self, Config, Mode, Protocol};
use mcp_broker::metrics::Metrics;
use mcp_broker::proxy::cli::{self as proxy_cli, HttpFlags, ProxyArgs};
use mcp_broker::runtime::{self, Threads};
use mcp_broker::shim::cli::{self as shim_cli, ConnectArgs};
use mcp_broker::slim;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[path = "main/serve.rs"]
mod serve;
use serve::serve;

#[derive(Parser)]
#[command(
    name = "mcp-broker",
    version,
    about = "Warm pools of stdio MCP servers, leased per request"
)]
struct Cli {
    /// Runtime worker threads (default: 1 for `proxy`, `up` and the bench's
    /// broker and proxy; one per core for `serve`).
    #[arg(long, global = true, value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
    #[command(subcommand)]
    command: Command,
}

// Parsed once at startup and matched once: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the node daemon: pools plus the lease API on a Unix socket.
    Serve {
        /// Config file (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// Override `[broker] socket`.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// The binary `mcp-broker upgrade` (and SIGUSR2) executes [default:
        /// the path this one was started from].
        #[arg(long)]
        upgrade_binary: Option<PathBuf>,
        /// After handing its sockets to a new broker and draining: `exit`,
        /// or `wait` for SIGTERM (a Kubernetes container that exits is
        /// restarted, and would take the socket back).
        #[arg(long, value_enum, default_value = "exit")]
        after_handoff: AfterHandoff,
    },
    /// Ask the broker on a socket to re-execute its binary in place,
    /// keeping its pid and every warm process (also: SIGUSR2).
    Upgrade {
        /// The broker's lease API socket (the control socket is beside it).
        #[arg(long, default_value = config::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Longest wait for the new image to serve.
        #[arg(long, default_value = "60s", value_parser = config::parse_duration)]
        timeout: Duration,
    },
    /// Validate a config file and print the resolved pools.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Serve MCP Streamable HTTP at /mcp, leasing from a broker per request.
    /// Runs as the slim `mcp-broker-proxy` when that sits beside this binary.
    Proxy(ProxyArgs),
    /// Speak MCP over stdin/stdout like a stdio server, leasing from a
    /// broker's pool per request: put it in an MCP host's config in place
    /// of the server's own command. `--pool NAME` uses a configured pool;
    /// `-- CMD ARGS...` an on-demand pool of the per-user broker (started
    /// on first use). Runs as the slim `mcp-broker-connect` when that sits
    /// beside this binary.
    Connect(ConnectArgs),
    /// Run one user's own broker: on-demand pools for the commands its
    /// `connect -- CMD` shims name, on a socket only that user can reach.
    /// Started by the first shim, or by systemd --user socket activation.
    UserBroker {
        /// The socket [default: $XDG_RUNTIME_DIR/mcp-broker/broker.sock,
        /// else /tmp/mcp-broker-UID/broker.sock].
        #[arg(long)]
        socket: Option<PathBuf>,
        /// How long an on-demand pool stays after its last use.
        #[arg(long, default_value = "5m", value_parser = config::parse_duration)]
        pool_idle_timeout: Duration,
        /// Processes one exclusive or sticky on-demand pool runs at most.
        #[arg(long, default_value_t = mcp_broker::broker::on_demand::DEFAULT_MAX_PROCESSES)]
        max_processes: usize,
        /// Processes one shared on-demand pool runs at most.
        #[arg(long, default_value_t = mcp_broker::broker::on_demand::DEFAULT_MAX_SHARED)]
        max_shared_processes: usize,
    },
    /// Broker and proxy in one process: any stdio server becomes a pooled
    /// Streamable HTTP server.
    Up {
        /// Warm processes kept ready [default: 1].
        #[arg(long)]
        min_idle: Option<usize>,
        /// Processes at most [default: 4].
        #[arg(long)]
        max: Option<usize>,
        /// Requests one process takes at once [default: 1].
        #[arg(long)]
        max_inflight: Option<usize>,
        /// How sessions share processes [default: shared].
        #[arg(long, value_enum)]
        mode: Option<Mode>,
        /// Longest time a process may take to answer, e.g. 30s [default: 120s].
        #[arg(long, value_parser = config::parse_duration)]
        request_timeout: Option<Duration>,
        /// Longest wait for a free process [default: 30s].
        #[arg(long, value_parser = config::parse_duration)]
        queue_timeout: Option<Duration>,
        /// Waiting requests at most [default: 256].
        #[arg(long)]
        queue_limit: Option<usize>,
        /// How to warm the server [default: auto].
        #[arg(long, value_enum)]
        protocol: Option<Protocol>,
        /// Variable added to the server's environment (repeatable).
        #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
        env: Vec<(String, String)>,
        /// Working directory of the server.
        #[arg(long)]
        cwd: Option<PathBuf>,
        /// Longest spawn plus handshake of a new process [default: 60s].
        #[arg(long, value_parser = config::parse_duration)]
        init_timeout: Option<Duration>,
        /// Longest wait for an answer to the server/discover probe before
        /// the same process gets initialize [default: 1s].
        #[arg(long, value_parser = config::parse_duration)]
        probe_timeout: Option<Duration>,
        /// Capabilities declared to the server at warm-up, as JSON
        /// (default: roots, sampling and elicitation, which the proxy relays).
        #[arg(long, value_parser = parse_object)]
        client_capabilities: Option<serde_json::Value>,
        /// Largest JSON-RPC message in bytes, either direction (beyond: a
        /// clear -31005 error).
        #[arg(long, default_value_t = config::DEFAULT_MAX_MESSAGE_SIZE as u64,
              value_parser = clap::value_parser!(u64).range(1024..))]
        max_message_bytes: u64,
        /// Server→client requests waiting for the client per request.
        #[arg(long, default_value_t = config::DEFAULT_MAX_SERVER_REQUESTS)]
        max_server_requests: usize,
        #[command(flatten)]
        http: HttpFlags,
        /// Serve every pool of this config file instead of one command: each
        /// at /servers/NAME/mcp (and /mcp when there is exactly one).
        #[arg(long, short, conflicts_with_all = [
            "min_idle", "max", "max_inflight", "mode", "request_timeout", "queue_timeout",
            "queue_limit", "protocol", "env", "cwd", "init_timeout", "probe_timeout",
            "client_capabilities", "max_message_bytes", "max_server_requests", "command",
        ])]
        config: Option<PathBuf>,
        /// The stdio server command and its arguments.
        #[arg(last = true, required_unless_present = "config", num_args = 1..)]
        command: Vec<String>,
    },
    /// Benchmark direct stdio, the broker's modes, spawn-per-request and
    /// peer gateways side by side; writes a Markdown table and an SVG chart.
    #[cfg(feature = "bench")]
    Bench(mcp_broker::bench::BenchArgs),
}

/// What a broker does once it has handed off and drained.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum AfterHandoff {
    Exit,
    Wait,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) => Ok((k.to_string(), v.to_string())),
        None => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

fn parse_object(s: &str) -> Result<serde_json::Value, String> {
    match serde_json::from_str::<serde_json::Value>(s) {
        Ok(v) if v.is_object() => Ok(v),
        _ => Err(format!(
            "{s:?} is not a JSON object such as '{{}}' or '{{\"sampling\":{{}}}}'"
        )),
    }
}

fn main() -> std::process::ExitCode {
    // `connect` becomes the slim shim beside this binary when there is one
    // (the host's session keeps it resident; see mcp_broker::shim::cli).
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let slim_failed = match argv.get(1).and_then(|c| c.to_str()) {
        Some("connect") => slim::exec_beside(slim::SHIM, &argv[2..]),
        Some("proxy") => slim::exec_beside(slim::PROXY, &argv[2..]),
        _ => None,
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MCP_BROKER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Some(e) = slim_failed {
        tracing::debug!("cannot execute the slim binary beside this one: {e}; running in-process");
    }
    let cli = Cli::parse_from(argv);
    let threads = match (cli.threads, &cli.command) {
        (Some(n), _) => Threads::Fixed(n.into()),
        // The shim waits on its host and the broker: one thread, no workers.
        (None, Command::Connect { .. }) => Threads::Current,
        (None, Command::Proxy(_) | Command::Up { .. } | Command::UserBroker { .. }) => {
            Threads::Fixed(runtime::DEFAULT_LEAN_THREADS)
        }
        // The bench's own load generator; its broker and proxy get a
        // runtime of their own (`bench --server-threads`).
        (None, _) => Threads::PerCore,
    };
    let shim = matches!(cli.command, Command::Connect { .. });
    runtime::run_main(
        "mcp-broker",
        || runtime::build(threads, "mcp-broker"),
        shim,
        |shutdown, signals| run(cli.command, shutdown, signals),
    )
}

async fn run(
    command: Command,
    shutdown: CancellationToken,
    signals: mcp_broker::shutdown::Signals,
) -> anyhow::Result<()> {
    match command {
        Command::Upgrade { socket, timeout } => {
            let pid = mcp_broker::handoff::control::upgrade(&socket, timeout)
                .await
                .with_context(|| format!("upgrading the broker on {}", socket.display()))?;
            println!("upgraded in place: the broker (pid {pid}) runs the new binary");
            Ok(())
        }
        Command::Check { config } => {
            let cfg = Config::load(&config)?;
            print!("{}", config::describe(&cfg));
            Ok(())
        }
        Command::Serve {
            config,
            socket,
            upgrade_binary,
            after_handoff,
        } => {
            let text = std::fs::read(&config)
                .with_context(|| format!("cannot read {}", config.display()))?;
            let mut cfg = Config::from_toml(&String::from_utf8_lossy(&text))
                .with_context(|| format!("in {}", config.display()))?;
            if let Some(s) = socket {
                cfg.broker.socket = s;
            }
            let reload = (config, text);
            let wait = after_handoff == AfterHandoff::Wait;
            serve(cfg, reload, shutdown, signals, upgrade_binary, wait).await
        }
        #[cfg(feature = "bench")]
        Command::Bench(args) => mcp_broker::bench::run(args, shutdown).await,
        Command::Proxy(args) => proxy_cli::run(args, shutdown).await,
        Command::Connect(args) => Ok(shim_cli::run(args, shutdown).await?),
        Command::UserBroker {
            socket,
            pool_idle_timeout,
            max_processes,
            max_shared_processes,
        } => {
            let settings = mcp_broker::broker::on_demand::OnDemandSettings {
                idle_timeout: pool_idle_timeout,
                max_processes: max_processes.max(1),
                max_shared: max_shared_processes.max(1),
            };
            Ok(mcp_broker::user_broker::run(socket, settings, shutdown).await?)
        }
        Command::Up {
            http,
            config: Some(path),
            ..
        } => {
            let cfg = Config::load(&path).with_context(|| format!("in {}", path.display()))?;
            if cfg.pools.is_empty() {
                anyhow::bail!("{} has no [[pool]]", path.display());
            }
            let settings = http.settings(PathBuf::new(), String::new());
            mcp_broker::up::run(cfg.pools, cfg.broker, settings, shutdown).await
        }
        Command::Up {
            min_idle,
            max,
            max_inflight,
            mode,
            request_timeout,
            queue_timeout,
            queue_limit,
            protocol,
            env,
            cwd,
            init_timeout,
            probe_timeout,
            client_capabilities,
            max_message_bytes,
            max_server_requests,
            http,
            command,
            config: None,
        } => {
            // The flags go through the config file's own validation (the
            // cross-field checks, defaults and messages of `[[pool]]`).
            let raw = RawPool {
                name: Some(mcp_broker::up::POOL_NAME.to_string()),
                command: Some(command[0].clone()),
                args: command[1..].to_vec(),
                env: env.into_iter().collect(),
                cwd: cwd.map(|d| d.display().to_string()),
                mode,
                min_idle,
                max,
                max_inflight,
                queue_limit,
                queue_timeout,
                request_timeout,
                init_timeout,
                probe_timeout,
                protocol,
                max_server_requests: Some(max_server_requests),
                ..RawPool::default()
            };
            let max_message = usize::try_from(max_message_bytes).unwrap_or(usize::MAX);
            let mut pool = config::pool_from_flags(raw, max_message)?;
            if let Some(c) = client_capabilities {
                pool.client_capabilities = c;
            }
            let settings = http.settings(PathBuf::new(), String::new());
            let broker = config::BrokerSettings {
                max_message_size: pool.max_message_size,
                ..config::BrokerSettings::default()
            };
            mcp_broker::up::run(vec![pool], broker, settings, shutdown).await
        }
    }
}
