//! Shared test harness: a broker on a temp socket with fixture pools, a
//! lease client, a proxy on a loopback port, raw HTTP helpers, and a leak
//! check that finds every process (grandchildren included) a test started
//! by a tag in its environment.
#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use mcp_broker::broker::{socket, Broker};
use mcp_broker::config::{BrokerSettings, Config, PoolConfig};
use mcp_broker::metrics::Metrics;
use mcp_broker::pool::PoolStatus;
use mcp_broker::proxy::backend::Backend;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Env var whose value marks every process a test started.
pub const TAG_VAR: &str = "MCP_BROKER_TEST_TAG";

/// A pool running the crate's fixture server with `args`.
pub fn fixture_pool(name: &str, args: &[&str]) -> PoolConfig {
    let mut p = PoolConfig::new(
        name,
        env!("CARGO_BIN_EXE_mcp-fixture"),
        args.iter().map(|s| s.to_string()).collect(),
    );
    p.stop_grace = Duration::from_millis(500);
    p
}

/// A running broker.
pub struct TestBroker {
    pub broker: Arc<Broker>,
    pub socket: PathBuf,
    pub metrics: Arc<Metrics>,
    pub tag: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
    /// What it was started with, for [`Self::restart_after`].
    pools: Vec<PoolConfig>,
    settings: BrokerSettings,
}

impl TestBroker {
    /// Starts a broker with `pools`, all tagged for the leak check.
    pub async fn start(pools: Vec<PoolConfig>) -> TestBroker {
        Self::start_with(pools, |_| {}).await
    }

    /// Like [`Self::start`], with a hook to adjust broker settings.
    pub async fn start_with(
        mut pools: Vec<PoolConfig>,
        adjust: impl FnOnce(&mut BrokerSettings),
    ) -> TestBroker {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        for p in &mut pools {
            p.env.insert(TAG_VAR.into(), tag.clone());
        }
        let dir = tempfile::tempdir().unwrap();
        // Pool users (a uid per pool when the tests run as root) reach their
        // homes under `state` through this directory.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o711),
        )
        .unwrap();
        let socket = dir.path().join("broker.sock");
        let mut settings = BrokerSettings {
            socket: socket.clone(),
            metrics_listen: None,
            drain_timeout: Duration::from_secs(5),
            ..BrokerSettings::default()
        };
        settings.node.state_dir = dir.path().join("state");
        adjust(&mut settings);
        Self::launch(pools, settings, tag, dir)
    }

    fn launch(
        pools: Vec<PoolConfig>,
        settings: BrokerSettings,
        tag: String,
        dir: tempfile::TempDir,
    ) -> TestBroker {
        let socket = settings.socket.clone();
        let metrics = Arc::new(Metrics::new());
        let broker = Broker::start(
            Config {
                broker: settings.clone(),
                pools: pools.clone(),
            },
            metrics.clone(),
        );
        let listener = socket::bind(&socket, 0o600, None).unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(broker.clone().serve(
            listener,
            Some(socket.clone()),
            shutdown.clone(),
        ));
        TestBroker {
            broker,
            socket,
            metrics,
            tag,
            shutdown,
            task,
            _dir: dir,
            pools,
            settings,
        }
    }

    /// Restarts the broker as an operator would: shut down (drain, stop
    /// every process, remove the socket), wait `gap`, then start a new
    /// broker with the same pools on the same socket path (same leak tag).
    pub async fn restart_after(self, gap: Duration) -> TestBroker {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("broker shut down in time")
            .unwrap();
        assert_no_procs(&self.tag).await;
        // The scenario's downtime, not synchronisation: callers test what
        // happens while no broker runs.
        tokio::time::sleep(gap).await;
        Self::launch(self.pools, self.settings, self.tag, self._dir)
    }

    /// A lease API client for `pool`.
    pub fn client(&self, pool: &str) -> Backend {
        Backend::new(
            self.socket.clone(),
            pool.to_string(),
            16 << 20,
            Arc::new(Metrics::new()),
        )
    }

    /// Waits until `pool` has at least `n` idle processes.
    pub async fn wait_idle(&self, pool: &str, n: usize) {
        self.wait_status(pool, |s| s.idle >= n).await;
    }

    /// Waits (up to 20 s) until the status of `pool` satisfies `cond`.
    pub async fn wait_status(&self, pool: &str, cond: impl Fn(&PoolStatus) -> bool) {
        let p = self.broker.pool(pool).unwrap().clone();
        wait_until(Duration::from_secs(20), || cond(&p.status())).await;
    }

    /// Shuts down, then asserts no process the test started is left.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("broker shut down in time")
            .unwrap();
        assert!(!self.socket.exists(), "socket removed at shutdown");
        assert_no_procs(&self.tag).await;
    }

    /// Starts shutdown without waiting.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }
}

/// Polls `cond` every 20 ms until it holds, panicking after `limit`.
pub async fn wait_until(limit: Duration, cond: impl FnMut() -> bool) {
    assert!(
        poll_until(limit, cond).await,
        "condition not reached within {limit:?}"
    );
}

/// Polls `cond` every 20 ms until it holds (true) or `limit` passes (false).
pub async fn poll_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() >= limit {
            return false;
        }
        // The poll interval of this bounded wait.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// [`poll_until`] for synchronous tests: polls `cond` every 20 ms until it
/// holds (true) or `limit` passes (false), blocking the thread.
pub fn poll_blocking(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() >= limit {
            return false;
        }
        // The poll interval of this bounded wait.
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Pids of live (non-zombie) processes whose environment carries `tag`.
pub fn procs_with_tag(tag: &str) -> Vec<u32> {
    let needle = format!("{TAG_VAR}={tag}");
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(env) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        if !env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()) {
            continue;
        }
        if mcp_broker::process::stat::read(pid).is_some_and(|s| s.live()) {
            out.push(pid);
        }
    }
    out
}

/// Asserts (waiting up to 5 s) that no process carries `tag`.
pub async fn assert_no_procs(tag: &str) {
    if !poll_until(Duration::from_secs(5), || procs_with_tag(tag).is_empty()).await {
        panic!("processes left behind: {:?}", procs_with_tag(tag));
    }
}

/// A `tools/call` request.
pub fn tool(id: impl Into<Value>, name: &str, args: Value) -> Value {
    json!({"jsonrpc":"2.0","id":id.into(),"method":"tools/call","params":{"name":name,"arguments":args}})
}

/// Runs one lease to its end: (HTTP status, every message in order).
pub async fn lease(c: &Backend, msg: &Value, session: Option<&str>) -> (u16, Vec<Value>) {
    let mut l = c
        .lease(msg, session, &mcp_broker::proxy::backend::new_lease_id())
        .await
        .expect("broker reachable");
    let mut out = Vec::new();
    while let Some(m) = l.lines.next().await {
        out.push(m.expect("valid line"));
    }
    (l.status.as_u16(), out)
}

/// A request that keeps its process busy until the test says so: the
/// fixture's `sample` tool, waiting for the caller's answer to its
/// `sampling/createMessage` (handshake-era pools; a stateless fixture
/// answers `sample` at once with an `InputRequiredResult`).
pub struct Held {
    pub lease: mcp_broker::proxy::backend::Lease,
    /// The server's request, proof that the call is on a process.
    pub ask: Value,
}

impl Held {
    /// Starts `sample` (request `id`) and returns once it runs on a process.
    pub async fn start(c: &Backend, id: u64) -> Held {
        let mut lease = c
            .lease(
                &tool(id, "sample", json!({"prompt": "hold"})),
                None,
                &mcp_broker::proxy::backend::new_lease_id(),
            )
            .await
            .expect("broker reachable");
        let ask = lease
            .lines
            .next()
            .await
            .expect("the server asks")
            .expect("valid line");
        assert_eq!(ask["method"], "sampling/createMessage", "{}", short(&ask));
        Held { lease, ask }
    }

    /// Answers the server with `text`; returns the call's response (the
    /// tool echoes the answer) after checking nothing follows it.
    pub async fn finish(mut self, c: &Backend, text: &str) -> Value {
        let token = self.lease.token.clone().expect("lease token");
        let answer = json!({"jsonrpc": "2.0", "id": self.ask["id"], "result": {
            "role": "assistant", "content": {"type": "text", "text": text}, "model": "m"}});
        c.deliver(&token, &answer).await.expect("answer delivered");
        let fin = self
            .lease
            .lines
            .next()
            .await
            .expect("a response")
            .expect("valid line");
        assert!(
            self.lease.lines.next().await.is_none(),
            "nothing after the response"
        );
        fin
    }
}

/// The pid a fixture `whoami` answer (`pid=N calls=M`) names.
pub fn pid_of(whoami: &str) -> u32 {
    whoami
        .strip_prefix("pid=")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("not a whoami answer: {whoami}"))
}

/// The text of a tool result's first content item.
pub fn text_of(msg: &Value) -> String {
    msg.pointer("/result/content/0/text")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("not a text result: {}", short(msg)))
        .to_string()
}

/// The error code of an error response.
pub fn code_of(msg: &Value) -> i64 {
    msg.pointer("/error/code")
        .and_then(Value::as_i64)
        .unwrap_or_else(|| panic!("not an error: {}", short(msg)))
}

/// A running proxy in front of a [`TestBroker`] pool.
pub struct TestProxy {
    pub url: String,
    pub base: String,
    /// The proxy's own metrics registry.
    pub metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl TestProxy {
    /// Starts a proxy for `pool` of `broker` on a free loopback port.
    pub async fn start(broker: &TestBroker, pool: &str) -> TestProxy {
        Self::start_with(&broker.socket, pool, |_| {}).await
    }

    /// Starts a proxy for `pool` of the broker on `socket`, with settings
    /// adjusted by `adjust`.
    pub async fn start_with(
        socket: &std::path::Path,
        pool: &str,
        adjust: impl FnOnce(&mut mcp_broker::proxy::ProxySettings),
    ) -> TestProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut settings = mcp_broker::proxy::ProxySettings {
            listen: addr,
            socket: socket.to_path_buf(),
            pool: pool.into(),
            drain_timeout: Duration::from_secs(2),
            ..Default::default()
        };
        adjust(&mut settings);
        let metrics = Arc::new(Metrics::new());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(mcp_broker::proxy::serve(
            listener,
            settings,
            metrics.clone(),
            shutdown.clone(),
        ));
        TestProxy {
            url: format!("http://{addr}/mcp"),
            base: format!("http://{addr}"),
            metrics,
            shutdown,
            task,
        }
    }

    /// Stops the proxy.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

/// A raw HTTP response.
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Reply {
    /// The body as JSON (or the single SSE response event).
    pub fn json(&self) -> Value {
        if self.content_type().starts_with("text/event-stream") {
            let msgs = sse_messages(&self.body);
            return msgs.last().cloned().unwrap_or(Value::Null);
        }
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    }

    pub fn content_type(&self) -> String {
        self.header("content-type").unwrap_or_default()
    }
}

/// The JSON messages of an SSE body.
pub fn sse_messages(body: &str) -> Vec<Value> {
    body.split("\n\n")
        .filter_map(|ev| {
            let data: Vec<&str> = ev
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .collect();
            (!data.is_empty()).then(|| serde_json::from_str(&data.join("\n")).unwrap())
        })
        .collect()
}

/// Sends one HTTP request and reads the whole answer.
pub async fn send(method: &str, url: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let mut req = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body.to_string()))).unwrap();
    let r = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .expect("answer in time")
        .expect("request sent");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = tokio::time::timeout(Duration::from_secs(30), r.into_body().collect())
        .await
        .expect("body in time")
        .unwrap()
        .to_bytes();
    Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// Standard headers of a handshake-era POST.
pub const JSON_SSE: (&str, &str) = ("accept", "application/json, text/event-stream");
pub const CT_JSON: (&str, &str) = ("content-type", "application/json");

/// Opens a handshake-era session; returns its id.
pub async fn initialize(url: &str, version: &str, capabilities: Value) -> String {
    let body = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{
        "protocolVersion": version, "capabilities": capabilities,
        "clientInfo": {"name":"test","version":"1"}}});
    let r = send("POST", url, &[JSON_SSE, CT_JSON], &body.to_string()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.header("mcp-session-id").expect("session id issued")
}

/// A message shortened for assertion output.
pub fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 300 {
        format!("{}…({} bytes)", &s[..300], s.len())
    } else {
        s
    }
}

/// POSTs `msg` on a handshake-era session, answers every server→client
/// request that arrives on the SSE stream with `answer(request)` (POSTed
/// back with the session), and returns every message of the stream, the
/// response to `msg` last.
pub async fn sse_round_trip(
    url: &str,
    session: &str,
    msg: &Value,
    answer: impl Fn(&Value) -> Value,
) -> Vec<Value> {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let req = http::Request::post(url)
        .header("accept", "application/json, text/event-stream")
        .header("content-type", "application/json")
        .header("mcp-session-id", session)
        .body(Full::new(Bytes::from(msg.to_string())))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let mut body = resp.into_body();
    let mut buf = String::new();
    let mut answered = std::collections::HashSet::new();
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(20), body.frame())
            .await
            .expect("stream progresses")
            .expect("stream ends only after the response")
            .unwrap();
        if let Ok(data) = frame.into_data() {
            buf.push_str(&String::from_utf8_lossy(&data));
        }
        let msgs = sse_messages(&buf);
        for m in &msgs {
            if m.get("method").is_some()
                && m.get("id").is_some()
                && answered.insert(m["id"].to_string())
            {
                let a = json!({"jsonrpc": "2.0", "id": m["id"], "result": answer(m)});
                let r = send(
                    "POST",
                    url,
                    &[JSON_SSE, CT_JSON, ("mcp-session-id", session)],
                    &a.to_string(),
                )
                .await;
                assert_eq!(r.status, 202, "answer accepted: {}", r.body);
            }
        }
        if msgs
            .iter()
            .any(|m| m.get("id") == msg.get("id") && m.get("method").is_none())
        {
            return msgs;
        }
    }
}

/// Knows `token-<ns>` as `<ns>/agent` (a TokenReview stand-in).
pub struct Tokens;

impl mcp_broker::policy::TokenVerifier for Tokens {
    fn verify<'a>(
        &'a self,
        token: &'a str,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<mcp_broker::policy::KubeIdentity, String>>
                + Send
                + 'a,
        >,
    > {
        Box::pin(async move {
            token
                .strip_prefix("token-")
                .map(|ns| mcp_broker::policy::KubeIdentity {
                    namespace: ns.into(),
                    service_account: "agent".into(),
                })
                .ok_or_else(|| "unknown token".to_string())
        })
    }
}
