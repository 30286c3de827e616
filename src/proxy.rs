//! Stub, replaced below.
use crate::metrics::Metrics;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_MAX_SESSIONS: usize = 10_000;
#[derive(Debug, Clone)]
pub struct ProxySettings { pub listen: SocketAddr, pub socket: PathBuf, pub pool: String, pub allow_origins: Vec<String>, pub max_sessions: usize }
impl Default for ProxySettings { fn default() -> Self { Self { listen: DEFAULT_LISTEN.parse().unwrap(), socket: PathBuf::new(), pool: String::new(), allow_origins: vec![], max_sessions: DEFAULT_MAX_SESSIONS } } }
pub async fn run(_s: ProxySettings, _m: Arc<Metrics>, t: CancellationToken) -> anyhow::Result<()> { t.cancelled().await; Ok(()) }
