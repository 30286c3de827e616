//! mcp-broker: node-local pools of warm stdio MCP server processes, leased per
//! request over a Unix socket, with a thin MCP Streamable HTTP proxy in front.
//!
//! Layers, bottom up:
//! * [`framing`] and [`jsonrpc`]: newline-delimited JSON-RPC with hard size
//!   limits, and message classification.
//! * [`process`]: one server process (spawn in its own group, route its
//!   stdout to the right request, stop and reap the whole group).
//! * [`pool`]: warm processes for one command (sizing, queueing, backoff).
//! * [`lease_api`]: the contract between broker and proxy (paths, headers,
//!   pool descriptions, error codes); both sides import it, never each other.
//! * [`broker`]: the daemon: pools plus the lease API served on a Unix socket.
//! * [`csi`]: the daemon as a CSI node plugin: a socket per pod, with the
//!   pod's identity from the kubelet (feature `csi`).
//! * [`proxy`]: MCP Streamable HTTP for clients of either protocol era,
//!   turning each request into one lease.
//! * [`shim`]: `mcp-broker connect`, a stdio MCP server for hosts that
//!   spawn one, leasing from a pool per request.
//! * [`handoff`]: take-overs by a new broker and in-place upgrades.
//! * [`user_broker`]: one user's own broker with on-demand pools for the
//!   commands its shims name, started on first use.
//! * [`up`]: broker and proxy in one process for a laptop.
//! * [`slim`]: the shim and proxy as binaries of their own (a few MiB each).
//! * [`bench`]: the node-local benchmark (`mcp-broker bench`).

#[cfg(feature = "bench")]
pub mod bench;
pub mod broker;
pub mod config;
#[cfg(feature = "csi")]
pub mod csi;
pub mod framing;
pub mod handoff;
pub mod jsonrpc;
#[cfg(feature = "kubernetes")]
pub mod kube_events;
pub mod lease_api;
pub mod metrics;
pub mod node;
pub mod policy;
pub mod pool;
pub mod process;
pub mod protocol;
pub mod proxy;
pub mod runtime;
pub mod shim;
pub mod shutdown;
pub mod slim;
pub mod up;
pub mod user_broker;
pub mod web;
