"""Where a preference / RL run starts, checked before anything starts: an SFT adapter must match
the base model its adapter_config.json names (a common mistake: the adapter of one model run on
another, or the base moved). Read from file headers only (adapter_config.json, the safetensors
headers of the adapter and of a local base): no weights are loaded.

Used by generate_dpo_recipe (UserError on `model`) and by tools.train_dpo.parse_dpo_recipe,
which launch_training runs as its gate (refused as `recipe`) and the run itself runs again.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from .errors import UserError
from .models import safetensors_shapes

ADAPTER_PREFIX = "base_model.model."   # PEFT's prefix of the wrapped model's parameter names
LORA_PART = re.compile(r"\.lora_(A|B)(?:\.[\w-]+)?\.weight$")
SHOWN = 3                              # mismatching modules named in the message


def _expected(adapter: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, int]]:
    """Base module -> (out_features, in_features) the adapter was trained for: lora_A is
    [r, in], lora_B is [out, r]."""
    dims: dict[str, list[Optional[int]]] = {}
    for k, shape in adapter.items():
        m = LORA_PART.search(k)
        if not m or len(shape) != 2:
            continue
        module = k[:m.start()].removeprefix(ADAPTER_PREFIX)
        d = dims.setdefault(module, [None, None])
        if m.group(1) == "A":
            d[1] = shape[1]
        else:
            d[0] = shape[0]
    return {mod: (o, i) for mod, (o, i) in dims.items() if o is not None and i is not None}


def _mismatches(adapter_dir: Path, base_dir: Path) -> tuple[list[str], int]:
    """(what differs, modules compared) between the adapter and a local base's weights."""
    base = safetensors_shapes(sorted(base_dir.glob("*.safetensors")))
    expected = _expected(safetensors_shapes([adapter_dir / "adapter_model.safetensors"]))
    bad = []
    for module, (o, i) in sorted(expected.items()):
        got = base.get(f"{module}.weight")
        if got is None:
            bad.append(f"{module}: not in the base")
        elif tuple(got[:2]) != (o, i):
            bad.append(f"{module}: {i} -> {o} in the adapter, {got[1]} -> {got[0]} in the base")
    return bad, len(expected)


def _base_dir(base: str) -> Optional[Path]:
    """The base's directory inside the workspace, or None for a hub id; UserError when it is gone."""
    from .merge import _is_hub_id
    from .workspace import get_workspace
    try:
        p = get_workspace().resolve(base, field="model")
    except UserError:
        p = None
    if p is not None and p.is_dir():
        return p
    # 'models/gone' looks like a hub id too: it is a local path when its first folder is here.
    if _is_hub_id(base) and not (p is not None and p.parent.is_dir() and p.parent != get_workspace().root):
        return None
    raise UserError(f"the SFT adapter's base '{base}' (adapter_config.json base_model_name_or_path) is not "
                    "a model directory in the workspace nor a hub id.", field="model",
                    fix="Put the base model at that path, or set base_model_name_or_path in the adapter's "
                        "adapter_config.json to where the base is (or merge_adapter and start from the merged "
                        "model).")


def check_sft_adapter(adapter_dir: Path) -> Optional[str]:
    """The base an SFT adapter directory names, after checking it exists and every LoRA module's
    shape matches it (local bases; a hub base is taken as named). None when `adapter_dir` is no
    adapter. UserError (field `model`) naming the first mismatching modules."""
    cfg_file = adapter_dir / "adapter_config.json"
    if not cfg_file.is_file():
        return None
    base = json.loads(cfg_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise UserError(f"{cfg_file.name} names no base_model_name_or_path.", field="model",
                        fix="Merge the adapter (merge_adapter) and start from the merged model.")
    base_dir = _base_dir(str(base))
    weights = adapter_dir / "adapter_model.safetensors"
    if base_dir is None or not weights.is_file() or not any(base_dir.glob("*.safetensors")):
        return str(base)
    if "quantization_config" in json.loads((base_dir / "config.json").read_text(encoding="utf-8")):
        return str(base)  # packed 4-bit/8-bit shapes: not comparable from the header
    bad, n = _mismatches(adapter_dir, base_dir)
    if bad:
        raise UserError(f"the SFT adapter does not match its base '{base}': {len(bad)} of {n} LoRA modules "
                        f"differ ({'; '.join(bad[:SHOWN])}).", field="model",
                        fix="Start from the adapter's own base (set base_model_name_or_path in "
                            "adapter_config.json to it), or train the SFT adapter on this base.")
    return str(base)
