"""Python SDK 1.x suite (run with target/interop/venv1/bin/pytest)."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.fixtures import *  # noqa: E402,F401,F403

try:
    from importlib.metadata import version as _version

    import mcp  # noqa: F401
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client
    from mcp.client.streamable_http import streamablehttp_client
except ImportError as e:  # pragma: no cover - fail loudly, never skip
    raise RuntimeError(f"Python MCP SDK 1.x not importable ({e}); run scripts/install-test-deps.sh") from e

if not _version("mcp").startswith("1."):
    raise RuntimeError(f"tests/interop/sdk1 must run with the SDK 1.x venv (target/interop/venv1), found mcp {_version('mcp')}")


@asynccontextmanager
async def http_session(url: str, **session_kwargs) -> AsyncIterator[ClientSession]:
    """An initialized 1.x ClientSession over Streamable HTTP (kwargs go to ClientSession, e.g. sampling_callback)."""
    async with streamablehttp_client(url, timeout=30, sse_read_timeout=60) as (read, write, _get_sid):
        async with ClientSession(read, write, **session_kwargs) as session:
            session.interop_init = await session.initialize()  # type: ignore[attr-defined]
            yield session


@asynccontextmanager
async def stdio_session(cmd: list[str]) -> AsyncIterator[ClientSession]:
    """An initialized 1.x ClientSession over a direct stdio connection to `cmd`."""
    params = StdioServerParameters(command=cmd[0], args=cmd[1:])
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            session.interop_init = await session.initialize()  # type: ignore[attr-defined]
            # server-everything sends notifications/tools/list_changed right after `initialized`;
            # a ping round-trip drains it, so it cannot race the session's shutdown (SDK 1.x raises
            # BrokenResourceError from stdio_client when a message lands after the session closed).
            await session.send_ping()
            yield session


@pytest.fixture
def connect_http():
    return http_session


@pytest.fixture
def connect_stdio():
    return stdio_session
