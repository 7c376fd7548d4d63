"""Recipe internals: the installed TRL's schema, key migrations, the TRL parse, consistency checks
and the YAML writer. `tools.recipes` builds the MCP tools on top of these.

Everything here was checked against the installed sources (trl 1.16, transformers 5.23,
accelerate 1.15, peft 0.21); each migration says why in its `reason`.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import functools
import importlib.util
import io
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel

from .workspace import is_inside

SPECTRUM_KEY = "spectrum_config_path"
EXTRA_KEYS = {SPECTRUM_KEY, "env"}  # accepted besides the TRL dataclass fields
FLASH_ATTN = {"flash_attention_2", "flash_attention_3"}


class Change(BaseModel):
    """One migration applied to a recipe."""
    key: str
    old: Any = None
    new: Any = None
    reason: str


class UnknownKey(BaseModel):
    key: str
    suggestions: list[str] = []


# ----------------------------------------------------------------------------- schema
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
    names = list(trl_fields()) + [SPECTRUM_KEY]
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


# ----------------------------------------------------------------------------- migrations
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


def migrate(cfg: dict) -> tuple[dict, list[Change], list[str]]:
    """Apply every migration to a recipe mapping; returns (new mapping, changes, warnings)."""
    cfg = copy.deepcopy(cfg)
    changes: list[Change] = []
    warns: list[str] = []

    for old, (new, reason) in RENAMED.items():
        if old not in cfg:
            continue
        raw = val = cfg[old]
        if new in cfg and cfg[new] != val:
            changes.append(Change(key=old, old=val, new=None,
                                  reason=f"{reason} Both {old} and {new} were set; kept {new}={cfg[new]!r}."))
            cfg.pop(old)
            continue
        if old == "torch_dtype" and isinstance(val, str):
            val = val.replace("torch.", "")
        cfg = _rename(cfg, old, new, val)
        changes.append(Change(key=old, old=raw, new={new: val}, reason=reason))

    if "warmup_ratio" in cfg:
        ratio = cfg["warmup_ratio"]
        if cfg.get("warmup_steps"):
            cfg.pop("warmup_ratio")
            changes.append(Change(key="warmup_ratio", old=ratio, new=None,
                                  reason="transformers 5 removed warmup_ratio; warmup_steps is already set, so "
                                         "the ratio was dropped."))
        elif isinstance(ratio, (int, float)) and 0 <= ratio < 1:
            cfg = _rename(cfg, "warmup_ratio", "warmup_steps", ratio)
            changes.append(Change(key="warmup_ratio", old=ratio, new={"warmup_steps": ratio},
                                  reason="transformers 5 removed warmup_ratio; a float warmup_steps < 1 is read "
                                         "as a ratio of the total steps (TrainingArguments.get_warmup_steps)."))
        else:
            cfg.pop("warmup_ratio")
            warns.append(f"warmup_ratio={ratio!r} is not a ratio in [0, 1): dropped; set warmup_steps yourself.")
            changes.append(Change(key="warmup_ratio", old=ratio, new=None, reason="not a ratio in [0, 1)."))

    sched = str(cfg.get("lr_scheduler_type", "linear"))
    if sched == "constant" and cfg.get("warmup_steps"):
        cfg["lr_scheduler_type"] = "constant_with_warmup"
        changes.append(Change(key="lr_scheduler_type", old="constant", new="constant_with_warmup",
                              reason="transformers' 'constant' schedule ignores warm-up (get_scheduler returns "
                                     "before reading num_warmup_steps), so the recipe's warm-up never ran; "
                                     "'constant_with_warmup' does what it asks. Set 'constant' and drop "
                                     "warmup_steps to reproduce the old run exactly."))

    if "tokenizer_name_or_path" in cfg:
        tok = cfg["tokenizer_name_or_path"]
        model = cfg.get("model_name_or_path")
        if tok and tok != model and "chat_template_path" not in cfg:
            cfg = _rename(cfg, "tokenizer_name_or_path", "chat_template_path", tok)
            changes.append(Change(key="tokenizer_name_or_path", old=tok, new={"chat_template_path": tok},
                                  reason="TRL's ModelConfig has no tokenizer field: SFTTrainer loads the tokenizer "
                                         "of model_name_or_path. A separate (Instruct) tokenizer was used for its "
                                         "chat template; chat_template_path takes a tokenizer dir or hub id and "
                                         "clones its template and special tokens (trl clone_chat_template)."))
        else:
            cfg.pop("tokenizer_name_or_path")
            changes.append(Change(key="tokenizer_name_or_path", old=tok, new=None,
                                  reason="TRL loads the tokenizer of model_name_or_path; the key no longer exists."))

    if "use_flash_attention_2" in cfg:
        val = cfg.pop("use_flash_attention_2")
        if val and "attn_implementation" not in cfg:
            cfg["attn_implementation"] = "flash_attention_2"
        changes.append(Change(key="use_flash_attention_2", old=val,
                              new={"attn_implementation": "flash_attention_2"} if val else None,
                              reason="replaced by attn_implementation."))

    if "bnb_4bit_compute_dtype" in cfg:
        val = cfg.pop("bnb_4bit_compute_dtype")
        new = None
        if "dtype" not in cfg and isinstance(val, str):
            cfg["dtype"] = new = val.replace("torch.", "")
        changes.append(Change(key="bnb_4bit_compute_dtype", old=val, new={"dtype": new} if new else None,
                              reason="TRL's get_quantization_config uses dtype as the 4-bit compute dtype; "
                                     "ModelConfig has no bnb_4bit_compute_dtype."))

    # The 2024 guide's run_sft.py and the alignment-handbook had their own dataset keys.
    if "dataset_id_or_path" in cfg:
        val = cfg.pop("dataset_id_or_path")
        if _is_dataset_file(val):
            ext = Path(val).suffix.lower().lstrip(".")
            builder = {"jsonl": "json", "json": "json", "txt": "text"}.get(ext, ext)
            new = {"datasets": [{"path": builder, "data_files": val, "split": "train"}]}
            reason = ("the guide's run_sft.py key; `trl sft` reads a local file through a dataset mixture "
                      f"(datasets: path={builder}, data_files=<file>), which yields a 'train' split.")
        else:
            new = {"dataset_name": val}
            reason = "the guide's run_sft.py key; `trl sft` loads a hub id or a local directory from dataset_name."
        cfg.update(new)
        changes.append(Change(key="dataset_id_or_path", old=val, new=new, reason=reason))
    if "dataset_mixer" in cfg and isinstance(cfg["dataset_mixer"], dict):
        val = cfg.pop("dataset_mixer")
        cfg["datasets"] = [{"path": k, "fraction": float(v)} for k, v in val.items()]
        changes.append(Change(key="dataset_mixer", old=val, new={"datasets": cfg["datasets"]},
                              reason="alignment-handbook key; TRL's DatasetMixtureConfig takes a datasets list "
                                     "with per-dataset fraction."))
    if "dataset_splits" in cfg and isinstance(cfg["dataset_splits"], list):
        val = cfg.pop("dataset_splits")
        if val:
            cfg["dataset_train_split"] = val[0]
        if len(val) > 1:
            cfg["dataset_test_split"] = val[1]
        changes.append(Change(key="dataset_splits", old=val,
                              new={k: cfg[k] for k in ("dataset_train_split", "dataset_test_split") if k in cfg},
                              reason="alignment-handbook key; ScriptArguments has dataset_train_split/test_split."))

    if "logging_dir" in cfg:
        val = cfg.pop("logging_dir")
        env = dict(cfg.get("env") or {})
        env["TENSORBOARD_LOGGING_DIR"] = str(val)
        cfg["env"] = env
        changes.append(Change(key="logging_dir", old=val, new={"env": {"TENSORBOARD_LOGGING_DIR": str(val)}},
                              reason="transformers 5 removed logging_dir; the TensorBoard callback reads "
                                     "TENSORBOARD_LOGGING_DIR (default <output_dir>/runs/...), and the TRL parser "
                                     "exports the recipe's env: mapping."))

    for key, reason in REMOVED.items():
        if key in cfg:
            changes.append(Change(key=key, old=cfg.pop(key), new=None, reason=reason))

    if isinstance(cfg.get("model_init_kwargs"), dict) and "torch_dtype" in cfg["model_init_kwargs"]:
        mik = dict(cfg["model_init_kwargs"])
        val = mik.pop("torch_dtype")
        mik = {**mik, "dtype": val} if "dtype" not in mik else mik
        cfg["model_init_kwargs"] = mik
        changes.append(Change(key="model_init_kwargs.torch_dtype", old=val, new={"model_init_kwargs.dtype": val},
                              reason="from_pretrained takes dtype in transformers 5."))
    if isinstance(cfg.get("dataset_kwargs"), dict):
        dk = cfg["dataset_kwargs"]
        extra = {k: v for k, v in dk.items() if k != "skip_prepare_dataset"}
        if extra:
            kept = {k: v for k, v in dk.items() if k == "skip_prepare_dataset"}
            if kept:
                cfg["dataset_kwargs"] = kept
            else:
                cfg.pop("dataset_kwargs")
            changes.append(Change(key="dataset_kwargs", old=dk, new=kept or None,
                                  reason="SFTConfig.dataset_kwargs supports only skip_prepare_dataset now "
                                         f"({', '.join(extra)} came from the old ConstantLengthDataset path)."))
    if cfg.get("packing_strategy") == "bfd-requeue":
        cfg["packing_strategy"] = "bfd_split"
        changes.append(Change(key="packing_strategy", old="bfd-requeue", new="bfd_split",
                              reason="renamed in TRL 1.x (bfd-requeue is a deprecated alias)."))
    if cfg.get("loss_type") == "chunked_nll":
        cfg["loss_type"] = "nll"
        changes.append(Change(key="loss_type", old="chunked_nll", new="nll",
                              reason="deprecated alias: nll already computes the loss in chunks."))
    if isinstance(cfg.get("lora_target_modules"), list) and cfg["lora_target_modules"] == ["all-linear"]:
        cfg["lora_target_modules"] = "all-linear"
    return cfg, changes, warns


# ----------------------------------------------------------------------------- TRL parse
def trl_parse(cfg: dict, *, base_dir: Path) -> tuple[Optional[tuple], Optional[str], list[str]]:
    """Parse `cfg` exactly as `trl sft --config` does (TrlParser over ScriptArguments, SFTConfig,
    ModelConfig, DatasetMixtureConfig; unknown keys rejected). Returns (dataclasses, error, warnings).

    `env:` is not exported (validation has no side effects) and the process environment is
    restored afterwards; relative deepspeed/accelerator config paths are taken from `base_dir`.
    """
    import yaml
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig, TrlParser

    cfg = {k: v for k, v in cfg.items() if k not in EXTRA_KEYS}
    for key in ("deepspeed", "accelerator_config"):
        v = cfg.get(key)
        if isinstance(v, str) and not v.lstrip().startswith("{") and not os.path.isabs(v):
            cfg[key] = str(base_dir / v)
    env_before = dict(os.environ)
    err = io.StringIO()
    caught: list[str] = []
    out = None
    error = None
    from .workspace import TMP_DIR, get_workspace
    with tempfile.TemporaryDirectory(prefix="llmft-recipe-", dir=get_workspace().owned_dir(TMP_DIR)) as d:
        path = Path(d) / "recipe.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig))
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
            os.environ.clear()
            os.environ.update(env_before)
            with contextlib.suppress(Exception):
                from transformers.integrations.deepspeed import unset_hf_deepspeed_config
                unset_hf_deepspeed_config()
    seen: list[str] = []
    for w in caught:
        w = " ".join(w.split())
        if w not in seen:
            seen.append(w)
    return out, error, seen


# ----------------------------------------------------------------------------- YAML writer
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


# ----------------------------------------------------------------------------- chat templates
def template_text(ref: str, root: Path) -> tuple[Optional[str], str]:
    """The chat template a recipe points at: a .jinja file or a tokenizer dir; (text, where)."""
    import json
    p = Path(ref)
    p = (p if p.is_absolute() else root / p).resolve()
    if not is_inside(p, root):  # only files inside the workspace are read
        return None, str(ref)
    if p.is_file():
        if p.suffix in (".jinja", ".j2"):
            return p.read_text(encoding="utf-8"), str(ref)
        if p.name == "tokenizer_config.json":
            p = p.parent
    if p.is_dir():
        for name in ("chat_template.jinja",):
            if (p / name).is_file():
                return (p / name).read_text(encoding="utf-8"), f"{ref}/{name}"
        tc = p / "tokenizer_config.json"
        if tc.is_file():
            with contextlib.suppress(Exception):
                t = json.loads(tc.read_text(encoding="utf-8")).get("chat_template")
                if isinstance(t, list):  # named variants
                    t = next((x.get("template") for x in t if x.get("name") == "default"), None)
                if isinstance(t, str):
                    return t, f"{ref}/tokenizer_config.json"
    return None, str(ref)


def has_generation_markers(template: str) -> bool:
    return re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


@functools.lru_cache(maxsize=1)
def trl_known_templates() -> dict[str, str]:
    """Templates TRL swaps for a training variant with {% generation %} markers: {text: name}."""
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        return {}
    d = Path(list(spec.submodule_search_locations)[0]) / "chat_templates"
    out = {}
    for f in d.glob("*.jinja"):
        if not f.stem.endswith("_training") and (d / f"{f.stem}_training.jinja").exists():
            out[f.read_text(encoding="utf-8")] = f.stem
    return out


def end_of_turn_token(template: str) -> Optional[str]:
    """The end-of-turn token a known template family writes after each message."""
    for tok in ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>"):
        if tok in template:
            return tok
    return None


# ----------------------------------------------------------------------------- accelerate configs
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
