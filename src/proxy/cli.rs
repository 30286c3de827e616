//! The flags of `mcp-broker proxy` (and the HTTP ones `up` shares), and the
//! start-up both proxy binaries run: `mcp-broker proxy ...` and the slim
//! `mcp-broker-proxy ...` it re-executes into ([`crate::slim`]): a pod
//! keeps one proxy resident beside its workload, so it should not map the
//! node daemon's code.

use super::ProxySettings;
use crate::metrics::Metrics;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// `mcp-broker proxy` flags.
#[derive(Debug, clap::Args)]
pub struct ProxyArgs {
    /// The broker's lease API socket.
    #[arg(long, default_value = crate::config::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// The pool to lease from.
    #[arg(long)]
    pub pool: String,
    /// A projected ServiceAccount token (audience mcp-broker) to present
    /// to the broker, e.g. /var/run/secrets/mcp-broker/token.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    #[command(flatten)]
    pub http: HttpFlags,
}

/// Serves MCP over HTTP as told until `shutdown`.
pub async fn run(args: ProxyArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let mut settings = args.http.settings(args.socket, args.pool);
    settings.token_file = args.token_file;
    super::run(settings, metrics, shutdown).await
}

/// The HTTP side of `proxy` and `up`.
#[derive(Debug, clap::Args)]
pub struct HttpFlags {
    /// Address to serve MCP on.
    #[arg(long, default_value = super::DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Extra allowed `Origin` values (localhost origins are always allowed).
    #[arg(long = "allow-origin")]
    pub allow_origins: Vec<String>,
    /// Extra allowed `Host` values (on a loopback listener localhost is
    /// always allowed; on others, when given, only these are).
    #[arg(long = "allow-host")]
    pub allow_hosts: Vec<String>,
    /// Open MCP sessions at most.
    #[arg(long, default_value_t = super::DEFAULT_MAX_SESSIONS)]
    pub max_sessions: usize,
    /// Open notification streams (GET /mcp, subscriptions/listen) at most.
    #[arg(long, default_value_t = super::DEFAULT_MAX_STREAMS)]
    pub max_streams: usize,
    /// Open GET /mcp streams of one session at most.
    #[arg(long, default_value_t = super::DEFAULT_MAX_STREAMS_PER_SESSION)]
    pub max_streams_per_session: usize,
    /// Open HTTP connections at most (beyond: 503).
    #[arg(long, default_value_t = super::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Open HTTP connections from one client address at most (beyond: 429).
    #[arg(long, default_value_t = super::DEFAULT_MAX_CONNECTIONS_PER_PEER)]
    pub max_connections_per_peer: usize,
    /// Largest request body in bytes (beyond: 413).
    #[arg(long, default_value_t = super::DEFAULT_MAX_BODY as u64, value_parser = clap::value_parser!(u64).range(1024..))]
    pub max_body_bytes: u64,
    /// Largest request line plus headers in bytes (beyond: 431).
    #[arg(long, default_value_t = super::DEFAULT_MAX_HEADER_BYTES as u64,
          value_parser = clap::value_parser!(u64).range(8192..))]
    pub max_header_bytes: u64,
}

impl HttpFlags {
    /// The proxy's settings for pool `pool` of the broker on `socket`.
    pub fn settings(self, socket: PathBuf, pool: String) -> ProxySettings {
        ProxySettings {
            listen: self.listen,
            socket,
            pool,
            allow_origins: self.allow_origins,
            allow_hosts: self.allow_hosts,
            max_sessions: self.max_sessions,
            max_streams: self.max_streams,
            max_streams_per_session: self.max_streams_per_session,
            max_connections: self.max_connections,
            max_connections_per_peer: self.max_connections_per_peer,
            max_body: usize::try_from(self.max_body_bytes).unwrap_or(usize::MAX),
            max_header_bytes: usize::try_from(self.max_header_bytes).unwrap_or(usize::MAX),
            ..ProxySettings::default()
        }
    }
}
