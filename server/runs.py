"""MCP wiring for the runs tools: launch_training, training_status (+ loss-curve image),
stop_training, list_runs."""
from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Annotated

from mcp_types import CallToolResult, TextContent

from server.common import DESTRUCTIVE, READ_ONLY, STARTS, TRAINING_STACK, add_tool, to_call_result


def _with_loss_image(fn):
    """Wrap training_status: same parameters and output schema (TrainingStatus), and the result
    carries the loss-curve PNG as an image content block next to the structured content."""
    from mcp.server.mcpserver import Image

    sig = inspect.signature(fn, eval_str=True)
    model = sig.return_annotation

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        res = fn(*args, **kwargs)
        call = to_call_result("training_status", res)
        data, content = call.structured_content, list(call.content)
        if res.loss_plot_path and Path(res.loss_plot_path).is_file():
            content.append(Image(path=res.loss_plot_path).to_image_content())
        return CallToolResult(content=content, structured_content=data)

    wrapper.__signature__ = sig.replace(return_annotation=Annotated[CallToolResult, model])
    return wrapper


def register(mcp) -> None:
    """Register this area's tools on the server."""
    from tools.runs import launch_training, list_runs, stop_training, training_status

    add_tool(mcp, launch_training, STARTS, title="Launch training (background)", heavy=TRAINING_STACK)
    add_tool(mcp, _with_loss_image(training_status), READ_ONLY, title="Training status and loss curve")
    add_tool(mcp, stop_training, DESTRUCTIVE, title="Stop a training run (checkpoint saved)")
    add_tool(mcp, list_runs, READ_ONLY, title="List runs")
