//! `mcp-broker serve`: the node daemon's start-up (socket, take-over or
//! in-place upgrade, Kubernetes identity, the CSI plugin) and its run until
//! shutdown or hand-off.

use super::*;

/// Runs the daemon; `reload` is the config file and the content `cfg` came
/// from, watched for changes (and SIGHUP) to reconcile pools live.
pub(super) async fn serve(
    cfg: Config,
    reload: (PathBuf, Vec<u8>),
    shutdown: CancellationToken,
    signals: mcp_broker::shutdown::Signals,
    binary: Option<PathBuf>,
    wait_after_handoff: bool,
) -> anyhow::Result<()> {
    use mcp_broker::handoff::{run, start};
    let settings = cfg.broker.clone();
    let socket_path = settings.socket.clone();
    let opened = start::open(&settings)
        .with_context(|| format!("binding the lease API socket {}", socket_path.display()))?;
    // Children the previous image left (only after an upgrade), read before
    // any pool starts one.
    let children = mcp_broker::process::adopt::children();
    let metrics = Arc::new(Metrics::new());
    let metrics_listen = cfg.broker.metrics_listen;
    let kube = cfg.broker.kubernetes.clone();
    let csi_settings = cfg.broker.csi.clone();
    let (ready, in_use) = match opened {
        start::Opened::Ready {
            listeners,
            remove_at_exit,
            previous,
            upgraded,
        } => (Some((listeners, remove_at_exit, previous, upgraded)), false),
        start::Opened::InUse => (None, true),
    };
    let previous = ready.as_ref().map(|r| r.2.clone()).unwrap_or_default();
    let key = ready.as_ref().and_then(|r| r.3.as_ref()?.sealer_key);
    let (broker, adopted) = Broker::start_adopting(cfg, metrics, &previous, key);
    if ready.as_ref().is_some_and(|r| r.3.is_some()) {
        tracing::info!(
            adopted = adopted.len(),
            "upgraded in place: processes adopted"
        );
        for pid in children.into_iter().filter(|p| !adopted.contains(p)) {
            tokio::spawn(mcp_broker::process::adopt::reap_stray(pid));
        }
    }
    if let Some(k) = kube {
        start_kubernetes(&broker, &k, &shutdown).await?;
    }
    if let Some(addr) = metrics_listen {
        tokio::spawn(mcp_broker::broker::api::bind_and_serve_health(
            broker.clone(),
            addr,
            in_use,
            shutdown.clone(),
        ));
    }
    tokio::spawn(mcp_broker::broker::reload::watch(
        broker.clone(),
        reload.0,
        reload.1,
        mcp_broker::broker::reload::DEFAULT_POLL,
        shutdown.clone(),
        Some(signals.reload.clone()),
    ));
    let (listeners, remove_at_exit, take_over) = match ready {
        Some((listeners, remove_at_exit, _, upgraded)) => {
            if let Some(mut u) = upgraded {
                u.confirm().await;
            }
            (listeners, remove_at_exit, None)
        }
        None => match start::take_over(&broker, &settings, &shutdown).await {
            Ok((taken, paths)) => (taken.listeners.clone(), paths, Some(taken)),
            Err(e) => {
                tracing::error!("{e}; not starting (stopping this broker's processes)");
                broker.drain().await;
                return Err(e.into());
            }
        },
    };
    // The plugin stops with the broker, also when it hands off to a new one.
    let csi_stop = shutdown.child_token();
    let csi = match csi_settings {
        Some(c) => Some(start_csi(&broker, c, &csi_stop).await?),
        None => None,
    };
    tracing::info!(socket = %socket_path.display(), "broker listening");
    let serving = run::Serving {
        broker,
        listeners,
        remove_at_exit,
        signals: Some(signals),
        binary,
        take_over,
    };
    let ended = run::serve(serving, shutdown.clone()).await;
    tracing::info!(?ended, "broker stopped");
    csi_stop.cancel();
    if let Some(p) = csi {
        p.stopped().await;
    }
    if ended == run::Ended::HandedOff && wait_after_handoff {
        tracing::info!("handed off and drained; waiting for SIGTERM (--after-handoff wait)");
        shutdown.cancelled().await;
    }
    Ok(())
}

/// The CSI node plugin (`[csi]`).
#[cfg(feature = "csi")]
async fn start_csi(
    broker: &Arc<Broker>,
    c: mcp_broker::config::csi::CsiSettings,
    shutdown: &CancellationToken,
) -> anyhow::Result<mcp_broker::csi::Plugin> {
    Ok(mcp_broker::csi::Plugin::start(broker.clone(), c, shutdown.clone()).await?)
}

/// Stands in for the plugin in a build without it (never constructed).
#[cfg(not(feature = "csi"))]
enum NoCsi {}

#[cfg(not(feature = "csi"))]
impl NoCsi {
    async fn stopped(self) {}
}

/// This build has no CSI plugin: say so instead of ignoring the section.
#[cfg(not(feature = "csi"))]
async fn start_csi(
    _: &Arc<Broker>,
    _: mcp_broker::config::csi::CsiSettings,
    _: &CancellationToken,
) -> anyhow::Result<NoCsi> {
    anyhow::bail!("[csi] needs a build with the `csi` feature (this one was built without it)")
}

/// Identity and events from the Kubernetes API (`identity = "kubernetes"`).
#[cfg(feature = "kubernetes")]
async fn start_kubernetes(
    broker: &Arc<Broker>,
    k: &config::KubeSettings,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("identity = \"kubernetes\": cannot build a Kubernetes client (in-cluster config or KUBECONFIG)")?;
    broker.set_token_reviewer(mcp_broker::policy::tokenreview::TokenReviewer::new(
        client.clone(),
        k.audience.clone(),
        k.cache_ttl,
        broker.settings().front_door.token_review_rate,
        broker.settings().front_door.token_review_burst,
    ));
    tracing::info!("verifying ServiceAccount tokens with the TokenReview API");
    if k.peer_identity {
        let node = k.node_name.clone().unwrap_or_default();
        let idx =
            mcp_broker::policy::pods::PodIndex::start(client.clone(), &node, shutdown.clone());
        broker.set_pod_index(idx);
        tracing::info!(node, "identifying callers' pods by peer credentials");
    }
    match mcp_broker::kube_events::PodRef::from_env() {
        Some(pod) => {
            let recorder = mcp_broker::kube_events::Recorder::new(
                client,
                pod,
                mcp_broker::kube_events::DEFAULT_MIN_INTERVAL,
            );
            tokio::spawn(mcp_broker::kube_events::watch(
                broker.clone(),
                recorder,
                shutdown.clone(),
            ));
        }
        None => tracing::info!("POD_NAME/POD_NAMESPACE not set: no Kubernetes Events"),
    }
    Ok(())
}

/// This build has no Kubernetes client: say so instead of ignoring the setting.
#[cfg(not(feature = "kubernetes"))]
async fn start_kubernetes(
    _: &Arc<Broker>,
    _: &config::KubeSettings,
    _: &CancellationToken,
) -> anyhow::Result<()> {
    anyhow::bail!(
        "[broker] identity = \"kubernetes\" needs a build with the `kubernetes` feature \
         (this one was built with --no-default-features)"
    )
}
