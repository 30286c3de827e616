#!/usr/bin/env bash
# Run the interop suites against `mcp-broker up`:
#   1. Python SDK 1.x + TypeScript SDK client  (target/interop/venv1, tests/interop/sdk1)
#   2. Python SDK 2.x                          (target/interop/venv2, tests/interop/sdk2)
# Needs scripts/install-test-deps.sh to have run and the binary built (cargo build); the binary is
# $MCP_BROKER_BIN or target/debug/mcp-broker. Extra arguments go to both pytest runs.
# Exits non-zero if either suite fails.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
INTEROP="$ROOT/target/interop"
cd "$ROOT"

for venv in venv1 venv2; do
  if [[ ! -x "$INTEROP/$venv/bin/pytest" ]]; then
    echo "interop: $INTEROP/$venv/bin/pytest missing: run scripts/install-test-deps.sh" >&2
    exit 2
  fi
done
BIN="${MCP_BROKER_BIN:-$ROOT/target/debug/mcp-broker}"
if [[ -z "${MCP_INTEROP_STANDIN:-}" && ! -x "$BIN" ]]; then
  echo "interop: broker binary $BIN missing: cargo build (or set MCP_BROKER_BIN)" >&2
  exit 2
fi

status=0
echo "== interop: Python SDK 1.x + TypeScript SDK ($("$INTEROP/venv1/bin/python" -c 'from importlib.metadata import version; print("mcp", version("mcp"))'))"
"$INTEROP/venv1/bin/pytest" -q -c tests/interop/pytest.ini --rootdir tests/interop tests/interop/sdk1 "$@" || status=1
echo "== interop: Python SDK 2.x ($("$INTEROP/venv2/bin/python" -c 'from importlib.metadata import version; print("mcp", version("mcp"))'))"
"$INTEROP/venv2/bin/pytest" -q -c tests/interop/pytest.ini --rootdir tests/interop tests/interop/sdk2 "$@" || status=1

if [[ $status -ne 0 ]]; then
  echo "interop: FAILED" >&2
fi
exit $status
