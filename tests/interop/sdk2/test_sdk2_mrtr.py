"""Multi-round-trip (MRTR) affinity through a pool of *real* SDK 2.x servers.

`tests/interop/servers/sdk2_mrtr_server.py` is an `MCPServer` (Python SDK 2.x) whose `confirm` tool
elicits through the SDK's own 2026-07-28 machinery: the first `tools/call` answers
`InputRequiredResult` with a `requestState` the SDK seals under a key generated at process start,
and only the process that issued it accepts the retry; any other process of the pool answers -32602
"Invalid or expired requestState". The in-repo fixture's constant `requestState` cannot catch a
broker that sends the retry to another process; this server can.

The pool is `mcp-broker up --min-idle 3 --max 3`, so a retry routed without affinity lands on
another process most of the time. Two client eras:

- modern (`Client(url)`, 2026-07-28): the client itself receives `InputRequiredResult`, asks its
  elicitation callback and retries `tools/call` with `inputResponses` + the echoed `requestState`;
- legacy (`Client(url, mode="legacy")`, initialize handshake): the proxy bridges, asking
  `elicitation/create` on the request's SSE stream and retrying the call against the pool itself.

Every call is run to completion (no first-failure abort) and the outcome counted, so a failing run
reports the success rate: the assertion message carries `mrtr: era=<era> ok=N failed=M` plus sample
errors. `MRTR_REPORT=1` additionally prints that line (uncaptured) whether or not the test passes:

    MRTR_REPORT=1 target/interop/venv2/bin/pytest -q -c tests/interop/pytest.ini \
        --rootdir tests/interop tests/interop/sdk2/test_sdk2_mrtr.py

`MRTR_CLIENTS` / `MRTR_CALLS` (default 8 x 6) size the load.
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import anyio
import httpx
import mcp_types as types
import pytest
from mcp import Client, MCPError

from common.broker import INTEROP, REPO, Broker, HarnessError, run_broker

pytestmark = pytest.mark.anyio

MODERN = "2026-07-28"
POOL_SIZE = 3
CLIENTS = int(os.environ.get("MRTR_CLIENTS", "8"))
CALLS = int(os.environ.get("MRTR_CALLS", "6"))
LOAD_TIMEOUT = 75  # below pytest.ini's 90 s per-test timeout
POOL_TIMEOUT = 30
REPORT = os.environ.get("MRTR_REPORT", "") not in ("", "0")

SERVER = REPO / "tests" / "interop" / "servers" / "sdk2_mrtr_server.py"
VENV2_PYTHON = INTEROP / "venv2" / "bin" / "python"

CONFIRMED = re.compile(r"^confirmed (?P<item>\S+) by pid (?P<pid>\d+)$")
IDLE = re.compile(r'^mcp_broker_processes\{[^}]*state="idle"[^}]*\}\s+(\d+(?:\.\d+)?)\s*$', re.M)


def mrtr_server_cmd() -> list[str]:
    """stdio command for the SDK 2.x MRTR server, run by the venv2 interpreter (which has `mcp` 2.x)."""
    for path, what in ((VENV2_PYTHON, "venv2 python (scripts/install-test-deps.sh)"), (SERVER, "MRTR server")):
        if not path.exists():
            raise HarnessError(f"{what} missing: {path}")
    return [str(VENV2_PYTHON), str(SERVER)]


@pytest.fixture(scope="module")
def mrtr_broker() -> Iterator[Broker]:
    """`mcp-broker up --min-idle 3 --max 3 -- <venv2 python> sdk2_mrtr_server.py`.

    `run_broker` already takes a literal command, so the common harness needs no change."""
    with run_broker(mrtr_server_cmd(), extra_args=["--min-idle", str(POOL_SIZE), "--max", str(POOL_SIZE)]) as broker:
        yield broker


def _idle_processes(broker: Broker) -> int | None:
    try:
        r = httpx.get(f"{broker.base}/metrics", timeout=2.0)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    found = IDLE.findall(r.text)
    return int(sum(float(v) for v in found)) if found else None


def wait_for_full_pool(broker: Broker) -> None:
    """`/readyz` turns 200 with the first warm process; the load needs all three idle."""
    deadline = time.monotonic() + POOL_TIMEOUT
    idle = None
    while time.monotonic() < deadline:
        if broker.proc.poll() is not None:
            raise HarnessError(f"broker exited with {broker.proc.returncode}\n{broker.describe()}")
        idle = _idle_processes(broker)
        if idle == POOL_SIZE:
            return
        time.sleep(0.2)
    raise HarnessError(
        f"pool did not reach {POOL_SIZE} idle processes within {POOL_TIMEOUT}s "
        f"(last mcp_broker_processes{{state=\"idle\"}}: {idle})\n{broker.describe()}"
    )


@dataclass
class Tally:
    era: str
    ok: int = 0
    pids: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    asked: list[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    def line(self) -> str:
        return f"mrtr: era={self.era} ok={self.ok} failed={self.failed} pids={dict(self.pids)}"

    def details(self) -> str:
        top = "\n".join(f"  {n} x {e}" for e, n in self.errors.most_common(5))
        return f"{self.line()}\nerrors:\n{top}" if top else self.line()


async def _accept(context, params: types.ElicitRequestParams) -> types.ElicitResult:
    return types.ElicitResult(action="accept", content={"confirm": True})


async def run_load(broker: Broker, era: str, mode: str) -> Tally:
    """CLIENTS concurrent clients x CALLS concurrent `confirm` calls; every outcome is counted."""
    tally = Tally(era)

    async def elicit(context, params: types.ElicitRequestParams) -> types.ElicitResult:
        tally.asked.append(params.message)
        return await _accept(context, params)

    async def one_client(i: int) -> None:
        async with Client(broker.url, mode=mode, elicitation_callback=elicit) as client:
            if mode == "auto":
                assert client.protocol_version == MODERN, f"negotiated {client.protocol_version!r}"
            else:
                assert client.protocol_version != MODERN, f"mode=legacy negotiated {client.protocol_version!r}"

            async def one_call(j: int) -> None:
                item = f"{era}-{i}-{j}"
                try:
                    result = await client.call_tool("confirm", {"item": item})
                except MCPError as e:
                    tally.errors[f"MCPError {e.code}: {e.message}"] += 1
                    return
                except Exception as e:  # noqa: BLE001 - counted, reported by the assertion
                    tally.errors[f"{type(e).__name__}: {e}"] += 1
                    return
                texts = "".join(c.text for c in result.content if isinstance(c, types.TextContent))
                m = CONFIRMED.match(texts)
                if result.is_error or m is None or m["item"] != item:
                    tally.errors[f"unexpected result for {item}: is_error={result.is_error} {texts!r}"] += 1
                    return
                tally.ok += 1
                tally.pids[int(m["pid"])] += 1

            async with anyio.create_task_group() as tg:
                for j in range(CALLS):
                    tg.start_soon(one_call, j)

    with anyio.fail_after(LOAD_TIMEOUT):
        async with anyio.create_task_group() as tg:
            for i in range(CLIENTS):
                tg.start_soon(one_client, i)
    return tally


def _check(tally: Tally, capsys) -> None:
    if REPORT:
        with capsys.disabled():
            print(f"\n{tally.details()}")
    else:
        print(tally.details())  # shown with the failure's captured stdout
    total = CLIENTS * CALLS
    assert tally.ok + tally.failed == total, tally.details()
    # Each successful call must have gone through the client's elicitation callback (a call answered
    # without asking would mean the server never used its multi-round-trip path).
    assert len(tally.asked) >= tally.ok, tally.details()
    assert all(re.fullmatch(rf"Confirm {tally.era}-\d+-\d+\?", q) for q in tally.asked), tally.asked[:5]
    assert tally.failed == 0, f"{tally.failed}/{total} multi-round-trip calls failed\n{tally.details()}"
    assert len(tally.pids) > 1, f"all calls served by one process: the pool of {POOL_SIZE} was not exercised\n{tally.details()}"


async def test_mrtr_modern_client_concurrent(mrtr_broker, capsys):
    """2026-07-28 client: the SDK's own InputRequiredResult retry loop, 8 x 6 concurrent calls."""
    await anyio.to_thread.run_sync(wait_for_full_pool, mrtr_broker)
    tally = await run_load(mrtr_broker, "modern", "auto")
    _check(tally, capsys)


async def test_mrtr_legacy_client_concurrent(mrtr_broker, capsys):
    """Handshake-era client: the proxy asks over SSE and retries with the server's requestState."""
    await anyio.to_thread.run_sync(wait_for_full_pool, mrtr_broker)
    tally = await run_load(mrtr_broker, "legacy", "legacy")
    _check(tally, capsys)
