"""The training entrypoint: `python -m tools.train --config recipe.yaml [--key value ...]`.

Also runs under `accelerate launch [--config_file F] -m tools.train --config recipe.yaml`.
The recipe is the flat YAML that `trl sft --config` reads (TrlParser over ScriptArguments,
SFTConfig, ModelConfig, DatasetMixtureConfig), plus one key of ours: `spectrum_config_path`
(a Spectrum YAML with `unfrozen_parameters:` regexes). Command-line `--key value` pairs after
the config override it. Method: spectrum_config_path -> spectrum; use_peft + load_in_4bit ->
qlora; use_peft -> lora; else full.

Writes into `output_dir` (rank 0 only): `metrics.jsonl` (one JSON object per log step),
`progress.json` (step / max_steps / epoch, every step), `summary.json` (at the end, also when
stopped or failed), the adapter or model and the tokenizer. Resumes from the last
`checkpoint-*` in output_dir. SIGTERM stops gracefully: a checkpoint is saved, then the
process exits 0 with `summary.json` status "stopped".
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .memory import GIB
from .recipe_schema import TOOLS_TRAIN_KEYS, infer_method  # runs and train_dpo import infer_method from here too
from .recipe_yaml import load_yaml_mapping
from .spectrum import read_spectrum_patterns
from .workspace import write_json_atomic


_STOP = {"requested": False, "signal": None}


def _on_signal(signum, _frame) -> None:
    """SIGTERM (stop_training) or a first Ctrl-C: stop after this step with a checkpoint.
    A second Ctrl-C interrupts at once."""
    if signum == signal.SIGINT and _STOP["requested"]:
        raise KeyboardInterrupt
    _STOP["requested"] = True
    _STOP["signal"] = signal.Signals(signum).name


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def apply_spectrum(model, patterns: list[str]) -> tuple[int, int, list[str]]:
    """Freeze every parameter, then unfreeze those whose name `re.match`es a pattern.

    Returns (trainable params, total params, trainable names)."""
    regs = [re.compile(p) for p in patterns]
    trainable, total, names = 0, 0, []
    for name, param in model.named_parameters():
        n = _numel(param)
        total += n
        on = any(r.match(name) for r in regs)
        param.requires_grad = on
        if on:
            trainable += n
            names.append(name)
    if not names:
        raise ValueError(f"Spectrum: no parameter name matches any of {patterns[:5]}... "
                         "(was the Spectrum YAML made for another model? run spectrum_scan on this one).")
    return trainable, total, names


# attn_implementation -> the module it needs
FLASH_MODULES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


def kernel_fallbacks(model_args, training_args) -> list[str]:
    """Fall back from kernels this machine cannot run (no CUDA, or the package missing): a recipe
    written for a described GPU names flash-attention or liger, and the model load or the first
    forward would otherwise crash. Returns what was changed, to be said in the log and summary."""
    import importlib.util

    import torch
    cuda = torch.cuda.is_available()
    notes = []
    attn = model_args.attn_implementation
    if attn in FLASH_MODULES:
        missing = None if cuda else "no CUDA GPU here"
        if missing is None and importlib.util.find_spec(FLASH_MODULES[attn]) is None:
            missing = f"the {FLASH_MODULES[attn]} package is not installed"
        if missing:
            model_args.attn_implementation = "sdpa"
            notes.append(f"attn_implementation {attn}: {missing}; using sdpa instead (same results; slower "
                         "on long packed sequences). Install flash-attn on the GPU machine to get it back.")
    if getattr(training_args, "use_liger_kernel", False):
        missing = None if cuda else "no CUDA GPU here"
        if missing is None and importlib.util.find_spec("liger_kernel") is None:
            missing = "the liger-kernel package is not installed"
        if missing:
            training_args.use_liger_kernel = False
            notes.append(f"use_liger_kernel: {missing}; training without liger (more activation memory: "
                         "check estimate_memory with liger=false).")
    return notes


def fp32_master_weights(model, method: str, *, sharded: bool) -> int:
    """Full and Spectrum runs without DeepSpeed/FSDP: cast the *trainable* 16-bit parameters to
    fp32 (frozen ones stay 16-bit) and return how many were cast.

    AdamW stepping bf16 weights rounds most updates away: bf16 keeps 8 bits of mantissa, so a
    weight of 0.02 moves only in steps of ~8e-5, and an update of lr=1e-5 is lost. With fp32
    master weights the updates accumulate, and `bf16: true` still runs the matmuls in bf16
    (autocast). DeepSpeed and FSDP keep fp32 master copies themselves (sharded: left alone).
    The memory cost (2 more bytes per trainable parameter) is in estimate_memory."""
    if method not in ("full", "spectrum") or sharded:
        return 0
    import torch
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
            n += p.numel()
    return n


def _numel(param) -> int:
    """Parameter count: ZeRO-3 partitions (ds_numel) and bitsandbytes 4-bit packing aware."""
    if hasattr(param, "ds_numel"):
        return int(param.ds_numel)
    qs = getattr(param, "quant_state", None)
    if qs is not None and getattr(qs, "shape", None) is not None:
        n = 1
        for d in qs.shape:
            n *= int(d)
        return n
    return param.numel()


def memory_peaks() -> dict[str, float | None]:
    """The run's peak memory so far, as summary.json and metrics.jsonl record it: on CUDA the
    allocated peak and the caching allocator's reserved peak (what nvidia-smi shows, what an OOM
    is decided on; estimate_memory predicts both); on CPU the process's peak RSS and no reserved
    figure (there is no such pool)."""
    try:
        import torch
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return {"peak_memory_gib": round(torch.cuda.max_memory_allocated() / GIB, 4),
                    "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 4)}
    except Exception:  # noqa: BLE001
        pass
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"peak_memory_gib": round(rss / (GIB if sys.platform == "darwin" else 2 ** 20), 4),
            "peak_reserved_gib": None}


CADENCE = ("logging", "eval", "save")


def apply_recipe_cadence(args, state) -> dict[str, list]:
    """On resume the Trainer replaces its state with trainer_state.json, whose logging/eval/save
    steps are the old recipe's: an edited cadence would be ignored silently. Re-apply the
    recipe's (TrainerState.compute_steps is what a fresh run uses); return {key: [old, new]}."""
    before = {k: getattr(state, f"{k}_steps", None) for k in CADENCE}
    state.compute_steps(args, state.max_steps)
    return {f"{k}_steps": [before[k], getattr(state, f"{k}_steps", None)] for k in CADENCE
            if before[k] != getattr(state, f"{k}_steps", None)}


def _progress(state, start_step: int, **extra) -> dict[str, Any]:
    """progress.json: where the run is (training_status reads it)."""
    rec = {"step": state.global_step, "max_steps": state.max_steps, "epoch": state.epoch,
           "num_train_epochs": state.num_train_epochs, "start_step": start_step, **extra}
    rec["stop_requested"] = bool(_STOP["requested"])
    return rec


def _log_record(state, logs: dict) -> dict[str, Any]:
    """One metrics.jsonl line: the Trainer's scalar logs at this step."""
    rec: dict[str, Any] = {"step": state.global_step, "epoch": state.epoch}
    for k, v in logs.items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            rec[k] = v
    if "train_runtime" in logs:  # the final aggregate log: summary.json carries it
        rec["final"] = True
    return rec


def _make_callback(output_dir: Path):
    """A TrainerCallback writing metrics.jsonl / progress.json and honouring SIGTERM."""
    from transformers import TrainerCallback

    class RunFilesCallback(TrainerCallback):
        def __init__(self):
            self.metrics_path = output_dir / "metrics.jsonl"
            self.progress_path = output_dir / "progress.json"
            self.t_begin = time.time()
            self.first: tuple[int, float] | None = None  # (step, time) at the first step end
            self.prev: tuple[float, float] | None = None  # (num_tokens, time) at the last log
            self.start_step = 0
            self.stopped_at: int | None = None

        def on_train_begin(self, args, state, control, **kw):
            self.t_begin = time.time()
            self.start_step = state.global_step
            if state.global_step and state.is_world_process_zero:
                write_json_atomic(output_dir / "resume.json", {
                    "step": state.global_step, "timestamp": time.time(),
                    "cadence_changed": apply_recipe_cadence(args, state)})
            elif state.global_step:
                apply_recipe_cadence(args, state)
            if self._stop_everywhere(args):  # signalled while loading: stop early, nothing to save
                control.should_training_stop = True
                self.stopped_at = state.global_step

        def _stop_everywhere(self, args) -> bool:
            flag = _STOP["requested"]
            if args.world_size > 1:
                import torch
                import torch.distributed as dist
                if dist.is_available() and dist.is_initialized():
                    t = torch.tensor([1.0 if flag else 0.0], device=args.device)
                    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # every rank stops at the same step
                    flag = bool(t.item() > 0)
            return flag

        def on_step_end(self, args, state, control, **kw):
            now = time.time()
            if self.first is None:
                self.first = (state.global_step, now)
            if self._stop_everywhere(args) and self.stopped_at is None:
                control.should_save = True
                control.should_training_stop = True
                self.stopped_at = state.global_step  # the same step on every rank
            if state.is_world_process_zero:
                rate = None
                if self.first and state.global_step > self.first[0]:
                    rate = (now - self.first[1]) / (state.global_step - self.first[0])
                write_json_atomic(self.progress_path, _progress(state, self.start_step, seconds_per_step=rate,
                                                                timestamp=now))
            return control

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            now = time.time()
            rec = _log_record(state, logs)
            ntok = logs.get("num_tokens")
            if ntok is not None:
                if self.prev is None:
                    dt, dn = now - self.t_begin, ntok
                else:
                    dt, dn = now - self.prev[1], ntok - self.prev[0]
                rec["tokens_per_second"] = round(dn / dt, 2) if dt > 0 and dn >= 0 else None
                self.prev = (ntok, now)
            rec.update(memory_peaks())
            rec["timestamp"] = now
            with open(self.metrics_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(rec, default=str) + "\n")

        def on_train_end(self, args, state, control, **kw):
            if state.is_world_process_zero:
                write_json_atomic(self.progress_path, _progress(state, self.start_step, timestamp=time.time(),
                                                                finished=True))

    return RunFilesCallback()


def _reset_run_files(output_dir: Path, resume: str | None) -> None:
    """A fresh run starts fresh files; a resumed one keeps metrics up to its checkpoint's step."""
    for name in ("progress.json", "summary.json", "resume.json"):
        (output_dir / name).unlink(missing_ok=True)
    metrics = output_dir / "metrics.jsonl"
    if not metrics.exists():
        return
    if resume is None:
        metrics.unlink()
        return
    m = re.search(r"checkpoint-(\d+)", str(resume))
    keep_upto = int(m.group(1)) if m else None
    kept = []
    for line in metrics.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if keep_upto is None or (rec.get("step", 0) <= keep_upto and not rec.get("final")):
            kept.append(json.dumps(rec))
    tmp = metrics.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
    os.replace(tmp, metrics)


def parse_recipe(config: str, overrides: list[str] | None = None):
    """Parse a recipe YAML (plus `--key value` overrides) like `trl sft --config` does.

    Returns (script_args, training_args, model_args, dataset_args, extras, raw_recipe)."""
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig

    raw = load_yaml_mapping(Path(config), field=str(config))
    extras = {k: raw.pop(k) for k in TOOLS_TRAIN_KEYS if k in raw}
    parsed = parse_with_trl(config, raw, (ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig), overrides)
    raw.update(extras)
    return (*parsed, extras, raw)


def parse_with_trl(config: str, raw: dict, dataclass_types: tuple, overrides: list[str] | None = None) -> tuple:
    """TrlParser over `dataclass_types` for the mapping `raw` (our keys already removed), written
    next to `config` so relative paths in it read as they do from the recipe, and removed after."""
    import yaml
    from trl import TrlParser

    fd, tmp = tempfile.mkstemp(prefix=".recipe.", suffix=".yaml", dir=Path(config).resolve().parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            yaml.safe_dump(raw, fh, sort_keys=False)
        return TrlParser(dataclass_types).parse_args_and_config(args=["--config", tmp, *(overrides or [])])
    finally:
        os.unlink(tmp)


def _load_dataset(script_args, dataset_args):
    """Exactly trl/scripts/sft.py's choice: a `datasets:` mixture, else load_dataset(dataset_name)."""
    from datasets import load_dataset
    from trl import get_dataset

    if dataset_args.datasets:
        return get_dataset(dataset_args)
    if script_args.dataset_name:
        return load_dataset(script_args.dataset_name, name=script_args.dataset_config,
                            streaming=script_args.dataset_streaming)
    raise ValueError("The recipe needs `dataset_name` (a hub id or a local directory with train.jsonl) "
                     "or a `datasets:` mixture.")


def train(config: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run one training job from a recipe; returns the summary written to summary.json."""
    script_args, training_args, model_args, dataset_args, extras, raw = parse_recipe(config, overrides)
    method = infer_method({**raw, "use_peft": model_args.use_peft,
                           "load_in_4bit": model_args.load_in_4bit})
    output_dir = Path(training_args.output_dir).resolve()
    rank0 = _is_rank0()
    if rank0:
        output_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "status": "running", "method": method, "load_in_4bit": bool(model_args.load_in_4bit),
        "base_model": model_args.model_name_or_path, "dataset": script_args.dataset_name,
        "output_dir": str(output_dir), "chat_template": training_args.chat_template_path or
        "the model's own tokenizer template", "spectrum_config_path": extras.get("spectrum_config_path"),
        "started": time.time()}
    try:
        _check_method(method, model_args)
        patterns = read_spectrum_patterns(extras["spectrum_config_path"]) if method == "spectrum" else None
        summary["fallbacks"] = kernel_fallbacks(model_args, training_args)
        for note in summary["fallbacks"]:
            print(f"[tools.train] WARNING: {note}", file=sys.stderr, flush=True)
        from transformers.trainer_utils import get_last_checkpoint
        from trl import SFTTrainer, get_peft_config, get_quantization_config

        # Model loading exactly as trl/scripts/sft.py: the trainer builds it from these kwargs.
        model_init_kwargs = dict(revision=model_args.model_revision,
                                 trust_remote_code=training_args.trust_remote_code,
                                 attn_implementation=model_args.attn_implementation,
                                 dtype=model_args.dtype)
        if training_args.model_init_kwargs is not None:
            model_init_kwargs.update(training_args.model_init_kwargs)
        training_args.model_init_kwargs = model_init_kwargs
        train_ds, eval_ds = _datasets(script_args, training_args, dataset_args)

        resume = training_args.resume_from_checkpoint
        if resume is None and output_dir.is_dir():
            resume = get_last_checkpoint(str(output_dir))
        summary["resumed_from"] = resume
        if rank0:
            _reset_run_files(output_dir, resume)
        run_files = _make_callback(output_dir)
        trainer = SFTTrainer(model=model_args.model_name_or_path, args=training_args,
                             train_dataset=train_ds, eval_dataset=eval_ds,
                             quantization_config=get_quantization_config(model_args),
                             peft_config=get_peft_config(model_args), callbacks=[run_files])
        _prepare_model(trainer, method, patterns, training_args, summary)
        trainer.accelerator.print(f"[tools.train] method={method} trainable={summary['trainable_params']:,}/"
                                  f"{summary['total_params']:,} resume_from={resume}")
        result = trainer.train(resume_from_checkpoint=resume)
        return _finish(trainer, result, run_files, output_dir, model_args, training_args, summary)
    except BaseException as exc:
        if rank0:
            summary.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:2000], ended=time.time(),
                           **memory_peaks())
            try:
                write_json_atomic(output_dir / "summary.json", summary)
            except OSError:
                pass
        raise


def _check_method(method: str, model_args) -> None:
    if method == "spectrum" and model_args.use_peft:
        raise ValueError("spectrum_config_path and use_peft are both set: Spectrum trains selected full "
                         "layers, LoRA trains adapters. Remove one of them.")
    if (model_args.load_in_4bit or model_args.load_in_8bit) and not model_args.use_peft:
        raise ValueError("load_in_4bit/load_in_8bit needs use_peft: true (a quantized model can only be "
                         "fine-tuned through LoRA adapters, i.e. QLoRA).")


def _datasets(script_args, training_args, dataset_args):
    """(train, eval or None) splits of the recipe's dataset, with the split named on a miss."""
    dataset = _load_dataset(script_args, dataset_args)
    if script_args.dataset_train_split not in dataset:
        raise ValueError(f"dataset has no split '{script_args.dataset_train_split}' "
                         f"(has {list(dataset)}); set dataset_train_split.")
    eval_dataset = None
    if training_args.eval_strategy != "no":
        if script_args.dataset_test_split not in dataset:
            raise ValueError(f"eval_strategy is '{training_args.eval_strategy}' but the dataset has no "
                             f"split '{script_args.dataset_test_split}'; add test.jsonl or set "
                             "eval_strategy: 'no'.")
        eval_dataset = dataset[script_args.dataset_test_split]
    return dataset[script_args.dataset_train_split], eval_dataset


def _prepare_model(trainer, method: str, patterns, training_args, summary: dict) -> None:
    """Spectrum's unfreezing and fp32 master weights on the trainer's model; counts in summary."""
    model = trainer.model
    if patterns is not None:
        _, _, names = apply_spectrum(model, patterns)
        if training_args.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()  # frozen embeddings + checkpointing still get grads
        summary["spectrum_unfrozen"] = len(names)
    sharded = bool(getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False))
    summary["fp32_master_params"] = fp32_master_weights(model, method, sharded=sharded)
    summary.update(trainable_params=sum(_numel(p) for p in model.parameters() if p.requires_grad),
                   total_params=sum(_numel(p) for p in model.parameters()),
                   loaded_in_4bit=bool(getattr(model, "is_loaded_in_4bit", False)))


def _finish(trainer, result, run_files, output_dir: Path, model_args, training_args,
            summary: dict) -> dict[str, Any]:
    """Save (unless stopped), write summary.json, end the trainer."""
    from transformers.trainer_utils import get_last_checkpoint
    state = trainer.state
    # Decided jointly by all ranks (they must agree: saving is collective under ZeRO-3). A signal
    # after the last step does not turn a finished run into a stopped one.
    stopped = run_files.stopped_at is not None and state.global_step < state.max_steps
    last_ckpt = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    if not stopped:
        trainer.save_model(str(output_dir))  # adapter (PEFT) or model, plus the tokenizer
    metrics = dict(result.metrics or {})
    last_log = next((h for h in reversed(state.log_history) if "num_tokens" in h), {})
    summary.update(
        status="stopped" if stopped else "completed",
        stop_signal=_STOP["signal"] if stopped else None,
        steps=state.global_step, max_steps=state.max_steps, epoch=state.epoch,
        train_loss=metrics.get("train_loss"), runtime_s=metrics.get("train_runtime"),
        train_samples_per_second=metrics.get("train_samples_per_second"),
        tokens=last_log.get("num_tokens"),
        final_loss=next((h["loss"] for h in reversed(state.log_history) if "loss" in h), None),
        **memory_peaks(), last_checkpoint=last_ckpt,
        adapter_path=str(output_dir) if (model_args.use_peft and not stopped) else None,
        model_path=str(output_dir) if (not model_args.use_peft and not stopped) else None,
        world_size=training_args.world_size, ended=time.time())
    if stopped:
        summary["next_step"] = f"Relaunch the same recipe (same output_dir) to resume from {last_ckpt}."
    if trainer.is_world_process_zero():
        write_json_atomic(output_dir / "summary.json", summary)
    end_run(trainer)
    return summary


def end_run(trainer) -> None:
    """Finish the trackers and destroy the process group once nothing needs the other ranks, as
    trl's scripts do: Trainer.end (transformers >= 5.18), else the group directly."""
    if hasattr(trainer, "end"):
        trainer.end()
    else:
        end_distributed()


def end_distributed() -> None:
    """Destroy the process group, as torch asks before a distributed program exits (a group left
    to interpreter teardown can outlive the threads it needs)."""
    with contextlib.suppress(Exception):
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m tools.train", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="recipe YAML")
    args, overrides = ap.parse_known_args(argv)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    summary = train(args.config, overrides)
    if _is_rank0():
        print(f"[tools.train] {summary['status']}: {summary.get('steps')} steps, "
              f"train_loss={summary.get('train_loss')}, output_dir={summary['output_dir']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
