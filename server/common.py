"""Shared MCP wiring: tool annotations and the wrapper that turns tool errors into ToolErrors."""
from __future__ import annotations

import errno
import functools
import inspect
import logging
import math
import os
from typing import Any, Callable

from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, TextContent, ToolAnnotations

from tools.errors import UserError
from tools.results import ToolResult
from tools.results import problems as result_problems
from tools.heavy import TRAINING_STACK, warm
from tools.workspace import field_of, short, tracking_fields

__all__ = ["READ_ONLY", "READ_ONLY_OPEN", "WRITES", "WRITES_OPEN", "STARTS", "DESTRUCTIVE",
           "TRAINING_STACK", "add_tool", "expose", "explain"]

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


MAX_ERROR_CHARS = 2500  # a tool error is read by an agent: long enough for a list of problems


def _os_error(exc: OSError, field: str | None) -> str | None:
    """A plain message for the OS errors bad paths and folders cause."""
    where = f"'{short(os.fsdecode(exc.filename))}'" if exc.filename else "a path"
    name = field or "path"
    if isinstance(exc, PermissionError):
        return (f"{name}: permission denied for {where}. Fix: choose a folder you can write in the "
                "workspace, or fix its permissions (chmod/chown).")
    if isinstance(exc, IsADirectoryError):
        return f"{name}: {where} is a directory where a file is expected. Fix: give a file path."
    if isinstance(exc, NotADirectoryError):
        return f"{name}: a part of {where} is a file, not a directory. Fix: check the path."
    if exc.errno == errno.ENAMETOOLONG:
        return f"{name}: a file name in {where} is too long (255 bytes at most). Fix: shorten it."
    if exc.errno == errno.ENOSPC:
        return f"{name}: the disk is full while writing {where}. Fix: free space or write elsewhere."
    if exc.errno == errno.EROFS:
        return f"{name}: {where} is on a read-only file system. Fix: write inside a writable workspace."
    if exc.errno == errno.ELOOP:
        return f"{name}: {where} is a symlink loop. Fix: remove the loop."
    return None


def explain(exc: BaseException, seen: dict | None = None) -> str | None:
    """A field-and-fix message for the errors that bad input raises deep in a tool (OS errors on
    the paths it was given, NUL bytes, nesting too deep, numbers too large), or None."""
    if isinstance(exc, OSError):
        return _os_error(exc, field_of(exc.filename, seen or {}))
    text = str(exc)
    if isinstance(exc, ValueError) and ("null byte" in text or "null character" in text):
        return "path: contains a NUL byte. Fix: remove the \\x00 from the path."
    if isinstance(exc, RecursionError):
        return ("input: nested too deeply (JSON/YAML nesting beyond Python's recursion limit). "
                "Fix: flatten the data; real datasets and recipes are a few levels deep.")
    if isinstance(exc, OverflowError):
        return f"input: a number is too large or infinite ({short(text, 120)}). Fix: give a finite value."
    if isinstance(exc, UnicodeEncodeError):
        return ("input: contains characters that cannot be encoded (a lone surrogate such as "
                "\\ud800). Fix: send valid UTF-8 text.")
    return None


# The libraries of the training/eval extras: the light server (a fresh plugin install) has none.
HEAVY_LIBRARIES = ("torch", "transformers", "trl", "datasets", "peft", "accelerate",
                   "bitsandbytes", "lm_eval", "deepspeed", "safetensors", "matplotlib")


def _missing_extra(exc: BaseException) -> str | None:
    """'not installed' with the one command that installs it, for a heavy library missing."""
    if not isinstance(exc, ModuleNotFoundError):
        return None
    top = (exc.name or "").split(".")[0]
    if top not in HEAVY_LIBRARIES:
        return None
    command = os.environ.get("LLM_FT_INSTALL_COMMAND") or "make venv"
    return (f"{top} is not installed in this server's Python (the light install runs the planning "
            f"and data tools only). Fix: run `{command}` (it installs the training and evaluation "
            "extras with progress), then call the tool again; no restart is needed for most tools.")


def _to_tool_error(name: str, exc: BaseException, seen: dict | None = None) -> ToolError:
    if isinstance(exc, ToolError):
        return ToolError(short(str(exc), MAX_ERROR_CHARS))
    if isinstance(exc, UserError):
        return ToolError(short(str(exc), MAX_ERROR_CHARS))
    known = explain(exc, seen)
    if known:
        return ToolError(known)
    missing = _missing_extra(exc)
    if missing:
        return ToolError(missing)
    # Unanticipated: keep the server alive and still tell the agent what happened.
    log.exception("tool %s failed", name)
    return ToolError(f"{name} failed unexpectedly: {type(exc).__name__}: {short(exc)}. "
                     "Check the inputs; if they are right this is a bug (the server log has the traceback).")


def _non_finite(value: Any, path: str = "") -> str | None:
    """The argument path of the first inf/NaN number in `value` (JSON allows neither, but
    Python's parser takes Infinity and NaN), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return path or "argument"
    if isinstance(value, dict):
        for k, v in value.items():
            found = _non_finite(v, f"{path}.{k}" if path else str(k))
            if found:
                return found
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found = _non_finite(v, f"{path}[{i}]")
            if found:
                return found
    return None


def _refuse_non_finite(kwargs: dict) -> None:
    bad = _non_finite(kwargs)
    if bad:
        raise ToolError(f"{bad}: inf and NaN are not accepted. Fix: give a finite number.")


# Set by the test suite: a tool whose result breaks the summary/next_steps contract fails loudly
# there; users get the result as it is.
STRICT_RESULTS_ENV = "LLM_FT_STRICT_RESULTS"


def to_call_result(name: str, result: Any) -> Any:
    """A ToolResult as MCP content: the text is its summary, key figures and next steps; the
    structured content is every field (summary first, next_steps last)."""
    if isinstance(result, CallToolResult):  # built by a wrapper that adds content (an image)
        return result
    if not isinstance(result, ToolResult):
        if os.environ.get(STRICT_RESULTS_ENV):
            raise ToolError(f"{name} returned {type(result).__name__}, not a ToolResult")
        return result  # every tool returns a ToolResult; the SDK's own conversion otherwise
    broken = result_problems(result)
    if broken and os.environ.get(STRICT_RESULTS_ENV):
        raise ToolError(f"{name}: result contract broken: {'; '.join(broken)}")
    return CallToolResult(content=[TextContent(type="text", text=result.text())],
                          structured_content=result.wire())


def _call(name: str, fn: Callable[..., Any], heavy: tuple[str, ...], args, kwargs):
    _refuse_non_finite(kwargs)
    if heavy:
        warm(*heavy)
    with tracking_fields() as seen:
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - translated, never swallowed
            raise _to_tool_error(name, exc, seen) from exc
    return to_call_result(name, result)


def expose(fn: Callable[..., Any], heavy: tuple[str, ...] = (),
           progress_steps: bool = False) -> Callable[..., Any]:
    """Wrap a tools/ function for MCP: same signature and docstring, errors become ToolErrors
    that name the field; `heavy` libraries are first imported one thread at a time."""
    name = fn.__name__
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def awrapper(*args, **kwargs):
            _refuse_non_finite(kwargs)
            try:
                result = await fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - translated, never swallowed
                raise _to_tool_error(name, exc) from exc
            return to_call_result(name, result)
        return awrapper

    if progress_steps:
        return _with_progress(name, fn, heavy)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return _call(name, fn, heavy, args, kwargs)
    return wrapper


PROGRESS_MIN_INTERVAL_S = 0.25  # a client needs a few updates a second at most


def _with_progress(name: str, fn: Callable[..., Any], heavy: tuple[str, ...]) -> Callable[..., Any]:
    """An async wrapper taking the MCP Context: the tool runs in a worker thread whose
    tools.progress.report calls become progress notifications (a no-op when the client sent no
    progress token)."""
    import time

    import anyio
    import anyio.to_thread
    from anyio import from_thread
    from mcp.server.mcpserver import Context

    from tools import progress

    @functools.wraps(fn)
    async def pwrapper(*args, ctx: Context, **kwargs):
        last = [0.0]

        def send(done, total, message):
            now = time.monotonic()
            if now - last[0] < PROGRESS_MIN_INTERVAL_S and (total is None or done < total):
                return
            last[0] = now
            from_thread.run(ctx.report_progress, done, total, message)

        def work():
            with progress.sink(send):
                return _call(name, fn, heavy, args, kwargs)
        return await anyio.to_thread.run_sync(work)

    # Resolved annotations: the tools' modules use `from __future__ import annotations`, and this
    # wrapper's globals are not theirs.
    import typing
    sig = inspect.signature(fn, eval_str=True)
    params = list(sig.parameters.values()) + [
        inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=Context)]
    pwrapper.__signature__ = sig.replace(parameters=params)
    pwrapper.__annotations__ = {**typing.get_type_hints(fn, include_extras=True), "ctx": Context}
    return pwrapper


def add_tool(mcp, fn: Callable[..., Any], annotations: ToolAnnotations, *, name: str | None = None,
             title: str | None = None, heavy: tuple[str, ...] = (), progress: bool = False) -> None:
    """Register `fn` (a tools/ function with typed parameters and a docstring) as an MCP tool.
    heavy: libraries (tools.heavy.GROUPS) it imports, warmed one thread at a time. progress: the
    tool reports progress (tools.progress.report) as MCP progress notifications."""
    mcp.tool(name=name or fn.__name__, title=title, annotations=annotations)(
        expose(fn, heavy, progress_steps=progress))
