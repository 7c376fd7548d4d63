"""MCP wiring for the runs tools."""
from __future__ import annotations


def register(mcp) -> None:
    """Register this area's tools on the server."""
