"""MCP wiring for the post tools."""
from __future__ import annotations


def register(mcp) -> None:
    """Register this area's tools on the server."""
