//! `mcp-fixture`: a fault-injecting stdio MCP server for integration tests.
//!
//! It speaks newline-delimited JSON-RPC 2.0 on stdin/stdout (one message per
//! line) and logs to stderr. Tests point the broker at it to exercise process
//! pooling: its tools misbehave on demand (`crash`, `hang`, `garbage`, `huge`,
//! `spawn_child`, ...), call back into the client (`sample`, `elicit`,
//! `roots`), and report which process served them (`whoami`). Flags inject
//! faults (`--fail-start`, `--init-delay-ms`, `--list-delay-ms`,
//! `--garbage-at-start`, `--ignore-sigterm`, `--exit-after`,
//! `--silent-before-init`) and pick the
//! handshake era (`--era legacy|stateless|both`).
//!
//! Every request runs on its own thread, so slow tools never block others;
//! stdout is shared under one mutex and each message is written as one line
//! followed by a flush. Responses from the client to the fixture's own
//! requests are routed by id to the waiting thread. The fixture is standalone
//! on purpose: it must not depend on the broker's code it is testing.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, Write};
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
/// Caps on `sleep` duration/steps and `garbage` lines, for the same reason.
const SLEEP_MAX_MS: u64 = 24 * 3600 * 1000;
const COUNT_MAX: u64 = 100_000;
/// How long EOF on stdin waits for in-flight requests before exiting.
const EOF_GRACE: Duration = Duration::from_millis(500);

#[path = "mcp-fixture/limits.rs"]
mod limits;
#[path = "mcp-fixture/opts.rs"]
mod opts;
#[path = "mcp-fixture/probe.rs"]
mod probe;
use opts::{parse_args, Era, Opts};

/// A JSON-RPC error: code and message.
type RpcError = (i64, String);
type RpcResult<T = Value> = Result<T, RpcError>;
type Args = Map<String, Value>;

/// State shared by the reader loop and every request thread.
#[derive(Default)]
struct State {
    opts: Opts,
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
    /// Set once `initialize` was answered.
    initialized: std::sync::atomic::AtomicBool,
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
        self.send_raw(msg.to_string().as_bytes());
    }

    /// Writes raw bytes plus a newline (also for deliberately broken output).
    fn send_raw(&self, bytes: &[u8]) {
        let mut line = Vec::with_capacity(bytes.len() + 1);
        line.extend_from_slice(bytes);
        line.push(b'\n');
        let mut out = std::io::stdout().lock(); // exclusive across threads
        if let Err(e) = out.write_all(&line).and_then(|()| out.flush()) {
            log(&format!("stdout write failed: {e}"));
        }
    }

    fn notify(&self, method: &str, params: Value) {
        self.send(&json!({"jsonrpc": "2.0", "method": method, "params": params}));
    }

    fn fail(&self, id: &Value, code: i64, message: &str) {
        self.respond(id, Err((code, message.to_string())));
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
        use nix::sys::signal::{signal, SigHandler, Signal};
        // SAFETY: nix marks `signal` unsafe because a handler function runs
        // in signal context; SIG_IGN runs no code, and no other SIGTERM
        // disposition is installed in this program.
        let _ = unsafe { signal(Signal::SIGTERM, SigHandler::SigIgn) };
    }
    let state = Arc::new(State {
        opts,
        ..State::default()
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
            Err(e) => state.fail(&Value::Null, PARSE_ERROR, &format!("Parse error: {e}")),
        }
    }
}

/// Routes one decoded message from the client.
fn dispatch(state: &Arc<State>, msg: Value) {
    let Value::Object(obj) = msg else {
        state.fail(&Value::Null, INVALID_REQUEST, "not a JSON object");
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
        (Some(Value::String(method)), Some(_))
            if state.opts.silent_before_init
                && method != "initialize"
                && !state.initialized.load(Ordering::SeqCst) =>
        {
            log(&format!("--silent-before-init: ignoring {method}"));
        }
        (Some(Value::String(method)), Some(id)) => {
            if method == "initialize" {
                state.initialized.store(true, Ordering::SeqCst);
            }
            let method = method.clone();
            let params = obj.get("params").cloned().unwrap_or(Value::Null);
            state.in_flight.fetch_add(1, Ordering::SeqCst);
            if is_instant(&method, &params) {
                // Nothing to wait for: answer on the reader thread rather
                // than pay a thread start per call.
                serve(state, id, &method, &params);
                state.in_flight.fetch_sub(1, Ordering::SeqCst);
                return;
            }
            let st = Arc::clone(state);
            // What to name in an error if the thread cannot start (out of
            // threads under a process limit): the tool, else the method.
            let what = params
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or(&method)
                .to_string();
            let (rid, thread_name) = (id.clone(), format!("req-{id}"));
            let spawned = thread::Builder::new().name(thread_name).spawn(move || {
                serve(&st, id, &method, &params);
                st.in_flight.fetch_sub(1, Ordering::SeqCst);
            });
            if let Err(e) = spawned {
                // Answered here, on the reader thread: a request must never
                // go unanswered because its thread could not start.
                log(&format!("cannot spawn request thread: {e}"));
                state.fail(
                    &rid,
                    INTERNAL_ERROR,
                    &format!("{what}: cannot start a thread for the request: {e}"),
                );
                state.in_flight.fetch_sub(1, Ordering::SeqCst);
            }
        }
        (Some(_), id) => {
            let id = id.unwrap_or(Value::Null);
            state.fail(&id, INVALID_REQUEST, "method must be a string");
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
            state.fail(&id, INVALID_REQUEST, "neither method nor result/error");
        }
    }
}

/// Requests answered at once, without blocking: `ping` and the `echo` tool.
fn is_instant(method: &str, params: &Value) -> bool {
    method == "ping"
        || (method == "tools/call" && params.get("name").and_then(Value::as_str) == Some("echo"))
}

/// Answers one request (on its own thread unless [`is_instant`]).
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
        "tools/list" => {
            thread::sleep(Duration::from_millis(state.opts.list_delay_ms));
            serde_json::from_str(TOOLS)
                .map(|tools: Value| json!({"tools": tools}))
                .map_err(|e| (INTERNAL_ERROR, format!("bad tool table: {e}")))
        }
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

/// The advertised tools (a data file: name, description, input schema).
const TOOLS: &str = include_str!("mcp-fixture/tools.json");

fn arg_str<'a>(args: &'a Args, tool: &str, name: &str) -> RpcResult<&'a str> {
    args.get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| bad(format!("{tool}: argument `{name}` must be a string")))
}

/// An integer argument in `0..=max`; `default` applies when it is absent
/// (absent with no default is an error).
fn arg_num(args: &Args, tool: &str, arg: &str, dflt: Option<u64>, max: u64) -> RpcResult<u64> {
    let v = match args.get(arg) {
        None | Some(Value::Null) => dflt,
        Some(v) => v.as_u64(),
    };
    let msg = || {
        bad(format!(
            "{tool}: argument `{arg}` must be an integer in 0..={max}"
        ))
    };
    v.filter(|n| *n <= max).ok_or_else(msg)
}

/// `sample` in the stateless era: ask via `InputRequiredResult`, answer on
/// the retry that carries `inputResponses` and the echoed `requestState`.
/// The state names this process, so (like real SDK servers, which seal it
/// under a per-process key) only this process accepts the retry.
fn sample_stateless(params: &Value, req: Value) -> RpcResult {
    let state = format!("fixture-state-{}", std::process::id());
    match params.pointer("/inputResponses/q") {
        None => Ok(json!({"resultType": "input_required",
            "inputRequests": {"q": {"method": "sampling/createMessage", "params": req}},
            "requestState": state})),
        Some(_) if params.get("requestState").and_then(Value::as_str) != Some(&state) => Err(bad(
            "sample: Invalid or expired requestState (missing, altered or another process's)",
        )),
        Some(r) => match r.pointer("/content/text").and_then(Value::as_str) {
            Some(t) => text(t),
            None => text(r.to_string()),
        },
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
            if args.get("ask").and_then(Value::as_bool) == Some(true) {
                // Ask the client first and die once it answers: the test
                // decides when the process exits while this request is in flight.
                let _ = state.client_request("roots/list", json!({}));
            }
            log(&format!("crash: exiting with code {code}"));
            std::process::exit(code);
        }
        "hang" => loop {
            thread::park();
        },
        "garbage" => arg_num(args, name, "lines", Some(3), COUNT_MAX).and_then(|lines| {
            let junk: [&[u8]; 3] = [
                b"this is not json",
                b"\x00\x01\x02\xff\xfe\x1b[31m binary junk \x7f\xc3\x28",
                b"{\"truncated\": ",
            ];
            for k in 0..lines {
                state.send_raw(junk[(k % 3) as usize]);
            }
            text("ok")
        }),
        "huge" => arg_num(args, name, "bytes", None, HUGE_MAX).and_then(|b| {
            let len = usize::try_from(b).map_err(|_| bad("huge: too big for this platform"))?;
            text("x".repeat(len))
        }),
        "sample" => arg_str(args, name, "prompt").and_then(|prompt| {
            let req = json!({"messages": [{"role": "user",
                "content": {"type": "text", "text": prompt}}], "maxTokens": 10});
            if state.opts.era == Era::Stateless {
                // 2026-07-28 servers ask by returning InputRequiredResult.
                return sample_stateless(params, req);
            }
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
        "spawn_child" => limits::spawn_child(),
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
        "open_files" => arg_num(args, name, "n", None, COUNT_MAX).and_then(limits::open_files),
        "alloc" => arg_num(args, name, "bytes", None, HUGE_MAX << 4).and_then(limits::alloc),
        "probe" => arg_str(args, name, "op").and_then(|op| {
            let path = arg_str(args, name, "path")?;
            probe::probe(op, path).map_err(bad).and_then(text)
        }),
        "identity" => text(format!(
            "uid={} gid={} home={} tmpdir={}",
            nix::unistd::getuid(),
            nix::unistd::getgid(),
            std::env::var("HOME").unwrap_or_default(),
            std::env::var("TMPDIR").unwrap_or_default()
        )),
        _ => Err(bad(format!("Unknown tool: {name}"))),
    };
    Some(result)
}

/// `sleep {ms, steps?}`: progress is only sent when the request carries a
/// progress token. A cancelled request stops early and gets no response.
fn sleep_tool(state: &State, id: &Value, params: &Value, args: &Args) -> Option<RpcResult> {
    let nums = arg_num(args, "sleep", "ms", None, SLEEP_MAX_MS)
        .and_then(|ms| Ok((ms, arg_num(args, "sleep", "steps", Some(0), COUNT_MAX)?)));
    let (ms, steps) = match nums {
        Ok(nums) => nums,
        Err(e) => return Some(Err(e)),
    };
    let token = params.pointer("/_meta/progressToken").cloned();
    let key = id.to_string();
    let start = Instant::now();
    // Waits until `offset_ms` after start; false if cancelled meanwhile.
    let wait_until = |offset_ms: u64| loop {
        if lock(&state.cancelled).contains(&key) {
            return false;
        }
        let target = start + Duration::from_millis(offset_ms);
        let now = Instant::now();
        if now >= target {
            return true;
        }
        thread::sleep((target - now).min(Duration::from_millis(10)));
    };
    let progressed = (1..=steps).all(|i| {
        let Some(token) = &token else { return true };
        let at = (u128::from(ms) * u128::from(i) / u128::from(steps)) as u64;
        let on_time = wait_until(at);
        if on_time {
            let msg = format!("step {i}");
            let p = json!({"progressToken": token, "progress": i, "total": steps, "message": msg});
            state.notify("notifications/progress", p);
        }
        on_time
    });
    let finished = progressed && wait_until(ms);
    lock(&state.cancelled).remove(&key);
    if !finished {
        log(&format!("sleep {key}: cancelled, not responding"));
        return None;
    }
    Some(text(format!("slept {ms}")))
}
