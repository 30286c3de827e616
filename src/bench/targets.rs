//! What the bench drives: broker + proxy started in-process on the bench's
//! server runtime, a peer gateway started from a command template, and a
//! trivial in-process MCP endpoint that measures the load generator itself.
//!
//! Everything started here runs on loopback or a private Unix socket, and
//! every start and stop is bounded by a timeout; a peer runs in its own
//! process group, which is killed whole at stop.

use super::client::HttpSession;
use crate::broker::{socket, Broker};
use crate::config::{BrokerSettings, Config, NodeSettings, PoolConfig};
use crate::metrics::Metrics;
use crate::process::group::Group;
use crate::proxy::{self, ProxySettings};
use crate::web;
use ::http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use nix::sys::signal::Signal;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::runtime::{Handle, Runtime};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Name of the pool the bench creates.
pub const POOL: &str = "bench";
/// Prefix of the server runtime's thread names (for per-thread CPU).
pub const SERVER_THREADS: &str = "mcpb-srv";

/// The bench's second runtime: broker, proxy and the trivial endpoint run
/// here, so their CPU time is told apart from the load generator's. It has
/// `threads` workers, like `mcp-broker up --threads`.
pub fn server_runtime(threads: usize) -> anyhow::Result<Runtime> {
    Ok(crate::runtime::build(
        crate::runtime::Threads::Fixed(threads),
        SERVER_THREADS,
    )?)
}

fn loopback_listener() -> anyhow::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Broker and proxy in this process, as `mcp-broker up` runs them.
pub struct Stack {
    /// The proxy's address; MCP at `/mcp`.
    pub addr: SocketAddr,
    /// The broker's and proxy's metrics.
    pub metrics: Arc<Metrics>,
    broker: Arc<Broker>,
    proxy_done: CancellationToken,
    broker_done: CancellationToken,
    proxy_task: JoinHandle<()>,
    broker_task: JoinHandle<()>,
    _dir: tempfile_dir::Dir,
}

mod tempfile_dir {
    /// A private temporary directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Stack {
    /// Starts a broker with `pool` and a proxy in front of it on `rt`; the
    /// proxy calls the broker in-process as `up` does, or over its socket
    /// (`sidecar`) as a separate `mcp-broker proxy` does.
    pub fn start(
        rt: &Runtime,
        mut pool: PoolConfig,
        node: NodeSettings,
        sidecar: bool,
    ) -> anyhow::Result<Stack> {
        pool.name = POOL.to_string();
        pool.check()?;
        let dir = std::env::temp_dir().join(format!(
            "mcp-broker-bench-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir)?;
        let dir = tempfile_dir::Dir(dir);
        let socket = dir.0.join("broker.sock");
        let metrics = Arc::new(Metrics::new());
        let _enter = rt.enter();
        let broker = Broker::start(
            Config {
                broker: BrokerSettings {
                    socket: socket.clone(),
                    metrics_listen: None,
                    drain_timeout: Duration::from_secs(5),
                    node,
                    ..BrokerSettings::default()
                },
                pools: vec![pool],
            },
            metrics.clone(),
        );
        let listener = socket::bind(&socket, 0o600, None)?;
        let local = (!sidecar).then(|| {
            Arc::new(crate::broker::local::Local::new(broker.clone()))
                as Arc<dyn crate::lease_api::LocalApi>
        });
        let broker_done = CancellationToken::new();
        let broker_task = rt.spawn(broker.clone().serve(
            listener,
            Some(socket.clone()),
            broker_done.clone(),
        ));
        let tcp = tokio::net::TcpListener::from_std(loopback_listener()?)?;
        let addr = tcp.local_addr()?;
        let settings = ProxySettings {
            listen: addr,
            socket,
            local,
            pool: POOL.into(),
            drain_timeout: Duration::from_secs(5),
            ..ProxySettings::default()
        };
        let proxy_done = CancellationToken::new();
        let proxy_task = rt.spawn(proxy::serve(
            tcp,
            settings,
            metrics.clone(),
            proxy_done.clone(),
        ));
        Ok(Stack {
            addr,
            metrics,
            broker,
            proxy_done,
            broker_done,
            proxy_task,
            broker_task,
            _dir: dir,
        })
    }

    /// Waits until the pool has `n` idle processes.
    pub async fn wait_idle(&self, n: usize, limit: Duration) -> anyhow::Result<()> {
        let pool = self
            .broker
            .pool(POOL)
            .ok_or_else(|| anyhow::anyhow!("the bench pool is missing"))?;
        let start = Instant::now();
        loop {
            let st = pool.status();
            if st.idle >= n {
                return Ok(());
            }
            anyhow::ensure!(
                start.elapsed() < limit,
                "the pool did not warm {n} processes within {limit:?} (status: {st:?})"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// (sum of seconds, count) of the lease wait histogram.
    pub fn lease_wait(&self) -> (f64, u64) {
        let h = self.metrics.lease_wait.with_label_values(&[POOL]);
        (h.get_sample_sum(), h.get_sample_count())
    }

    /// Stops proxy then broker (bounded).
    pub async fn stop(self) {
        self.proxy_done.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.proxy_task).await;
        self.broker_done.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(20), self.broker_task).await;
    }
}

/// Quotes `s` for `sh` when it needs it.
fn shell_word(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:@%+,".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// A peer gateway started from a command template.
pub struct Peer {
    /// Where it serves.
    pub addr: SocketAddr,
    /// Its process id (the group leader).
    pub pid: u32,
    child: tokio::process::Child,
    group: Group,
}

impl Peer {
    /// Starts `template` with `{port}` and `{cmd}` filled in, and waits until
    /// an MCP session at `path` can be opened.
    pub async fn start(
        template: &str,
        cmd: &[String],
        path: &str,
        log: &std::path::Path,
        limit: Duration,
    ) -> anyhow::Result<Peer> {
        let port = loopback_listener()?.local_addr()?.port();
        let line = template.replace("{port}", &port.to_string()).replace(
            "{cmd}",
            &cmd.iter()
                .map(|w| shell_word(w))
                .collect::<Vec<_>>()
                .join(" "),
        );
        let log = std::fs::File::create(log)?;
        let child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(format!("exec {line}"))
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start peer {line:?}: {e}"))?;
        let pid = child.id().unwrap_or(0);
        let group = Group::leader(&child);
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut peer = Peer {
            addr,
            pid,
            child,
            group,
        };
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < limit {
            if let Ok(Some(st)) = peer.group.try_reap(&mut peer.child) {
                anyhow::bail!("peer {line:?} exited at start ({st}); see its log");
            }
            match HttpSession::open(addr, path, Duration::from_secs(5)).await {
                Ok(s) => {
                    s.close().await;
                    return Ok(peer);
                }
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        peer.stop().await;
        anyhow::bail!("peer {line:?} did not serve MCP at {addr}{path} within {limit:?}: {last}")
    }

    /// Stops the peer's whole process group: TERM, then KILL after 2 s
    /// (before the leader is reaped, so the group id is still the peer's).
    pub async fn stop(&mut self) {
        self.group.signal(Signal::SIGTERM);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.group.exited()).await;
        // Ends stragglers that ignored TERM, then reaps.
        let reap = self.group.reap(&mut self.child);
        let _ = tokio::time::timeout(Duration::from_secs(5), reap).await;
    }
}

/// The answer of the trivial endpoint to one message.
pub(super) fn trivial_answer(msg: &Value) -> Option<Value> {
    let id = msg.get("id")?.clone();
    if msg.get("method").and_then(Value::as_str) == Some("initialize") {
        return Some(json!({"jsonrpc":"2.0","id":id,"result":{
            "protocolVersion": super::client::PROTOCOL_VERSION,
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "bench-trivial", "version": "1"}}}));
    }
    let text: Vec<&str> = msg
        .pointer("/params/arguments")
        .and_then(Value::as_object)
        .into_iter()
        .flat_map(|m| m.values())
        .filter_map(Value::as_str)
        .collect();
    Some(
        json!({"jsonrpc":"2.0","id":id,"result":{"content":[{"type":"text","text":text.join(" ")}]}}),
    )
}

/// A trivial MCP endpoint answering every call at once (echoing its string
/// arguments): the load generator's own ceiling.
pub struct Trivial {
    /// Where it serves; MCP at any path.
    pub addr: SocketAddr,
    done: CancellationToken,
    task: JoinHandle<()>,
}

/// Serves HTTP/1.1 on a fresh loopback port on `rt`, answering every
/// request with `handler`, until [`Trivial::stop`].
pub(super) fn serve_http<F, Fut>(rt: &Handle, handler: F) -> anyhow::Result<Trivial>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = ::http::Response<web::Body>> + Send + 'static,
{
    let _enter = rt.enter();
    let l = tokio::net::TcpListener::from_std(loopback_listener()?)?;
    let addr = l.local_addr()?;
    let done = CancellationToken::new();
    let d = done.clone();
    let task = rt.spawn(async move {
        loop {
            let stream = tokio::select! {
                _ = d.cancelled() => return,
                a = l.accept() => match a { Ok((s, _)) => s, Err(_) => continue },
            };
            let _ = stream.set_nodelay(true);
            let h = handler.clone();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let f = h(req);
                async move { Ok::<_, std::convert::Infallible>(f.await) }
            });
            tokio::spawn(crate::web::serve_io(
                stream,
                svc,
                d.clone(),
                crate::broker::api::MAX_HEADER_BYTES,
            ));
        }
    });
    Ok(Trivial { addr, done, task })
}

impl Trivial {
    /// Starts it on `rt`.
    pub fn start(rt: &Runtime) -> anyhow::Result<Trivial> {
        serve_http(rt.handle(), |req: Request<Incoming>| async move {
            let post = req.method() == Method::POST;
            let body = web::read_body(req.into_body(), 1 << 20).await;
            let msg = body
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
            match (post, msg.as_ref().and_then(trivial_answer)) {
                (true, Some(a)) => web::json(StatusCode::OK, &a),
                _ => web::response(StatusCode::ACCEPTED, "text/plain", web::empty()),
            }
        })
    }

    /// Stops it (bounded).
    pub async fn stop(self) {
        self.done.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_and_trivial() {
        assert_eq!(shell_word("/a/b-c"), "/a/b-c");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        let a = trivial_answer(&json!({"jsonrpc":"2.0","id":3,"method":"tools/call",
            "params":{"name":"echo","arguments":{"text":"q3q"}}}))
        .unwrap();
        assert_eq!(a["result"]["content"][0]["text"], "q3q");
        assert!(trivial_answer(&json!({"jsonrpc":"2.0","method":"n"})).is_none());
    }
}
