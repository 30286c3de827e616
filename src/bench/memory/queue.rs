//! The queued measurement of the memory scenario: one long `sleep` call
//! holds the pool's only process while N `echo` calls wait in the broker's
//! queue, each on its own lease API connection (the proxy's client,
//! [`Backend`]); the broker's RSS is sampled meanwhile. Dropping the hold
//! makes the broker cancel it, the queue drains, and every call's outcome
//! is counted by kind.

use super::{mib, MemRow, BROKER_QUEUED_MIB, DRAIN_LIMIT, MIB, RAMP_LIMIT};
use crate::bench::children;
use crate::bench::client::{self, Outcome};
use crate::bench::sys;
use crate::bench::targets::POOL;
use crate::config::DEFAULT_MAX_MESSAGE_SIZE;
use crate::jsonrpc::codes;
use crate::metrics::Metrics;
use crate::proxy::backend::{new_lease_id, Backend, BackendError};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Samples a process's VmRSS every 20 ms on its own thread, keeping the peak.
struct Sampler {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let peak = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s, id) = (peak.clone(), stop.clone(), pid.to_string());
        let thread = std::thread::Builder::new()
            .name("mcpb-memprobe".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    p.fetch_max(sys::rss(&id), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
            .ok();
        Sampler { peak, stop, thread }
    }

    /// The peak since the last take, in bytes; starts a new interval.
    fn take(&self) -> u64 {
        self.peak.swap(0, Ordering::Relaxed)
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.take()
    }
}

fn code_name(code: i64) -> String {
    let name = match code {
        codes::QUEUE_FULL => "queue_full",
        codes::QUEUE_TIMEOUT => "queue_timeout",
        codes::REQUEST_TIMEOUT => "request_timeout",
        codes::PROCESS_EXITED => "process_exited",
        codes::BROKER_UNAVAILABLE => "broker_unavailable",
        codes::POOL_FAILING => "pool_failing",
        codes::CANCELLED => "cancelled",
        _ => "error",
    };
    format!("{name} ({code})")
}

/// One queued call through the lease API: the kind of its outcome.
async fn call(b: &Backend, id: u64) -> String {
    let tok = client::token(id);
    let msg = json!({"jsonrpc":"2.0","id":id,"method":"tools/call",
        "params":{"name":"echo","arguments":{"text":tok}}});
    let mut lease = match b.lease(&msg, None, &new_lease_id()).await {
        Ok(l) => l,
        Err(BackendError::Unreachable { .. }) => return "unreachable (connect failed)".into(),
        Err(e) => return format!("transport: {e}"),
    };
    let status = lease.status.as_u16();
    while let Some(line) = lease.lines.next().await {
        let Ok(v) = line else {
            return format!("HTTP {status}, broken stream");
        };
        if v.get("result").is_none() && v.get("error").is_none() {
            continue; // a notification or server request for this call
        }
        return match client::check(&v, id, Some(&tok)) {
            Outcome::Ok if status == 200 => "ok".into(),
            Outcome::RpcError => {
                let code = v.pointer("/error/code").and_then(Value::as_i64);
                format!("HTTP {status}, {}", code_name(code.unwrap_or(0)))
            }
            Outcome::Crossed => "crossed (wrong answer)".into(),
            _ => format!("HTTP {status}, malformed answer"),
        };
    }
    format!("HTTP {status}, stream ended without an answer")
}

/// A count from the pool's status (0 when the broker does not say).
async fn status_count(socket: &Path, field: &str) -> usize {
    let path = format!("/v1/pools/{POOL}");
    match children::unix_get(socket, &path, Duration::from_secs(2)).await {
        Ok((200, body)) => serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| {
                v.pointer(&format!("/status/{field}"))
                    .and_then(Value::as_u64)
            })
            .unwrap_or(0) as usize,
        _ => 0,
    }
}

/// Holds the pool's only process, queues `n` calls, samples the broker's RSS.
pub(super) async fn queue(
    socket: &Path,
    pid: u32,
    n: usize,
    nofile: nix::sys::resource::rlim_t,
    shutdown: &CancellationToken,
) -> anyhow::Result<MemRow> {
    let metrics = Arc::new(Metrics::new());
    let backend = Backend::new(
        socket.to_path_buf(),
        POOL.into(),
        DEFAULT_MAX_MESSAGE_SIZE,
        metrics.clone(),
    );
    let base = sys::rss(&pid.to_string()) as f64 / MIB;
    let hold_ms = (RAMP_LIMIT + Duration::from_secs(30)).as_millis() as u64;
    let hold_msg = json!({"jsonrpc":"2.0","id":0,"method":"tools/call",
        "params":{"name":"sleep","arguments":{"ms":hold_ms}}});
    // The broker answers a lease when its first message comes, so the hold
    // runs in its own task; aborting it hangs up on the broker.
    let hold = {
        let b = backend.clone();
        tokio::spawn(async move { b.lease(&hold_msg, None, &new_lease_id()).await })
    };
    let taken = tokio::time::timeout(Duration::from_secs(10), async {
        while status_count(socket, "busy").await == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    if taken.is_err() {
        hold.abort();
        anyhow::bail!("the hold call did not take the process in 10 s");
    }
    let sampler = Sampler::start(pid);
    let t0 = Instant::now();
    let deadline = tokio::time::Instant::now() + RAMP_LIMIT + DRAIN_LIMIT;
    let finished = Arc::new(AtomicUsize::new(0));
    let mut set = tokio::task::JoinSet::new();
    for i in 1..=n as u64 {
        let (b, f) = (backend.clone(), finished.clone());
        set.spawn(async move {
            let k = tokio::time::timeout_at(deadline, call(&b, i))
                .await
                .unwrap_or_else(|_| "timeout (no answer)".into());
            f.fetch_add(1, Ordering::Relaxed);
            k
        });
    }
    let mut most = 0;
    let ramp = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let w = status_count(socket, "waiting").await;
        most = most.max(w);
        let done = finished.load(Ordering::Relaxed);
        if w + done >= n || t0.elapsed() >= RAMP_LIMIT || shutdown.is_cancelled() {
            break t0.elapsed();
        }
    };
    // Let the sampler see the full queue for a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let queued_peak = sampler.take() as f64 / MIB;
    let early = finished.load(Ordering::Relaxed);
    hold.abort(); // the broker sees the caller gone, cancels the sleep, frees the process
    let t1 = Instant::now();
    if shutdown.is_cancelled() {
        set.shutdown().await;
        sampler.finish();
        anyhow::bail!("interrupted");
    }
    let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
    while let Some(r) = set.join_next().await {
        let k = r.unwrap_or_else(|e| format!("task failed: {e}"));
        *kinds.entry(k).or_default() += 1;
    }
    let drain = t1.elapsed();
    let drain_peak = sampler.finish() as f64 / MIB;
    let hwm = mib(pid, "VmHWM:");
    let ok = kinds.get("ok").copied().unwrap_or(0);
    let retries = metrics.broker_reconnects.with_label_values(&[POOL]).get();
    let per_call = if most > 0 {
        (queued_peak - base).max(0.0) * 1024.0 / most as f64
    } else {
        0.0
    };
    let outcomes = kinds
        .iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect::<Vec<_>>()
        .join(", ");
    let detail = format!(
        "{}/{n} answered: {outcomes}; {most} waiting at most (queued in {:.1} s, {early} done before release); \
         drained in {:.1} s; idle {base:.1} MiB → {:.2} KiB per queued call; peak while draining {drain_peak:.1} MiB; \
         {retries} connect retries; RLIMIT_NOFILE {nofile}",
        kinds.values().sum::<u64>(),
        ramp.as_secs_f64(),
        drain.as_secs_f64(),
        per_call,
    );
    Ok(MemRow {
        measurement: format!("{n} calls queued on a pool of 1 (lease API)"),
        process: "broker".into(),
        rss_mib: queued_peak,
        hwm_mib: hwm,
        target: format!("< {BROKER_QUEUED_MIB} MiB, every call answered"),
        met: queued_peak > 0.0 && hwm < BROKER_QUEUED_MIB && ok == n as u64,
        detail,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names() {
        assert_eq!(code_name(codes::QUEUE_FULL), "queue_full (-31001)");
        assert_eq!(code_name(1), "error (1)");
    }
}
