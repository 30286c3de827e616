//! Router unit tests: id and progress-token rewriting, late responses,
//! server requests, cancellation, and failure of every open lease on exit.

use super::*;

fn sink() -> (LeaseSink, mpsc::Receiver<LeaseEvent>) {
    mpsc::channel(8)
}

fn req(id: Value, token: Option<Value>) -> Value {
    let mut m = json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":"x"}});
    if let Some(t) = token {
        m["params"]["_meta"] = json!({"progressToken": t});
    }
    m
}

fn deliver_to(action: Action) -> (LeaseSink, LeaseEvent) {
    match action {
        Action::ToLease(s, e) => (s, e),
        other => panic!("expected ToLease, got {other:?}"),
    }
}

#[test]
fn ids_are_rewritten_and_mapped_back() {
    let mut r = Router::new(1);
    let (s1, mut rx1) = sink();
    let (s2, mut rx2) = sink();
    let mut a = req(json!(7), None);
    let mut b = req(json!(7), None);
    let la = r.begin(&mut a, s1);
    let lb = r.begin(&mut b, s2);
    assert_ne!(a["id"], b["id"], "same client id, distinct process ids");
    // Answer b first: it must reach b's sink with b's original id.
    let (sink, ev) =
        deliver_to(r.route(json!({"jsonrpc":"2.0","id":b["id"],"result":{"who":"b"}})));
    sink.try_send(ev).unwrap();
    match rx2.try_recv().unwrap() {
        LeaseEvent::Final(Reply::Parsed(m)) => {
            assert_eq!(m["id"], 7);
            assert_eq!(m["result"]["who"], "b");
        }
        other => panic!("{other:?}"),
    }
    assert!(rx1.try_recv().is_err());
    assert!(!r.end(lb), "b was answered");
    assert!(r.end(la), "a was still pending");
}

#[test]
fn raw_responses_route_as_parsed_ones_do() {
    let mut r = Router::new(1);
    let (s1, mut rx1) = sink();
    let (s2, mut rx2) = sink();
    let mut a = req(json!("caller-a"), None);
    let mut b = req(json!(7), None);
    let la = r.begin(&mut a, s1);
    let _lb = r.begin(&mut b, s2);
    let line = format!(
        r#"{{"jsonrpc":"2.0","id":{},"error":{{"code":1,"message":"m"}}}}"#,
        a["id"]
    );
    let head = jsonrpc::raw::response_head(line.as_bytes()).unwrap();
    let (sink, ev) = deliver_to(r.route_response(&head, line.as_bytes()));
    sink.try_send(ev).unwrap();
    match rx1.try_recv().unwrap() {
        LeaseEvent::Final(Reply::Raw { line, is_error }) => {
            assert!(is_error);
            assert_eq!(line.last(), Some(&b'\n'));
            let m: Value = serde_json::from_slice(&line).unwrap();
            assert_eq!(m["id"], "caller-a", "the caller's id, not the process's");
            assert_eq!(m["error"]["message"], "m");
        }
        other => panic!("{other:?}"),
    }
    assert!(rx2.try_recv().is_err(), "b's lease saw nothing");
    // The same answer again is late: nothing waits for that id any more.
    assert!(matches!(
        r.route_response(&head, line.as_bytes()),
        Action::Drop("late_response")
    ));
    assert!(!r.end(la), "a was answered");
}

#[test]
fn late_responses_after_end_are_dropped() {
    let mut r = Router::new(1);
    let (s, _rx) = sink();
    let mut a = req(json!("x"), None);
    let la = r.begin(&mut a, s);
    assert!(r.end(la));
    let act = r.route(json!({"jsonrpc":"2.0","id":a["id"],"result":{}}));
    assert!(matches!(act, Action::Drop("late_response")));
    // An id the broker never issued, or a non-numeric one, is dropped too.
    assert!(matches!(
        r.route(json!({"jsonrpc":"2.0","id":999,"result":{}})),
        Action::Drop(_)
    ));
    assert!(matches!(
        r.route(json!({"jsonrpc":"2.0","id":"zz","result":{}})),
        Action::Drop(_)
    ));
}

#[test]
fn progress_tokens_are_isolated_per_lease() {
    let mut r = Router::new(1);
    let (s1, mut rx1) = sink();
    let (s2, mut rx2) = sink();
    let mut a = req(json!(1), Some(json!("t")));
    let mut b = req(json!(1), Some(json!("t")));
    r.begin(&mut a, s1);
    r.begin(&mut b, s2);
    let ta = a["params"]["_meta"]["progressToken"].clone();
    let tb = b["params"]["_meta"]["progressToken"].clone();
    assert_ne!(ta, tb);
    let (sink, ev) = deliver_to(r.route(json!({"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":tb,"progress":1}})));
    sink.try_send(ev).unwrap();
    match rx2.try_recv().unwrap() {
        LeaseEvent::Message(m) => assert_eq!(m["params"]["progressToken"], "t"),
        other => panic!("{other:?}"),
    }
    assert!(rx1.try_recv().is_err());
    let unknown = r.route(json!({"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":"nope"}}));
    assert!(matches!(unknown, Action::Drop("progress")));
}

#[test]
fn server_requests_get_broker_ids_and_answers_route_back() {
    let mut r = Router::new(3);
    let (s, mut rx) = sink();
    let mut a = req(json!(1), None);
    let lid = r.begin(&mut a, s);
    let (sink, ev) = deliver_to(
        r.route(json!({"jsonrpc":"2.0","id":0,"method":"sampling/createMessage","params":{}})),
    );
    sink.try_send(ev).unwrap();
    let LeaseEvent::Message(m) = rx.try_recv().unwrap() else {
        panic!()
    };
    let broker_id = m["id"].clone();
    assert!(broker_id.as_str().unwrap().starts_with("mcp-broker-3-"));
    let answer = r
        .deliver(
            lid,
            json!({"jsonrpc":"2.0","id":broker_id,"result":{"ok":true}}),
        )
        .unwrap();
    assert_eq!(answer["id"], 0, "the process sees its own id again");
    // A second answer to the same request, or to an unknown one, is refused.
    assert!(r
        .deliver(lid, json!({"jsonrpc":"2.0","id":broker_id,"result":{}}))
        .is_err());
    assert_eq!(
        r.deliver(lid, json!({"jsonrpc":"2.0","id":1,"method":"tools/call"})),
        Err(DeliverError::NotAllowed)
    );
}

#[test]
fn cancellation_targets_the_process_id() {
    let mut r = Router::new(1);
    let (s, _rx) = sink();
    let mut a = req(json!("client-9"), None);
    let lid = r.begin(&mut a, s);
    let out = r
        .deliver(lid, json!({"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":"client-9"}}))
        .unwrap();
    assert_eq!(out["params"]["requestId"], a["id"]);
}

#[test]
fn ambiguous_messages_are_not_guessed() {
    let mut r = Router::new(1);
    let (s1, _a) = sink();
    let (s2, _b) = sink();
    r.begin(&mut req(json!(1), None), s1);
    r.begin(&mut req(json!(2), None), s2);
    let log = json!({"jsonrpc":"2.0","method":"notifications/message","params":{"level":"info","data":"x"}});
    assert!(matches!(r.route(log), Action::Drop("notification")));
    let ask = json!({"jsonrpc":"2.0","id":5,"method":"sampling/createMessage","params":{}});
    match r.route(ask) {
        Action::Reply(m) => assert_eq!(m["id"], 5),
        other => panic!("{other:?}"),
    }
}

#[test]
fn process_exit_fails_every_open_lease_once() {
    let mut r = Router::new(1);
    let (s1, _a) = sink();
    let (s2, _b) = sink();
    let mut a = req(json!(1), None);
    r.begin(&mut a, s1);
    r.begin(&mut req(json!(2), None), s2);
    let _ = r.route(json!({"jsonrpc":"2.0","id":a["id"],"result":{}}));
    let failed = r.fail_all("gone");
    assert_eq!(failed.len(), 1, "the answered lease is not failed again");
    assert_eq!(r.pending_count(), 0);
}
