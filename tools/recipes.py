"""TRL recipes: generate one from the plan (generate_recipe) and check/migrate any recipe against
the installed TRL (validate_recipe).

A recipe is a flat YAML for `TrlParser((ScriptArguments, SFTConfig, ModelConfig,
DatasetMixtureConfig))`, the parser of `trl sft --config`; Spectrum recipes add
`spectrum_config_path`, read only by `python -m tools.train`. Paths inside a recipe are absolute
or relative to the workspace root. Background and every field: references/recipes.md.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional

from pydantic import Field, ValidationError

from . import chat_templates
from .accelerate_config import AccelerateSummary, read_accelerate_config
from .errors import UserError
from .memory import FITS_FRACTION, LOAD_PHASE, MemoryEstimate
from .naming import model_slug
from .recipe_defaults import DEFAULTS, Method
from .recipe_migrate import Change, migrate
from .recipe_schema import (FLASH_ATTN, NON_FIELD_KEYS, SPECTRUM_KEY, UnknownKey, has_module, infer_method,
                            suggest, trl_fields, trl_parse, versions)
from .recipe_templates import has_generation_markers, template_end_of_turn, template_text, trl_known_templates
from .recipe_yaml import dump_yaml, parse_yaml_mapping
from .params import ChatTemplate, Gpu, GpuMemoryGib, NumGpus, SeqLen
from .recommend import (ESTIMATE_ERROR, DataSize, Recommendation, Schedule, data_size, plan_schedule,
                        schedule_from)
from .results import SUMMARY_MAX_CHARS, ToolResult
from .spectrum import spectrum_patterns
from .workspace import TMP_DIR, check_path_text, get_workspace, is_inside, short

REPO = Path(__file__).resolve().parent.parent

class RecipeValidation(ToolResult):
    """Verdict on a recipe against the installed TRL, with the migrated YAML."""
    valid: bool = Field(description="no errors: the installed TRL parses it and nothing contradicts.")
    method: Optional[Method] = Field(None, description="as tools.train infers it.")
    recipe_path: Optional[str] = Field(None, description="the recipe read, or the migrated file written.")
    migrated_path: Optional[str] = None
    errors: list[str] = []
    warnings: list[str] = []
    changes: list[Change] = Field([], description="migrations applied (old key/value -> new, and why).")
    unknown_keys: list[UnknownKey] = Field([], description="keys TRL rejects, with the closest valid names.")
    trl_parse_ok: bool = Field(False, description="TrlParser accepted the migrated recipe (unknown keys rejected).")
    target: str = Field("", description="the hardware the checks and the memory estimate assume.")
    memory: Optional[MemoryEstimate] = None
    fits: Optional[bool] = Field(None, description=f"estimated total within {FITS_FRACTION:.0%} of GPU memory; "
                                                   "null if unknown.")
    accelerate: Optional[AccelerateSummary] = None
    migrated_yaml: str = ""
    versions: dict[str, Optional[str]] = {}
    notes: list[str] = []


class RecipeResult(ToolResult):
    """A written recipe, its accelerate config, how to launch it and the evidence behind it."""
    recipe_path: str
    accelerate_config_path: str
    method: Method
    yaml: str
    launch_commands: dict[str, str]
    target: str
    settings_explained: dict[str, str] = Field(description="why each chosen value.")
    plan: Optional[Recommendation] = Field(None, description="recommend_method's plan the layout came from.")
    schedule: Optional[Schedule] = Field(None, description="the optimizer steps the recipe as written takes "
                                                          "(overrides included), and what small data changed.")
    memory: Optional[MemoryEstimate] = Field(None, description="estimate_memory for the recipe as written.")
    fits: Optional[bool] = None
    spectrum_config_path: Optional[str] = None
    dataset_rows: Optional[int] = None
    warnings: list[str] = []
    notes: list[str] = []

    def key_figures(self) -> dict[str, Any]:
        out = super().key_figures()
        if self.schedule and self.schedule.optimizer_steps:
            out["optimizer_steps"] = self.schedule.optimizer_steps
        if self.memory:
            out["memory_gib_per_gpu"] = round(self.memory.total_gib, 1)
        return out


# ----------------------------------------------------------------------------- hardware target
@dataclass
class Target:
    kind: str                 # "gpu" | "cpu" | "gpu?" (no GPU here and none described: assume one)
    description: str
    described: bool = False
    gpu_name: Optional[str] = None
    gpu_memory_gib: Optional[float] = None
    num_gpus: int = 1
    bf16: bool = True
    cuda_here: bool = False
    notes: list[str] = field(default_factory=list)


def _target(gpu: Optional[str], gpu_memory_gib: Optional[float], num_gpus: Optional[int],
            recipe_use_cpu: Optional[bool] = None) -> Target:
    from .memory import require_gpu
    cuda_here = _cuda_here()
    if gpu or gpu_memory_gib:
        spec = require_gpu(gpu) if gpu else None
        mem = gpu_memory_gib or spec.memory_gib
        name = spec.name if spec else f"{mem:g} GiB GPU"
        n = num_gpus or 1
        return Target(kind="gpu", described=True, gpu_name=name, gpu_memory_gib=mem, num_gpus=n,
                      bf16=spec.bf16 if spec else True, cuda_here=cuda_here,
                      description=f"{n}x {name} (described)")
    if recipe_use_cpu:
        return Target(kind="cpu", description="CPU (the recipe sets use_cpu)", num_gpus=0, bf16=False,
                      cuda_here=cuda_here)
    from .hardware import detect_hardware
    hw = detect_hardware()
    if hw.gpus:
        g = hw.gpus[0]
        n = num_gpus or hw.gpu_count
        return Target(kind="gpu", gpu_name=g.name, gpu_memory_gib=g.total_memory_gib, num_gpus=n,
                      bf16=hw.bf16_supported, cuda_here=True, description=f"{n}x {g.name} (detected)")
    if recipe_use_cpu is None:  # generate_recipe: train on this CPU machine
        return Target(kind="cpu", num_gpus=0, bf16=False,
                      description=f"CPU ({hw.cpu_cores} cores, no CUDA GPU detected)")
    return Target(kind="gpu?", num_gpus=num_gpus or 1, bf16=True,
                  description="a GPU machine (none here, none described: GPU-only settings are "
                              "warnings, and no memory fit is computed)")


def _cuda_here() -> bool:
    try:
        import torch
        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001
        return False


# ----------------------------------------------------------------------------- helpers
def _default(key: str) -> Any:
    f = trl_fields().get(key)
    if f is None:
        return None
    fl = f[1]
    import dataclasses
    if fl.default is not dataclasses.MISSING:
        return fl.default
    if fl.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return fl.default_factory()  # type: ignore[misc]
    return None


def _eff(cfg: dict, key: str) -> Any:
    """The value training will use: the recipe's, else the TRL default (bf16 and checkpointing
    follow TRL's rules)."""
    if key == "bf16":
        v = cfg.get("bf16")
        return (not bool(cfg.get("fp16"))) if v is None else bool(v)
    if key == "activation_checkpointing":
        v = cfg.get("activation_checkpointing")
        if v is None:
            v = cfg.get("gradient_checkpointing", True)
        return bool(v)
    return cfg[key] if key in cfg else _default(key)


def _is_local_ref(value: str, root: Path) -> Optional[Path]:
    """The existing file/dir a recipe value names, inside the workspace only (path policy)."""
    p = Path(str(value))
    p = (p if p.is_absolute() else root / p).resolve()
    if not is_inside(p, root):
        return None
    return p if p.exists() else None


# Recipe keys that name files or folders the training process reads or writes.
PATH_KEYS = ("output_dir", "logging_dir", "resume_from_checkpoint", "chat_template_path", SPECTRUM_KEY,
             "deepspeed", "accelerator_config", "dataset_name", "model_name_or_path",
             "tokenizer_name_or_path")
DATASET_PATH_KEYS = ("path", "data_dir", "data_files")
# env: variables the training process writes to (logging_dir migrates to TENSORBOARD_LOGGING_DIR).
ENV_PATH_KEYS = ("TENSORBOARD_LOGGING_DIR", "WANDB_DIR", "TRACKIO_DIR", "HF_DATASETS_CACHE")


def _outside(value: Any, root: Path) -> Optional[Path]:
    """Where `value` resolves when that is outside the workspace (symlinks followed), else None.
    A hub id ("org/name") is a relative path inside the workspace, so it is never outside."""
    if not isinstance(value, str) or not value.strip() or value.lstrip().startswith("{"):
        return None
    if "\x00" in value:
        return Path("<NUL byte>")
    if value.startswith("~"):
        return Path(value)
    p = Path(value)
    try:
        r = (p if p.is_absolute() else root / p).resolve()
    except (OSError, RuntimeError):
        return Path(value)
    return None if is_inside(r, root) else r


def recipe_paths(cfg: dict) -> list[tuple[str, Any]]:
    """(key, value) for every path a recipe names, datasets mixture entries included."""
    out = [(k, cfg.get(k)) for k in PATH_KEYS if isinstance(cfg.get(k), str)]
    env = cfg.get("env") if isinstance(cfg.get("env"), dict) else {}
    out += [(f"env.{k}", v) for k, v in env.items() if k in ENV_PATH_KEYS and isinstance(v, str)]
    mix = cfg.get("datasets")
    for i, d in enumerate(mix if isinstance(mix, list) else []):
        if not isinstance(d, dict):
            continue
        for k in DATASET_PATH_KEYS:
            v = d.get(k)
            vals = [v] if isinstance(v, str) else list(v.values()) if isinstance(v, dict) else \
                v if isinstance(v, list) else []
            out.extend((f"datasets[{i}].{k}", x) for x in vals if isinstance(x, str))
    return out


def _looks_like_path(value: str) -> bool:
    v = str(value)
    return v.startswith((".", "/", "~")) or v.count("/") > 1 or bool(re.search(r"\.(jsonl?|csv|parquet|jinja)$", v))


def _spectrum_fraction(patterns: list[str], num_layers: int) -> float:
    layered = [p for p in patterns if re.search(r"layers\.\d+\.", p)]
    total = max(1, num_layers * 7)
    return min(1.0, max(0.01, len(layered) / total))


# ----------------------------------------------------------------------------- analysis
@dataclass
class _Analysis:
    """What the checks found: the verdict's lists, the TRL parse and the memory fit."""
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unknown: list[UnknownKey] = field(default_factory=list)
    parse_ok: bool = False
    memory: Optional[MemoryEstimate] = None
    fits: Optional[bool] = None

    def error(self, text: str) -> None:
        self.errors.append(text)

    def warn(self, text: str) -> None:
        self.warnings.append(text)

    def note(self, text: str) -> None:
        self.notes.append(text)


@dataclass
class _Recipe:
    """What every check reads: the recipe, where it trains, and the flags derived once (bf16 as
    TRL resolves it)."""
    cfg: dict
    t: Target
    root: Path
    accel: Optional[AccelerateSummary]
    method: str
    bf16: bool
    fp16: bool
    use_cpu: bool
    cpu_target: bool   # use_cpu, or the target itself is a CPU
    peft: bool
    q4: bool
    q8: bool

    @classmethod
    def of(cls, cfg: dict, t: Target, root: Path, accel: Optional[AccelerateSummary]) -> "_Recipe":
        use_cpu = bool(cfg.get("use_cpu"))
        return cls(cfg=cfg, t=t, root=root, accel=accel, method=infer_method(cfg), bf16=_eff(cfg, "bf16"),
                   fp16=bool(cfg.get("fp16")), use_cpu=use_cpu, cpu_target=use_cpu or t.kind == "cpu",
                   peft=bool(cfg.get("use_peft")), q4=bool(cfg.get("load_in_4bit")),
                   q8=bool(cfg.get("load_in_8bit")))


def _check_keys(r: _Recipe, a: _Analysis) -> None:
    """Keys TRL rejects, with the closest valid names."""
    fields = trl_fields()
    for k in r.cfg:
        if k not in fields and k not in NON_FIELD_KEYS:
            a.unknown.append(UnknownKey(key=k, suggestions=suggest(k)))
    for u in a.unknown:
        a.error(f"unknown key '{u.key}': TRL rejects it" + (f" (did you mean {', '.join(u.suggestions)}?)"
                                                           if u.suggestions else "."))
    if "env" in r.cfg and not isinstance(r.cfg["env"], dict):
        a.error("env must be a mapping of environment variable names to values.")


def _check_trl_parse(r: _Recipe, a: _Analysis) -> None:
    """The installed TRL's parse; TrainingArguments' hardware checks run against the target, not
    against this machine."""
    unknown = {u.key for u in a.unknown}
    parse_cfg = {k: v for k, v in r.cfg.items() if k not in unknown}
    if not r.t.cuda_here and parse_cfg.get("use_cpu") is not True:
        neutral = [k for k in ("bf16", "tf32") if (_eff(parse_cfg, k) if k == "bf16" else parse_cfg.get(k))]
        if neutral:
            parse_cfg = {**parse_cfg, "bf16": False, "tf32": None}
            against = "the described GPU" if r.t.kind == "gpu" else "the GPU the recipe is meant for"
            a.note(f"{', '.join(neutral)} parsed as off: TrainingArguments checks them against the local device, "
                   f"which has no CUDA GPU; this report checks them against {against}.")
    _, err, trl_warns = trl_parse(parse_cfg, base_dir=r.root)
    if err:
        a.error(f"the installed TRL rejects the recipe: {err}")
    a.parse_ok = err is None and not a.unknown
    for w in trl_warns:
        if "gradient_checkpointing` is deprecated" in w and "gradient_checkpointing" not in r.cfg:
            continue  # TRL's own default triggers it; the recipe is not at fault
        a.warn(f"TRL/transformers: {w}")


def _check_choices(r: _Recipe, a: _Analysis) -> None:
    """Values the argparse layer does not check against a field's choices."""
    fields = trl_fields()
    for k, v in r.cfg.items():
        f = fields.get(k)
        choices = f[1].metadata.get("choices") if f else None
        if choices and v is not None and v not in choices:
            a.error(f"{k}: {v!r} is not one of {', '.join(map(str, choices))}.")


def _check_mixed_precision(r: _Recipe, a: _Analysis) -> None:
    if r.bf16 and r.fp16:
        a.error("fp16 and bf16 are both true: pick one (bf16 on Ampere or newer, fp16 on T4/V100).")


def _check_quantization(r: _Recipe, a: _Analysis) -> None:
    """4/8-bit, LoRA and Spectrum keys that contradict each other or TRL."""
    cfg, q4, q8, peft = r.cfg, r.q4, r.q8, r.peft
    if q4 and q8:
        a.error("load_in_4bit and load_in_8bit are both true: pick one (4-bit for QLoRA).")
    if (q4 or q8) and not peft:
        a.error("load_in_4bit/load_in_8bit without use_peft: a quantized base cannot be trained directly. Set "
                "use_peft: true (QLoRA) or drop the quantization.")
    if cfg.get(SPECTRUM_KEY) and (peft or q4 or q8):
        a.error("spectrum_config_path with use_peft/load_in_4bit: Spectrum trains the selected layers' full "
                "weights; drop the LoRA/quantization keys or the Spectrum config.")
    if not peft and any(k.startswith("lora_") for k in cfg):
        a.warn("lora_* keys are set but use_peft is false: they are ignored (this is a "
               f"{r.method} fine-tune).")
    tm = cfg.get("lora_target_modules")
    if peft and tm and ("lm_head" in (tm if isinstance(tm, list) else [tm])):
        a.error("lora_target_modules includes lm_head: TRL 1.16 rejects LoRA on the output layer. Put lm_head in "
                "lora_modules_to_save instead.")
    if q4 and str(cfg.get("dtype", "float32")) == "float32" and not r.use_cpu:
        a.warn("QLoRA with dtype float32 (the ModelConfig default): TRL uses dtype as the 4-bit compute dtype, "
               "so every matmul runs in fp32. Set dtype: bfloat16 (float16 on T4/V100).")
    qs = cfg.get("bnb_4bit_quant_storage")
    if q4 and qs and cfg.get("dtype") and qs != cfg.get("dtype"):
        a.warn(f"bnb_4bit_quant_storage ({qs}) differs from dtype ({cfg.get('dtype')}): FSDP/ZeRO-3 need one "
               "dtype for all parameters; set both to bfloat16.")


def _check_cpu_precision(r: _Recipe, a: _Analysis) -> None:
    """Half precision where it cannot run: on CPU, or fp16 gradients of fp16 weights."""
    if r.use_cpu and r.bf16:
        a.error("use_cpu with bf16 on (TRL turns bf16 on unless fp16 is set): CPU training must run in fp32. "
                "Set bf16: false.")
    if r.use_cpu and r.fp16:
        a.error("use_cpu with fp16: fp16 mixed precision needs a GPU. Set fp16: false.")
    if r.fp16 and str(r.cfg.get("dtype")) in ("float16",) and r.method in ("full", "spectrum"):
        a.error("fp16 with dtype float16 on a full/Spectrum fine-tune: AMP cannot unscale fp16 gradients of fp16 "
                "weights. Load the weights in float32 (dtype: float32) with fp16: true, or use bf16.")


def _check_data_keys(r: _Recipe, a: _Analysis) -> None:
    """Packing and the SFTConfig data keys TRL refuses or deprecates."""
    cfg = r.cfg
    if cfg.get("packing") and cfg.get("max_length", 1) is None:
        a.error("packing with max_length null: TRL needs max_length as the packed sequence length.")
    if cfg.get("padding_free") and not cfg.get("packing") and cfg.get("max_length", 1024) is not None:
        a.error("padding_free without packing and with max_length set: TRL refuses it (max_length is not "
                "enforced). Enable packing or drop padding_free.")
    if cfg.get("packing") and cfg.get("packing_strategy") == "wrapped":
        a.warn("packing_strategy 'wrapped' cuts sequences mid-sample; 'bfd' (default) keeps samples whole.")
    if cfg.get("truncation_mode") == "keep_end":
        a.warn("truncation_mode keep_end is deprecated in TRL 1.x (removed in 2.0).")
    if cfg.get("pad_token") is not None:
        a.warn("pad_token is deprecated in TRL 1.x: set the tokenizer's pad token instead.")
    if cfg.get("dataset_text_field") not in (None, "text"):
        a.note("dataset_text_field applies only to plain-text (language modeling) datasets; conversational "
               "messages or prompt/completion rows ignore it.")


# report_to name -> the package the Trainer imports for it
TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow",
                   "comet_ml": "comet_ml"}


def _check_hub_and_trackers(r: _Recipe, a: _Analysis) -> None:
    """Pushing to the hub, and trackers whose package the training machine must have."""
    cfg = r.cfg
    if cfg.get("push_to_hub"):
        a.warn("push_to_hub is on: training pushes to the Hugging Face Hub (network + write token). Turn it off "
               "for offline runs, and push only with the user's consent.")
    for rep in ([cfg["report_to"]] if isinstance(cfg.get("report_to"), str) else cfg.get("report_to") or []):
        mod = TRACKER_MODULES.get(str(rep))
        if mod and not has_module(mod):
            a.warn(f"report_to {rep}: the {mod} package is not installed here (the Trainer fails at start if it "
                   "is missing on the training machine).")


def _check_peft_zero3(r: _Recipe, a: _Analysis) -> None:
    cfg, accel = r.cfg, r.accel
    if r.method in ("lora", "qlora") and cfg.get("deepspeed") is None and accel and accel.sharding == "zero3":
        kw = cfg.get("activation_checkpointing_kwargs") or cfg.get("gradient_checkpointing_kwargs") or {}
        if _eff(cfg, "activation_checkpointing") and not kw.get("use_reentrant"):
            a.warn("PEFT + DeepSpeed ZeRO-3 needs reentrant checkpointing: TRL forces it through the deprecated "
                   "gradient_checkpointing_kwargs, which transformers 5.23 no longer reads when "
                   "activation_checkpointing_kwargs is unset. Set activation_checkpointing_kwargs: "
                   "{use_reentrant: true}.")


def _check_kernels(r: _Recipe, a: _Analysis) -> None:
    """liger and flash-attention: GPU-only kernels, and packages the training machine needs."""
    attn = r.cfg.get("attn_implementation")
    gpu_only = []
    if r.cfg.get("use_liger_kernel"):
        gpu_only.append(("use_liger_kernel", "liger_kernel", "liger-kernel's first forward fails without a GPU"))
    if attn in FLASH_ATTN:
        gpu_only.append(("attn_implementation", "flash_attn", f"{attn} needs the flash-attn package and a GPU"))
    for key, mod, why in gpu_only:
        instead = "sdpa attention" if key == "attn_implementation" else "no liger"
        if r.cpu_target:
            a.warn(f"{key}: {why}; this recipe trains on CPU, so tools.train falls back to {instead} (and says "
                   "so). Remove it to make the recipe say what runs.")
        elif not has_module(mod):
            a.warn(f"{key}: the {mod} package is not installed here; install it on the training machine, or "
                   f"tools.train falls back to {instead} there.")


def _check_target(r: _Recipe, a: _Analysis) -> None:
    """Precision and quantization against the hardware the recipe trains on."""
    t, cfg = r.t, r.cfg
    if t.kind == "gpu?" and not r.use_cpu:
        if r.bf16 or r.q4 or r.fp16:
            a.warn("this machine has no CUDA GPU: the recipe (bf16/fp16/4-bit) is meant for a GPU machine. To run "
                   "it here set use_cpu: true, bf16: false, and drop load_in_4bit/liger/flash-attn.")
    if t.kind == "gpu" and not t.bf16 and r.bf16:
        a.error(f"bf16 on {t.gpu_name}, which has no bf16 (compute capability < 8.0): set bf16: false, fp16: true.")
    if t.kind == "gpu" and not t.bf16 and cfg.get("tf32"):
        a.error(f"tf32 needs an Ampere or newer GPU; {t.gpu_name} has none. Remove tf32.")
    if r.cpu_target and cfg.get("tf32"):
        a.error("tf32 on CPU: TrainingArguments raises. Remove tf32.")
    if r.cpu_target and r.q4:
        a.warn("4-bit QLoRA on CPU runs (bitsandbytes CPU backend) but very slowly; use LoRA or full on tiny "
               "models.")


def _check_accelerate(r: _Recipe, a: _Analysis) -> None:
    """The accelerate config's own problems, and where it disagrees with the recipe."""
    accel = r.accel
    if not accel:
        return
    for p in accel.problems:
        a.error(f"accelerate config: {p}")
    mp = accel.mixed_precision
    want = "bf16" if r.bf16 else "fp16" if r.fp16 else "no"
    if mp and mp != want:
        a.warn(f"accelerate mixed_precision is {mp} but the recipe trains in {want}: the Trainer's flags win; "
               "set both the same.")
    if accel.use_cpu != r.use_cpu:
        a.warn(f"accelerate use_cpu={accel.use_cpu} but the recipe's use_cpu={r.use_cpu}.")
    if r.q4 and accel.sharding in ("fsdp", "zero3") and not r.cfg.get("bnb_4bit_quant_storage"):
        a.error(f"QLoRA with {accel.sharding.upper()} needs bnb_4bit_quant_storage (= dtype, e.g. bfloat16): "
                "with the default uint8 storage the 4-bit weights cannot be sharded.")


def _check_boundary(r: _Recipe, a: _Analysis) -> None:
    """Every path in the recipe stays in the workspace (the training process reads and writes
    them with no path policy of its own)."""
    for key, value in recipe_paths(r.cfg):
        out = _outside(value, r.root)
        if out is not None:
            a.error(f"{key} '{short(value)}' resolves to {short(out)}, outside the workspace {r.root}: "
                    "the run would read or write there. Use a path inside the workspace.")


REMOTE_CODE_WARNING = (
    "trust_remote_code: true runs Python code from the model's repository (its modeling_*.py) inside "
    "the training process, with your user's rights. Read that code first; launch_training refuses it "
    "unless allow_remote_code=true.")


def _check_side_effects(r: _Recipe, a: _Analysis) -> None:
    """Settings that run foreign code or send data out: said plainly, never silent."""
    if r.cfg.get("trust_remote_code"):
        a.warn(REMOTE_CODE_WARNING)
    reps = r.cfg.get("report_to")
    reps = [reps] if isinstance(reps, str) else reps if isinstance(reps, list) else []
    if "all" in reps:
        a.warn("report_to: all sends metrics to EVERY tracker installed on the training machine "
               "(wandb, mlflow, comet_ml... upload over the network). Name the trackers you want "
               "(e.g. tensorboard for local logs) or use none.")


def _check_model(r: _Recipe, a: _Analysis) -> None:
    model, root = r.cfg.get("model_name_or_path"), r.root
    if not model:
        a.error("model_name_or_path is missing: SFTTrainer needs the model to train.")
    elif _looks_like_path(model) and not _is_local_ref(model, root):
        a.error(f"model_name_or_path '{model}' looks like a local path but does not exist under {root}.")
    elif not _is_local_ref(str(model), root):
        from .models import renamed_hub_id
        renamed = renamed_hub_id(str(model))
        if renamed:
            a.note(f"model_name_or_path '{model}': its owner renamed it '{renamed}' (the hub redirects the old "
                   "id); needs network or a local copy at training time.")
    if not r.cfg.get("output_dir"):
        a.warn("output_dir is not set: the Trainer writes to ./trainer_output.")


def _evaluates(cfg: dict) -> bool:
    return str(cfg.get("eval_strategy", "no")) != "no"


def _check_dataset_name(r: _Recipe, a: _Analysis) -> None:
    """dataset_name: a workspace directory with the splits the recipe names, or a hub id."""
    cfg, root = r.cfg, r.root
    ds_name, mix = cfg.get("dataset_name"), cfg.get("datasets")
    if not ds_name and not mix:
        a.error("no dataset: set dataset_name (a convert_dataset directory or hub id) or a datasets: mixture.")
    if not ds_name or mix:
        return
    local = _is_local_ref(ds_name, root)
    if local is None and _looks_like_path(ds_name):
        a.error(f"dataset_name '{ds_name}' does not exist under {root}.")
    elif local is None:
        a.warn(f"dataset_name '{ds_name}' is not a directory in the workspace, so the datasets library will "
               "fetch it from the hub (network needed); for a local dataset give the convert_dataset output "
               "directory.")
    elif local.is_file():
        a.warn(f"dataset_name '{ds_name}' is a file: load it through a datasets: mixture "
               "(path: json, data_files: <file>) instead.")
    elif local.is_dir():
        names = {p.stem for p in local.iterdir() if p.is_file()}
        tr, te = cfg.get("dataset_train_split", "train"), cfg.get("dataset_test_split", "test")
        if names and tr not in names and not (local / "dataset_dict.json").exists():
            a.warn(f"dataset_name '{ds_name}' has no '{tr}' file (files: {', '.join(sorted(names)[:6])}).")
        if _evaluates(cfg) and names and te not in names and not (local / "dataset_dict.json").exists():
            a.error(f"eval_strategy is {cfg.get('eval_strategy')} but '{ds_name}' has no '{te}' split: add a "
                    "test split (convert_dataset test_size) or set eval_strategy: 'no'.")


def _check_mixture(r: _Recipe, a: _Analysis) -> None:
    """A datasets: mixture: each entry's path and files, and a test split when evaluating."""
    mix = r.cfg.get("datasets")
    if not isinstance(mix, list):
        return
    for i, d in enumerate(mix):
        if not isinstance(d, dict) or "path" not in d:
            a.error(f"datasets[{i}] needs a 'path' (e.g. path: json, data_files: data/train.jsonl).")
            continue
        files = d.get("data_files")
        for f in ([files] if isinstance(files, str) else (files.values() if isinstance(files, dict)
                                                           else files or [])):
            if isinstance(f, str) and not any(c in f for c in "*?[") and not _is_local_ref(f, r.root):
                a.error(f"datasets[{i}].data_files '{f}' does not exist under {r.root}.")
    if _evaluates(r.cfg) and r.cfg.get("test_split_size") is None:
        a.error("eval_strategy is on but the datasets mixture has no test split: set test_split_size (e.g. 0.05) "
                "or eval_strategy: 'no'.")


def _check_chat_template(r: _Recipe, a: _Analysis) -> None:
    """chat_template_path exists, and a .jinja one comes with the EOS it ends turns with."""
    ct, root = r.cfg.get("chat_template_path"), r.root
    if ct and str(ct).endswith((".jinja", ".j2")) and _is_local_ref(ct, root) and not r.cfg.get("eos_token"):
        eot = template_end_of_turn(template_text(str(ct), root)[0] or "")
        if eot:
            a.warn(f"chat_template_path is a .jinja file: TRL sets only the template, so the tokenizer keeps its "
                   f"own EOS. Set eos_token: '{eot}' (the template's end of turn) so the model learns to stop.")
    if ct and _looks_like_path(ct) and not _is_local_ref(ct, root):
        a.error(f"chat_template_path '{ct}' does not exist under {root}.")
    elif ct and not _is_local_ref(ct, root):
        a.note(f"chat_template_path '{ct}' is a hub id: TRL clones that tokenizer's template and special tokens "
               "(network needed at training time).")


def _check_config_files(r: _Recipe, a: _Analysis) -> None:
    """The DeepSpeed JSON and, for Spectrum, the YAML of unfrozen parameters."""
    v = r.cfg.get("deepspeed")
    if isinstance(v, str) and not v.lstrip().startswith("{") and not _is_local_ref(v, r.root):
        a.error(f"deepspeed file '{v}' does not exist under {r.root}.")
    if r.method == "spectrum":
        sp = r.cfg.get(SPECTRUM_KEY)
        local = _is_local_ref(str(sp), r.root)
        if local is None or not local.is_file():
            a.error(f"spectrum_config_path '{sp}' does not exist under {r.root}: run spectrum_scan first.")
        else:
            _, problem = spectrum_patterns(local)
            if problem:
                a.error(f"spectrum_config_path '{sp}' {problem}")


def _check_assistant_only_loss(r: _Recipe, a: _Analysis) -> None:
    """assistant_only_loss needs {% generation %} markers, or a template TRL has a training
    variant of."""
    if not r.cfg.get("assistant_only_loss"):
        return
    ref = r.cfg.get("chat_template_path") or r.cfg.get("model_name_or_path")
    text, where = template_text(str(ref), r.root) if ref else (None, "")
    if text is None:
        a.warn(f"assistant_only_loss: could not read the chat template of '{ref}' to check its "
               "{% generation %} markers; verify_masking shows what is trained.")
    elif not has_generation_markers(text):
        known = trl_known_templates().get(text)
        if known:
            a.note(f"assistant_only_loss: the template ({where}) has no {{% generation %}} markers; TRL swaps in "
                   f"its '{known}_training' variant.")
        else:
            a.error(f"assistant_only_loss needs {{% generation %}} markers in the chat template ({where} has none, "
                    "and TRL has no training variant for it): TRL raises. Use prompt/completion data with "
                    "completion_only_loss, or a template with the markers (TRL's *_training.jinja).")


# How the over-the-GPU error begins: launch_training(require_memory_fit=false) overrides it.
MEMORY_ERROR = "memory: estimated"


def _check_memory(r: _Recipe, a: _Analysis) -> None:
    """estimate_memory for the recipe on its target: over the GPU is an error, within little
    headroom a warning."""
    a.memory, mem_note = _memory(r)
    if mem_note:
        a.note(mem_note)
    m = a.memory
    if m is None:
        return
    a.fits = m.fits
    if m.gpu_memory_gib and m.total_gib > m.gpu_memory_gib:
        load = next((n for n in m.notes if n.startswith("Load-time peak")), None)
        if m.peak_phase == LOAD_PHASE and load:  # batch, checkpointing, more GPUs cannot help
            a.error(f"{MEMORY_ERROR} {m.total_gib:.1f} GiB per GPU exceeds the {m.gpu_memory_gib:.1f} "
                    f"GiB of {r.t.gpu_name or 'the GPU'} while the model loads. {load}")
        else:
            a.error(f"{MEMORY_ERROR} {m.total_gib:.1f} GiB per GPU exceeds the {m.gpu_memory_gib:.1f} GiB "
                    f"of {r.t.gpu_name or 'the GPU'}: lower per_device_train_batch_size or max_length, "
                    "enable activation_checkpointing, or use QLoRA / more GPUs (recommend_method).")
    elif m.fits is False:
        a.warn(f"memory: estimated {m.total_gib:.1f} GiB per GPU is above {FITS_FRACTION:.0%} of "
               f"{m.gpu_memory_gib:.1f} GiB: little headroom (the estimate is within about "
               f"+-{ESTIMATE_ERROR:.0%}).")


# Every check validate_recipe (and generate_recipe, before it writes) runs, in report order.
CHECKS: tuple[Callable[[_Recipe, _Analysis], None], ...] = (
    _check_keys, _check_trl_parse, _check_choices, _check_mixed_precision, _check_quantization,
    _check_cpu_precision, _check_data_keys, _check_hub_and_trackers, _check_peft_zero3, _check_kernels,
    _check_target, _check_accelerate, _check_boundary, _check_side_effects, _check_model,
    _check_dataset_name, _check_mixture, _check_chat_template, _check_config_files,
    _check_assistant_only_loss, _check_memory)


def _analyse(cfg: dict, t: Target, root: Path, accel: Optional[AccelerateSummary]) -> _Analysis:
    """Unknown keys, the TRL parse, contradictions, files, and the memory fit."""
    r, a = _Recipe.of(cfg, t, root, accel), _Analysis()
    for check in CHECKS:
        check(r, a)
    return a


def _memory_dtype(r: _Recipe) -> str:
    """The weights' dtype as estimate_memory names it (CPU training runs in fp32)."""
    if r.t.kind == "cpu" or r.cfg.get("use_cpu"):
        return "fp32"
    dt = str(r.cfg.get("dtype", "float32"))
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(
        dt, "bf16" if r.bf16 else "fp16" if r.fp16 else "fp32")


def _spectrum_share(r: _Recipe, num_layers: int) -> float:
    """The share of the decoder Spectrum trains: from the recipe's YAML, else Spectrum's 30%."""
    if r.method == "spectrum":
        local = _is_local_ref(str(r.cfg.get(SPECTRUM_KEY)), r.root)
        pats = spectrum_patterns(local)[0] if local and local.is_file() else None
        if pats:
            return _spectrum_fraction(pats, num_layers)
    return 0.3


def _memory(r: _Recipe) -> tuple[Optional[MemoryEstimate], Optional[str]]:
    """estimate_memory for the recipe as written on its target, and a note when it has no fit."""
    from .memory import estimate_memory
    from .models import get_model_facts
    cfg, t = r.cfg, r.t
    model = cfg.get("model_name_or_path")
    if not model:
        return None, None
    try:
        facts = get_model_facts(str(model))
    except Exception as exc:  # noqa: BLE001 - unknown model, offline: no estimate
        return None, f"memory estimate skipped: {exc}"
    tm = cfg.get("lora_target_modules") or ["q_proj", "v_proj"]  # PEFT's Llama default when unset
    num_gpus, sharding, offload = max(1, t.num_gpus), "none", False
    if r.accel:
        num_gpus, sharding, offload = max(1, r.accel.num_processes), r.accel.sharding, r.accel.cpu_offload
    if num_gpus < 2:
        sharding, offload = "none", False
    attn = cfg.get("attn_implementation") or "sdpa"
    try:
        est = estimate_memory(
            facts.name if facts.source == "catalog" else str(model), method=r.method,
            seq_len=int(cfg.get("max_length") or 1024), micro_batch=int(_eff(cfg, "per_device_train_batch_size")),
            gradient_checkpointing=_eff(cfg, "activation_checkpointing"), packing=bool(cfg.get("packing")),
            optimizer=str(_eff(cfg, "optim")), dtype=_memory_dtype(r), liger=bool(cfg.get("use_liger_kernel")),
            lora_r=int(cfg.get("lora_r", 16)), lora_target_modules=tm,
            modules_to_save=cfg.get("lora_modules_to_save") if r.method in ("lora", "qlora") else None,
            spectrum_fraction=_spectrum_share(r, facts.num_layers), num_gpus=num_gpus, sharding=sharding,
            cpu_offload=offload, gpu=None, gpu_memory_gib=t.gpu_memory_gib if t.kind == "gpu" else None,
            attn_implementation=attn if attn in ("sdpa", "flash_attention_2", "eager") else "sdpa",
            lora_dropout=float(cfg.get("lora_dropout", 0.05)))
    except Exception as exc:  # noqa: BLE001 - an estimator limit must not hide the rest of the report
        return None, f"memory estimate skipped: {exc}"
    note = None
    if est.fits is None and (t.kind == "cpu" or cfg.get("use_cpu")):
        note = f"memory: CPU training, estimated {est.total_gib:.2f} GiB of RAM (the estimate counts a CUDA context)."
    elif est.fits is None:
        note = ("memory: no GPU size known (describe one with gpu= or gpu_memory_gib=), so fits is null; "
                f"estimated {est.total_gib:.1f} GiB per GPU.")
    return est, note


# ----------------------------------------------------------------------------- validate_recipe
def _load_recipe(recipe: str) -> tuple[str, Optional[Path]]:
    ws = get_workspace()
    s = recipe if isinstance(recipe, str) else str(recipe)
    stripped = s.strip()
    if not stripped:
        raise UserError("is empty.", field="recipe", fix="Give a recipe path in the workspace or the YAML text.")
    is_text = "\n" in stripped or stripped.startswith("{") or (
        ": " in stripped and not stripped.endswith((".yaml", ".yml")))
    if is_text:
        return s, None
    path = ws.resolve(stripped, field="recipe", must_exist=True, kind="file")
    return path.read_text(encoding="utf-8"), path


def validate_recipe(
    recipe: Annotated[str, Field(description="Path or YAML text.")],
    write_migrated: Optional[str] = None,
    gpu: Gpu = None,
    gpu_memory_gib: GpuMemoryGib = None,
    num_gpus: NumGpus = None,
    accelerate_config: Optional[str] = None,
) -> RecipeValidation:
    """Check a recipe against the installed TRL, migrate old keys, check its memory fit.

    Migrates 2024-era keys: renames (max_seq_length, torch_dtype, use_liger, warmup_ratio,
    tokenizer_name_or_path, evaluation_strategy, gradient_checkpointing...) each with its reason;
    unknown keys with the closest valid names; the real TrlParser parse (YAML for `trl sft` /
    `python -m tools.train`); contradictions (fp16+bf16, 4-bit without PEFT, liger/flash-attn
    without GPU or package, assistant_only_loss without {% generation %}, bf16 on a GPU without it,
    missing dataset/template/Spectrum files); and the memory fit on the target GPU. Returns valid,
    errors, warnings, changes, the migrated YAML (written when write_migrated is given). Spectrum
    recipes are parsed without spectrum_config_path, whose file must exist.

    Parameters:
    - recipe: a recipe path in the workspace, or the YAML text itself.
    - write_migrated: write the migrated recipe to this workspace path (may be the recipe's own).
    - gpu, gpu_memory_gib, num_gpus: the hardware the run will use (default: this machine).
    - accelerate_config: the accelerate config the run will use; checked, and it sets the GPUs
      and sharding of the memory fit."""
    ws = get_workspace()
    text, path = _load_recipe(recipe)
    cfg, changes, mig_warns = migrate(parse_yaml_mapping(text))
    t = _target(gpu, gpu_memory_gib, num_gpus, recipe_use_cpu=bool(cfg.get("use_cpu")))
    accel = None
    if accelerate_config:
        ap = ws.resolve(accelerate_config, field="accelerate_config", must_exist=True, kind="file")
        accel = read_accelerate_config(ap, ws.rel(ap))
    a = _analyse(cfg, t, ws.root, accel)
    v = versions()
    migrated = _migrated_yaml(cfg, changes, v)
    out_path = ws.write_text(write_migrated, migrated, field="write_migrated") if write_migrated else None
    res = RecipeValidation(
        valid=not a.errors, method=infer_method(cfg),
        recipe_path=ws.rel(out_path) if out_path else (ws.rel(path) if path else None),
        migrated_path=ws.rel(out_path) if out_path else None,
        errors=a.errors, warnings=mig_warns + a.warnings, changes=changes, unknown_keys=a.unknown,
        trl_parse_ok=a.parse_ok, target=t.description, memory=a.memory, fits=a.fits, accelerate=accel,
        migrated_yaml=migrated, versions=v, notes=t.notes + a.notes)
    res.summary, res.next_steps = _validation_summary(res, v), _validation_next_steps(res, accelerate_config)
    return res


def _migrated_yaml(cfg: dict, changes: list[Change], v: dict[str, Optional[str]]) -> str:
    """The migrated recipe, with what changed in its header and above each migrated key."""
    header = []
    if changes:
        header = [f"Migrated by validate_recipe for trl {v.get('trl')} / transformers {v.get('transformers')}:"]
        for c in changes:
            header.append(f"  {c.key}: {c.old!r} -> {c.new!r}")
    comments: dict[str, str] = {}
    for c in changes:
        if isinstance(c.new, dict):
            for k in c.new:
                k0 = k.split(".")[0]
                if k0 in cfg and k0 != c.key:
                    comments[k0] = f"migrated from {c.key}"
        elif c.new is not None and c.key in cfg:
            comments[c.key] = f"migrated from {c.old!r}"
    return dump_yaml(cfg, header=header, comments=comments)


def _memory_words(memory: Optional[MemoryEstimate], fits: Optional[bool]) -> str:
    if memory is None:
        return "no memory estimate"
    verdict = {True: "fits", False: "does not fit", None: "no GPU size to check"}[fits]
    return f"estimated {memory.total_gib:.1f} GiB per GPU ({verdict})"


def _validation_summary(res: RecipeValidation, v: dict[str, Optional[str]]) -> str:
    migrated = f", {len(res.changes)} key(s) migrated" if res.changes else ""
    if res.valid:
        text = (f"Valid {res.method} recipe for trl {v.get('trl')}{migrated}, {len(res.warnings)} warning(s); "
                f"{_memory_words(res.memory, res.fits)} on {res.target}.")
    else:
        text = f"Not valid: {len(res.errors)} error(s){migrated}. First: {res.errors[0]}"
    return _cap(text)


def _cap(text: str, n: int = SUMMARY_MAX_CHARS) -> str:
    """A summary within the result contract's length (a long first error is cut, not dropped)."""
    return text if len(text) <= n else text[: n - 3].rstrip() + "..."


def _validation_next_steps(res: RecipeValidation, accelerate_config: Optional[str]) -> list[str]:
    recipe = res.migrated_path or res.recipe_path
    if recipe is None:  # YAML text: write it to a file first
        return ["validate_recipe(recipe=<the YAML>, write_migrated='recipes/<name>.yaml')"]
    if not res.valid:
        return [f"validate_recipe(recipe='{recipe}') after fixing the errors, or generate_recipe(model=..., "
                "dataset=...) for a fresh one"]
    steps = []
    if res.changes and not res.migrated_path:
        steps.append(f"validate_recipe(recipe='{recipe}', write_migrated='{recipe}')")
    acc = f", accelerate_config='{accelerate_config}'" if accelerate_config else ""
    steps += [f"verify_masking(recipe='{recipe}')", f"launch_training(recipe='{recipe}'{acc})"]
    return steps


# ----------------------------------------------------------------------------- generate_recipe
def _count_rows(path: Path) -> Optional[int]:
    if path.suffix.lower() != ".jsonl":
        return None
    n = 0
    with path.open("rb") as fh:
        for line in fh:
            if line.strip():
                n += 1
    return n


# Tokens per epoch estimated from the training file's text when no count is given. Characters per
# token depend on the vocabulary (~4 for English in Llama-3 / Qwen2.5 / Gemma BPE, ~1 for a byte-
# level one, fewer for code or CJK text), so they are measured with the model's own tokenizer on a
# sample of the rows when it is local; CHARS_PER_TOKEN is the fallback. A chat template adds ~5
# tokens per message (role header and end-of-turn markers, e.g. ChatML's
# "<|im_start|>assistant\n ... <|im_end|>\n"). The first rows stand for the rest.
CHARS_PER_TOKEN = 4.0
TEMPLATE_TOKENS_PER_MESSAGE = 5
TOKEN_SAMPLE_ROWS = 2000
RATIO_SAMPLE_CHARS = 200_000  # text tokenized to measure characters per token (well under a second)


@dataclass
class _Dataset:
    cfg: dict
    rows: Optional[int]
    train_file: Optional[Path]
    use_test: bool
    notes: list[str] = field(default_factory=list)


def _text_parts(value: Any, texts: list[str]) -> int:
    """Collect the text of one JSON row into `texts`; return its chat messages."""
    if isinstance(value, str):
        texts.append(value)
        return 0
    if isinstance(value, list):
        return sum(_text_parts(v, texts) for v in value)
    if isinstance(value, dict):
        return sum(_text_parts(v, texts) for k, v in value.items() if k != "role") + (1 if "role" in value else 0)
    return 0


def _chars_per_token(texts: list[str], tokenizer: Optional[str]) -> tuple[float, str]:
    """(characters per token, where the figure comes from) for the sampled text."""
    if tokenizer and texts:
        with contextlib.suppress(Exception):  # no tokenizer there: the fallback says so
            from .data import load_tokenizer
            tok = load_tokenizer(tokenizer, require_template=False)
            text = "\n".join(texts)[:RATIO_SAMPLE_CHARS]
            n = len(tok(text, add_special_tokens=False)["input_ids"])
            if n:
                return len(text) / n, f"measured with {tokenizer}'s tokenizer"
    return CHARS_PER_TOKEN, "English text in common BPE vocabularies; no local tokenizer to measure with"


def _estimate_tokens(path: Optional[Path], rows: Optional[int], seq_len: int,
                     tokenizer: Optional[str] = None) -> tuple[Optional[int], float, str]:
    """(training tokens per epoch, characters per token, its source) from the text of the first
    rows of a JSONL file (each row cut at seq_len, as TRL truncates), scaled to `rows`."""
    if path is None or not rows or path.suffix.lower() != ".jsonl":
        return None, CHARS_PER_TOKEN, ""
    sizes: list[tuple[int, int]] = []
    texts: list[str] = []
    sampled = 0
    with path.open("rb") as fh:
        for line in fh:
            row_texts: list[str] = []
            try:
                messages = _text_parts(json.loads(line), row_texts) if line.strip() else -1
            except ValueError:
                continue
            if messages < 0:
                continue
            sizes.append((sum(map(len, row_texts)), messages))
            if sampled < RATIO_SAMPLE_CHARS:
                texts.extend(row_texts)
                sampled += sizes[-1][0]
            if len(sizes) >= TOKEN_SAMPLE_ROWS:
                break
    if not sizes:
        return None, CHARS_PER_TOKEN, ""
    cpt, source = _chars_per_token(texts, tokenizer)
    per_row = [min(seq_len, math.ceil(c / cpt) + TEMPLATE_TOKENS_PER_MESSAGE * max(1, m)) for c, m in sizes]
    return round(sum(per_row) / len(per_row) * rows), cpt, source


def _dataset_cfg(dataset: str, test_split: Optional[bool]) -> _Dataset:
    ws = get_workspace()
    check_path_text(dataset, "dataset")
    p = Path(dataset)
    local = p if p.is_absolute() else ws.root / p
    if local.exists():
        path = ws.resolve(dataset, field="dataset", must_exist=True)
        return _local_dataset_dir(dataset, path, test_split) if path.is_dir() else \
            _local_dataset_file(dataset, path, test_split)
    # "owner/name" is a hub id unless "owner" is a folder of the workspace (a mistyped local path).
    if "/" in dataset and not _looks_like_path(dataset) and not (ws.root / dataset.split("/")[0]).is_dir():
        cfg = {"dataset_name": dataset, "dataset_train_split": "train"}
        if test_split:
            cfg["dataset_test_split"] = "test"
        return _Dataset(cfg, None, None, bool(test_split), [
            f"dataset '{dataset}' is read from the hub at training time (network needed); check its format "
            "with inspect_dataset and convert it locally when possible."])
    raise UserError(f"'{dataset}' does not exist in the workspace.", field="dataset",
                    fix="Give the convert_dataset output directory (with train.jsonl) or a .jsonl file.")


def _local_dataset_dir(dataset: str, path: Path, test_split: Optional[bool]) -> _Dataset:
    files = {f.name: f for f in path.iterdir() if f.is_file()}
    train = next((files[n] for n in ("train.jsonl", "train.json", "train.parquet", "train.csv") if n in files), None)
    if train is None:
        raise UserError(f"'{dataset}' has no train.jsonl.", field="dataset",
                        fix="Point at the output directory of convert_dataset (train.jsonl and "
                            "optionally test.jsonl), or at a .jsonl file.")
    test = next((files[n] for n in ("test.jsonl", "test.json", "test.parquet", "test.csv") if n in files), None)
    if test_split and test is None:
        raise UserError(f"'{dataset}' has no test split (test.jsonl).", field="test_split",
                        fix="Run convert_dataset with a test split, or pass test_split=false.")
    use_test = bool(test) if test_split is None else bool(test_split)
    cfg = {"dataset_name": get_workspace().rel(path), "dataset_train_split": "train"}
    if use_test:
        cfg["dataset_test_split"] = "test"
    return _Dataset(cfg, _count_rows(train), train, use_test)


def _local_dataset_file(dataset: str, path: Path, test_split: Optional[bool]) -> _Dataset:
    ext = path.suffix.lower().lstrip(".")
    builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(ext)
    if builder is None:
        raise UserError(f"'{dataset}' is not a .jsonl/.json/.csv/.parquet file.", field="dataset",
                        fix="Convert it with convert_dataset and pass the output directory.")
    ds = _Dataset({"datasets": [{"path": builder, "data_files": get_workspace().rel(path), "split": "train"}]},
                  _count_rows(path), path, bool(test_split))
    if ds.use_test:
        ds.cfg["test_split_size"] = 0.05
        ds.notes.append("test split: 5% of the file is held out at load time (test_split_size: 0.05).")
    return ds


def _data_size(ds: _Dataset, rows: Optional[int], tokens: Optional[int], seq_len: int, notes: list[str],
               tokenizer: Optional[str] = None) -> DataSize:
    """Rows and tokens per epoch: as given, else counted in the file and estimated from its text
    (characters per token measured with `tokenizer`, a local model dir, when given)."""
    rows = rows or ds.rows
    if tokens is None:
        tokens, cpt, source = _estimate_tokens(ds.train_file, rows, seq_len, tokenizer)
        if tokens:
            notes.append(f"~{tokens:,} training tokens per epoch ({tokens / rows:.0f} per row), estimated from the "
                         f"text at ~{cpt:.2g} characters per token ({source}); pass dataset_tokens "
                         "(inspect_dataset's token_lengths mean x rows) for the exact count.")
    return data_size(rows, tokens, 512, seq_len)


def _plan(model: str, method: str, t: Target, data: DataSize, seq_len: int, epochs: Optional[float],
          warnings_: list[str], modules_to_save: Optional[list[str]] = None) -> Optional[Recommendation]:
    """recommend_method's layout, restricted to `method` unless auto; None when it has none.
    modules_to_save: what a new chat template makes LoRA/QLoRA train in full (its memory counts)."""
    from .recommend import recommend_method
    kw = dict(dataset_rows=data.rows, dataset_tokens=data.tokens, seq_len=seq_len, epochs=epochs,
              modules_to_save=modules_to_save)
    if t.described:
        kw.update(gpu=None, gpu_memory_gib=t.gpu_memory_gib, num_gpus=t.num_gpus)
        from .memory import find_gpu
        if t.gpu_name and find_gpu(t.gpu_name):
            kw.update(gpu=t.gpu_name)
    elif t.kind == "gpu":
        kw.update(num_gpus=t.num_gpus)
    if method != "auto":
        kw["allow_methods"] = [method]
    if t.kind == "cpu" and method in ("qlora", "spectrum"):
        warnings_.append(f"{method} on CPU: recommend_method plans only full/LoRA without a GPU; using "
                         "micro-batch 1 without checkpointing (check the memory estimate).")
        return None
    try:
        return recommend_method(model, **kw)
    except UserError as exc:
        if method == "auto":
            raise
        warnings_.append(f"recommend_method found no layout for {method} here ({exc}); using micro-batch 1 "
                         "with checkpointing. Check the memory estimate below.")
        return None


@dataclass
class _Layout:
    """The batch layout and schedule a recipe is written with, and the plan behind them."""
    method: str
    micro_batch: int
    checkpointing: bool
    sharding: str
    offload: bool
    optim: str
    packing: bool
    schedule: Schedule
    world: int
    plan: Optional[Recommendation]


def _layout(model: str, method: str, t: Target, data: DataSize, seq_len: int, epochs: Optional[float],
            new_template: bool, warns: list[str], notes: list[str], why: dict[str, str],
            given: Optional[Recommendation] = None) -> _Layout:
    """The plan's layout and schedule (the one given, else recommend_method's now), or for a
    method it has none for, micro-batch 1 with the same schedule rule."""
    rec = given or _plan(model, method, t, data, seq_len, epochs, warns,
                         modules_to_save=["lm_head", "embed_tokens"] if new_template else None)
    chosen: str = rec.method if rec else method
    world = 1 if t.kind == "cpu" else max(1, t.num_gpus)
    if rec is None:
        why["method"] = f"{chosen}: asked for."
        return _Layout(chosen, 1, t.kind != "cpu", "zero3" if t.num_gpus > 1 and chosen in ("full", "spectrum")
                       else "none", False, "adamw_torch" if t.kind == "cpu" else "adamw_torch_fused", True,
                       plan_schedule(data, seq_len, True, chosen, 1, world, epochs=epochs), world, None)
    why["method"] = (f"{chosen}: " + rec.reasons[0]) if method == "auto" else f"{chosen}: asked for."
    why["per_device_train_batch_size"] = rec.reasons[1] if len(rec.reasons) > 1 else ""
    mem_notes, steps_said = set(rec.memory.notes), set(rec.schedule.warnings)  # the final schedule says its own
    warns += [w for w in rec.warnings if "flash-attn" not in w and "liger" not in w
              and w not in mem_notes and w not in steps_said]
    notes += [n for n in rec.warnings if n in mem_notes]
    optim = "adamw_torch" if t.kind == "cpu" else rec.optimizer
    return _Layout(chosen, rec.micro_batch, rec.gradient_checkpointing, rec.sharding, rec.cpu_offload, optim,
                   rec.packing, rec.schedule, world, rec)


def _final_schedule(cfg: dict, data: DataSize, lay: _Layout) -> Schedule:
    """The schedule of the recipe as written (overrides included): the steps the run will take."""
    return schedule_from(data, int(cfg.get("max_length") or 1024), bool(cfg.get("packing")),
                         int(_eff(cfg, "per_device_train_batch_size")), int(_eff(cfg, "gradient_accumulation_steps")),
                         lay.world, float(_eff(cfg, "num_train_epochs")), max_steps=_eff(cfg, "max_steps"),
                         adjustments=lay.schedule.adjustments)


def _put_yaml_key(txt: str, key: str, value: str) -> str:
    """Set `key: value` in accelerate YAML text (at its indentation, keeping comments), or append it."""
    pat = re.compile(rf"^(\s*){re.escape(key)}:.*$", re.M)
    return pat.sub(lambda m: f"{m.group(1)}{key}: {value}", txt) if pat.search(txt) else txt + f"{key}: {value}\n"


def _accelerate_text(t: Target, method: str, sharding: str, offload: bool, mixed: str) -> tuple[str, str]:
    """(template name, YAML text) of the accelerate config for this target and layout."""
    if t.kind == "cpu":
        name = "cpu"
    elif t.num_gpus <= 1:
        name = "single_gpu"
    elif sharding == "zero2":
        name = "deepspeed_zero2"
    elif sharding == "zero3":
        name = "deepspeed_zero3_offload" if offload else "deepspeed_zero3"
    elif sharding == "fsdp":
        name = "fsdp_qlora" if method == "qlora" else "fsdp2"
    else:
        name = "multi_gpu_ddp"
    src = REPO / "recipes" / "accelerate" / f"{name}.yaml"
    if src.is_file():
        text = src.read_text(encoding="utf-8")
    else:  # installed without the repo's recipes/: TRL ships equivalent launch configs
        import importlib.resources as res
        trl_name = {"single_gpu": "single_gpu", "multi_gpu_ddp": "multi_gpu", "deepspeed_zero2": "zero2",
                    "deepspeed_zero3": "zero3", "deepspeed_zero3_offload": "zero3", "fsdp2": "fsdp2",
                    "fsdp_qlora": "fsdp2", "cpu": "single_gpu"}[name]
        text = res.files("trl.accelerate_configs").joinpath(f"{trl_name}.yaml").read_text(encoding="utf-8")

    n = 1 if t.kind == "cpu" else max(1, t.num_gpus)
    text = _put_yaml_key(text, "num_processes", str(n))
    text = _put_yaml_key(text, "mixed_precision", "'no'" if mixed == "no" else mixed)
    text = _put_yaml_key(text, "use_cpu", "true" if t.kind == "cpu" else "false")
    if offload and sharding == "fsdp":
        text = _put_yaml_key(text, "fsdp_offload_params", "true")
    if name == "single_gpu" and "distributed_type" in text:
        text = _put_yaml_key(text, "distributed_type", '"NO"')
    return name, text


HOPPER = ("H100", "H200", "H800", "GH200")


def _attention(t: Target) -> tuple[str, str]:
    """The attention kernel for the target GPU, and why. Flash-attention wherever the target GPU
    runs it (Ampere or newer: the bf16 GPUs), also for a described GPU this machine does not have:
    packed, padding-free batches then skip the padding work, and tools.train falls back to sdpa on
    a machine without the package (it says so)."""
    if t.kind != "gpu" or not t.bf16:
        return "sdpa", ("PyTorch SDPA: " + ("CPU training." if t.kind == "cpu" else
                                            f"flash-attention needs an Ampere or newer GPU; {t.gpu_name} is older."
                                            if t.kind == "gpu" else "no GPU described or detected."))
    hopper = any(h in str(t.gpu_name) for h in HOPPER)
    if hopper and has_module("flash_attn_interface"):
        return "flash_attention_3", f"{t.gpu_name} is Hopper and flash-attention 3 is installed."
    here = "installed here" if has_module("flash_attn") else "not installed here: tools.train falls back to sdpa"
    return "flash_attention_2", (f"{t.gpu_name} runs flash-attention 2 (packed, padding-free batches); flash-attn is "
                                 f"{here}.")


def _multi_node(text: str, nodes: int, ip: Optional[str], warns: list[str]) -> str:
    """The accelerate config of one node of a multi-node run (machine_rank 0; each node passes
    its own --machine_rank)."""
    if '"NO"' in text or "distributed_type: NO" in text:
        text = _put_yaml_key(text, "distributed_type", "MULTI_GPU")  # one GPU per node: DDP over the nodes
    for k, v in (("num_machines", str(nodes)), ("machine_rank", "0"), ("main_process_ip", ip or "MAIN_NODE_IP"),
                 ("main_process_port", "29500"), ("rdzv_backend", "static"), ("same_network", "false")):
        text = _put_yaml_key(text, k, v)
    if not ip:
        warns.append("main_process_ip is the placeholder MAIN_NODE_IP: put node 0's address in the accelerate "
                     "config (validate_recipe and launch refuse it until then), or use the Slurm script, which "
                     "passes it from $SLURM_JOB_NODELIST.")
    return text


def _runtime_defaults(cfg: dict, why: dict, t: Target, method: str, world: int, sharding: str) -> None:
    """Settings that cost nothing and save time on GPUs: dataloader workers and pinning, and no
    unused-parameter search for PEFT under DDP."""
    if t.kind == "gpu":
        cfg["dataloader_num_workers"] = 2
        cfg["dataloader_pin_memory"] = True
        why["dataloader_num_workers"] = "2 workers with pinned memory keep the GPU fed (tokenised rows are cheap)."
    if method in ("lora", "qlora") and world > 1 and sharding == "none":
        cfg["ddp_find_unused_parameters"] = False
        why["ddp_find_unused_parameters"] = ("false: with PEFT every trained parameter is used in each step; the "
                                             "default search for unused ones costs a graph walk per step.")


def _multi_node_commands(rec_path: Path, name: str, nodes: int, per_node: int, acc: str, recipe: str,
                         ip: Optional[str]) -> dict[str, str]:
    """Write the Slurm script next to the recipe; the per-node accelerate line and the torchrun line."""
    ws = get_workspace()
    slurm = rec_path.with_name(rec_path.stem + ".slurm.sh")
    ws.write_text(slurm, slurm_script(name, nodes, per_node, acc, recipe), field="output_path")
    return {
        "slurm": f"sbatch {ws.rel(slurm)}",
        "accelerate": (f"accelerate launch --config_file {acc} --machine_rank <0..{nodes - 1}> "
                       f"-m tools.train --config {recipe}   # the same on every node, its own rank"),
        "torchrun": (f"torchrun --nnodes {nodes} --nproc-per-node {per_node} --node-rank <0..{nodes - 1}> "
                     f"--rdzv-backend c10d --rdzv-endpoint {ip or 'MAIN_NODE_IP'}:29500 "
                     f"-m tools.train --config {recipe}   # DDP only: ZeRO/FSDP come from the accelerate config"),
    }


def slurm_script(name: str, nodes: int, gpus_per_node: int, accelerate_config: str, recipe: str) -> str:
    """An sbatch script: one task per node, each running accelerate launch with its node rank;
    node 0's address from the allocation. The NCCL variables are the ones users most often need."""
    return f"""#!/bin/bash
# Written by generate_recipe: {nodes} nodes x {gpus_per_node} GPUs. Submit from the workspace root:
#   sbatch {Path(recipe).with_suffix('').as_posix()}.slurm.sh
#SBATCH --job-name={name[:60]}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus_per_node}
#SBATCH --exclusive
#SBATCH --output=%x-%j.log
set -euo pipefail
# Node 0 of the allocation is the rendezvous host.
MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${{MAIN_PORT:-29500}}
# NCCL: the interface the nodes reach each other on (ip -br addr), and INFO logs to diagnose a
# hang at start. Uncomment what your cluster needs (InfiniBand: leave NCCL_IB_DISABLE unset).
# export NCCL_SOCKET_IFNAME=eth0
# export NCCL_DEBUG=INFO
# export NCCL_IB_DISABLE=1
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1  # a dead rank ends the job instead of hanging it
srun --kill-on-bad-exit=1 bash -c "python -m accelerate.commands.launch \\
  --config_file {accelerate_config} \\
  --num_machines {nodes} --num_processes {nodes * gpus_per_node} \\
  --machine_rank \\$SLURM_NODEID --main_process_ip $MAIN_IP --main_process_port $MAIN_PORT \\
  -m tools.train --config {recipe}"
"""


@dataclass
class _Request:
    """generate_recipe's inputs resolved: the model, the data and the hardware it trains on."""
    model: str          # as given (recommend_method and spectrum_scan read it)
    model_ref: str      # as the recipe names it: a workspace path, a hub id as given, a catalog variant
    dataset: str
    tied_embeddings: bool
    seq_len: int
    ds: _Dataset
    data: DataSize
    target: Target
    nodes: int
    per_node: Optional[int]
    plan: Optional[Recommendation] = None  # recommend_method's result, when the caller gave it
    warns: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    why: dict[str, str] = field(default_factory=dict)


@dataclass
class _Draft:
    """The recipe as rendered, before it is checked and written."""
    cfg: dict[str, Any]
    lay: _Layout
    method: str          # after the overrides (they may change it)
    name: str            # recipes/<name>.yaml, runs-out/<name>
    mixed: str           # accelerate mixed_precision
    spectrum_path: Optional[str]
    schedule: Schedule   # the optimizer steps of the recipe as written


def _request(model: str, dataset: str, gpu: Optional[str], gpu_memory_gib: Optional[float],
             num_gpus: Optional[int], num_nodes: Optional[int], dataset_rows: Optional[int],
             dataset_tokens: Optional[int], seq_len: Optional[int], test_split: Optional[bool],
             plan: Optional[Recommendation] = None) -> _Request:
    """Model facts, the dataset and its size, the nodes and the target hardware (the plan's, when
    one is given)."""
    from .models import get_model_facts
    ws = get_workspace()
    facts = get_model_facts(model)
    if plan is not None:
        seq_len = plan.seq_len
        gpu, gpu_memory_gib, num_gpus = _plan_hardware(plan, gpu, gpu_memory_gib, num_gpus, num_nodes or 1)
    seq_len = seq_len or min(1024, facts.max_position_embeddings or 1024)
    if facts.source == "local":
        model_ref = ws.rel(ws.resolve(model, field="model", must_exist=True))
    else:  # the exact repository: a hub id as given, a catalog name's own variant
        model_ref = facts.hub_id or model.strip()
    ds = _dataset_cfg(dataset, test_split)
    notes = list(ds.notes)
    data = _data_size(ds, dataset_rows, dataset_tokens, seq_len, notes,
                      tokenizer=model_ref if facts.source == "local" else None)
    nodes, per_node, num_gpus = _nodes(num_nodes, num_gpus, gpu, gpu_memory_gib)
    t = _target(gpu, gpu_memory_gib, num_gpus)
    if t.kind == "cpu" and num_gpus and num_gpus > 1:
        raise UserError("no GPU here and none described.", field="num_gpus",
                        fix="Describe the GPUs (gpu=..., num_gpus=...) or drop num_gpus.")
    if plan is not None:
        _check_plan_fits_here(plan, t, data, notes)
    return _Request(model=model, model_ref=model_ref, dataset=dataset, tied_embeddings=facts.tie_word_embeddings,
                    seq_len=seq_len, ds=ds, data=data, target=t, nodes=nodes, per_node=per_node, plan=plan,
                    notes=notes)


def _check_plan_fits_here(plan: Recommendation, t: Target, data: DataSize, notes: list[str]) -> None:
    """A CPU plan needs this CPU machine; a plan made for other row counts is said."""
    if plan.num_gpus == 0 and t.kind != "cpu":
        raise UserError(f"is a CPU plan ({plan.device}), but the recipe targets {t.description}.", field="plan",
                        fix="Re-run recommend_method for the GPU machine (gpu=..., num_gpus=...).")
    if plan.schedule.rows and data.rows and plan.schedule.rows != data.rows:
        notes.append(f"the plan was made for {plan.schedule.rows:,} rows; the dataset has {data.rows:,}: the "
                     "recipe's schedule counts the dataset's.")


def _read_plan(plan: Any, model: str, method: str, seq_len: Optional[int], epochs: Optional[float]) -> Recommendation:
    """recommend_method's result, checked: the same model, and no argument that contradicts it
    (the plan holds the method, sequence length, schedule and hardware)."""
    if not isinstance(plan, dict):
        raise UserError("must be recommend_method's result (a mapping).", field="plan",
                        fix="Pass recommend_method's structured result as it came, or omit plan.")
    try:
        rec = Recommendation.model_validate(plan)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise UserError(f"is not a recommend_method result: {'.'.join(map(str, first['loc']))}: {first['msg']}.",
                        field="plan", fix="Pass recommend_method's structured result unchanged.") from None
    if _model_name(rec.model) != _model_name(model):
        raise UserError(f"is for {rec.model}, not {model}.", field="plan",
                        fix=f"Call recommend_method(model='{model}', ...) or pass model='{rec.model}'.")
    clashes = [f"{k}={given!r} (the plan has {planned!r})" for k, given, planned in (
        ("method", None if method == "auto" else method, rec.method), ("seq_len", seq_len, rec.seq_len),
        ("epochs", epochs, rec.schedule.epochs)) if given is not None and given != planned]
    if clashes:
        raise UserError(f"contradicts {', '.join(clashes)}.", field="plan",
                        fix="Omit those arguments (the plan decides them), or re-run recommend_method with them.")
    return rec


def _model_name(ref: str) -> str:
    from .models import get_model_facts
    try:
        return get_model_facts(ref).name
    except Exception:  # noqa: BLE001 - an unknown id compares as written
        return ref.strip()


def _plan_hardware(rec: Recommendation, gpu: Optional[str], gpu_memory_gib: Optional[float],
                   num_gpus: Optional[int], nodes: int) -> tuple[Optional[str], Optional[float], Optional[int]]:
    """(gpu, gpu_memory_gib, GPUs per node) the plan was made for; arguments must agree with it."""
    if rec.num_gpus == 0:  # a CPU plan: this machine, as recommend_method saw it
        return gpu, gpu_memory_gib, num_gpus
    from .memory import find_gpu
    name = re.sub(r"^\d+x |\s*\((described|detected)\)$", "", rec.device)
    per_node = max(1, rec.num_gpus // nodes)
    spec = find_gpu(name)
    planned_gpu = spec.name if spec else None
    for key, given, planned in (("num_gpus", num_gpus, per_node), ("gpu_memory_gib", gpu_memory_gib,
                                                                    rec.gpu_memory_gib)):
        if given is not None and planned is not None and abs(given - planned) > 0.5:
            raise UserError(f"{key}={given:g}, but the plan is for {rec.device}.", field="plan",
                            fix=f"Omit {key} (the plan holds the hardware), or re-run recommend_method with it.")
    if gpu and planned_gpu and find_gpu(gpu) and find_gpu(gpu).name != planned_gpu:
        raise UserError(f"gpu='{gpu}', but the plan is for {rec.device}.", field="plan",
                        fix="Omit gpu (the plan holds the hardware), or re-run recommend_method with it.")
    return (gpu or planned_gpu), (gpu_memory_gib or (None if planned_gpu else rec.gpu_memory_gib)), per_node


def _render(req: _Request, method: str, chat_template: Optional[str], spectrum_config: Optional[str],
            epochs: Optional[float], output_dir: Optional[str], report_to: str,
            overrides: Optional[dict[str, Any]]) -> _Draft:
    """The layout, then every recipe key with why, then the overrides; the schedule as written."""
    why, warns, notes, t = req.why, req.warns, req.notes, req.target
    lay = _layout(req.model, method, t, req.data, req.seq_len, epochs, bool(chat_template), warns, notes, why,
                  given=req.plan)
    cfg: dict[str, Any] = {"model_name_or_path": req.model_ref}
    dtype_name, mixed = _precision_keys(cfg, why, t, lay.method)
    spectrum_path = _method_keys(cfg, why, warns, notes, req.model, lay, spectrum_config, dtype_name)
    cfg.update(req.ds.cfg)
    cfg["max_length"] = req.seq_len
    cfg["packing"] = bool(lay.packing)
    why["packing"] = ("packing (bfd, padding-free): rows share max_length blocks, labels are built before "
                      "packing so completion/assistant masks survive.")
    _chat_template_keys(cfg, why, warns, notes, chat_template, lay.method, req.tied_embeddings)
    _training_keys(cfg, why, notes, t, lay, epochs, req.ds.use_test)
    name = f"{model_slug(req.model_ref)}-{lay.method}"
    if output_dir:
        get_workspace().resolve(output_dir, field="output_dir")  # refuses a path outside the workspace
    cfg["output_dir"] = output_dir or f"runs-out/{name}"
    _tracking_keys(cfg, why, report_to)
    chosen = lay.method
    if overrides:
        cfg = apply_overrides(cfg, overrides, notes)
        chosen = infer_method(cfg)
    final = _final_schedule(cfg, req.data, lay)
    warns += final.warnings
    return _Draft(cfg=cfg, lay=lay, method=chosen, name=name, mixed=mixed, spectrum_path=spectrum_path,
                  schedule=final)


def generate_recipe(
    model: Annotated[str, Field(description="Workspace dir, hub id or catalog name.")],
    dataset: Annotated[str, Field(description="convert_dataset dir, .jsonl or hub id.")],
    method: Literal["auto", "qlora", "lora", "spectrum", "full"] = "auto",
    plan: Optional[dict[str, Any]] = None,
    output_path: Optional[str] = None,
    output_dir: Optional[str] = None,
    gpu: Gpu = None,
    gpu_memory_gib: GpuMemoryGib = None,
    num_gpus: NumGpus = None,
    dataset_rows: Annotated[Optional[int], Field(ge=1)] = None,
    dataset_tokens: Annotated[Optional[int], Field(ge=1)] = None,
    seq_len: SeqLen = None,
    chat_template: ChatTemplate = None,
    spectrum_config: Optional[str] = None,
    epochs: Annotated[Optional[float], Field(gt=0)] = None,
    test_split: Optional[bool] = None,
    overrides: Optional[dict[str, Any]] = None,
    num_nodes: Annotated[Optional[int], Field(ge=1, le=1024)] = None,
    main_process_ip: Optional[str] = None,
    report_to: Literal["none", "tensorboard", "trackio"] = "none",
) -> RecipeResult:
    """Write a TRL recipe + accelerate config for a model and a converted dataset, from
    recommend_method's plan.

    The installed TRL parses the recipe before it is written: the flat YAML of
    `python -m tools.train` / `trl sft`. The accelerate config is
    single GPU, DDP, DeepSpeed ZeRO-2/3, offload, FSDP2, FSDP+QLoRA or CPU. Method, micro-batch,
    gradient accumulation, checkpointing, sharding and the schedule (epochs, global batch,
    optimizer steps; adjusted for small data by the rule recommend_method uses) come from the plan
    (plan=, or recommend_method called now) or fill the layout of the method asked for; learning
    rate, schedule, warm-up, clipping and LoRA follow the per-method defaults
    (tools.recipe_defaults); precision, attention kernel and liger follow the hardware. Returns
    the paths, the YAML, launch commands, why each setting, the optimizer steps the run will take,
    and the memory estimate.

    Parameters:
    - method: auto lets recommend_method decide from the model and hardware.
    - plan: recommend_method's result for this model; it then holds the method, seq_len, schedule
      and hardware (arguments that contradict it are refused).
    - output_path: the recipe (default recipes/<name>.yaml); output_dir: the training output
      (default runs-out/<name>).
    - gpu, gpu_memory_gib, num_gpus: the target (default: this machine; with num_nodes, GPUs per node).
    - dataset_rows (default: counted), dataset_tokens (default: estimated from the text at ~4
      characters per token; inspect_dataset's token_lengths mean x rows is exact).
    - seq_len: max_length (default 1024, capped at the model's context).
    - chat_template: a template to train with (.jinja, tokenizer dir or 'trl:<name>'); LoRA/QLoRA
      then also train embed_tokens and lm_head (modules_to_save).
    - spectrum_config: spectrum_scan's YAML (method spectrum; scanned when omitted).
    - epochs: default 3 under 1k rows, 2 under 10k, else 1 (full at most 2), raised for small data.
    - test_split: evaluate on the test split (default: when the dataset has one).
    - overrides: recipe keys set last (TRL names; null removes a key), e.g. {'learning_rate': 1e-4}.
    - num_nodes: machines (>1 also writes a Slurm script); main_process_ip: node 0's address
      (default: a placeholder the Slurm script fills).
    - report_to: a local offline tracker besides metrics.jsonl, logging to <output_dir>/<tracker>."""
    given = _read_plan(plan, model, method, seq_len, epochs) if plan is not None else None
    req = _request(model, dataset, gpu, gpu_memory_gib, num_gpus, num_nodes, dataset_rows, dataset_tokens,
                   seq_len, test_split, plan=given)
    draft = _render(req, method, chat_template, spectrum_config, epochs, output_dir, report_to, overrides)
    w = _write_recipe(req, draft, output_path, main_process_ip, overridden=bool(overrides))
    res = RecipeResult(
        recipe_path=w.recipe_path, accelerate_config_path=w.accelerate_config_path, method=draft.method,
        yaml=w.yaml, launch_commands=w.launch_commands, target=req.target.description,
        settings_explained={k: v for k, v in req.why.items() if v}, plan=draft.lay.plan, schedule=draft.schedule,
        memory=w.memory, fits=w.fits, spectrum_config_path=draft.spectrum_path, dataset_rows=req.data.rows,
        warnings=req.warns, notes=req.notes)
    res.summary, res.next_steps = _recipe_summary(res), _recipe_next_steps(res, req)
    return res


def _recipe_summary(res: RecipeResult) -> str:
    steps = res.schedule.optimizer_steps if res.schedule else None
    steps_words = f"{steps:,} optimizer steps, " if steps else ""
    warned = f" {len(res.warnings)} warning(s)." if res.warnings else ""
    return _cap(f"Wrote {res.recipe_path}: {res.method} on {res.target}; {steps_words}"
                f"{_memory_words(res.memory, res.fits)}.{warned}")


def _recipe_next_steps(res: RecipeResult, req: _Request) -> list[str]:
    """Check the masking of exactly this recipe's data, then launch (with the accelerate config
    where several GPUs share the run)."""
    acc = f", accelerate_config='{res.accelerate_config_path}'" if req.target.num_gpus > 1 else ""
    steps = [f"verify_masking(recipe='{res.recipe_path}')"]
    if res.fits is False:
        steps.append(f"recommend_method(model='{req.model}', ...) for a layout with more headroom")
    if req.nodes > 1:
        return steps + [res.launch_commands["slurm"]]
    return steps + [f"launch_training(recipe='{res.recipe_path}'{acc})"]


def _nodes(num_nodes: Optional[int], num_gpus: Optional[int], gpu: Optional[str],
           gpu_memory_gib: Optional[float]) -> tuple[int, Optional[int], Optional[int]]:
    """(nodes, GPUs per node, GPUs in all): a multi-node plan spans every GPU of every node."""
    nodes = num_nodes or 1
    if nodes == 1:
        return 1, num_gpus, num_gpus
    if not (gpu or gpu_memory_gib):
        raise UserError("a multi-node recipe needs the GPUs described.", field="gpu",
                        fix="Pass gpu= (e.g. 'H100') and num_gpus= (GPUs per node).")
    per_node = num_gpus or 1
    return nodes, per_node, per_node * nodes


def _precision_keys(cfg: dict, why: dict, t: Target, method: str) -> tuple[str, str]:
    """dtype and attention for the target; returns (dtype name, accelerate mixed precision)."""
    if t.kind == "cpu":
        dtype_name, mixed = "float32", "no"
        why["dtype"] = "CPU: fp32 weights and compute (use_cpu: true, bf16: false)."
    elif t.bf16:
        dtype_name, mixed = "bfloat16", "bf16"
        why["dtype"] = f"{t.gpu_name} supports bf16: bf16 weights and mixed precision." + (
            " tools.train keeps the trained weights in fp32 (master weights; bf16 AdamW steps would round "
            "most updates away) unless DeepSpeed/FSDP, which keep their own." if method in ("full", "spectrum")
            else "")
    else:
        dtype_name = "float16" if method in ("lora", "qlora") else "float32"
        mixed = "fp16"
        why["dtype"] = (f"{t.gpu_name} has no bf16: fp16 mixed precision; "
                        + ("frozen base in fp16." if dtype_name == "float16" else
                           "fp32 master weights (AMP cannot unscale fp16 gradients)."))
    cfg["dtype"] = dtype_name
    cfg["attn_implementation"], why["attn_implementation"] = _attention(t)
    return dtype_name, mixed


def _method_keys(cfg: dict, why: dict, warns: list[str], notes: list[str], model: str, lay: _Layout,
                 spectrum_config: Optional[str], dtype_name: str) -> Optional[str]:
    """LoRA/QLoRA or Spectrum keys; returns the Spectrum YAML written into the recipe, if any."""
    d = DEFAULTS[lay.method]
    if d.lora:
        cfg["use_peft"] = True
        if d.quantization:
            cfg.update(d.quantization.keys())
            why.update(d.quantization.why())
            if lay.sharding in ("fsdp", "zero3"):
                cfg["bnb_4bit_quant_storage"] = dtype_name
                why["bnb_4bit_quant_storage"] = (f"{lay.sharding.upper()} can shard the 4-bit weights only when "
                                                 "they are stored in the same float dtype as the rest.")
        cfg.update(d.lora.keys())
        why.update(d.lora.why())
        return None
    if lay.method == "spectrum":
        spectrum_rel = _spectrum_file(model, spectrum_config, notes, lay.plan)
        cfg[SPECTRUM_KEY] = spectrum_rel
        why[SPECTRUM_KEY] = "Spectrum: train only the layers spectrum_scan selected (highest SNR per type)."
        return spectrum_rel
    if spectrum_config:
        warns.append("spectrum_config is ignored: the method is not spectrum.")
    return None


def _chat_template_keys(cfg: dict, why: dict, warns: list[str], notes: list[str], chat_template: Optional[str],
                        method: str, tied: bool) -> None:
    """chat_template_path, the EOS it ends turns with, and what LoRA must train fully with it."""
    ws = get_workspace()
    if chat_template and chat_templates.is_ref(chat_template):
        chat_template = chat_templates.materialize(chat_template, field="chat_template")
    if not chat_template:
        return
    ct_path = _is_local_ref(chat_template, ws.root)
    if ct_path is not None:
        ct_path = ws.resolve(chat_template, field="chat_template", must_exist=True)
        cfg["chat_template_path"] = ws.rel(ct_path)
        text, _ = template_text(str(ct_path), ws.root)
    elif "/" in chat_template and not _looks_like_path(chat_template):
        cfg["chat_template_path"] = chat_template
        text = None
        notes.append(f"chat_template '{chat_template}' is a hub tokenizer: TRL clones its template at "
                     "training time (network needed).")
    else:
        raise UserError(f"'{chat_template}' does not exist in the workspace.", field="chat_template",
                        fix="Give a .jinja file or a tokenizer directory in the workspace.")
    eot = template_end_of_turn(text) if text else None
    if eot:
        cfg["eos_token"] = eot
        why["eos_token"] = f"the template ends each turn with {eot}: it must be the EOS the model learns."
    if method in ("lora", "qlora"):
        cfg["lora_modules_to_save"] = ["lm_head", "embed_tokens"]
        why["lora_modules_to_save"] = ("a base model with a new chat template: its special tokens' "
                                       "embeddings and output rows are untrained, so both are trained "
                                       "fully (never LoRA on lm_head: TRL rejects it).")
        if tied:
            warns.append("the model ties embed_tokens and lm_head: PEFT trains two separate copies, and a "
                         "merged model with tie_word_embeddings=true reloads lm_head from embed_tokens. "
                         "Prefer the model's own Instruct variant, or Spectrum/full.")


def _schedule_keys(cfg: dict, why: dict, lay: _Layout, epochs: Optional[float]) -> None:
    """Epochs, micro-batch and accumulation from the schedule, with the optimizer steps they give."""
    s = lay.schedule
    cfg["num_train_epochs"] = s.epochs
    changed = "".join(f" Changed: {a}" for a in s.adjustments if a.startswith("epochs"))
    why["num_train_epochs"] = f"{s.epochs:g}: " + ("asked for." if epochs else (
        f"default for {s.rows if s.rows else 'an unknown number of'} rows (3 under 1k, 2 under 10k, else 1; "
        "full at most 2)." + changed))
    cfg["per_device_train_batch_size"] = lay.micro_batch
    cfg["gradient_accumulation_steps"] = s.gradient_accumulation_steps
    steps = (f"; {s.optimizer_steps} optimizer steps ({s.sequences_per_epoch} sequences per epoch x {s.epochs:g} "
             "epochs)" if s.optimizer_steps else "")
    why["gradient_accumulation_steps"] = (
        f"{lay.micro_batch} x {s.gradient_accumulation_steps} x {lay.world} process(es) = {s.global_batch} "
        f"sequences per optimizer step{steps}." + "".join(f" Changed: {a}" for a in s.adjustments
                                                         if not a.startswith("epochs")))


def _training_keys(cfg: dict, why: dict, notes: list[str], t: Target, lay: _Layout, epochs: Optional[float],
                   use_test: bool) -> None:
    """Schedule, memory, optimizer, precision flags, evaluation, logging and checkpoint keys."""
    _schedule_keys(cfg, why, lay, epochs)
    gc, chosen = lay.checkpointing, lay.method
    cfg["activation_checkpointing"] = bool(gc)
    why["activation_checkpointing"] = ("recompute each layer in backward to fit memory." if gc else
                                       "off: memory fits without it, and it costs ~20% speed.")
    _runtime_defaults(cfg, why, t, chosen, lay.world, lay.sharding)
    if gc and chosen in ("lora", "qlora") and lay.sharding == "zero3":
        cfg["activation_checkpointing_kwargs"] = {"use_reentrant": True}
        why["activation_checkpointing_kwargs"] = "PEFT + DeepSpeed ZeRO-3 needs reentrant checkpointing."
    d = DEFAULTS[chosen]
    cfg.update(d.optimizer_keys())
    why.update(d.optimizer_why())
    cfg["optim"] = lay.optim
    why["optim"] = f"{lay.optim}" + (" (fused AdamW kernel on GPU)." if lay.optim == "adamw_torch_fused" else ".")
    if t.kind == "cpu":
        cfg["use_cpu"], cfg["bf16"] = True, False
    else:
        cfg["bf16"] = bool(t.bf16)
        if not t.bf16:
            cfg["fp16"] = True
    if t.kind == "gpu" and t.cuda_here and has_module("liger_kernel"):
        cfg["use_liger_kernel"] = True
        why["use_liger_kernel"] = "liger-kernel installed and a CUDA GPU present: fused RMSNorm/RoPE/SwiGLU."
    elif t.kind == "gpu":
        notes.append("use_liger_kernel is off: liger-kernel needs a local CUDA GPU and the package; set it true "
                     "on the training machine if it has both.")
    cfg["seed"] = 42
    if use_test:
        cfg["eval_strategy"] = "steps"
        cfg["eval_steps"] = 0.2
        cfg["per_device_eval_batch_size"] = lay.micro_batch
        why["eval_strategy"] = "evaluate on the test split 5 times (eval_steps 0.2 of the steps)."
    steps = lay.schedule.optimizer_steps
    cfg["logging_steps"] = max(1, min(10, steps // 20)) if steps else 10
    cfg["report_to"] = "none"
    why["report_to"] = "none: tools.train writes metrics.jsonl itself; no tracker account or network needed."
    cfg["save_strategy"] = "steps"
    cfg["save_steps"] = 0.25
    cfg["save_total_limit"] = 2
    why["save_steps"] = "a checkpoint every quarter of the run (resume after a stop), keep the last 2."


# The tracker's local log folder, set through the recipe's env (the TRL parser exports it).
TRACKER_DIR_ENV = {"tensorboard": "TENSORBOARD_LOGGING_DIR", "trackio": "TRACKIO_DIR"}


def _tracking_keys(cfg: dict, why: dict, report_to: str) -> None:
    """report_to a local tracker, logging inside output_dir (so inside the workspace)."""
    if report_to == "none":
        return
    cfg["report_to"] = report_to
    env = dict(cfg.get("env") or {})
    env[TRACKER_DIR_ENV[report_to]] = f"{cfg['output_dir']}/{report_to}"
    cfg["env"] = env
    why["report_to"] = (f"{report_to}: local and offline, logs in {env[TRACKER_DIR_ENV[report_to]]} "
                        "(training_status names the folder); metrics.jsonl is still written.")


@dataclass
class _Written:
    recipe_path: str
    accelerate_config_path: str
    yaml: str
    launch_commands: dict[str, str]
    memory: Optional[MemoryEstimate]
    fits: Optional[bool]


def _write_recipe(req: _Request, draft: _Draft, output_path: Optional[str], main_process_ip: Optional[str],
                  overridden: bool) -> _Written:
    """Check the recipe with its accelerate config (validate_recipe's analysis), then write both
    (and the Slurm script for several nodes); refuse a recipe that would not train."""
    ws = get_workspace()
    rec_path = ws.resolve(output_path or f"recipes/{draft.name}.yaml", field="output_path")
    acc_path = rec_path.with_name(rec_path.stem + ".accelerate.yaml")
    acc_name, acc_text, accel = _accelerate_file(req, draft, acc_path, main_process_ip)
    a = _analyse(draft.cfg, req.target, ws.root, accel)
    if a.errors:
        raise UserError("the recipe would not train: " + " | ".join(a.errors),
                        field="overrides" if overridden else "generate_recipe",
                        fix="Fix the values named above (see validate_recipe for the full report).")
    r, ac = ws.rel(rec_path), ws.rel(acc_path)
    header = [f"{draft.method} fine-tune of {req.model_ref} on {req.dataset} - written by generate_recipe",
              f"target: {req.target.description}; trl {versions().get('trl')}, "
              f"transformers {versions().get('transformers')}",
              f"train:  python -m tools.train --config {r}",
              f"multi:  accelerate launch --config_file {ac} -m tools.train --config {r}"]
    text = dump_yaml(draft.cfg, header=header)
    ws.write_text(rec_path, text, field="output_path")
    ws.write_text(acc_path, f"# Written by generate_recipe for {r} (from {acc_name}.yaml)\n" + acc_text,
                  field="output_path")
    cmds = _launch_commands(req, draft, rec_path, ac, main_process_ip)
    req.warns += a.warnings
    req.notes += a.notes
    return _Written(r, ac, text, cmds, a.memory, a.fits)


def _accelerate_file(req: _Request, draft: _Draft, acc_path: Path, main_process_ip: Optional[str]
                     ) -> tuple[str, str, AccelerateSummary]:
    """(template name, YAML text, what accelerate reads of it) of the recipe's accelerate config."""
    ws = get_workspace()
    lay = draft.lay
    acc_name, acc_text = _accelerate_text(req.target, draft.method, lay.sharding, lay.offload, draft.mixed)
    if req.nodes > 1:
        acc_text = _multi_node(acc_text, req.nodes, main_process_ip, req.warns)
    import tempfile
    with tempfile.TemporaryDirectory(dir=ws.owned_dir(TMP_DIR)) as td:
        tp = Path(td) / "accelerate.yaml"
        tp.write_text(acc_text, encoding="utf-8")
        accel = read_accelerate_config(tp, ws.rel(acc_path))
    # the node-0 placeholder is said in the warnings; validate_recipe refuses it until replaced
    accel.problems = [p for p in accel.problems if "placeholder" not in p]
    return acc_name, acc_text, accel


def _launch_commands(req: _Request, draft: _Draft, rec_path: Path, ac: str,
                     main_process_ip: Optional[str]) -> dict[str, str]:
    """How to run the written recipe: tools.train, accelerate, trl sft and, for nodes, Slurm."""
    r = get_workspace().rel(rec_path)
    cmds = {"train": f"python -m tools.train --config {r}",
            "accelerate": f"accelerate launch --config_file {ac} -m tools.train --config {r}"}
    if req.nodes > 1:
        cmds.update(_multi_node_commands(rec_path, draft.name, req.nodes, req.per_node or 1, ac, r,
                                         main_process_ip))
    if draft.method != "spectrum":
        cmds["trl"] = f"trl sft --config {r} --accelerate_config {ac}"
    else:
        req.notes.append("Spectrum needs tools.train (trl sft does not read spectrum_config_path).")
    if draft.method == "full" and draft.lay.sharding == "none" and draft.cfg.get("dtype") != "float32":
        req.notes.append("Launch with tools.train (launch_training does): plain `trl sft` steps the bf16 weights "
                         "directly, without fp32 master weights, and most updates at lr 1e-5 are lost.")
    return cmds


def apply_overrides(cfg: dict, overrides: dict, notes: list[str]) -> dict:
    """`cfg` with `overrides` (migrated, checked against TRL's fields; null removes a key)."""
    if not isinstance(overrides, dict):
        raise UserError("must be a mapping of recipe keys to values.", field="overrides",
                        fix="e.g. {'learning_rate': 1e-4}.")
    fields = trl_fields()
    migrated, changes, _ = migrate({k: v for k, v in overrides.items()})
    for c in changes:
        notes.append(f"override {c.key} migrated: {c.reason}")
    bad = [k for k in migrated if k not in fields and k not in NON_FIELD_KEYS]
    if bad:
        hints = "; ".join(f"{k} -> {', '.join(suggest(k)) or '?'}" for k in bad)
        raise UserError(f"unknown recipe keys {', '.join(bad)} (closest: {hints}).", field="overrides",
                        fix="Use TRL field names (ScriptArguments, SFTConfig, ModelConfig).")
    out = dict(cfg)
    for k, v in migrated.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def _spectrum_file(model: str, spectrum_config: Optional[str], notes: list[str],
                   plan: Optional[Recommendation] = None) -> str:
    ws = get_workspace()
    if spectrum_config:
        p = ws.resolve(spectrum_config, field="spectrum_config", must_exist=True, kind="file")
        _, problem = spectrum_patterns(p)
        if problem:
            raise UserError(problem, field="spectrum_config", fix="Write it with spectrum_scan.")
        return ws.rel(p)
    from .spectrum import spectrum_scan
    try:
        res = spectrum_scan(model)
    except UserError as exc:  # no local weights: say that only Spectrum needs them, and what does not
        raise UserError("Spectrum reads the model's weights before training (spectrum_scan ranks the layers "
                        f"by signal-to-noise), and {_bare(exc)}", field=exc.field or "model",
                        fix=f"{exc.fix or 'Give a model directory with safetensors.'} Or choose a method "
                            f"that needs no local weights (TRL downloads them when training starts): "
                            f"{_without_weights(plan)}.") from None
    notes.append(f"spectrum_scan ran: {res.output_path} ({res.top_percent:g}% of each module type by SNR).")
    return res.output_path


def _bare(exc: UserError) -> str:
    """A UserError's message without its field prefix and its fix."""
    text = str(exc)
    if exc.field and text.startswith(f"{exc.field}: "):
        text = text[len(exc.field) + 2:]
    if exc.fix and text.endswith(f" Fix: {exc.fix}"):
        text = text[: -len(exc.fix) - 6]
    return text


def _without_weights(plan: Optional[Recommendation]) -> str:
    """The plan's best method other than Spectrum that fits, as a generate_recipe argument."""
    fit = next((c for c in (plan.alternatives if plan else []) if c.fits and c.method != "spectrum"), None)
    if fit is None:
        return "method='lora' or method='qlora' (recommend_method shows which fits)"
    where = f" with {fit.sharding.upper()}" if fit.sharding != "none" else ""
    return f"method='{fit.method}' (fits{where} at {fit.total_gib:.1f} GiB per GPU in this plan)"
