//! `mcp-fixture`: a fault-injecting stdio MCP server for integration tests.
//!
//! It speaks newline-delimited JSON-RPC 2.0 on stdin/stdout (one message per
//! line) and logs to stderr. Tests point the broker at it to exercise process
//! pooling: its tools misbehave on demand (`crash`, `hang`, `garbage`, `huge`,
//! `spawn_child`, ...), call back into the client (`sample`, `elicit`,
//! `roots`), and report which process served them (`whoami`). Flags inject
//! start-up faults (`--fail-start`, `--init-delay-ms`, `--garbage-at-start`,
//! `--ignore-sigterm`, `--exit-after`) and pick the handshake era
//! (`--era legacy|stateless|both`).
//!
//! Every request runs on its own thread, so slow tools never block others;
//! stdout is shared under one mutex and each message is written as one line
//! followed by a flush. Responses from the client to the fixture's own
//! requests are routed by id to the waiting thread. The fixture is standalone
//! on purpose: it must not depend on the broker's code it is testing.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const METHOD_NOT_FOUND: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;
const INTERNAL_ERROR: i64 = -32603;

/// Protocol versions the legacy `initialize` handshake echoes back.
const LEGACY_VERSIONS: [&str; 4] = ["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"];
const LATEST_LEGACY: &str = "2025-11-25";
const STATELESS_VERSION: &str = "2026-07-28";
/// Largest `huge` payload accepted, so a typo cannot exhaust memory.
const HUGE_MAX: u64 = 1 << 30;
/// How long EOF on stdin waits for in-flight requests before exiting.
const EOF_GRACE: Duration = Duration::from_millis(500);

/// Which handshake(s) the fixture answers.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Era {
    Legacy,
    Stateless,
    Both,
}

/// Command-line options.
#[derive(Debug)]
struct Opts {
    era: Era,
    fail_start: bool,
    init_delay_ms: u64,
    garbage_at_start: bool,
    ignore_sigterm: bool,
    exit_after: Option<u64>,
}

/// A JSON-RPC error: code and message.
type RpcError = (i64, String);
type RpcResult = Result<Value, RpcError>;

/// State shared by the reader loop and every request thread.
struct State {
    opts: Opts,
    out: Mutex<std::io::Stdout>,
    /// tools/call requests received so far (reported by `whoami`).
    calls: AtomicU64,
    /// tools/call requests answered so far (drives `--exit-after`).
    answered: AtomicU64,
    /// Serialized ids of requests the client cancelled.
    cancelled: Mutex<HashSet<String>>,
    /// Threads waiting for the client's answer to one of our requests.
    pending: Mutex<HashMap<String, mpsc::Sender<Value>>>,
    next_id: AtomicU64,
    /// Requests whose thread has not finished yet.
    in_flight: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn log(msg: &str) {
    eprintln!("mcp-fixture[{}]: {msg}", std::process::id());
}

fn bad(msg: impl Into<String>) -> RpcError {
    (INVALID_PARAMS, msg.into())
}

impl State {
    /// Writes one message as a single line and flushes.
    fn send(&self, msg: &Value) {
        let line = msg.to_string();
        let mut out = lock(&self.out);
        if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
            log(&format!("stdout write failed: {e}"));
        }
    }

    /// Writes raw bytes as one line (for deliberately broken output).
    fn send_raw(&self, bytes: &[u8]) {
        let mut out = lock(&self.out);
        let r = out.write_all(bytes);
        if let Err(e) = r
            .and_then(|()| out.write_all(b"\n"))
            .and_then(|()| out.flush())
        {
            log(&format!("stdout write failed: {e}"));
        }
    }

    fn notify(&self, method: &str, params: Value) {
        self.send(&json!({"jsonrpc": "2.0", "method": method, "params": params}));
    }

    fn respond(&self, id: &Value, result: RpcResult) {
        let msg = match result {
            Ok(r) => json!({"jsonrpc": "2.0", "id": id, "result": r}),
            Err((code, message)) => {
                json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
            }
        };
        self.send(&msg);
    }

    fn is_cancelled(&self, key: &str) -> bool {
        lock(&self.cancelled).contains(key)
    }

    /// Sends a request to the client and blocks until its response arrives.
    /// Returns the `result`, or the error's message.
    fn client_request(&self, method: &str, params: Value) -> Result<Value, String> {
        let id = format!("s-{}", self.next_id.fetch_add(1, Ordering::Relaxed) + 1);
        let (tx, rx) = mpsc::channel();
        lock(&self.pending).insert(Value::from(id.as_str()).to_string(), tx);
        self.send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}));
        let resp = rx
            .recv()
            .map_err(|_| "response channel closed".to_string())?;
        if let Some(err) = resp.get("error") {
            let msg = err.get("message").and_then(Value::as_str);
            return Err(msg.map_or_else(|| err.to_string(), str::to_string));
        }
        Ok(resp.get("result").cloned().unwrap_or(Value::Null))
    }
}

fn parse_args() -> Result<Opts, String> {
    let mut opts = Opts {
        era: Era::Legacy,
        fail_start: false,
        init_delay_ms: 0,
        garbage_at_start: false,
        ignore_sigterm: false,
        exit_after: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        let number = |name: &str, v: String| {
            v.parse::<u64>()
                .map_err(|_| format!("{name}: not a number: {v}"))
        };
        match flag.as_str() {
            "--era" => {
                opts.era = match value("--era")?.as_str() {
                    "legacy" => Era::Legacy,
                    "stateless" => Era::Stateless,
                    "both" => Era::Both,
                    other => return Err(format!("--era: unknown era {other:?}")),
                }
            }
            "--fail-start" => opts.fail_start = true,
            "--garbage-at-start" => opts.garbage_at_start = true,
            "--ignore-sigterm" => opts.ignore_sigterm = true,
            "--init-delay-ms" => opts.init_delay_ms = number(&flag, value(&flag)?)?,
            "--exit-after" => opts.exit_after = Some(number(&flag, value(&flag)?)?),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(opts)
}

fn main() {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            log(&format!("usage error: {e}"));
            std::process::exit(2);
        }
    };
    if opts.fail_start {
        log("--fail-start: refusing to start");
        std::process::exit(1);
    }
    if opts.ignore_sigterm {
        // SAFETY: installing SIG_IGN has no handler code and no preconditions.
        unsafe {
            libc::signal(libc::SIGTERM, libc::SIG_IGN);
        }
    }
    let state = Arc::new(State {
        opts,
        out: Mutex::new(std::io::stdout()),
        calls: AtomicU64::new(0),
        answered: AtomicU64::new(0),
        cancelled: Mutex::new(HashSet::new()),
        pending: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(0),
        in_flight: AtomicU64::new(0),
    });
    if state.opts.garbage_at_start {
        state.send_raw(b"mcp-fixture starting up (this is not json)");
        state.send_raw(b"<<< garbage at start >>>");
    }
    log(&format!("started, options {:?}", state.opts));
    if state.opts.init_delay_ms > 0 {
        thread::sleep(Duration::from_millis(state.opts.init_delay_ms));
    }

    let mut stdin = std::io::stdin().lock();
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match stdin.read_until(b'\n', &mut buf) {
            Ok(0) => {
                // Give quick in-flight requests a moment to answer, so
                // `printf ... | mcp-fixture` works; hung ones are abandoned.
                let deadline = Instant::now() + EOF_GRACE;
                while state.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(5));
                }
                log("stdin closed, exiting");
                std::process::exit(0);
            }
            Ok(_) => {}
            Err(e) => {
                log(&format!("stdin read failed: {e}"));
                std::process::exit(1);
            }
        }
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<Value>(&buf) {
            Ok(msg) => dispatch(&state, msg),
            Err(e) => state.respond(
                &Value::Null,
                Err((PARSE_ERROR, format!("Parse error: {e}"))),
            ),
        }
    }
}

/// Routes one decoded message from the client.
fn dispatch(state: &Arc<State>, msg: Value) {
    let Value::Object(obj) = msg else {
        state.respond(
            &Value::Null,
            Err((INVALID_REQUEST, "not a JSON object".into())),
        );
        return;
    };
    let id = obj.get("id").cloned();
    match (obj.get("method"), id) {
        (Some(Value::String(method)), None) => {
            if method == "notifications/cancelled" {
                if let Some(rid) = obj.get("params").and_then(|p| p.get("requestId")) {
                    lock(&state.cancelled).insert(rid.to_string());
                }
            }
        }
        (Some(Value::String(method)), Some(id)) => {
            let method = method.clone();
            let params = obj.get("params").cloned().unwrap_or(Value::Null);
            let st = Arc::clone(state);
            state.in_flight.fetch_add(1, Ordering::SeqCst);
            let spawned = thread::Builder::new()
                .name(format!("req-{id}"))
                .spawn(move || {
                    serve(&st, id, &method, &params);
                    st.in_flight.fetch_sub(1, Ordering::SeqCst);
                });
            if let Err(e) = spawned {
                log(&format!("cannot spawn request thread: {e}"));
                state.in_flight.fetch_sub(1, Ordering::SeqCst);
            }
        }
        (Some(_), id) => {
            let id = id.unwrap_or(Value::Null);
            state.respond(
                &id,
                Err((INVALID_REQUEST, "method must be a string".into())),
            );
        }
        (None, Some(id)) if obj.contains_key("result") || obj.contains_key("error") => {
            let waiter = lock(&state.pending).remove(&id.to_string());
            match waiter {
                Some(tx) => {
                    let _ = tx.send(Value::Object(obj));
                }
                None => log(&format!("response with unknown id {id}, ignored")),
            }
        }
        (None, id) => {
            let id = id.unwrap_or(Value::Null);
            state.respond(
                &id,
                Err((INVALID_REQUEST, "neither method nor result".into())),
            );
        }
    }
}

/// Answers one request (on its own thread).
fn serve(state: &State, id: Value, method: &str, params: &Value) {
    if method == "tools/call" {
        let n = state.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let Some(result) = call_tool(state, &id, params, n) else {
            return;
        };
        state.respond(&id, result);
        let answered = state.answered.fetch_add(1, Ordering::SeqCst) + 1;
        if state.opts.exit_after.is_some_and(|limit| answered >= limit) {
            log(&format!(
                "--exit-after: answered {answered} tool calls, exiting"
            ));
            std::process::exit(0);
        }
        return;
    }
    let result = handle_method(state, method, params);
    state.respond(&id, result);
}

fn handle_method(state: &State, method: &str, params: &Value) -> RpcResult {
    let era = state.opts.era;
    let info = json!({"name": "mcp-fixture", "version": "0.1.0"});
    let caps = json!({"tools": {"listChanged": true}, "logging": {}});
    let pid = std::process::id().to_string();
    match method {
        "initialize" if era != Era::Stateless => {
            let asked = params.get("protocolVersion").and_then(Value::as_str);
            let version = asked
                .filter(|v| LEGACY_VERSIONS.contains(v))
                .unwrap_or(LATEST_LEGACY);
            Ok(json!({"protocolVersion": version, "capabilities": caps,
                      "serverInfo": info, "instructions": "fixture"}))
        }
        "server/discover" if era != Era::Legacy => Ok(json!({
            "supportedVersions": [STATELESS_VERSION], "capabilities": caps,
            "serverInfo": info, "instructions": "fixture"})),
        "ping" | "logging/setLevel" => Ok(json!({})),
        "tools/list" => Ok(json!({"tools": tool_list()})),
        "resources/list" => Ok(json!({"resources": [{"uri": "fixture://pid", "name": "pid"}]})),
        "resources/read" => {
            let uri = params.get("uri").and_then(Value::as_str);
            let uri = uri.ok_or_else(|| bad("resources/read: missing string `uri`"))?;
            Ok(json!({"contents": [{"uri": uri, "mimeType": "text/plain", "text": pid}]}))
        }
        "prompts/list" => Ok(json!({"prompts": [{"name": "greet",
            "description": "Greets someone", "arguments": [{"name": "who", "required": true}]}]})),
        "prompts/get" => {
            let name = params.get("name").and_then(Value::as_str);
            if name != Some("greet") {
                return Err(bad(format!("unknown prompt {name:?}")));
            }
            let who = params.pointer("/arguments/who").and_then(Value::as_str);
            let who = who.ok_or_else(|| bad("prompts/get greet: missing string argument `who`"))?;
            Ok(json!({"messages": [{"role": "user",
                "content": {"type": "text", "text": format!("hello {who}")}}]}))
        }
        _ => Err((METHOD_NOT_FOUND, format!("Method not found: {method}"))),
    }
}

fn tool(name: &str, description: &str, props: Value, required: &[&str]) -> Value {
    json!({"name": name, "description": description,
           "inputSchema": {"type": "object", "properties": props, "required": required}})
}

fn tool_list() -> Vec<Value> {
    let s = json!({"type": "string"});
    let i = json!({"type": "integer", "minimum": 0});
    let none = json!({});
    vec![
        tool("echo", "Returns `text`", json!({"text": s}), &["text"]),
        tool(
            "whoami",
            "Returns pid and tool-call count",
            none.clone(),
            &[],
        ),
        tool(
            "sleep",
            "Sleeps `ms`, sending `steps` progress notifications",
            json!({"ms": i, "steps": i}),
            &["ms"],
        ),
        tool(
            "log",
            "Sends a log notification",
            json!({"text": s}),
            &["text"],
        ),
        tool(
            "crash",
            "Exits with `code` (default 3)",
            json!({"code": {"type": "integer"}}),
            &[],
        ),
        tool("hang", "Never answers", none.clone(), &[]),
        tool(
            "garbage",
            "Writes non-JSON lines, then answers",
            json!({"lines": i}),
            &[],
        ),
        tool(
            "huge",
            "Answers with `bytes` x characters",
            json!({"bytes": i}),
            &["bytes"],
        ),
        tool(
            "sample",
            "Asks the client to sample",
            json!({"prompt": s}),
            &["prompt"],
        ),
        tool(
            "elicit",
            "Asks the client to elicit",
            json!({"message": s}),
            &["message"],
        ),
        tool("roots", "Asks the client for its roots", none.clone(), &[]),
        tool(
            "spawn_child",
            "Spawns `sleep 600`, returns its pid",
            none.clone(),
            &[],
        ),
        tool("list_changed", "Sends tools/list_changed", none, &[]),
        tool(
            "env",
            "Returns an environment variable",
            json!({"name": s}),
            &["name"],
        ),
        tool(
            "stderr",
            "Writes `text` to stderr",
            json!({"text": s}),
            &["text"],
        ),
    ]
}

fn arg_str<'a>(args: &'a Map<String, Value>, tool: &str, name: &str) -> Result<&'a str, RpcError> {
    args.get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| bad(format!("{tool}: argument `{name}` must be a string")))
}

fn arg_u64(args: &Map<String, Value>, tool: &str, name: &str) -> Result<Option<u64>, RpcError> {
    match args.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            bad(format!(
                "{tool}: argument `{name}` must be a non-negative integer"
            ))
        }),
    }
}

fn text(t: impl Into<String>) -> RpcResult {
    Ok(json!({"content": [{"type": "text", "text": t.into()}]}))
}

/// Runs one tool. `None` means "send no response" (hang, crash, cancelled).
fn call_tool(state: &State, id: &Value, params: &Value, n: u64) -> Option<RpcResult> {
    let Some(name) = params.get("name").and_then(Value::as_str) else {
        return Some(Err(bad("tools/call: missing string `name`")));
    };
    let empty = Map::new();
    let args = match params.get("arguments") {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(m)) => m,
        Some(_) => return Some(Err(bad("tools/call: `arguments` must be an object"))),
    };
    let result = match name {
        "echo" => arg_str(args, name, "text").and_then(text),
        "whoami" => text(format!("pid={} calls={n}", std::process::id())),
        "sleep" => return sleep_tool(state, id, params, args),
        "log" => arg_str(args, name, "text").and_then(|t| {
            state.notify(
                "notifications/message",
                json!({"level": "info", "logger": "fixture", "data": t}),
            );
            text("ok")
        }),
        "crash" => {
            let code = match args.get("code") {
                None | Some(Value::Null) => Some(3),
                Some(v) => v.as_i64().and_then(|c| i32::try_from(c).ok()),
            };
            let Some(code) = code else {
                return Some(Err(bad("crash: `code` must be a 32-bit integer")));
            };
            log(&format!("crash: exiting with code {code}"));
            std::process::exit(code);
        }
        "hang" => loop {
            thread::park();
        },
        "garbage" => arg_u64(args, name, "lines").and_then(|lines| {
            let junk: [&[u8]; 3] = [
                b"this is not json",
                b"\x00\x01\x02\xff\xfe\x1b[31m binary junk \x7f\xc3\x28",
                b"{\"truncated\": ",
            ];
            for k in 0..lines.unwrap_or(3) {
                state.send_raw(junk[(k % 3) as usize]);
            }
            text("ok")
        }),
        "huge" => match arg_u64(args, name, "bytes") {
            Ok(Some(b)) if b <= HUGE_MAX => text("x".repeat(b as usize)),
            Ok(Some(_)) => Err(bad(format!("huge: `bytes` must be at most {HUGE_MAX}"))),
            Ok(None) => Err(bad("huge: missing argument `bytes`")),
            Err(e) => Err(e),
        },
        "sample" => arg_str(args, name, "prompt").and_then(|prompt| {
            let req = json!({"messages": [{"role": "user",
                "content": {"type": "text", "text": prompt}}], "maxTokens": 10});
            match state.client_request("sampling/createMessage", req) {
                Ok(r) => match r.pointer("/content/text").and_then(Value::as_str) {
                    Some(t) => text(t),
                    None => text(r.to_string()),
                },
                Err(e) => text(format!("error: {e}")),
            }
        }),
        "elicit" => arg_str(args, name, "message").and_then(|message| {
            let req = json!({"message": message, "requestedSchema": {"type": "object",
                "properties": {"name": {"type": "string"}}}});
            match state.client_request("elicitation/create", req) {
                Ok(r) => text(r.to_string()),
                Err(e) => text(format!("error: {e}")),
            }
        }),
        "roots" => match state.client_request("roots/list", json!({})) {
            Ok(r) => text(r.to_string()),
            Err(e) => text(format!("error: {e}")),
        },
        "spawn_child" => spawn_child(),
        "list_changed" => {
            state.notify("notifications/tools/list_changed", json!({}));
            text("ok")
        }
        "env" => arg_str(args, name, "name")
            .and_then(|var| text(std::env::var(var).unwrap_or_else(|_| "<unset>".into()))),
        "stderr" => arg_str(args, name, "text").and_then(|t| {
            eprintln!("{t}");
            text("ok")
        }),
        _ => Err(bad(format!("Unknown tool: {name}"))),
    };
    Some(result)
}

/// Starts `sleep 600` in our process group; a thread reaps it when it dies.
fn spawn_child() -> RpcResult {
    let child = Command::new("sleep")
        .arg("600")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    match child {
        Ok(mut child) => {
            let pid = child.id();
            log(&format!("spawn_child: started sleep 600 as pid {pid}"));
            thread::spawn(move || child.wait());
            text(pid.to_string())
        }
        Err(e) => Err((INTERNAL_ERROR, format!("spawn_child: {e}"))),
    }
}

/// `sleep {ms, steps?}`: progress is only sent when the request carries a
/// progress token. A cancelled request stops early and gets no response.
fn sleep_tool(
    state: &State,
    id: &Value,
    params: &Value,
    args: &Map<String, Value>,
) -> Option<RpcResult> {
    let ms = match arg_u64(args, "sleep", "ms") {
        Ok(Some(ms)) => ms,
        Ok(None) => return Some(Err(bad("sleep: missing argument `ms`"))),
        Err(e) => return Some(Err(e)),
    };
    let steps = match arg_u64(args, "sleep", "steps") {
        Ok(s) => s.unwrap_or(0),
        Err(e) => return Some(Err(e)),
    };
    let token = params.pointer("/_meta/progressToken").cloned();
    let key = id.to_string();
    let start = Instant::now();
    // Waits until `offset_ms` after start; false if cancelled meanwhile.
    let wait_until = |offset_ms: u64| loop {
        if state.is_cancelled(&key) {
            return false;
        }
        let target = start + Duration::from_millis(offset_ms);
        let now = Instant::now();
        if now >= target {
            return true;
        }
        thread::sleep((target - now).min(Duration::from_millis(10)));
    };
    let mut finished = true;
    if let Some(token) = &token {
        for i in 1..=steps {
            let at = (u128::from(ms) * u128::from(i) / u128::from(steps)) as u64;
            if !wait_until(at) {
                finished = false;
                break;
            }
            state.notify(
                "notifications/progress",
                json!({"progressToken": token, "progress": i, "total": steps,
                       "message": format!("step {i}")}),
            );
        }
    }
    finished = finished && wait_until(ms);
    lock(&state.cancelled).remove(&key);
    if !finished {
        log(&format!("sleep {key}: cancelled, not responding"));
        return None;
    }
    Some(text(format!("slept {ms}")))
}
