"""generate_dpo_recipe: the one recipe tool of the preference / RL stage (trainer: dpo, kto, orpo,
grpo). Defaults and their reasons come from tools.preference_methods, the memory plan from
tools.preference_memory (on tools.memory.estimate_memory), the rewards check from tools.rewards.
The recipe is parsed by TRL's own parser (tools.train_dpo.parse_dpo_recipe) before it is written.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import Field

from .errors import UserError
from .params import GpuMemoryGib
from .preference_memory import PreferenceMemory
from .preference_methods import METHODS, PreferenceTrainer, defaults_for
from .results import ToolResult
from .workspace import get_workspace

KTO_WEIGHT_BAND = 4 / 3   # Eq. 8 of the KTO paper: w_d*n_d / (w_u*n_u) in [1, 4/3]
GRPO_CPU = {"num_generations": 4, "max_completion_length": 32, "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 1}  # tiny-model CPU runs: a 4-completion group a step


class DpoRecipe(ToolResult):
    """A preference / RL recipe written to the workspace: where it starts, why each default, memory."""
    recipe_path: str
    recipe: dict[str, Any]
    trainer: str
    method: Literal["full", "lora", "qlora"]
    starts_from: Literal["model", "sft_adapter"]
    reference: str
    rewards: list[str] = Field(default=[], description="GRPO: the reward functions TRL logs, in order.")
    why: dict[str, str]
    memory: Optional[PreferenceMemory] = None
    notes: list[str]

    def key_figures(self) -> dict[str, Any]:
        out = {"recipe_path": self.recipe_path, "trainer": self.trainer, "method": self.method,
               "learning_rate": self.recipe.get("learning_rate"), "beta": self.recipe.get("beta"),
               "reference": self.reference}
        if self.memory:
            out["memory_total_gib"] = self.memory.total_gib
        if self.rewards:
            out["rewards"] = ", ".join(self.rewards)
        return out


@dataclass
class _Data:
    """What the dataset's first train row says about its kind."""
    kind: str            # pairs | unpaired | prompts
    columns: list[str]
    has_test: bool
    labels: tuple[int, int] = (0, 0)   # unpaired: (desirable, undesirable)


def _data(d_path: Path) -> _Data:
    train = d_path / "train.jsonl"
    if not train.is_file():
        raise UserError(f"{d_path.name} has no train.jsonl.", field="dataset", fix="Run convert_preference first.")
    rows = [json.loads(x) for x in train.read_text(encoding="utf-8").splitlines() if x.strip()]
    if not rows:
        raise UserError("train.jsonl has no rows.", field="dataset", fix="Run convert_preference first.")
    cols = sorted(rows[0])
    kind = ("pairs" if {"chosen", "rejected"} <= set(cols) else "unpaired" if {"completion", "label"} <= set(cols)
            else "prompts" if "prompt" in cols else "unknown")
    labels = (sum(1 for r in rows if r.get("label") is True), sum(1 for r in rows if r.get("label") is False))
    return _Data(kind, cols, (d_path / "test.jsonl").is_file(), labels)


def _check_fit(trainer: str, data: _Data) -> None:
    """The method reads the data kind the dataset holds (KTO also reads pairs: TRL unpairs them)."""
    need = METHODS[trainer].data
    if data.kind == need or (trainer == "kto" and data.kind == "pairs"):
        return
    what = {"pairs": "prompt/chosen/rejected pairs", "unpaired": "prompt/completion/label rows",
            "prompts": "prompts with a reference answer"}
    if data.kind == "unknown":  # e.g. GRPO data without a prompt: nothing to generate from
        raise UserError(f"train.jsonl row 1 has no `prompt` (nor chosen/rejected or completion/label) column: "
                        f"columns {data.columns[:8]}; trainer {trainer} reads {what[need]}.", field="dataset",
                        fix="Convert the source with convert_preference (it finds the prompt column, or give "
                            "column_mapping={'prompt': '<your column>'}).")
    raise UserError(f"trainer {trainer} reads {what[need]}; the dataset has {what.get(data.kind, data.kind)} "
                    f"(columns {data.columns[:8]}).", field="trainer",
                    fix="Pick the trainer for this data (pairs: dpo/orpo/kto, label rows: kto, prompts: grpo) "
                        "or convert the data with convert_preference.")


def _kto_weights(cfg: dict, why: dict, data: _Data) -> None:
    """Unbalanced labels: weight the minority side to the lower end of the paper's band."""
    n_d, n_u = data.labels
    if not n_d or not n_u or n_d == n_u:
        return
    if n_d < n_u:
        cfg["desirable_weight"] = round(n_u / n_d, 2)
    else:
        cfg["undesirable_weight"] = round(n_d / n_u, 2)
    why["desirable_weight"] = (f"{n_d} desirable vs {n_u} undesirable rows: the minority side is weighted so "
                               f"w_d*n_d / (w_u*n_u) is in [1, {KTO_WEIGHT_BAND:.2f}] (KTO paper, Eq. 8).")


def _rewards(specs: Optional[list[str]], data: _Data) -> tuple[list[dict], list[str]]:
    """GRPO reward specs checked here: built-ins built, a user's file checked by ast (not run)."""
    from .rewards import ANSWER_COLUMN, check_user_reward, parse_spec
    parsed = [parse_spec(s) for s in (specs or ["answer"])]
    names = []
    for s in parsed:
        if "file" in s:
            u = check_user_reward(s["file"], s["function"])
            s["file"] = u.file
            missing = [k for k in u.keywords if k not in data.columns]
            if missing:
                raise UserError(f"{u.file}:{u.function} requires {missing}, which the dataset has no column for "
                                f"(columns {data.columns[:8]}).", field="rewards",
                                fix="Give those parameters defaults, read them from **kwargs, or add the columns.")
            names.append(u.function)
        else:
            if s["name"] == "answer" and ANSWER_COLUMN not in data.columns:
                raise UserError(f"the answer reward compares with the '{ANSWER_COLUMN}' column; the dataset has "
                                f"{data.columns[:8]}.", field="rewards",
                                fix="convert_preference writes it for prompt + answer data, or use another reward.")
            names.append(s["name"])
    return parsed, names


def _recipe(trainer: str, method: str, paths: dict, adapter: bool, data: _Data, cpu: bool,
            max_length: int, chat_template: Optional[str]) -> tuple[dict, dict, list[str]]:
    cfg, why = defaults_for(trainer, method)
    cfg = {"trainer": trainer, **paths, **cfg}
    from .preference_methods import COMMON
    cfg.update({k: v for k, v in COMMON.items() if k not in cfg})
    if trainer != "grpo":
        cfg["max_length"] = max_length
    notes = []
    if adapter:  # the adapter's LoRA settings apply; lora_* would be ignored
        for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"):
            cfg.pop(k, None)
        notes.append("Starts from the SFT adapter: it is trained further; the output is an adapter for the "
                     "same base model.")
    if data.has_test and trainer != "grpo":
        cfg.update(eval_strategy="steps", eval_steps=0.25, per_device_eval_batch_size=cfg["per_device_train_batch_size"])
    elif trainer != "grpo":
        notes.append("No test split: no held-out metrics (convert_preference test_size=0.05 makes one).")
    if trainer == "kto":
        _kto_weights(cfg, why, data)
    if chat_template:
        cfg["chat_template_path"] = chat_template
    if cpu:
        cfg.update(use_cpu=True, bf16=False, gradient_checkpointing=False)
        if trainer == "grpo":
            cfg.update(GRPO_CPU)
    if trainer == "orpo":
        notes.append("ORPO is in trl.experimental (its API may change); it adds the SFT loss, so it can start "
                     "from a base model, and has no reference model.")
    return cfg, why, notes


def _starts(ws, model: str, method: str, cpu: bool) -> tuple[Path, bool]:
    m_path = ws.resolve(model, field="model")
    adapter = (m_path / "adapter_config.json").is_file()
    if adapter and method == "full":
        raise UserError("is an SFT adapter; a full run needs a whole model.", field="method",
                        fix="Merge it first (merge_adapter) and pass the merged directory, or use method lora.")
    if adapter:
        from .preference_start import check_sft_adapter
        check_sft_adapter(m_path)
    if cpu and method == "qlora":
        raise UserError("qlora needs a CUDA GPU (bitsandbytes 4-bit).", field="method", fix="Use lora on CPU.")
    return m_path, adapter


def generate_dpo_recipe(
    model: Annotated[str, Field(description="SFT model, SFT adapter dir or base model.")],
    dataset: str,
    output_path: str,
    output_dir: str,
    trainer: PreferenceTrainer = "dpo",
    method: Literal["lora", "qlora", "full"] = "lora",
    chat_template: Optional[str] = None,
    max_length: Annotated[int, Field(ge=16)] = 1024,
    rewards: Annotated[Optional[list[str]], Field(
        description="GRPO: answer, format=<regex>, length=<n>, file.py:fn")] = None,
    cpu: bool = False,
    overrides: Annotated[Optional[dict[str, Any]], Field(description="config keys to set (null removes)")] = None,
    gpu_memory_gib: GpuMemoryGib = None,
    overwrite: bool = False,
) -> DpoRecipe:
    """Write a DPO, KTO, ORPO or GRPO recipe for launch_training: TRL-parsed, literature defaults with
    reasons, a memory plan.

    Run it with launch_training (`python -m tools.train_dpo --config <recipe>`) after
    verify_preference(recipe=...). Defaults per method (tools.preference_methods, reasons in `why`):
    DPO beta 0.1, lr 5e-6 LoRA / 5e-7 full; KTO beta 0.1, the minority label weighted (paper Eq. 8);
    ORPO beta (lambda) 0.1, lr 8e-5 LoRA / 8e-6 full, no reference; GRPO beta 0 (no reference),
    num_generations 8, max_completion_length 512, lr 1e-5 LoRA / 1e-6 full.

    Parameters:
    - model: where training starts: an SFT model (merged), an SFT adapter directory (trained
      further; DPO/KTO keep a frozen copy of it as the reference), or a base/Instruct model.
    - dataset: convert_preference's output directory (its train.jsonl decides what fits:
      pairs for dpo/orpo/kto, label rows for kto, prompts with a `solution` for grpo).
    - trainer / method: lora (reference = the adapter disabled), qlora (4-bit base, GPU), full
      (DPO/KTO load a frozen copy as the reference).
    - chat_template: the .jinja the SFT run used (the recipe's chat_template_path).
    - max_length: prompt + reply tokens (DPO/KTO/ORPO). GRPO uses max_completion_length.
    - rewards (GRPO): 'answer' (final answer vs `solution`: math-verify when installed, else a
      numeric / exact-match comparison), 'format=<regex>' (1 when re.match), 'length=<n>' (penalty
      beyond n tokens), 'path/file.py:function' (a workspace file, checked with ast, never run
      here; it must accept completions and **kwargs). Default ['answer'].
    - cpu: use_cpu, no bf16, no checkpointing (tiny models; GRPO also 4 generations of 32 tokens).
    - overrides: method config / ModelConfig keys, e.g. {'beta': 0.05}; null removes a key.
    - gpu_memory_gib: the GPU the plan is checked against (memory.fits).
    """
    ws = get_workspace()
    target = ws.resolve(output_path, field="output_path")
    if target.exists() and not overwrite:
        raise UserError(f"'{output_path}' exists.", field="output_path", fix="Choose another path or overwrite=true.")
    d_path = ws.resolve(dataset, field="dataset", must_exist=True, kind="dir")
    m_path, adapter = _starts(ws, model, method, cpu)
    data = _data(d_path)
    _check_fit(trainer, data)
    specs, names = _rewards(rewards, data) if trainer == "grpo" else ([], [])
    if rewards and trainer != "grpo":
        raise UserError(f"rewards apply to GRPO only (trainer is {trainer}).", field="rewards", fix="Omit rewards.")
    paths = {"model_name_or_path": ws.rel(m_path) if m_path.exists() else model, "dataset_name": ws.rel(d_path),
             "output_dir": ws.rel(ws.resolve(output_dir, field="output_dir"))}
    cfg, why, notes = _recipe(trainer, method, paths, adapter, data, cpu, max_length, chat_template)
    if specs:
        cfg["rewards"] = specs
    _apply(cfg, overrides)
    text = _checked_yaml(cfg)
    ws.write_text(output_path, text, field="output_path")
    return _result(ws.rel(target), cfg, trainer, method, adapter, names, why, notes, gpu_memory_gib)


def _apply(cfg: dict, overrides: Optional[dict[str, Any]]) -> None:
    for k, v in (overrides or {}).items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v


def _result(rel: str, cfg: dict, trainer: str, method: str, adapter: bool, names: list[str], why: dict,
            notes: list[str], gpu_memory_gib: Optional[float]) -> DpoRecipe:
    from .preference_memory import plan_or_note
    from .train_dpo import _reference

    class _Args:  # what _reference reads of a parsed config
        beta = cfg.get("beta")
        precompute_ref_log_probs = cfg.get("precompute_ref_log_probs", False)
    ref = _reference(trainer, _Args, bool(cfg.get("use_peft")), adapter)
    memory, note = plan_or_note(trainer, cfg["model_name_or_path"], cfg, method=method, sft_adapter=adapter,
                                gpu_memory_gib=gpu_memory_gib)
    if note:
        notes.append(note)
    mem = f"; memory {memory.total_gib:.1f} GiB per GPU" if memory else ""
    summary = (f"Wrote a {trainer.upper()} {method} recipe to {rel}: lr {cfg.get('learning_rate'):g}, beta "
               f"{cfg.get('beta')}{mem}; reference: {ref.split(':')[0].split(' (')[0]}.")
    steps = [f"verify_preference(recipe='{rel}')", f"launch_training(recipe='{rel}')",
             "training_status(run_id=<the run>): " + ("reward and rewards/<fn>/mean should rise" if trainer == "grpo"
                                                       else "rewards/margins should grow")]
    return DpoRecipe(summary=summary[:300], next_steps=steps, recipe_path=rel, recipe=cfg, trainer=trainer,
                     method=method, starts_from="sft_adapter" if adapter else "model", reference=ref, rewards=names,
                     why=why, memory=memory, notes=notes)


def _checked_yaml(cfg: dict) -> str:
    """The recipe as YAML, parsed first by TRL's parser (unknown keys and bad values refused)."""
    import contextlib
    import io

    import torch
    import yaml

    from .recipe_schema import env_guard
    from .train_dpo import parse_dpo_recipe
    from .workspace import TMP_DIR
    err = io.StringIO()
    text = yaml.safe_dump(cfg, sort_keys=False)
    parse_cfg = dict(cfg)
    if not torch.cuda.is_available() and not cfg.get("use_cpu"):
        # TrainingArguments checks bf16 against this machine; the recipe is for the GPU it will run on.
        parse_cfg.update(bf16=False, tf32=None)
    fd, tmp = tempfile.mkstemp(prefix="pref-recipe-", suffix=".yaml", dir=get_workspace().owned_dir(TMP_DIR))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            yaml.safe_dump(parse_cfg, fh, sort_keys=False)
        with env_guard(), contextlib.redirect_stderr(err), contextlib.redirect_stdout(err):
            parse_dpo_recipe(tmp)  # in the server: env_guard takes back what the parse exports
    except (ValueError, TypeError, SystemExit) as exc:  # argparse prints usage and exits on a bad value
        said = [x for x in err.getvalue().splitlines() if x.strip()]
        why = said[-1].split("error: ", 1)[-1] if isinstance(exc, SystemExit) and said else str(exc)
        raise UserError(f"TRL refuses the recipe: {why[:600]}", field="overrides",
                        fix=f"Use {METHODS[cfg['trainer']].config} / ModelConfig / ScriptArguments keys (e.g. beta, "
                            "learning_rate, max_length, lora_r).") from exc
    finally:
        os.unlink(tmp)
    return text
