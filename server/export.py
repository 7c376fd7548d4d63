"""MCP wiring for shipping a model: export_model (GGUF, Modelfile, serving commands, parity) and
push_to_hub (model card + upload; a dry run by default)."""
from __future__ import annotations

from server.common import DESTRUCTIVE, READ_ONLY_OPEN, TRAINING_STACK, add_tool

# overwrite=true replaces an existing output directory (destructive); everything runs locally
# (llama.cpp's converter and quantizer, transformers), nothing is fetched.
EXPORT = DESTRUCTIVE.model_copy(update={"idempotent_hint": True})


def register(mcp) -> None:
    """Register this area's tools on the server."""
    from tools.export import export_model
    from tools.export_hub import push_to_hub

    add_tool(mcp, export_model, EXPORT, title="Export to GGUF / Ollama / vLLM with a parity proof",
             heavy=TRAINING_STACK, progress=True)
    # dry_run (the default) reads local reports only; a real push writes to the Hub (open world).
    add_tool(mcp, push_to_hub, READ_ONLY_OPEN.model_copy(update={"read_only_hint": False}),
             title="Publish to the Hugging Face Hub (model card; dry run by default)")
