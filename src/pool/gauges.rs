//! A pool's own metric series, looked up once when the pool is made.
//!
//! Every lease sets the queue gauge, the process gauges and the wait
//! histogram; finding a series by its labels hashes them and takes the
//! vector's lock each time, a few per request. The handles here are the
//! same series (`with_label_values` returns a handle on the registered
//! one), so what `/metrics` shows is unchanged.

use crate::metrics::Metrics;
use prometheus::{Histogram, IntGauge};

/// Handles on the series labelled with one pool's name.
pub(super) struct PoolGauges {
    busy: IntGauge,
    idle: IntGauge,
    starting: IntGauge,
    queue: IntGauge,
    wait: Histogram,
}

impl PoolGauges {
    pub(super) fn new(metrics: &Metrics, pool: &str) -> Self {
        let processes = |state| metrics.processes.with_label_values(&[pool, state]);
        Self {
            busy: processes("busy"),
            idle: processes("idle"),
            starting: processes("starting"),
            queue: metrics.queue_depth.with_label_values(&[pool]),
            wait: metrics.lease_wait.with_label_values(&[pool]),
        }
    }

    /// Sets `mcp_broker_processes` for the pool.
    pub(super) fn processes(&self, busy: usize, idle: usize, starting: usize) {
        self.busy.set(busy as i64);
        self.idle.set(idle as i64);
        self.starting.set(starting as i64);
    }

    /// Sets `mcp_broker_queue_depth` for the pool.
    pub(super) fn queue(&self, depth: usize) {
        self.queue.set(depth as i64);
    }

    /// Observes one lease's wait, in seconds.
    pub(super) fn wait(&self, secs: f64) {
        self.wait.observe(secs);
    }
}
