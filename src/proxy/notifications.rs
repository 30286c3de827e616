//! Server notifications outside any request: the handshake era's `GET`
//! stream and the stateless era's `subscriptions/listen`.
//!
//! Both read the broker's pool event stream: in exclusive pools only the
//! session's own process; elsewhere every process, so `list_changed` reaches
//! every session of the pool. Streams end when the client leaves or the
//! proxy shuts down.

use super::error::ProxyError;
use super::Proxy;
use super::{legacy, sse};
use crate::jsonrpc;
use crate::web::{self, Body};
use ::http::{HeaderMap, Response};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

const BUFFER: usize = 16;

/// One open stream's places in the counters it is bounded by; dropping it
/// (the stream ended) gives them back.
struct Slots(Vec<Arc<AtomicUsize>>);

impl Slots {
    /// Takes a place in each `(counter, cap)`, or none if any is full.
    fn take(limits: &[(&Arc<AtomicUsize>, usize, &str)]) -> Result<Slots, ProxyError> {
        let mut held = Slots(Vec::new());
        for (counter, cap, what) in limits {
            let ok = counter
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < *cap).then_some(n + 1)
                })
                .is_ok();
            if !ok {
                return Err(ProxyError::TooManyStreams(format!(
                    "{cap} open {what} at most; close one first"
                )));
            }
            held.0.push(Arc::clone(counter));
        }
        Ok(held)
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        for c in &self.0 {
            c.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Pumps broker events through `map` into an SSE body until either side ends.
fn pump(
    proxy: &Arc<Proxy>,
    kind: &str,
    slots: Slots,
    mut events: super::backend::Lines,
    first: Option<Value>,
    map: impl Fn(Value) -> Option<Value> + Send + 'static,
) -> Body {
    let (tx, body) = web::channel_body(BUFFER);
    let shutdown = proxy.shutdown.clone();
    let open =
        crate::metrics::GaugeGuard::new(proxy.metrics.sse_streams.with_label_values(&[kind]));
    proxy.tracker.spawn(async move {
        let _open = open;
        let _slots = slots;
        if let Some(f) = first {
            if tx.send(sse::event(&f)).await.is_err() {
                return;
            }
        }
        let mut keepalive = sse::keepalive();
        loop {
            let out = tokio::select! {
                ev = events.next() => match ev {
                    Some(Ok(m)) => match map(m) { Some(m) => sse::event(&m), None => continue },
                    Some(Err(_)) => continue,
                    None => break,
                },
                _ = keepalive.tick() => sse::KEEPALIVE_COMMENT,
                _ = tx.closed() => break,
                _ = shutdown.cancelled() => break,
            };
            if tx.send(out).await.is_err() {
                break;
            }
        }
    });
    body
}

/// `GET /mcp` for a session.
pub async fn get(proxy: &Arc<Proxy>, headers: &HeaderMap, accept_sse: bool) -> Response<Body> {
    if !accept_sse {
        return ProxyError::NotAcceptable("GET needs Accept: text/event-stream")
            .into_response(Value::Null);
    }
    let s = match legacy::session(proxy, headers) {
        Ok(s) => s,
        Err(e) => return e.into_response(Value::Null),
    };
    s.mark_used();
    let limits = [
        (
            &proxy.streams,
            proxy.settings.max_streams,
            "streams in this proxy",
        ),
        (
            &s.streams,
            proxy.settings.max_streams_per_session,
            "streams per session",
        ),
    ];
    let slots = match Slots::take(&limits) {
        Ok(s) => s,
        Err(e) => return e.into_response(Value::Null),
    };
    match proxy.backend.notifications(Some(&s.id)).await {
        Ok(events) => sse::response(pump(proxy, "listen", slots, events, None, Some)),
        Err(e) => ProxyError::Backend(e).into_response(Value::Null),
    }
}

/// `subscriptions/listen` from a 2026-07-28 client.
pub async fn modern(proxy: &Arc<Proxy>, id: Value, msg: &Value) -> Response<Body> {
    let wanted = msg
        .pointer("/params/notifications")
        .cloned()
        .unwrap_or(json!({}));
    let flag = |k: &str| wanted.get(k).and_then(Value::as_bool).unwrap_or(false);
    let (tools, prompts, resources) = (
        flag("toolsListChanged"),
        flag("promptsListChanged"),
        flag("resourcesListChanged"),
    );
    let limits = [(
        &proxy.streams,
        proxy.settings.max_streams,
        "streams in this proxy",
    )];
    let slots = match Slots::take(&limits) {
        Ok(s) => s,
        Err(e) => return e.into_response(id),
    };
    let events = match proxy.backend.notifications(None).await {
        Ok(e) => e,
        Err(e) => return ProxyError::Backend(e).into_response(id),
    };
    let sub_meta = json!({"io.modelcontextprotocol/subscriptionId": id});
    // Per-resource subscriptions need a process held per client; not offered.
    let ack = jsonrpc::notification(
        "notifications/subscriptions/acknowledged",
        json!({
            "_meta": sub_meta,
            "notifications": {
                "toolsListChanged": tools,
                "promptsListChanged": prompts,
                "resourcesListChanged": resources,
                "resourceSubscriptions": [],
            }
        }),
    );
    let map = move |mut m: Value| {
        let method = m.get("method").and_then(Value::as_str)?;
        let keep = match method {
            "notifications/tools/list_changed" => tools,
            "notifications/prompts/list_changed" => prompts,
            "notifications/resources/list_changed" => resources,
            _ => false,
        };
        if !keep {
            return None;
        }
        let params = m
            .as_object_mut()?
            .entry("params")
            .or_insert_with(|| json!({}));
        if let Some(p) = params.as_object_mut() {
            p.insert("_meta".into(), sub_meta.clone());
        }
        Some(m)
    };
    sse::response(pump(proxy, "subscription", slots, events, Some(ack), map))
}
