"""MCP wiring for the planning tools: hardware, model facts, memory estimate, method choice."""
from __future__ import annotations

from server.common import READ_ONLY, READ_ONLY_OPEN, add_tool


def register(mcp) -> None:
    """Register this area's tools on the server."""
    from tools.hardware import detect_hardware
    from tools.memory import estimate_memory
    from tools.models import get_model_facts
    from tools.recommend import recommend_method

    add_tool(mcp, detect_hardware, READ_ONLY, title="Detect hardware")
    # The next three may read a hub config.json when online: open world.
    add_tool(mcp, get_model_facts, READ_ONLY_OPEN, title="Model architecture facts")
    add_tool(mcp, estimate_memory, READ_ONLY_OPEN, title="Estimate training memory")
    add_tool(mcp, recommend_method, READ_ONLY_OPEN, title="Recommend a fine-tuning method")
