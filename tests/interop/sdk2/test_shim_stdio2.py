"""Python SDK 2.x `Client(StdioServerParameters)` → `mcp-broker connect` → a warm pool, with the host
at 2026-07-28 (mode 'auto': the SDK's server/discover probe is answered from the pool's cache), the
named way (`--pool` against `mcp-broker serve`) and on-demand (`connect -- CMD`, per-user broker
started by the first shim). Server→client requests of the handshake-era backends come to this
host as InputRequiredResult and its retry resumes the held lease."""

from __future__ import annotations

import json

import anyio
import httpx
import mcp_types as types
import pytest
from mcp import Client, StdioServerParameters

from common.broker import assert_utc_now, everything_cmd, run_serve, shim_command, time_cmd, user_runtime_dir

pytestmark = pytest.mark.anyio

MODERN = "2026-07-28"
CALL_TIMEOUT = 30


@pytest.fixture(scope="module")
def pools_serve():
    with run_serve({"everything": everything_cmd(), "time": time_cmd()}) as broker:
        yield broker


@pytest.fixture(scope="module")
def user_dir():
    with user_runtime_dir() as d:
        yield d


@pytest.fixture(params=["named", "on-demand"])
def shim(request, pools_serve, user_dir):
    """(params for a backend, the lease API socket the shim uses) the named or on-demand way."""

    def params(backend: str) -> StdioServerParameters:
        command, args, env = shim_command(request.param, backend, pools_serve.socket, user_dir)
        return StdioServerParameters(command=command, args=args, env=env or None)

    params.socket = pools_serve.socket if request.param == "named" else user_dir / "mcp-broker" / "broker.sock"
    return params


def _text(result: types.CallToolResult) -> str:
    assert not result.is_error, f"tool call failed: {result}"
    texts = [c.text for c in result.content if isinstance(c, types.TextContent)]
    assert texts, f"no text content in {result}"
    return "".join(texts)


def _busy(socket) -> int:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(socket))) as c:
        return sum(p["status"]["busy"] + p["status"]["waiting"] for p in c.get("http://broker/v1/pools").json())


async def test_modern_host_tools_and_time(shim):
    with anyio.fail_after(CALL_TIMEOUT):
        async with Client(shim("everything")) as client:
            version = client.protocol_version
            echoed = _text(await client.call_tool("echo", {"message": "hello from sdk 2.x via the shim"}))
        async with Client(shim("time")) as client:
            assert client.protocol_version == MODERN
            result = await client.call_tool("get_current_time", {"timezone": "UTC"})
    assert version == MODERN, version
    assert echoed == "Echo: hello from sdk 2.x via the shim"
    assert_utc_now(result.structured_content or json.loads(_text(result)))


async def test_modern_host_progress(shim):
    seen: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)

    with anyio.fail_after(CALL_TIMEOUT):
        async with Client(shim("everything")) as client:
            result = await client.call_tool(
                "trigger-long-running-operation", {"duration": 1.0, "steps": 2}, progress_callback=on_progress
            )
    assert _text(result) == "Long running operation completed. Duration: 1 seconds, Steps: 2."
    assert seen == [1, 2], seen


async def test_modern_host_sampling_as_input_required(shim):
    asked: list[str] = []

    async def sampling(context, params: types.CreateMessageRequestParams):
        asked.append(params.messages[0].content.text)
        return types.CreateMessageResult(
            role="assistant", content=types.TextContent(type="text", text="pong via shim"), model="shim-model-2"
        )

    with anyio.fail_after(CALL_TIMEOUT):
        async with Client(shim("everything"), sampling_callback=sampling) as client:
            assert client.protocol_version == MODERN
            result = await client.call_tool("trigger-sampling-request", {"prompt": "ping2", "maxTokens": 10})
    text = _text(result)
    assert asked == ["Resource trigger-sampling-request context: ping2"], asked
    assert "pong via shim" in text and "shim-model-2" in text, text


async def test_modern_host_elicitation_as_input_required(shim):
    asked: list[str] = []

    async def elicitation(context, params):
        asked.append(params.message)
        return types.ElicitResult(action="accept", content={"name": "Grace via the shim", "check": True})

    with anyio.fail_after(CALL_TIMEOUT):
        async with Client(shim("everything"), elicitation_callback=elicitation) as client:
            result = await client.call_tool("trigger-elicitation-request", {})
    text = _text(result)
    assert asked and "provide inputs" in asked[0], asked
    assert "Grace via the shim" in text, text


async def test_modern_host_cancellation_ends_the_lease(shim):
    """Abandoning a call (scope cancel) sends notifications/cancelled; the shim cancels the lease,
    so the pool has nothing busy soon after, and the next call works."""
    started = anyio.Event()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        started.set()

    with anyio.fail_after(CALL_TIMEOUT):
        async with Client(shim("everything")) as client:
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:

                    async def long_call() -> None:
                        await client.call_tool(
                            "trigger-long-running-operation", {"duration": 60, "steps": 60}, progress_callback=on_progress
                        )

                    tg.start_soon(long_call)
                    await started.wait()
                    assert _busy(shim.socket) >= 1
                    scope.cancel()
            while _busy(shim.socket) != 0:
                await anyio.sleep(0.05)
            echoed = _text(await client.call_tool("echo", {"message": "after cancel"}))
    assert echoed == "Echo: after cancel"
