"""pytest fixtures shared by both suites; pulled in by each suite's conftest with `from common.fixtures import *`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from common.broker import TOUCHED, Broker, run_broker

__all__ = ["anyio_backend", "everything_broker", "everything_nocaps_broker", "time_broker", "pytest_runtest_setup", "pytest_runtest_makereport"]


def pytest_runtest_setup(item) -> None:
    # Forget brokers that have exited; module-scoped ones still running stay listed.
    TOUCHED[:] = [b for b in TOUCHED if b.proc.poll() is None]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and TOUCHED:
        for b in TOUCHED:
            report.sections.append((f"mcp-broker log ({b.base})", b.describe()))


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def everything_broker() -> Iterator[Broker]:
    """`mcp-broker up -- node server-everything stdio` with default pool settings."""
    with run_broker("everything") as broker:
        yield broker


@pytest.fixture(scope="module")
def everything_nocaps_broker() -> Iterator[Broker]:
    """server-everything warmed declaring no client capabilities
    (`--client-capabilities {}`), as a capability-less direct client does."""
    with run_broker("everything", extra_args=["--client-capabilities", "{}"]) as broker:
        yield broker


@pytest.fixture(scope="module")
def time_broker() -> Iterator[Broker]:
    """`mcp-broker up -- mcp-server-time` with default pool settings."""
    with run_broker("time") as broker:
        yield broker
