//! A SIGTERM or SIGINT at any moment of start-up, warm-up, the first
//! request or a take-over is honoured within the drain timeout, and leaves
//! no process behind: a few hundred runs of `mcp-broker serve`, each
//! signalled at a random point (the random delay *is* the test input).

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/harness.rs"]
mod harness;

use daemon::*;
use harness::{poll_blocking, procs_with_tag};
use nix::sys::signal::Signal;
use rand::Rng;
use std::time::Duration;

/// drain_timeout in the config below.
const DRAIN: Duration = Duration::from_secs(2);
/// Drain, stopping the processes (stop_grace 500 ms), and slack for a
/// loaded machine.
const EXIT_LIMIT: Duration = Duration::from_secs(8);
const RUNS: usize = 240;
const PARALLEL: usize = 4;

/// Signals `d` and checks it exits within [`EXIT_LIMIT`].
fn honoured(d: &mut Daemon, sig: Signal, what: &str) {
    d.signal(sig);
    let started = std::time::Instant::now();
    if d.wait_exit(EXIT_LIMIT).is_none() {
        panic!(
            "{what}: {sig} not honoured within {EXIT_LIMIT:?}; log:\n{}",
            d.text()
        );
    }
    assert!(started.elapsed() < DRAIN + Duration::from_secs(6));
}

fn one_run(i: usize) {
    let mut rng = rand::thread_rng();
    let dir = tempfile::tempdir().unwrap();
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let cfg = config(dir.path(), &tag, 1, 0, "2s");
    let sig = if rng.gen_bool(0.5) {
        Signal::SIGTERM
    } else {
        Signal::SIGINT
    };
    let delay = Duration::from_millis(rng.gen_range(0..150));
    match i % 3 {
        // Start-up and warm-up.
        0 => {
            let mut d = Daemon::start(&cfg, dir.path(), "b");
            std::thread::sleep(delay);
            honoured(&mut d, sig, &format!("run {i}, start-up +{delay:?}"));
        }
        // The first request, sent as the broker comes up.
        1 => {
            let mut d = Daemon::start(&cfg, dir.path(), "b");
            let sock = dir.path().join("broker.sock");
            let client = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    for _ in 0..50 {
                        if sock.exists() {
                            let _ =
                                tokio::time::timeout(Duration::from_secs(5), served_maybe(&sock))
                                    .await;
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
            });
            std::thread::sleep(delay);
            honoured(&mut d, sig, &format!("run {i}, first request +{delay:?}"));
            client.join().unwrap();
        }
        // A take-over: the new broker (or the old one) signalled mid-way.
        _ => {
            let mut old = Daemon::start(&cfg, dir.path(), "old");
            old.wait_log("broker listening", 1, Duration::from_secs(30));
            let mut new = Daemon::start(&cfg, dir.path(), "new");
            std::thread::sleep(delay);
            if rng.gen_bool(0.5) {
                honoured(
                    &mut new,
                    sig,
                    &format!("run {i}, new broker mid-handoff +{delay:?}"),
                );
                honoured(&mut old, sig, &format!("run {i}, old broker after"));
            } else {
                honoured(
                    &mut old,
                    sig,
                    &format!("run {i}, old broker mid-handoff +{delay:?}"),
                );
                honoured(&mut new, sig, &format!("run {i}, new broker after"));
            }
        }
    }
    assert!(
        poll_blocking(Duration::from_secs(5), || procs_with_tag(&tag).is_empty()),
        "run {i}: processes left behind: {:?}",
        procs_with_tag(&tag)
    );
}

/// One request, ignoring its outcome (the broker may be going away).
async fn served_maybe(sock: &std::path::Path) {
    let c = mcp_broker::proxy::backend::Backend::new(
        sock.to_path_buf(),
        "fx".into(),
        1 << 20,
        std::sync::Arc::new(mcp_broker::metrics::Metrics::new()),
    );
    let _ = call(
        &c,
        &serde_json::json!({"jsonrpc":"2.0","id":1,"method":"tools/call",
        "params":{"name":"whoami","arguments":{}}}),
    )
    .await;
}

#[test]
fn a_signal_at_any_moment_is_honoured_in_time_and_leaks_nothing() {
    let threads: Vec<_> = (0..PARALLEL)
        .map(|t| std::thread::spawn(move || (t..RUNS).step_by(PARALLEL).for_each(one_run)))
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}
