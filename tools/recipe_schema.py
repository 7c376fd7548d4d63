"""The recipe's schema: the fields of the four dataclasses `trl sft --config` parses (in the
installed TRL), the keys of ours besides them, the TRL parse itself, and the method a recipe's
keys name (infer_method, the rule the whole project uses).

Checked against the installed sources (trl 1.16, transformers 5.23, accelerate 1.15, peft 0.21).
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import importlib.util
import io
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel

SPECTRUM_KEY = "spectrum_config_path"
# Keys of ours: tools.train reads and removes them before the TRL parse (`trl sft` rejects them).
TOOLS_TRAIN_KEYS = (SPECTRUM_KEY,)
# Keys TrlParser reads itself (it exports `env:` to the environment): no dataclass has them.
TRL_PARSER_KEYS = ("env",)
# What a recipe may hold besides the dataclass fields.
NON_FIELD_KEYS = frozenset(TOOLS_TRAIN_KEYS + TRL_PARSER_KEYS)
FLASH_ATTN = {"flash_attention_2", "flash_attention_3"}


class UnknownKey(BaseModel):
    key: str
    suggestions: list[str] = []


def infer_method(recipe: dict[str, Any]) -> str:
    """spectrum | qlora | lora | full, from recipe keys: spectrum_config_path -> spectrum; use_peft +
    load_in_4bit -> qlora; use_peft -> lora; else full (the rule the whole project uses)."""
    if recipe.get(SPECTRUM_KEY):
        return "spectrum"
    if recipe.get("use_peft"):
        return "qlora" if recipe.get("load_in_4bit") else "lora"
    return "full"


@functools.lru_cache(maxsize=1)
def trl_fields() -> dict[str, tuple[str, Any]]:
    """{field name: (dataclass name, dataclasses.Field)} of the four classes `trl sft` parses."""
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig
    out: dict[str, tuple[str, Any]] = {}
    for cls in (ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig):
        for f in dataclasses.fields(cls):
            out.setdefault(f.name, (cls.__name__, f))
    return out


def versions() -> dict[str, Optional[str]]:
    import importlib.metadata as md
    out = {}
    for p in ("trl", "transformers", "peft", "accelerate"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    return out


def suggest(key: str, n: int = 3) -> list[str]:
    names = list(trl_fields()) + list(TOOLS_TRAIN_KEYS)
    hits = difflib.get_close_matches(key, names, n=n, cutoff=0.6)
    if not hits:  # shared stems: 'lora_rank' -> lora_r, 'seq_len' -> max_length
        stem = key.split("_")[0]
        hits = [k for k in names if k.startswith(stem + "_")][:n]
    return hits


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def trl_parse(cfg: dict, *, base_dir: Path) -> tuple[Optional[tuple], Optional[str], list[str]]:
    """Parse `cfg` exactly as `trl sft --config` does (TrlParser over ScriptArguments, SFTConfig,
    ModelConfig, DatasetMixtureConfig; unknown keys rejected). Returns (dataclasses, error, warnings).

    `env:` is not exported (validation has no side effects) and the process environment is
    restored afterwards; relative deepspeed/accelerator config paths are taken from `base_dir`.
    """
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig, TrlParser

    cfg = {k: v for k, v in cfg.items() if k not in NON_FIELD_KEYS}
    for key in ("deepspeed", "accelerator_config"):
        v = cfg.get(key)
        if isinstance(v, str) and not v.lstrip().startswith("{") and not os.path.isabs(v):
            cfg[key] = str(base_dir / v)
    with env_guard():  # TrainingArguments' __post_init__ sets os.environ keys
        return _parse(cfg, TrlParser, (ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig))


# Parsing a recipe changes os.environ (e.g. ACCELERATE_MIXED_PRECISION; a preference recipe's
# `env:`). The server runs tool calls in threads, so its parses take turns and undo exactly what
# they changed: clearing and refilling the environment let another thread see it empty, and a
# child process spawned meanwhile failed with EFAULT ("Bad address") or started without PATH.
_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def env_guard():
    """A TRL parse in the server process: one at a time, os.environ exactly as before after it."""
    with _ENV_LOCK:
        before = dict(os.environ)
        try:
            yield
        finally:
            for k in [k for k in os.environ if k not in before]:
                os.environ.pop(k, None)
            for k, v in before.items():
                if os.environ.get(k) != v:
                    os.environ[k] = v


def _parse(cfg: dict, TrlParser, types: tuple):
    """trl_parse's work (under env_guard): the parse and its warnings."""
    import yaml
    err = io.StringIO()
    caught: list[str] = []
    out = None
    error = None
    from .workspace import TMP_DIR, get_workspace
    with tempfile.TemporaryDirectory(prefix="llmft-recipe-", dir=get_workspace().owned_dir(TMP_DIR)) as d:
        path = Path(d) / "recipe.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        parser = TrlParser(types)
        try:
            with warnings.catch_warnings(record=True) as rec, contextlib.redirect_stderr(err), \
                    contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("always")
                out = parser.parse_args_and_config(args=["--config", str(path)])
            caught = [str(w.message) for w in rec]
        except SystemExit:
            lines = [ln for ln in err.getvalue().splitlines() if "error:" in ln]
            error = lines[-1].split("error:", 1)[1].strip() if lines else err.getvalue().strip()[-500:]
        except Exception as exc:  # noqa: BLE001 - reported to the caller as the parse error
            error = f"{type(exc).__name__}: {exc}"
        finally:
            with contextlib.suppress(Exception):
                from transformers.integrations.deepspeed import unset_hf_deepspeed_config
                unset_hf_deepspeed_config()
    seen: list[str] = []
    for w in caught:
        w = " ".join(w.split())
        if w not in seen:
            seen.append(w)
    return out, error, seen
