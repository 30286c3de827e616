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
    log_path = log_dir / "broker.log"
    log = log_path.open("wb")
    env = dict(os.environ)
    env.setdefault("RUST_LOG", "info")
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    broker = Broker(proc=proc, base=f"http://127.0.0.1:{port}", log_path=log_path, argv=argv, standin=bool(standin))
    try:
        deadline = time.monotonic() + ready_timeout
        with httpx.Client() as client:
            while True:
                if proc.poll() is not None:
                    raise HarnessError(f"broker exited with {proc.returncode} before becoming ready\n{broker.describe()}")
                if _ready(broker, client):
                    break
                if time.monotonic() > deadline:
                    raise HarnessError(f"broker not ready within {ready_timeout}s\n{broker.describe()}")
                time.sleep(0.1)
        yield broker
    finally:
        try:
            _stop(broker)
        finally:
            log.close()


def _stop(broker: Broker) -> None:
    proc = broker.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise HarnessError(f"broker did not exit within {STOP_TIMEOUT}s of SIGTERM\n{broker.describe()}") from None
    broker.exit_code = proc.returncode
    # Reap anything the broker left in its process group (warm servers must not outlive it).
    _kill_group(proc)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
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
