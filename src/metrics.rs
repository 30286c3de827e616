//! Prometheus metrics for the broker and the proxy.
//!
//! One [`Metrics`] value owns its own [`Registry`] and is passed explicitly
//! (no global registry), so tests and the `up` command can run several
//! independent brokers in one process.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Latency buckets (seconds), from 100 µs to 2 minutes.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 120.0,
];

/// MCP methods used as metric labels; anything else is `other`.
pub const METHOD_LABELS: &[&str] = &[
    "tools/call",
    "tools/list",
    "resources/list",
    "resources/read",
    "resources/templates/list",
    "resources/subscribe",
    "resources/unsubscribe",
    "prompts/list",
    "prompts/get",
    "completion/complete",
    "logging/setLevel",
    "ping",
    "server/discover",
    "subscriptions/listen",
    "other",
];

/// Every metric the crate exports.
pub struct Metrics {
    registry: Registry,
    /// Processes per pool by state (starting, idle, busy).
    pub processes: IntGaugeVec,
    /// Processes started, by pool.
    pub spawns: IntCounterVec,
    /// The era a pool learned its server speaks (1 for that era).
    pub pool_era: IntGaugeVec,
    /// Processes ended, by pool and reason.
    pub exits: IntCounterVec,
    /// Requests waiting for a process, by pool.
    pub queue_depth: IntGaugeVec,
    /// Time spent waiting for a process, by pool.
    pub lease_wait: HistogramVec,
    /// Time from request to final response, by pool and method.
    pub request_duration: HistogramVec,
    /// Lease requests by pool and outcome (ok, error, queue_full, …).
    pub requests: IntCounterVec,
    /// Requests refused before reaching a process, by pool and reason
    /// (`queue_full`, `queue_timeout`, `pool_failing`, `draining`, `too_large`).
    pub rejections: IntCounterVec,
    /// Requests refused by access policy, by pool (zero until policy exists).
    pub policy_denials: IntCounterVec,
    /// Non-JSON or oversized stdout lines skipped, by pool.
    pub skipped_lines: IntCounterVec,
    /// Responses that arrived after their request was settled, by pool.
    pub late_responses: IntCounterVec,
    /// Notifications that could not be routed to one request, by pool.
    pub unroutable: IntCounterVec,
    /// Config reloads by result (applied, invalid).
    pub config_reloads: IntCounterVec,
    /// Proxy: HTTP requests by method and status.
    pub http_requests: IntCounterVec,
    /// Proxy: open sessions.
    pub sessions: IntGaugeVec,
    /// Proxy: broker connection failures.
    pub broker_errors: IntCounterVec,
    /// Proxy: SSE response bodies currently open, by kind
    /// (`response`, `listen`, `subscription`).
    pub sse_streams: IntGaugeVec,
    /// Proxy: connection attempts to the broker retried after a failure.
    pub broker_reconnects: IntCounterVec,
    /// Node budget: `processes`, `max_processes`, `resident_bytes`,
    /// `max_memory_bytes` (0 when unlimited), `tenant_pools`,
    /// `max_tenant_pools`.
    pub node: IntGaugeVec,
    /// Idle processes stopped to make room for another pool.
    pub evictions: IntCounterVec,
    /// Tenant pools stopped, by reason (`idle`, `cap`).
    pub tenant_reaped: IntCounterVec,
}

impl Metrics {
    /// Creates the metrics in a fresh registry.
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(BUCKETS.to_vec()),
                labels,
            )
            .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        Self {
            processes: gauge(
                "mcp_broker_processes",
                "Processes per pool by state.",
                &["pool", "state"],
            ),
            spawns: counter("mcp_broker_spawns_total", "Processes started.", &["pool"]),
            pool_era: gauge(
                "mcp_broker_pool_era",
                "The protocol era a pool's server speaks (1), learned at warm-up.",
                &["pool", "era"],
            ),
            exits: counter(
                "mcp_broker_exits_total",
                "Processes ended, by reason.",
                &["pool", "reason"],
            ),
            queue_depth: gauge(
                "mcp_broker_queue_depth",
                "Requests waiting for a process.",
                &["pool"],
            ),
            lease_wait: histogram(
                "mcp_broker_lease_wait_seconds",
                "Time waiting for a process.",
                &["pool"],
            ),
            request_duration: histogram(
                "mcp_broker_request_duration_seconds",
                "Time from request to final response.",
                &["pool", "method"],
            ),
            requests: counter(
                "mcp_broker_requests_total",
                "Lease requests by outcome.",
                &["pool", "outcome"],
            ),
            rejections: counter(
                "mcp_broker_rejections_total",
                "Requests refused before reaching a process, by reason.",
                &["pool", "reason"],
            ),
            policy_denials: counter(
                "mcp_broker_policy_denials_total",
                "Requests refused by access policy.",
                &["pool"],
            ),
            skipped_lines: counter(
                "mcp_broker_skipped_lines_total",
                "Non-JSON or oversized stdout lines skipped.",
                &["pool", "kind"],
            ),
            late_responses: counter(
                "mcp_broker_late_responses_total",
                "Responses that arrived after their request was settled.",
                &["pool"],
            ),
            unroutable: counter(
                "mcp_broker_unroutable_messages_total",
                "Server messages that belonged to no single request.",
                &["pool", "kind"],
            ),
            config_reloads: counter(
                "mcp_broker_config_reloads_total",
                "Config reloads by result (applied, invalid).",
                &["result"],
            ),
            http_requests: counter(
                "mcp_proxy_http_requests_total",
                "Proxy HTTP requests by method and status.",
                &["method", "status"],
            ),
            sessions: gauge("mcp_proxy_sessions", "Open MCP sessions.", &["pool"]),
            broker_errors: counter(
                "mcp_proxy_broker_errors_total",
                "Failures reaching the broker.",
                &["kind"],
            ),
            sse_streams: gauge(
                "mcp_proxy_sse_streams",
                "SSE response streams currently open.",
                &["kind"],
            ),
            broker_reconnects: counter(
                "mcp_proxy_broker_reconnects_total",
                "Connection attempts to the broker retried after a failure.",
                &["pool"],
            ),
            node: gauge(
                "mcp_broker_node",
                "Node budget: live and allowed processes and resident bytes across all pools, tenant pools.",
                &["what"],
            ),
            evictions: counter(
                "mcp_broker_node_evictions_total",
                "Idle processes stopped to make room for another pool within the node budget.",
                &[],
            ),
            tenant_reaped: counter(
                "mcp_broker_tenant_pools_reaped_total",
                "Tenant pools stopped, by reason (idle, cap).",
                &["reason"],
            ),
            registry,
        }
    }

    /// Reasons of [`Self::rejections`].
    pub const REJECTION_REASONS: [&'static str; 6] = [
        "queue_full",
        "queue_timeout",
        "pool_failing",
        "draining",
        "too_large",
        "process_gone",
    ];

    /// Makes a pool's counters visible at zero before anything happens, so
    /// `rate()` and alerts see them from the start.
    pub fn init_pool(&self, pool: &str) {
        for reason in Self::REJECTION_REASONS {
            self.rejections.with_label_values(&[pool, reason]);
        }
        self.policy_denials.with_label_values(&[pool]);
        self.spawns.with_label_values(&[pool]);
        self.queue_depth.with_label_values(&[pool]);
        self.lease_wait.with_label_values(&[pool]);
        for method in METHOD_LABELS {
            self.request_duration.with_label_values(&[pool, method]);
        }
        for outcome in Self::REQUEST_OUTCOMES {
            self.requests.with_label_values(&[pool, outcome]);
        }
    }

    /// Outcomes of [`Self::requests`] that every pool reports from start.
    pub const REQUEST_OUTCOMES: [&'static str; 4] = ["ok", "error", "timeout", "cancelled"];

    /// The label a method gets in [`Self::request_duration`]: itself when
    /// it is a known MCP method, else `other` (so clients cannot blow up
    /// label cardinality).
    pub fn method_label(method: &str) -> &'static str {
        METHOD_LABELS
            .iter()
            .find(|m| **m == method)
            .copied()
            .unwrap_or("other")
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

/// Holds a gauge one higher for as long as it lives (an open stream).
pub struct GaugeGuard(IntGauge);

impl GaugeGuard {
    /// Increments `gauge` now; the drop decrements it.
    pub fn new(gauge: IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
