"""MCP wiring for the data tools."""
from __future__ import annotations


def register(mcp) -> None:
    """Register this area's tools on the server."""
