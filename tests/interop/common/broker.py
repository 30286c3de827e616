"""Shared harness for the interop suites: paths, server commands, and a context manager that runs
`mcp-broker up` (or, for validating the client code, the `mcp-proxy` stand-in) on a free loopback port.

Imported from both the SDK 1.x and 2.x suites, so it uses only the standard library plus httpx
(installed in both venvs). Nothing here skips: a missing binary or dependency raises.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[3]
INTEROP = REPO / "target" / "interop"
NODE_DIR = INTEROP / "node"
EVERYTHING_JS = NODE_DIR / "node_modules" / "@modelcontextprotocol" / "server-everything" / "dist" / "index.js"
TIME_BIN = INTEROP / "venv-time" / "bin" / "mcp-server-time"
TS_CLIENT_SRC = REPO / "tests" / "interop" / "ts" / "client.mjs"

READY_TIMEOUT = float(os.environ.get("MCP_INTEROP_READY_TIMEOUT", "30"))
STOP_TIMEOUT = float(os.environ.get("MCP_INTEROP_STOP_TIMEOUT", "10"))

INSTALL_HINT = "run scripts/install-test-deps.sh"

# Brokers started or still running during the current test; the pytest hook in fixtures.py
# attaches their log tails to a failing test's report.
TOUCHED: list["Broker"] = []


class HarnessError(AssertionError):
    """A missing binary/dependency or a broker that would not start/stop. Always a failure, never a skip."""


def broker_bin() -> Path:
    path = Path(os.environ.get("MCP_BROKER_BIN", REPO / "target" / "debug" / "mcp-broker"))
    if not path.is_file() or not os.access(path, os.X_OK):
        raise HarnessError(f"mcp-broker binary not found or not executable: {path} (cargo build, or set MCP_BROKER_BIN)")
    return path


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise HarnessError(f"{what} missing: {path} ({INSTALL_HINT})")
    return path


def node_bin() -> str:
    import shutil

    node = shutil.which("node")
    if node is None:
        raise HarnessError("`node` not found on PATH")
    return node


def everything_cmd() -> list[str]:
    """stdio command for @modelcontextprotocol/server-everything."""
    return [node_bin(), str(_require(EVERYTHING_JS, "server-everything")), "stdio"]


def time_cmd() -> list[str]:
    """stdio command for mcp-server-time (PyPI)."""
    return [str(_require(TIME_BIN, "mcp-server-time"))]


BACKENDS = {"everything": everything_cmd, "time": time_cmd}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _standin() -> str | None:
    """MCP_INTEROP_STANDIN=/path/to/mcp-proxy runs the suite against PyPI `mcp-proxy` instead of
    `mcp-broker up` (only to validate the client code while the broker is not ready)."""
    return os.environ.get("MCP_INTEROP_STANDIN") or None


@dataclass
class Broker:
    """A running `mcp-broker up`. `url` is the MCP endpoint, `base` the http://host:port prefix."""

    proc: subprocess.Popen[bytes]
    base: str
    log_path: Path
    argv: list[str]
    standin: bool = False
    exit_code: int | None = field(default=None)
    # `mcp-broker serve` (run_serve): its lease API socket.
    socket: Path | None = None

    @property
    def url(self) -> str:
        return f"{self.base}/mcp"

    def log_tail(self, n: int = 60) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "<no log>"
        return "\n".join(lines[-n:])

    def describe(self) -> str:
        return f"argv: {shlex.join(self.argv)}\n--- broker log (tail) ---\n{self.log_tail()}"


def _ready(broker: Broker, client: httpx.Client) -> bool:
    if broker.standin:
        # mcp-proxy has no /readyz: a TCP accept on the port is the best we can do.
        host, port = broker.base.removeprefix("http://").split(":")
        with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=0.5):
            return True
        return False
    try:
        r = client.get(f"{broker.base}/readyz", timeout=1.0)
    except httpx.HTTPError:
        return False
    if r.status_code == 200:
        return True
    if r.status_code != 503:
        raise HarnessError(f"GET /readyz answered {r.status_code} (expected 503 while warming, 200 when ready)\n{broker.describe()}")
    return False


@contextlib.contextmanager
def run_broker(
    backend: str | list[str],
    *,
    extra_args: list[str] | None = None,
    ready_timeout: float = READY_TIMEOUT,
) -> Iterator[Broker]:
    """Start `mcp-broker up [extra_args] --listen 127.0.0.1:PORT -- CMD...`, wait for /readyz 200,
    yield, then SIGTERM and require a clean exit within STOP_TIMEOUT."""
    cmd = BACKENDS[backend]() if isinstance(backend, str) else list(backend)
    port = free_port()
    standin = _standin()
    if standin:
        argv = [standin, "--host", "127.0.0.1", "--port", str(port), "--", *cmd]
    else:
        argv = [str(broker_bin()), "up", *(extra_args or []), "--listen", f"127.0.0.1:{port}", "--", *cmd]

    log_dir = Path(tempfile.mkdtemp(prefix="mcp-interop-"))
    env = {"RUST_LOG": "info"}
    base = f"http://127.0.0.1:{port}"
    with _spawn(argv, log_dir, env, base=base, standin=bool(standin)) as broker:
        with httpx.Client() as client:
            _wait(broker, lambda: _ready(broker, client), "become ready", ready_timeout)
        yield broker


@contextlib.contextmanager
def _spawn(argv: list[str], log_dir: Path, env: dict[str, str], **fields) -> Iterator[Broker]:
    """Run `argv` in its own session, logging to log_dir/broker.log; always stop it (SIGTERM, and
    require a clean exit) when the block ends."""
    log_path = log_dir / "broker.log"
    log = log_path.open("wb")
    full_env = dict(os.environ)
    for k, v in {"NO_COLOR": "1", **env}.items():
        full_env.setdefault(k, v)
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
    )
    broker = Broker(proc=proc, log_path=log_path, argv=argv, **fields)
    TOUCHED.append(broker)
    try:
        yield broker
    finally:
        try:
            _stop(broker)
        finally:
            log.close()


def _wait(broker: Broker, ready, what: str, timeout: float) -> None:
    """Poll `ready()` every 0.1 s until true; fail if the broker exits first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not ready():
        if broker.proc.poll() is not None:
            raise HarnessError(f"broker exited with {broker.proc.returncode} before it could {what}\n{broker.describe()}")
        if time.monotonic() > deadline:
            raise HarnessError(f"broker did not {what} within {timeout}s\n{broker.describe()}")
        time.sleep(0.1)


def _toml_str(s: str) -> str:
    import json

    return json.dumps(s)  # a JSON string is a valid TOML basic string


def _pool_warm(client: httpx.Client, pool: str) -> bool:
    try:
        r = client.get(f"http://broker/v1/pools/{pool}", timeout=1.0)
    except httpx.HTTPError:
        return False
    return r.status_code == 200 and r.json().get("handshake") is not None


@contextlib.contextmanager
def run_serve(pools: dict[str, list[str]], *, ready_timeout: float = READY_TIMEOUT) -> Iterator[Broker]:
    """Start `mcp-broker serve --config broker.toml` with one pool per entry of `pools` (name → stdio
    command) on a socket in a temp dir, wait until every pool has a warm process (its cached
    handshake), yield (`broker.socket` is the lease API socket), then SIGTERM and require a clean
    exit, as run_broker does."""
    work = Path(tempfile.mkdtemp(prefix="mcp-interop-serve-"))
    sock = work / "broker.sock"
    # A port of its own: the default 9464 may be taken by any other broker on the machine.
    lines = ["[broker]", f"socket = {_toml_str(str(sock))}", f"metrics_listen = \"127.0.0.1:{free_port()}\"", ""]
    for name, cmd in pools.items():
        lines += [
            "[[pool]]",
            f"name = {_toml_str(name)}",
            f"command = {_toml_str(cmd[0])}",
            "args = [" + ", ".join(_toml_str(a) for a in cmd[1:]) + "]",
            "min_idle = 1",
            "max = 4",
            "",
        ]
    config = work / "broker.toml"
    config.write_text("\n".join(lines))
    argv = [str(broker_bin()), "serve", "--config", str(config)]
    with _spawn(argv, work, {}, base=f"unix:{sock}", socket=sock) as broker:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock))) as client:
            _wait(broker, lambda: sock.exists() and all(_pool_warm(client, n) for n in pools), "warm its pools", ready_timeout)
        yield broker


def _descendants(pid: int) -> set[int]:
    """PIDs of all live descendants of `pid` (Linux /proc scan)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # field 4 (ppid) follows the parenthesised command name, which may contain spaces
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] != b"Z"


def _stop(broker: Broker) -> None:
    proc = broker.proc
    backends = _descendants(proc.pid) if proc.poll() is None else set()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            _kill_group(proc, backends)
            raise HarnessError(f"broker did not exit within {STOP_TIMEOUT}s of SIGTERM\n{broker.describe()}") from None
    broker.exit_code = proc.returncode
    # The broker's stdio servers must not outlive it.
    deadline = time.monotonic() + 5
    while (left := {p for p in backends if _alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    _kill_group(proc, left)
    if left and not broker.standin:
        raise HarnessError(f"processes {sorted(left)} outlived the broker's SIGTERM exit\n{broker.describe()}")


def _kill_group(proc: subprocess.Popen[bytes], pids: set[int] = frozenset()) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def tool_signature(tools: list[dict]) -> list[dict]:
    """The parts of tools/list the proxy must pass through unchanged: name, description, inputSchema."""
    return [{"name": t["name"], "description": t.get("description"), "inputSchema": t.get("inputSchema")} for t in tools]


def tools_diff(direct: list[dict], proxied: list[dict]) -> str:
    """Human-readable difference between two tool_signature lists (empty when equal)."""
    if direct == proxied:
        return ""
    dn = [t["name"] for t in direct]
    pn = [t["name"] for t in proxied]
    out = []
    if dn != pn:
        out.append(f"names differ:\n  direct:  {dn}\n  proxied: {pn}")
        missing = sorted(set(dn) - set(pn))
        extra = sorted(set(pn) - set(dn))
        if missing or extra:
            out.append(
                f"  only direct: {missing}; only proxied: {extra}"
                " (server-everything registers some tools only when the *initializing* client declares"
                " roots/sampling/elicitation capabilities: a pooled backend is initialized by the broker)"
            )
    pm = {t["name"]: t for t in proxied}
    for t in direct:
        p = pm.get(t["name"])
        if p is not None and p != t:
            out.append(f"tool {t['name']!r} differs:\n  direct:  {t}\n  proxied: {p}")
    return "\n".join(out)


# What `mcp-broker` declares when it initializes a pooled backend (src/protocol.rs): every
# server→client feature, since a warm process cannot know which client it will serve. The broker
# then relays a server→client request only to a client that declared that capability.
BROKER_BACKEND_CAPABILITIES = {"roots": {"listChanged": True}, "sampling": {}, "elicitation": {}}


def raw_stdio_tools(cmd: list[str], capabilities: dict, *, timeout: float = 20.0) -> list[dict]:
    """tools/list from a direct stdio connection whose `initialize` declares exactly `capabilities`
    (SDK-free JSON-RPC, so both suites get the same reference). Server→client requests are answered
    minimally (roots/list → no roots, anything else → method not found)."""
    import json
    import queue
    import threading

    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    lines: queue.Queue[bytes | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout

    def send(msg: dict) -> None:
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(msg).encode() + b"\n")
        proc.stdin.flush()

    def wait_for(rid: int) -> dict:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HarnessError(f"direct stdio {shlex.join(cmd)}: no answer to request {rid} within {timeout}s")
            try:
                line = lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise HarnessError(f"direct stdio {shlex.join(cmd)} exited before answering request {rid}")
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "method" in msg and "id" in msg:  # server→client request
                if msg["method"] == "roots/list":
                    send({"jsonrpc": "2.0", "id": msg["id"], "result": {"roots": []}})
                else:
                    send({"jsonrpc": "2.0", "id": msg["id"], "error": {"code": -32601, "message": "not supported"}})
            elif msg.get("id") == rid:
                if "error" in msg:
                    raise HarnessError(f"direct stdio request {rid} failed: {msg['error']}")
                return msg["result"]

    try:
        send({
            "jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": capabilities,
                       "clientInfo": {"name": "mcp-broker-interop-raw", "version": "0"}},
        })
        wait_for(1)
        send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        tools: list[dict] = []
        cursor = None
        for rid in range(2, 50):
            send({"jsonrpc": "2.0", "id": rid, "method": "tools/list", "params": {"cursor": cursor} if cursor else {}})
            page = wait_for(rid)
            tools.extend(page.get("tools", []))
            cursor = page.get("nextCursor")
            if not cursor:
                return tools
        raise HarnessError("tools/list pagination did not end")
    finally:
        with contextlib.suppress(Exception):
            proc.stdin.close()  # type: ignore[union-attr]
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=3)


@contextlib.contextmanager
def user_runtime_dir() -> Iterator[Path]:
    """A private XDG_RUNTIME_DIR for `mcp-broker connect -- CMD` (on-demand pools): the first shim
    starts the per-user broker there. At the end the broker gets SIGTERM and must exit, with every
    server process it ran, within STOP_TIMEOUT."""
    run = Path(tempfile.mkdtemp(prefix="mcp-interop-user-"))
    run.chmod(0o700)
    try:
        yield run
    finally:
        pid_file = run / "mcp-broker" / "broker.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text().strip())
            servers = _descendants(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT
            while (_alive(pid) or any(_alive(p) for p in servers)) and time.monotonic() < deadline:
                time.sleep(0.05)
            left = [p for p in [pid, *servers] if _alive(p)]
            log = run / "mcp-broker" / "broker.log"
            assert not left, f"per-user broker left processes {left}\n{log.read_text(errors='replace')[-4000:]}"


def shim_command(way: str, backend: str, serve_socket: Path, user_dir: Path) -> tuple[str, list[str], dict[str, str]]:
    """(command, args, env) a host config runs for `backend` ("everything" or "time") through the
    shim: `way` "named" leases from pool `backend` of the `mcp-broker serve` on `serve_socket`;
    "on-demand" prefixes the server's own command with `mcp-broker connect --` (per-user broker in
    `user_dir`)."""
    if way == "named":
        return str(broker_bin()), ["connect", "--pool", backend, "--socket", str(serve_socket)], {}
    return str(broker_bin()), ["connect", "--", *BACKENDS[backend]()], {"XDG_RUNTIME_DIR": str(user_dir)}


def assert_utc_now(payload: dict) -> None:
    """mcp-server-time's get_current_time answer for UTC is UTC and about now."""
    from datetime import datetime, timezone

    when = datetime.fromisoformat(payload["datetime"])
    assert payload["timezone"] == "UTC" and when.utcoffset().total_seconds() == 0, payload
    assert abs((datetime.now(timezone.utc) - when).total_seconds()) < 120, payload


def ts_script(name: str) -> Path:
    """tests/interop/ts/NAME copied (with the summary.mjs it imports) next to
    target/interop/node/node_modules: ESM resolves bare specifiers from the script's own directory
    upwards."""
    import shutil

    sdk = NODE_DIR / "node_modules" / "@modelcontextprotocol" / "sdk"
    if not sdk.is_dir():
        raise HarnessError(f"{sdk} missing ({INSTALL_HINT})")
    for f in (name, "summary.mjs"):
        shutil.copyfile(TS_CLIENT_SRC.parent / f, NODE_DIR / f)
    return NODE_DIR / name
