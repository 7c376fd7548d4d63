"""MCP wiring for the recipe tools: generate_recipe, validate_recipe, spectrum_scan."""
from __future__ import annotations

from server.common import TRAINING_STACK, WRITES, WRITES_OPEN, add_tool


def register(mcp) -> None:
    """Register this area's tools on the server."""
    from tools.recipes import generate_recipe, validate_recipe
    from tools.spectrum import spectrum_scan

    # Writes the recipe and its accelerate config; may read a hub config.json for model facts.
    add_tool(mcp, generate_recipe, WRITES_OPEN, title="Generate a TRL recipe", heavy=TRAINING_STACK)
    # Writes only when write_migrated is given; otherwise it only reads. Hub config for memory.
    add_tool(mcp, validate_recipe, WRITES_OPEN, title="Validate and migrate a TRL recipe",
             heavy=TRAINING_STACK)
    # Reads local safetensors (or the local hub cache), writes the Spectrum YAML and scores.
    add_tool(mcp, spectrum_scan, WRITES, title="Spectrum layer selection (SNR scan)", progress=True)
