//! The `memory` scenario set: resident memory of the broker and the proxy as
//! separate processes (`mcp-broker serve`, `mcp-broker proxy`), measured
//! from `/proc/PID/status` (`VmRSS`, `VmHWM`), server processes excluded.
//!
//! * **idle** — broker with one fixture pool (`min_idle` 1) and a proxy in
//!   front; a few calls through the proxy, ~2 s idle, then both RSS.
//! * **queued** — against the broker alone, pool of 1: one long `sleep`
//!   call holds the only process, N `echo` calls go in at once straight on
//!   the lease API (one Unix connection each), the broker's RSS is sampled
//!   while they wait; then the hold is dropped (the broker cancels it) and
//!   every call must come back. Each call ends in exactly one counted kind
//!   (`ok`, an error code, a transport failure or `timeout`).
//!
//! Every wait is bounded; the children are stopped on every path.

mod queue;

use super::children::{self, Daemon};
use super::client::Template;
use super::load::{self, Connect, Plan, Spec};
use super::sys;
use super::targets::POOL;
use serde::Serialize;
use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Issue 6 targets, MiB.
const PROXY_IDLE_MIB: f64 = 10.0;
const BROKER_IDLE_MIB: f64 = 20.0;
const BROKER_QUEUED_MIB: f64 = 64.0;
/// Calls sent through the proxy before idling, and the idle time.
const WARM_CALLS: u64 = 20;
const IDLE_FOR: Duration = Duration::from_secs(2);
/// Longest time for all queued calls to reach the queue, and to come back.
const RAMP_LIMIT: Duration = Duration::from_secs(60);
const DRAIN_LIMIT: Duration = Duration::from_secs(120);
const MIB: f64 = 1024.0 * 1024.0;

/// One line of the Memory table.
#[derive(Debug, Clone, Serialize)]
pub struct MemRow {
    pub measurement: String,
    pub process: String,
    /// VmRSS at the measurement (for `queued`: peak sampled while queued), MiB.
    pub rss_mib: f64,
    /// VmHWM (peak RSS since the process started), MiB.
    pub hwm_mib: f64,
    pub target: String,
    pub met: bool,
    pub detail: String,
}

/// A private temporary directory, removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mib(pid: u32, key: &str) -> f64 {
    sys::status_bytes(&pid.to_string(), key) as f64 / MIB
}

/// Runs both measurements; `fixture` is the mcp-fixture binary, `queued`
/// the number of calls put in the queue at once.
pub async fn run(
    out: &Path,
    fixture: &str,
    queued: usize,
    start_timeout: Duration,
    shutdown: &CancellationToken,
) -> anyhow::Result<Vec<MemRow>> {
    let nofile = children::raise_nofile();
    if (nofile as usize) < queued + 256 {
        eprintln!("bench: memory: RLIMIT_NOFILE is {nofile}; {queued} connections may not fit (raise the hard limit)");
    }
    let dir = std::env::temp_dir().join(format!(
        "mcp-broker-bench-mem-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir)?;
    let dir = TempDir(dir);
    let socket = dir.0.join("broker.sock");
    let config = dir.0.join("broker.toml");
    let limit = queued.saturating_add(64);
    std::fs::write(
        &config,
        children::broker_toml(&socket, POOL, fixture, limit),
    )?;
    let args = ["serve", "--config", &config.display().to_string()].map(String::from);
    let mut broker = Daemon::spawn("broker", &args, out.join("memory-broker.log"))?;
    let ready = broker
        .wait_ready(start_timeout, || async {
            let (st, _) = children::unix_get(&socket, "/readyz", Duration::from_secs(2)).await?;
            anyhow::ensure!(st == 200, "/readyz answered {st}");
            Ok(())
        })
        .await;
    let r = match ready {
        Ok(()) => {
            measure(
                out,
                &socket,
                &broker,
                queued,
                nofile,
                start_timeout,
                shutdown,
            )
            .await
        }
        Err(e) => Err(e),
    };
    broker.stop(Duration::from_secs(15)).await;
    r
}

async fn measure(
    out: &Path,
    socket: &Path,
    broker: &Daemon,
    queued: usize,
    nofile: nix::sys::resource::rlim_t,
    start_timeout: Duration,
    shutdown: &CancellationToken,
) -> anyhow::Result<Vec<MemRow>> {
    let mut rows = idle(out, socket, broker.pid, start_timeout, shutdown).await?;
    anyhow::ensure!(!shutdown.is_cancelled(), "interrupted");
    rows.push(queue::queue(socket, broker.pid, queued, nofile, shutdown).await?);
    Ok(rows)
}

/// Starts the proxy, sends a few calls through it, idles, reads both RSS.
async fn idle(
    out: &Path,
    socket: &Path,
    broker_pid: u32,
    start_timeout: Duration,
    shutdown: &CancellationToken,
) -> anyhow::Result<Vec<MemRow>> {
    let port = children::free_port()?;
    let args = [
        "proxy".to_string(),
        "--socket".into(),
        socket.display().to_string(),
        "--pool".into(),
        POOL.into(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
    ];
    let mut proxy = Daemon::spawn("proxy", &args, out.join("memory-proxy.log"))?;
    let r = async {
        proxy
            .wait_ready(start_timeout, || async move {
                let st = children::tcp_get(port, "/readyz", Duration::from_secs(2)).await?;
                anyhow::ensure!(st == 200, "/readyz answered {st}");
                Ok(())
            })
            .await?;
        let template = Arc::new(Template::new("echo", r#"{"text":"{seq}"}"#)?);
        let connect = Connect::Http {
            addr: ([127, 0, 0, 1], port).into(),
            path: "/mcp".into(),
        };
        let spec = Spec {
            concurrency: 2,
            plan: Plan::Count(WARM_CALLS),
            rate: None,
            timeout: Duration::from_secs(10),
        };
        let t = load::drive(&connect, &template, spec).await?;
        tokio::select! {
            _ = tokio::time::sleep(IDLE_FOR) => {}
            _ = shutdown.cancelled() => anyhow::bail!("interrupted"),
        }
        let what = format!(
            "idle: {} calls via the proxy ({} errors), then {}s idle",
            t.requests(),
            t.errors(),
            IDLE_FOR.as_secs()
        );
        let row = |process: &str, pid: u32, target: f64| {
            let rss = mib(pid, "VmRSS:");
            MemRow {
                measurement: what.clone(),
                process: process.into(),
                rss_mib: rss,
                hwm_mib: mib(pid, "VmHWM:"),
                target: format!("≤ {target} MiB"),
                met: rss > 0.0 && rss <= target,
                detail: format!(
                    "anon {:.1} MiB + file-backed (binary, libs) {:.1} MiB; {} threads",
                    mib(pid, "RssAnon:"),
                    mib(pid, "RssFile:"),
                    threads(pid)
                ),
            }
        };
        Ok(vec![
            row("proxy", proxy.pid, PROXY_IDLE_MIB),
            row("broker", broker_pid, BROKER_IDLE_MIB),
        ])
    }
    .await;
    proxy.stop(Duration::from_secs(10)).await;
    r
}

fn threads(pid: u32) -> u64 {
    sys::status_bytes(&pid.to_string(), "Threads:")
}

/// The Memory section of results.md.
pub fn markdown(rows: &[MemRow]) -> String {
    let mut s = String::from(
        "\n### Memory\n\nBroker and proxy as separate processes (`mcp-broker serve`, `mcp-broker proxy`), \
         fixture backend; RSS from `/proc/PID/status`, server processes excluded. \
         `RSS` is VmRSS at the measurement (queued: peak sampled every 20 ms while the queue is full); \
         `peak` is VmHWM, the process's high-water mark so far.\n\n\
         | measurement | process | RSS MiB | peak MiB | target | met | detail |\n\
         |---|---|---:|---:|---|---|---|\n",
    );
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {:.1} | {:.1} | {} | {} | {} |",
            r.measurement,
            r.process,
            r.rss_mib,
            r.hwm_mib,
            r.target,
            if r.met { "**yes**" } else { "**no**" },
            r.detail.replace('|', "/"),
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_and_codes() {
        let row = MemRow {
            measurement: "idle".into(),
            process: "proxy".into(),
            rss_mib: 4.24,
            hwm_mib: 5.0,
            target: "≤ 10 MiB".into(),
            met: true,
            detail: "a|b".into(),
        };
        let md = markdown(&[row]);
        assert!(md.contains("| idle | proxy | 4.2 | 5.0 | ≤ 10 MiB | **yes** | a/b |"));
        assert!(mib(std::process::id(), "VmRSS:") > 0.0);
    }
}
