"""How a training run is launched: process count, GPU placement, rendezvous port, argv and env.

Decided before anything starts, so `launch_training(dry_run=True)` can show it and the tests can
check it without a GPU:
- **Process count**: `num_processes` when asked, else one per `gpu_ids`, else the accelerate
  config's own `num_processes`, else 1. `--num_processes` is passed only when the count did not
  come from the config: passing it always overrode the config (an 8-GPU ZeRO-3 recipe ran one
  process and ran out of memory).
- **Placement**: `gpu_ids` become `CUDA_VISIBLE_DEVICES`, so "one run per GPU set" means that set.
  One process on a multi-GPU host is pinned to GPU 0: otherwise the Trainer wraps the model in
  DataParallel over every visible GPU, which TRL refuses.
- **Checks**: the count per node and the GPU ids against the GPUs this host has (when it has CUDA).
- **Port**: a free rendezvous port per single-node run (see references/distributed.md).
"""
from __future__ import annotations

import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import UserError
from .memory import GIB
from .run_registry import cuda_visible

ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


@dataclass
class ConfigCounts:
    """What an accelerate config says about processes (all None/1 without a config)."""
    num_processes: Optional[int] = None
    num_machines: int = 1
    port: Optional[int] = None
    use_cpu: bool = False


@dataclass
class LaunchPlan:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    num_processes: int = 1          # processes on this node
    world_size: int = 1             # processes on all nodes
    gpu_ids: Optional[list[int]] = None
    count_from: str = "default"     # asked | gpu_ids | accelerate config | default
    notes: list[str] = field(default_factory=list)


def read_counts(acc_path: Optional[Path]) -> ConfigCounts:
    """The process-related keys of an accelerate YAML (its other keys are validate_recipe's)."""
    if acc_path is None:
        return ConfigCounts()
    import yaml
    try:
        raw = yaml.safe_load(Path(acc_path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"cannot read the accelerate config: {exc}", field="accelerate_config",
                        fix="Give an accelerate YAML (recipes/accelerate/ has working ones).") from None
    if not isinstance(raw, dict):
        raise UserError("is not a YAML mapping.", field="accelerate_config",
                        fix="Give an accelerate YAML (recipes/accelerate/ has working ones).")

    def as_int(key: str, default):
        v = raw.get(key, default)
        try:
            return None if v is None else int(v)
        except (TypeError, ValueError):
            raise UserError(f"{key}: {v!r} is not a number.", field="accelerate_config",
                            fix=f"Set {key} to an integer (or a real address/port, not a placeholder).") from None
    return ConfigCounts(num_processes=as_int("num_processes", None), num_machines=as_int("num_machines", 1) or 1,
                        port=as_int("main_process_port", None), use_cpu=bool(raw.get("use_cpu")))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _count(num_processes: Optional[int], gpu_ids: Optional[list[int]], cfg: ConfigCounts) -> tuple[int, str]:
    """(processes on ALL nodes, where the number came from)."""
    if gpu_ids is not None and len(set(gpu_ids)) != len(gpu_ids):
        raise UserError(f"{gpu_ids} lists a GPU twice.", field="gpu_ids", fix="List each GPU index once.")
    if num_processes is not None:
        if gpu_ids is not None and num_processes != len(gpu_ids) * cfg.num_machines:
            raise UserError(f"num_processes={num_processes} but gpu_ids has {len(gpu_ids)} GPU(s).",
                            field="num_processes", fix="Drop num_processes: one process runs per GPU in gpu_ids.")
        return num_processes, "asked"
    if gpu_ids is not None:
        return len(gpu_ids) * cfg.num_machines, "gpu_ids"
    if cfg.num_processes:
        return cfg.num_processes, "accelerate config"
    return 1, "default"


def _check_gpus(per_node: int, gpu_ids: Optional[list[int]], gpus_present: int, on_cpu: bool) -> None:
    if on_cpu or gpus_present == 0:
        return  # CPU runs (gloo) start any number of processes; no CUDA here: nothing to check
    if gpu_ids is not None:
        bad = [g for g in gpu_ids if g < 0 or g >= gpus_present]
        if bad:
            raise UserError(f"GPU(s) {bad} do not exist: this host has {gpus_present} (0-{gpus_present - 1}).",
                            field="gpu_ids", fix="Use indices from detect_hardware.")
    if per_node > gpus_present:
        raise UserError(f"{per_node} processes per node but this host has {gpus_present} GPU(s).",
                        field="num_processes",
                        fix="Use at most one process per GPU (or fix num_processes in the accelerate config).")


def plan_launch(train_args: list[str], *, num_processes: Optional[int], gpu_ids: Optional[list[int]],
                acc_path: Optional[Path], acc_copy: Optional[Path], gpus_present: int,
                recipe_use_cpu: bool) -> LaunchPlan:
    """The argv and environment of a run; UserError naming the field when they cannot work."""
    cfg = read_counts(acc_path)
    world, source = _count(num_processes, gpu_ids, cfg)
    if world % cfg.num_machines:
        raise UserError(f"{world} processes do not split evenly over {cfg.num_machines} machines.",
                        field="num_processes", fix="Use a multiple of num_machines (the total over all nodes).")
    per_node = world // cfg.num_machines
    on_cpu = recipe_use_cpu or cfg.use_cpu
    _check_gpus(per_node, gpu_ids, gpus_present, on_cpu)
    plan = LaunchPlan(argv=[], num_processes=per_node, world_size=world, gpu_ids=gpu_ids, count_from=source)
    if gpu_ids is not None:
        plan.env["CUDA_VISIBLE_DEVICES"] = cuda_visible(gpu_ids)
    elif per_node == 1 and gpus_present > 1 and not on_cpu:
        plan.env["CUDA_VISIBLE_DEVICES"] = cuda_visible([0])
        plan.notes.append(f"one process on a host with {gpus_present} GPUs: pinned to GPU 0 (CUDA_VISIBLE_DEVICES=0); "
                          "otherwise the Trainer wraps DataParallel, which TRL refuses. Pass gpu_ids to choose.")
    if world == 1 and acc_path is None:
        plan.argv = [sys.executable, *train_args]
        return plan
    plan.argv = list(ACCELERATE)
    if source != "accelerate config":
        plan.argv += ["--num_processes", str(world)]
    if acc_copy is not None:
        plan.argv += ["--config_file", str(acc_copy)]
    elif world > 1:
        # Without a config, accelerate runs ONE process unless told it is multi-device; with
        # use_cpu in the recipe the workers use gloo on CPU.
        plan.argv += ["--multi_gpu"]
    if cfg.num_machines == 1 and cfg.port is None:
        # accelerate's default port (29500) is the same for every run: a second run on this host
        # (another GPU set), or one started while the last one's socket lingers, cannot bind it.
        plan.argv += ["--main_process_port", str(_free_port())]
    plan.argv += train_args
    return plan


# ---------------------------------------------------------------------------------------- disk
DISK_MARGIN = 1.10  # 10% over the estimate: tokenizer, logs, rng/scheduler states, trainer_state


@dataclass
class DiskNeed:
    checkpoint_gib: float
    checkpoints: int
    final_gib: float
    total_gib: float
    why: str


def disk_needed(method: str, total_params: int, trainable_params: int, *, save_total_limit: Optional[int],
                save_steps_count: int, sharding: str, weight_bytes: int = 2) -> DiskNeed:
    """Disk a run writes: `save_total_limit` checkpoints (or every save when unlimited) plus the
    final model. A checkpoint holds what is trained (the adapter, or the model: trainable weights
    in fp32 master precision, frozen ones 16-bit) and the optimizer's states (AdamW: 8 bytes per
    trainable parameter); ZeRO-3 writes the 16-bit gathered model plus its fp32 master and Adam
    shards (12 bytes per trainable parameter)."""
    lora = method in ("lora", "qlora")
    if lora:
        model = trainable_params * (2 if method == "qlora" else 4)
        final = model
    elif sharding == "zero3":
        model = total_params * weight_bytes + trainable_params * 12 - trainable_params * 8
        final = total_params * weight_bytes
    else:  # fp32 master weights for what is trained (tools.train), frozen weights 16-bit
        model = trainable_params * 4 + (total_params - trainable_params) * weight_bytes
        final = model
    ckpt = (model + trainable_params * 8) / GIB
    n = save_steps_count if save_total_limit is None else max(1, min(save_total_limit, save_steps_count))
    total = (ckpt * n + final / GIB) * DISK_MARGIN
    why = (f"{n} checkpoint(s) x {ckpt:.2f} GiB (weights + optimizer states) + the final "
           f"{'adapter' if lora else 'model'} {final / GIB:.2f} GiB, +10%")
    return DiskNeed(round(ckpt, 3), n, round(final / GIB, 3), round(total, 3), why)
