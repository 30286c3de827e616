//! Resource use of one bench step: CPU deltas and peak RSS of the gateway
//! (broker+proxy threads of this process, or a peer's process) and of the
//! stdio server processes behind it.
//!
//! Peak RSS is sampled by a small thread every 100 ms, off the load
//! generator's runtime; the thread stops when the probe finishes.

use super::sys;
use super::targets::SERVER_THREADS;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where the gateway and the servers of a step live.
#[derive(Debug, Clone, Copy)]
pub enum Layout {
    /// Broker and proxy on this process's server runtime; servers are our children.
    InProcess,
    /// No gateway; servers are our children (direct stdio, spawn per request).
    Children,
    /// A peer process; servers are its descendants.
    Peer(u32),
    /// The trivial endpoint on the server runtime; no servers.
    Trivial,
}

/// Resource use measured over a step.
#[derive(Debug, Default, Clone, Copy)]
pub struct Usage {
    /// Gateway CPU, percent of one core.
    pub gateway_cpu: Option<f64>,
    /// The user-space part of it.
    pub gateway_user_cpu: Option<f64>,
    /// Gateway peak RSS, MiB.
    pub gateway_rss_mib: Option<f64>,
    /// Servers' CPU, percent of one core.
    pub servers_cpu: Option<f64>,
    /// Servers' peak total RSS, MiB.
    pub servers_rss_mib: Option<f64>,
}

/// A running measurement.
pub struct Probe {
    layout: Layout,
    start: Instant,
    gateway_cpu0: (f64, f64),
    reaped0: f64,
    servers0: HashMap<u32, f64>,
    stop: Arc<AtomicBool>,
    peak_gateway: Arc<AtomicU64>,
    peak_servers: Arc<AtomicU64>,
    /// Last CPU seconds seen per server pid, so servers that exit during
    /// the step still count.
    seen: Arc<Mutex<HashMap<u32, f64>>>,
    sampler: Option<std::thread::JoinHandle<()>>,
}

fn root_of(layout: Layout) -> u32 {
    match layout {
        Layout::Peer(pid) => pid,
        _ => std::process::id(),
    }
}

/// Gateway CPU seconds (all, user).
fn gateway_cpu(layout: Layout) -> (f64, f64) {
    match layout {
        Layout::InProcess | Layout::Trivial => sys::thread_cpu_user(SERVER_THREADS),
        Layout::Peer(pid) => sys::proc_cpu_user(pid),
        Layout::Children => (0.0, 0.0),
    }
}

fn sample(layout: Layout) -> (u64, u64) {
    let gateway = match layout {
        Layout::InProcess | Layout::Trivial => sys::rss("self"),
        Layout::Peer(pid) => sys::rss(&pid.to_string()),
        Layout::Children => 0,
    };
    let servers = match layout {
        Layout::Trivial => 0,
        _ => sys::descendants(root_of(layout))
            .iter()
            .map(|p| sys::rss(&p.to_string()))
            .sum(),
    };
    (gateway, servers)
}

impl Probe {
    /// Starts measuring.
    pub fn start(layout: Layout) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let peak_gateway = Arc::new(AtomicU64::new(0));
        let peak_servers = Arc::new(AtomicU64::new(0));
        let seen: Arc<Mutex<HashMap<u32, f64>>> = Arc::default();
        let (s, g, v, w) = (
            stop.clone(),
            peak_gateway.clone(),
            peak_servers.clone(),
            seen.clone(),
        );
        let root = root_of(layout);
        let sampler = std::thread::Builder::new()
            .name("mcpb-probe".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    let (gw, sv) = sample(layout);
                    g.fetch_max(gw, Ordering::Relaxed);
                    v.fetch_max(sv, Ordering::Relaxed);
                    let now = sys::cpu_map(&sys::descendants(root));
                    if let Ok(mut m) = w.lock() {
                        m.extend(now);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
            .ok();
        let pids = sys::descendants(root_of(layout));
        Probe {
            layout,
            start: Instant::now(),
            gateway_cpu0: gateway_cpu(layout),
            reaped0: sys::reaped_children_cpu(),
            servers0: sys::cpu_map(&pids),
            stop,
            peak_gateway,
            peak_servers,
            seen,
            sampler,
        }
    }

    /// Stops measuring and reports.
    pub fn finish(mut self) -> Usage {
        let secs = self.start.elapsed().as_secs_f64().max(1e-6);
        let pct = |cpu: f64| Some(100.0 * cpu / secs);
        let mib = |b: u64| Some(b as f64 / (1024.0 * 1024.0));
        let pids = sys::descendants(root_of(self.layout));
        let servers = if matches!(self.layout, Layout::Peer(_)) {
            // Not our children: exited servers count with their last sample.
            let mut last = self.seen.lock().map(|m| m.clone()).unwrap_or_default();
            last.extend(sys::cpu_map(&pids));
            last.iter()
                .map(|(p, cpu)| (cpu - self.servers0.get(p).copied().unwrap_or(0.0)).max(0.0))
                .sum()
        } else {
            // Our children: exited ones are in our reaped-children times.
            sys::cpu_delta(&self.servers0, &pids)
                + (sys::reaped_children_cpu() - self.reaped0).max(0.0)
        };
        let (gw, sv) = sample(self.layout);
        self.peak_gateway.fetch_max(gw, Ordering::Relaxed);
        self.peak_servers.fetch_max(sv, Ordering::Relaxed);
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.sampler.take() {
            let _ = t.join();
        }
        let (all, user) = gateway_cpu(self.layout);
        let gateway = (all - self.gateway_cpu0.0).max(0.0);
        let gateway_user = (user - self.gateway_cpu0.1).max(0.0);
        let peak_g = self.peak_gateway.load(Ordering::Relaxed);
        let peak_s = self.peak_servers.load(Ordering::Relaxed);
        match self.layout {
            Layout::Children => Usage {
                gateway_cpu: None,
                gateway_user_cpu: None,
                gateway_rss_mib: None,
                servers_cpu: pct(servers),
                servers_rss_mib: mib(peak_s),
            },
            Layout::Trivial => Usage {
                gateway_cpu: pct(gateway),
                gateway_user_cpu: pct(gateway_user),
                gateway_rss_mib: mib(peak_g),
                servers_cpu: None,
                servers_rss_mib: None,
            },
            _ => Usage {
                gateway_cpu: pct(gateway),
                gateway_user_cpu: pct(gateway_user),
                gateway_rss_mib: mib(peak_g),
                servers_cpu: pct(servers),
                servers_rss_mib: mib(peak_s),
            },
        }
    }
}
