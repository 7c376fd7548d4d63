"""The one error type tools raise for bad input: the server turns it into an MCP ToolError."""
from __future__ import annotations


class UserError(ValueError):
    """Bad input the caller can fix. The message names the field (or line) and the fix.

    `field` is the argument or location at fault (e.g. "batch_size", "line 17", "dataset_path").
    """

    def __init__(self, message: str, *, field: str | None = None, fix: str | None = None):
        self.field = field
        self.fix = fix
        text = f"{field}: {message}" if field else message
        if fix:
            text += f" Fix: {fix}"
        super().__init__(text)
