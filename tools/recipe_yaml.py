"""Recipe YAML I/O: the one reader of a recipe mapping (text or file; bad YAML is a UserError
naming the line) and the writer that groups a flat recipe in commented sections."""
from __future__ import annotations

from pathlib import Path

from .errors import UserError
from .recipe_schema import SPECTRUM_KEY


def parse_yaml_mapping(text: str, field: str = "recipe") -> dict:
    """The mapping of recipe keys a YAML text holds; UserError (the line, the fix) otherwise."""
    import yaml
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else field
        raise UserError(f"is not valid YAML: {getattr(exc, 'problem', None) or exc}.", field=where,
                        fix="Fix the YAML syntax (indentation, a missing ':' or quote).") from None
    if not isinstance(data, dict):
        raise UserError("must be a YAML mapping of recipe keys (key: value per line).", field=field,
                        fix="Write one `key: value` per line, e.g. `model_name_or_path: Qwen/Qwen2.5-0.5B`.")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise UserError(f"keys must be names, got {bad[:3]!r}.", field=field,
                        fix="Use TRL field names as keys (e.g. learning_rate).")
    return data


def load_yaml_mapping(path: Path, field: str = "recipe") -> dict:
    """parse_yaml_mapping of a file's text."""
    return parse_yaml_mapping(Path(path).read_text(encoding="utf-8"), field=field)

SECTIONS: list[tuple[str, list[str]]] = [
    ("Model", ["model_name_or_path", "model_revision", "dtype", "attn_implementation", "trust_remote_code",
               "model_init_kwargs"]),
    ("Method", [SPECTRUM_KEY, "use_peft", "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type",
                "use_bnb_nested_quant", "bnb_4bit_quant_storage", "lora_r", "lora_alpha", "lora_dropout",
                "lora_target_modules", "lora_target_parameters", "lora_modules_to_save", "lora_task_type",
                "use_rslora", "use_dora"]),
    ("Data", ["dataset_name", "dataset_config", "dataset_train_split", "dataset_test_split", "dataset_streaming",
              "datasets", "streaming", "test_split_size", "chat_template_path", "eos_token", "dataset_text_field",
              "dataset_kwargs", "dataset_num_proc", "max_length", "truncation_mode", "packing", "packing_strategy",
              "padding_free", "eval_packing", "completion_only_loss", "assistant_only_loss", "shuffle_dataset"]),
    ("Training", ["num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                  "activation_checkpointing", "activation_checkpointing_kwargs", "gradient_checkpointing",
                  "gradient_checkpointing_kwargs", "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs",
                  "warmup_steps", "max_grad_norm", "weight_decay", "optim", "bf16", "fp16", "tf32", "use_cpu",
                  "use_liger_kernel", "liger_kernel_config", "torch_compile", "seed"]),
    ("Evaluation, logging, saving", ["eval_strategy", "eval_steps", "per_device_eval_batch_size",
                                     "logging_strategy", "logging_steps", "report_to", "save_strategy",
                                     "save_steps", "save_total_limit", "output_dir", "push_to_hub",
                                     "hub_model_id", "hub_strategy", "hub_private_repo"]),
]


def dump_yaml(cfg: dict, *, header: list[str] | None = None, comments: dict[str, str] | None = None) -> str:
    """A flat recipe as YAML, grouped in commented sections; `comments` go above their key."""
    import yaml
    comments = comments or {}
    lines = [f"# {h}" if h else "#" for h in (header or [])]
    placed: set[str] = set()

    def emit(key):
        for c in comments.get(key, "").splitlines():
            lines.append(f"# {c}")
        text = yaml.safe_dump({key: cfg[key]}, sort_keys=False, default_flow_style=False,
                              allow_unicode=True, width=100)
        lines.extend(text.rstrip("\n").splitlines())
        placed.add(key)

    for title, keys in SECTIONS:
        present = [k for k in keys if k in cfg]
        if not present:
            continue
        lines.append("")
        lines.append(f"# --- {title}")
        for k in present:
            emit(k)
    rest = [k for k in cfg if k not in placed and k != "env"]
    if rest:
        lines.append("")
        lines.append("# --- Other")
        for k in rest:
            emit(k)
    if "env" in cfg:
        lines.append("")
        lines.append("# --- Environment (exported by the TRL parser)")
        emit("env")
    return "\n".join(lines).lstrip("\n") + "\n"
