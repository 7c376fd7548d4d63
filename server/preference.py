"""MCP wiring for the preference / RL tools (DPO, KTO, ORPO, GRPO): convert the data, prove what
the trainer scores, write the recipe. Training starts with launch_training (python -m
tools.train_dpo)."""
from __future__ import annotations

from server.common import TRAINING_STACK, WRITES, WRITES_OPEN, add_tool


def register(mcp) -> None:
    """Register this area's tools. tools.preference and tools.preference_recipe import no
    datasets/transformers/trl at module level, so registering stays fast."""
    from tools.preference import convert_preference, verify_preference
    from tools.preference_recipe import generate_dpo_recipe

    # Reads a hub dataset when online: open world.
    add_tool(mcp, convert_preference, WRITES_OPEN, title="Convert preference / RL data")
    # Saves its report under reports/preference/ (the DPO launch gate looks it up): writes.
    add_tool(mcp, verify_preference, WRITES, title="Verify what the preference trainer scores",
             heavy=TRAINING_STACK, progress=True)
    add_tool(mcp, generate_dpo_recipe, WRITES, title="Write a DPO/KTO/ORPO/GRPO recipe", heavy=TRAINING_STACK)
