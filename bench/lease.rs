//! Lease hot path: [`Pool::acquire`] and the release on drop of its guard,
//! on a pool of warm fixture processes (uncontended, and with 8 tasks
//! contending for 2 processes).

use criterion::{criterion_group, criterion_main, Criterion};
use mcp_broker::config::PoolConfig;
use mcp_broker::metrics::Metrics;
use mcp_broker::pool::Pool;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

fn fixture() -> String {
    env!("CARGO_BIN_EXE_mcp-fixture").to_string()
}

fn acquire_release(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let fixture = fixture();
    if !std::path::Path::new(&fixture).exists() {
        eprintln!("skipping lease bench: {fixture} is missing (cargo build --bins)");
        return;
    }
    let mut cfg = PoolConfig::new("bench", &fixture, vec![]);
    cfg.min_idle = 2;
    cfg.max = 2;
    cfg.stop_grace = Duration::from_millis(200);
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let pool = rt.block_on(async {
        let pool = Pool::start(
            cfg,
            Arc::new(Metrics::new()),
            tracker.clone(),
            shutdown.clone(),
            Arc::new(AtomicU64::new(0)),
            mcp_broker::node::Node::new(&mcp_broker::config::NodeSettings {
                isolation: mcp_broker::config::raw::Isolation::Off,
                cgroups: mcp_broker::config::raw::Isolation::Off,
                ..Default::default()
            }),
        );
        let start = Instant::now();
        while pool.status().idle < 2 {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "pool did not warm"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        pool
    });
    let mut g = c.benchmark_group("lease");
    g.bench_function("acquire+release, uncontended", |b| {
        b.to_async(&rt).iter(|| async {
            let guard = pool.acquire(None, None, "-").await.expect("lease");
            drop(guard);
        })
    });
    g.bench_function("8 tasks x acquire+release on 2 processes", |b| {
        b.to_async(&rt).iter(|| async {
            let tasks: Vec<_> = (0..8)
                .map(|_| {
                    let p = pool.clone();
                    tokio::spawn(async move {
                        let guard = p.acquire(None, None, "-").await.expect("lease");
                        tokio::task::yield_now().await;
                        drop(guard);
                    })
                })
                .collect();
            for t in tasks {
                t.await.expect("task");
            }
        })
    });
    g.finish();
    shutdown.cancel();
    tracker.close();
    rt.block_on(async {
        let _ = tokio::time::timeout(Duration::from_secs(10), tracker.wait()).await;
    });
}

criterion_group!(benches, acquire_release);
criterion_main!(benches);
