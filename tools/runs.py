"""Training runs as background jobs: launch_training, training_status, stop_training, list_runs.

The registry itself (start_job, the supervisor, state from disk) is tools/run_registry.py;
`start_job` is re-exported here for other areas (evaluation) that start background jobs.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, Field, model_serializer

from .errors import UserError
from .results import SUMMARY_MAX_CHARS, ToolResult
from .run_registry import (LOG, STATUS, active_runs, check_devices_free, describe, list_run_dirs,
                           log_tail, new_run_id, now_iso, output_dir_of, read_json, run_dir_for,
                           signal_run, start_job, update_status)
from .launch_plan import plan_launch
from .memory import GIB
from .params import GpuIds
from .train import infer_method
from .workspace import exclusive, get_workspace, short

__all__ = ["start_job", "launch_training", "training_status", "stop_training", "list_runs",
           "LaunchResult", "TrainingStatus", "StopResult", "RunList", "RunInfo"]

State = Literal["queued", "running", "completed", "failed", "stopped"]
LaunchState = Literal["running", "dry_run"]
TRAIN_KIND = "train"
EVAL_KIND = "eval"
PREFERENCE_TRAINERS = ("dpo", "kto", "orpo", "grpo")  # run by tools.train_dpo
TRAINING_ONLY = ("method", "step", "max_steps", "progress_pct", "epoch", "loss", "first_loss",
                 "eval_loss", "learning_rate", "grad_norm", "tokens_per_second",
                 "seconds_per_step", "num_tokens", "last_checkpoint", "loss_plot_path",
                 "suggested_overrides", "continues_run", "logical_run", "tracking",
                 "method_metrics")


# ============================================================================ launch

class LaunchResult(ToolResult):
    """A started training run."""
    run_id: str
    state: LaunchState
    command: list[str] = Field(description="the command the run executes (cwd = workspace root).")
    command_line: str
    run_dir: str
    log_path: str
    output_dir: str
    recipe_copy: str = Field(description="the recipe as launched, copied into the run directory.")
    method: Optional[str] = None
    resumes_from: Optional[str] = Field(None, description="checkpoint the run will resume from, if any.")
    checks: list[str] = Field(description="what was verified before starting.")
    warnings: list[str] = []
    env: dict[str, str] = Field({}, description="environment the run adds (GPU placement).")
    num_processes: int = 1
    gpu_ids: Optional[list[int]] = None
    dry_run: bool = False


def read_yaml_mapping(path: Path) -> dict:
    """A YAML mapping from disk, or {} when it is missing or not a mapping (for advice only)."""
    try:
        return _load_recipe_yaml(path)
    except (UserError, OSError):
        return {}


def _load_recipe_yaml(path: Path) -> dict:
    """The recipe's mapping, by the one recipe YAML reader (the line of a syntax error, the fix)."""
    from .recipe_yaml import load_yaml_mapping
    return load_yaml_mapping(path)


def _check_recipe(recipe_path: Path, accelerate_config: Optional[str], require_memory_fit: bool,
                  checks: list[str], warnings: list[str]):
    """validate_recipe and the memory gate; returns the validation (RecipeValidation)."""
    from tools.recipes import MEMORY_ERROR, validate_recipe  # lazy: the recipe machinery

    v = validate_recipe(recipe=str(recipe_path), accelerate_config=accelerate_config)
    # validate_recipe calls an estimate over the GPU an error; require_memory_fit=false is the
    # user overriding exactly that one (the gate below then warns), never the others.
    errors = [e for e in v.errors if require_memory_fit or not e.startswith(MEMORY_ERROR)]
    if errors or (not v.valid and not v.errors):
        errs = "; ".join(errors) or "(no details)"
        raise UserError(f"the recipe is not valid: {errs}", field="recipe",
                        fix="Fix these (validate_recipe lists them with the migrated YAML), or regenerate "
                            "the recipe with generate_recipe, then launch again.")
    checks.append("validate_recipe: valid")
    warnings.extend(f"recipe: {w}" for w in v.warnings)
    _memory_gate(v, require_memory_fit, checks, warnings)
    return v


@dataclass
class _DpoValidation:
    """What launch needs of a DPO recipe's validation (no memory estimate for DPO yet)."""
    memory: Any = None
    fits: Optional[bool] = None
    accelerate: Any = None


def _check_dpo_recipe(cfg: dict, rpath: Path, checks: list[str]) -> _DpoValidation:
    """A DPO recipe: every path inside the workspace, and TRL's own DPO parser accepts it."""
    from tools.recipes import _outside, recipe_paths
    from tools.train_dpo import parse_dpo_recipe
    root = get_workspace().root
    for key, value in recipe_paths(cfg):
        out = _outside(value, root)
        if out is not None:
            raise UserError(f"{key} '{value}' resolves to {out}, outside the workspace.", field="recipe",
                            fix="Use paths inside the workspace.")
    if cfg.get("trust_remote_code"):
        raise UserError("trust_remote_code is not accepted for DPO recipes here.", field="recipe",
                        fix="Remove trust_remote_code.")
    from tools.recipe_schema import env_guard
    try:
        with env_guard():  # the parse exports the recipe's env: into this (the server's) process
            parse_dpo_recipe(str(rpath))
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"TRL's DPO parser refuses the recipe: {exc}", field="recipe",
                        fix="Regenerate it with generate_dpo_recipe, or fix the key it names.") from exc
    trainer = str(cfg.get("trainer", "dpo")).upper()
    checks.append(f"{trainer} recipe: parsed by TRL's {trainer}Config; paths inside the workspace")
    return _DpoValidation()


def _check_preference(cfg: dict, checks: list[str], warnings: list[str]) -> None:
    """The DPO gate: a verify_preference report for exactly the recipe's inputs, not failed."""
    from tools.preference import find_preference_report, recipe_preference
    tok, inputs, st = recipe_preference(cfg)
    if not inputs or not tok:
        raise UserError("names no dataset or no model.", field="recipe",
                        fix="Set dataset_name and model_name_or_path in the recipe.")
    for dataset, split in inputs:
        rep = find_preference_report(dataset, tok, split=split, **st)
        if rep is None:
            raise UserError(f"no preference report matches {dataset} with {tok} and {st}.", field="recipe",
                            fix="Call verify_preference(recipe=<this recipe>) and check its verdict, then "
                                "launch again; or pass require_masking_report=false to skip this check.")
        if rep.verdict == "fail":
            failed = "; ".join(r.message for r in rep.reasons if r.severity == "fail")[:600]
            raise UserError(f"the preference report for {dataset} failed ({failed}).", field="recipe",
                            fix="Fix the pairs (convert_preference) or the settings, verify again, launch.")
        if rep.verdict == "warn":
            warnings.append(f"preference report for {dataset}: verdict warn (read it before trusting the run)")
        checks.append(f"preference report for {dataset} [{split}]: {rep.verdict}")


def _memory_gate(v, require_memory_fit: bool, checks: list[str], warnings: list[str]) -> None:
    mem, fits = v.memory, v.fits
    if fits is None and mem is not None:
        fits = mem.fits
    total = mem.total_gib if mem else None
    gpu = mem.gpu_memory_gib if mem else None
    if fits is False:
        msg = (f"the estimated peak memory ({total} GiB) does not fit the GPU ({gpu} GiB)."
               if total is not None else "the estimated peak memory does not fit the GPU.")
        if require_memory_fit:
            raise UserError(msg, field="recipe",
                            fix="Lower per_device_train_batch_size (raise gradient_accumulation_steps), "
                                "turn gradient_checkpointing on, shorten max_length, or switch to qlora "
                                "(recommend_method / estimate_memory show what fits); or pass "
                                "require_memory_fit=false to launch anyway.")
        warnings.append(f"memory: {msg} Launched anyway (require_memory_fit=false).")
    elif fits is True:
        checks.append(f"memory fit: {total} GiB estimated, fits {gpu} GiB")
    else:
        checks.append("memory fit: unknown (no GPU size known; CPU run or no GPU described)")


def _with_overrides(rpath: Path, cfg: dict, overrides: dict, warnings: list[str]) -> tuple[Path, dict]:
    """The recipe with `overrides` applied, written next to it (the original is never edited), so
    what runs is a file the user can read and launch again."""
    import yaml

    from tools.recipes import apply_overrides  # lazy: the recipe machinery
    new = apply_overrides(cfg, overrides, warnings)
    path = rpath.with_name(f"{rpath.stem}.override.yaml")
    get_workspace().write_text(path, yaml.safe_dump(new, sort_keys=False), field="overrides")
    warnings.append(f"overrides {overrides} applied: the run uses {get_workspace().rel(path)}.")
    return path, new


def _check_disk(cfg: dict, output_dir: Path, v, checks: list[str]) -> None:
    """Refuse to start when the checkpoints and the final model will not fit on the disk.
    v: validate_recipe's result (its memory estimate and accelerate summary)."""
    mem = v.memory
    if mem is None:
        checks.append("disk: not estimated (no memory estimate for this model)")
        return
    from .launch_plan import disk_needed
    steps = cfg.get("max_steps") if isinstance(cfg.get("max_steps"), int) and cfg["max_steps"] > 0 else None
    save = cfg.get("save_steps", 500)
    if cfg.get("save_strategy") == "no":
        saves = 0
    elif isinstance(save, float) and 0 < save < 1:
        saves = int(1 / save)  # a fraction of the run
    else:
        saves = max(1, steps // int(save)) if steps and save else 2
    sharding = "zero3" if v.accelerate is not None and v.accelerate.sharding == "zero3" else "none"
    dtype = str(cfg.get("dtype", "float32"))
    need = disk_needed(mem.method, mem.total_params, mem.trainable_params, save_total_limit=cfg.get("save_total_limit"),
                       save_steps_count=saves, sharding=sharding, weight_bytes=4 if dtype == "float32" else 2)
    probe = output_dir if output_dir.exists() else next(p for p in output_dir.parents if p.exists())
    free = shutil.disk_usage(probe).free / GIB
    if need.total_gib > free:
        raise UserError(f"the run needs about {need.total_gib:.1f} GiB of disk ({need.why}) but {probe} has "
                        f"{free:.1f} GiB free.", field="recipe",
                        fix="Free disk space, lower save_total_limit (checkpoints kept), or point output_dir "
                            "at a larger disk inside the workspace.")
    checks.append(f"disk: ~{need.total_gib:.1f} GiB needed ({need.why}), {free:.0f} GiB free")


def _check_masking(cfg: dict, checks: list[str], warnings: list[str]) -> None:
    from tools.masking import find_masking_report, recipe_masking  # lazy

    rm = recipe_masking(cfg)
    tokenizer, settings, inputs = rm.tokenizer, rm.settings, rm.inputs
    if not inputs or not tokenizer:
        raise UserError("names no dataset or no model, so no masking report can match it.", field="recipe",
                        fix="Set dataset_name (or datasets:) and model_name_or_path in the recipe.")
    for dataset, split in inputs:
        call_args = ", ".join(
            [f"dataset='{dataset}'", f"tokenizer='{tokenizer}'"]
            + [f"{k if k != 'chat_template_path' else 'chat_template'}={v!r}" for k, v in settings.items()]
            + ([f"split='{split}'"] if split != "train" else []))
        rep = find_masking_report(dataset, str(tokenizer), split=split, **settings)
        if rep is None:
            raise UserError(
                f"no masking report matches this dataset ({dataset}), tokenizer ({tokenizer}) and these "
                f"masking settings {settings}.", field="recipe",
                fix=f"Call verify_masking({call_args}) and check that its verdict is pass, then launch "
                    "again; or pass require_masking_report=false to skip this check.")
        verdict = rep.verdict
        if verdict == "fail":
            failed = "; ".join(r.message for r in rep.reasons if r.severity == "fail")[:600]
            raise UserError(
                f"the masking report for {dataset} failed: TRL would train on the wrong tokens"
                + (f" ({failed})" if failed else "") + ".",
                field="recipe",
                fix="Read the verify_masking report, fix the dataset (convert_dataset) or the masking "
                    "settings (completion_only_loss / assistant_only_loss / chat_template_path), run "
                    "verify_masking again, then launch.")
        if verdict == "warn":
            warnings.append(f"masking report for {dataset}: verdict warn (read it before trusting the run)")
        checks.append(f"masking report for {dataset} [{split}]: {verdict}")


def _last_checkpoint(output_dir: Path) -> Optional[str]:
    """The newest checkpoint-N in output_dir (the run resumes from it), or None."""
    if not output_dir.is_dir():
        return None
    ckpts = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()]
    return str(max(ckpts, key=lambda p: int(p.name[11:]))) if ckpts else None


def _earlier_run(output_dir: Path) -> dict:
    """The run a resume continues (newest earlier training run into the same output_dir), and
    the first run of that chain: one logical run id across resumes."""
    prev = [d for d in (describe(r) for r in list_run_dirs())
            if d.get("kind") == TRAIN_KIND and output_dir_of(d) == output_dir]
    if not prev:
        return {}
    last = max(prev, key=lambda d: float(d.get("created_ts") or 0))
    first = (last.get("meta") or {}).get("logical_run") or last["run_id"]
    return {"continues_run": last["run_id"], "logical_run": first}


def _plan_run(cfg: dict, recipe_copy: Path, acc_path: Optional[Path], num_processes: Optional[int],
              gpu_ids: Optional[list[int]], checks: list[str], warnings: list[str],
              module: str = "tools.train"):
    """The launch plan (argv, environment, process count) for this host's GPUs."""
    from .hardware import detect_hardware
    plan = plan_launch(["-m", module, "--config", str(recipe_copy)], num_processes=num_processes,
                       gpu_ids=gpu_ids, acc_path=acc_path,
                       acc_copy=recipe_copy.with_name("accelerate_config.yaml") if acc_path else None,
                       gpus_present=detect_hardware().gpu_count, recipe_use_cpu=bool(cfg.get("use_cpu")))
    warnings.extend(plan.notes)
    checks.append(f"{plan.world_size} process(es) ({plan.count_from})"
                  + (f" on GPUs {gpu_ids}" if gpu_ids is not None else ""))
    return plan


def _checked_start(cfg: dict, rpath: Path, output_dir: Path, out: str, acc_path: Optional[Path],
                   num_processes: Optional[int], gpu_ids: Optional[list[int]], require_masking_report: bool,
                   require_memory_fit: bool, force: bool, name: Optional[str], dry_run: bool,
                   checks: list[str], warnings: list[str]):
    """The launch gates, then the start; run under the output_dir lock so two launches of one
    recipe cannot both pass the conflict check."""
    # Cheap conflicts first (no heavy imports).
    for st in active_runs():
        if output_dir_of(st) == output_dir:
            raise UserError(f"run '{st['run_id']}' ({st['state']}) is already writing to {out}.",
                            field="recipe",
                            fix=f"Wait for it or stop it (stop_training run_id='{st['run_id']}'), or set "
                                "another output_dir.")
    check_devices_free(gpu_ids, force=force)
    if force:
        checks.append("device check skipped (force=true)")
    else:
        checks.append("no other run active on these devices")

    from .train_dpo import is_dpo_recipe  # light: imports no TRL at module level
    dpo = is_dpo_recipe(cfg)
    if dpo:
        v = _check_dpo_recipe(cfg, rpath, checks)
    else:
        v = _check_recipe(rpath, str(acc_path) if acc_path else None, require_memory_fit, checks, warnings)
    _check_disk(cfg, output_dir, v, checks)
    if not require_masking_report:
        checks.append("masking report: not required (require_masking_report=false)")
    elif dpo:
        _check_preference(cfg, checks, warnings)
    else:
        _check_masking(cfg, checks, warnings)

    resumes_from = _last_checkpoint(output_dir)
    method = infer_method(cfg)
    run_name = name or output_dir.name
    rid = "<run_id>" if dry_run else new_run_id(TRAIN_KIND, run_name)
    rdir = run_dir_for(rid, must_exist=False) if not dry_run else get_workspace().owned_dir("runs") / rid
    recipe_copy = rdir / "recipe.yaml"
    try:
        plan = _plan_run(cfg, recipe_copy, acc_path, num_processes, gpu_ids, checks, warnings,
                         module="tools.train_dpo" if dpo else "tools.train")
        if not dry_run:
            meta = {"output_dir": str(output_dir), "recipe": str(rpath), "recipe_copy": str(recipe_copy),
                    "method": method, "base_model": cfg.get("model_name_or_path"),
                    "num_processes": plan.world_size, "accelerate_config": str(acc_path) if acc_path else None,
                    "resumes_from": resumes_from, "max_steps": cfg.get("max_steps"),
                    "trainer": cfg.get("trainer") or "sft"}
            if resumes_from:
                meta.update(_earlier_run(output_dir))
            shutil.copyfile(rpath, recipe_copy)
            if acc_path:
                shutil.copyfile(acc_path, rdir / "accelerate_config.yaml")
            start_job(TRAIN_KIND, plan.argv, name=run_name, meta=meta, force=force, run_id=rid, gpu_ids=gpu_ids,
                      env={"TOKENIZERS_PARALLELISM": "false", **plan.env})
    except BaseException:
        if not dry_run and not (rdir / STATUS).exists():
            shutil.rmtree(rdir, ignore_errors=True)  # a run that never started leaves no folder
        raise
    return _Started(rid, plan, rdir, recipe_copy, resumes_from, method)


@dataclass
class _Started:
    """A run that passed its checks (and, unless a dry run, was started)."""
    run_id: str
    plan: Any
    run_dir: Path
    recipe_copy: Path
    resumes_from: Optional[str]
    method: Optional[str]


def launch_training(
    recipe: Annotated[str, Field(description="Recipe YAML (from generate_recipe).")],
    num_processes: Annotated[Optional[int], Field(ge=1, le=1024)] = None,
    gpu_ids: GpuIds = None,
    accelerate_config: Optional[str] = None,
    require_masking_report: bool = True,
    require_memory_fit: bool = True,
    force: bool = False,
    name: Annotated[Optional[str], Field(max_length=60)] = None,
    allow_remote_code: bool = False,
    dry_run: bool = False,
    overrides: Annotated[Optional[dict[str, Any]], Field(
        description="Recipe keys to change (null removes).")] = None,
) -> LaunchResult:
    """Start training in the background after its checks (valid recipe, memory fit, passing
    masking report, free GPUs); returns a run id at once. Poll training_status every 30-60 s.

    Runs `python -m tools.train --config <recipe>` (or `accelerate launch --num_processes N
    [--config_file F] -m tools.train`; `trainer: dpo` recipes run tools.train_dpo) with the
    workspace as cwd; output in <workspace>/runs/<run_id>/log.txt. If output_dir already holds a
    checkpoint-* the run resumes from the last one. stop_training stops it with a checkpoint.

    Parameters:
    - num_processes: processes in all (default: one per gpu_ids, else the accelerate config's,
      else 1). gpu_ids: the GPUs this run uses (CUDA_VISIBLE_DEVICES); other runs may use others.
    - accelerate_config: an accelerate config YAML: DeepSpeed ZeRO / FSDP / multi-GPU config in the workspace; implies
      accelerate launch.
    - require_masking_report: refuse to start without a verify_masking report (pass or warn) for
      exactly this dataset, tokenizer and masking settings. require_memory_fit: refuse when the
      memory estimate says it does not fit. force: start even if another run uses the same GPUs.
    - name: a label for the run (default: the output_dir name).
    - allow_remote_code: allow a recipe with trust_remote_code: true (runs the model repo's Python
      code in the training process). Off by default.
    - dry_run: run every check and return the exact command and environment; start nothing.
    - overrides: recipe keys to change for this launch (null removes one), e.g. training_status's
      suggested_overrides after an OOM; written to <recipe>.override.yaml first.
    """
    ws = get_workspace()
    rpath = ws.resolve(recipe, field="recipe", must_exist=True, kind="file")
    cfg = _load_recipe_yaml(rpath)
    checks: list[str] = []
    warnings: list[str] = []
    if overrides:
        rpath, cfg = _with_overrides(rpath, cfg, overrides, warnings)

    out = cfg.get("output_dir")
    if not out:
        raise UserError("has no output_dir.", field="recipe",
                        fix="Add `output_dir: <dir in the workspace>` (checkpoints, adapter, metrics go there).")
    output_dir = ws.resolve(out, field="output_dir")
    if cfg.get("trust_remote_code") and not allow_remote_code:
        raise UserError("sets trust_remote_code: true, which runs the model repository's own Python code "
                        "in the training process.", field="recipe",
                        fix="Read the model's modeling_*.py first; then pass allow_remote_code=true, or "
                            "remove trust_remote_code from the recipe (most current models need none).")
    acc_path = None
    if accelerate_config:
        acc_path = ws.resolve(accelerate_config, field="accelerate_config", must_exist=True, kind="file")

    with exclusive(output_dir, field="output_dir", what="launching a run into") as created:
        try:
            started = _checked_start(
                cfg, rpath, output_dir, out, acc_path, num_processes, gpu_ids, require_masking_report,
                require_memory_fit, force, name, dry_run, checks, warnings)
        except BaseException:
            if created:
                with contextlib.suppress(OSError):
                    output_dir.rmdir()  # only the empty folder the lock made
            raise
    if dry_run and created:
        with contextlib.suppress(OSError):
            output_dir.rmdir()  # a dry run leaves nothing behind
    return _launch_result(started, rpath, output_dir, gpu_ids, dry_run, checks, warnings)


def _launch_result(st: _Started, rpath: Path, output_dir: Path, gpu_ids: Optional[list[int]],
                   dry_run: bool, checks: list[str], warnings: list[str]) -> LaunchResult:
    """The started (or dry-run) launch as the agent reads it: the command, what was checked, the
    sentence to relay and the next call."""
    import shlex
    ws, plan, rid, method, resumes_from = get_workspace(), st.plan, st.run_id, st.method, st.resumes_from
    rdir, recipe_copy = st.run_dir, st.recipe_copy
    env_line = " ".join(f"{k}={v}" for k, v in plan.env.items())
    where = f"GPUs {gpu_ids}" if gpu_ids is not None else (
        f"{plan.world_size} processes" if plan.world_size > 1 else "1 process")
    summary = (f"Dry run: {len(checks)} checks passed for {method or 'the'} run into "
               f"{ws.rel(output_dir)} on {where}; nothing was started." if dry_run else
               f"Started {method or ''} training run {rid} on {where}"
               + (f", resuming from {Path(resumes_from).name}" if resumes_from else "")
               + f"; output in {ws.rel(output_dir)}.")
    again = f"launch_training(recipe='{ws.rel(rpath)}'" + (f", gpu_ids={gpu_ids}" if gpu_ids else "") + ")"
    return LaunchResult(
        summary=summary.replace("  ", " "),
        run_id=rid, state="dry_run" if dry_run else "running", command=plan.argv,
        command_line=(env_line + " " if env_line else "") + shlex.join(plan.argv), run_dir=str(rdir),
        log_path=str(rdir / LOG), output_dir=str(output_dir), recipe_copy=str(recipe_copy),
        method=method, resumes_from=resumes_from, checks=checks, warnings=warnings, env=plan.env,
        num_processes=plan.world_size, gpu_ids=gpu_ids, dry_run=dry_run,
        next_steps=([f"{again} to start it (same checks, without dry_run)."] if dry_run else
                    [f"training_status(run_id='{rid}') every 30-60 s."]))


# ============================================================================ status

class TrainingStatus(ToolResult):
    """Where a run stands: state, progress, latest metrics, ETA, log tail, error when failed."""
    run_id: str
    kind: Optional[str] = None
    name: Optional[str] = None
    state: State
    reason: Optional[str] = Field(None, description="why it is failed/stopped (or a note while running).")
    exit_code: Optional[int] = None
    created: Optional[str] = None
    started: Optional[str] = None
    ended: Optional[str] = None
    elapsed_s: Optional[float] = None
    method: Optional[str] = None
    output_dir: Optional[str] = None
    step: Optional[int] = None
    max_steps: Optional[int] = None
    progress_pct: Optional[float] = None
    epoch: Optional[float] = None
    loss: Optional[float] = Field(None, description="latest logged training loss.")
    first_loss: Optional[float] = None
    eval_loss: Optional[float] = None
    learning_rate: Optional[float] = None
    grad_norm: Optional[float] = None
    tokens_per_second: Optional[float] = None
    seconds_per_step: Optional[float] = None
    eta_s: Optional[float] = None
    eta: Optional[str] = None
    peak_memory_gib: Optional[float] = None
    peak_reserved_gib: Optional[float] = Field(None, description="CUDA allocator peak (GPU runs; None on CPU): "
                                               "compare estimate_memory's peak_reserved_gib.")
    num_tokens: Optional[float] = None
    last_checkpoint: Optional[str] = None
    run_summary: Optional[dict[str, Any]] = Field(
        None, description="summary.json of a training run once written; an evaluation's metrics table.")
    error: Optional[str] = Field(None, description="the exception line from the log when it failed.")
    warnings: list[str] = []
    log_path: Optional[str] = None
    log_tail: list[str] = []
    loss_plot_path: Optional[str] = Field(None, description="PNG of the loss curve (also returned as an image).")
    suggested_overrides: Optional[dict[str, Any]] = Field(
        None, description="after an OOM: recipe keys to relaunch with (launch_training overrides=).")
    tracking: Optional[dict[str, Any]] = Field(
        None, description="report_to tracker and its local log folder, when the recipe sets one.")
    continues_run: Optional[str] = Field(None, description="the run this one resumed.")
    logical_run: Optional[str] = Field(None, description="first run id of a chain of resumes.")
    method_metrics: Optional[dict[str, Any]] = Field(
        None, description="preference/RL runs: the trainer's own metrics (DPO reward margins and "
                          "accuracies, GRPO reward per function, KL) with plain readings.")

    @model_serializer(mode="wrap")
    def _drop_training_fields(self, handler):
        data = handler(self)
        if self.kind == EVAL_KIND:  # an evaluation has no loss, steps or checkpoints
            for k in TRAINING_ONLY:
                data.pop(k, None)
        return data


def _read_metrics(output_dir: Path) -> list[dict]:
    p = output_dir / "metrics.jsonl"
    recs = []
    try:
        for line in p.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written
            if isinstance(r, dict):
                recs.append(r)
    except FileNotFoundError:
        pass
    return recs


_WRAPPER_ERRORS = ("ChildFailedError", "CalledProcessError")


def error_from_log(lines: list[str]) -> Optional[str]:
    """The most telling exception line of a log: the last `XxxError: message` that is not a
    launcher wrapper (torchrun's ChildFailedError), with any `[rankN]:` prefix removed."""
    import re
    pat = re.compile(r"^(?:\[rank\d+\]:\s*)?((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Interrupt|Exit))"
                     r"(?::\s*(.*))?$")
    found = []
    for ln in lines:
        m = pat.match(ln.strip())
        if m:
            found.append((m.group(1), ln.strip()))
    if not found:
        return None
    real = [line for exc, line in found if not exc.endswith(_WRAPPER_ERRORS)]
    best = (real or [line for _, line in found])[-1]
    return re.sub(r"^\[rank\d+\]:\s*", "", best)[:1000]


def _fmt_eta(s: float | None) -> str | None:
    if s is None or not math.isfinite(s):
        return None
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


def _plot_loss(metrics: list[dict], png: Path, title: str, key: str = "loss") -> Optional[Path]:
    """The training curve of `key` (GRPO: the reward; its loss sits near 0) and the eval loss."""
    train = [(r["step"], r[key]) for r in metrics if isinstance(r.get(key), (int, float))
             and isinstance(r.get("step"), (int, float)) and math.isfinite(r[key])]
    evals = [(r["step"], r["eval_loss"]) for r in metrics if isinstance(r.get("eval_loss"), (int, float))]
    if not train and not evals:
        return None
    src = png.parent / ".plot_source"
    stamp = json.dumps([train[-1:], len(train), len(evals), title, key])
    if png.exists() and src.exists() and src.read_text() == stamp:
        return png  # nothing new since the last render
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=100)
    try:
        if train:  # a marker, so a one-point curve is not a blank image
            ax.plot(*zip(*train), "o-" if len(train) < 20 else "-", label=f"train {key}", lw=1.5, ms=3)
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval loss", lw=1.5)
        from matplotlib.ticker import MaxNLocator
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        tmp = png.with_name(f".{png.name}.tmp.png")
        fig.savefig(tmp, format="png")
        tmp.replace(png)
        src.write_text(stamp)
    finally:
        plt.close(fig)
    return png


def _ts(iso: Optional[str]) -> Optional[float]:
    if not iso:
        return None
    from datetime import datetime
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


def training_status(
    run_id: str,
    log_lines: Annotated[int, Field(ge=0, le=500)] = 20,
    plot: Annotated[bool, Field(description="Add the loss-curve image.")] = True,
) -> TrainingStatus:
    """State of a training or evaluation run: step/total, loss, learning rate, tokens/s, ETA, peak
    memory, log tail, the error when failed (with overrides after an OOM), a loss-curve image.

    Works for any run in the workspace, including those started before a server restart.
    Evaluation runs (evaluate background=true) show their metrics table in run_summary.
    log_lines: the last log lines included."""
    rdir = run_dir_for(run_id)
    d = describe(rdir)
    meta = d.get("meta") or {}
    state = d["state"]
    out_dir = output_dir_of(d)
    res = TrainingStatus(run_id=run_id, kind=d.get("kind"), name=d.get("name"), state=state,
                         reason=d.get("reason"), exit_code=d.get("exit_code"), created=d.get("created"),
                         started=d.get("started"), ended=d.get("ended"), method=meta.get("method"),
                         output_dir=str(out_dir) if out_dir else None, log_path=str(rdir / LOG))
    start_ts = d.get("created_ts")
    end_ts = d.get("ended_ts") or (_ts(d.get("ended")) if d.get("ended") else None)
    if start_ts:
        res.elapsed_s = round((end_ts or time.time()) - float(start_ts), 1)
    res.continues_run, res.logical_run = meta.get("continues_run"), meta.get("logical_run")

    tail = log_tail(rdir, max(log_lines, 200))
    res.log_tail = tail[-log_lines:] if log_lines else []
    if d.get("kind") == EVAL_KIND:
        return _eval_status(res, out_dir, state, start_ts)
    metrics = _training_view(res, Path(res.output_dir), meta, state, start_ts) if res.output_dir else []
    _next_step(res, d, meta, state, tail)
    res.summary = _status_sentence(res)
    return _finish_status(res, plot, metrics, rdir, run_id, state)


def _fmt(x: Optional[float]) -> str:
    return "?" if x is None else f"{x:.4g}"


def _status_sentence(res: "TrainingStatus") -> str:
    """The one line to tell the user about a training run."""
    head = f"Run {res.run_id} is {res.state}"
    if res.step is not None and res.max_steps:
        head += f" at step {res.step}/{res.max_steps} ({res.progress_pct}%)"
    parts = [head]
    if res.loss is not None:
        parts.append(f"loss {_fmt(res.loss)}" + (f" (from {_fmt(res.first_loss)})"
                                                  if res.first_loss not in (None, res.loss) else ""))
    if res.eval_loss is not None:
        parts.append(f"eval loss {_fmt(res.eval_loss)}")
    if res.eta and res.state == "running":
        parts.append(f"ETA {res.eta}")
    text = ", ".join(parts) + "."
    if res.error:
        text += f" Error: {res.error}"
    elif res.warnings:
        text += f" Warning: {res.warnings[0]}"
    return short(text, SUMMARY_MAX_CHARS)


def _training_view(res: "TrainingStatus", out: Path, meta: dict, state: str, start_ts) -> list[dict]:
    """Progress, losses, rates and ETA from the files tools.train writes in output_dir."""
    metrics = _read_metrics(out)
    prog = read_json(out / "progress.json")
    summ = read_json(out / "summary.json")
    # summary.json / progress.json left by an earlier run in the same output_dir are stale.
    fresh = (lambda rec: not start_ts or float(rec.get("timestamp") or rec.get("started") or 0)
             >= float(start_ts) - 1)
    if summ and fresh(summ):
        res.run_summary = summ
    if prog and fresh(prog):
        res.step, res.max_steps = prog.get("step"), prog.get("max_steps")
        res.epoch, res.seconds_per_step = prog.get("epoch"), prog.get("seconds_per_step")
    if meta.get("trainer") in PREFERENCE_TRAINERS:
        from .preference_status import method_metrics
        res.method_metrics = method_metrics(meta["trainer"], metrics)
    train_recs = [r for r in metrics if isinstance(r.get("loss"), (int, float))]
    if train_recs:
        _latest_losses(res, metrics, train_recs)
    evals = [r for r in metrics if isinstance(r.get("eval_loss"), (int, float))]
    if evals:
        res.eval_loss = evals[-1]["eval_loss"]
    if res.run_summary:
        s = res.run_summary
        res.step = s.get("steps", res.step)
        res.max_steps = s.get("max_steps", res.max_steps)
        res.peak_memory_gib = s.get("peak_memory_gib") or res.peak_memory_gib
        res.peak_reserved_gib = s.get("peak_reserved_gib") or res.peak_reserved_gib
        res.last_checkpoint = s.get("last_checkpoint")
    if res.max_steps is None and isinstance(meta.get("max_steps"), int) and meta["max_steps"] > 0:
        res.max_steps = meta["max_steps"]
    if res.last_checkpoint is None:
        res.last_checkpoint = _last_checkpoint(out)
    _resume_warnings(res, read_json(out / "resume.json"), fresh)
    res.tracking = _tracking(meta)
    _eta(res, state)
    _loss_warnings(res, [r["loss"] for r in train_recs])
    return metrics


def _tracking(meta: dict) -> Optional[dict[str, Any]]:
    """The recipe's tracker and where it logs (its env folder, else the Trainer's default)."""
    recipe = meta.get("recipe_copy") or meta.get("recipe")
    cfg = read_yaml_mapping(Path(recipe)) if recipe and Path(recipe).is_file() else {}
    reps = cfg.get("report_to")
    reps = [reps] if isinstance(reps, str) else [r for r in reps or [] if isinstance(r, str)]
    reps = [r for r in reps if r not in ("none", "")]
    if not reps:
        return None
    env = cfg.get("env") if isinstance(cfg.get("env"), dict) else {}
    dirs = {r: env.get(v) for r, v in (("tensorboard", "TENSORBOARD_LOGGING_DIR"),
                                        ("trackio", "TRACKIO_DIR"), ("wandb", "WANDB_DIR")) if r in reps}
    root = get_workspace().root
    return {"report_to": reps,
            "log_dirs": {r: str((root / d).resolve()) if d else "the tracker's default" for r, d in dirs.items()}}


def _latest_losses(res: "TrainingStatus", metrics: list[dict], train_recs: list[dict]) -> None:
    last = train_recs[-1]
    res.loss, res.first_loss = last.get("loss"), train_recs[0].get("loss")
    res.learning_rate, res.grad_norm = last.get("learning_rate"), last.get("grad_norm")
    res.num_tokens = last.get("num_tokens")
    tps = [r["tokens_per_second"] for r in train_recs[-5:]
           if isinstance(r.get("tokens_per_second"), (int, float))]
    res.tokens_per_second = round(sum(tps) / len(tps), 1) if tps else None
    res.peak_memory_gib = max((r.get("peak_memory_gib") or 0) for r in metrics) or None
    res.peak_reserved_gib = max((r.get("peak_reserved_gib") or 0) for r in metrics) or None
    if res.step is None:
        res.step, res.epoch = last.get("step"), last.get("epoch")


def _eta(res: "TrainingStatus", state: str) -> None:
    if res.seconds_per_step is None and res.step and res.elapsed_s and state == "running":
        res.seconds_per_step = round(res.elapsed_s / res.step, 3)  # before a second step lands
    if res.step is not None and res.max_steps:
        res.progress_pct = round(100.0 * res.step / res.max_steps, 1)
        if state == "running" and res.seconds_per_step:
            res.eta_s = round(max(res.max_steps - res.step, 0) * res.seconds_per_step, 1)
            res.eta = _fmt_eta(res.eta_s)


def _loss_warnings(res: "TrainingStatus", losses: list) -> None:
    if any(isinstance(x, float) and not math.isfinite(x) for x in losses):
        res.warnings.append("loss is NaN/inf: see references/troubleshooting.md (NaN or zero loss).")
    elif len(losses) >= 3 and all(x == 0 for x in losses[-3:]):
        res.warnings.append("loss is exactly 0: nothing is trained on (every label masked?) - "
                            "see references/troubleshooting.md.")


def _next_step(res: "TrainingStatus", d: dict, meta: dict, state: str, tail: list[str]) -> None:
    """The calls the agent should make now (and, after an OOM, the overrides to relaunch with)."""
    recipe = _rel(meta.get("recipe"))
    if state == "failed":
        res.error = error_from_log(tail) or (res.run_summary or {}).get("error") or d.get("reason")
        if res.error and ("OutOfMemoryError" in res.error or "out of memory" in res.error.lower()):
            _oom_advice(res, meta)
            return
        res.next_steps = [f"Read `error` and log_tail (references/troubleshooting.md lists the usual "
                          f"causes), fix the recipe, then launch_training(recipe='{recipe}'): it resumes "
                          "from the last checkpoint in output_dir if there is one."]
    elif state == "stopped":
        res.next_steps = [f"launch_training(recipe='{recipe}') to resume from {res.last_checkpoint}."
                          if res.last_checkpoint else f"launch_training(recipe='{recipe}') to start again."]
    elif state == "completed" and d.get("kind") == TRAIN_KIND:
        out = _rel(res.output_dir)
        if (res.method or "") in ("lora", "qlora"):
            res.next_steps = [f"merge_adapter(adapter='{out}')",
                              f"evaluate(adapter='{out}', local_task=<test split>) for base vs tuned"]
        else:
            res.next_steps = [f"evaluate(model='{out}', compare_with='{meta.get('base_model')}', "
                              "local_task=<test split>)"]
        res.next_steps.append(f"generate(model=..., adapter='{out}') to read a few replies")
    elif state in ("queued", "running"):
        res.next_steps = [f"training_status(run_id='{res.run_id}') again in 30-60 s."]


def _rel(path: Optional[str]) -> Optional[str]:
    """A path as the agent passes it back: relative to the workspace when inside it."""
    return get_workspace().rel(Path(path)) if path else path


def _resume_warnings(res: "TrainingStatus", resume: Optional[dict], fresh) -> None:
    if not resume or not fresh(resume):
        return
    changed = resume.get("cadence_changed") or {}
    if changed:
        text = ", ".join(f"{k} {v[1]} (the checkpoint had {v[0]})" for k, v in sorted(changed.items())
                         if isinstance(v, list) and len(v) == 2)
        res.warnings.append(f"resumed at step {resume.get('step')} with the edited recipe's cadence: "
                            f"{text}. Trainer would have kept the checkpoint's values.")


def _eval_status(res: "TrainingStatus", out_dir: Optional[Path], state: str,
                 start_ts) -> "TrainingStatus":
    """An evaluation run: its metrics from results.json (or its error), not a training view."""
    results = read_json(out_dir / "results.json") if out_dir else None
    fresh = results and (not start_ts or (out_dir / "results.json").stat().st_mtime >= float(start_ts) - 1)
    if results and fresh:
        res.run_summary = {k: results.get(k) for k in ("table", "comparison", "notes", "results_file")}
        res.run_summary["metrics"] = {r.get("label"): r.get("metrics") for r in results.get("runs") or []}
    if state == "failed":
        err = read_json(out_dir / "error.json") if out_dir else None
        res.error = (err or {}).get("error") or error_from_log(res.log_tail) or res.reason
        res.next_steps = ["Read `error`, fix the evaluate arguments, and call evaluate again."]
        res.summary = short(f"Evaluation {res.run_id} failed: {res.error}", SUMMARY_MAX_CHARS)
    elif state == "completed":
        res.next_steps = (["generate(...) on a few test rows: read replies before trusting the numbers."]
                          if res.run_summary else ["results.json is missing: read log_tail."])
        res.summary = _eval_sentence(res)
        if results and fresh and results.get("summary"):  # evaluate's own sentence and calls
            res.summary = short(f"Evaluation {res.run_id}: {results['summary']}", SUMMARY_MAX_CHARS)
            res.next_steps = results.get("next_steps") or res.next_steps
    else:
        res.next_steps = [f"training_status(run_id='{res.run_id}') again in 30-60 s."]
        res.summary = f"Evaluation {res.run_id} is {state}."
    return res


def _eval_sentence(res: "TrainingStatus") -> str:
    """Each evaluated model's first metrics, e.g. 'base: rougeL 0.21; tuned: rougeL 0.48'."""
    metrics = (res.run_summary or {}).get("metrics") or {}
    parts = []
    for label, values in metrics.items():  # values: evaluate's TaskMetric dicts
        shown = [f"{m.get('metric')} {_fmt(m.get('value'))}" for m in (values or [])
                 if isinstance(m, dict) and isinstance(m.get("value"), (int, float))][:2]
        parts.append(f"{label}: {', '.join(shown) or 'no metric'}")
    return short(f"Evaluation {res.run_id} completed. " + "; ".join(parts), SUMMARY_MAX_CHARS)


def _finish_status(res: "TrainingStatus", plot: bool, metrics: list[dict], rdir: Path, run_id: str,
                   state: str) -> "TrainingStatus":
    if plot and metrics:
        try:
            key = "reward" if res.method_metrics and res.method_metrics.get("trainer") == "grpo" else "loss"
            p = _plot_loss(metrics, rdir / "loss.png", f"{run_id} ({state})", key=key)
            res.loss_plot_path = str(p) if p else None
        except Exception as exc:  # noqa: BLE001 - a plot must never hide the status
            res.warnings.append(f"loss plot not rendered: {type(exc).__name__}: {exc}")
    return res


def _oom_advice(res: "TrainingStatus", meta: dict) -> None:
    """Which setting to lower after an out-of-memory crash, as overrides the agent can relaunch
    with (same global batch where possible)."""
    recipe = meta.get("recipe_copy") or meta.get("recipe")
    cfg = read_yaml_mapping(Path(recipe)) if recipe else {}
    mb = int(cfg.get("per_device_train_batch_size") or 8)  # TRL's default is 8
    ga = int(cfg.get("gradient_accumulation_steps") or 1)
    ckpt = cfg.get("activation_checkpointing", cfg.get("gradient_checkpointing", True))
    if mb > 1:
        res.suggested_overrides = {"per_device_train_batch_size": mb // 2, "gradient_accumulation_steps": ga * 2}
        why = f"halve the micro-batch ({mb} -> {mb // 2}) and double gradient accumulation: same global batch"
    elif not ckpt:
        res.suggested_overrides = {"activation_checkpointing": True}
        why = "turn activation checkpointing on (~30% more compute, far less activation memory)"
    else:
        res.suggested_overrides = None
        why = ("the micro-batch is already 1 with checkpointing: shorten max_length, use 8-bit Adam "
               "(optim: paged_adamw_8bit), QLoRA, or more GPUs (recommend_method)")
    src = _rel(meta.get("recipe") or recipe)
    res.next_steps = [f"Out of memory: {why}. " + (
        f"Relaunch: launch_training(recipe='{src}', overrides={res.suggested_overrides})."
        if res.suggested_overrides else "See references/troubleshooting.md (OOM).")]


# ============================================================================ stop

class StopResult(ToolResult):
    run_id: str
    state: State
    previous_state: State
    signal_sent: Optional[str] = None
    killed: bool = Field(False, description="SIGKILL was needed (no graceful exit within timeout_s).")
    waited_s: float = 0.0
    last_checkpoint: Optional[str] = None
    message: str


def stop_training(
    run_id: str,
    timeout_s: Annotated[int, Field(ge=0, le=3600, description="Wait for the checkpoint before "
                                                               "SIGKILL.")] = 60,
) -> StopResult:
    """Stop a run, saving a checkpoint (SIGTERM, then SIGKILL after timeout_s); relaunching the
    same recipe resumes from it.

    tools.train saves a checkpoint at the end of the current step and exits on SIGTERM; whatever
    is left of its process group after timeout_s is killed. The run's state becomes stopped."""
    rdir = run_dir_for(run_id)
    d = describe(rdir)
    prev = d["state"]
    out = output_dir_of(d)

    def last_ckpt() -> Optional[str]:
        return _last_checkpoint(out) if out else None

    recipe = _rel((d.get("meta") or {}).get("recipe"))
    relaunch = [f"launch_training(recipe='{recipe}') to resume"] if recipe and d.get("kind") == TRAIN_KIND else []
    if prev not in ("queued", "running"):
        return StopResult(run_id=run_id, state=prev, previous_state=prev, last_checkpoint=last_ckpt(),
                          message=f"run is already {prev}; nothing to stop.",
                          summary=f"Run {run_id} is already {prev}; nothing was stopped.")
    st = update_status(rdir, stop_requested=True, stop_requested_at=now_iso())
    t0 = time.time()
    if not st.get("pid"):
        update_status(rdir, state="stopped", reason="stopped before it started", ended=now_iso(),
                      ended_ts=time.time())
        return StopResult(run_id=run_id, state="stopped", previous_state=prev,
                          message="stopped before its process started.",
                          summary=f"Run {run_id} was stopped before its process started.",
                          next_steps=relaunch)
    signal_run(st, signal.SIGTERM)
    killed = False
    while time.time() - t0 < timeout_s:
        if describe(rdir)["state"] != "running":
            break
        time.sleep(0.5)
    else:
        if describe(rdir)["state"] == "running":
            signal_run(st, signal.SIGKILL)
            killed = True
            time.sleep(0.5)
    d2 = describe(rdir)
    if d2["state"] == "running" or (killed and d2.get("exit_code") is None):
        update_status(rdir, state="stopped", reason=f"killed (SIGKILL) after {timeout_s}s without a "
                      "graceful exit", ended=now_iso(), ended_ts=time.time())
        d2 = describe(rdir)
    ck = last_ckpt()
    msg = ("stopped gracefully" if not killed else f"no graceful exit within {timeout_s}s: killed") + \
        (f"; last checkpoint {ck} (relaunch the same recipe to resume)." if ck else "; no checkpoint saved.")
    return StopResult(run_id=run_id, state=d2["state"], previous_state=prev, signal_sent="SIGTERM" +
                      ("+SIGKILL" if killed else ""), killed=killed, waited_s=round(time.time() - t0, 1),
                      last_checkpoint=ck, message=msg,
                      summary=f"Run {run_id} {msg}"[:SUMMARY_MAX_CHARS],
                      next_steps=relaunch if ck else [])


# ============================================================================ list

class RunInfo(BaseModel):
    run_id: str
    kind: Optional[str] = None
    name: Optional[str] = None
    state: State
    created: Optional[str] = None
    ended: Optional[str] = None
    output_dir: Optional[str] = None
    method: Optional[str] = None
    exit_code: Optional[int] = None


class RunList(ToolResult):
    runs: list[RunInfo]
    active: list[str] = Field(description="ids of queued/running runs.")
    runs_dir: str
    skipped: list[str] = Field([], description="runs whose status.json is malformed (left out, each "
                                              "with the reason).")


def list_runs() -> RunList:
    """Every run in the workspace (oldest first) with its state, kind, name, creation time and
    output_dir, including runs from before a server restart."""
    from .run_registry import runs_root
    runs = []
    skipped: list[str] = []
    for d in list_run_dirs(skipped):
        s = describe(d)
        meta = s.get("meta") or {}
        out = output_dir_of(s)
        runs.append(RunInfo(run_id=s.get("run_id") or d.name, kind=s.get("kind"), name=s.get("name"),
                            state=s["state"], created=s.get("created"), ended=s.get("ended"),
                            output_dir=str(out) if out else None, method=meta.get("method"),
                            exit_code=s.get("exit_code")))
    active = [r.run_id for r in runs if r.state in ("queued", "running")]
    summary = (f"{len(runs)} run(s) in the workspace, {len(active)} active"
               + (f": {', '.join(active[:3])}" if active else "") + "."
               + (f" {len(skipped)} unreadable (see skipped)." if skipped else ""))
    return RunList(runs=runs, active=active, runs_dir=str(runs_root()), skipped=skipped,
                   summary=short(summary, SUMMARY_MAX_CHARS),
                   next_steps=[f"training_status(run_id='{r}')" for r in active[:3]])
