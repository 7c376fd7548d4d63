"""The MCP server: tools, resources (references/, recipes/, SKILL.md) and instructions.

Only wiring lives here; the logic is in tools/. Importing this module imports no torch.
"""
from __future__ import annotations

import copy
import importlib
from pathlib import Path
from typing import Any, Callable

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.resources import FileResource, FunctionResource

from server import tool_help
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


def _walk(schema: Any, fix: Callable[[dict], None]) -> None:
    """Apply `fix` to every sub-schema of `schema`; property *names* (which may be "title" or
    "description") are never touched, only their schemas."""
    if isinstance(schema, dict):
        fix(schema)
        for key, value in schema.items():
            if key == "properties" and isinstance(value, dict):
                for sub in value.values():
                    _walk(sub, fix)
            else:
                _walk(value, fix)
    elif isinstance(schema, list):
        for item in schema:
            _walk(item, fix)


def _drop_title(s: dict) -> None:
    # pydantic's titles repeat the property or model name
    if isinstance(s.get("title"), str):
        del s["title"]


def _collapse_optional(s: dict, keep_null: bool) -> None:
    """`anyOf: [X, null]` as X: an input's `default: null` and absence from `required` say
    "optional" already; an output keeps `type: [X, "null"]`, since the client validates results
    against it (a nested model there is an `object`)."""
    any_of = s.get("anyOf")
    if not (isinstance(any_of, list) and len(any_of) == 2 and {"type": "null"} in any_of):
        return
    other = next(x for x in any_of if x != {"type": "null"})
    if keep_null:
        other = {"type": "object"} if "$ref" in other else other
        if not isinstance(other.get("type"), str):
            return
    del s["anyOf"]
    if not keep_null and "default" in s and s["default"] is None:
        del s["default"]
    s.update({k: v for k, v in other.items() if k not in s})
    if keep_null:
        s["type"] = [other["type"], "null"]


def _output_shape(schema: dict | None) -> dict | None:
    """The output schema the client sees: the top-level fields with their types (summary first,
    next_steps last); nested models are `object`s. The agent reads the values themselves; the full
    field documentation is in the tool's help resource."""
    if not schema:
        return schema

    def flatten(s: dict) -> None:  # _walk hands it schemas only, never a properties mapping
        if "$ref" in s:
            s.clear()
            s["type"] = "object"
        for key in ("description", "default", "title", "examples"):
            s.pop(key, None)
    props = {}
    for name, sub in schema.get("properties", {}).items():
        sub = copy.deepcopy(sub)
        _walk(sub, lambda x: _collapse_optional(x, keep_null=True))
        _walk(sub, flatten)
        props[name] = sub
    order = (["summary"] if "summary" in props else []) + [
        n for n in props if n not in ("summary", "next_steps")] + (
        ["next_steps"] if "next_steps" in props else [])
    return {"type": "object", "properties": {n: props[n] for n in order}}


def _slim_schemas(mcp: MCPServer) -> None:
    for tool in mcp._tool_manager.list_tools():  # the registered tools, as list_tools serves them
        _walk(tool.parameters, _drop_title)
        _walk(tool.parameters, lambda x: _collapse_optional(x, keep_null=False))
        if tool.output_schema:  # a cached dict: reshaped in place
            shape = _output_shape(tool.output_schema)
            tool.output_schema.clear()
            tool.output_schema.update(shape)
        tool.description = tool_help.short_description(tool.description)


def create_server() -> MCPServer:
    """Build the server with every tool and resource registered."""
    mcp = MCPServer("llm-fine-tuning", version=__version__, instructions=INSTRUCTIONS)
    for mod in TOOL_MODULES:
        importlib.import_module(mod).register(mcp)
    tool_help.add_resources(mcp)
    _slim_schemas(mcp)
    _add_resources(mcp)
    return mcp
