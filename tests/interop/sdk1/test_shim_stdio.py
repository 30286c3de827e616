"""Python SDK 1.x stdio client → `mcp-broker connect` (the stdio shim) → a warm pool, as a host's
config would run it in place of the server's own command. Two ways in, each test runs both:

* named: `connect --pool NAME --socket S` against `mcp-broker serve` with pools of
  server-everything and mcp-server-time;
* on-demand: `connect -- CMD ARGS...` with a private XDG_RUNTIME_DIR, where the first shim
  starts the per-user broker, which creates the pool (exclusive, one warm spare)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
import json

import anyio
import pytest
from mcp import ClientSession, StdioServerParameters, types
from mcp.client.stdio import stdio_client
from mcp.shared.exceptions import McpError

from common.broker import Broker, assert_utc_now, everything_cmd, run_serve, shim_command, time_cmd, user_runtime_dir

pytestmark = pytest.mark.anyio

CALL_TIMEOUT = 30
CANCELLED = -31010
WAYS = ["named", "on-demand"]


@pytest.fixture(scope="module")
def pools_serve() -> Iterator[Broker]:
    """`mcp-broker serve` with pools `everything` and `time`, warm."""
    with run_serve({"everything": everything_cmd(), "time": time_cmd()}) as broker:
        yield broker


@pytest.fixture(scope="module")
def user_dir():
    with user_runtime_dir() as d:
        yield d


@pytest.fixture(params=WAYS)
def shim(request, pools_serve, user_dir):
    """How to spawn the shim for a backend ("everything" or "time"), the named or on-demand way."""

    def params(backend: str) -> StdioServerParameters:
        command, args, env = shim_command(request.param, backend, pools_serve.socket, user_dir)
        return StdioServerParameters(command=command, args=args, env=env or None)

    return params


@asynccontextmanager
async def shim_session(params: StdioServerParameters, **session_kwargs) -> AsyncIterator[ClientSession]:
    """An initialized ClientSession whose stdio server is the shim."""
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write, **session_kwargs) as session:
            started = time.monotonic()
            session.interop_init = await session.initialize()  # type: ignore[attr-defined]
            session.interop_init_s = time.monotonic() - started  # type: ignore[attr-defined]
            yield session


def _text(result: types.CallToolResult) -> str:
    assert not result.isError, f"tool call failed: {result}"
    texts = [c.text for c in result.content if isinstance(c, types.TextContent)]
    assert texts, f"no text content in {result}"
    return "".join(texts)


async def test_initialize_list_and_echo_through_the_shim(shim):
    with anyio.fail_after(CALL_TIMEOUT):
        async with shim_session(shim("everything")) as s:
            init = s.interop_init
            names = {t.name for t in (await s.list_tools()).tools}
            echoed = _text(await s.call_tool("echo", {"message": "hello through the shim ☃"}))
    # The pool's cached handshake, negotiated to the SDK's version.
    assert init.serverInfo.name == "mcp-servers/everything", init.serverInfo
    assert init.protocolVersion == types.LATEST_PROTOCOL_VERSION, init.protocolVersion
    assert init.capabilities.tools is not None
    assert {"echo", "trigger-long-running-operation", "trigger-sampling-request"} <= names, sorted(names)
    assert echoed == "Echo: hello through the shim ☃"


async def test_mcp_server_time_through_the_shim(shim):
    with anyio.fail_after(CALL_TIMEOUT):
        async with shim_session(shim("time")) as s:
            assert s.interop_init.serverInfo.name == "mcp-time", s.interop_init.serverInfo
            result = await s.call_tool("get_current_time", {"timezone": "UTC"})
    assert_utc_now(result.structuredContent or json.loads(_text(result)))


async def test_progress_notifications_through_the_shim(shim):
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    with anyio.fail_after(CALL_TIMEOUT):
        async with shim_session(shim("everything")) as s:
            result = await s.call_tool(
                "trigger-long-running-operation", {"duration": 1.5, "steps": 3}, progress_callback=on_progress
            )
    assert _text(result) == "Long running operation completed. Duration: 1.5 seconds, Steps: 3."
    # The shim writes a lease's notifications before its response: all 3 arrived first.
    assert [p for p, _, _ in seen] == [1, 2, 3], seen
    assert all(total == 3 for _, total, _ in seen), seen


async def test_sampling_relayed_to_the_host(shim):
    asked: list[str] = []

    async def sampling(context, params: types.CreateMessageRequestParams):
        asked.append(params.messages[0].content.text)
        return types.CreateMessageResult(
            role="assistant", content=types.TextContent(type="text", text="pong from the host"), model="host-model"
        )

    with anyio.fail_after(CALL_TIMEOUT):
        async with shim_session(shim("everything"), sampling_callback=sampling) as s:
            result = await s.call_tool("trigger-sampling-request", {"prompt": "ping", "maxTokens": 10})
    text = _text(result)
    assert asked == ["Resource trigger-sampling-request context: ping"], asked
    assert "pong from the host" in text and "host-model" in text, text


async def test_elicitation_relayed_to_the_host(shim):
    asked: list[str] = []

    async def elicitation(context, params: types.ElicitRequestParams):
        asked.append(params.message)
        return types.ElicitResult(action="accept", content={"name": "Ada from the host", "check": True})

    with anyio.fail_after(CALL_TIMEOUT):
        async with shim_session(shim("everything"), elicitation_callback=elicitation) as s:
            result = await s.call_tool("trigger-elicitation-request", {})
    text = _text(result)
    assert asked and "provide inputs" in asked[0], asked
    assert "Ada from the host" in text, text


async def test_sampling_without_the_capability_is_refused_not_hung(shim):
    """The host did not declare sampling: the server's request is answered with an error at once."""
    with anyio.fail_after(CALL_TIMEOUT):
        async with shim_session(shim("everything")) as s:
            result = await s.call_tool("trigger-sampling-request", {"prompt": "ping", "maxTokens": 10})
    assert result.isError, f"sampling without the capability succeeded: {result}"
    text = " ".join(c.text for c in result.content if isinstance(c, types.TextContent))
    # server-everything reports the shim's -32601 refusal as a tool error.
    assert "-32601" in text and "did not declare the capability" in text, text


async def test_cancellation_ends_the_request_and_the_session_goes_on(shim):
    """notifications/cancelled from the host: the long call ends at once with -31010 (the lease was
    cancelled at the server), and the next call on the same session works."""
    started = anyio.Event()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        started.set()

    errors: list[McpError] = []
    with anyio.fail_after(CALL_TIMEOUT):
        async with shim_session(shim("everything")) as s:
            rid = s._request_id  # the id the SDK gives the next request

            async def long_call() -> None:
                try:
                    await s.call_tool(
                        "trigger-long-running-operation", {"duration": 60, "steps": 60}, progress_callback=on_progress
                    )
                except McpError as e:
                    errors.append(e)

            t0 = time.monotonic()
            async with anyio.create_task_group() as tg:
                tg.start_soon(long_call)
                await started.wait()
                await s.send_notification(
                    types.ClientNotification(
                        types.CancelledNotification(
                            method="notifications/cancelled",
                            params=types.CancelledNotificationParams(requestId=rid, reason="host gave up"),
                        )
                    )
                )
            elapsed = time.monotonic() - t0
            echoed = _text(await s.call_tool("echo", {"message": "still here"}))
    assert [e.error.code for e in errors] == [CANCELLED], errors
    assert elapsed < 30, elapsed
    assert echoed == "Echo: still here"


def test_typescript_sdk_stdio_client(shim):
    """The TypeScript SDK's StdioClientTransport spawns the shim: tools, progress, sampling answered
    by the TS host, concurrent calls each answered with its own result."""
    import os
    import subprocess

    from common.broker import node_bin, ts_script

    script = ts_script("stdio_client.mjs")
    params = shim("everything")
    env = dict(os.environ, **(params.env or {}))
    proc = subprocess.run(
        [node_bin(), str(script), params.command, *params.args], capture_output=True, text=True, timeout=60, env=env
    )
    detail = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, detail
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["ok"] is True and summary["failures"] == [], detail
    assert summary["serverInfo"]["name"] == "mcp-servers/everything", detail
    assert "echo" in summary["tools"], detail
    assert summary["echo"] == "Echo: hello from the TS stdio client", detail
    # Both progress notifications precede the response on the shim's stdout, but the TS SDK runs
    # notification handlers a microtask later than it settles a response read in the same chunk
    # (shared/protocol.js `_onnotification`), so the last one may land after its handler is gone.
    assert summary["progress"][:1] == [1] and set(summary["progress"]) <= {1, 2}, detail
    assert summary["sampled"] == "Resource trigger-sampling-request context: ping-ts", detail
    assert "pong from the TS host" in summary["sampling"], detail
    assert summary["concurrent"] == {"calls": 10, "correct": 10}, detail
