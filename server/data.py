"""MCP wiring for the data tools: inspect and convert datasets, verify the loss masking."""
from __future__ import annotations

from server.common import READ_ONLY_OPEN, TRAINING_STACK, WRITES, add_tool


def register(mcp) -> None:
    """Register this area's tools on the server. tools.data and tools.masking import no
    datasets/transformers/trl at module level, so registering stays fast."""
    from tools.data import convert_dataset, inspect_dataset
    from tools.masking import verify_masking

    # May read a hub dataset when online: open world.
    add_tool(mcp, inspect_dataset, READ_ONLY_OPEN, title="Inspect a dataset")
    add_tool(mcp, convert_dataset, WRITES, title="Convert a dataset to TRL JSONL", progress=True)
    # Saves its report under reports/masking/ (launch_training looks it up): writes.
    add_tool(mcp, verify_masking, WRITES, title="Verify loss masking with TRL's own preparation",
             heavy=TRAINING_STACK, progress=True)
