//! Kubernetes Events for pools in trouble, on the broker's own pod.
//!
//! A pool whose command keeps failing is something an operator should see
//! in `kubectl describe pod`/`kubectl get events`, not only in logs.
//! [`watch`] looks at every pool's status periodically and records a
//! Warning Event when a pool is failing, at most once per pool per
//! [`DEFAULT_MIN_INTERVAL`], so a crash loop cannot flood the API server.
//! Recording is best effort: an API error is logged and never affects
//! leasing.

use crate::broker::Broker;
use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, PostParams};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Shortest time between two Events for the same pool.
pub const DEFAULT_MIN_INTERVAL: Duration = Duration::from_secs(300);
/// How often pool states are checked.
pub const CHECK_EVERY: Duration = Duration::from_secs(5);
/// Consecutive start failures that make a pool worth an Event.
pub const FAILING_AFTER: u32 = 3;
const API_TIMEOUT: Duration = Duration::from_secs(5);

/// The pod Events are attached to (from the downward API).
#[derive(Debug, Clone)]
pub struct PodRef {
    pub name: String,
    pub namespace: String,
    pub uid: Option<String>,
}

impl PodRef {
    /// `POD_NAME`, `POD_NAMESPACE` and optional `POD_UID` from the environment.
    pub fn from_env() -> Option<PodRef> {
        Some(PodRef {
            name: std::env::var("POD_NAME").ok()?,
            namespace: std::env::var("POD_NAMESPACE").ok()?,
            uid: std::env::var("POD_UID").ok(),
        })
    }
}

/// Records rate-limited Events.
pub struct Recorder {
    client: kube::Client,
    pod: PodRef,
    min_interval: Duration,
    last: Mutex<HashMap<String, Instant>>,
}

impl Recorder {
    /// A recorder attaching Events to `pod`.
    pub fn new(client: kube::Client, pod: PodRef, min_interval: Duration) -> Self {
        Self {
            client,
            pod,
            min_interval,
            last: Mutex::new(HashMap::new()),
        }
    }

    /// Records that `pool` keeps failing, unless one was recorded recently.
    /// Returns whether an Event was sent.
    pub async fn pool_failing(&self, pool: &str, failures: u32, error: &str) -> bool {
        {
            let mut last = self.last.lock().expect("lock");
            let now = Instant::now();
            if last
                .get(pool)
                .is_some_and(|t| now.duration_since(*t) < self.min_interval)
            {
                return false;
            }
            last.insert(pool.to_string(), now);
        }
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let event = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}.", self.pod.name)),
                namespace: Some(self.pod.namespace.clone()),
                ..ObjectMeta::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(self.pod.name.clone()),
                namespace: Some(self.pod.namespace.clone()),
                uid: self.pod.uid.clone(),
                ..ObjectReference::default()
            },
            reason: Some("PoolFailing".into()),
            message: Some(format!(
                "pool {pool:?} failed to start a server process {failures} times in a row: {error}"
            )),
            type_: Some("Warning".into()),
            count: Some(1),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            source: Some(EventSource {
                component: Some("mcp-broker".into()),
                host: std::env::var("NODE_NAME").ok(),
            }),
            reporting_component: Some("mcp-broker".into()),
            reporting_instance: Some(self.pod.name.clone()),
            ..Event::default()
        };
        let api: Api<Event> = Api::namespaced(self.client.clone(), &self.pod.namespace);
        match tokio::time::timeout(API_TIMEOUT, api.create(&PostParams::default(), &event)).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                tracing::warn!(pool, "cannot record a Kubernetes Event: {e}");
                false
            }
            Err(_) => {
                tracing::warn!(
                    pool,
                    "cannot record a Kubernetes Event: no answer within {API_TIMEOUT:?}"
                );
                false
            }
        }
    }
}

/// Checks the broker's pools every [`CHECK_EVERY`] until `shutdown`.
pub async fn watch(broker: Arc<Broker>, recorder: Recorder, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(CHECK_EVERY) => {}
        }
        for pool in broker.pools() {
            let st = pool.status();
            if st.failures >= FAILING_AFTER {
                let error = st.last_error.unwrap_or_default();
                recorder
                    .pool_failing(&pool.config().name, st.failures, &error)
                    .await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::{json, Value};

    #[tokio::test]
    async fn events_are_recorded_on_the_pod_and_rate_limited() {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                assert_eq!(req.uri().path(), "/api/v1/namespaces/mcp-broker/events");
                let body = req.into_body().collect_bytes().await.unwrap();
                let ev: Value = serde_json::from_slice(&body).unwrap();
                tx.send(ev.clone()).unwrap();
                let mut created = ev;
                created["metadata"]["name"] = json!("broker-abc.1");
                send.send_response(
                    Response::builder()
                        .body(Body::from(created.to_string().into_bytes()))
                        .unwrap(),
                );
            }
        });
        let pod = PodRef {
            name: "broker-abc".into(),
            namespace: "mcp-broker".into(),
            uid: Some("u-1".into()),
        };
        let r = Recorder::new(
            kube::Client::new(svc, "default"),
            pod,
            Duration::from_secs(60),
        );
        assert!(r.pool_failing("time", 3, "exited with status 1").await);
        let ev = rx.recv().await.unwrap();
        assert_eq!(ev["reason"], "PoolFailing");
        assert_eq!(ev["type"], "Warning");
        assert_eq!(ev["involvedObject"]["name"], "broker-abc");
        assert_eq!(ev["involvedObject"]["uid"], "u-1");
        assert!(ev["message"].as_str().unwrap().contains("\"time\""));
        assert!(!r.pool_failing("time", 4, "again").await, "rate-limited");
        assert!(r.pool_failing("other", 3, "x").await, "per pool");
        assert!(rx.recv().await.unwrap()["message"]
            .as_str()
            .unwrap()
            .contains("other"));
    }

    #[tokio::test]
    async fn api_errors_are_swallowed() {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        tokio::spawn(async move {
            while let Some((_req, send)) = handle.next_request().await {
                send.send_error(std::io::Error::other("refused"));
            }
        });
        let pod = PodRef {
            name: "p".into(),
            namespace: "n".into(),
            uid: None,
        };
        let r = Recorder::new(
            kube::Client::new(svc, "default"),
            pod,
            Duration::from_secs(60),
        );
        assert!(!r.pool_failing("x", 3, "e").await);
    }
}
