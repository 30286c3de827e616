//! What the pools of one broker share on their node: who their processes
//! run as ([`uids`]), the cgroups that bound them ([`cgroup`]), and the
//! node-wide budget ([`budget`]).
//!
//! [`Node::new`] decides once, at start, what this broker can do (switch
//! users? a delegated cgroup?) and says so in the log: where it cannot, pools
//! run as the broker's own user, or under rlimits instead of a cgroup, and
//! `check` and the start-up log say that pools are not isolated from each
//! other. Nothing here is on the request path.

pub mod budget;
pub mod cgroup;
pub mod uids;

use crate::config::raw::Isolation;
use crate::config::{NodeSettings, PoolConfig};
use budget::Budget;
use cgroup::{Cgroups, PoolCgroup};
use std::sync::Arc;
use uids::{RunAs, Uids};

/// Where a pool's processes run: as whom, in which cgroup.
#[derive(Debug, Default, Clone)]
pub struct Placement {
    /// The pool's own user; `None`: the broker's (or `sandbox.user`).
    pub run_as: Option<RunAs>,
    /// The pool's cgroup; `None`: no delegated cgroup (rlimits stand in).
    pub cgroup: Option<Arc<PoolCgroup>>,
}

/// The node's shared state for one broker.
pub struct Node {
    uids: Result<Uids, String>,
    cgroups: Result<Cgroups, String>,
    budget: Arc<Budget>,
}

impl Node {
    /// Decides isolation and cgroups for this broker and logs the outcome.
    pub fn new(s: &NodeSettings) -> Arc<Node> {
        let uids = match s.isolation {
            Isolation::Off => Err("off ([broker] isolation = \"off\")".to_string()),
            Isolation::Auto => match uids::missing_caps() {
                missing if !missing.is_empty() => Err(format!(
                    "the broker cannot switch users (it lacks {})",
                    missing.join(", ")
                )),
                _ => Uids::open(s).map_err(|e| e.to_string()),
            },
        };
        let cgroups = match s.cgroups {
            Isolation::Off => Err("off ([broker] cgroups = \"off\")".to_string()),
            Isolation::Auto => Cgroups::detect(),
        };
        let node = Node {
            uids,
            cgroups,
            budget: Budget::new(s.max_processes, s.max_memory),
        };
        for line in node.describe() {
            tracing::info!("{line}");
        }
        if let Err(why) = &node.uids {
            tracing::warn!("pools are NOT isolated from each other: every server runs as the broker's user ({why})");
        }
        node
            .cgroups
            .as_ref()
            .err()
            .inspect(|why| tracing::warn!("no cgroup per pool: {why}; [pool.limits] fall back to rlimits (memory: RLIMIT_AS per process; pids: RLIMIT_NPROC per pool user)"));
        Arc::new(node)
    }

    /// One line each for isolation, cgroups and the budget.
    pub fn describe(&self) -> Vec<String> {
        let b = &self.budget;
        vec![
            match &self.uids {
                Ok(_) => "isolation: a uid per pool and tenant, private homes".to_string(),
                Err(why) => format!("isolation: none, pools share the broker's user ({why})"),
            },
            match &self.cgroups {
                Ok(c) => format!("cgroups: one per pool, {}", c.describe()),
                Err(why) => format!("cgroups: none ({why})"),
            },
            format!(
                "node budget: max_processes {}, max_memory {}",
                b.max_processes()
                    .map_or("unlimited".into(), |n| n.to_string()),
                b.max_memory()
                    .map_or("unlimited".into(), |n| format!("{} MiB", n >> 20))
            ),
        ]
    }

    /// Whether pools run under uids of their own.
    pub fn isolates(&self) -> bool {
        self.uids.is_ok()
    }

    /// The node-wide budget.
    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    /// The user and cgroup for pool `cfg` (a tenant pool is keyed by its
    /// own name, `pool@tenant`). An explicit `sandbox.user` wins over the
    /// pool's own uid.
    pub fn place(&self, cfg: &PoolConfig) -> Result<Placement, String> {
        let run_as = match (&self.uids, &cfg.sandbox.user) {
            (Ok(u), None) => Some(u.assign(&cfg.name).map_err(|e| e.to_string())?),
            _ => None,
        };
        let cgroup = match &self.cgroups {
            Ok(c) => Some(Arc::new(c.create(&cfg.name, &cfg.limits)?)),
            Err(_) => None,
        };
        Ok(Placement { run_as, cgroup })
    }
}
