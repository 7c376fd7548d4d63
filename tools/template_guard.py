"""Bound a chat template's rendering in time and output size before any tool uses it.

A chat template is code (Jinja, sandboxed by transformers). The sandbox stops attribute escapes,
but not a template that loops 10^10 times or builds a 100 MB string: rendering it in the server
would hang the worker (and tokenising the result, the machine). So each new template is first
rendered on a small sample conversation in a child process, with transformers' own compiler,
under a time limit; its output length is checked against a cap. Templates that raise on the
sample (e.g. "System role not supported") pass here: the tools report those themselves.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading

from .errors import UserError

RENDER_TIMEOUT_S = 20.0          # a real template renders a sample in milliseconds
MAX_RENDER_CHARS = 1_000_000     # a 3-message sample renders to well under 10 kB
_ok: set[str] = set()
_lock = threading.Lock()

_CHILD = r"""
import json, sys
from transformers.utils.chat_template_utils import _compile_jinja_template
spec = json.loads(sys.stdin.read())
tpl = _compile_jinja_template(spec["template"])
longest = 0
for msgs, gen in spec["cases"]:
    try:
        out = tpl.render(messages=msgs, add_generation_prompt=gen, bos_token="<s>", eos_token="</s>",
                         tools=None, documents=None)
    except Exception:
        continue
    longest = max(longest, len(out))
    if longest > spec["cap"]:
        break
print(json.dumps({"chars": longest}))
"""

_SAMPLE = [{"role": "system", "content": "You are helpful."},
           {"role": "user", "content": "What is 2+2?"},
           {"role": "assistant", "content": "4"}]


def check_template(template: str | None, *, field: str = "chat_template") -> None:
    """UserError when `template` takes longer than RENDER_TIMEOUT_S or renders more than
    MAX_RENDER_CHARS characters for a 3-message conversation. Cached per template text."""
    if not template or not isinstance(template, str):
        return
    key = hashlib.sha256(template.encode("utf-8", "surrogatepass")).hexdigest()
    if key in _ok:
        return
    with _lock:
        if key in _ok:
            return
        spec = {"template": template, "cap": MAX_RENDER_CHARS,
                "cases": [[_SAMPLE, False], [_SAMPLE[:2], True]]}
        try:
            proc = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(spec), text=True,
                                  capture_output=True, timeout=RENDER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise UserError(f"the chat template did not finish rendering a 3-message conversation in "
                            f"{RENDER_TIMEOUT_S:g} s (a runaway loop?).", field=field,
                            fix="Use the model's real chat template (a .jinja file or its tokenizer).") from None
        if proc.returncode != 0:
            # The template does not compile: transformers raises the same error in the tool itself.
            _ok.add(key)
            return
        try:
            chars = json.loads(proc.stdout.strip().splitlines()[-1])["chars"]
        except (ValueError, IndexError, KeyError):
            chars = 0
        if chars > MAX_RENDER_CHARS:
            raise UserError(f"the chat template renders more than {MAX_RENDER_CHARS:,} characters for a "
                            "3-message conversation.", field=field,
                            fix="Use the model's real chat template (a .jinja file or its tokenizer).")
        _ok.add(key)
