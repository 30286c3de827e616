"""Python SDK 2.x suite (run with target/interop/venv2/bin/pytest)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.fixtures import *  # noqa: E402,F401,F403

try:
    from importlib.metadata import version as _version

    from mcp import Client, StdioServerParameters  # noqa: F401
except ImportError as e:  # pragma: no cover - fail loudly, never skip
    raise RuntimeError(f"Python MCP SDK 2.x not importable ({e}); run scripts/install-test-deps.sh") from e

if not _version("mcp").startswith("2."):
    raise RuntimeError(f"tests/interop/sdk2 must run with the SDK 2.x venv (target/interop/venv2), found mcp {_version('mcp')}")
