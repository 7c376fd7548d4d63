"""Reading an accelerate config as the planner needs it (processes, sharding, offload, mixed
precision), with the keys `accelerate launch` would silently ignore and the placeholders a
template left to fill."""
from __future__ import annotations

import difflib
import functools
import re
from pathlib import Path
from typing import Optional

from pydantic import BaseModel

from .workspace import is_inside

class AccelerateSummary(BaseModel):
    """What an accelerate config file sets up, as the planner needs it."""
    path: str
    distributed_type: str
    num_processes: int
    num_machines: int
    mixed_precision: Optional[str]
    use_cpu: bool
    sharding: str
    cpu_offload: bool
    problems: list[str] = []


@functools.lru_cache(maxsize=1)
def accelerate_launch_dests() -> frozenset[str]:
    from accelerate.commands.launch import launch_command_parser
    return frozenset(a.dest for a in launch_command_parser()._actions)


# Anywhere: <...>, CHANGE_ME, TODO. In the keys that name machines: an ALL_CAPS name (MAIN_NODE_IP);
# elsewhere ALL_CAPS values are accelerate's enums (LOCAL_MACHINE, FULL_STATE_DICT).
_PLACEHOLDER = re.compile(r"^(<[^>]*>|.*(CHANGE_?ME|REPLACE_?ME|TODO).*)$")
_CAPS_NAME = re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)+$")
_MACHINE_KEYS = {"main_process_ip", "main_process_port", "machine_rank", "num_machines", "num_processes",
                 "deepspeed_hostfile", "rdzv_endpoint"}


def _placeholders(path: Path) -> list[str]:
    """Values a template left for the user to fill (MAIN_NODE_IP, <port>, CHANGE_ME): a launch
    with them hangs at the rendezvous or fails far from the cause."""
    import yaml
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return []
    out = []

    def walk(obj, where: str) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{where}.{k}" if where else str(k))
        elif isinstance(obj, str) and (_PLACEHOLDER.match(obj.strip()) or (
                where.split(".")[-1] in _MACHINE_KEYS and _CAPS_NAME.match(obj.strip()))):
            out.append(f"{where} is still the placeholder {obj!r}: replace it (references/distributed.md, "
                       "multi-node) before launching.")
    walk(raw, "")
    return out


def read_accelerate_config(path: Path, shown: str) -> AccelerateSummary:
    """Load an accelerate YAML/JSON with accelerate's own loader; nested deepspeed/fsdp keys are
    checked against `accelerate launch`'s arguments (unknown ones are silently ignored there)."""
    from accelerate.commands.config.config_args import load_config_from_file
    problems: list[str] = []
    try:
        c = load_config_from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - reported
        return AccelerateSummary(path=shown, distributed_type="?", num_processes=0, num_machines=0,
                                 mixed_precision=None, use_cpu=False, sharding="none", cpu_offload=False,
                                 problems=[f"accelerate cannot load it: {type(exc).__name__}: {exc}"])
    dests = accelerate_launch_dests()
    for section, prefix in (("deepspeed_config", ""), ("fsdp_config", "fsdp_")):
        for k in (getattr(c, section, None) or {}):
            dest = k if (not prefix or k.startswith(prefix)) else prefix + k
            if dest not in dests:
                close = difflib.get_close_matches(dest, sorted(dests), n=2, cutoff=0.6)
                problems.append(f"{section}.{k} is not an accelerate launch option (ignored by accelerate)"
                                + (f"; did you mean {', '.join(close)}?" if close else "."))
    problems.extend(_placeholders(path))
    ds_file = (getattr(c, "deepspeed_config", None) or {}).get("deepspeed_config_file")
    if isinstance(ds_file, str) and ds_file.strip() and ds_file.lower() != "none":
        from .workspace import get_workspace
        p = Path(ds_file) if Path(ds_file).is_absolute() else path.parent / ds_file
        r = p.resolve()
        if not is_inside(r, get_workspace().root):
            problems.append(f"deepspeed_config.deepspeed_config_file '{ds_file}' resolves to {r}, outside the "
                            "workspace: keep the DeepSpeed JSON inside it.")
    dt = str(getattr(c.distributed_type, "value", c.distributed_type))
    ds = c.deepspeed_config or {}
    fs = c.fsdp_config or {}
    sharding, offload = "none", False
    if dt == "DEEPSPEED":
        stage = int(ds.get("zero_stage", 2) or 0)
        sharding = {2: "zero2", 3: "zero3"}.get(stage, "none")
        offload = ds.get("offload_optimizer_device", "none") not in (None, "none") or \
            ds.get("offload_param_device", "none") not in (None, "none")
    elif dt == "FSDP":
        sharding = "fsdp"
        offload = str(fs.get("fsdp_offload_params", False)).lower() == "true"
    mp = c.mixed_precision
    mp = "no" if mp is False else (str(getattr(mp, "value", mp)) if mp is not None else None)
    return AccelerateSummary(path=shown, distributed_type=dt, num_processes=int(c.num_processes or 1),
                             num_machines=int(c.num_machines or 1), mixed_precision=mp, use_cpu=bool(c.use_cpu),
                             sharding=sharding, cpu_offload=bool(offload), problems=problems)
