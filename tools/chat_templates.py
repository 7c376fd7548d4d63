"""TRL's shipped chat templates: name them, copy them into the workspace, say which one is closest.

TRL ships the real templates of many families in `trl/chat_templates/` and, for
`assistant_only_loss`, swaps in `<family>_training.jinja` only when the tokenizer's template is
byte-identical to the shipped `<family>.jinja`. An agent cannot copy files out of site-packages,
so a template can be named as `trl:<name>` (e.g. `trl:qwen3_training.jinja`): the tools copy it
to `<workspace>/chat_templates/<name>.jinja`, the path a recipe's `chat_template_path` takes.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .workspace import get_workspace

PREFIX = "trl:"
WORKSPACE_DIR = "chat_templates"
CLOSE_ENOUGH = 0.6  # below this line-similarity a template is another family, not a variant


def _dir() -> Path:
    import importlib.util  # find TRL without importing it (the server starts without torch)
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("TRL is not installed, so its chat templates are not available.",
                        field="chat_template", fix="Install the training extras (make venv).")
    return Path(list(spec.submodule_search_locations)[0]).resolve() / "chat_templates"


def shipped() -> dict[str, Path]:
    """Every template TRL ships, by file name."""
    d = _dir()
    return {p.name: p for p in sorted(d.glob("*.jinja"))} if d.is_dir() else {}


def is_ref(value: str | None) -> bool:
    return isinstance(value, str) and value.strip().startswith(PREFIX)


def _name(ref: str) -> str:
    name = ref.strip()[len(PREFIX):].strip()
    return name if name.endswith(".jinja") else name + ".jinja"


def materialize(ref: str, *, field: str = "chat_template") -> str:
    """Copy `trl:<name>` into the workspace; return its workspace-relative path."""
    name = _name(ref)
    found = shipped()
    if name not in found:  # also refuses any path: names come from the directory listing
        close = difflib.get_close_matches(name, list(found), n=3, cutoff=0.5)
        raise UserError(f"TRL ships no chat template '{name}'.", field=field,
                        fix=(f"Did you mean {', '.join(PREFIX + c for c in close)}? " if close else "")
                        + "Read the resource chat-templates://trl for the list.")
    text = found[name].read_text(encoding="utf-8")
    ws = get_workspace()
    rel = f"{WORKSPACE_DIR}/{name}"
    dst = ws.resolve(rel, field=field)
    if dst.exists():
        if dst.is_file() and dst.read_text(encoding="utf-8", errors="replace") == text:
            return rel
        raise UserError(f"{rel} exists and differs from TRL's {name} (an edited copy?).", field=field,
                        fix=f"Pass chat_template='{rel}' to use your copy, or delete it to get TRL's.")
    ws.write_text(rel, text, field=field)
    return rel


@dataclass
class Closest:
    name: str
    similarity: float     # difflib ratio over lines and Jinja tags, 0..1
    first_difference: int  # 1-based line of the given template where it first differs
    training_variant: str | None  # the shipped <family>_training.jinja, when there is one


def _chunks(text: str) -> tuple[list[str], list[int]]:
    """A template cut at lines and at Jinja tag ends, with each chunk's line: one-line templates
    (DeepSeek's are) compare as finely as multi-line ones."""
    chunks, lines = [], []
    for n, line in enumerate(text.splitlines(), start=1):
        for part in re.split(r"(?<=%\})|(?<=\}\})", line):
            if part.strip():
                chunks.append(part.strip())
                lines.append(n)
    return chunks, lines


def closest(template: str) -> Closest | None:
    """The shipped non-training template most like `template` (None when nothing is close)."""
    mine, where = _chunks(template)
    best: Closest | None = None
    for name, path in shipped().items():
        if name.endswith("_training.jinja"):
            continue
        other, _ = _chunks(path.read_text(encoding="utf-8"))
        m = difflib.SequenceMatcher(None, mine, other, autojunk=False)
        if m.real_quick_ratio() < CLOSE_ENOUGH or m.quick_ratio() < CLOSE_ENOUGH:
            continue
        ratio = m.ratio()
        if ratio >= CLOSE_ENOUGH and (best is None or ratio > best.similarity):
            first = next((a for tag, a, _, _, _ in m.get_opcodes() if tag != "equal"), len(mine))
            line = where[first] if first < len(where) else (where[-1] + 1 if where else 1)
            variant = name.replace(".jinja", "_training.jinja")
            best = Closest(name, round(ratio, 3), line,
                           variant if variant in shipped() else None)
    return best


def listing() -> str:
    """Markdown list of the shipped templates (the chat-templates://trl resource)."""
    names = list(shipped())
    pairs = [n for n in names if not n.endswith("_training.jinja")]
    out = ["# Chat templates shipped with TRL", "",
           "Name one as `trl:<name>` in verify_masking(chat_template=...) or "
           "generate_recipe(chat_template=...): it is copied to "
           f"`{WORKSPACE_DIR}/<name>` in the workspace, the path to set as `chat_template_path`. "
           "`*_training.jinja` variants carry {% generation %} markers for assistant_only_loss.", ""]
    for n in pairs:
        t = n.replace(".jinja", "_training.jinja")
        out.append(f"- `{n}`" + (f" (training variant: `{t}`)" if t in names else ""))
    return "\n".join(out) + "\n"
