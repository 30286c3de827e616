//! `mcp-broker bench`: the node-local benchmark. One run drives several
//! scenarios side by side, with the same Rust load generator and the same
//! backend server command:
//!
//! * `ceiling` — a trivial in-process MCP endpoint: the load generator's own limit;
//! * `direct` — one server process over stdio, requests pipelined with a
//!   window of `concurrency` (the physical limit);
//! * `relay` — the ceiling's endpoint in front of one server process, one
//!   request at a time, with nothing else: the floor of `pool-1` ([`relay`]);
//! * `pool-1`, `pool-K` — broker + proxy in this process with a shared pool
//!   of 1 and of K processes;
//! * `exclusive` — an exclusive pool: one warm process per session;
//! * `spawn` — start the server, initialize, call, kill, per request;
//! * `peer:NAME` — another gateway started from a command template;
//! * `fanout` — N host sessions each spawning the server directly vs through
//!   `mcp-broker connect` (shared and exclusive on-demand pools): processes,
//!   RSS, time to first answer, throughput ([`fanout`]);
//! * `memory` — broker and proxy as separate processes: idle RSS of each,
//!   and the broker's RSS with `--queued` calls waiting on a pool of 1
//!   ([`memory`]).
//!
//! Invariants: every request's outcome is counted (an answer for another
//! request is an error, never a success); everything the bench starts runs
//! on loopback or a private socket and is stopped before the next scenario;
//! every wait is bounded. Results go to `--out`: `results.md`, `chart.svg`,
//! `results.json` (and `memory.json`, `fanout.json` with those scenarios).

pub mod children;
pub mod client;
pub mod fanout;
pub mod load;
pub mod memory;
pub mod probe;
pub mod relay;
pub mod report;
mod scenarios;
pub mod stdio;
pub mod sys;
pub mod targets;

use crate::config::{self, Mode, PoolConfig};
use load::{Connect, Plan, Spec};
use probe::{Layout, Probe};
use report::Row;
use scenarios::{ceiling, direct, exclusive, peer, pooled, relay, spawn};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use targets::Stack;
use tokio_util::sync::CancellationToken;

/// Flags of `mcp-broker bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Directory for results.md, chart.svg and results.json.
    #[arg(long, default_value = "bench-out")]
    pub out: PathBuf,
    /// Scenarios to run: ceiling, direct, relay (a bare relay to one server
    /// process: pool-1's floor), pool, sidecar (a pool of 1 with the proxy on
    /// the broker's socket), exclusive, spawn, peer, fanout, memory.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ceiling,direct,relay,pool,exclusive,spawn,peer,fanout,memory"
    )]
    pub scenarios: Vec<String>,
    /// Concurrency levels (sessions, each with one request in flight).
    #[arg(long, short = 'c', value_delimiter = ',', default_value = "1,4,16,64")]
    pub concurrency: Vec<usize>,
    /// Pool sizes K besides the pool of 1.
    #[arg(long, value_delimiter = ',', default_value = "4")]
    pub pools: Vec<usize>,
    /// Requests per step.
    #[arg(long, short = 'n', default_value_t = 5000)]
    pub requests: u64,
    /// Run each step this long instead of a request count (e.g. 5s).
    #[arg(long, value_parser = config::parse_duration)]
    pub duration: Option<Duration>,
    /// Open loop at this many requests per second (default: closed loop).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Requests per step of the spawn-per-request scenario.
    #[arg(long, default_value_t = 200)]
    pub spawn_requests: u64,
    /// Highest concurrency for exclusive and spawn-per-request (one process per session).
    #[arg(long, default_value_t = 32)]
    pub max_processes: usize,
    /// Tool to call (default: echo).
    #[arg(long, default_value = "echo")]
    pub tool: String,
    /// Tool arguments as JSON; `{seq}` becomes a per-request token that the
    /// answer must echo (default: {"text":"{seq}"} for the fixture,
    /// {"message":"{seq}"} for other servers).
    #[arg(long)]
    pub args: Option<String>,
    /// Fixture service time: call the fixture's `sleep` tool with this many ms.
    #[arg(long)]
    pub sleep_ms: Option<u64>,
    /// A peer gateway as a shell command template with `{port}` and `{cmd}`,
    /// optionally named `NAME=TEMPLATE`; repeatable.
    #[arg(long = "peer")]
    pub peers: Vec<String>,
    /// MCP path of peers.
    #[arg(long, default_value = "/mcp")]
    pub peer_path: String,
    /// Longest wait for one answer.
    #[arg(long, value_parser = config::parse_duration, default_value = "30s")]
    pub timeout: Duration,
    /// Longest wait for pools, servers and peers to start.
    #[arg(long, value_parser = config::parse_duration, default_value = "60s")]
    pub start_timeout: Duration,
    /// Host sessions of the fanout scenario [default: 1,8,32,64; --quick: 1,8].
    #[arg(long, value_delimiter = ',')]
    pub fanout: Vec<usize>,
    /// Calls each fanout session makes, one at a time, for throughput.
    #[arg(long, default_value_t = 50)]
    pub fanout_calls: u64,
    /// The `mcp-broker` binary fanout sessions spawn as their shim, e.g. the
    /// client build (`--no-default-features`) [default: this binary].
    #[arg(long)]
    pub shim_exe: Option<PathBuf>,
    /// Calls put in the broker's queue at once by the memory scenario.
    #[arg(long, default_value_t = 10_000)]
    pub queued: usize,
    /// A few seconds in all: concurrency 1,8, 300 requests per step, pool of
    /// 2, 1000 queued calls.
    #[arg(long)]
    pub quick: bool,
    /// Process threads of the runtime the broker and proxy run on (as
    /// `mcp-broker up --threads`).
    #[arg(long, default_value_t = crate::runtime::DEFAULT_LEAN_THREADS as u16,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub server_threads: u16,
    /// Run the pools' servers without a uid and cgroup of their own (as
    /// `[broker] isolation = "off"`, `cgroups = "off"`), to see what the
    /// isolation costs; by default the broker isolates where it can, as it
    /// does when deployed.
    #[arg(long)]
    pub no_isolation: bool,
    /// The stdio server command (default: the mcp-fixture next to this binary).
    #[arg(last = true)]
    pub command: Vec<String>,
}

/// Keeps the server runtime and shuts it down without blocking on drop.
struct ServerRt(Option<tokio::runtime::Runtime>);

impl Drop for ServerRt {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

struct Ctx {
    args: BenchArgs,
    cmd: Vec<String>,
    template: Arc<client::Template>,
    rt: ServerRt,
    rows: Vec<Row>,
    memory: Vec<memory::MemRow>,
    fanout: Vec<fanout::FanRow>,
    shutdown: CancellationToken,
}

fn fixture_path() -> anyhow::Result<String> {
    let exe = std::env::current_exe()?;
    let p = exe.with_file_name("mcp-fixture");
    anyhow::ensure!(
        p.exists(),
        "no mcp-fixture next to {} (build it with `cargo build --bins`) and no `-- CMD` given",
        exe.display()
    );
    Ok(p.display().to_string())
}

/// Runs the bench and writes its report.
pub async fn run(mut args: BenchArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    if args.quick {
        args.concurrency = vec![1, 8];
        args.requests = args.requests.min(300);
        args.spawn_requests = args.spawn_requests.min(20);
        args.pools = vec![2];
        args.duration = None;
        args.queued = args.queued.min(1000);
        args.fanout_calls = args.fanout_calls.min(10);
        if args.fanout.is_empty() {
            args.fanout = fanout::QUICK_LEVELS.to_vec();
        }
    }
    if args.fanout.is_empty() {
        args.fanout = fanout::LEVELS.to_vec();
    }
    anyhow::ensure!(
        args.fanout.iter().all(|n| *n > 0),
        "--fanout needs positive session counts"
    );
    anyhow::ensure!(args.queued > 0, "--queued needs at least 1");
    anyhow::ensure!(
        !args.concurrency.is_empty() && args.concurrency.iter().all(|c| *c > 0),
        "--concurrency needs positive levels"
    );
    let fixture = args.command.is_empty();
    let cmd = if fixture {
        vec![fixture_path()?]
    } else {
        args.command.clone()
    };
    let (tool, targs) = match (args.sleep_ms, fixture) {
        (Some(ms), true) => ("sleep".to_string(), format!(r#"{{"ms":{ms}}}"#)),
        (Some(_), false) => anyhow::bail!("--sleep-ms needs the fixture backend"),
        (None, true) => (
            args.tool.clone(),
            args.args
                .clone()
                .unwrap_or_else(|| r#"{"text":"{seq}"}"#.into()),
        ),
        (None, false) => (
            args.tool.clone(),
            args.args
                .clone()
                .unwrap_or_else(|| r#"{"message":"{seq}"}"#.into()),
        ),
    };
    let template = Arc::new(client::Template::new(&tool, &targs)?);
    std::fs::create_dir_all(&args.out)?;
    let header = format!(
        "Backend `{}`, tool `{tool}` with `{targs}`; {} per step{}; {} CPUs; `{}`",
        cmd.join(" "),
        match args.duration {
            Some(d) => format!("{d:?}"),
            None => format!("{} requests", args.requests),
        },
        args.rate
            .map(|r| format!(", open loop at {r} req/s"))
            .unwrap_or_default(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        std::env::args().collect::<Vec<_>>().join(" "),
    );
    let mut ctx = Ctx {
        cmd,
        template,
        rt: ServerRt(Some(targets::server_runtime(args.server_threads.into())?)),
        rows: Vec::new(),
        memory: Vec::new(),
        fanout: Vec::new(),
        shutdown,
        args,
    };
    let wants = |s: &str| ctx.args.scenarios.iter().any(|x| x == s);
    let w_fanout = wants("fanout");
    let w_relay = wants("relay");
    let (w_ceiling, w_direct, w_pool, w_side, w_excl, w_spawn, w_peer, w_mem) = (
        wants("ceiling"),
        wants("direct"),
        wants("pool"),
        wants("sidecar"),
        wants("exclusive"),
        wants("spawn"),
        wants("peer"),
        wants("memory"),
    );
    if w_ceiling {
        report_err("ceiling", ceiling(&mut ctx).await);
    }
    if w_direct {
        report_err("direct", direct(&mut ctx).await);
    }
    if w_relay {
        report_err("relay", relay(&mut ctx).await);
    }
    if w_pool {
        let mut sizes = vec![1];
        sizes.extend(ctx.args.pools.iter().copied().filter(|k| *k > 1));
        sizes.dedup();
        for k in sizes {
            report_err(&format!("pool-{k}"), pooled(&mut ctx, k, false).await);
        }
    }
    if w_side {
        report_err("sidecar-1", pooled(&mut ctx, 1, true).await);
    }
    if w_excl {
        report_err("exclusive", exclusive(&mut ctx).await);
    }
    if w_spawn {
        report_err("spawn", spawn(&mut ctx).await);
    }
    if w_peer {
        for p in ctx.args.peers.clone() {
            report_err(&format!("peer {p}"), peer(&mut ctx, &p).await);
        }
    }
    if w_fanout {
        report_err("fanout", fanout_set(&mut ctx).await);
    }
    if w_mem {
        report_err("memory", memory_set(&mut ctx).await);
    }
    let mut md = if ctx.rows.is_empty() {
        format!("{header}\n")
    } else {
        report::markdown(&ctx.rows, &header)
    };
    if !ctx.fanout.is_empty() {
        md.push_str(&fanout::markdown(&ctx.fanout, &ctx.cmd));
        std::fs::write(
            ctx.args.out.join("fanout.json"),
            serde_json::to_string_pretty(&ctx.fanout)?,
        )?;
    }
    if !ctx.memory.is_empty() {
        md.push_str(&memory::markdown(&ctx.memory));
        std::fs::write(
            ctx.args.out.join("memory.json"),
            serde_json::to_string_pretty(&ctx.memory)?,
        )?;
    }
    std::fs::write(ctx.args.out.join("results.md"), &md)?;
    std::fs::write(ctx.args.out.join("chart.svg"), report::svg(&ctx.rows))?;
    std::fs::write(
        ctx.args.out.join("results.json"),
        serde_json::to_string_pretty(&ctx.rows)?,
    )?;
    println!("{md}");
    println!("(written to {})", ctx.args.out.display());
    Ok(())
}

/// The fanout scenario set, on the bench's server command.
async fn fanout_set(ctx: &mut Ctx) -> anyhow::Result<()> {
    let f = fanout::Fanout {
        server: &ctx.cmd,
        template: ctx.template.clone(),
        out: &ctx.args.out,
        calls_per_session: ctx.args.fanout_calls.max(1),
        timeout: ctx.args.timeout,
        start_timeout: ctx.args.start_timeout,
        shim_exe: ctx.args.shim_exe.as_deref(),
    };
    let levels = ctx.args.fanout.clone();
    let run = f.run(&levels);
    let (fan, rows) = tokio::select! {
        r = run => r?,
        _ = ctx.shutdown.cancelled() => anyhow::bail!("interrupted"),
    };
    ctx.fanout = fan;
    ctx.rows.extend(rows);
    Ok(())
}

/// The memory scenario set: always on the fixture (it needs `sleep`).
async fn memory_set(ctx: &mut Ctx) -> anyhow::Result<()> {
    let fixture = fixture_path()?;
    let rows = memory::run(
        &ctx.args.out,
        &fixture,
        ctx.args.queued,
        ctx.args.start_timeout,
        &ctx.shutdown,
    )
    .await?;
    for r in &rows {
        eprintln!(
            "bench: memory {:>6} {:>7.1} MiB (peak {:.1})  {}  {}",
            r.process,
            r.rss_mib,
            r.hwm_mib,
            if r.met { "met" } else { "NOT met" },
            r.measurement
        );
    }
    ctx.memory = rows;
    Ok(())
}

fn report_err(what: &str, r: anyhow::Result<()>) {
    if let Err(e) = r {
        eprintln!("bench: {what}: {e:#}");
    }
}

impl Ctx {
    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt
            .0
            .as_ref()
            .expect("server runtime lives until the end")
    }

    fn spec(&self, concurrency: usize, requests: u64) -> Spec {
        Spec {
            concurrency,
            plan: match self.args.duration {
                Some(d) => Plan::For(d),
                None => Plan::Count(requests),
            },
            rate: self.args.rate,
            timeout: self.args.timeout,
        }
    }

    /// The broker's node settings: isolation as deployed, or off.
    fn node(&self) -> crate::config::NodeSettings {
        let mut n = crate::config::NodeSettings::default();
        if self.args.no_isolation {
            n.isolation = crate::config::raw::Isolation::Off;
            n.cgroups = crate::config::raw::Isolation::Off;
        }
        n
    }

    fn pool_config(&self, mode: Mode, size: usize) -> PoolConfig {
        let mut p = PoolConfig::new(targets::POOL, &self.cmd[0], self.cmd[1..].to_vec());
        p.mode = mode;
        p.min_idle = size;
        p.max = size;
        p.request_timeout = self.args.timeout;
        p.queue_timeout = self.args.timeout;
        let most = self.args.concurrency.iter().copied().max().unwrap_or(1);
        p.queue_limit = p.queue_limit.max(most * 2);
        p.stop_grace = Duration::from_millis(500);
        p
    }

    /// Runs one step and records its row.
    async fn step(
        &mut self,
        name: &str,
        connect: &Connect,
        layout: Layout,
        c: usize,
        requests: u64,
        stack: Option<&Stack>,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(!self.shutdown.is_cancelled(), "interrupted");
        let wait0 = stack.map(Stack::lease_wait);
        let probe = Probe::start(layout);
        let spec = self.spec(c, requests);
        let t = tokio::select! {
            t = load::drive(connect, &self.template, spec) => t?,
            _ = self.shutdown.cancelled() => anyhow::bail!("interrupted"),
        };
        let usage = probe.finish();
        let lease_wait_ms = match (stack.map(Stack::lease_wait), wait0) {
            (Some((s1, n1)), Some((s0, n0))) if n1 > n0 => {
                Some((s1 - s0) * 1000.0 / (n1 - n0) as f64)
            }
            _ => None,
        };
        let row = Row {
            scenario: name.to_string(),
            concurrency: c,
            requests: t.requests(),
            errors: t.errors(),
            crossed: t.crossed,
            throughput: t.throughput(),
            p50_ms: t.quantile_ms(0.5),
            p90_ms: t.quantile_ms(0.9),
            p99_ms: t.quantile_ms(0.99),
            max_ms: t.quantile_ms(1.0),
            lease_wait_ms,
            gateway_cpu: usage.gateway_cpu,
            gateway_user_cpu: usage.gateway_user_cpu,
            gateway_rss_mib: usage.gateway_rss_mib,
            servers_cpu: usage.servers_cpu,
            servers_rss_mib: usage.servers_rss_mib,
        };
        eprintln!(
            "bench: {name:>14} c={c:<3} {:>7} req  {:>4} err  {:>9.0} req/s  p50 {:.3} ms  p99 {:.3} ms",
            row.requests, row.errors, row.throughput, row.p50_ms, row.p99_ms
        );
        if t.errors() > 0 {
            eprintln!(
                "bench: {name} c={c}: {} rpc errors, {} crossed, {} transport, {} timeouts",
                t.rpc_error, t.crossed, t.transport, t.timeout
            );
        }
        self.rows.push(row);
        Ok(())
    }

    fn levels(&self) -> Vec<usize> {
        self.args.concurrency.clone()
    }
}
