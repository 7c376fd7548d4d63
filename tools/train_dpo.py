"""The DPO training entrypoint: `python -m tools.train_dpo --config recipe.yaml [--key value ...]`,
and `generate_dpo_recipe`, the tool that writes such a recipe.

Also runs under `accelerate launch [--config_file F] -m tools.train_dpo --config recipe.yaml`.
The recipe is the flat YAML `trl dpo --config` reads (TrlParser over ScriptArguments, DPOConfig,
ModelConfig, DatasetMixtureConfig) plus two keys of ours, removed before TRL parses it:
`trainer: dpo` (what tells launch_training and validate_recipe it is a DPO recipe) and
`chat_template_path` (SFTConfig has it, DPOConfig does not: the template the SFT run used).

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
summary.json (plus `preference_eval`: held-out preference accuracy before and after training when
the dataset has a test split), the adapter or model and the tokenizer.
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

EXTRA_KEYS = ("trainer", "chat_template_path")  # recipe keys only this entrypoint reads
TRAINER = "dpo"
HELDOUT_MAX_PAIRS = 200  # held-out pairs scored one by one before and after training
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def is_dpo_recipe(cfg: dict) -> bool:
    """The rule launch_training and validate_recipe use: `trainer: dpo`."""
    return str(cfg.get("trainer", "")).lower() == TRAINER


def parse_dpo_recipe(config: str, overrides: list[str] | None = None):
    """Parse a DPO recipe (plus `--key value` overrides) as `trl dpo --config` does, after
    removing our keys. Returns (script_args, dpo_config, model_args, dataset_args, extras, raw)."""
    import yaml
    from trl import DatasetMixtureConfig, DPOConfig, ModelConfig, ScriptArguments, TrlParser

    raw = yaml.safe_load(Path(config).read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise ValueError(f"{config} must contain a YAML mapping of recipe keys.")
    if "spectrum_config_path" in raw:
        raise ValueError("spectrum_config_path: Spectrum is an SFT option of tools.train; a DPO recipe "
                         "trains LoRA (use_peft) or the full model.")
    extras = {k: raw.pop(k) for k in EXTRA_KEYS if k in raw}
    if extras.get("trainer", TRAINER) != TRAINER:
        raise ValueError(f"trainer: '{extras['trainer']}' - tools.train_dpo runs `trainer: dpo` recipes only.")
    fd, tmp = tempfile.mkstemp(prefix=".recipe.", suffix=".yaml", dir=Path(config).resolve().parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            yaml.safe_dump(raw, fh, sort_keys=False)
        parser = TrlParser((ScriptArguments, DPOConfig, ModelConfig, DatasetMixtureConfig))
        parsed = parser.parse_args_and_config(args=["--config", tmp, *(overrides or [])])
    finally:
        os.unlink(tmp)
    raw.update(extras)
    return (*parsed, extras, raw)


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


def _start(model_args, training_args) -> _Start:
    from trl import get_peft_config, get_quantization_config
    path = model_args.model_name_or_path
    base = adapter_base(path)
    if base is None:
        peft = get_peft_config(model_args)
        ref = ("the model with the adapter disabled (no second copy)" if peft is not None else
               "log-probs precomputed once before training" if training_args.precompute_ref_log_probs else
               "a second, frozen copy of the model")
        return _Start(path, peft, path, path, ref)
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
    return _Start(model, None, tok_dir, base, "the SFT adapter as it starts (TRL keeps a frozen copy, "
                  "the 'ref' adapter; no second model)", sft_adapter=path, notes=notes)


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


def preference_accuracy(trainer, limit: int = HELDOUT_MAX_PAIRS) -> Optional[dict]:
    """Held-out preference accuracy: each eval pair goes alone through DPOTrainer's own
    prediction_step, which logs its implicit reward margin beta*((pi-ref)_chosen - (pi-ref)_rejected)
    and the policy's log-probs. A margin of 0 (policy == reference, as before training) counts
    half: an untrained policy scores 50%, chance."""
    ds = trainer.eval_dataset
    if ds is None or isinstance(ds, dict) or len(ds) == 0:
        return None
    keys = [k for k in ("prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps")
            if k in ds.column_names]
    model, was_training = trainer.model, trainer.model.training
    model.eval()
    margins, own = [], []
    try:
        for i in range(min(len(ds), limit)):
            batch = trainer.data_collator([{k: ds[i][k] for k in keys}])
            trainer.prediction_step(model, batch, prediction_loss_only=True)
            m = trainer._metrics["eval"]
            margins.append(m["rewards/margins"][-1])
            own.append(m["logps/chosen"][-1] - m["logps/rejected"][-1])
    finally:
        trainer._metrics["eval"].clear()
        model.train(was_training)
    score = lambda xs: sum(1.0 if x > 0 else 0.5 if x == 0 else 0.0 for x in xs) / len(xs)  # noqa: E731
    return {"pairs": len(margins), "implicit_reward_accuracy": round(score(margins), 4),
            "mean_margin": round(sum(margins) / len(margins), 6),
            "policy_prefers_chosen": round(score(own), 4)}


def _trainer(start: _Start, tok, training_args, model_args, train, test, callbacks):
    from trl import DPOTrainer, get_quantization_config
    quant = get_quantization_config(model_args) if isinstance(start.model, str) else None
    return DPOTrainer(model=start.model, args=training_args, train_dataset=train, eval_dataset=test,
                      processing_class=tok, peft_config=start.peft_config, quantization_config=quant,
                      callbacks=callbacks)


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
        "status": "running", "trainer": TRAINER, "method": method, "load_in_4bit": bool(model_args.load_in_4bit),
        "base_model": model_args.model_name_or_path, "dataset": script_args.dataset_name,
        "output_dir": str(run.output_dir), "chat_template": extras.get("chat_template_path") or
        "the model's own tokenizer template", "beta": training_args.beta, "loss_type": training_args.loss_type,
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
    start = _start(model_args, training_args)
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
    trainer = _trainer(start, tok, training_args, model_args, train, test, [files])
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

    from .train import _STOP, _peak_memory_gib
    state = trainer.state
    stopped = files.stopped_at is not None and state.global_step < state.max_steps
    last_ckpt = get_last_checkpoint(str(run.output_dir)) if run.output_dir.is_dir() else None
    after = None if stopped else preference_accuracy(trainer)
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
        preference_eval={"before": before, "after": after} if before or after else None,
        peak_memory_gib=_peak_memory_gib(), last_checkpoint=last_ckpt,
        adapter_path=str(run.output_dir) if (peft and not stopped) else None,
        model_path=str(run.output_dir) if (not peft and not stopped) else None,
        world_size=trainer.args.world_size, ended=time.time())
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
        before = preference_accuracy(trainer) if resume is None else None
        result = trainer.train(resume_from_checkpoint=resume)
        summary = _finish(run, trainer, files, result, before, parsed[2])
        import transformers
        from packaging.version import Version
        if Version(transformers.__version__) >= Version("5.18.0"):
            trainer.end()  # finish trackers and destroy the process group, as trl's dpo script does
        return summary
    except BaseException as exc:
        if run.rank0 and run.summary:
            from .train import _peak_memory_gib
            run.summary.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:2000], ended=time.time(),
                               peak_memory_gib=_peak_memory_gib())
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
    args, overrides = ap.parse_known_args(argv)
    signal.signal(signal.SIGTERM, _on_signal)  # tools.train's handler: its callback reads the flag
    signal.signal(signal.SIGINT, _on_signal)
    summary = train_dpo(args.config, overrides)
    if _is_rank0():
        print(f"[tools.train_dpo] {summary['status']}: {summary.get('steps')} steps, "
              f"train_loss={summary.get('train_loss')}, reward_accuracy={summary.get('reward_accuracy')}, "
              f"output_dir={summary['output_dir']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())


# --------------------------------------------------------------------------------------------
# generate_dpo_recipe
# --------------------------------------------------------------------------------------------
# Sources: DPO paper (Rafailov et al. 2023) beta 0.1; TRL 1.16 DPOConfig defaults (beta 0.1,
# loss sigmoid, max_length 1024, lr 1e-6) and trl/scripts/dpo.py's examples (full 5e-7, LoRA 5e-6);
# alignment-handbook Zephyr DPO (5e-7, cosine, warm-up 0.1, 1 epoch). DPO's rate is 10-20x below
# SFT's: the loss is steep (log-sigmoid of a sum over the reply's tokens) and overshooting the
# reference collapses the chosen log-probs too (both rewards go negative).
COMMON = {"trainer": TRAINER, "beta": 0.1, "loss_type": ["sigmoid"], "max_length": 1024,
          "num_train_epochs": 1, "lr_scheduler_type": "cosine", "warmup_steps": 0.1,
          "per_device_train_batch_size": 2, "gradient_accumulation_steps": 8, "gradient_checkpointing": True,
          "bf16": True, "logging_steps": 10, "save_strategy": "steps", "save_steps": 200,
          "save_total_limit": 2, "report_to": "none", "seed": 42}
PER_METHOD = {
    "full": {"learning_rate": 5e-7},
    "lora": {"learning_rate": 5e-6, "use_peft": True, "lora_r": 16, "lora_alpha": 16, "lora_dropout": 0.05,
             "lora_target_modules": "all-linear"},
    "qlora": {"learning_rate": 5e-6, "use_peft": True, "lora_r": 16, "lora_alpha": 16, "lora_dropout": 0.05,
              "lora_target_modules": "all-linear", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
              "use_bnb_nested_quant": True, "dtype": "bfloat16"},
}
WHY = {
    "beta": "0.1: the DPO paper's and TRL's default; higher keeps the policy closer to the reference.",
    "learning_rate": "full 5e-7 / LoRA 5e-6 (TRL's dpo.py examples, the alignment handbook): about 10x "
                     "below SFT; raise LoRA toward 5e-5 if rewards/margins stay flat.",
    "num_train_epochs": "1 (1-3): preference data overfits fast; watch eval rewards/accuracies.",
    "max_length": "TRL's 1024, prompt + reply (keep_start): verify_preference says how many pairs it cuts.",
    "lr_scheduler_type": "cosine with 10% warm-up, as the alignment handbook's DPO recipes.",
    "per_device_train_batch_size": "2 x 8 accumulation = 16 pairs a step (TRL's dpo.py example).",
}


class DpoRecipe(BaseModel):
    """A DPO recipe written to the workspace, with where it starts and why each default."""
    recipe_path: str
    recipe: dict[str, Any]
    method: Literal["full", "lora", "qlora"]
    starts_from: Literal["model", "sft_adapter"]
    reference: str
    why: dict[str, str]
    notes: list[str]
    next_steps: list[str]


def _dpo_cfg(model: str, dataset: str, output_dir: str, method: str, adapter: bool, has_test: bool,
             chat_template: Optional[str], max_length: int, cpu: bool) -> tuple[dict, list[str]]:
    cfg: dict[str, Any] = {"trainer": TRAINER, "model_name_or_path": model, "dataset_name": dataset,
                           "output_dir": output_dir}
    cfg.update({k: v for k, v in COMMON.items() if k != "trainer"})
    cfg.update(PER_METHOD[method])
    cfg["max_length"] = max_length
    notes = []
    if adapter:  # the adapter's LoRA settings apply; lora_* would be ignored
        for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"):
            cfg.pop(k, None)
        notes.append("Starts from the SFT adapter: it is trained further, and the reference is a frozen copy "
                     "of it (TRL's 'ref' adapter). The output is an adapter for the same base model.")
    if has_test:
        cfg.update(eval_strategy="steps", eval_steps=0.25,
                   per_device_eval_batch_size=cfg["per_device_train_batch_size"])
    else:
        notes.append("No test split: the run reports no held-out preference accuracy (convert_preference "
                     "test_size=0.05 makes one).")
    if chat_template:
        cfg["chat_template_path"] = chat_template
    if cpu:
        cfg.update(use_cpu=True, bf16=False, gradient_checkpointing=False)
    return cfg, notes


def generate_dpo_recipe(
    model: Annotated[str, Field(description="where DPO starts: an SFT model (merged), an SFT adapter "
                                            "directory, or a base/Instruct model (workspace path or hub id).")],
    dataset: Annotated[str, Field(description="convert_preference's output directory (workspace).")],
    output_path: Annotated[str, Field(description="the recipe YAML to write (workspace).")],
    output_dir: Annotated[str, Field(description="the run's output directory (workspace).")],
    method: Annotated[Literal["lora", "qlora", "full"], Field(
        description="lora (reference = adapter disabled), qlora (4-bit base, GPU), or full (a second, "
                    "frozen copy is the reference).")] = "lora",
    chat_template: Annotated[Optional[str], Field(description="the .jinja the SFT run used "
                                                              "(chat_template_path).")] = None,
    max_length: Annotated[int, Field(ge=16, description="prompt + reply tokens (DPOConfig.max_length).")] = 1024,
    cpu: Annotated[bool, Field(description="a CPU run (use_cpu, no bf16, no checkpointing): tiny models "
                                           "only.")] = False,
    overrides: Annotated[Optional[dict[str, Any]], Field(
        description="DPOConfig/ModelConfig keys to set (null removes one), e.g. {'beta': 0.05}.")] = None,
    overwrite: Annotated[bool, Field(description="replace an existing output_path.")] = False,
) -> DpoRecipe:
    """Write a DPO recipe (the YAML `trl dpo --config` reads, plus `trainer: dpo` and
    chat_template_path) with literature defaults: beta 0.1, sigmoid loss, learning rate 5e-7
    full / 5e-6 LoRA, cosine with 10% warm-up, 1 epoch, 16 pairs a step, max_length 1024. The
    recipe is parsed with TRL's own parser before it is written. Run it with launch_training
    (it runs `python -m tools.train_dpo --config <recipe>`), after verify_preference."""
    ws = get_workspace()
    target = ws.resolve(output_path, field="output_path")
    if target.exists() and not overwrite:
        raise UserError(f"'{output_path}' exists.", field="output_path",
                        fix="Choose another path or overwrite=true.")
    d_path = ws.resolve(dataset, field="dataset", must_exist=True, kind="dir")
    m_path = ws.resolve(model, field="model")
    adapter = (m_path / "adapter_config.json").is_file()
    if adapter and method == "full":
        raise UserError("is an SFT adapter; a full DPO run needs a whole model.", field="method",
                        fix="Merge it first (merge_adapter) and pass the merged directory, or use method lora.")
    if cpu and method == "qlora":
        raise UserError("qlora needs a CUDA GPU (bitsandbytes 4-bit).", field="method", fix="Use lora on CPU.")
    cfg, notes = _dpo_cfg(ws.rel(m_path) if m_path.exists() else model, ws.rel(d_path),
                          ws.rel(ws.resolve(output_dir, field="output_dir")), method, adapter,
                          (d_path / "test.jsonl").is_file(), chat_template, max_length, cpu)
    for k, v in (overrides or {}).items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    text = _checked_yaml(cfg)
    ws.write_text(output_path, text, field="output_path")
    ref = ("a frozen copy of the SFT adapter ('ref' adapter)" if adapter else
           "the model with the adapter disabled" if cfg.get("use_peft") else "a second, frozen copy of the model")
    return DpoRecipe(recipe_path=ws.rel(target), recipe=cfg, method=method,
                     starts_from="sft_adapter" if adapter else "model", reference=ref, why=WHY, notes=notes,
                     next_steps=[f"verify_preference(recipe='{ws.rel(target)}') before launching.",
                                 f"launch_training(recipe='{ws.rel(target)}'), then training_status: watch "
                                 "rewards/margins grow and rewards/accuracies approach 1 on eval."])


def _checked_yaml(cfg: dict) -> str:
    """The recipe as YAML, parsed first by TRL's parser (unknown keys and bad values refused)."""
    import yaml

    from .workspace import TMP_DIR
    import contextlib
    import io

    import torch
    err = io.StringIO()
    text = yaml.safe_dump(cfg, sort_keys=False)
    parse_cfg = dict(cfg)
    if not torch.cuda.is_available() and not cfg.get("use_cpu"):
        # TrainingArguments checks bf16 against this machine; the recipe is for the GPU it will run on.
        parse_cfg.update(bf16=False, tf32=None)
    fd, tmp = tempfile.mkstemp(prefix="dpo-recipe-", suffix=".yaml", dir=get_workspace().owned_dir(TMP_DIR))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            yaml.safe_dump(parse_cfg, fh, sort_keys=False)
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(err):
            parse_dpo_recipe(tmp)
    except (ValueError, TypeError, SystemExit) as exc:  # argparse prints usage and exits on a bad value
        said = [x for x in err.getvalue().splitlines() if x.strip()]
        why = said[-1].split("error: ", 1)[-1] if isinstance(exc, SystemExit) and said else str(exc)
        raise UserError(f"TRL refuses the recipe: {why[:600]}", field="overrides",
                        fix="Use DPOConfig / ModelConfig / ScriptArguments keys (e.g. beta, loss_type, "
                            "learning_rate, max_length, lora_r).") from exc
    finally:
        os.unlink(tmp)
    return text
