"""Each tool's full documentation as a resource, so tools/list can stay short.

tools/list carries what a call needs: the first paragraph of the docstring, the parameters with
their types, defaults and short descriptions, and the result's top-level fields. The rest (the
docstring's details, every parameter's and result field's documentation) is served at
`tool-help://<name>`, read when the agent needs it.
"""
from __future__ import annotations

import inspect
import json
import re

from mcp.server.mcpserver.resources import FunctionResource

URI = "tool-help://{name}"


def short_description(doc: str | None) -> str:
    """The docstring's first paragraph on one line: the tools/list description."""
    text = inspect.cleandoc(doc or "")
    first = text.split("\n\n", 1)[0]
    return re.sub(r"\s+", " ", first).strip()


def _type_of(schema: dict) -> str:
    if "enum" in schema:
        return " | ".join(json.dumps(v) for v in schema["enum"])
    if "anyOf" in schema:
        return " | ".join(_type_of(s) for s in schema["anyOf"])
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    kind = schema.get("type", "any")
    if kind == "array":
        return f"list[{_type_of(schema.get('items', {}))}]"
    return kind if isinstance(kind, str) else " | ".join(kind)


def _fields(schema: dict, heading: str) -> list[str]:
    lines = [f"## {heading}", ""]
    props = (schema or {}).get("properties", {})
    if not props:
        return lines + ["(none)", ""]
    required = set((schema or {}).get("required", []))
    for name, sub in props.items():
        default = "" if name in required or "default" not in sub else \
            f" (default {json.dumps(sub['default'])})"
        desc = sub.get("description", "")
        lines.append(f"- `{name}`: {_type_of(sub)}{default}. {desc}".rstrip())
    for def_name, sub in (schema or {}).get("$defs", {}).items():
        lines += ["", f"### {def_name}"]
        for name, fs in sub.get("properties", {}).items():
            lines.append(f"- `{name}`: {_type_of(fs)}. {fs.get('description', '')}".rstrip())
    return lines + [""]


def render(tool) -> str:
    """The help page of one registered tool (call before tools/list is slimmed)."""
    doc = inspect.cleandoc(tool.description or "")
    out = [f"# {tool.name}", "", doc, ""]
    out += _fields(tool.parameters, "Parameters")
    out += _fields(tool.output_schema or {}, "Result")
    return "\n".join(out)


def add_resources(mcp) -> None:
    """A `tool-help://<name>` resource per registered tool, rendered now from the full schemas."""
    for tool in mcp._tool_manager.list_tools():
        page = render(tool)
        mcp.add_resource(FunctionResource(
            uri=URI.format(name=tool.name), name=f"tool-help/{tool.name}", fn=lambda page=page: page,
            mime_type="text/markdown",
            description=f"Full documentation of the {tool.name} tool: details, every parameter, "
                        "every result field."))
