"""What a recipe's chat template says: its text (a .jinja file or a tokenizer dir in the
workspace), its {% generation %} markers, TRL's training variants, its end-of-turn token."""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import re
from pathlib import Path
from typing import Optional

from .workspace import is_inside

def template_text(ref: str, root: Path) -> tuple[Optional[str], str]:
    """The chat template a recipe points at: a .jinja file or a tokenizer dir; (text, where)."""
    import json
    p = Path(ref)
    p = (p if p.is_absolute() else root / p).resolve()
    if not is_inside(p, root):  # only files inside the workspace are read
        return None, str(ref)
    if p.is_file():
        if p.suffix in (".jinja", ".j2"):
            return p.read_text(encoding="utf-8"), str(ref)
        if p.name == "tokenizer_config.json":
            p = p.parent
    if p.is_dir():
        if (p / "chat_template.jinja").is_file():
            return (p / "chat_template.jinja").read_text(encoding="utf-8"), f"{ref}/chat_template.jinja"
        # chat_template.json: how processors (and older tokenizers) save it; then tokenizer_config
        for tc in (p / "chat_template.json", p / "tokenizer_config.json"):
            if not tc.is_file():
                continue
            with contextlib.suppress(Exception):
                t = json.loads(tc.read_text(encoding="utf-8")).get("chat_template")
                if isinstance(t, list):  # named variants
                    t = next((x.get("template") for x in t if x.get("name") == "default"), None)
                if isinstance(t, str):
                    return t, f"{ref}/{tc.name}"
    return None, str(ref)


def has_generation_markers(template: str) -> bool:
    return re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


@functools.lru_cache(maxsize=1)
def trl_known_templates() -> dict[str, str]:
    """Templates TRL swaps for a training variant with {% generation %} markers: {text: name}."""
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        return {}
    d = Path(list(spec.submodule_search_locations)[0]) / "chat_templates"
    out = {}
    for f in d.glob("*.jinja"):
        if not f.stem.endswith("_training") and (d / f"{f.stem}_training.jinja").exists():
            out[f.read_text(encoding="utf-8")] = f.stem
    return out


def template_end_of_turn(template: str) -> Optional[str]:
    """The end-of-turn token a known template family writes after each message, read from the
    template's text alone (a recipe's .jinja file). With a loaded tokenizer, use
    tools.merge.end_of_turn_token(tokenizer): it renders a chat and reads the token itself."""
    for tok in ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>"):
        if tok in template:
            return tok
    return None
