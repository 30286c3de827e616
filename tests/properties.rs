//! Property tests (the fuzzing of this crate): stdio line framing, JSON-RPC
//! classification, id/progressToken rewriting, and the lease API's request
//! parser, each against arbitrary input.
//!
//! Each property runs 256 cases by default (the lease API one 128); set
//! `PROPTEST_CASES=100000 cargo test --release --test properties` to run
//! longer. Seeds that once found (or guard against) a bug live in
//! `tests/corpus/` and run every time; a failing case proptest finds is
//! saved to `tests/properties.proptest-regressions` and replayed first.

#[path = "support/harness.rs"]
mod harness;

use mcp_broker::framing::{sniff_id, Frame, LineSplitter};
use mcp_broker::jsonrpc::raw::{self, RawRequest};
use mcp_broker::jsonrpc::{self, Kind};
use mcp_broker::process::router::{Action, LeaseEvent, Reply, Router};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestRunner};
use serde_json::{json, Value};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bytes framing keeps of an oversized line's head and tail.
const KEEP: usize = 256;

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn config(default_cases: u32) -> Config {
    Config {
        cases: cases(default_cases),
        source_file: Some(file!()),
        failure_persistence: Some(Box::new(FileFailurePersistence::SourceParallel(
            "proptest-regressions",
        ))),
        ..Config::default()
    }
}

fn corpus(dir: &str) -> Vec<Vec<u8>> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(dir);
    let mut files: Vec<_> = std::fs::read_dir(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "empty corpus {}", path.display());
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

// ---------------------------------------------------------------- framing

/// Splits `data` at `cuts`, feeding chunk by chunk; checks the memory bound.
fn frames_chunked(max: usize, data: &[u8], cuts: &[usize]) -> Vec<Frame> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
    points.sort_unstable();
    let mut s = LineSplitter::new(max);
    let mut out = Vec::new();
    let mut from = 0;
    for p in points.into_iter().chain([data.len()]) {
        s.push(&data[from..p], &mut out);
        assert!(s.pending() <= max, "held {} > max {max}", s.pending());
        from = p;
    }
    s.finish(&mut out);
    out
}

/// What framing must produce, computed the obvious way.
fn check_frames(max: usize, data: &[u8], frames: &[Frame]) {
    let mut lines: Vec<&[u8]> = data.split(|b| *b == b'\n').collect();
    if lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop(); // the input ended with '\n': no unterminated last line
    }
    assert_eq!(frames.len(), lines.len(), "frame count");
    for (line, frame) in lines.iter().zip(frames) {
        match frame {
            Frame::Line(got) => {
                assert!(
                    line.len() <= max,
                    "a {}-byte line passed a {max} limit",
                    line.len()
                );
                let want = line.strip_suffix(b"\r").unwrap_or(line);
                assert_eq!(&got[..], want);
            }
            Frame::Oversized { len, head, tail } => {
                assert!(
                    line.len() > max,
                    "a {}-byte line was refused under {max}",
                    line.len()
                );
                assert_eq!(*len, line.len());
                assert!(
                    line.starts_with(head) && head.len() <= KEEP,
                    "head is a short prefix"
                );
                assert!(
                    line.ends_with(tail) && tail.len() <= KEEP,
                    "tail is a short suffix"
                );
                if max >= KEEP {
                    assert_eq!(&head[..], &line[..KEEP]);
                    assert_eq!(&tail[..], &line[line.len() - KEEP..]);
                }
            }
        }
    }
}

fn framing_bytes() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![3 => Just(b'\n'), 1 => Just(b'\r'), 6 => Just(b'x'), 2 => any::<u8>()];
    prop::collection::vec(byte, 0..3000)
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn framing_is_chunking_independent(
        max in 1usize..700,
        data in framing_bytes(),
        cuts in prop::collection::vec(any::<usize>(), 0..40),
    ) {
        let whole = frames_chunked(max, &data, &[]);
        check_frames(max, &data, &whole);
        let chunked = frames_chunked(max, &data, &cuts);
        check_frames(max, &data, &chunked);
        // Byte-at-a-time, the worst case for a reader.
        let every: Vec<usize> = (0..data.len()).collect();
        check_frames(max, &data, &frames_chunked(max, &data, &every));
    }

    #[test]
    fn sniff_id_never_panics(data in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = sniff_id(&data);
        let mut s = LineSplitter::new(64);
        let mut out = Vec::new();
        s.push(&data, &mut out);
        s.finish(&mut out);
    }
}

#[test]
fn framing_corpus() {
    for data in corpus("framing") {
        for max in [1, 16, 255, 256, 257, 4096] {
            let whole = frames_chunked(max, &data, &[]);
            check_frames(max, &data, &whole);
            let every: Vec<usize> = (0..data.len()).collect();
            check_frames(max, &data, &frames_chunked(max, &data, &every));
        }
    }
}

// ----------------------------------------------------------- classification

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "[a-z/_]{0,12}".prop_map(Value::from),
        Just(Value::from("2.0")),
        Just(Value::from("tools/call")),
        Just(Value::from("notifications/progress")),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        let key = prop_oneof![
            Just("jsonrpc".to_string()),
            Just("id".to_string()),
            Just("method".to_string()),
            Just("params".to_string()),
            Just("result".to_string()),
            Just("error".to_string()),
            Just("_meta".to_string()),
            Just("progressToken".to_string()),
            "[a-z]{1,6}",
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map(key, inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn classification_never_panics_and_is_consistent(v in json_value()) {
        let mut v = v;
        match jsonrpc::classify(&v) {
            Ok(Kind::Request { id, method }) => {
                prop_assert_eq!(&v["id"], &id);
                prop_assert_eq!(v["method"].as_str(), Some(method.as_str()));
            }
            Ok(Kind::Notification { method }) => {
                prop_assert!(v.get("id").is_none());
                prop_assert_eq!(v["method"].as_str(), Some(method.as_str()));
            }
            Ok(Kind::Response { id }) => {
                prop_assert_eq!(&v["id"], &id);
                prop_assert!(v.get("method").is_none());
            }
            Err(e) => { let _ = e.to_string(); }
        }
        // The text paths accept only what classification agrees with.
        let text = serde_json::to_vec(&v).unwrap();
        if let Some((req, method)) = RawRequest::parse(text.clone().into()) {
            let want = Kind::Request { id: req.id.clone(), method };
            prop_assert_eq!(jsonrpc::classify(&v), Ok(want));
            prop_assert_eq!(req.to_value().unwrap(), v.clone());
        }
        if let Some(h) = raw::answer_head(&text) {
            let response = matches!(jsonrpc::classify(&v), Ok(Kind::Response { .. }));
            prop_assert!(response, "read as a response: {}", v);
            prop_assert_eq!(h.is_error, jsonrpc::is_error(&v));
        }
        if let Some(h) = raw::response_head(&text) {
            prop_assert_eq!(jsonrpc::classify(&v), Ok(Kind::Response { id: json!(h.id) }));
        }
        let _ = jsonrpc::meta(&v);
        let _ = jsonrpc::is_error(&v);
        if let Some(t) = jsonrpc::progress_token_mut(&mut v) {
            let _ = jsonrpc::key_of(t);
        }
        // Whatever the process sends, routing it never panics.
        let mut r = Router::new(1);
        let (tx, _rx) = tokio::sync::mpsc::channel(4);
        let mut req = json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"_meta":{"progressToken":1}}});
        let lid = r.begin(&mut req, tx);
        let _ = r.route(v.clone());
        let _ = r.deliver(lid, v);
    }

    #[test]
    fn arbitrary_text_never_panics_classification(s in ".{0,200}") {
        if let Ok(v) = serde_json::from_str::<Value>(&s) {
            let _ = jsonrpc::classify(&v);
        }
        // Whatever the text, the raw readers decide without panicking.
        let _ = RawRequest::parse(s.clone().into());
        let _ = raw::answer_head(s.as_bytes());
        let _ = raw::response_head(s.as_bytes());
    }
}

// ----------------------------------------------------------------- routing

#[derive(Debug, Clone)]
enum Op {
    /// A client request; client ids and tokens collide on purpose.
    Begin { client_id: u8, token: Option<u8> },
    /// A response from the process with this id (real or not).
    Respond(u64),
    /// Progress for the n-th lease's rewritten token.
    Progress(usize),
    /// The n-th lease ends.
    End(usize),
    /// The process dies.
    FailAll,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..3, prop::option::of(0u8..3)).prop_map(|(client_id, token)| Op::Begin { client_id, token }),
        4 => (0u64..40).prop_map(Op::Respond),
        2 => (0usize..16).prop_map(Op::Progress),
        2 => (0usize..16).prop_map(Op::End),
        1 => Just(Op::FailAll),
    ]
}

struct Model {
    sink: tokio::sync::mpsc::Sender<LeaseEvent>,
    lid: u64,
    proc_id: u64,
    client_id: Value,
    token: Option<(Value, Value)>,
    answered: bool,
    ended: bool,
}

/// A reply as a tree, whichever way it was routed.
fn value(r: Reply) -> Value {
    match r {
        Reply::Parsed(v) => v,
        Reply::Raw { line, .. } => serde_json::from_slice(&line).expect("a raw reply is JSON"),
    }
}

/// Which lease `sink` belongs to.
fn owner(leases: &[Model], sink: &tokio::sync::mpsc::Sender<LeaseEvent>) -> usize {
    leases
        .iter()
        .position(|l| l.sink.same_channel(sink))
        .expect("a known lease")
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn routing_never_crosses_or_duplicates(ops in prop::collection::vec(op(), 1..80)) {
        let mut r = Router::new(9);
        let mut leases: Vec<Model> = Vec::new();
        for op in ops {
            match op {
                Op::Begin { client_id, token } => {
                    let (tx, _rx) = tokio::sync::mpsc::channel(1);
                    let mut msg = json!({"jsonrpc":"2.0","id":client_id,"method":"tools/call","params":{}});
                    if let Some(t) = token {
                        msg["params"]["_meta"] = json!({"progressToken": t});
                    }
                    // Requests without a token take the text path every
                    // other time, as the broker's plain requests do.
                    let lid = if token.is_none() && client_id % 2 == 0 {
                        let text = serde_json::to_vec(&msg).unwrap().into();
                        let (req, _) = RawRequest::parse(text).expect("a plain request");
                        let (lid, line) = r.begin_raw(&req, tx.clone());
                        msg = serde_json::from_slice(&line).expect("the line is JSON");
                        lid
                    } else {
                        r.begin(&mut msg, tx.clone())
                    };
                    let proc_id = msg["id"].as_u64().expect("numeric process id");
                    prop_assert!(leases.iter().all(|l| l.proc_id != proc_id), "process ids never repeat");
                    let rewritten = msg.pointer("/params/_meta/progressToken").cloned();
                    leases.push(Model {
                        sink: tx,
                        lid,
                        proc_id,
                        client_id: json!(client_id),
                        token: token.map(|t| (json!(t), rewritten.expect("token kept"))),
                        answered: false,
                        ended: false,
                    });
                }
                Op::Respond(id) => {
                    let target = leases.iter().position(|l| l.proc_id == id);
                    let resp = json!({"jsonrpc":"2.0","id":id,"result":{"for":id}});
                    // Odd ids come back as text, as plain responses do.
                    let action = if id % 2 == 1 {
                        let line = serde_json::to_vec(&resp).unwrap();
                        let head = raw::response_head(&line).expect("a response");
                        r.route_response(&head, &line)
                    } else {
                        r.route(resp)
                    };
                    match (action, target) {
                        (Action::ToLease(sink, LeaseEvent::Final(m)), Some(k)) => {
                            let m = value(m);
                            prop_assert_eq!(owner(&leases, &sink), k, "response to the wrong lease");
                            let l = &mut leases[k];
                            prop_assert!(!l.answered && !l.ended, "answered twice or after the end");
                            prop_assert_eq!(&m["id"], &l.client_id);
                            prop_assert_eq!(&m["result"]["for"], &json!(id));
                            l.answered = true;
                        }
                        (Action::Drop(_), t) => {
                            prop_assert!(!t.is_some_and(|k| !leases[k].answered && !leases[k].ended),
                                "a live lease's response was dropped");
                        }
                        (other, t) => prop_assert!(false, "unexpected {:?} for {:?}", other, t),
                    }
                }
                Op::Progress(n) => {
                    let Some(k) = (!leases.is_empty()).then(|| n % leases.len()) else { continue };
                    let Some((orig, rewritten)) = leases[k].token.clone() else { continue };
                    let note = json!({"jsonrpc":"2.0","method":"notifications/progress",
                        "params":{"progressToken": rewritten, "progress": 1}});
                    match r.route(note) {
                        Action::ToLease(sink, LeaseEvent::Message(m)) => {
                            prop_assert_eq!(owner(&leases, &sink), k, "progress to the wrong lease");
                            prop_assert!(!leases[k].ended);
                            prop_assert_eq!(&m["params"]["progressToken"], &orig);
                        }
                        Action::Drop(_) => prop_assert!(leases[k].ended, "live progress dropped"),
                        other => prop_assert!(false, "unexpected {:?}", other),
                    }
                }
                Op::End(n) => {
                    let Some(k) = (!leases.is_empty()).then(|| n % leases.len()) else { continue };
                    let l = &mut leases[k];
                    let was_open = r.end(l.lid);
                    prop_assert_eq!(was_open, !l.answered && !l.ended);
                    l.ended = true;
                }
                Op::FailAll => {
                    for a in r.fail_all("gone") {
                        match a {
                            Action::ToLease(sink, LeaseEvent::Final(m)) => {
                                let m = value(m);
                                let k = owner(&leases, &sink);
                                let l = &mut leases[k];
                                prop_assert!(!l.answered && !l.ended, "failed twice or after the end");
                                prop_assert_eq!(&m["id"], &l.client_id);
                                l.answered = true;
                            }
                            other => prop_assert!(false, "unexpected {:?}", other),
                        }
                    }
                    prop_assert!(leases.iter().all(|l| l.answered || l.ended), "fail_all missed a lease");
                }
            }
        }
    }
}

// --------------------------------------------------------------- lease API

/// Sends raw bytes to the lease API; returns whatever came back until the
/// broker closed the connection or went quiet. (The write side stays open:
/// a peer that half-closes may lose its answer, which is HTTP/1.1's rule.)
///
/// Going quiet is a legitimate end here, not a stand-in for some state: an
/// arbitrary input may be an incomplete request (the broker rightly waits
/// for the rest) or open an endless stream (`/events`), and no answer is
/// owed for either. The properties are about what did arrive.
async fn raw_exchange(socket: &std::path::Path, bytes: &[u8]) -> Vec<u8> {
    const QUIET: Duration = Duration::from_millis(150);
    let mut s = tokio::net::UnixStream::connect(socket)
        .await
        .expect("broker accepts");
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let started = std::time::Instant::now();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the broker kept streaming"
        );
        match tokio::time::timeout(QUIET, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// True when `reply` is empty or starts with a well-formed HTTP/1.x head.
fn well_formed(reply: &[u8]) -> bool {
    if reply.is_empty() {
        return true;
    }
    let Some(end) = reply.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&reply[..end]);
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or("");
    let code_ok = status
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| status.strip_prefix("HTTP/1.0 "))
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse::<u16>().ok())
        .is_some_and(|c| (100..600).contains(&c));
    code_ok && lines.all(|l| l.contains(':'))
}

fn lease_api_input() -> impl Strategy<Value = (Vec<u8>, bool)> {
    let method = prop_oneof![
        Just("GET".to_string()),
        Just("POST".to_string()),
        Just("DELETE".to_string()),
        "[A-Z]{1,8}",
    ];
    let path = prop_oneof![
        Just("/v1/pools".to_string()),
        Just("/v1/pools/fx".to_string()),
        Just("/v1/pools/fx/messages".to_string()),
        Just("/v1/pools/nope/messages".to_string()),
        Just("/v1/leases/abc".to_string()),
        Just("/v1/pools/fx/sessions/s1".to_string()),
        Just("/livez".to_string()),
        "/[a-z0-9/%.]{0,40}",
    ];
    let header = ("[a-zA-Z-]{1,20}", "[ -~]{0,60}").prop_map(|(k, v)| format!("{k}: {v}\r\n"));
    let body = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300),
        json_value().prop_map(|v| v.to_string().into_bytes()),
        Just(br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#.to_vec()),
    ];
    let structured =
        (method, path, prop::collection::vec(header, 0..6), body).prop_map(|(m, p, hs, body)| {
            let mut out =
                format!("{m} {p} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n").into_bytes();
            for h in hs.iter().filter(|h| {
                !h.to_ascii_lowercase().starts_with("content-length")
                    && !h.to_ascii_lowercase().starts_with("transfer-encoding")
            }) {
                out.extend_from_slice(h.as_bytes());
            }
            out.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
            out.extend_from_slice(&body);
            (out, true)
        });
    let garbage = prop::collection::vec(any::<u8>(), 0..400).prop_map(|b| (b, false));
    prop_oneof![3 => structured, 1 => garbage]
}

#[test]
fn lease_api_survives_arbitrary_requests() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let b = rt.block_on(async {
        let b = harness::TestBroker::start(vec![harness::fixture_pool("fx", &[])]).await;
        b.wait_idle("fx", 1).await;
        b
    });
    let check = |bytes: &[u8], complete: bool| {
        rt.block_on(async {
            let reply = raw_exchange(&b.socket, bytes).await;
            assert!(
                well_formed(&reply),
                "malformed answer {:?} to {:?}",
                String::from_utf8_lossy(&reply),
                String::from_utf8_lossy(bytes)
            );
            if complete {
                assert!(
                    !reply.is_empty(),
                    "no answer to a complete request {:?}",
                    String::from_utf8_lossy(bytes)
                );
            }
            // Still alive and serving.
            let live = raw_exchange(
                &b.socket,
                b"GET /livez HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
            )
            .await;
            assert!(
                live.starts_with(b"HTTP/1.1 200"),
                "{:?}",
                String::from_utf8_lossy(&live)
            );
        })
    };
    for seed in corpus("lease_api") {
        check(&seed, false);
    }
    let mut runner = TestRunner::new(config(128));
    runner
        .run(&lease_api_input(), |(bytes, complete)| {
            check(&bytes, complete);
            Ok(())
        })
        .unwrap();
    rt.block_on(b.stop());
}
