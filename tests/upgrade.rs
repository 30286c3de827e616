//! Upgrades and restarts under steady load (docs/upgrades.md): ten
//! take-overs by a new broker and ten in-place upgrades in a row fail no
//! request, start no process at request time, leak no process and no fd,
//! and (in place) keep every server pid; a new broker killed mid-handoff
//! leaves the old one serving, or the next one recovers; a refused handoff
//! falls back to refusing to start, saying why; a failed exec leaves the
//! old image serving. The fixture and the real server-everything
//! (target/interop) are the pools.

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/harness.rs"]
mod harness;

use daemon::*;
use harness::{assert_no_procs, procs_with_tag};
use nix::sys::signal::Signal;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(90);

/// One scenario at a time: each runs brokers, servers and a load, and
/// counts processes and fds that a concurrent scenario would disturb.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn tag() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Blocking waits of the daemon helpers, off the load's workers.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Starts a broker and waits until it listens with `n` processes.
fn start_warm(cfg: &Path, dir: &Path, name: &str, tag: &str, n: usize) -> Daemon {
    let d = Daemon::start(cfg, dir, name);
    d.wait_log("broker listening", 1, LONG);
    assert!(
        harness::poll_blocking(LONG, || procs_with_tag(tag).len() == n),
        "{n} processes never warmed: {:?}\n{}",
        procs_with_tag(tag),
        d.text()
    );
    d
}

/// Stops `d` with SIGTERM and checks nothing it started is left.
async fn stop(mut d: Daemon, tag: &str, sock: &Path) {
    d.signal(Signal::SIGTERM);
    let status = blocking(|| d.wait_exit(Duration::from_secs(30))).expect("exited");
    assert!(status.success(), "{status:?}\n{}", d.text());
    assert!(!sock.exists(), "socket removed at shutdown");
    assert_no_procs(tag).await;
}

/// Waits until `d` has at most `fds` open fds again (its clients closed).
fn settle_fds(d: &Daemon, fds: usize) {
    assert!(
        harness::poll_blocking(Duration::from_secs(40), || d.fds() <= fds),
        "broker {} has {} fds, at most {fds} expected: {:?}",
        d.pid(),
        d.fds(),
        fd_links(d.pid())
    );
}

/// Every open fd of `pid` and what it is.
fn fd_links(pid: u32) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|r| {
            r.flatten()
                .map(|e| {
                    let l = std::fs::read_link(e.path())
                        .unwrap_or_default()
                        .display()
                        .to_string();
                    // A socket's line in /proc/net/unix (state, path) says what it is.
                    let inode = l.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']'));
                    let unix = inode.and_then(|i| {
                        std::fs::read_to_string("/proc/net/unix")
                            .ok()?
                            .lines()
                            .find(|x| x.split_whitespace().nth(6) == Some(i))
                            .map(str::to_string)
                    });
                    (
                        e.file_name().to_string_lossy().into_owned(),
                        format!("{l} {}", unix.unwrap_or_default()),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn assert_clean(seen: &Seen) {
    assert!(
        seen.failed.is_empty(),
        "{} failed requests: {:?}",
        seen.failed.len(),
        &seen.failed[..seen.failed.len().min(5)]
    );
    assert!(seen.ok > 100, "the load ran: {} calls", seen.ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_take_overs_under_load_fail_nothing_and_start_nothing_at_request_time() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let tag = tag();
    let cfg = config(dir.path(), &tag, 4, 1, "5s");
    let sock = dir.path().join("broker.sock");
    let mut cur = blocking(|| start_warm(&cfg, dir.path(), "b0", &tag, 5));
    let quiet_fds = cur.fds();
    let mut known: BTreeSet<u32> = cur.children();
    let load = Load::start(&sock, 12, true);
    served(&sock).await;
    for i in 1..=10 {
        let next = Daemon::start(&cfg, dir.path(), &format!("b{i}"));
        blocking(|| next.wait_log("took the listening sockets over", 1, LONG));
        // Warm before taking over: every process it will ever use exists.
        let mine = next.children();
        assert_eq!(mine.len(), 5, "pool sizes unchanged: {mine:?}");
        known.extend(&mine);
        let status = blocking(|| cur.wait_exit(Duration::from_secs(30)))
            .unwrap_or_else(|| panic!("the old broker did not exit:\n{}", cur.text()));
        assert!(status.success(), "{status:?}");
        assert!(cur.text().contains("handoff: the new broker accepts now"));
        let live: BTreeSet<u32> = procs_with_tag(&tag).into_iter().collect();
        assert_eq!(
            live, mine,
            "the old broker's processes are gone, no new one started"
        );
        cur = next;
    }
    let seen = load.finish().await;
    assert_clean(&seen);
    assert!(
        seen.pids.is_subset(&known),
        "a request met a process started after a take-over"
    );
    assert_eq!(cur.children().len(), 5);
    assert!(
        cur.text().matches("process warm").count() == 5,
        "no process started after warm-up"
    );
    blocking(|| settle_fds(&cur, quiet_fds));
    stop(cur, &tag, &sock).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_in_place_upgrades_under_load_keep_every_process() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let tag = tag();
    let cfg = config(dir.path(), &tag, 4, 1, "5s");
    let sock = dir.path().join("broker.sock");
    let d = blocking(|| start_warm(&cfg, dir.path(), "b", &tag, 5));
    let pid = d.pid();
    let pids = d.children();
    let quiet_fds = d.fds();
    let load = Load::start(&sock, 12, true);
    served(&sock).await;
    for i in 1..=10 {
        if i % 2 == 1 {
            let out = tokio::process::Command::new(BIN)
                .args(["upgrade", "--socket"])
                .arg(&sock)
                .output()
                .await
                .unwrap();
            let said = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{said}{}\n{}",
                String::from_utf8_lossy(&out.stderr),
                d.text()
            );
            assert!(said.contains(&format!("pid {pid}")), "{said}");
        } else {
            d.signal(Signal::SIGUSR2);
            blocking(|| d.wait_log("processes adopted", i, LONG));
        }
        assert_eq!(d.count("processes adopted"), i);
        assert_eq!(d.children(), pids, "same server pids after upgrade {i}");
    }
    let seen = load.finish().await;
    assert_clean(&seen);
    assert!(
        seen.pids.is_subset(&pids),
        "every answer came from an original process"
    );
    assert_eq!(
        d.count("process warm"),
        5,
        "no process started after warm-up"
    );
    assert_eq!(d.count("adopted=5"), 10);
    blocking(|| settle_fds(&d, quiet_fds));
    stop(d, &tag, &sock).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_broker_killed_mid_handoff_leaves_the_old_serving_or_the_next_recovers() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let tag = tag();
    let cfg = config(dir.path(), &tag, 2, 0, "5s");
    let sock = dir.path().join("broker.sock");
    let old = blocking(|| start_warm(&cfg, dir.path(), "old", &tag, 2));
    let olds = old.children();
    // Killed while warming (its fixture takes 3 s to answer initialize):
    // the old broker never stopped accepting.
    let slow = dir.path().join("slow");
    std::fs::create_dir(&slow).unwrap();
    let slow_cfg = config(&slow, &tag, 2, 0, "5s");
    let text = std::fs::read_to_string(&slow_cfg).unwrap();
    let text = text
        .replace(
            &slow.join("broker.sock").display().to_string(),
            &sock.display().to_string(),
        )
        .replace(
            "min_idle = 2",
            "args = [\"--init-delay-ms\", \"3000\"]\nmin_idle = 2",
        );
    std::fs::write(&slow_cfg, text).unwrap();
    let load = Load::start(&sock, 6, false);
    for round in 0..3 {
        let mut new = Daemon::start(&slow_cfg, dir.path(), &format!("new{round}"));
        assert!(
            blocking(|| harness::poll_blocking(LONG, || new.children().len() == 2)),
            "the new broker never started warming"
        );
        new.signal(Signal::SIGKILL);
        blocking(|| new.wait_exit(Duration::from_secs(10))).expect("killed");
        served(&sock).await;
        // Its orphans see stdin close and exit: only the old ones remain.
        assert!(
            blocking(
                || harness::poll_blocking(Duration::from_secs(10), || procs_with_tag(&tag)
                    .into_iter()
                    .collect::<BTreeSet<_>>()
                    == olds)
            ),
            "processes left behind: {:?}",
            procs_with_tag(&tag)
        );
    }
    let seen = load.finish().await;
    assert_clean(&seen);
    assert!(
        old.text().matches("handoff").count() == 0,
        "no handoff was started"
    );
    // Killed right after its ack: the old broker drains and exits, and the
    // next broker finds a stale socket, binds it and serves.
    let new = Daemon::start(&cfg, dir.path(), "acked");
    blocking(|| new.wait_log("took the listening sockets over", 1, LONG));
    new.signal(Signal::SIGKILL);
    let mut old = old;
    blocking(|| old.wait_exit(Duration::from_secs(30))).expect("the old broker drained");
    let next = blocking(|| start_warm(&cfg, dir.path(), "next", &tag, 2));
    served(&sock).await;
    stop(next, &tag, &sock).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_take_over_falls_back_to_refusing_to_start() {
    let _serial = SERIAL.lock().await;
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let tag = tag();
    let cfg = config(dir.path(), &tag, 2, 0, "5s");
    let sock = dir.path().join("broker.sock");
    // An "old broker" that speaks handoff version 2.
    let _lease = tokio::net::UnixListener::bind(&sock).unwrap();
    let ctl = tokio::net::UnixListener::bind(dir.path().join("broker.sock.ctl")).unwrap();
    let peer = tokio::spawn(async move {
        let (mut s, _) = ctl.accept().await.unwrap();
        let body = br#"{"version":2,"op":"listeners","names":[],"sockets":{}}"#;
        s.write_all(&(body.len() as u32).to_be_bytes())
            .await
            .unwrap();
        s.write_all(body).await.unwrap();
        s
    });
    let mut d = Daemon::start(&cfg, dir.path(), "new");
    let status = blocking(|| d.wait_exit(LONG)).expect("exited");
    assert!(!status.success());
    let log = d.text();
    assert!(
        log.contains("another broker is already listening on")
            && log.contains("the peer speaks handoff version 2; this broker speaks version 1"),
        "{log}"
    );
    assert!(log.contains("process warm"), "it warmed up first: {log}");
    drop(peer.await.unwrap());
    assert_no_procs(&tag).await;
    // Without a control socket (a broker older than take-overs): the same.
    std::fs::remove_file(dir.path().join("broker.sock.ctl")).unwrap();
    let mut d = Daemon::start(&cfg, dir.path(), "new2");
    assert!(!blocking(|| d.wait_exit(LONG)).expect("exited").success());
    assert!(
        d.text().contains("cannot reach the control socket"),
        "{}",
        d.text()
    );
    assert_no_procs(&tag).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_exec_leaves_the_old_image_serving() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let tag = tag();
    let cfg = config(dir.path(), &tag, 2, 0, "5s");
    let sock = dir.path().join("broker.sock");
    let log = dir.path().join("b.log");
    let child = std::process::Command::new(BIN)
        .args([
            "serve",
            "--upgrade-binary",
            "/nonexistent/mcp-broker",
            "--config",
        ])
        .arg(&cfg)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let d = Daemon { child, log };
    d.wait_log("broker listening", 1, LONG);
    assert!(harness::poll_blocking(LONG, || procs_with_tag(&tag).len() == 2));
    let pids = d.children();
    let fds = d.fds();
    let inheritable_before = inheritable(d.pid());
    let out = tokio::process::Command::new(BIN)
        .args(["upgrade", "--socket"])
        .arg(&sock)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("exec /nonexistent/mcp-broker: ENOENT"),
        "{err}"
    );
    let before = served(&sock).await;
    assert!(pids.contains(&before));
    assert_eq!(d.children(), pids);
    blocking(|| settle_fds(&d, fds));
    // The fds it would have passed are close-on-exec again: a process
    // started now inherits none.
    assert_eq!(inheritable(d.pid()), inheritable_before);
    stop(d, &tag, &sock).await;
}

/// The fds of `pid` without `O_CLOEXEC` (what a child would inherit).
fn inheritable(pid: u32) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
        .flatten()
    {
        let info = std::fs::read_to_string(e.path()).unwrap_or_default();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .unwrap_or("0")
            .trim();
        if u32::from_str_radix(flags, 8).unwrap_or(0) & 0o2000000 == 0 {
            out.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    out.sort();
    out
}
