//! Id rewriting hot path: [`Router::begin`] rewrites a client request's id
//! (and progress token) for the process, and [`Router::route`] maps the
//! process's response back to the lease with the client's id.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use mcp_broker::process::router::{Action, LeaseEvent, Router};
use serde_json::{json, Value};

fn request(token: bool) -> Value {
    let mut m = json!({"jsonrpc":"2.0","id":"client-7","method":"tools/call",
        "params":{"name":"echo","arguments":{"text":"hello"}}});
    if token {
        m["params"]["_meta"] = json!({"progressToken": "tok-1"});
    }
    m
}

fn begin_and_route(c: &mut Criterion) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<LeaseEvent>(1024);
    let mut g = c.benchmark_group("router");
    for token in [false, true] {
        let name = if token {
            "begin+route (progress token)"
        } else {
            "begin+route"
        };
        g.bench_function(name, |b| {
            let mut r = Router::new(1);
            b.iter_batched(
                || request(token),
                |mut msg| {
                    let lid = r.begin(&mut msg, tx.clone());
                    let resp = json!({"jsonrpc":"2.0","id":msg["id"],"result":{"content":[]}});
                    match r.route(resp) {
                        Action::ToLease(_, LeaseEvent::Final(m)) => assert_eq!(m["id"], "client-7"),
                        other => panic!("unexpected {other:?}"),
                    }
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
