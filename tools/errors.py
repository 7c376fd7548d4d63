"""The one error type tools raise for bad input: the server turns it into an MCP ToolError."""
from __future__ import annotations


class UserError(ValueError):
    """Bad input the caller can fix. The message names the field (or line) and the fix.

    `field` is the argument or location at fault (e.g. "batch_size", "line 17", "dataset_path").
    """

    MAX_MESSAGE = 1500  # an agent reads this; a huge echoed argument must not come back whole

    def __init__(self, message: str, *, field: str | None = None, fix: str | None = None):
        field = _cut(field, 120) if field else field
        message = _cut(message, self.MAX_MESSAGE)
        fix = _cut(fix, 600) if fix else fix
        self.field = field
        self.fix = fix
        text = f"{field}: {message}" if field else message
        if fix:
            text += f" Fix: {fix}"
        super().__init__(text)


def _cut(text: str, n: int) -> str:
    text = str(text)
    return text if len(text) <= n else f"{text[:n - 40]}... (cut, {len(text):,} characters)"
