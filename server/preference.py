"""MCP wiring for the preference (DPO) tools: convert preference data, prove what DPO scores,
write a DPO recipe. Training itself starts with launch_training (python -m tools.train_dpo)."""
from __future__ import annotations

from server.common import TRAINING_STACK, WRITES, WRITES_OPEN, add_tool


def register(mcp) -> None:
    """Register this area's tools. tools.preference and tools.train_dpo import no
    datasets/transformers/trl at module level, so registering stays fast."""
    from tools.preference import convert_preference, verify_preference
    from tools.train_dpo import generate_dpo_recipe

    # Reads a hub dataset when online: open world.
    add_tool(mcp, convert_preference, WRITES_OPEN, title="Convert preference data (DPO pairs)")
    # Saves its report under reports/preference/ (the DPO launch gate looks it up): writes.
    add_tool(mcp, verify_preference, WRITES, title="Verify what DPO scores with TRL's own preparation",
             heavy=TRAINING_STACK, progress=True)
    add_tool(mcp, generate_dpo_recipe, WRITES, title="Write a DPO recipe", heavy=TRAINING_STACK)
