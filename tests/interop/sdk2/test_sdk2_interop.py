"""Python SDK 2.x (`mcp.Client(url)`, mode='auto': server/discover probe, initialize fallback) through
`mcp-broker up`. The broker must settle on the modern protocol 2026-07-28 even though both backends
are driven over stdio."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import anyio
import mcp_types as types
import pytest
from mcp import Client, StdioServerParameters

from common.broker import (
    BROKER_BACKEND_CAPABILITIES,
    everything_cmd,
    raw_stdio_tools,
    run_broker,
    time_cmd,
    tool_signature,
    tools_diff,
)

pytestmark = pytest.mark.anyio

# By default the broker warms backends declaring roots+sampling+elicitation (which the proxy
# relays), and server-everything then registers 3 capability-conditional tools; a pool warmed with
# `--client-capabilities {}` matches a capability-less direct client exactly.

MODERN = "2026-07-28"
CALL_TIMEOUT = 30


def _dump(models) -> list[dict]:
    return [m.model_dump(mode="json", by_alias=True, exclude_none=True) for m in models]


def _text(result: types.CallToolResult) -> str:
    assert not result.is_error, f"tool call failed: {result}"
    texts = [c.text for c in result.content if isinstance(c, types.TextContent)]
    assert texts, f"no text content in {result}"
    return "".join(texts)


def _stdio(cmd: list[str]) -> StdioServerParameters:
    return StdioServerParameters(command=cmd[0], args=cmd[1:])


def _cmd(backend: str) -> list[str]:
    return everything_cmd() if backend.startswith("everything") else time_cmd()


@pytest.mark.parametrize("backend", ["everything", "time"])
async def test_negotiates_modern_protocol(backend, request):
    broker = request.getfixturevalue(f"{backend}_broker")
    with anyio.fail_after(CALL_TIMEOUT):
        async with Client(broker.url) as client:
            version = client.protocol_version
            discover = client.session.discover_result
            initialize = client.session.initialize_result
            # a request after negotiation must work at that version
            await client.list_tools()
    assert version == MODERN, (
        f"negotiated {version!r}, expected {MODERN!r} "
        f"(initialize fallback used: {initialize is not None}; server/discover answered: {discover is not None})"
    )
    assert discover is not None and initialize is None
    assert MODERN in discover.supported_versions
    assert discover.capabilities.tools is not None, "server/discover must advertise the tools capability"


@pytest.mark.parametrize("backend", ["everything_nocaps", "time"])
async def test_tools_list_matches_direct_stdio(backend, request):
    broker = request.getfixturevalue(f"{backend}_broker")
    with anyio.fail_after(CALL_TIMEOUT):
        async with Client(_stdio(_cmd(backend))) as direct_client:
            direct = _dump((await direct_client.list_tools()).tools)
        async with Client(broker.url) as client:
            proxied = _dump((await client.list_tools()).tools)
            assert client.protocol_version == MODERN
    assert direct, "direct stdio tools/list returned no tools"
    diff = tools_diff(tool_signature(direct), tool_signature(proxied))
    assert not diff, f"tools/list through the broker differs from direct stdio:\n{diff}"


@pytest.mark.parametrize("backend", ["everything", "time"])
async def test_tools_list_matches_direct_stdio_with_broker_capabilities(backend, request):
    """Reference client declares what the broker declares to pooled backends (roots+sampling+elicitation)."""
    broker = request.getfixturevalue(f"{backend}_broker")
    direct = await anyio.to_thread.run_sync(raw_stdio_tools, _cmd(backend), BROKER_BACKEND_CAPABILITIES)
    with anyio.fail_after(CALL_TIMEOUT):
        async with Client(broker.url) as client:
            proxied = _dump((await client.list_tools()).tools)
    diff = tools_diff(tool_signature(direct), tool_signature(proxied))
    assert not diff, f"tools/list through the broker differs from direct stdio:\n{diff}"


async def test_sampling_request_relayed_at_modern_protocol(everything_broker):
    """At 2026-07-28 a server→client request comes back as an input-required result that the
    client answers by retrying the call; the backend itself still sent sampling/createMessage."""
    asked: list[str] = []

    async def sampling(context, params: types.CreateMessageRequestParams):
        asked.append(params.messages[0].content.text)
        return types.CreateMessageResult(
            role="assistant", content=types.TextContent(type="text", text="pong from sdk2"), model="interop-model-2"
        )

    with anyio.fail_after(CALL_TIMEOUT):
        async with Client(everything_broker.url, sampling_callback=sampling) as client:
            assert client.protocol_version == MODERN
            result = await client.call_tool("trigger-sampling-request", {"prompt": "ping2", "maxTokens": 10})
    text = _text(result)
    assert asked == ["Resource trigger-sampling-request context: ping2"], asked
    assert "pong from sdk2" in text and "interop-model-2" in text, text


async def test_echo(everything_broker):
    with anyio.fail_after(CALL_TIMEOUT):
        async with Client(everything_broker.url) as client:
            result = await client.call_tool("echo", {"message": "hello from sdk 2.x ☃"})
            assert client.protocol_version == MODERN
    assert _text(result) == "Echo: hello from sdk 2.x ☃"


async def test_time_get_current_time_utc(time_broker):
    with anyio.fail_after(CALL_TIMEOUT):
        async with Client(time_broker.url) as client:
            result = await client.call_tool("get_current_time", {"timezone": "UTC"})
            assert client.protocol_version == MODERN
    payload = result.structured_content or json.loads(_text(result))
    assert payload["timezone"] == "UTC"
    when = datetime.fromisoformat(payload["datetime"])
    assert when.utcoffset().total_seconds() == 0
    assert abs((datetime.now(timezone.utc) - when).total_seconds()) < 120


async def test_progress_notifications_modern(everything_broker):
    seen: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)

    with anyio.fail_after(CALL_TIMEOUT):
        async with Client(everything_broker.url) as client:
            result = await client.call_tool(
                "trigger-long-running-operation", {"duration": 1.0, "steps": 2}, progress_callback=on_progress
            )
    assert _text(result) == "Long running operation completed. Duration: 1 seconds, Steps: 2."
    assert seen == [1, 2], f"progress notifications at 2026-07-28: {seen}"


async def test_concurrent_clients_no_crossed_responses():
    clients, calls = 8, 10
    crossed: list[str] = []
    ok = 0
    with run_broker("everything") as broker:

        async def one_client(i: int) -> None:
            nonlocal ok
            async with Client(broker.url) as client:
                assert client.protocol_version == MODERN

                async def one_call(j: int) -> None:
                    nonlocal ok
                    text = f"v2-{i}-{j}-{i * 31 + j * 17:x}"
                    got = _text(await client.call_tool("echo", {"message": text}))
                    if got == f"Echo: {text}":
                        ok += 1
                    else:
                        crossed.append(f"sent {text!r} got {got!r}")

                async with anyio.create_task_group() as tg:
                    for j in range(calls):
                        tg.start_soon(one_call, j)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in range(clients):
                    tg.start_soon(one_client, i)
    assert not crossed, crossed[:5]
    assert ok == clients * calls
