//! The load driver: `concurrency` workers, each with its own session, send
//! `tools/call` requests closed-loop (next request when the last answered)
//! or open-loop (on a fixed schedule at a target rate), for a request count
//! or a duration.
//!
//! Invariants: every request sent is counted in exactly one outcome; open
//! loop latency is measured from the scheduled send time, so a stalled
//! target cannot hide its queueing (no coordinated omission); sessions are
//! opened before the clock starts and closed after it stops.

use super::client::{self, HttpSession, Outcome, Template};
use super::stdio::StdioServer;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// When a step ends.
#[derive(Debug, Clone, Copy)]
pub enum Plan {
    /// After this many requests (all workers together).
    Count(u64),
    /// After this long (requests in flight at the end still complete).
    For(Duration),
}

/// One step of load.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    /// Workers, each with one session and at most one request in flight.
    pub concurrency: usize,
    /// When to stop.
    pub plan: Plan,
    /// Open loop at this many requests per second; `None`: closed loop.
    pub rate: Option<f64>,
    /// Longest wait for one answer.
    pub timeout: Duration,
}

/// How the workers reach the target.
#[derive(Clone)]
pub enum Connect {
    /// MCP Streamable HTTP at `http://{addr}{path}`, one session per worker.
    Http { addr: SocketAddr, path: String },
    /// One shared stdio process; each worker is one slot of its in-flight window.
    Stdio(Arc<StdioServer>),
    /// Start the command, initialize, call, kill: per request.
    Spawn(Arc<Vec<String>>),
}

enum Conn {
    Http(HttpSession),
    Stdio(Arc<StdioServer>),
    Spawn(Arc<Vec<String>>),
}

impl Connect {
    async fn open(&self, timeout: Duration) -> anyhow::Result<Conn> {
        Ok(match self {
            Connect::Http { addr, path } => {
                Conn::Http(HttpSession::open(*addr, path, timeout).await?)
            }
            Connect::Stdio(s) => Conn::Stdio(s.clone()),
            Connect::Spawn(cmd) => Conn::Spawn(cmd.clone()),
        })
    }
}

impl Conn {
    async fn call(
        &mut self,
        id: u64,
        body: bytes::Bytes,
        token: Option<&str>,
        timeout: Duration,
    ) -> Outcome {
        match self {
            Conn::Http(h) => h.call(id, body, token).await,
            Conn::Stdio(s) => s.call(id, body, token).await,
            Conn::Spawn(cmd) => match StdioServer::start(cmd, timeout).await {
                Ok(s) => {
                    let o = s.call(id, body, token).await;
                    s.stop().await;
                    o
                }
                Err(_) => Outcome::Transport,
            },
        }
    }

    async fn close(self) {
        if let Conn::Http(h) = self {
            h.close().await;
        }
    }
}

/// What one step measured.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    /// Right answers.
    pub ok: u64,
    /// JSON-RPC errors and tool errors.
    pub rpc_error: u64,
    /// Answers for another request (wrong id or echo).
    pub crossed: u64,
    /// Transport failures.
    pub transport: u64,
    /// Calls with no answer in time.
    pub timeout: u64,
    /// Latency of every request, microseconds, sorted after [`Tally::finish`].
    pub latencies_us: Vec<u32>,
    /// Wall time from the first send to the last answer.
    pub elapsed: Duration,
    /// For duration plans: right answers that arrived within the window
    /// (throughput then ignores the drain of requests still in flight).
    pub window: Option<(u64, Duration)>,
}

impl Tally {
    fn add(&mut self, o: Outcome, lat: Duration) {
        match o {
            Outcome::Ok => self.ok += 1,
            Outcome::RpcError => self.rpc_error += 1,
            Outcome::Crossed => self.crossed += 1,
            Outcome::Transport => self.transport += 1,
            Outcome::Timeout => self.timeout += 1,
        }
        self.latencies_us
            .push(lat.as_micros().min(u32::MAX as u128) as u32);
    }

    fn merge(&mut self, o: Tally) {
        self.ok += o.ok;
        self.rpc_error += o.rpc_error;
        self.crossed += o.crossed;
        self.transport += o.transport;
        self.timeout += o.timeout;
        self.latencies_us.extend(o.latencies_us);
        if let (Some((n, _)), Some((m, _))) = (self.window.as_mut(), o.window) {
            *n += m;
        }
    }

    fn finish(&mut self, elapsed: Duration) {
        self.latencies_us.sort_unstable();
        self.elapsed = elapsed;
    }

    /// Requests sent.
    pub fn requests(&self) -> u64 {
        self.ok + self.errors()
    }

    /// Requests that did not get their right answer.
    pub fn errors(&self) -> u64 {
        self.rpc_error + self.crossed + self.transport + self.timeout
    }

    /// Right answers per second.
    pub fn throughput(&self) -> f64 {
        if let Some((n, d)) = self.window {
            return n as f64 / d.as_secs_f64().max(1e-9);
        }
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.ok as f64 / s
        } else {
            0.0
        }
    }

    /// The `q` quantile (0..=1) of latency in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        let v = &self.latencies_us;
        if v.is_empty() {
            return 0.0;
        }
        let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
        v[rank - 1] as f64 / 1000.0
    }
}

/// Runs one step against `connect`.
pub async fn drive(
    connect: &Connect,
    template: &Arc<Template>,
    spec: Spec,
) -> anyhow::Result<Tally> {
    let c = spec.concurrency.max(1);
    let mut conns = Vec::with_capacity(c);
    for _ in 0..c {
        conns.push(connect.open(spec.timeout).await?);
    }
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = match spec.plan {
        Plan::For(d) => Some(start + d),
        Plan::Count(_) => None,
    };
    let limit = match spec.plan {
        Plan::Count(n) => n,
        Plan::For(_) => u64::MAX,
    };
    let mut tasks = Vec::with_capacity(c);
    for (worker, mut conn) in conns.into_iter().enumerate() {
        let next = next.clone();
        let template = template.clone();
        tasks.push(tokio::spawn(async move {
            let mut t = Tally {
                window: deadline.map(|d| (0, d - start)),
                ..Tally::default()
            };
            let mut k = 0u64;
            loop {
                let (n, scheduled) = match spec.rate {
                    None => (next.fetch_add(1, Ordering::Relaxed), Instant::now()),
                    Some(rate) => {
                        let n = worker as u64 + k * c as u64;
                        k += 1;
                        (
                            n,
                            start + Duration::from_secs_f64(n as f64 / rate.max(0.001)),
                        )
                    }
                };
                if n >= limit || deadline.is_some_and(|d| scheduled >= d) {
                    break;
                }
                if spec.rate.is_some() {
                    tokio::time::sleep_until(scheduled.into()).await;
                }
                let id = n + 1;
                let tok = client::token(id);
                let token = template.has_token().then_some(tok.as_str());
                let o = conn
                    .call(id, template.body(id, &tok), token, spec.timeout)
                    .await;
                t.add(o, scheduled.elapsed());
                if let (Some((n, _)), Some(d)) = (t.window.as_mut(), deadline) {
                    if o == Outcome::Ok && Instant::now() <= d {
                        *n += 1;
                    }
                }
            }
            (t, conn)
        }));
    }
    let mut total = Tally {
        window: deadline.map(|d| (0, d - start)),
        ..Tally::default()
    };
    let mut done = Vec::with_capacity(c);
    for task in tasks {
        match task.await {
            Ok((t, conn)) => {
                total.merge(t);
                done.push(conn);
            }
            Err(e) => anyhow::bail!("a load worker failed: {e}"),
        }
    }
    total.finish(start.elapsed());
    for conn in done {
        conn.close().await;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles() {
        let mut t = Tally::default();
        for i in 1..=100u64 {
            t.add(Outcome::Ok, Duration::from_micros(i * 1000));
        }
        t.add(Outcome::Crossed, Duration::from_micros(1));
        t.finish(Duration::from_secs(1));
        assert_eq!(t.requests(), 101);
        assert_eq!(t.errors(), 1);
        assert!((t.quantile_ms(1.0) - 100.0).abs() < 1e-9);
        assert!((t.quantile_ms(0.5) - 50.0).abs() < 1e-9);
        assert!((t.throughput() - 100.0).abs() < 1e-9);
    }
}
