//! One function per scenario: start what it needs, run one step per
//! concurrency level, stop it (always, also after a failed step).

use super::load::Connect;
use super::probe::Layout;
use super::relay::Relay;
use super::stdio::StdioServer;
use super::targets::{Peer, Stack, Trivial};
use super::Ctx;
use crate::config::Mode;
use std::sync::Arc;

/// One step per concurrency level, all of them even after a failed one;
/// the first error is returned.
async fn every_level(
    ctx: &mut Ctx,
    name: &str,
    connect: &Connect,
    layout: Layout,
    stack: Option<&Stack>,
) -> anyhow::Result<()> {
    let mut r = Ok(());
    for c in ctx.levels() {
        let n = ctx.args.requests;
        r = r.and(ctx.step(name, connect, layout, c, n, stack).await);
    }
    r
}

/// MCP at `/mcp` on `addr`.
fn mcp_at(addr: std::net::SocketAddr) -> Connect {
    Connect::Http {
        addr,
        path: "/mcp".into(),
    }
}

pub(super) async fn ceiling(ctx: &mut Ctx) -> anyhow::Result<()> {
    let t = Trivial::start(ctx.rt())?;
    let connect = mcp_at(t.addr);
    let r = every_level(ctx, "ceiling", &connect, Layout::Trivial, None).await;
    t.stop().await;
    r
}

pub(super) async fn direct(ctx: &mut Ctx) -> anyhow::Result<()> {
    let server = tokio::time::timeout(
        ctx.args.start_timeout,
        StdioServer::start(&ctx.cmd, ctx.args.timeout),
    )
    .await
    .map_err(|_| anyhow::anyhow!("the server did not initialize in time"))??;
    let server = Arc::new(server);
    let connect = Connect::Stdio(server.clone());
    let r = every_level(ctx, "direct", &connect, Layout::Children, None).await;
    server.stop().await;
    r
}

/// The bare relay in front of one server process: the floor of `pool-1`.
pub(super) async fn relay(ctx: &mut Ctx) -> anyhow::Result<()> {
    let limit = ctx.args.start_timeout.max(ctx.args.timeout);
    let relay = Relay::start(ctx.rt(), &ctx.cmd, limit).await?;
    let connect = mcp_at(relay.http.addr);
    let r = every_level(ctx, "relay", &connect, Layout::InProcess, None).await;
    relay.stop().await;
    r
}

/// A broker with a pool of `size` in `mode` and a proxy in front of it
/// (over the socket with `sidecar`), and how the load generator reaches it.
fn stack(ctx: &Ctx, mode: Mode, size: usize, sidecar: bool) -> anyhow::Result<(Stack, Connect)> {
    let stack = Stack::start(ctx.rt(), ctx.pool_config(mode, size), ctx.node(), sidecar)?;
    let connect = mcp_at(stack.addr);
    Ok((stack, connect))
}

/// A shared pool of `k`; `sidecar`: the proxy reaches the broker over its
/// socket, as a separate `mcp-broker proxy` does (else in-process, as `up`).
pub(super) async fn pooled(ctx: &mut Ctx, k: usize, sidecar: bool) -> anyhow::Result<()> {
    let (stack, connect) = stack(ctx, Mode::Shared, k, sidecar)?;
    let mut r = stack.wait_idle(k, ctx.args.start_timeout).await;
    if r.is_ok() {
        let name = format!("{}-{k}", if sidecar { "sidecar" } else { "pool" });
        r = every_level(ctx, &name, &connect, Layout::InProcess, Some(&stack)).await;
    }
    stack.stop().await;
    r
}

pub(super) async fn exclusive(ctx: &mut Ctx) -> anyhow::Result<()> {
    let most = ctx.args.max_processes;
    for c in ctx.levels().into_iter().filter(|c| *c <= most) {
        let (stack, connect) = stack(ctx, Mode::Exclusive, c, false)?;
        let mut r = stack.wait_idle(c, ctx.args.start_timeout).await;
        if r.is_ok() {
            r = ctx
                .step(
                    "exclusive",
                    &connect,
                    Layout::InProcess,
                    c,
                    ctx.args.requests,
                    Some(&stack),
                )
                .await;
        }
        stack.stop().await;
        r?;
    }
    Ok(())
}

pub(super) async fn spawn(ctx: &mut Ctx) -> anyhow::Result<()> {
    let connect = Connect::Spawn(Arc::new(ctx.cmd.clone()));
    let n = ctx.args.spawn_requests;
    let most = ctx.args.max_processes;
    for c in ctx.levels().into_iter().filter(|c| *c <= most) {
        ctx.step("spawn", &connect, Layout::Children, c, n, None)
            .await?;
    }
    Ok(())
}

/// Splits `NAME=TEMPLATE`; without a name, the template's first word.
fn peer_name(spec: &str) -> (String, String) {
    if let Some((n, t)) = spec.split_once('=') {
        if !n.is_empty() && !n.contains(char::is_whitespace) && !n.contains('{') {
            return (n.to_string(), t.to_string());
        }
    }
    let first = spec.split_whitespace().next().unwrap_or("peer");
    let base = first.rsplit('/').next().unwrap_or(first);
    (base.to_string(), spec.to_string())
}

pub(super) async fn peer(ctx: &mut Ctx, spec: &str) -> anyhow::Result<()> {
    let (name, template) = peer_name(spec);
    let log = ctx.args.out.join(format!("peer-{name}.log"));
    let mut p = Peer::start(
        &template,
        &ctx.cmd,
        &ctx.args.peer_path,
        &log,
        ctx.args.start_timeout,
    )
    .await?;
    let connect = Connect::Http {
        addr: p.addr,
        path: ctx.args.peer_path.clone(),
    };
    let mut r = Ok(());
    for c in ctx.levels() {
        let n = format!("peer:{name}");
        r = r.and(
            ctx.step(
                &n,
                &connect,
                Layout::Peer(p.pid),
                c,
                ctx.args.requests,
                None,
            )
            .await,
        );
        if r.is_err() {
            break;
        }
    }
    p.stop().await;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_names() {
        assert_eq!(peer_name("sg=supergateway --port {port}").0, "sg");
        let (n, t) = peer_name("/x/mcp-proxy --port={port} -- {cmd}");
        assert_eq!(n, "mcp-proxy");
        assert_eq!(t, "/x/mcp-proxy --port={port} -- {cmd}");
    }
}
