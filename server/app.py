"""The MCP server: tools, resources (references/, recipes/, SKILL.md) and instructions.

Only wiring lives here; the logic is in tools/. Importing this module imports no torch.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.resources import FileResource, FunctionResource

from tools import __version__, chat_templates

ROOT = Path(__file__).resolve().parent.parent

INSTRUCTIONS = """\
Fine-tune open LLMs with TRL/PEFT, with proof at each step. Workflow:
1 detect_hardware -> 2 recommend_method (memory evidence; estimate_memory for what-ifs)
-> 3 inspect_dataset, convert_dataset (prefer conversational prompt/completion)
-> 4 verify_masking (must pass before training) -> 5 generate_recipe / validate_recipe
(spectrum_scan for Spectrum) -> 6 launch_training, then poll training_status; stop_training,
list_runs -> 7 merge_adapter (LoRA/QLoRA) -> 8 evaluate (base vs fine-tuned).
All paths are inside the server's workspace. Training runs in the background: launch returns a
run id at once; poll status every 30-60 s. Read skill://SKILL.md and references://*.md for the
decision tree, formats, masking, recipes, distributed training and troubleshooting."""

# One module per area; each has register(mcp). Kept as names so a missing area fails loudly.
TOOL_MODULES = ["server.planning", "server.data", "server.recipes", "server.runs", "server.post",
                "server.preference", "server.export"]


def _add_resources(mcp: MCPServer) -> None:
    skill = ROOT / "SKILL.md"
    if skill.exists():
        mcp.add_resource(FileResource(uri="skill://SKILL.md", name="SKILL.md", path=skill,
                                      mime_type="text/markdown",
                                      description="The llm-fine-tuning agent skill: decision tree and workflow."))
    for md in sorted((ROOT / "references").glob("*.md")):
        mcp.add_resource(FileResource(uri=f"references://{md.name}", name=f"references/{md.name}",
                                      path=md, mime_type="text/markdown",
                                      description=f"Reference: {md.stem}"))
    recipes = ROOT / "recipes"
    for y in sorted(recipes.rglob("*.yaml")):
        rel = y.relative_to(recipes).as_posix()
        mcp.add_resource(FileResource(uri=f"recipes://{rel}", name=f"recipes/{rel}", path=y,
                                      mime_type="application/yaml",
                                      description=f"Recipe or launch config: {rel}"))
    mcp.add_resource(FunctionResource(
        uri="chat-templates://trl", name="chat-templates/trl", fn=chat_templates.listing,
        mime_type="text/markdown",
        description="The chat templates TRL ships; name one as 'trl:<name>' in verify_masking or "
                    "generate_recipe to get it copied into the workspace."))


def _drop_titles(schema) -> None:
    """Remove pydantic's generated `title`s in place: each repeats its property or model name,
    and every client pays for tools/list in context (about a sixth of its size)."""
    if isinstance(schema, dict):
        if isinstance(schema.get("title"), str):
            del schema["title"]
        for key, value in schema.items():
            if key != "properties" or not isinstance(value, dict):
                _drop_titles(value)
            else:  # property *names* may be "title"; only their schemas are walked
                for sub in value.values():
                    _drop_titles(sub)
    elif isinstance(schema, list):
        for item in schema:
            _drop_titles(item)


def _slim_schemas(mcp: MCPServer) -> None:
    for tool in mcp._tool_manager.list_tools():  # the registered tools, as list_tools serves them
        _drop_titles(tool.parameters)
        _drop_titles(tool.output_schema)


def create_server() -> MCPServer:
    """Build the server with every tool and resource registered."""
    mcp = MCPServer("llm-fine-tuning", version=__version__, instructions=INSTRUCTIONS)
    for mod in TOOL_MODULES:
        importlib.import_module(mod).register(mcp)
    _slim_schemas(mcp)
    _add_resources(mcp)
    return mcp
