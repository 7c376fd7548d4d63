"""The one error type tools raise for bad input: the server turns it into an MCP ToolError."""
from __future__ import annotations

import re


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
        self.message = message
        self.fix = fix
        text = f"{field}: {message}" if field else message
        if fix:
            text += f" Fix: {fix}"
        super().__init__(text)


ECHO_CHARS = 200  # any single echoed token (a path, an id, a value) is cut to this


def _cut(text: str, n: int) -> str:
    """`text` with every run of 200+ non-space characters shortened, then cut to n characters."""
    text = _LONG_TOKEN.sub(lambda m: f"{m.group()[:ECHO_CHARS]}... ({len(m.group()):,} characters)", str(text))
    return text if len(text) <= n else f"{text[:n - 40]}... (cut, {len(text):,} characters)"


_LONG_TOKEN = re.compile(r"\S{%d,}" % (ECHO_CHARS + 1))
