//! Sandboxed children (`[pool.sandbox]`) against the fixture server: a clean
//! environment, rlimits that fail the tool with a clear error instead of
//! harming the node, a different uid, no-new-privileges and no network.
//!
//! Features that need root are asserted to work when the tests run as root
//! (CI does) and asserted to fail with a clear error otherwise: nothing here
//! skips silently.

#[path = "support/harness.rs"]
mod harness;

use harness::*;
use mcp_broker::config::sandbox::{Network, Principal, SandboxConfig};
use mcp_broker::config::{Config, PoolConfig};
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Calls a tool through a fresh lease; returns the final message.
async fn call(b: &TestBroker, name: &str, args: Value) -> Value {
    let (status, msgs) = lease(&b.client("fx"), &tool(1, name, args), None).await;
    assert_eq!(status, 200, "{msgs:?}");
    msgs.last().cloned().expect("a response")
}

fn error_text(msg: &Value) -> String {
    msg.pointer("/error/message")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("expected an error: {}", short(msg)))
        .to_string()
}

/// The single live process of the test's pool.
fn only_pid(b: &TestBroker) -> u32 {
    let pids = procs_with_tag(&b.tag);
    assert_eq!(pids.len(), 1, "{pids:?}");
    pids[0]
}

fn status_field(pid: u32, field: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

fn pool(sandbox: SandboxConfig) -> PoolConfig {
    let mut p = fixture_pool("fx", &[]);
    p.max = 1;
    p.sandbox = sandbox;
    p
}

/// Waits for the pool's first start failure and returns it.
async fn start_failure(b: &TestBroker) -> String {
    let p = b.broker.pool("fx").unwrap().clone();
    wait_until(Duration::from_secs(20), || p.status().last_error.is_some()).await;
    p.status().last_error.unwrap()
}

#[tokio::test]
async fn clean_environment_hides_broker_secrets() {
    std::env::set_var("MCP_BROKER_SANDBOX_SECRET", "hunter2");
    // Control: without the sandbox the child inherits the secret.
    let b = TestBroker::start(vec![pool(SandboxConfig::default())]).await;
    b.wait_idle("fx", 1).await;
    let leaked = call(&b, "env", json!({"name": "MCP_BROKER_SANDBOX_SECRET"})).await;
    assert_eq!(text_of(&leaked), "hunter2");
    b.stop().await;

    let mut p = pool(SandboxConfig {
        env_clear: true,
        env_allow: vec!["PATH".into()],
        ..SandboxConfig::default()
    });
    p.env.insert("POOL_OWN".into(), "kept".into());
    let b = TestBroker::start(vec![p]).await;
    b.wait_idle("fx", 1).await;
    let secret = call(&b, "env", json!({"name": "MCP_BROKER_SANDBOX_SECRET"})).await;
    assert_eq!(text_of(&secret), "<unset>");
    // HOME is not the broker's: as root the pool has its own user and home
    // (not in env_allow, so unset otherwise).
    let home = text_of(&call(&b, "env", json!({"name": "HOME"})).await);
    if is_root() {
        assert!(home.contains("/state/homes/"), "{home}");
    } else {
        assert_eq!(home, "<unset>", "not in env_allow");
    }
    let path = call(&b, "env", json!({"name": "PATH"})).await;
    assert_eq!(text_of(&path), std::env::var("PATH").unwrap());
    let own = call(&b, "env", json!({"name": "POOL_OWN"})).await;
    assert_eq!(text_of(&own), "kept", "the pool's own env is always added");
    // Exactly the allowlist plus the pool's env (and the harness tag).
    let environ = std::fs::read(format!("/proc/{}/environ", only_pid(&b))).unwrap();
    let mut names: Vec<String> = environ
        .split(|c| *c == 0)
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            String::from_utf8_lossy(kv)
                .split('=')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    names.sort();
    let mut expected = vec!["MCP_BROKER_TEST_TAG", "PATH", "POOL_OWN"];
    if is_root() {
        expected.extend([
            "HOME",
            "TMPDIR",
            "XDG_CACHE_HOME",
            "XDG_CONFIG_HOME",
            "XDG_DATA_HOME",
            "XDG_STATE_HOME",
            "npm_config_cache",
            "UV_CACHE_DIR",
            "PIP_CACHE_DIR",
        ]);
    }
    expected.sort();
    assert_eq!(names, expected);
    b.stop().await;
}

#[tokio::test]
async fn open_files_limit_fails_the_tool_not_the_node() {
    let b = TestBroker::start(vec![pool(SandboxConfig {
        max_open_files: Some(32),
        ..SandboxConfig::default()
    })])
    .await;
    b.wait_idle("fx", 1).await;
    let pid = only_pid(&b);
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains(" 32 ")),
        "{limits}"
    );
    let r = call(&b, "open_files", json!({"n": 100})).await;
    let e = error_text(&r);
    assert!(e.contains("Too many open files"), "{e}");
    // The same process goes on serving within its limit.
    let ok = call(&b, "open_files", json!({"n": 10})).await;
    assert_eq!(text_of(&ok), "opened 10");
    assert_eq!(only_pid(&b), pid, "the process survived");
    b.stop().await;
}

#[tokio::test]
async fn address_space_limit_fails_a_huge_allocation() {
    let raw = Config::from_toml(
        "[[pool]]\nname = \"fx\"\ncommand = \"x\"\n[pool.sandbox]\nmax_address_space = \"512MiB\"\n",
    )
    .unwrap();
    let limit = raw.pools[0].sandbox.max_address_space;
    assert_eq!(limit, Some(512 << 20));
    let b = TestBroker::start(vec![pool(SandboxConfig {
        max_address_space: limit,
        ..SandboxConfig::default()
    })])
    .await;
    b.wait_idle("fx", 1).await;
    let r = call(&b, "alloc", json!({"bytes": 4u64 << 30})).await;
    let e = error_text(&r);
    assert!(
        e.starts_with("alloc 4294967296: memory allocation failed"),
        "{e}"
    );
    let ok = call(&b, "alloc", json!({"bytes": 16 << 20})).await;
    assert_eq!(text_of(&ok), format!("allocated {}", 16 << 20));
    let echo = call(&b, "echo", json!({"text": "still here"})).await;
    assert_eq!(text_of(&echo), "still here");
    b.stop().await;
}

/// A copy of the fixture that any user may execute (the build directory
/// may not be reachable for an unprivileged uid).
fn world_executable_fixture() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().join("mcp-fixture");
    std::fs::copy(env!("CARGO_BIN_EXE_mcp-fixture"), &path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    (dir, path.display().to_string())
}

#[tokio::test]
async fn runs_as_another_user_with_a_process_limit() {
    // A uid no other test or service uses: RLIMIT_NPROC counts per user.
    let uid = 61_000 + std::process::id() % 1000;
    let (_dir, exe) = world_executable_fixture();
    let mut p = pool(SandboxConfig {
        user: Some(Principal::Id(uid)),
        max_processes: Some(4),
        ..SandboxConfig::default()
    });
    p.command = exe;
    p.request_timeout = Duration::from_secs(10);
    let b = TestBroker::start(vec![p]).await;
    if !is_root() {
        let e = start_failure(&b).await;
        assert!(e.contains("sandbox.user needs root"), "{e}");
        b.stop().await;
        return;
    }
    b.wait_idle("fx", 1).await;
    let pid = only_pid(&b);
    let uids = status_field(pid, "Uid");
    assert!(
        uids.split_whitespace().all(|u| u == uid.to_string()),
        "{uids}"
    );
    let gids = status_field(pid, "Gid");
    assert!(
        gids.split_whitespace().all(|g| g == uid.to_string()),
        "{gids}"
    );
    assert_eq!(status_field(pid, "Groups"), uid.to_string());
    // The first call leaves the main thread, the child and its reaper
    // thread (3); the second call's request thread makes 4, so its fork
    // fails. (If the first call's thread has not exited yet, the second
    // call's thread cannot start: the fixture answers that with the same
    // EAGAIN, naming the tool.)
    let first = call(&b, "spawn_child", json!({})).await;
    assert!(text_of(&first).parse::<u32>().is_ok(), "{}", short(&first));
    let second = call(&b, "spawn_child", json!({})).await;
    let e = error_text(&second);
    assert!(
        e.contains("spawn_child") && e.contains("Resource temporarily unavailable"),
        "{e}"
    );
    let echo = call(&b, "echo", json!({"text": "alive"})).await;
    assert_eq!(text_of(&echo), "alive");
    b.stop().await;
}

#[tokio::test]
async fn no_new_privileges_is_set() {
    let b = TestBroker::start(vec![pool(SandboxConfig {
        no_new_privileges: true,
        ..SandboxConfig::default()
    })])
    .await;
    b.wait_idle("fx", 1).await;
    assert_eq!(status_field(only_pid(&b), "NoNewPrivs"), "1");
    assert_eq!(
        status_field(std::process::id(), "NoNewPrivs"),
        "0",
        "not the broker"
    );
    b.stop().await;
}

fn interfaces(pid: u32) -> Vec<String> {
    let dev = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).unwrap();
    dev.lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(|s| s.trim().to_string())
        .collect()
}

#[tokio::test]
async fn network_none_leaves_only_loopback() {
    let b = TestBroker::start(vec![pool(SandboxConfig {
        network: Network::None,
        ..SandboxConfig::default()
    })])
    .await;
    let p = b.broker.pool("fx").unwrap().clone();
    // Either the namespace works (root, or user namespaces allowed) or the
    // pool says clearly why it cannot start.
    wait_until(Duration::from_secs(20), || {
        let s = p.status();
        s.idle >= 1 || s.last_error.is_some()
    })
    .await;
    if let Some(e) = p.status().last_error.filter(|_| p.status().idle == 0) {
        assert!(!is_root(), "root must be able to unshare the network: {e}");
        assert!(e.contains("network = \"none\""), "{e}");
        b.stop().await;
        return;
    }
    let pid = only_pid(&b);
    assert_eq!(interfaces(pid), ["lo"]);
    let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    assert_ne!(ours, theirs, "a separate network namespace");
    let echo = call(&b, "echo", json!({"text": "offline"})).await;
    assert_eq!(text_of(&echo), "offline");
    b.stop().await;
}

#[tokio::test]
async fn a_step_that_fails_in_the_child_is_named_with_its_errno() {
    // Above fs.nr_open even root may not raise RLIMIT_NOFILE: setrlimit
    // fails in the child, which reports step and errno through the pipe.
    let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let b = TestBroker::start(vec![pool(SandboxConfig {
        max_open_files: Some(nr_open + 1),
        ..SandboxConfig::default()
    })])
    .await;
    let e = start_failure(&b).await;
    assert!(
        e.contains("max_open_files (setrlimit RLIMIT_NOFILE) failed in the child")
            && e.contains("Operation not permitted"),
        "{e}"
    );
    assert!(
        procs_with_tag(&b.tag).is_empty(),
        "nothing ran unrestricted"
    );
    b.stop().await;
}

#[test]
fn config_errors_name_pool_and_field() {
    let err = |extra: &str| {
        let text = format!("[[pool]]\nname = \"p\"\ncommand = \"x\"\n[pool.sandbox]\n{extra}\n");
        Config::from_toml(&text).unwrap_err().to_string()
    };
    let e = err("max_address_space = \"lots\"");
    assert!(
        e.contains("pool \"p\"") && e.contains("sandbox.max_address_space"),
        "{e}"
    );
    let e = err("network = \"bridge\"");
    assert!(
        e.contains("network = \"bridge\"") && e.contains("`host` or `none`"),
        "{e}"
    );
    let e = err("max_open_files = 0");
    assert!(e.contains("sandbox.max_open_files"), "{e}");
    let e = err("usr = \"nobody\"");
    assert!(e.contains("unknown field `usr`"), "{e}");
    let e = err("env_allow = [\"PATH\"]");
    assert!(e.contains("env_clear"), "{e}");
    let ok = Config::from_toml(
        "[[pool]]\nname = \"p\"\ncommand = \"x\"\n[pool.sandbox]\nuser = \"nobody\"\ngroup = \"65534\"\n\
         env_clear = true\nmax_open_files = 64\nmax_processes = 32\nmax_address_space = 1073741824\n\
         no_new_privileges = true\nnetwork = \"none\"\n",
    )
    .unwrap();
    let s = &ok.pools[0].sandbox;
    assert_eq!(s.user, Some(Principal::Name("nobody".into())));
    assert_eq!(s.group, Some(Principal::Id(65534)));
    assert_eq!(s.env_allow, ["PATH", "HOME", "LANG"]);
    assert_eq!(s.max_address_space, Some(1 << 30));
    assert_eq!(s.network, Network::None);
}
