"""The preference / RL training entrypoint: `python -m tools.train_dpo --config recipe.yaml
[--key value ...]` for DPO, KTO, ORPO and GRPO recipes, and `generate_dpo_recipe`, the tool that
writes them (trainer: dpo | kto | orpo | grpo; tools.preference_methods holds each method's TRL
classes and defaults).

Also runs under `accelerate launch [--config_file F] -m tools.train_dpo --config recipe.yaml`.
The recipe is the flat YAML `trl dpo|kto|grpo --config` reads (TrlParser over ScriptArguments,
the method's config (DPOConfig, KTOConfig, ORPOConfig, GRPOConfig), ModelConfig,
DatasetMixtureConfig) plus keys of ours, removed before TRL parses it: `trainer:` (what tells
launch_training and validate_recipe which method runs), `chat_template_path` (SFTConfig has it,
the preference configs do not: the template the SFT run used) and, for GRPO, `rewards:` (the
reward functions with their parameters, tools.rewards; TRL's CLI names functions only).

Why not `trl dpo` itself: it writes no metrics.jsonl/progress.json/summary.json (training_status
reads them), has no SIGTERM stop with a checkpoint, cannot start from an SFT adapter directory
(TRL loads `model_name_or_path` with AutoConfig, which an adapter folder lacks), and has no
chat_template_path. Everything else is TRL's: DPOTrainer, its dataset preparation, its losses.

Where the policy starts and what the reference is:
- a model (base, or an SFT model merged with merge_adapter) + `use_peft: true`: a new LoRA
  adapter; the reference is the same model with the adapter disabled (no second copy);
- an SFT adapter directory (adapter_config.json): its base is loaded, the adapter is trained
  further; TRL keeps a frozen copy of the starting adapter as the reference ("ref" adapter,
  adapter-sized, no second model). lora_* keys of the recipe do not apply (the adapter's do);
- a model without `use_peft` (full): TRL loads a second, frozen copy as the reference (or
  `precompute_ref_log_probs: true` computes the reference log-probs once, before training).

Writes into output_dir what tools.train writes (same callback): metrics.jsonl (TRL's logs, with
rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies, logps/*), progress.json,
summary.json (plus `preference_eval`: held-out preference accuracy on the test split before and
after training, DPO/ORPO/KTO, tools.preference_eval), the adapter or model and the tokenizer.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, Field

from .errors import UserError
from .workspace import get_workspace, write_json_atomic

EXTRA_KEYS = ("trainer", "chat_template_path", "rewards")  # recipe keys only this entrypoint reads
TRAINER = "dpo"  # the default trainer of a recipe without `trainer:`
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def is_dpo_recipe(cfg: dict) -> bool:
    """The rule launch_training and validate_recipe use: a recipe this entrypoint runs, i.e.
    `trainer:` dpo, kto, orpo or grpo (the name is older than the other methods)."""
    from .preference_methods import is_preference_recipe
    return is_preference_recipe(cfg)


def parse_dpo_recipe(config: str, overrides: list[str] | None = None):
    """Parse a preference recipe (plus `--key value` overrides) as `trl <method> --config` does,
    after removing our keys; GRPO's rewards are checked (a user's file by ast, never run).
    Returns (script_args, method_config, model_args, dataset_args, extras, raw)."""
    import yaml
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

    from .preference_methods import method_of

    raw = yaml.safe_load(Path(config).read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise ValueError(f"{config} must contain a YAML mapping of recipe keys.")
    if "spectrum_config_path" in raw:
        raise ValueError("spectrum_config_path: Spectrum is an SFT option of tools.train; a DPO recipe "
                         "trains LoRA (use_peft) or the full model.")
    extras = {k: raw.pop(k) for k in EXTRA_KEYS if k in raw}
    extras.setdefault("trainer", TRAINER)
    method = method_of(extras)
    _check_rewards(method.name, extras, raw)
    config_cls, _ = method.load()
    fd, tmp = tempfile.mkstemp(prefix=".recipe.", suffix=".yaml", dir=Path(config).resolve().parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            yaml.safe_dump(raw, fh, sort_keys=False)
        parser = TrlParser((ScriptArguments, config_cls, ModelConfig, DatasetMixtureConfig))
        parsed = parser.parse_args_and_config(args=["--config", tmp, *(overrides or [])])
    finally:
        os.unlink(tmp)
    raw.update(extras)
    _check_start(parsed[2].model_name_or_path)
    return (*parsed, extras, raw)


def _check_start(model: Optional[str]) -> None:
    """An SFT-adapter start matches its base (tools.preference_start), before anything loads."""
    from .preference_start import check_sft_adapter
    if not model:
        return
    try:
        path = get_workspace().resolve(model, field="model")
    except UserError:
        return  # a hub id or a path the recipe checks refuse elsewhere
    try:
        check_sft_adapter(path)
    except UserError as exc:
        raise ValueError(f"model_name_or_path: {exc.message} Fix: {exc.fix}") from exc


def _check_rewards(trainer: str, extras: dict, raw: dict) -> None:
    from .rewards import check_specs
    if "reward_funcs" in raw or "reward_model_name_or_path" in raw:
        raise ValueError("reward_funcs / reward_model_name_or_path: list the rewards under `rewards:` "
                         "(e.g. [{name: answer}, {file: rewards/mine.py, function: score}]).")
    if trainer == "grpo":
        check_specs(extras.get("rewards"))
    elif "rewards" in extras:
        raise ValueError(f"rewards: only GRPO recipes take rewards (this one is trainer: {trainer}).")


# --------------------------------------------------------------------------------------------
# The same recipe for TRL's own CLI (`trl dpo|kto|grpo --config`)
# --------------------------------------------------------------------------------------------
def _cli_reward(spec: dict) -> str:
    """A reward spec as the dotted import path TRL's grpo script resolves (no parameters)."""
    from .rewards import DEFAULT_FORMAT
    if "file" in spec:
        parts = str(spec["file"]).removesuffix(".py").split("/")
        if all(p.isidentifier() for p in parts):
            return ".".join(parts + [str(spec["function"])])
        raise ValueError(f"rewards: {spec['file']} is no importable module path (folders and file must be "
                         "Python identifiers) for trl grpo's reward_funcs.")
    plain = {"answer": {"name": "answer"}, "format": {"name": "format", "pattern": DEFAULT_FORMAT}}
    if plain.get(spec.get("name")) == spec:
        return {"answer": "tools.rewards.answer", "format": "tools.rewards.answer_format"}[spec["name"]]
    raise ValueError(f"rewards: {spec} has parameters; trl grpo's reward_funcs names functions without any. "
                     "Write it as a function in a reward file, or run python -m tools.train_dpo.")


def trl_cli_form(config: str) -> tuple[dict, list[str], str]:
    """(the recipe as `trl <trainer> --config` reads it, what changed, the trainer): our keys removed, GRPO's
    rewards as reward_funcs import paths. ValueError where TRL's CLI cannot run the recipe."""
    from .preference_methods import method_of
    script_args, _, model_args, _, extras, raw = parse_dpo_recipe(config)  # TRL's parser first
    method = method_of(extras)
    if not method.cli:
        raise ValueError(f"trainer: {method.name} has no `trl {method.name}` command (it is in trl.experimental): "
                         "run python -m tools.train_dpo.")
    if adapter_base(str(get_workspace().resolve(model_args.model_name_or_path, field="model"))):
        raise ValueError("model_name_or_path is an SFT adapter directory, which trl's CLI cannot start from "
                         "(it loads the path with AutoConfig): merge_adapter first, or run python -m tools.train_dpo.")
    out = {k: v for k, v in raw.items() if k not in EXTRA_KEYS}
    notes = [f"`trainer: {method.name}` removed: the command names it."]
    if extras.get("chat_template_path"):
        notes.append(f"chat_template_path removed ({method.config} has none): the model's own tokenizer template "
                     "is used; save the template with the tokenizer to keep it.")
    if method.name == "grpo":
        out["reward_funcs"] = [_cli_reward(s) for s in extras["rewards"]]
        notes.append("rewards -> reward_funcs import paths: run from the workspace root with the repository and "
                     "'.' on PYTHONPATH.")
    return out, notes, method.name


# --------------------------------------------------------------------------------------------
# Steps of one run
# --------------------------------------------------------------------------------------------
@dataclass
class _Start:
    """Where the policy starts and how the reference is obtained."""
    model: Any                     # a path/id for TRL to load, or a PeftModel (SFT adapter start)
    peft_config: Any
    tokenizer_dir: str
    base_model: str
    reference: str
    sft_adapter: Optional[str] = None
    notes: list[str] = field(default_factory=list)


def adapter_base(path: str) -> Optional[str]:
    """The base model an adapter directory was trained on, or None when `path` is no adapter."""
    cfg = Path(path) / "adapter_config.json"
    if not cfg.is_file():
        return None
    base = json.loads(cfg.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{cfg} names no base_model_name_or_path; merge the adapter (merge_adapter) "
                         "and start the DPO recipe from the merged model instead.")
    return base


def _reference(trainer: str, training_args, peft: bool, sft_adapter: bool) -> str:
    """What the method compares the policy with (each trainer's rule in TRL 1.16)."""
    if trainer == "orpo":
        return "none: ORPO needs no reference model"
    if trainer == "grpo" and not training_args.beta:
        return "none: beta 0 (no KL term), no reference model is loaded"
    if sft_adapter:
        if trainer == "grpo":
            return "the base model with the adapter disabled (GRPO's KL is to the base, not the SFT adapter)"
        return ("the SFT adapter as it starts (TRL keeps a frozen copy, the 'ref' adapter; no second model)")
    if peft:
        return "the model with the adapter disabled (no second copy)"
    if getattr(training_args, "precompute_ref_log_probs", False):
        return "log-probs precomputed once before training"
    return "a second, frozen copy of the model"


def _start(model_args, training_args, trainer: str = TRAINER) -> _Start:
    from trl import get_peft_config, get_quantization_config
    path = model_args.model_name_or_path
    base = adapter_base(path)
    if base is None:
        peft = get_peft_config(model_args)
        return _Start(path, peft, path, path, _reference(trainer, training_args, peft is not None, False))
    from peft import PeftModel
    from trl.trainer.utils import create_model_from_path
    kwargs = dict(training_args.model_init_kwargs or {})
    quant = get_quantization_config(model_args)
    if quant is not None:
        kwargs["quantization_config"] = quant
    model = PeftModel.from_pretrained(create_model_from_path(base, **kwargs), path, is_trainable=True)
    tok_dir = path if any((Path(path) / n).is_file() for n in TOKENIZER_FILES) else base
    notes = ["lora_* recipe keys are ignored: the SFT adapter's own LoRA configuration is trained further."] \
        if model_args.use_peft else []
    return _Start(model, None, tok_dir, base, _reference(trainer, training_args, True, True), sft_adapter=path,
                  notes=notes)


def _tokenizer(start: _Start, extras: dict):
    """The tokenizer training uses: the start's, with the recipe's chat_template_path."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(start.tokenizer_dir)
    tpl = extras.get("chat_template_path")
    if tpl:
        p = Path(tpl)
        if not p.is_file():
            raise FileNotFoundError(f"chat_template_path: {p} does not exist (paths are taken from the cwd, "
                                    "the workspace root for runs started by launch_training).")
        tok.chat_template = p.read_text(encoding="utf-8")
    return tok


def _splits(script_args, dataset_args, training_args):
    """(train, held-out or None): the test split is the held-out set even when eval_strategy is
    'no' (the before/after preference accuracy is measured on it)."""
    from .train import _load_dataset
    dataset = _load_dataset(script_args, dataset_args)
    if script_args.dataset_train_split not in dataset:
        raise ValueError(f"dataset has no split '{script_args.dataset_train_split}' (has {list(dataset)}); "
                         "set dataset_train_split.")
    test = dataset[script_args.dataset_test_split] if script_args.dataset_test_split in dataset else None
    if training_args.eval_strategy != "no" and test is None:
        raise ValueError(f"eval_strategy is '{training_args.eval_strategy}' but the dataset has no split "
                         f"'{script_args.dataset_test_split}'; convert with test_size or set eval_strategy: 'no'.")
    return dataset[script_args.dataset_train_split], test


def preference_accuracy(trainer, name: str = TRAINER) -> Optional[dict]:
    """Held-out preference accuracy on the trainer's eval (test) split: tools.preference_eval."""
    from .preference_eval import heldout_accuracy
    return heldout_accuracy(trainer, name)


def _trainer(start: _Start, tok, training_args, model_args, train, test, callbacks, extras: dict):
    """The method's TRL trainer (tools.preference_methods.METHODS names the class)."""
    from trl import get_quantization_config

    from .preference_methods import method_of
    method = method_of(extras)
    _, trainer_cls = method.load()
    quant = get_quantization_config(model_args) if isinstance(start.model, str) else None
    kw = dict(model=start.model, args=training_args, train_dataset=train, eval_dataset=test, processing_class=tok,
              peft_config=start.peft_config, callbacks=callbacks)
    if method.name == "orpo":  # ORPOTrainer loads a model id itself, quantization through model_init_kwargs
        if quant is not None:
            training_args.model_init_kwargs = {**(training_args.model_init_kwargs or {}), "quantization_config": quant}
        if training_args.use_cpu or not __import__("torch").cuda.is_available():
            training_args.model_init_kwargs = {**(training_args.model_init_kwargs or {}), "device_map": None}
        return trainer_cls(**kw)
    if method.name == "grpo":
        from .rewards import load_rewards
        kw["reward_funcs"] = load_rewards(extras["rewards"])
    return trainer_cls(**kw, quantization_config=quant)


def _last(logs: list[dict], key: str):
    return next((h[key] for h in reversed(logs) if key in h), None)


def _save_policy(trainer, output_dir: Path) -> None:
    """Save only the trained adapter (or model): TRL's frozen 'ref' copy stays out of output_dir."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if "ref" in (getattr(model, "peft_config", None) or {}):
        model.delete_adapter("ref")
    trainer.save_model(str(output_dir))


@dataclass
class _Run:
    """What the steps of one run share."""
    config: str
    overrides: list[str]
    output_dir: Path = Path(".")
    rank0: bool = True
    summary: dict = field(default_factory=dict)


def _begin(run: _Run):
    """Parse the recipe; the summary's first fields."""
    from .train import _is_rank0, infer_method
    script_args, training_args, model_args, dataset_args, extras, _ = parse_dpo_recipe(run.config, run.overrides)
    if not model_args.model_name_or_path:
        raise ValueError("The recipe needs model_name_or_path: the SFT model, SFT adapter or model DPO starts from.")
    is_adapter = (Path(model_args.model_name_or_path) / "adapter_config.json").is_file()
    method = infer_method({"use_peft": model_args.use_peft or is_adapter, "load_in_4bit": model_args.load_in_4bit})
    run.output_dir = Path(training_args.output_dir).resolve()
    run.rank0 = _is_rank0()
    if run.rank0:
        run.output_dir.mkdir(parents=True, exist_ok=True)
    run.summary = {
        "status": "running", "trainer": extras["trainer"], "method": method, "load_in_4bit": bool(model_args.load_in_4bit),
        "base_model": model_args.model_name_or_path, "dataset": script_args.dataset_name,
        "output_dir": str(run.output_dir), "chat_template": extras.get("chat_template_path") or
        "the model's own tokenizer template", "beta": training_args.beta, "loss_type": getattr(training_args, "loss_type", None),
        "learning_rate": training_args.learning_rate, "started": time.time()}
    if (model_args.load_in_4bit or model_args.load_in_8bit) and not (model_args.use_peft or is_adapter):
        raise ValueError("load_in_4bit/load_in_8bit needs use_peft: true (a quantized model trains through "
                         "LoRA adapters only).")
    return script_args, training_args, model_args, dataset_args, extras


def _prepare(run: _Run, script_args, training_args, model_args, dataset_args, extras):
    """Model start, tokenizer, splits, resume point; the DPOTrainer with the run-files callback."""
    from transformers.trainer_utils import get_last_checkpoint

    from .train import _make_callback, _reset_run_files, kernel_fallbacks
    run.summary["fallbacks"] = kernel_fallbacks(model_args, training_args)
    for note in run.summary["fallbacks"]:
        print(f"[tools.train_dpo] WARNING: {note}", file=sys.stderr, flush=True)
    # Model loading as trl/scripts/dpo.py does: the trainer builds it from these kwargs.
    init = dict(revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code,
                attn_implementation=model_args.attn_implementation, dtype=model_args.dtype)
    init.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = init
    start = _start(model_args, training_args, extras["trainer"])
    tok = _tokenizer(start, extras)
    train, test = _splits(script_args, dataset_args, training_args)
    resume = training_args.resume_from_checkpoint
    if resume is None and run.output_dir.is_dir():
        resume = get_last_checkpoint(str(run.output_dir))
    if run.rank0:
        _reset_run_files(run.output_dir, resume)
    run.summary.update(reference=start.reference, sft_adapter=start.sft_adapter, base_weights=start.base_model,
                       resumed_from=resume, notes=start.notes)
    files = _make_callback(run.output_dir)
    if not isinstance(start.model, str):
        training_args.model_init_kwargs = None  # the SFT-adapter start is loaded: TRL warns on unused kwargs
    trainer = _trainer(start, tok, training_args, model_args, train, test, [files], extras)
    return trainer, files, resume


def _count_params(run: _Run, trainer, method: str) -> None:
    from .train import _numel, fp32_master_weights
    model = trainer.model
    sharded = bool(getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False))
    run.summary["fp32_master_params"] = fp32_master_weights(model, method, sharded=sharded)
    # The frozen 'ref' adapter is no trainable parameter even where PEFT leaves requires_grad on.
    trainable = [p for n, p in model.named_parameters() if p.requires_grad and ".ref." not in n]
    run.summary.update(trainable_params=sum(_numel(p) for p in trainable),
                       total_params=sum(_numel(p) for p in model.parameters()),
                       loaded_in_4bit=bool(getattr(model, "is_loaded_in_4bit", False)))
    trainer.accelerator.print(f"[tools.train_dpo] method={method} reference={run.summary['reference']} "
                              f"trainable={run.summary['trainable_params']:,}/{run.summary['total_params']:,}")


def _finish(run: _Run, trainer, files, result, before: Optional[dict], model_args) -> dict:
    """After trainer.train: save the policy, the held-out accuracy after, summary.json."""
    from transformers.trainer_utils import get_last_checkpoint

    from .preference_eval import preference_eval, reading
    from .preference_status import method_metrics
    from .train import _STOP, memory_peaks
    state = trainer.state
    stopped = files.stopped_at is not None and state.global_step < state.max_steps
    last_ckpt = get_last_checkpoint(str(run.output_dir)) if run.output_dir.is_dir() else None
    after = None if stopped else preference_accuracy(trainer, run.summary["trainer"])
    if not stopped:
        _save_policy(trainer, run.output_dir)
    metrics, logs = dict(result.metrics or {}), state.log_history
    peft = bool(model_args.use_peft or run.summary.get("sft_adapter"))
    run.summary.update(
        status="stopped" if stopped else "completed", stop_signal=_STOP["signal"] if stopped else None,
        steps=state.global_step, max_steps=state.max_steps, epoch=state.epoch,
        train_loss=metrics.get("train_loss"), runtime_s=metrics.get("train_runtime"),
        train_samples_per_second=metrics.get("train_samples_per_second"), tokens=_last(logs, "num_tokens"),
        final_loss=_last(logs, "loss"), reward_margin=_last(logs, "rewards/margins"),
        reward_accuracy=_last(logs, "rewards/accuracies"),
        eval_reward_accuracy=_last(logs, "eval_rewards/accuracies"),
        method_metrics=method_metrics(run.summary["trainer"], logs),
        preference_eval=preference_eval(run.summary["trainer"], before, after),
        **memory_peaks(), last_checkpoint=last_ckpt,
        adapter_path=str(run.output_dir) if (peft and not stopped) else None,
        model_path=str(run.output_dir) if (not peft and not stopped) else None,
        world_size=trainer.args.world_size, ended=time.time())
    if reading(run.summary["preference_eval"]):
        run.summary["method_metrics"]["readings"].insert(0, reading(run.summary["preference_eval"]))
    if stopped:
        run.summary["next_step"] = f"Relaunch the same recipe (same output_dir) to resume from {last_ckpt}."
    if trainer.is_world_process_zero():
        write_json_atomic(run.output_dir / "summary.json", run.summary)
    return run.summary


def train_dpo(config: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run one DPO job from a recipe; returns the summary written to summary.json."""
    run = _Run(config, list(overrides or []))
    try:
        parsed = _begin(run)
        trainer, files, resume = _prepare(run, *parsed)
        _count_params(run, trainer, run.summary["method"])
        # Before any step the policy is the reference: measured only on a fresh start.
        before = preference_accuracy(trainer, run.summary["trainer"]) if resume is None else None
        result = trainer.train(resume_from_checkpoint=resume)
        summary = _finish(run, trainer, files, result, before, parsed[2])
        from .train import end_run
        end_run(trainer)
        return summary
    except BaseException as exc:
        if run.rank0 and run.summary:
            from .train import memory_peaks
            run.summary.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:2000], ended=time.time(),
                               **memory_peaks())
            try:
                write_json_atomic(run.output_dir / "summary.json", run.summary)
            except OSError:
                pass
        raise


def main(argv: list[str] | None = None) -> int:
    import argparse

    from .train import _is_rank0, _on_signal
    ap = argparse.ArgumentParser(prog="python -m tools.train_dpo", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="DPO recipe YAML")
    ap.add_argument("--to-trl", metavar="OUT", help="write the recipe as `trl <trainer> --config` reads it, "
                                                    "print the command, and exit")
    args, overrides = ap.parse_known_args(argv)
    if args.to_trl:
        return _write_trl_form(args.config, args.to_trl)
    signal.signal(signal.SIGTERM, _on_signal)  # tools.train's handler: its callback reads the flag
    signal.signal(signal.SIGINT, _on_signal)
    summary = train_dpo(args.config, overrides)
    if _is_rank0():
        print(f"[tools.train_dpo] {summary['status']}: {summary.get('steps')} steps, "
              f"train_loss={summary.get('train_loss')}, reward_accuracy={summary.get('reward_accuracy')}, "
              f"output_dir={summary['output_dir']}", flush=True)
    return 0


def _write_trl_form(config: str, out: str) -> int:
    import yaml
    cfg, notes, trainer = trl_cli_form(config)
    Path(out).write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    repo = Path(__file__).resolve().parent.parent
    for n in notes:
        print(f"[tools.train_dpo] {n}")
    print(f"PYTHONPATH={repo}:. trl {trainer} --config {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
