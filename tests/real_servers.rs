//! Real third-party MCP servers behind the broker: server-everything (npm)
//! and mcp-server-time (PyPI), installed by `scripts/install-test-deps.sh`.

#[path = "support/harness.rs"]
mod harness;

use harness::*;
use mcp_broker::config::PoolConfig;
use serde_json::json;
use std::path::PathBuf;
use std::time::Duration;

fn interop(path: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/interop")
        .join(path);
    assert!(
        p.exists(),
        "{} is missing: run scripts/install-test-deps.sh",
        p.display()
    );
    p
}

/// server-everything behind `sh -c`, so `node` is a grandchild of the
/// broker's process, as it is under `npx`: stopping must reach it too.
fn everything(name: &str) -> PoolConfig {
    let js = interop("node/node_modules/@modelcontextprotocol/server-everything/dist/index.js");
    let mut p = PoolConfig::new(
        name,
        "sh",
        vec!["-c".into(), format!("node {} stdio", js.display())],
    );
    p.init_timeout = Duration::from_secs(60);
    p.stop_grace = Duration::from_secs(2);
    p
}

#[tokio::test]
async fn server_everything_is_warmed_and_leased() {
    let mut p = everything("everything");
    p.min_idle = 2;
    p.max = 2;
    let b = TestBroker::start(vec![p]).await;
    b.wait_idle("everything", 2).await;
    let pids = procs_with_tag(&b.tag);
    assert!(
        pids.len() >= 4,
        "sh and node for each of 2 processes: {pids:?}"
    );
    let c = b.client("everything");
    let info = c.pool_info().await.unwrap();
    assert!(
        info.result["serverInfo"]["name"]
            .as_str()
            .unwrap()
            .contains("everything"),
        "{}",
        info.result
    );
    assert!(info.result["capabilities"]["tools"].is_object());

    let (status, msgs) = lease(&c, &tool(1, "echo", json!({"message": "hello"})), None).await;
    assert_eq!(status, 200);
    assert_eq!(text_of(&msgs[0]), "Echo: hello");

    let mut long = tool(
        2,
        "trigger-long-running-operation",
        json!({"duration": 1, "steps": 3}),
    );
    long["params"]["_meta"] = json!({"progressToken": "lr"});
    let (_, msgs) = lease(&c, &long, None).await;
    let progress: Vec<_> = msgs
        .iter()
        .filter(|m| m["method"] == "notifications/progress")
        .collect();
    assert_eq!(progress.len(), 3, "{msgs:?}");
    assert!(progress
        .iter()
        .all(|p| p["params"]["progressToken"] == "lr"));
    assert_eq!(msgs.last().unwrap()["id"], 2);

    // A server→client request (sampling) rides the lease and is answered.
    let mut l = c
        .lease(
            &tool(
                3,
                "trigger-sampling-request",
                json!({"prompt": "hi", "maxTokens": 5}),
            ),
            None,
            &mcp_broker::proxy::backend::new_lease_id(),
        )
        .await
        .unwrap();
    let token = l.token.clone().unwrap();
    let fin = loop {
        let m = tokio::time::timeout(Duration::from_secs(20), l.lines.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if m["method"] == "sampling/createMessage" {
            let answer = json!({"jsonrpc":"2.0","id":m["id"],"result":{"role":"assistant",
                "content":{"type":"text","text":"sampled!"},"model":"test","stopReason":"endTurn"}});
            c.deliver(&token, &answer).await.unwrap();
        } else if m.get("id") == Some(&json!(3)) {
            break m;
        }
    };
    assert!(fin.to_string().contains("sampled!"), "{fin}");

    let list = json!({"jsonrpc":"2.0","id":4,"method":"tools/list"});
    let (_, msgs) = lease(&c, &list, None).await;
    assert!(msgs[0]["result"]["tools"].as_array().unwrap().len() > 5);
    b.stop().await;
}

#[tokio::test]
async fn mcp_server_time_is_warmed_and_leased() {
    let bin = interop("venv-time/bin/mcp-server-time");
    let mut p = PoolConfig::new("time", bin.to_str().unwrap(), vec![]);
    p.init_timeout = Duration::from_secs(60);
    let b = TestBroker::start(vec![p]).await;
    b.wait_idle("time", 1).await;
    let c = b.client("time");
    let info = c.pool_info().await.unwrap();
    let name = info.result.pointer("/serverInfo/name").or_else(|| {
        info.result
            .pointer("/_meta/io.modelcontextprotocol~1serverInfo/name")
    });
    assert_eq!(
        name,
        Some(&json!("mcp-time")),
        "{:?} {}",
        info.era,
        info.result
    );
    let (_, msgs) = lease(
        &c,
        &tool(1, "get_current_time", json!({"timezone": "UTC"})),
        None,
    )
    .await;
    let text = text_of(&msgs[0]);
    assert!(text.contains("UTC"), "{text}");
    b.stop().await;
}
