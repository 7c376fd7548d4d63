"""Recipe key migrations: 2024-era keys (TRL 0.x, transformers 4, the guide's run_sft.py, the
alignment-handbook) to the installed TRL's, each with the reason a reader needs.

`migrate` runs MIGRATIONS in order, each a named step over one _Migration. Every step was checked
against the installed sources (trl 1.16, transformers 5.23, accelerate 1.15, peft 0.21). The
schema, the YAML writer, template and accelerate helpers live in tools.recipe_schema,
tools.recipe_yaml, tools.recipe_templates and tools.accelerate_config.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel


class Change(BaseModel):
    """One migration applied to a recipe."""
    key: str
    old: Any = None
    new: Any = None
    reason: str


# Keys that no longer exist and simply go, with the reason (all absent from the installed
# ScriptArguments/SFTConfig/ModelConfig/DatasetMixtureConfig and from TrainingArguments).
REMOVED = {
    "overwrite_output_dir": "removed from transformers 5 TrainingArguments; the Trainer writes into a non-empty "
                            "output_dir, and resuming is explicit (resume_from_checkpoint).",
    "save_safetensors": "removed from transformers 5: checkpoints are always safetensors.",
    "include_tokens_per_second": "removed from transformers 5 TrainingArguments (tools.train logs tokens/s).",
    "fp16_backend": "removed (only native torch AMP remains).",
    "half_precision_backend": "removed (only native torch AMP remains).",
    "use_mps_device": "removed; the device is chosen automatically (use_cpu forces CPU).",
    "dataset_batch_size": "removed from SFTConfig (old ConstantLengthDataset packing).",
    "num_of_sequences": "removed from SFTConfig (old ConstantLengthDataset packing); packing uses max_length.",
    "chars_per_token": "removed from SFTConfig (old ConstantLengthDataset packing).",
    "push_to_hub_organization": "removed; put the organisation in hub_model_id ('org/name').",
    "tpu_num_cores": "removed from transformers 5.",
    "past_index": "removed from transformers 5.",
    "ray_scope": "removed from transformers 5.",
    "mp_parameters": "removed from transformers 5.",
}

RENAMED = {  # old -> (new, reason)
    "max_seq_length": ("max_length", "SFTConfig renamed max_seq_length to max_length (TRL >= 0.20)."),
    "max_seq_len": ("max_length", "SFTConfig's sequence length key is max_length."),
    "use_liger": ("use_liger_kernel", "TRL's use_liger became TrainingArguments.use_liger_kernel "
                                      "(itself deprecated in TRL 1.x for hub kernels, which need network: "
                                      "kept for offline GPU runs)."),
    "torch_dtype": ("dtype", "transformers 5 / TRL ModelConfig use dtype (torch_dtype was removed)."),
    "evaluation_strategy": ("eval_strategy", "TrainingArguments renamed evaluation_strategy to eval_strategy."),
    "no_cuda": ("use_cpu", "TrainingArguments renamed no_cuda to use_cpu."),
    "per_gpu_train_batch_size": ("per_device_train_batch_size", "per_gpu_* was removed."),
    "per_gpu_eval_batch_size": ("per_device_eval_batch_size", "per_gpu_* was removed."),
    "push_to_hub_token": ("hub_token", "TrainingArguments renamed push_to_hub_token to hub_token."),
    "push_to_hub_model_id": ("hub_model_id", "TrainingArguments renamed push_to_hub_model_id to hub_model_id."),
    "bnb_4bit_use_double_quant": ("use_bnb_nested_quant", "TRL ModelConfig calls double quantization "
                                                          "use_bnb_nested_quant (passed to BitsAndBytesConfig "
                                                          "as bnb_4bit_use_double_quant)."),
    "use_nested_quant": ("use_bnb_nested_quant", "TRL ModelConfig calls it use_bnb_nested_quant."),
    "gradient_checkpointing": ("activation_checkpointing", "transformers 5.23 made gradient_checkpointing a "
                                                           "deprecated alias of activation_checkpointing "
                                                           "(removed in v6)."),
    "gradient_checkpointing_kwargs": ("activation_checkpointing_kwargs", "deprecated alias of "
                                                                         "activation_checkpointing_kwargs "
                                                                         "(removed in v6)."),
}


def _rename(cfg: dict, old: str, new: str, value: Any = ..., ) -> dict:
    """Replace key `old` by `new` at the same position (keeps the recipe's order)."""
    out = {}
    for k, v in cfg.items():
        if k == old:
            out[new] = v if value is ... else value
        elif k != new:
            out[k] = v
    return out


def _is_dataset_file(value: str) -> bool:
    return bool(re.search(r"\.(jsonl?|csv|parquet|arrow|txt)$", str(value), re.I))


@dataclass
class _Migration:
    """The recipe being migrated and what was changed (steps may replace cfg: renames keep order)."""
    cfg: dict
    changes: list[Change] = field(default_factory=list)
    warns: list[str] = field(default_factory=list)

    def change(self, key: str, old: Any, new: Any, reason: str) -> None:
        self.changes.append(Change(key=key, old=old, new=new, reason=reason))


def _renamed_keys(m: _Migration) -> None:
    cfg = m.cfg
    for old, (new, reason) in RENAMED.items():
        if old not in cfg:
            continue
        raw = val = cfg[old]
        if new in cfg and cfg[new] != val:
            m.change(old, val, None, f"{reason} Both {old} and {new} were set; kept {new}={cfg[new]!r}.")
            cfg.pop(old)
            continue
        if old == "torch_dtype" and isinstance(val, str):
            val = val.replace("torch.", "")
        cfg = m.cfg = _rename(cfg, old, new, val)
        m.change(old, raw, {new: val}, reason)


def _warmup_ratio(m: _Migration) -> None:
    cfg = m.cfg
    if "warmup_ratio" in cfg:
        ratio = cfg["warmup_ratio"]
        if cfg.get("warmup_steps"):
            cfg.pop("warmup_ratio")
            m.change("warmup_ratio", ratio, None, "transformers 5 removed warmup_ratio; warmup_steps is already "
                                                  "set, so the ratio was dropped.")
        elif isinstance(ratio, (int, float)) and 0 <= ratio < 1:
            m.cfg = _rename(cfg, "warmup_ratio", "warmup_steps", ratio)
            m.change("warmup_ratio", ratio, {"warmup_steps": ratio},
                     "transformers 5 removed warmup_ratio; a float warmup_steps < 1 is read as a ratio of the "
                     "total steps (TrainingArguments.get_warmup_steps).")
        else:
            cfg.pop("warmup_ratio")
            m.warns.append(f"warmup_ratio={ratio!r} is not a ratio in [0, 1): dropped; set warmup_steps yourself.")
            m.change("warmup_ratio", ratio, None, "not a ratio in [0, 1).")


def _constant_schedule_warmup(m: _Migration) -> None:
    sched = str(m.cfg.get("lr_scheduler_type", "linear"))
    if sched == "constant" and m.cfg.get("warmup_steps"):
        m.cfg["lr_scheduler_type"] = "constant_with_warmup"
        m.change("lr_scheduler_type", "constant", "constant_with_warmup",
                 "transformers' 'constant' schedule ignores warm-up (get_scheduler returns before reading "
                 "num_warmup_steps), so the recipe's warm-up never ran; 'constant_with_warmup' does what it "
                 "asks. Set 'constant' and drop warmup_steps to reproduce the old run exactly.")


def _tokenizer_key(m: _Migration) -> None:
    cfg = m.cfg
    if "tokenizer_name_or_path" not in cfg:
        return
    tok = cfg["tokenizer_name_or_path"]
    model = cfg.get("model_name_or_path")
    if tok and tok != model and "chat_template_path" not in cfg:
        m.cfg = _rename(cfg, "tokenizer_name_or_path", "chat_template_path", tok)
        m.change("tokenizer_name_or_path", tok, {"chat_template_path": tok},
                 "TRL's ModelConfig has no tokenizer field: SFTTrainer loads the tokenizer of "
                 "model_name_or_path. A separate (Instruct) tokenizer was used for its chat template; "
                 "chat_template_path takes a tokenizer dir or hub id and clones its template and special "
                 "tokens (trl clone_chat_template).")
    else:
        cfg.pop("tokenizer_name_or_path")
        m.change("tokenizer_name_or_path", tok, None,
                 "TRL loads the tokenizer of model_name_or_path; the key no longer exists.")


def _attention_and_compute_dtype(m: _Migration) -> None:
    cfg = m.cfg
    if "use_flash_attention_2" in cfg:
        val = cfg.pop("use_flash_attention_2")
        if val and "attn_implementation" not in cfg:
            cfg["attn_implementation"] = "flash_attention_2"
        m.change("use_flash_attention_2", val, {"attn_implementation": "flash_attention_2"} if val else None,
                 "replaced by attn_implementation.")
    if "bnb_4bit_compute_dtype" in cfg:
        val = cfg.pop("bnb_4bit_compute_dtype")
        new = None
        if "dtype" not in cfg and isinstance(val, str):
            cfg["dtype"] = new = val.replace("torch.", "")
        m.change("bnb_4bit_compute_dtype", val, {"dtype": new} if new else None,
                 "TRL's get_quantization_config uses dtype as the 4-bit compute dtype; ModelConfig has no "
                 "bnb_4bit_compute_dtype.")


def _guide_dataset_key(m: _Migration) -> None:
    """The 2024 guide's run_sft.py had its own dataset key."""
    if "dataset_id_or_path" not in m.cfg:
        return
    val = m.cfg.pop("dataset_id_or_path")
    if _is_dataset_file(val):
        ext = Path(val).suffix.lower().lstrip(".")
        builder = {"jsonl": "json", "json": "json", "txt": "text"}.get(ext, ext)
        new = {"datasets": [{"path": builder, "data_files": val, "split": "train"}]}
        reason = ("the guide's run_sft.py key; `trl sft` reads a local file through a dataset mixture "
                  f"(datasets: path={builder}, data_files=<file>), which yields a 'train' split.")
    else:
        new = {"dataset_name": val}
        reason = "the guide's run_sft.py key; `trl sft` loads a hub id or a local directory from dataset_name."
    m.cfg.update(new)
    m.change("dataset_id_or_path", val, new, reason)


def _handbook_dataset_keys(m: _Migration) -> None:
    """The alignment-handbook's dataset_mixer and dataset_splits."""
    cfg = m.cfg
    if "dataset_mixer" in cfg and isinstance(cfg["dataset_mixer"], dict):
        val = cfg.pop("dataset_mixer")
        cfg["datasets"] = [{"path": k, "fraction": float(v)} for k, v in val.items()]
        m.change("dataset_mixer", val, {"datasets": cfg["datasets"]},
                 "alignment-handbook key; TRL's DatasetMixtureConfig takes a datasets list with per-dataset "
                 "fraction.")
    if "dataset_splits" in cfg and isinstance(cfg["dataset_splits"], list):
        val = cfg.pop("dataset_splits")
        if val:
            cfg["dataset_train_split"] = val[0]
        if len(val) > 1:
            cfg["dataset_test_split"] = val[1]
        m.change("dataset_splits", val,
                 {k: cfg[k] for k in ("dataset_train_split", "dataset_test_split") if k in cfg},
                 "alignment-handbook key; ScriptArguments has dataset_train_split/test_split.")


def _logging_dir(m: _Migration) -> None:
    if "logging_dir" not in m.cfg:
        return
    val = m.cfg.pop("logging_dir")
    env = dict(m.cfg.get("env") or {})
    env["TENSORBOARD_LOGGING_DIR"] = str(val)
    m.cfg["env"] = env
    m.change("logging_dir", val, {"env": {"TENSORBOARD_LOGGING_DIR": str(val)}},
             "transformers 5 removed logging_dir; the TensorBoard callback reads TENSORBOARD_LOGGING_DIR "
             "(default <output_dir>/runs/...), and the TRL parser exports the recipe's env: mapping.")


def _removed_keys(m: _Migration) -> None:
    for key, reason in REMOVED.items():
        if key in m.cfg:
            m.change(key, m.cfg.pop(key), None, reason)


def _nested_kwargs(m: _Migration) -> None:
    """model_init_kwargs.torch_dtype, and dataset_kwargs of the old packing path."""
    cfg = m.cfg
    if isinstance(cfg.get("model_init_kwargs"), dict) and "torch_dtype" in cfg["model_init_kwargs"]:
        mik = dict(cfg["model_init_kwargs"])
        val = mik.pop("torch_dtype")
        mik = {**mik, "dtype": val} if "dtype" not in mik else mik
        cfg["model_init_kwargs"] = mik
        m.change("model_init_kwargs.torch_dtype", val, {"model_init_kwargs.dtype": val},
                 "from_pretrained takes dtype in transformers 5.")
    if isinstance(cfg.get("dataset_kwargs"), dict):
        dk = cfg["dataset_kwargs"]
        extra = {k: v for k, v in dk.items() if k != "skip_prepare_dataset"}
        if extra:
            kept = {k: v for k, v in dk.items() if k == "skip_prepare_dataset"}
            if kept:
                cfg["dataset_kwargs"] = kept
            else:
                cfg.pop("dataset_kwargs")
            m.change("dataset_kwargs", dk, kept or None,
                     "SFTConfig.dataset_kwargs supports only skip_prepare_dataset now "
                     f"({', '.join(extra)} came from the old ConstantLengthDataset path).")


def _renamed_values(m: _Migration) -> None:
    """Deprecated aliases among the values."""
    cfg = m.cfg
    if cfg.get("packing_strategy") == "bfd-requeue":
        cfg["packing_strategy"] = "bfd_split"
        m.change("packing_strategy", "bfd-requeue", "bfd_split",
                 "renamed in TRL 1.x (bfd-requeue is a deprecated alias).")
    if cfg.get("loss_type") == "chunked_nll":
        cfg["loss_type"] = "nll"
        m.change("loss_type", "chunked_nll", "nll", "deprecated alias: nll already computes the loss in chunks.")
    if isinstance(cfg.get("lora_target_modules"), list) and cfg["lora_target_modules"] == ["all-linear"]:
        cfg["lora_target_modules"] = "all-linear"


# Every migration, in the order they apply (a rename runs before the checks of the new key).
MIGRATIONS: tuple[Callable[[_Migration], None], ...] = (
    _renamed_keys, _warmup_ratio, _constant_schedule_warmup, _tokenizer_key, _attention_and_compute_dtype,
    _guide_dataset_key, _handbook_dataset_keys, _logging_dir, _removed_keys, _nested_kwargs, _renamed_values)


def migrate(cfg: dict) -> tuple[dict, list[Change], list[str]]:
    """Apply every migration to a recipe mapping; returns (new mapping, changes, warnings)."""
    m = _Migration(copy.deepcopy(cfg))
    for step in MIGRATIONS:
        step(m)
    return m.cfg, m.changes, m.warns


# Names this module held before the split (issue 14), forwarded to their one home so code written
# against `tools.recipe_migrate` keeps working: old name -> "module" or "module:new name".
_MOVED = {
    **dict.fromkeys(("SPECTRUM_KEY", "FLASH_ATTN", "UnknownKey", "trl_fields", "versions", "suggest",
                     "has_module", "trl_parse", "infer_method"), "recipe_schema"),
    "EXTRA_KEYS": "recipe_schema:NON_FIELD_KEYS",
    **dict.fromkeys(("SECTIONS", "dump_yaml"), "recipe_yaml"),
    **dict.fromkeys(("template_text", "has_generation_markers", "trl_known_templates"), "recipe_templates"),
    "end_of_turn_token": "recipe_templates:template_end_of_turn",
    **dict.fromkeys(("AccelerateSummary", "accelerate_launch_dests", "read_accelerate_config"),
                    "accelerate_config"),
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib
        module, _, new = _MOVED[name].partition(":")
        return getattr(importlib.import_module(f"tools.{module}"), new or name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
