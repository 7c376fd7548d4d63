"""Merge a LoRA/QLoRA adapter into its base model, and prove the merge is right.

The base is always loaded unquantized (bf16/fp16/fp32): merging into a 4-bit base would
re-quantize the merged weights and lose the adapter's precision. The proof is the logits of the
saved, reloaded merged model against base+adapter (the un-merged PeftModel) on sample chats,
and the merged tokenizer rendering the same token ids as the training tokenizer.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from .errors import UserError
from .params import Dtype
from .results import SUMMARY_MAX_CHARS, ToolResult
from .workspace import get_workspace

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = [
    "What is 12 + 7? Answer with the number only.",
    "Write one sentence about the sea.",
    "Explain in two sentences what a LoRA adapter is.",
]
_ASSISTANT_REPLY = "Sure. Here is my answer: 19."

# atol + rtol * max|logit| by dtype. bf16 keeps 8 mantissa bits: a merged bf16 weight is rounded
# once more than the un-merged path, so logits differ by a few 1e-2 (more on deep models).
_TOLERANCE = {"fp32": (1e-4, 1e-5), "fp16": (1e-2, 4e-3), "bf16": (5e-2, 1.6e-2)}
_PAD_CANDIDATES = ["<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|endoftext|>",
                   "<unk>"]
_MERGEABLE = {"LORA", "LOHA", "LOKR", "ADALORA", "IA3", "OFT", "BOFT", "VERA", "FOURIERFT",
              "HRA", "BONE", "RANDLORA", "SHIRA", "ROAD", "C3A", "MISS", "DELORA"}


class LogitsCheck(BaseModel):
    """Merged model (saved, reloaded) vs base+adapter (un-merged PeftModel), same inputs."""
    prompts: int
    tokens: int = Field(description="token positions compared, all prompts together.")
    max_abs_diff: float
    mean_abs_diff: float
    tolerance: float = Field(description="atol + rtol * max|logit| for the dtype.")
    top1_agreement: float = Field(description="fraction of positions with the same argmax token.")
    equivalent: bool
    adapter_effect_max_abs: float = Field(
        description="max |logits(merged) - logits(base without adapter)|: ~0 means the adapter "
                    "changes nothing (untrained or not applied).")


class TokenizerCheck(BaseModel):
    """The merged tokenizer vs the tokenizer used in training, on the same sample chats."""
    training_tokenizer: Literal["adapter_dir", "base_model"]
    chats: int
    identical_ids: bool
    chat_template_identical: bool
    mismatches: list[str] = []


class MergeResult(ToolResult):
    """A merged standalone model and the evidence that it equals base+adapter."""
    output_dir: str
    adapter_dir: str
    base_model: str
    peft_type: str
    lora_r: int | None = None
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    qlora_adapter: bool = Field(description="the adapter was trained on a 4-bit base (QLoRA).")
    dtype: Literal["bf16", "fp16", "fp32"]
    device: str
    logits_check: LogitsCheck
    tokenizer_check: TokenizerCheck
    generation_config: dict[str, Any] = Field(
        description="eos_token_id (ids and tokens) and pad_token_id written to generation_config.json.")
    verified: bool = Field(description="logits equivalent and tokenizer ids identical.")
    files: list[str]
    size_gib: float
    notes: list[str] = []
    elapsed_s: float

    def key_figures(self) -> dict[str, Any]:
        lc = self.logits_check
        def g(x: float) -> float:  # three significant digits are what a reader compares
            return float(f"{x:.3g}")
        return {"verified": self.verified, "output_dir": self.output_dir, "dtype": self.dtype,
                "max_abs_diff": g(lc.max_abs_diff), "tolerance": g(lc.tolerance),
                "top1_agreement": lc.top1_agreement, "adapter_effect_max_abs": g(lc.adapter_effect_max_abs),
                "tokenizer_identical_ids": self.tokenizer_check.identical_ids,
                "size_gib": self.size_gib, "elapsed_s": self.elapsed_s}


# ----------------------------------------------------------------------------- helpers
def _is_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", name)) and ".." not in name


def resolve_model_ref(name: str, *, field: str) -> tuple[str, bool]:
    """A model given by path or hub id -> (what from_pretrained gets, is_local_dir).

    Paths resolve inside the workspace. A name that is no existing directory there is taken as a
    hub id when it looks like one ("org/name") and its config loads (cache or hub)."""
    ws = get_workspace()
    p: Path | None = None
    try:
        p = ws.resolve(name, field=field)
    except UserError:
        if not _is_hub_id(name):
            raise
    if p is not None and p.is_dir():
        if not (p / "config.json").exists():
            hint = (" It holds adapter_config.json: it is an adapter, not a full model."
                    if (p / "adapter_config.json").exists() else "")
            raise UserError(f"'{name}' has no config.json, so it is not a model directory.{hint}",
                            field=field, fix="Give a full model directory (config.json + weights) "
                                             "or a hub id such as Qwen/Qwen2.5-0.5B-Instruct.")
        return str(p), True
    if _is_hub_id(name):
        try:
            from transformers import AutoConfig
            AutoConfig.from_pretrained(name)
        except Exception as exc:  # noqa: BLE001 - offline, unknown repo, gated...
            raise UserError(
                f"base model '{name}' is not a directory in the workspace and could not be loaded "
                f"from the hub or its cache ({type(exc).__name__}: {str(exc)[:200]}).", field=field,
                fix="Download the base model into the workspace (e.g. `hf download ORG/NAME "
                    "--local-dir models/NAME`) and pass its path, or connect to the hub "
                    "(and log in for gated models).") from None
        return name, False
    raise UserError(f"'{name}' does not exist in the workspace ({ws.root}).", field=field,
                    fix="Give the base model's directory (relative to the workspace) or a hub id.")


def _find_training_info(adir: Path) -> dict:
    """summary.json (written by tools.train) or a recipe YAML next to the adapter or above it."""
    info: dict = {}
    for d in (adir, adir.parent, adir.parent.parent):
        s = d / "summary.json"
        if s.is_file():
            try:
                data = json.loads(s.read_text())
                if isinstance(data, dict):
                    info.setdefault("summary", data)
                    info.setdefault("summary_path", str(s))
            except (OSError, ValueError):
                pass
        for name in ("recipe.yaml", "recipe.yml", "config.yaml"):
            r = d / name
            if r.is_file() and "recipe" not in info:
                try:
                    import yaml
                    data = yaml.safe_load(r.read_text())
                except Exception:  # noqa: BLE001 - unreadable or invalid YAML: no info
                    data = None
                if isinstance(data, dict):
                    info["recipe"] = data
                    info["recipe_path"] = str(r)
    return info


def _is_qlora(info: dict) -> bool:
    s = info.get("summary") or {}
    r = info.get("recipe") or {}
    return bool(s.get("load_in_4bit") or s.get("method") == "qlora" or r.get("load_in_4bit"))


def _choose_dtype(dtype: str) -> tuple[str, str]:
    import torch
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if dtype == "auto":
        if cuda:
            dtype = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            dtype = "fp32"
    return dtype, device


def _torch_dtype(dtype: str):
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]


def _sample_chats(prompts: list[str]) -> list[list[dict]]:
    return [[{"role": "user", "content": p}, {"role": "assistant", "content": _ASSISTANT_REPLY}]
            for p in prompts]


def _render_ids(tok, chat: list[dict]) -> list[int]:
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template(chat, tokenize=True, return_dict=False)
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return list(ids)
    text = "\n".join(f"{m['role']}: {m['content']}" for m in chat)
    return list(tok(text, add_special_tokens=True)["input_ids"])


def _special_tokens(tok) -> list[str]:
    toks = set(getattr(tok, "all_special_tokens", []) or [])
    for t in (getattr(tok, "added_tokens_decoder", {}) or {}).values():
        if getattr(t, "special", False):
            toks.add(t.content)
    return sorted(toks, key=len, reverse=True)


def end_of_turn_token(tok) -> str | None:
    """The special token the chat template puts right after an assistant message."""
    if not getattr(tok, "chat_template", None):
        return None
    marker = "MERGECHECKMARKER"
    try:
        text = tok.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
            tokenize=False)
    except Exception:  # noqa: BLE001 - templates that reject this shape
        return None
    i = text.rfind(marker)
    if i < 0:
        return None
    rest = text[i + len(marker):].lstrip(" ")
    for s in _special_tokens(tok):
        if s and rest.startswith(s):
            return s
    return None


def _fix_pad_token(tok, eos_ids: list[int], notes: list[str]) -> int | None:
    """Set the tokenizer's pad to a special token that is no eos, bos or template token (padding
    must never hide an end-of-turn); the pad id, or the old one when none is free."""
    vocab = tok.get_vocab()
    used: set[str] = set()
    if getattr(tok, "chat_template", None):
        try:
            text = tok.apply_chat_template(_sample_chats(["x"])[0], tokenize=False)
            used = {s for s in _special_tokens(tok) if s in text}
        except Exception:  # noqa: BLE001
            pass
    bad = set(eos_ids) | {tok.bos_token_id}
    special = set(_special_tokens(tok))  # a real special token, never an ordinary one
    chosen = next((c for c in _PAD_CANDIDATES + _special_tokens(tok)
                   if c in vocab and c in special and vocab[c] not in bad and c not in used), None)
    if chosen is None:
        notes.append("No special token other than eos is available for padding; pad_token_id "
                     "is left equal to eos (fine for single-sequence generation).")
        return tok.pad_token_id
    was = tok.pad_token
    tok.pad_token = chosen
    notes.append(f"pad token was {was!r} (None or the end-of-turn token); set to {chosen!r} "
                 f"(id {tok.pad_token_id}) in the tokenizer and generation_config so padding never "
                 "hides an end-of-turn.")
    return tok.pad_token_id


def _fix_generation_config(model, tok, notes: list[str]) -> dict[str, Any]:
    """eos = the chat end-of-turn token + the tokenizer eos (+ what the base had); pad != eos."""
    gen = model.generation_config
    eos_ids: list[int] = []

    def add(i):
        if isinstance(i, int) and i >= 0 and i not in eos_ids:
            eos_ids.append(i)

    old = gen.eos_token_id
    for i in (old if isinstance(old, (list, tuple)) else [old]):
        add(i)
    add(tok.eos_token_id)
    eot = end_of_turn_token(tok)
    eot_id = tok.convert_tokens_to_ids(eot) if eot else None
    add(eot_id)
    if eot is None:
        notes.append("No chat end-of-turn token found in the chat template; generation stops on "
                     "the tokenizer eos only.")
    # A working pad stays: only a missing pad, or one equal to the token training taught the model
    # to stop on, must change (Qwen3 lists its pad <|endoftext|> among generation eos ids too).
    trained_stop = eot_id if eot_id is not None else tok.eos_token_id
    pad_id = tok.pad_token_id
    if pad_id is None or pad_id == trained_stop:
        pad_id = _fix_pad_token(tok, eos_ids, notes)
    gen.eos_token_id = eos_ids if len(eos_ids) > 1 else (eos_ids[0] if eos_ids else None)
    gen.pad_token_id = pad_id
    if getattr(model.config, "pad_token_id", None) != pad_id and pad_id is not None:
        try:
            model.config.pad_token_id = pad_id
        except Exception:  # noqa: BLE001
            pass
    return {
        "eos_token_id": eos_ids,
        "eos_tokens": [tok.convert_ids_to_tokens(i) for i in eos_ids],
        "end_of_turn_token": eot,
        "pad_token_id": pad_id,
        "pad_token": tok.convert_ids_to_tokens(pad_id) if pad_id is not None else None,
    }


def _logits(model, ids_list: list[list[int]]):
    import torch
    dev = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for ids in ids_list:
            x = torch.tensor([ids], device=dev)
            out.append(model(input_ids=x).logits[0].float().cpu())
    return out


def _adapter_vocab(adir: Path) -> int | None:
    """Rows of a saved embedding / lm_head (modules_to_save or resized vocab), if any."""
    f = adir / "adapter_model.safetensors"
    if not f.exists():
        return None
    from .models import safetensors_shapes
    try:
        shapes = safetensors_shapes([f])
    except (OSError, ValueError):
        return None
    return next((int(s[0]) for k, s in shapes.items()
                 if k.endswith(("embed_tokens.weight", "lm_head.weight", "wte.weight")) and s), None)


def _ram_needed_gib(base_id: str, dtype_name: str) -> float | None:
    """CPU RAM the merge holds at its peak: one copy of the base in the merge dtype (the base is
    loaded once; the adapter is folded in place, and the reload for the proof happens after it is
    freed) plus ~10% for the adapter, logits and the safetensors writer."""
    try:
        from .models import get_model_facts
        params = get_model_facts(base_id).total_params
    except Exception:  # noqa: BLE001 - unknown size: no advance check
        return None
    if not params:
        return None
    per = {"fp32": 4, "bf16": 2, "fp16": 2}.get(dtype_name, 4)
    return params * per * 1.1 / 2 ** 30


def _check_ram(need: float, device: str, notes: list[str]) -> None:
    notes.append(f"The merge holds about {need:.2f} GiB in {'CPU RAM' if device == 'cpu' else 'GPU/CPU memory'} "
                 "at its peak (one copy of the base in the merge dtype).")
    if device != "cpu":
        return
    try:
        import psutil
        avail = psutil.virtual_memory().available / 2 ** 30
    except ImportError:
        return
    if need > avail:
        raise UserError(f"merging needs about {need:.2f} GiB of RAM and {avail:.2f} GiB is available.",
                        field="dtype", fix="Merge in bf16 (dtype='bf16') to halve it, free memory, or merge on a "
                                           "machine with more RAM (or a GPU).")


def _dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


# ----------------------------------------------------------------------------- the steps
@dataclass
class _Merge:
    """What the steps of one merge share: the checked inputs, then what each step produced."""
    adir: Path
    acfg: dict
    peft_type: str
    base_name: str
    base_field: str               # the field an error about the base names
    base_id: str                  # what from_pretrained gets (a path or a hub id)
    base_local: bool
    out: Path
    qlora: bool = False
    dtype_name: str = "fp32"
    device: str = "cpu"
    need_gib: float | None = None
    chats: list[list[dict]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    t0: float = field(default_factory=time.time)
    dataset: str | None = None    # the training dataset, when the run names one in the workspace
    has_tok: bool = False         # the adapter dir has its (training) tokenizer
    ids_list: list[list[int]] = field(default_factory=list)
    ref: list = field(default_factory=list)          # logits of base+adapter (un-merged)
    base_logits: list = field(default_factory=list)  # logits of the base alone

    @property
    def load_kw(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"dtype": _torch_dtype(self.dtype_name)}
        if self.device == "cuda":
            kw["device_map"] = "auto"
        return kw

    @property
    def base_shown(self) -> str:
        return get_workspace().rel(Path(self.base_id)) if self.base_local else self.base_id


def _read_adapter(adapter_dir: str) -> tuple[Path, dict, str]:
    """(adapter dir, adapter_config.json, PEFT type) after checking it is a mergeable adapter."""
    adir = get_workspace().resolve(adapter_dir, field="adapter_dir", must_exist=True, kind="dir")
    cfg_file = adir / "adapter_config.json"
    if not cfg_file.is_file():
        full = (adir / "config.json").exists()
        ckpts = sorted(p.name for p in adir.glob("checkpoint-*/adapter_config.json"))
        raise UserError(
            f"'{adapter_dir}' has no adapter_config.json."
            + (" It holds config.json: a full model (full fine-tune or Spectrum), which needs no "
               "merge." if full else "")
            + (f" Checkpoints with adapters inside: {', '.join(p.split('/')[0] for p in ckpts)}."
               if ckpts else ""),
            field="adapter_dir",
            fix="Point adapter_dir at the folder holding adapter_config.json and "
                "adapter_model.safetensors (the LoRA/QLoRA run's output_dir or a checkpoint-N folder).")
    try:
        acfg = json.loads(cfg_file.read_text())
    except ValueError as exc:
        raise UserError(f"adapter_config.json is not valid JSON ({exc}).", field="adapter_dir",
                        fix="Re-save the adapter with PeftModel.save_pretrained.") from None
    peft_type = str(acfg.get("peft_type", "LORA")).upper()
    if peft_type not in _MERGEABLE:
        raise UserError(f"a {peft_type} adapter cannot be merged into the base weights.",
                        field="adapter_dir",
                        fix="Serve it with the base model and PEFT (evaluate(adapter=...)), or train "
                            "a LoRA adapter.")
    return adir, acfg, peft_type


def _check_inputs(adapter_dir: str, output_dir: str, base_model: str | None, overwrite: bool) -> _Merge:
    """The adapter, its base and the output dir, checked before anything loads."""
    ws = get_workspace()
    adir, acfg, peft_type = _read_adapter(adapter_dir)
    base_name = base_model or acfg.get("base_model_name_or_path")
    if not base_name:
        raise UserError("adapter_config.json names no base model.", field="base_model",
                        fix="Pass base_model=<the model the adapter was trained on>.")
    base_field = "base_model" if base_model else "base_model (from adapter_config.json)"
    base_id, base_local = resolve_model_ref(str(base_name), field=base_field)
    out = ws.resolve(output_dir, field="output_dir")
    for src, what in ((adir, "the adapter"), (Path(base_id) if base_local else None, "the base model")):
        if src is not None and (out == src or out in src.parents):
            raise UserError(f"output_dir '{output_dir}' is or contains {what} ({ws.rel(src)}); "
                            "writing there would destroy it.", field="output_dir",
                            fix="Choose a new directory, e.g. models/<name>-merged.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"'{output_dir}' exists and is not empty.", field="output_dir",
                        fix="Choose a new output directory, or pass overwrite=true.")
    return _Merge(adir=adir, acfg=acfg, peft_type=peft_type, base_name=str(base_name),
                  base_field=base_field, base_id=base_id, base_local=base_local, out=out)


def _plan(job: _Merge, dtype: str, sample_prompts: list[str] | None) -> None:
    """Precision and device, the QLoRA note, the RAM check and the sample chats of the proof."""
    info = _find_training_info(job.adir)
    job.qlora = _is_qlora(info)
    job.dataset = _training_dataset(info)
    job.dtype_name, job.device = _choose_dtype(dtype)
    if job.qlora:
        job.notes.append(
            f"The adapter was trained with QLoRA (4-bit base). It is merged into a {job.dtype_name} "
            "copy of the base, never into the 4-bit one (that would re-quantize the merged "
            "weights). Small differences from the 4-bit training forward are expected; the check "
            f"below compares against base+adapter in {job.dtype_name}.")
    if job.device == "cpu" and job.dtype_name != "fp32":
        job.notes.append(f"{job.dtype_name} on CPU is slow and less exact; fp32 is the CPU default.")
    job.need_gib = _ram_needed_gib(job.base_id, job.dtype_name)
    if job.need_gib is not None:
        _check_ram(job.need_gib, job.device, job.notes)
    prompts = [p for p in (sample_prompts or DEFAULT_PROMPTS) if p.strip()] or DEFAULT_PROMPTS
    job.chats = _sample_chats(prompts)


def _load(job: _Merge):
    """(training tokenizer, base+adapter as an un-merged PeftModel in eval mode)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    job.has_tok = any((job.adir / f).exists() for f in ("tokenizer_config.json", "tokenizer.json"))
    tok_src = str(job.adir) if job.has_tok else job.base_id
    try:
        tok = AutoTokenizer.from_pretrained(tok_src)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"could not load the tokenizer from {tok_src}: {exc}", field="adapter_dir",
                        fix="Save the tokenizer with the adapter (tokenizer.save_pretrained).") from None
    if not job.has_tok:
        job.notes.append("No tokenizer saved with the adapter: the base model's tokenizer is used. "
                         "If training changed the chat template, pass the training tokenizer.")
    try:
        base = AutoModelForCausalLM.from_pretrained(job.base_id, **job.load_kw)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"could not load base model '{job.base_name}': {type(exc).__name__}: "
                        f"{str(exc)[:300]}", field=job.base_field,
                        fix="Pass base_model=<dir of the exact model the adapter was trained on>.") from None
    vocab = base.get_input_embeddings().weight.shape[0]
    want = _adapter_vocab(job.adir)
    if want is None and len(tok) > vocab:
        want = len(tok)
    if want is not None and want != vocab:
        base.resize_token_embeddings(want)
        job.notes.append(f"Base embeddings resized {vocab} -> {want} to match the adapter/tokenizer.")
    try:
        peft_model = PeftModel.from_pretrained(base, str(job.adir))
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"the adapter does not fit base model '{job.base_name}': "
                        f"{type(exc).__name__}: {str(exc)[:300]}", field="base_model",
                        fix="Pass the exact base the adapter was trained on.") from None
    return tok, peft_model.eval()


def _reference_logits(job: _Merge, tok, peft_model) -> None:
    """Logits of base+adapter (what the merge must equal) and of the base alone, per sample chat."""
    job.ids_list = [_render_ids(tok, c) for c in job.chats]
    job.ref = _logits(peft_model, job.ids_list)
    with peft_model.disable_adapter():
        job.base_logits = _logits(peft_model, job.ids_list)


def _merge_and_write(job: _Merge, tok, peft_model, tmp: Path) -> tuple[dict[str, Any], int]:
    """Fold the adapter in, fix eos/pad, save model and tokenizer: (generation config, params)."""
    merged = peft_model.merge_and_unload(safe_merge=True)
    gen_info = _fix_generation_config(merged, tok, job.notes)
    merged.save_pretrained(str(tmp), max_shard_size="5GB")
    tok.save_pretrained(str(tmp))
    return gen_info, sum(p.numel() for p in merged.parameters())


def _release_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch
        torch.cuda.empty_cache()


def _check_logits(job: _Merge, tmp: Path) -> LogitsCheck:
    """The proof runs on what was written: the merged model reloaded from disk vs base+adapter."""
    from transformers import AutoModelForCausalLM
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), **job.load_kw)
    got = _logits(reloaded, job.ids_list)
    del reloaded
    gc.collect()
    ref = job.ref
    diffs = [(a - b).abs() for a, b in zip(got, ref)]
    max_abs = max(float(d.max()) for d in diffs)
    mean_abs = float(sum(float(d.sum()) for d in diffs) / sum(d.numel() for d in diffs))
    atol, rtol = _TOLERANCE[job.dtype_name]
    tol = atol + rtol * max(float(r.abs().max()) for r in ref)
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(got, ref))
    positions = sum(r.shape[0] for r in ref)
    effect = max(float((a - b).abs().max()) for a, b in zip(got, job.base_logits))
    return LogitsCheck(prompts=len(job.chats), tokens=positions, max_abs_diff=max_abs,
                       mean_abs_diff=mean_abs, tolerance=tol, top1_agreement=agree / positions,
                       equivalent=max_abs <= tol, adapter_effect_max_abs=effect)


def _check_tokenizer(job: _Merge, tok, tmp: Path) -> TokenizerCheck:
    """The tokenizer written with the merge renders the sample chats to the training ids."""
    from transformers import AutoTokenizer
    tok2 = AutoTokenizer.from_pretrained(str(tmp))
    mismatches = []
    for c, ids in zip(job.chats, job.ids_list):
        ids2 = _render_ids(tok2, c)
        if ids2 != ids:
            mismatches.append(f"chat '{c[0]['content'][:40]}': {len(ids)} vs {len(ids2)} tokens")
    return TokenizerCheck(training_tokenizer="adapter_dir" if job.has_tok else "base_model",
                          chats=len(job.chats), identical_ids=not mismatches,
                          chat_template_identical=(getattr(tok, "chat_template", None)
                                                   == getattr(tok2, "chat_template", None)),
                          mismatches=mismatches)


def _verdict_notes(lcheck: LogitsCheck, tcheck: TokenizerCheck) -> list[str]:
    notes = []
    if lcheck.adapter_effect_max_abs <= lcheck.tolerance:
        notes.append("The adapter changes the logits by no more than the tolerance: it looks "
                     "untrained (lora_B still zero) or was not applied. Check the run.")
    if not tcheck.identical_ids:
        notes.append(f"The tokenizer written with the merge renders {len(tcheck.mismatches)} sample "
                     "chat(s) to other token ids than the training tokenizer: the merged model would "
                     "be prompted differently from how it was trained. Do not ship it; copy the "
                     "training tokenizer's files (tokenizer_config.json, chat_template.jinja) into "
                     "the merged folder.")
    if not lcheck.equivalent:
        notes.append(f"Merged logits differ from base+adapter by {lcheck.max_abs_diff:.3g} > "
                     f"tolerance {lcheck.tolerance:.3g}: do not ship this merge; retry with "
                     "dtype='fp32' and check that base_model is the exact model the adapter was "
                     "trained on.")
    return notes


def _write_report(job: _Merge, tmp: Path, lcheck: LogitsCheck, tcheck: TokenizerCheck,
                  gen_info: dict[str, Any], merged_params: int) -> MergeResult:
    """The result, also written as merge_report.json next to the merged model."""
    ws, acfg = get_workspace(), job.acfg
    job.notes.extend(_verdict_notes(lcheck, tcheck))
    files = sorted(p.name for p in tmp.iterdir() if p.is_file())
    size = _dir_size(tmp)
    result = MergeResult(
        output_dir=ws.rel(job.out), adapter_dir=ws.rel(job.adir), base_model=job.base_shown,
        peft_type=job.peft_type, lora_r=acfg.get("r"), target_modules=acfg.get("target_modules"),
        modules_to_save=acfg.get("modules_to_save"), qlora_adapter=job.qlora, dtype=job.dtype_name,
        device=job.device, logits_check=lcheck, tokenizer_check=tcheck,
        generation_config=gen_info, verified=lcheck.equivalent and tcheck.identical_ids,
        files=files + ["merge_report.json"], size_gib=round(size / 2**30, 4), notes=job.notes,
        elapsed_s=0.0)
    result.elapsed_s = round(time.time() - job.t0, 2)
    result.summary, result.next_steps = _summary(result), _next_steps(job, result)
    report = result.model_dump()
    report["parameters"] = merged_params
    (tmp / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return result


def _training_dataset(info: dict) -> str | None:
    """The run's dataset as a workspace path (summary.json or the recipe), if it is one there."""
    name = (info.get("summary") or {}).get("dataset") or (info.get("recipe") or {}).get("dataset_name")
    if not isinstance(name, str) or not name:
        return None
    ws = get_workspace()
    try:
        p = ws.resolve(name, field="dataset")
    except UserError:
        return None
    return ws.rel(p) if p.exists() else None


def _summary(r: MergeResult) -> str:
    """The outcome in one or two sentences: verified or not, with the figures that say why."""
    lc, tc = r.logits_check, r.tokenizer_check
    head = f"Merged {r.adapter_dir} into {r.output_dir} ({r.dtype}, {r.size_gib:g} GiB)"
    if r.verified:
        text = (f"{head}: verified, logits within {lc.max_abs_diff:.2g} of base+adapter (tolerance "
                f"{lc.tolerance:.2g}, top-1 agreement {lc.top1_agreement:.0%}) and the same chat "
                "token ids.")
    else:
        why = []
        if not lc.equivalent:
            why.append(f"logits differ by {lc.max_abs_diff:.3g} > tolerance {lc.tolerance:.3g}")
        if not tc.identical_ids:
            why.append(f"the merged tokenizer renders {len(tc.mismatches)} of {tc.chats} chats "
                       "to other ids")
        text = f"{head} but NOT verified: {'; '.join(why)}. Do not ship it."
    if lc.adapter_effect_max_abs <= lc.tolerance:
        text += " The adapter changes nothing: it looks untrained."
    return text if len(text) <= SUMMARY_MAX_CHARS else text[:SUMMARY_MAX_CHARS - 3] + "..."


def _next_steps(job: _Merge, r: MergeResult) -> list[str]:
    if not r.logits_check.equivalent:
        return [f"merge_adapter(adapter_dir='{r.adapter_dir}', output_dir='{r.output_dir}', "
                f"base_model='<the exact base of the run>', dtype='fp32', overwrite=true)"]
    if not r.tokenizer_check.identical_ids:
        return [f"copy tokenizer_config.json and chat_template.jinja from {r.adapter_dir} into "
                f"{r.output_dir}, then merge_adapter(adapter_dir='{r.adapter_dir}', output_dir="
                f"'{r.output_dir}', overwrite=true) to prove it again"]
    data = f"'{job.dataset}'" if job.dataset else "'<test JSONL or dataset dir>'"
    return [f"generate(model='{r.output_dir}', compare_with='{r.base_model}', "
            + (f"dataset={data})" if job.dataset else "prompts=['<a prompt from your task>'])"),
            f"evaluate(model='{r.output_dir}', compare_with='{r.base_model}', local_task={data})",
            f"export_model(model='{r.output_dir}', output_dir='exports/{job.out.name}')"]


def _merge_into(job: _Merge, tmp: Path) -> MergeResult:
    """Load, merge and write into `tmp`, then prove the written merge."""
    from . import progress
    need = job.need_gib
    progress.report(0, 5, "loading the base model" + (f" ({need:.1f} GiB of RAM)" if need else ""))
    tok, peft_model = _load(job)
    progress.report(1, 5, "adapter applied; reference logits")
    _reference_logits(job, tok, peft_model)
    progress.report(2, 5, "merging and saving")
    gen_info, merged_params = _merge_and_write(job, tok, peft_model, tmp)
    del peft_model  # one copy of the model at a time: freed before the reload
    _release_memory(job.device)
    progress.report(3, 5, "reloading the saved merge for the proof")
    lcheck = _check_logits(job, tmp)
    tcheck = _check_tokenizer(job, tok, tmp)
    return _write_report(job, tmp, lcheck, tcheck, gen_info, merged_params)


# ----------------------------------------------------------------------------- the tool
def merge_adapter(
    adapter_dir: Annotated[str, Field(description="PEFT adapter dir (adapter_config.json).")],
    output_dir: Annotated[str, Field(description="A new or empty dir.")],
    base_model: Annotated[str | None, Field(description="Default: from adapter_config.json.")] = None,
    dtype: Dtype = "auto",
    overwrite: bool = False,
    sample_prompts: Annotated[list[str] | None, Field(max_length=16)] = None,
) -> MergeResult:
    """Merge a LoRA/QLoRA adapter into an unquantized copy of its base and save a standalone
    model, proven equal to base+adapter. Call before serving or export.

    Saves safetensors, the tokenizer with the training chat template, and a generation_config
    with the chat end-of-turn token as eos and a pad token distinct from eos. Use it after a
    LoRA/QLoRA run, also before evaluating without PEFT. Full and Spectrum runs save complete
    models: no merge needed. QLoRA adapters are merged into a
    bf16/fp32 copy of the base, never into a 4-bit one. Returns the proof: max |logit difference|
    between the reloaded merged model and base+adapter on sample chats against a dtype tolerance
    (`equivalent`), identical chat token ids from the merged and training tokenizers, and
    `verified` when both hold. Written to a temporary sibling and renamed: never half-written.
    Loads the model twice; on CPU allow about a minute per billion parameters.

    Parameters:
    - adapter_dir: the folder holding adapter_config.json: a LoRA/QLoRA run's output_dir or a
      checkpoint-N folder.
    - output_dir: directory for the merged model (new or empty; overwrite=true replaces it).
    - base_model: base model dir in the workspace or hub id; default: base_model_name_or_path
      of adapter_config.json.
    - dtype: precision of the unquantized base and the saved model. auto: bf16 on a bf16 GPU,
      fp16 on an older GPU, fp32 on CPU.
    - sample_prompts: user prompts for the logits and tokenizer checks (default: three generic
      ones).
    """
    t0 = time.time()
    job = _check_inputs(adapter_dir, output_dir, base_model, overwrite)
    job.t0 = t0
    _plan(job, dtype, sample_prompts)
    from . import progress
    removed: list[str] = []  # temporary folders of interrupted earlier merges, removed first
    # Nothing may reach stdout (an MCP stdio stream): library prints go to stderr.
    with contextlib.redirect_stdout(sys.stderr), \
            get_workspace().atomic_dir(output_dir, overwrite=overwrite, removed=removed) as tmp:
        job.notes += [f"removed {r}: the temporary folder of an interrupted earlier call" for r in removed]
        result = _merge_into(job, tmp)
    progress.report(5, 5, f"verified={result.verified}")
    return result
