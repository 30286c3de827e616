//! Tenant pools (one per caller identity of an `isolate`d pool) and the
//! node upkeep loop that keeps them, and the node budget, in bounds.
//!
//! Why: tenant pools are created by callers, not by the operator, so their
//! number must be capped and unused ones must go, or a node collects warm
//! processes for every namespace that ever called.
//!
//! Invariants:
//! * At most `max_tenant_pools` tenant pools exist across the broker; at
//!   the cap the least recently used *idle* one is stopped to make room,
//!   never one with a lease, a waiter or an exclusive session.
//! * A tenant pool idle for `tenant_idle_timeout` is stopped; its uid (and
//!   home) stay assigned to the tenant for its next visit.

use super::Broker;
use crate::pool::Pool;
use std::sync::Weak;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How often the upkeep loop samples memory and looks for idle tenants.
const UPKEEP_EVERY: Duration = Duration::from_secs(1);

impl Broker {
    /// The pool of `base` reserved for `tenant` (an `isolate`d pool),
    /// started on first use.
    pub fn tenant_pool(&self, base: &Pool, tenant: &str) -> Result<Pool, String> {
        let name = &base.config().name;
        let cap = self.settings.node.max_tenant_pools;
        let mut all = self.tenants.lock().expect("lock");
        if let Some(p) = all.get(name).and_then(|m| m.get(tenant)) {
            return Ok(p.clone());
        }
        if all.values().map(|m| m.len()).sum::<usize>() >= cap {
            // Make room: the least recently used idle tenant pool goes.
            let lru = all
                .iter()
                .flat_map(|(b, m)| m.iter().map(move |(t, p)| (b, t, p)))
                .filter_map(|(b, t, p)| p.idle_since().map(|since| (since, b.clone(), t.clone())))
                .min_by_key(|(since, _, _)| *since);
            let Some((_, b, t)) = lru else {
                return Err(format!(
                    "the broker already runs {cap} tenant pools, all in use (max_tenant_pools); retry later"
                ));
            };
            if let Some(p) = all.get_mut(&b).and_then(|m| m.remove(&t)) {
                tracing::info!(pool = %p.config().name, "tenant pool stopped to make room (max_tenant_pools)");
                self.metrics.tenant_reaped.with_label_values(&["cap"]).inc();
                p.retire_gracefully();
            }
        }
        let mut cfg = base.config().clone();
        cfg.name = format!("{name}@{tenant}");
        let pool = self.start_pool(cfg);
        all.entry(name.clone())
            .or_default()
            .insert(tenant.to_string(), pool.clone());
        Ok(pool)
    }

    /// Stops tenant pools idle past `tenant_idle_timeout`; returns how many
    /// tenant pools remain.
    fn reap_idle_tenants(&self, now: Instant) -> usize {
        let limit = self.settings.node.tenant_idle_timeout;
        let mut gone = Vec::new();
        let left = {
            let mut all = self.tenants.lock().expect("lock");
            for m in all.values_mut() {
                m.retain(|_, p| {
                    let idle = p
                        .idle_since()
                        .is_some_and(|since| now.duration_since(since) >= limit);
                    if idle {
                        gone.push(p.clone());
                    }
                    !idle
                });
            }
            all.retain(|_, m| !m.is_empty());
            all.values().map(|m| m.len()).sum()
        };
        for p in gone {
            tracing::info!(pool = %p.config().name, idle_for = ?limit, "idle tenant pool stopped");
            self.metrics
                .tenant_reaped
                .with_label_values(&["idle"])
                .inc();
            p.retire_gracefully();
        }
        left
    }
}

/// Samples the node budget, exports it, and reaps idle tenant pools until
/// `shutdown`.
pub(super) async fn upkeep(broker: Weak<Broker>, shutdown: CancellationToken) {
    let mut evictions_seen = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(UPKEEP_EVERY) => {}
        }
        let Some(b) = broker.upgrade() else { return };
        let budget = b.node.budget();
        budget.sample();
        let tenants = b.reap_idle_tenants(Instant::now());
        let g = &b.metrics.node;
        let set = |what: &str, v: u64| {
            g.with_label_values(&[what])
                .set(i64::try_from(v).unwrap_or(i64::MAX))
        };
        set("processes", budget.live() as u64);
        set(
            "max_processes",
            budget.max_processes().map_or(0, |n| n as u64),
        );
        set("resident_bytes", budget.resident());
        set("max_memory_bytes", budget.max_memory().unwrap_or(0));
        set("tenant_pools", tenants as u64);
        set("max_tenant_pools", b.settings.node.max_tenant_pools as u64);
        let ev = budget.evictions();
        b.metrics
            .evictions
            .with_label_values(&[])
            .inc_by(ev - evictions_seen);
        evictions_seen = ev;
    }
}
