"""Names made from user text: the folder and file names tools derive from a model id or a label.
One home, so a model's recipe, run folder and Spectrum YAML are named alike."""
from __future__ import annotations

import re

FALLBACK = "model"  # what an input with no usable character becomes


def model_slug(ref: str) -> str:
    """A model's short name for paths: the last part of a hub id or folder, lower case, other
    characters as '-' ('Qwen/Qwen2.5-0.5B-Instruct' -> 'qwen2.5-0.5b-instruct')."""
    last = ref.rstrip("/").split("/")[-1]
    return re.sub(r"[^a-z0-9.]+", "-", last.lower()).strip("-") or FALLBACK


def label_slug(text: str, max_chars: int = 60) -> str:
    """A label (a run, a task, a whole path) as one file-name part: case, '_', '.' and '-' kept,
    other runs as '-', at most max_chars ('my run/gsm8k' -> 'my-run-gsm8k')."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:max_chars] or FALLBACK
