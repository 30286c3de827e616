"""Python SDK 1.x stdio client → `mcp-broker connect` (the stdio shim) → `mcp-broker serve` pooling
server-everything: the shim stands in for `node server-everything stdio` in a host's config."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import anyio
import pytest
from mcp import ClientSession, StdioServerParameters, types
from mcp.client.stdio import stdio_client

from common.broker import Broker, broker_bin, everything_cmd, run_serve

pytestmark = pytest.mark.anyio

CALL_TIMEOUT = 30


@pytest.fixture(scope="module")
def everything_serve() -> Iterator[Broker]:
    """`mcp-broker serve` with pool `everything` (server-everything over stdio), warm."""
    with run_serve({"everything": everything_cmd()}) as broker:
        yield broker


@asynccontextmanager
async def shim_session(broker: Broker, **session_kwargs) -> AsyncIterator[ClientSession]:
    """An initialized ClientSession whose stdio server is `mcp-broker connect --pool everything`."""
    assert broker.socket is not None
    params = StdioServerParameters(
        command=str(broker_bin()), args=["connect", "--pool", "everything", "--socket", str(broker.socket)]
    )
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


async def test_initialize_list_and_echo_through_the_shim(everything_serve):
    with anyio.fail_after(CALL_TIMEOUT):
        async with shim_session(everything_serve) as s:
            init = s.interop_init
            names = {t.name for t in (await s.list_tools()).tools}
            echoed = _text(await s.call_tool("echo", {"message": "hello through the shim ☃"}))
    # The pool's cached handshake, negotiated to the SDK's version.
    assert init.serverInfo.name == "mcp-servers/everything", init.serverInfo
    assert init.protocolVersion == types.LATEST_PROTOCOL_VERSION, init.protocolVersion
    assert init.capabilities.tools is not None
    assert {"echo", "trigger-long-running-operation", "trigger-sampling-request"} <= names, sorted(names)
    assert echoed == "Echo: hello through the shim ☃"


async def test_progress_notifications_through_the_shim(everything_serve):
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    with anyio.fail_after(CALL_TIMEOUT):
        async with shim_session(everything_serve) as s:
            result = await s.call_tool(
                "trigger-long-running-operation", {"duration": 1.5, "steps": 3}, progress_callback=on_progress
            )
    assert _text(result) == "Long running operation completed. Duration: 1.5 seconds, Steps: 3."
    # The shim writes a lease's notifications before its response: all 3 arrived first.
    assert [p for p, _, _ in seen] == [1, 2, 3], seen
    assert all(total == 3 for _, total, _ in seen), seen


async def test_sampling_relayed_to_the_host(everything_serve):
    asked: list[str] = []

    async def sampling(context, params: types.CreateMessageRequestParams):
        asked.append(params.messages[0].content.text)
        return types.CreateMessageResult(
            role="assistant", content=types.TextContent(type="text", text="pong from the host"), model="host-model"
        )

    with anyio.fail_after(CALL_TIMEOUT):
        async with shim_session(everything_serve, sampling_callback=sampling) as s:
            result = await s.call_tool("trigger-sampling-request", {"prompt": "ping", "maxTokens": 10})
    text = _text(result)
    assert asked == ["Resource trigger-sampling-request context: ping"], asked
    assert "pong from the host" in text and "host-model" in text, text


async def test_sampling_without_the_capability_is_refused_not_hung(everything_serve):
    """The host did not declare sampling: the server's request is answered with an error at once."""
    with anyio.fail_after(CALL_TIMEOUT):
        async with shim_session(everything_serve) as s:
            result = await s.call_tool("trigger-sampling-request", {"prompt": "ping", "maxTokens": 10})
    assert result.isError, f"sampling without the capability succeeded: {result}"
    text = " ".join(c.text for c in result.content if isinstance(c, types.TextContent))
    # server-everything reports the shim's -32601 refusal as a tool error.
    assert "-32601" in text and "did not declare the capability" in text, text
