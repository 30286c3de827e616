//! What clients see while the broker is replaced, three ways side by side
//! under the same load (12 lease API sessions, fixture and server-everything
//! pools): a restart as before take-overs existed (SIGTERM, wait, start
//! again), take-overs, and in-place upgrades. Prints failed requests,
//! requests that waited for a cold start (slower than `COLD`: the fixture
//! here takes `INIT_DELAY` to warm, a warm call takes a few ms), the
//! slowest call, and how long each replacement took.
//!
//! `cargo bench --bench upgrade` (needs target/interop: scripts/install-test-deps.sh).

#[path = "../tests/support/daemon.rs"]
mod daemon;
#[path = "../tests/support/harness.rs"]
#[allow(unused_imports)]
mod harness;

use daemon::*;
use harness::procs_with_tag;
use nix::sys::signal::Signal;
use std::time::{Duration, Instant};

/// Replacements per way (`cargo bench`); `cargo test` runs one of each as
/// a smoke test.
const EVENTS: usize = 10;
/// The fixture's warm-up time (a server that takes this long to start).
const INIT_DELAY: &str = "500";
/// A call slower than this waited for a process to start (or the broker).
const COLD: Duration = Duration::from_millis(300);
const LONG: Duration = Duration::from_secs(90);

#[derive(Clone, Copy, Debug)]
enum Way {
    Restart,
    TakeOver,
    InPlace,
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let events = if std::env::args().any(|a| a == "--bench") {
        EVENTS
    } else {
        1
    };
    println!("| way | replacements | calls | failed | waited > {COLD:?} | slowest | replacement time (median) |");
    println!("|---|---|---|---|---|---|---|");
    for way in [Way::Restart, Way::TakeOver, Way::InPlace] {
        rt.block_on(run(way, events));
    }
}

async fn run(way: Way, events: usize) {
    let dir = tempfile::tempdir().unwrap();
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let cfg = config(dir.path(), &tag, 4, 1, "10s");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "min_idle = 4",
        &format!("args = [\"--init-delay-ms\", \"{INIT_DELAY}\"]\nmin_idle = 4"),
    );
    std::fs::write(&cfg, text).unwrap();
    let sock = dir.path().join("broker.sock");
    let warm = |d: &Daemon| {
        d.wait_log("broker listening", 1, LONG);
        assert!(harness::poll_blocking(LONG, || procs_with_tag(&tag).len() == 5));
    };
    let mut cur = Daemon::start(&cfg, dir.path(), "b0");
    tokio::task::block_in_place(|| warm(&cur));
    let load = Load::start(&sock, 12, true);
    served(&sock).await;
    let mut took = Vec::new();
    let mut handoffs = Vec::new();
    for i in 1..=events {
        // Steady load between replacements.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let started = Instant::now();
        match way {
            Way::Restart => {
                cur.signal(Signal::SIGTERM);
                tokio::task::block_in_place(|| cur.wait_exit(LONG)).expect("exited");
                cur = Daemon::start(&cfg, dir.path(), &format!("b{i}"));
                tokio::task::block_in_place(|| warm(&cur));
            }
            Way::TakeOver => {
                let next = Daemon::start(&cfg, dir.path(), &format!("b{i}"));
                tokio::task::block_in_place(|| {
                    next.wait_log("took the listening sockets over", 1, LONG);
                });
                took.push(started.elapsed());
                handoffs.extend(handoff_in(&next.text()));
                tokio::task::block_in_place(|| cur.wait_exit(LONG)).expect("old exited");
                cur = next;
                continue;
            }
            Way::InPlace => {
                let out = tokio::process::Command::new(BIN)
                    .args(["upgrade", "--socket"])
                    .arg(&sock)
                    .output()
                    .await
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        took.push(started.elapsed());
    }
    let seen = load.finish().await;
    took.sort();
    let cold = seen.latencies.iter().filter(|l| **l > COLD).count();
    let slowest = seen.latencies.iter().max().copied().unwrap_or_default();
    handoffs.sort();
    let handoff = handoffs
        .get(handoffs.len() / 2)
        .map(|h| format!(" (socket handoff {h})"))
        .unwrap_or_default();
    println!(
        "| {way:?} | {events} | {} | {} | {cold} | {slowest:.2?} | {:.2?}{handoff} |",
        seen.latencies.len(),
        seen.failed.len(),
        took[took.len() / 2]
    );
    if let Some(e) = seen.failed.first() {
        eprintln!("{way:?}: first failure: {e}");
    }
    cur.signal(Signal::SIGTERM);
    tokio::task::block_in_place(|| cur.wait_exit(LONG));
}

/// The `handoff_in=` a new broker logged when it took the sockets over.
fn handoff_in(log: &str) -> Option<String> {
    let rest = log.split("handoff_in=").nth(1)?;
    Some(rest.split_whitespace().next()?.to_string())
}
