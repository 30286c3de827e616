"""Python SDK 1.x (handshake era: initialize + Mcp-Session-Id) through `mcp-broker up`."""

from __future__ import annotations

import json
import subprocess
from datetime import datetime, timezone

import anyio
import pytest
from mcp import types

from common.broker import (
    BROKER_BACKEND_CAPABILITIES,
    ts_script,
    everything_cmd,
    node_bin,
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

CALL_TIMEOUT = 30


def _dump(models) -> list[dict]:
    return [m.model_dump(mode="json", by_alias=True, exclude_none=True) for m in models]


def _text(result: types.CallToolResult) -> str:
    assert not result.isError, f"tool call failed: {result}"
    texts = [c.text for c in result.content if isinstance(c, types.TextContent)]
    assert texts, f"no text content in {result}"
    return "".join(texts)


async def _list_tools_direct(connect_stdio, cmd) -> list[dict]:
    with anyio.fail_after(CALL_TIMEOUT):
        async with connect_stdio(cmd) as s:
            return _dump((await s.list_tools()).tools)


# --- initialize -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["everything", "time"])
async def test_initialize_result_matches_direct_stdio(backend, request, connect_http, connect_stdio):
    broker = request.getfixturevalue(f"{backend}_broker")
    cmd = everything_cmd() if backend.startswith("everything") else time_cmd()
    with anyio.fail_after(CALL_TIMEOUT):
        async with connect_stdio(cmd) as d:
            direct = d.interop_init
        async with connect_http(broker.url) as s:
            proxied = s.interop_init
    assert proxied.protocolVersion == "2025-11-25"
    assert proxied.serverInfo.name == direct.serverInfo.name
    assert proxied.serverInfo.version == direct.serverInfo.version
    assert proxied.instructions == direct.instructions
    pc = proxied.capabilities.model_dump(mode="json", exclude_none=True)
    dc = direct.capabilities.model_dump(mode="json", exclude_none=True)
    for feature in ("tools", "resources", "prompts"):
        assert (feature in pc) == (feature in dc), f"capability {feature!r}: proxied {pc} vs direct {dc}"


# --- tools/list equality ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["everything_nocaps", "time"])
async def test_tools_list_matches_direct_stdio(backend, request, connect_http, connect_stdio):
    broker = request.getfixturevalue(f"{backend}_broker")
    cmd = everything_cmd() if backend.startswith("everything") else time_cmd()
    direct = await _list_tools_direct(connect_stdio, cmd)
    with anyio.fail_after(CALL_TIMEOUT):
        async with connect_http(broker.url) as s:
            proxied = _dump((await s.list_tools()).tools)
    assert direct, "direct stdio tools/list returned no tools"
    diff = tools_diff(tool_signature(direct), tool_signature(proxied))
    assert not diff, f"tools/list through the broker differs from direct stdio:\n{diff}"
    # A handshake-era proxy should pass every field through, not just the three above.
    assert proxied == direct


@pytest.mark.parametrize("backend", ["everything", "time"])
async def test_tools_list_matches_direct_stdio_with_broker_capabilities(backend, request, connect_http):
    """Same comparison, but the direct client declares what the broker declares to its pooled
    backends (roots+sampling+elicitation), so capability-conditional tools are on both sides."""
    broker = request.getfixturevalue(f"{backend}_broker")
    cmd = everything_cmd() if backend.startswith("everything") else time_cmd()
    direct = await anyio.to_thread.run_sync(raw_stdio_tools, cmd, BROKER_BACKEND_CAPABILITIES)
    with anyio.fail_after(CALL_TIMEOUT):
        async with connect_http(broker.url) as s:
            proxied = _dump((await s.list_tools()).tools)
    diff = tools_diff(tool_signature(direct), tool_signature(proxied))
    assert not diff, f"tools/list through the broker differs from direct stdio:\n{diff}"


# --- server→client requests ---------------------------------------------------------------------


async def test_sampling_request_relayed_to_client(everything_broker, connect_http):
    asked: list[str] = []

    async def sampling(context, params: types.CreateMessageRequestParams):
        asked.append(params.messages[0].content.text)
        return types.CreateMessageResult(
            role="assistant", content=types.TextContent(type="text", text="pong from interop"), model="interop-model"
        )

    with anyio.fail_after(CALL_TIMEOUT):
        async with connect_http(everything_broker.url, sampling_callback=sampling) as s:
            result = await s.call_tool("trigger-sampling-request", {"prompt": "ping", "maxTokens": 10})
    text = _text(result)
    assert asked == ["Resource trigger-sampling-request context: ping"], asked
    assert "pong from interop" in text and "interop-model" in text, text


async def test_sampling_request_without_client_capability_fails_fast(everything_broker, connect_http):
    """A client that did not declare sampling still sees the tool (the backend was initialized by
    the broker), but calling it must end in an error, not a hang."""
    with anyio.fail_after(20):
        async with connect_http(everything_broker.url) as s:
            try:
                result = await s.call_tool("trigger-sampling-request", {"prompt": "ping", "maxTokens": 10})
            except Exception:  # McpError is fine
                pass
            else:
                assert result.isError, f"sampling without the capability succeeded: {result}"
            assert _text(await s.call_tool("echo", {"message": "still alive"})) == "Echo: still alive"


# --- tool calls ---------------------------------------------------------------------------------


async def test_echo(everything_broker, connect_http):
    with anyio.fail_after(CALL_TIMEOUT):
        async with connect_http(everything_broker.url) as s:
            result = await s.call_tool("echo", {"message": "hello through the broker ☃"})
    assert _text(result) == "Echo: hello through the broker ☃"


async def test_time_get_current_time_utc(time_broker, connect_http):
    with anyio.fail_after(CALL_TIMEOUT):
        async with connect_http(time_broker.url) as s:
            init_tools = {t.name for t in (await s.list_tools()).tools}
            assert "get_current_time" in init_tools
            result = await s.call_tool("get_current_time", {"timezone": "UTC"})
    payload = result.structuredContent or json.loads(_text(result))
    assert payload["timezone"] == "UTC"
    when = datetime.fromisoformat(payload["datetime"])
    assert when.utcoffset().total_seconds() == 0
    skew = abs((datetime.now(timezone.utc) - when).total_seconds())
    assert skew < 120, f"server time {when} is {skew}s away from now"


async def test_unknown_tool_is_an_error_not_a_hang(everything_broker, connect_http):
    with anyio.fail_after(CALL_TIMEOUT):
        async with connect_http(everything_broker.url) as s:
            try:
                result = await s.call_tool("no-such-tool-xyz", {})
            except Exception as e:  # McpError: a JSON-RPC error is an acceptable answer too
                assert "no-such-tool-xyz" in str(e) or "not found" in str(e).lower(), e
            else:
                assert result.isError, f"unknown tool answered as success: {result}"
            # the session must still work afterwards
            assert _text(await s.call_tool("echo", {"message": "after-error"})) == "Echo: after-error"


# --- resources and prompts ----------------------------------------------------------------------


async def test_resources_list_and_read(everything_broker, connect_http, connect_stdio):
    with anyio.fail_after(CALL_TIMEOUT):
        async with connect_stdio(everything_cmd()) as d:
            direct = (await d.list_resources()).resources
            assert direct, "server-everything lists no resources directly"
            uri = direct[0].uri
            direct_read = await d.read_resource(uri)
        async with connect_http(everything_broker.url) as s:
            proxied = (await s.list_resources()).resources
            proxied_read = await s.read_resource(uri)
    assert _dump(proxied) == _dump(direct)
    assert proxied_read.contents, f"empty read of {uri}"
    assert str(proxied_read.contents[0].uri) == str(uri)
    assert _dump(proxied_read.contents) == _dump(direct_read.contents)


async def test_prompts_list_and_get(everything_broker, connect_http):
    with anyio.fail_after(CALL_TIMEOUT):
        async with connect_http(everything_broker.url) as s:
            prompts = {p.name: p for p in (await s.list_prompts()).prompts}
            assert {"simple-prompt", "args-prompt"} <= set(prompts), sorted(prompts)
            args = {a.name: a.required for a in prompts["args-prompt"].arguments or []}
            assert args.get("city") is True, args
            simple = await s.get_prompt("simple-prompt")
            with_args = await s.get_prompt("args-prompt", {"city": "Lisbon", "state": "Lx"})
    assert simple.messages[0].content.text == "This is a simple prompt without arguments."
    assert with_args.messages[0].role == "user"
    assert with_args.messages[0].content.text == "What's weather in Lisbon, Lx?"


# --- progress -----------------------------------------------------------------------------------


async def test_progress_notifications(everything_broker, connect_http):
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    with anyio.fail_after(CALL_TIMEOUT):
        async with connect_http(everything_broker.url) as s:
            names = {t.name for t in (await s.list_tools()).tools}
            assert "trigger-long-running-operation" in names, sorted(names)
            result = await s.call_tool(
                "trigger-long-running-operation", {"duration": 1.5, "steps": 3}, progress_callback=on_progress
            )
    assert _text(result) == "Long running operation completed. Duration: 1.5 seconds, Steps: 3."
    assert len(seen) >= 1, "no progress notification reached the client"
    assert all(total == 3 for _, total, _ in seen), seen
    assert [p for p, _, _ in seen] == sorted(p for p, _, _ in seen), f"progress out of order: {seen}"
    # Notifications on the request's own SSE stream arrive before the response, so all 3 must be there.
    assert [p for p, _, _ in seen] == [1, 2, 3], seen


# --- concurrency --------------------------------------------------------------------------------

SESSIONS = 20
CALLS = 20


@pytest.mark.parametrize(
    "extra_args",
    [
        pytest.param([], id="defaults"),
        pytest.param(["--mode", "shared", "--min-idle", "1", "--max", "2"], id="shared-max2"),
        pytest.param(["--mode", "sticky"], id="sticky"),
        pytest.param(["--mode", "exclusive", "--min-idle", "2", "--max", "4"], id="exclusive-max4"),
    ],
)
async def test_concurrent_sessions_no_crossed_responses(extra_args, connect_http):
    """20 sessions at once, each making 20 echo calls one after another (20 requests in flight)."""
    with run_broker("everything", extra_args=extra_args) as broker:
        crossed: list[str] = []
        ok = 0

        async def one_session(i: int) -> None:
            nonlocal ok
            async with connect_http(broker.url) as s:
                for j in range(CALLS):
                    text = f"s{i:02d}-c{j:02d}-{i * 7919 + j * 104729:x}"
                    got = _text(await s.call_tool("echo", {"message": text}))
                    if got != f"Echo: {text}":
                        crossed.append(f"sent {text!r} got {got!r}")
                    else:
                        ok += 1

        with anyio.fail_after(90):
            async with anyio.create_task_group() as tg:
                for i in range(SESSIONS):
                    tg.start_soon(one_session, i)
    assert not crossed, f"{len(crossed)} crossed responses, e.g. {crossed[:5]}"
    assert ok == SESSIONS * CALLS


async def test_pipelined_calls_in_one_session(everything_broker, connect_http):
    """50 echo calls in flight at once on one session (well under the default --queue-limit 256):
    each POST's answer must be its own. SDK 1.x turns any non-2xx answer other than 404 into an
    exception that ends the whole session, so the broker must queue rather than refuse here."""
    answers: dict[int, str] = {}
    with anyio.fail_after(60):
        async with connect_http(everything_broker.url) as s:

            async def one_call(j: int) -> None:
                answers[j] = _text(await s.call_tool("echo", {"message": f"pipelined-{j}"}))

            async with anyio.create_task_group() as tg:
                for j in range(50):
                    tg.start_soon(one_call, j)
    wrong = {j: a for j, a in answers.items() if a != f"Echo: pipelined-{j}"}
    assert len(answers) == 50 and not wrong, wrong


# --- TypeScript SDK client ----------------------------------------------------------------------


def test_typescript_sdk_client(everything_broker):
    script = ts_script("client.mjs")
    proc = subprocess.run(
        [node_bin(), str(script), everything_broker.url], capture_output=True, text=True, timeout=60
    )
    detail = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}\n{everything_broker.describe()}"
    assert proc.returncode == 0, detail
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["ok"] is True, detail
    assert "echo" in summary["tools"], detail
    assert summary["echo"] == "Echo: hello from the TypeScript SDK", detail
    assert summary["concurrent"] == {"calls": 10, "correct": 10}, detail
    assert summary["failures"] == [], detail
    assert summary["protocolVersion"] == "2025-11-25", detail  # TS SDK 1.x is handshake-era
    assert summary["sessionId"], f"no Mcp-Session-Id issued to the TS client\n{detail}"
    assert summary["serverInfo"]["name"] == "mcp-servers/everything", detail
