"""A stdio MCP server built on the official Python SDK 2.x (`mcp.server.mcpserver.MCPServer`) whose
`confirm` tool asks the client a question through the SDK's own multi-round-trip machinery
(MCP 2026-07-28, "MRTR": `InputRequiredResult` + client retry with `inputResponses`/`requestState`).

Why this server exists
----------------------
The in-repo fixture (`src/bin/mcp-fixture.rs`) answers a retry no matter which process receives it:
its `requestState` is a constant, so it cannot catch a broker that sends the retry of a multi-round
call to a *different* pooled process. A real SDK 2.x server is not so forgiving: `MCPServer` installs
`RequestStateBoundary(RequestStateSecurity.ephemeral())` by default, i.e. every `requestState` it
hands out is AES-256-GCM sealed under a key drawn from `os.urandom(32)` at process start. A retry that
lands on another process of the same pool is refused with JSON-RPC -32602
"Invalid or expired requestState" (the real reason, "unknown key", only goes to that server's
stderr log). With `mcp-broker up --min-idle 3 --max 3` and no retry affinity, about half of the
retries land on a process that did not issue their state (measured: 38-71% of calls
succeeded across both client eras), so a load test fails reliably.

Nothing here mints or inspects `requestState`: the tool uses the SDK's resolver dependency injection
(`Annotated[..., Resolve(fn)]` with `fn` returning an `Elicit(message, schema)` marker), which is
what an SDK 2.x user writes. The SDK then picks the transport per request:

- at protocol >= 2026-07-28 (a stateless request, which is what `mcp-broker` sends after warming the
  process with `server/discover`) it returns `InputRequiredResult(input_requests={<key>:
  elicitation/create ...}, request_state=<SDK state>)`; `RequestStateBoundary` seals that state on
  the way out and verifies/unseals it on the retry before the tool runs again;
- at handshake-era protocols it sends a standalone `elicitation/create` request mid-call instead.

(`await ctx.elicit(...)` is *not* that path: at 2026-07-28 it raises "Cannot send
'elicitation/create': this transport context has no back-channel for server-initiated requests".)

Tools:
- `confirm(item: str)`: asks "Confirm <item>?" (form elicitation, one boolean field `confirm`) and
  answers `confirmed <item> by pid <pid>` / `declined <item> by pid <pid>` / `cancelled ...`.
- `pid()`: this process's pid (to count the distinct processes of a pool).

Run: `target/interop/venv2/bin/python tests/interop/servers/sdk2_mrtr_server.py` (stdio).
"""

from __future__ import annotations

import os
from typing import Annotated

import anyio
from pydantic import BaseModel, Field

from mcp.server.mcpserver import (
    AcceptedElicitation,
    DeclinedElicitation,
    Elicit,
    ElicitationResult,
    MCPServer,
    Resolve,
)

# Named explicitly: the server name is also the audience claim sealed into every requestState.
mcp = MCPServer("mcp-broker-interop-sdk2-mrtr")

# Simulated work per round (seconds), see `ask_confirmation`.
WORK_SECONDS = float(os.environ.get("MRTR_SERVER_WORK_SECONDS", "0.02"))


class Confirmation(BaseModel):
    """The elicitation form: a single required boolean."""

    confirm: bool = Field(description="Go ahead?")


async def ask_confirmation(item: str) -> Elicit[Confirmation]:
    """Resolver: always asks. `item` is taken from the tool's own arguments by name.

    The SDK re-runs resolver bodies on every round but asks each question once: on the retry the
    client's answer (accepted only for the rendering it was shown, which the sealed state records)
    is injected instead of asking again.

    The short sleep stands in for the lookup a real tool would do before asking. Without it a round
    takes ~1 ms, the Python clients cannot keep more than one process busy, and the broker may serve
    a whole load test from a single pool member (seen: 48/48 calls on one pid), which would prove
    nothing about affinity."""
    await anyio.sleep(WORK_SECONDS)
    return Elicit(f"Confirm {item}?", Confirmation)


@mcp.tool(description="Asks the client to confirm `item` (elicitation via the SDK's multi-round-trip), then reports which process answered.")
def confirm(
    item: str,
    answer: Annotated[ElicitationResult[Confirmation], Resolve(ask_confirmation)],
) -> str:
    # `answer` is not part of the tool's input schema: the SDK fills it from the elicitation outcome.
    pid = os.getpid()
    if isinstance(answer, AcceptedElicitation):
        verdict = "confirmed" if answer.data.confirm else "declined"
    elif isinstance(answer, DeclinedElicitation):
        verdict = "declined"
    else:
        verdict = "cancelled"
    return f"{verdict} {item} by pid {pid}"


@mcp.tool(description="This server process's pid.")
def pid() -> str:
    return str(os.getpid())


if __name__ == "__main__":
    mcp.run("stdio")
