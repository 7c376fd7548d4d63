"""Shared MCP wiring: tool annotations and the wrapper that turns tool errors into ToolErrors."""
from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Callable

from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations

from tools.errors import UserError

log = logging.getLogger("llm_fine_tuning.server")

# Annotation presets. open_world: the tool may reach the hub or a served endpoint.
READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True,
                            open_world_hint=False)
READ_ONLY_OPEN = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True,
                                 open_world_hint=True)
# Writes new files in the workspace; the same call gives the same files.
WRITES = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True,
                         open_world_hint=False)
WRITES_OPEN = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True,
                              open_world_hint=True)
# Starts something new each call (a run id); not idempotent.
STARTS = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False,
                         open_world_hint=False)
DESTRUCTIVE = ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True,
                              open_world_hint=False)


def _to_tool_error(name: str, exc: BaseException) -> ToolError:
    if isinstance(exc, ToolError):
        return exc
    if isinstance(exc, UserError):
        return ToolError(str(exc))
    # Unanticipated: keep the server alive and still tell the agent what happened.
    log.exception("tool %s failed", name)
    return ToolError(f"{name} failed unexpectedly: {type(exc).__name__}: {exc}. "
                     "Check the inputs; if they are right this is a bug (the server log has the traceback).")


def expose(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a tools/ function for MCP: same signature and docstring, errors become ToolErrors."""
    name = fn.__name__
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def awrapper(*args, **kwargs):
            try:
                return await fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - translated, never swallowed
                raise _to_tool_error(name, exc) from exc
        return awrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise _to_tool_error(name, exc) from exc
    return wrapper


def add_tool(mcp, fn: Callable[..., Any], annotations: ToolAnnotations, *, name: str | None = None,
             title: str | None = None) -> None:
    """Register `fn` (a tools/ function with typed parameters and a docstring) as an MCP tool."""
    mcp.tool(name=name or fn.__name__, title=title, annotations=annotations)(expose(fn))
