use super::*;

fn head(bytes: &[u8]) -> Head {
    match parse_head(bytes) {
        Ok(Some((h, used))) => {
            assert_eq!(used, bytes.len(), "the whole head is consumed");
            h
        }
        Ok(None) => panic!("partial"),
        Err(Parse::Handover) => panic!("handed over"),
        Err(Parse::Refuse(e)) => panic!("refused: {e}"),
    }
}

fn refused(bytes: &[u8]) -> StatusCode {
    match parse_head(bytes) {
        Err(Parse::Refuse(e)) => e.status(),
        _ => panic!("not refused"),
    }
}

#[test]
fn heads_parse_with_length_and_keep_alive() {
    let h = head(b"POST /v1/pools/a/messages HTTP/1.1\r\nContent-Length: 12\r\nX-A: 1\r\n\r\n");
    assert_eq!(h.method, Method::POST);
    assert_eq!(h.uri.path(), "/v1/pools/a/messages");
    assert_eq!(h.length, 12);
    assert!(h.keep_alive);
    assert_eq!(h.headers["x-a"], "1");
    let h = head(b"GET /livez HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n");
    assert_eq!(h.length, 0);
    assert!(!h.keep_alive);
    assert!(matches!(
        parse_head(b"GET /livez HTTP/1.1\r\nHost"),
        Ok(None)
    ));
}

#[test]
fn other_shapes_are_handed_over() {
    for raw in [
        &b"GET / HTTP/1.0\r\n\r\n"[..],
        b"HEAD / HTTP/1.1\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
        b"GET / HTTP/1.1\r\nUpgrade: h2c\r\n\r\n",
    ] {
        assert!(matches!(parse_head(raw), Err(Parse::Handover)), "{raw:?}");
    }
}

#[test]
fn bad_heads_are_refused() {
    assert_eq!(
        refused(b"\x01\x02 / HTTP/1.1\r\n\r\n"),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        refused(b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        refused(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
        StatusCode::BAD_REQUEST
    );
    let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: y\r\n")).collect();
    assert_eq!(
        refused(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
}

/// Every open lease API connection is a task holding this future (and a
/// queued lease waits inside it): its size is paid per connection, 10,000
/// times at 10,000 queued calls (docs/performance.md, "Memory").
#[tokio::test]
async fn connection_task_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let config = crate::config::Config {
        broker: crate::config::BrokerSettings {
            socket: dir.path().join("b.sock"),
            metrics_listen: None,
            ..Default::default()
        },
        pools: vec![{
            let mut p = crate::config::PoolConfig::new("p", "/bin/false", vec![]);
            p.min_idle = 0;
            p
        }],
    };
    let broker = Broker::start(config, Arc::new(crate::metrics::Metrics::new()));
    let pool = broker.pool("p").expect("configured");
    let run = super::super::lease::run(
        broker.clone(),
        pool.clone(),
        None,
        crate::process::router::Outgoing::Parsed(serde_json::Value::Null),
        "tools/call".into(),
        None,
        "uid:0".into(),
    );
    let waiting = std::mem::size_of_val(&run);
    eprintln!("lease::run future: {waiting} bytes");
    assert!(waiting < 2 * 1024, "{waiting}");
    let acquire = pool.acquire(None, None, "uid:0");
    eprintln!(
        "Pool::acquire future: {} bytes",
        std::mem::size_of_val(&acquire)
    );
    drop((run, acquire));
    let (a, _b) = UnixStream::pair().unwrap();
    let limiter = crate::web::conn_limit::ConnLimiter::new(10, 10);
    let (c, _d) = UnixStream::pair().unwrap();
    let inner = serve(
        broker.clone(),
        c,
        Identity::default(),
        CancellationToken::new(),
    );
    let serving = std::mem::size_of_val(&inner);
    eprintln!("serve future: {serving} bytes");
    assert!(serving < 4 * 1024, "{serving}");
    drop(inner);
    let conn = serve_connection(broker.clone(), a, limiter, None, CancellationToken::new());
    let size = std::mem::size_of_val(&conn);
    eprintln!("serve_connection future: {size} bytes");
    // Debug builds lay futures out larger than release ones; these bounds
    // catch state that grows by kilobytes, not the exact size. The
    // connection's own loop is boxed: the accepting future stays small.
    assert!(size < 512, "{size}");
}
