//! The `fanout` scenario: N host sessions, each spawning "its" stdio server
//! the way an MCP host does, three ways side by side:
//!
//! * `direct` — every session spawns the server itself (N processes);
//! * `shim-shared` — every session spawns `mcp-broker connect --shared --
//!   CMD`: one on-demand pool of the per-user broker, processes shared;
//! * `shim-exclusive` — `mcp-broker connect -- CMD`: a warm process of its
//!   own per session (the default for on-demand pools).
//!
//! A per-user broker is started for each shim way (so no process of one way
//! lingers into the other's counts), and its pool is warmed by one session (so "time to first answer" is
//! against a warm pool, as a host sees it from its second session on).
//! All N sessions start at once; each one's time from spawn to its
//! `initialize` answer and to its first `tools/call` answer is recorded;
//! then every session makes calls one at a time for throughput. With all
//! sessions still open, every process this bench has started is counted
//! and its RSS summed (broker and pool processes included). Everything is
//! stopped before the next step.

use super::client::{token, Outcome, Template};
use super::report::Row;
use super::stdio::StdioServer;
use super::{children, sys};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Session counts of a full run.
pub const LEVELS: &[usize] = &[1, 8, 32, 64];
/// Session counts of `--quick`.
pub const QUICK_LEVELS: &[usize] = &[1, 8];

/// One (way, N) step.
#[derive(Debug, Clone, Serialize)]
pub struct FanRow {
    pub how: String,
    pub sessions: usize,
    /// Processes running with every session open (shims, broker, servers).
    pub processes: usize,
    /// Their total resident memory (shared pages counted in every process).
    pub rss_mib: f64,
    /// Their total proportional set size (shared pages divided among
    /// their sharers): the memory they really cost.
    pub pss_mib: f64,
    /// Mean RSS of one session's own process (the server, or the shim).
    pub session_rss_mib: f64,
    /// Spawn to `initialize` answer, median and worst.
    pub init_p50_ms: f64,
    pub init_max_ms: f64,
    /// Spawn to the first `tools/call` answer, median and worst.
    pub first_p50_ms: f64,
    pub first_max_ms: f64,
    pub throughput: f64,
    pub errors: u64,
}

/// What a step needs.
pub struct Fanout<'a> {
    pub server: &'a [String],
    pub template: Arc<Template>,
    pub out: &'a Path,
    pub calls_per_session: u64,
    pub timeout: Duration,
    pub start_timeout: Duration,
    /// The `mcp-broker` the sessions spawn as their shim (default: this one).
    pub shim_exe: Option<&'a Path>,
}

/// `Pss` of `pid` in bytes (0 if gone).
fn pss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            let l = s.lines().find(|l| l.starts_with("Pss:"))?;
            l.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib * 1024)
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

impl Fanout<'_> {
    /// Runs every level for the three ways; returns the fanout rows and the
    /// matching rows of the main table and chart.
    pub async fn run(&self, levels: &[usize]) -> anyhow::Result<(Vec<FanRow>, Vec<Row>)> {
        let mut fan = Vec::new();
        for &n in levels {
            fan.push(self.step("direct", self.server.to_vec(), n, None).await?);
        }
        let most = levels.iter().copied().max().unwrap_or(1);
        for (how, extra) in [("shim-shared", Some("--shared")), ("shim-exclusive", None)] {
            // A broker of its own per way: no process of the other lingers.
            let socket = self.out.join(format!("fanout-{how}/broker.sock"));
            let _ = std::fs::remove_file(&socket);
            let broker = self.user_broker(&socket, most).await?;
            let r = self
                .shim_rows(how, extra, &socket, levels, broker.pid)
                .await;
            broker.stop(Duration::from_secs(10)).await;
            fan.extend(r?);
        }
        let rows = fan.iter().map(main_row).collect();
        Ok((fan, rows))
    }

    async fn shim_rows(
        &self,
        how: &str,
        extra: Option<&str>,
        socket: &Path,
        levels: &[usize],
        broker: u32,
    ) -> anyhow::Result<Vec<FanRow>> {
        let mut out = Vec::new();
        let cmd = self.shim_cmd(socket, extra)?;
        // Creates and warms the pool; then its spare is back.
        StdioServer::start(&cmd, self.start_timeout)
            .await?
            .stop()
            .await;
        for &n in levels {
            self.wait_spare(socket).await?;
            out.push(self.step(how, cmd.clone(), n, Some(broker)).await?);
        }
        Ok(out)
    }

    fn shim_cmd(&self, socket: &Path, extra: Option<&str>) -> anyhow::Result<Vec<String>> {
        let exe = match self.shim_exe {
            Some(p) => p.display().to_string(),
            None => std::env::current_exe()?.display().to_string(),
        };
        let mut cmd = vec![exe, "connect".into(), "--socket".into()];
        cmd.push(socket.display().to_string());
        cmd.extend(extra.map(str::to_string));
        cmd.push("--".into());
        cmd.extend(self.server.iter().cloned());
        Ok(cmd)
    }

    async fn user_broker(&self, socket: &Path, most: usize) -> anyhow::Result<children::Daemon> {
        let args: Vec<String> = [
            "user-broker",
            "--socket",
            &socket.display().to_string(),
            "--max-processes",
            &(most + 2).to_string(),
            "--pool-idle-timeout",
            "10m",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut d =
            children::Daemon::spawn("user-broker", &args, self.out.join("fanout-broker.log"))?;
        let s = socket.to_path_buf();
        d.wait_ready(self.start_timeout, || {
            let s = s.clone();
            async move {
                let (status, _) = children::unix_get(&s, "/livez", Duration::from_secs(1)).await?;
                anyhow::ensure!(status == 200, "status {status}");
                Ok(())
            }
        })
        .await?;
        Ok(d)
    }

    /// Waits until every on-demand pool has its warm spare and nothing starts.
    async fn wait_spare(&self, socket: &Path) -> anyhow::Result<()> {
        let deadline = Instant::now() + self.start_timeout;
        loop {
            let (_, body) = children::unix_get(socket, "/v1/pools", self.timeout).await?;
            let pools: Vec<crate::lease_api::PoolDescription> = serde_json::from_slice(&body)?;
            if pools
                .iter()
                .all(|p| p.status.idle >= 1 && p.status.starting == 0 && p.status.busy == 0)
            {
                return Ok(());
            }
            anyhow::ensure!(Instant::now() < deadline, "pools never settled: {pools:?}");
            // The poll interval of this bounded wait.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// N sessions of `cmd` at once: start, first call, calls, count, stop.
    async fn step(
        &self,
        how: &str,
        cmd: Vec<String>,
        n: usize,
        broker: Option<u32>,
    ) -> anyhow::Result<FanRow> {
        let starts = (0..n).map(|_| {
            let cmd = cmd.clone();
            async move {
                let t0 = Instant::now();
                let s = StdioServer::start(&cmd, self.start_timeout).await?;
                let init = t0.elapsed();
                let first = s.call(1, self.template.body(1, &token(1)), None).await;
                anyhow::Ok((s, init, t0.elapsed(), first))
            }
        });
        let started = futures::future::join_all(starts).await;
        let mut sessions = Vec::new();
        let (mut inits, mut firsts) = (Vec::new(), Vec::new());
        let mut errors = 0u64;
        let mut failed = None;
        for r in started {
            match r {
                Ok((s, i, f, o)) => {
                    errors += u64::from(o != Outcome::Ok);
                    inits.push(i.as_secs_f64() * 1e3);
                    firsts.push(f.as_secs_f64() * 1e3);
                    sessions.push(s);
                }
                Err(e) => failed = Some(e),
            }
        }
        let result = match failed {
            Some(e) => Err(e),
            None => Ok(self.load(&sessions).await),
        };
        // Counted with every session still open.
        let me = std::process::id();
        let pids = sys::descendants(me);
        let rss: u64 = pids.iter().map(|p| sys::rss(&p.to_string())).sum();
        let pss: u64 = pids.iter().map(|p| pss(*p)).sum();
        let own: u64 = sessions.iter().map(|s| sys::rss(&s.pid.to_string())).sum();
        for s in &sessions {
            s.stop().await;
        }
        let (calls, load_errors, secs) = result?;
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let row = FanRow {
            how: how.to_string(),
            sessions: n,
            processes: pids.len(),
            rss_mib: mib(rss),
            pss_mib: mib(pss),
            session_rss_mib: mib(own) / n.max(1) as f64,
            init_p50_ms: quantile(&mut inits, 0.5),
            init_max_ms: quantile(&mut inits, 1.0),
            first_p50_ms: quantile(&mut firsts, 0.5),
            first_max_ms: quantile(&mut firsts, 1.0),
            throughput: calls as f64 / secs.max(1e-9),
            errors: errors + load_errors,
        };
        eprintln!(
            "bench: fanout {how:>14} N={n:<3} {:>4} procs {:>8.1} MiB RSS {:>8.1} MiB PSS  init p50 {:.1} ms  first answer p50 {:.1} ms (max {:.1})  {:.0} req/s{}",
            row.processes,
            row.rss_mib,
            row.pss_mib,
            row.init_p50_ms,
            row.first_p50_ms,
            row.first_max_ms,
            row.throughput,
            broker.map(|b| format!("  (broker pid {b})")).unwrap_or_default()
        );
        Ok(row)
    }

    /// Every session makes `calls_per_session` calls one at a time, all
    /// sessions at once: (answered calls, errors, seconds).
    async fn load(&self, sessions: &[StdioServer]) -> (u64, u64, f64) {
        let t0 = Instant::now();
        let per = self.calls_per_session;
        let runs = sessions.iter().map(|s| async move {
            let mut errs = 0u64;
            for i in 0..per {
                let id = 2 + i;
                let tok = token(id);
                let body = self.template.body(id, &tok);
                let check = self.template.has_token().then_some(tok.as_str());
                errs += u64::from(s.call(id, body, check).await != Outcome::Ok);
            }
            errs
        });
        let errs: u64 = futures::future::join_all(runs).await.into_iter().sum();
        let calls = per * sessions.len() as u64;
        (calls, errs, t0.elapsed().as_secs_f64())
    }
}

/// The main table's row for a fanout step (throughput against N, the
/// total RSS as the servers' column).
fn main_row(f: &FanRow) -> Row {
    Row {
        scenario: format!("fanout-{}", f.how),
        concurrency: f.sessions,
        requests: 0,
        errors: f.errors,
        crossed: 0,
        throughput: f.throughput,
        p50_ms: f.first_p50_ms,
        p90_ms: f.first_p50_ms,
        p99_ms: f.first_max_ms,
        max_ms: f.first_max_ms,
        lease_wait_ms: None,
        gateway_cpu: None,
        gateway_user_cpu: None,
        gateway_rss_mib: None,
        servers_cpu: None,
        servers_rss_mib: Some(f.pss_mib),
    }
}

/// The fanout section of `results.md`.
pub fn markdown(rows: &[FanRow], server: &[String]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n## fanout: N host sessions spawning `{}`\n\n\
         Processes and RSS: everything running with all N sessions open (shims, \
         per-user broker and pool processes included). Time to first answer: from \
         spawning the session's command to the answer of its first `tools/call`; \
         the shim's pools were warm. RSS counts shared pages (the binary's text, \
         libraries) in every process; PSS divides them among their sharers. RSS \
         per session: the session's own process (the server, or the shim). In the \
         main table these rows show time to first answer as p50/p99 and total PSS \
         as servers RSS.\n",
        server.join(" ")
    );
    s.push_str("| how | N | processes | total RSS MiB | total PSS MiB | RSS per session MiB | init p50 ms | init max ms | first answer p50 ms | first answer max ms | req/s | errors |\n");
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.1} | {:.1} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {} |",
            r.how,
            r.sessions,
            r.processes,
            r.rss_mib,
            r.pss_mib,
            r.session_rss_mib,
            r.init_p50_ms,
            r.init_max_ms,
            r.first_p50_ms,
            r.first_max_ms,
            r.throughput,
            r.errors
        );
    }
    s
}
