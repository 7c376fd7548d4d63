"""MCP wiring for the post-training tools: merge_adapter, evaluate, generate."""
from __future__ import annotations

from server.common import DESTRUCTIVE, READ_ONLY, TRAINING_STACK, WRITES_OPEN, add_tool

# overwrite=true replaces an existing output directory (destructive), and a base model named by
# a hub id in adapter_config.json is loaded from the hub (open world).
MERGE = DESTRUCTIVE.model_copy(update={"open_world_hint": True})


def register(mcp) -> None:
    """Register this area's tools on the server."""
    from tools.evaluate import evaluate
    from tools.generate import generate
    from tools.merge import merge_adapter

    add_tool(mcp, merge_adapter, MERGE, title="Merge a LoRA adapter into its base model",
             heavy=TRAINING_STACK, progress=True)
    # Writes results in the workspace; may reach a served endpoint (base_url) or download hub
    # datasets (tasks): open world.
    add_tool(mcp, evaluate, WRITES_OPEN, title="Evaluate with lm-evaluation-harness",
             heavy=TRAINING_STACK, progress=True)
    # Reads local models only and writes nothing; the same seed gives the same replies.
    add_tool(mcp, generate, READ_ONLY, title="Generate replies side by side (spot-check a model)",
             heavy=TRAINING_STACK)
