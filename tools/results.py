"""What every tool returns first and last: a `summary` the agent can relay to the user and the
`next_steps` calls to make next.

Each tool's result model subclasses ToolResult and fills both. Over MCP the text content is the
summary, the key figures and the next steps (`ToolResult.text()`), not a second copy of the JSON;
the structured content keeps every field.
"""
from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, Field

SUMMARY_MAX_CHARS = 300  # one or two plain sentences: what to tell the user
KEY_FIGURES_MAX = 12     # scalar fields shown in the text content
FIGURE_MAX_CHARS = 120   # a longer string is a detail, not a key figure


class ToolResult(BaseModel):
    """Base of every tool result: `summary` first, `next_steps` last."""

    summary: str = Field("", description="One or two plain sentences to tell the user.")
    next_steps: list[str] = Field(default_factory=list,
                                  description="The calls to make next, with their arguments.")

    def key_figures(self) -> dict[str, Any]:
        """The figures worth a line in the text content: top-level numbers, booleans and short
        strings that are set. Override for a result whose figures are nested."""
        out: dict[str, Any] = {}
        for name, value in self.model_dump(mode="json").items():
            if name in ("summary", "next_steps") or value is None or value == "":
                continue
            if isinstance(value, (bool, int, float)) or (
                    isinstance(value, str) and len(value) <= FIGURE_MAX_CHARS):
                out[name] = value
            if len(out) >= KEY_FIGURES_MAX:
                break
        return out

    def text(self) -> str:
        """The MCP text content: summary, key figures, next steps."""
        lines = [self.summary or f"{type(self).__name__} (no summary)."]
        figures = self.key_figures()
        if figures:
            lines.append("; ".join(f"{k}: {json.dumps(v, ensure_ascii=False)}"
                                   for k, v in figures.items()))
        if self.next_steps:
            lines.append("Next: " + " | ".join(self.next_steps))
        return "\n".join(lines)

    def wire(self) -> dict[str, Any]:
        """The structured content, with `summary` first and `next_steps` last."""
        data = self.model_dump(mode="json", by_alias=True)
        steps = data.pop("next_steps", [])
        return {"summary": data.pop("summary", ""), **data, "next_steps": steps}


def problems(result: ToolResult) -> list[str]:
    """What breaks the result contract (used by the server in strict mode and by tests)."""
    out = []
    if not result.summary.strip():
        out.append("summary is empty")
    elif len(result.summary) > SUMMARY_MAX_CHARS:
        out.append(f"summary is {len(result.summary)} characters (at most {SUMMARY_MAX_CHARS})")
    return out
