//! The `mcp-broker` command line: `serve`, `proxy`, `connect`, `up`, `check`.
//!
//! Only startup lives here: parse flags, load config, install logging and
//! signal handling, then hand over to the library. Errors here are `anyhow`
//! and end the process with a message naming what is wrong.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use mcp_broker::broker::{socket, Broker};
use mcp_broker::config::raw::RawPool;
use mcp_broker::config::{self, Config, Mode, Protocol};
use mcp_broker::metrics::Metrics;
use mcp_broker::proxy::{self, ProxySettings};
use mcp_broker::runtime::{self, Threads};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

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
    },
    /// Validate a config file and print the resolved pools.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Serve MCP Streamable HTTP at /mcp, leasing from a broker per request.
    Proxy {
        /// The broker's lease API socket.
        #[arg(long, default_value = config::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// The pool to lease from.
        #[arg(long)]
        pool: String,
        /// A projected ServiceAccount token (audience mcp-broker) to present
        /// to the broker, e.g. /var/run/secrets/mcp-broker/token.
        #[arg(long)]
        token_file: Option<PathBuf>,
        #[command(flatten)]
        http: HttpFlags,
    },
    /// Speak MCP over stdin/stdout like a stdio server, leasing from a
    /// broker's pool per request: put it in an MCP host's config in place
    /// of the server's own command.
    Connect {
        /// The pool to lease from.
        #[arg(long)]
        pool: String,
        /// The broker's lease API socket.
        #[arg(long, default_value = config::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// A token file to present to the broker (`Authorization: Bearer`).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Largest JSON-RPC message in bytes, either direction (beyond: a
        /// clear -31005 error).
        #[arg(long, default_value_t = config::DEFAULT_MAX_MESSAGE_SIZE as u64,
              value_parser = clap::value_parser!(u64).range(1024..))]
        max_message_bytes: u64,
        /// Requests leased at once; more wait.
        #[arg(long, default_value_t = mcp_broker::shim::DEFAULT_MAX_INFLIGHT,
              value_parser = clap::value_parser!(usize))]
        max_inflight: usize,
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

#[derive(Args)]
struct HttpFlags {
    /// Address to serve MCP on.
    #[arg(long, default_value = proxy::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Extra allowed `Origin` values (localhost origins are always allowed).
    #[arg(long = "allow-origin")]
    allow_origins: Vec<String>,
    /// Extra allowed `Host` values (on a loopback listener localhost is
    /// always allowed; on others, when given, only these are).
    #[arg(long = "allow-host")]
    allow_hosts: Vec<String>,
    /// Open MCP sessions at most.
    #[arg(long, default_value_t = proxy::DEFAULT_MAX_SESSIONS)]
    max_sessions: usize,
    /// Open notification streams (GET /mcp, subscriptions/listen) at most.
    #[arg(long, default_value_t = proxy::DEFAULT_MAX_STREAMS)]
    max_streams: usize,
    /// Open GET /mcp streams of one session at most.
    #[arg(long, default_value_t = proxy::DEFAULT_MAX_STREAMS_PER_SESSION)]
    max_streams_per_session: usize,
    /// Largest request body in bytes (beyond: 413).
    #[arg(long, default_value_t = proxy::DEFAULT_MAX_BODY as u64, value_parser = clap::value_parser!(u64).range(1024..))]
    max_body_bytes: u64,
    /// Largest request line plus headers in bytes (beyond: 431).
    #[arg(long, default_value_t = proxy::DEFAULT_MAX_HEADER_BYTES as u64,
          value_parser = clap::value_parser!(u64).range(8192..))]
    max_header_bytes: u64,
}

impl HttpFlags {
    fn settings(self, socket: PathBuf, pool: String) -> ProxySettings {
        ProxySettings {
            listen: self.listen,
            socket,
            pool,
            allow_origins: self.allow_origins,
            allow_hosts: self.allow_hosts,
            max_sessions: self.max_sessions,
            max_streams: self.max_streams,
            max_streams_per_session: self.max_streams_per_session,
            max_body: usize::try_from(self.max_body_bytes).unwrap_or(usize::MAX),
            max_header_bytes: usize::try_from(self.max_header_bytes).unwrap_or(usize::MAX),
            ..ProxySettings::default()
        }
    }
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MCP_BROKER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let threads = match (cli.threads, &cli.command) {
        (Some(n), _) => Threads::Fixed(n.into()),
        (None, Command::Proxy { .. } | Command::Up { .. } | Command::Connect { .. }) => {
            Threads::Fixed(runtime::DEFAULT_LEAN_THREADS)
        }
        // The bench's own load generator; its broker and proxy get a
        // runtime of their own (`bench --server-threads`).
        (None, _) => Threads::PerCore,
    };
    let rt = match runtime::build(threads, "mcp-broker") {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mcp-broker: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // The shim reads stdin on a blocking thread that cannot be interrupted:
    // it must not hold up the exit after SIGTERM.
    let shim = matches!(cli.command, Command::Connect { .. });
    let code = match rt.block_on(run(cli.command)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mcp-broker: {e:#}");
            std::process::ExitCode::FAILURE
        }
    };
    if shim {
        rt.shutdown_background();
    }
    code
}

async fn run(command: Command) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    mcp_broker::shutdown::on_signal(shutdown.clone());
    match command {
        Command::Check { config } => {
            let cfg = Config::load(&config)?;
            print!("{}", config::describe(&cfg));
            Ok(())
        }
        Command::Serve { config, socket } => {
            let text = std::fs::read(&config)
                .with_context(|| format!("cannot read {}", config.display()))?;
            let mut cfg = Config::from_toml(&String::from_utf8_lossy(&text))
                .with_context(|| format!("in {}", config.display()))?;
            if let Some(s) = socket {
                cfg.broker.socket = s;
            }
            let reload = (config, text);
            serve(cfg, reload, shutdown).await
        }
        #[cfg(feature = "bench")]
        Command::Bench(args) => mcp_broker::bench::run(args, shutdown).await,
        Command::Proxy {
            socket,
            pool,
            token_file,
            http,
        } => {
            let metrics = Arc::new(Metrics::new());
            let mut settings = http.settings(socket, pool);
            settings.token_file = token_file;
            proxy::run(settings, metrics, shutdown).await
        }
        Command::Connect {
            pool,
            socket,
            token_file,
            max_message_bytes,
            max_inflight,
        } => {
            let settings = mcp_broker::shim::ShimSettings {
                socket,
                pool,
                token_file,
                max_message: usize::try_from(max_message_bytes).unwrap_or(usize::MAX),
                max_inflight: max_inflight.max(1),
                ..Default::default()
            };
            match mcp_broker::shim::run(settings, shutdown).await {
                mcp_broker::shim::Ended::ReadError(e) => {
                    anyhow::bail!("cannot read MCP messages from stdin: {e}")
                }
                _ => Ok(()),
            }
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

/// Runs the daemon; `reload` is the config file and the content `cfg` came
/// from, watched for changes (and SIGHUP) to reconcile pools live.
async fn serve(
    cfg: Config,
    reload: (PathBuf, Vec<u8>),
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut socket = cfg.broker.socket.clone();
    // Socket activation: systemd owns the socket (path, mode, group) and
    // keeps it listening across restarts, so it is never removed here.
    let (listener, remove_at_exit) = match socket::inherited()? {
        Some(l) => {
            if let Some(p) = l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(PathBuf::from))
            {
                socket = p;
            }
            tracing::info!("using the lease API socket passed by systemd (socket activation)");
            (l, None)
        }
        None => {
            let l = socket::bind(
                &socket,
                cfg.broker.socket_mode,
                cfg.broker.socket_group.as_deref(),
            )
            .with_context(|| format!("binding the lease API socket {}", socket.display()))?;
            (l, Some(socket.clone()))
        }
    };
    let metrics = Arc::new(Metrics::new());
    let metrics_listen = cfg.broker.metrics_listen;
    let kube = cfg.broker.kubernetes.clone();
    let csi_settings = cfg.broker.csi.clone();
    let broker = Broker::start(cfg, metrics);
    if let Some(k) = kube {
        start_kubernetes(&broker, &k, &shutdown).await?;
    }
    if let Some(addr) = metrics_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the metrics listener {addr}"))?;
        tokio::spawn(mcp_broker::broker::api::serve_health(
            broker.clone(),
            l,
            shutdown.clone(),
        ));
    }
    tokio::spawn(mcp_broker::broker::reload::watch(
        broker.clone(),
        reload.0,
        reload.1,
        mcp_broker::broker::reload::DEFAULT_POLL,
        shutdown.clone(),
    ));
    let csi = match csi_settings {
        Some(c) => Some(start_csi(&broker, c, &shutdown).await?),
        None => None,
    };
    tracing::info!(socket = %socket.display(), "broker listening");
    broker.serve(listener, remove_at_exit, shutdown).await;
    if let Some(p) = csi {
        p.stopped().await;
    }
    Ok(())
}

/// The CSI node plugin (`[csi]`).
#[cfg(feature = "csi")]
async fn start_csi(
    broker: &Arc<Broker>,
    c: mcp_broker::config::csi::CsiSettings,
    shutdown: &CancellationToken,
) -> anyhow::Result<mcp_broker::csi::Plugin> {
    Ok(mcp_broker::csi::Plugin::start(broker.clone(), c, shutdown.clone()).await?)
}

/// Stands in for the plugin in a build without it (never constructed).
#[cfg(not(feature = "csi"))]
enum NoCsi {}

#[cfg(not(feature = "csi"))]
impl NoCsi {
    async fn stopped(self) {}
}

/// This build has no CSI plugin: say so instead of ignoring the section.
#[cfg(not(feature = "csi"))]
async fn start_csi(
    _: &Arc<Broker>,
    _: mcp_broker::config::csi::CsiSettings,
    _: &CancellationToken,
) -> anyhow::Result<NoCsi> {
    anyhow::bail!("[csi] needs a build with the `csi` feature (this one was built without it)")
}

/// Identity and events from the Kubernetes API (`identity = "kubernetes"`).
#[cfg(feature = "kubernetes")]
async fn start_kubernetes(
    broker: &Arc<Broker>,
    k: &config::KubeSettings,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("identity = \"kubernetes\": cannot build a Kubernetes client (in-cluster config or KUBECONFIG)")?;
    broker.set_token_reviewer(mcp_broker::policy::tokenreview::TokenReviewer::new(
        client.clone(),
        k.audience.clone(),
        k.cache_ttl,
    ));
    tracing::info!("verifying ServiceAccount tokens with the TokenReview API");
    if k.peer_identity {
        let node = k.node_name.clone().unwrap_or_default();
        let idx =
            mcp_broker::policy::pods::PodIndex::start(client.clone(), &node, shutdown.clone());
        broker.set_pod_index(idx);
        tracing::info!(node, "identifying callers' pods by peer credentials");
    }
    match mcp_broker::kube_events::PodRef::from_env() {
        Some(pod) => {
            let recorder = mcp_broker::kube_events::Recorder::new(
                client,
                pod,
                mcp_broker::kube_events::DEFAULT_MIN_INTERVAL,
            );
            tokio::spawn(mcp_broker::kube_events::watch(
                broker.clone(),
                recorder,
                shutdown.clone(),
            ));
        }
        None => tracing::info!("POD_NAME/POD_NAMESPACE not set: no Kubernetes Events"),
    }
    Ok(())
}

/// This build has no Kubernetes client: say so instead of ignoring the setting.
#[cfg(not(feature = "kubernetes"))]
async fn start_kubernetes(
    _: &Arc<Broker>,
    _: &config::KubeSettings,
    _: &CancellationToken,
) -> anyhow::Result<()> {
    anyhow::bail!(
        "[broker] identity = \"kubernetes\" needs a build with the `kubernetes` feature \
         (this one was built with --no-default-features)"
    )
}
