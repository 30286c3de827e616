//! The broker's per-request message work, side by side: a request's text
//! in, the line written to the process, the process's response line in,
//! the line for the caller out.
//!
//! * `parsed`: parse the request, [`Router::begin`] rewrites its id (and
//!   progress token) in the tree, serialize; parse the response,
//!   [`Router::route`] restores the caller's id, serialize.
//! * `raw`: [`RawRequest::parse`] and [`Router::begin_raw`] splice the id
//!   into the text; [`raw::response_head`] and [`Router::route_response`]
//!   splice the caller's back (what the broker does for plain requests).

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use mcp_broker::jsonrpc::raw::{self, RawRequest};
use mcp_broker::process::router::{Action, LeaseEvent, Reply, Router};
use serde_json::{json, Value};

fn request(token: bool) -> Bytes {
    let mut m = json!({"jsonrpc":"2.0","id":"client-7","method":"tools/call",
        "params":{"name":"echo","arguments":{"text":"hello"}}});
    if token {
        m["params"]["_meta"] = json!({"progressToken": "tok-1"});
    }
    serde_json::to_vec(&m).unwrap().into()
}

/// The process's answer to request `id`.
fn response(id: u64) -> String {
    format!(
        r#"{{"jsonrpc":"2.0","id":{id},"result":{{"content":[{{"type":"text","text":"hello"}}]}}}}"#
    )
}

fn caller_line(action: Action) -> Bytes {
    match action {
        Action::ToLease(_, LeaseEvent::Final(Reply::Parsed(m))) => {
            serde_json::to_vec(&m).unwrap().into()
        }
        Action::ToLease(_, LeaseEvent::Final(Reply::Raw { line, .. })) => line,
        other => panic!("unexpected {other:?}"),
    }
}

fn begin_and_route(c: &mut Criterion) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<LeaseEvent>(1024);
    let mut g = c.benchmark_group("router");
    for (name, token, use_raw) in [
        ("parsed", false, false),
        ("raw", false, true),
        ("parsed (progress token)", true, false),
    ] {
        g.bench_function(name, |b| {
            let mut r = Router::new(1);
            let text = request(token);
            b.iter_batched(
                || text.clone(),
                |text| {
                    let (lid, _sent) = if use_raw {
                        let (req, _method) = RawRequest::parse(text).expect("plain");
                        r.begin_raw(&req, tx.clone())
                    } else {
                        let mut msg: Value = serde_json::from_slice(&text).unwrap();
                        let lid = r.begin(&mut msg, tx.clone());
                        (lid, serde_json::to_vec(&msg).unwrap())
                    };
                    let resp = response(r.proc_id(lid).expect("open"));
                    let resp = resp.as_bytes();
                    let action = if use_raw {
                        let head = raw::response_head(resp).expect("a response");
                        r.route_response(&head, resp)
                    } else {
                        r.route(serde_json::from_slice(resp).unwrap())
                    };
                    let out = caller_line(action);
                    assert!(memchr::memmem::find(&out, br#""id":"client-7""#).is_some());
                    r.end(lid);
                    while rx.try_recv().is_ok() {}
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, begin_and_route);
criterion_main!(benches);
