"""pytest fixtures shared by both suites; pulled in by each suite's conftest with `from common.fixtures import *`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from common.broker import Broker, run_broker

__all__ = ["anyio_backend", "everything_broker", "time_broker"]


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def everything_broker() -> Iterator[Broker]:
    """`mcp-broker up -- node server-everything stdio` with default pool settings."""
    with run_broker("everything") as broker:
        yield broker


@pytest.fixture(scope="module")
def time_broker() -> Iterator[Broker]:
    """`mcp-broker up -- mcp-server-time` with default pool settings."""
    with run_broker("time") as broker:
        yield broker
