"""Progress of a long tool call, reported by the tool without knowing about MCP.

A tool calls `report(done, total, message)` between its named steps; the server installs a sink
for the call (MCP progress notifications when the client sent a progress token). Outside the
server, or with no sink, a report costs nothing.
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Callable, Iterator, Optional

Sink = Callable[[float, Optional[float], Optional[str]], None]
_sink: ContextVar[Optional[Sink]] = ContextVar("llm_ft_progress_sink", default=None)


def report(done: float, total: float | None = None, message: str | None = None) -> None:
    """Tell the caller how far the call is; never raises (progress must not break a tool)."""
    sink = _sink.get()
    if sink is not None:
        with contextlib.suppress(Exception):
            sink(float(done), None if total is None else float(total), message)


@contextlib.contextmanager
def sink(fn: Sink) -> Iterator[None]:
    token = _sink.set(fn)
    try:
        yield
    finally:
        _sink.reset(token)
