"""Architecture facts of a causal LM: from a local config.json, the hub, or a built-in catalog.

Parameter counts are computed from the architecture (embeddings, tied head, GQA projections with
their biases, gated MLP, norms, experts and router), never copied from a model card.
"""
from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from .errors import UserError
from .hub import hub_unreachable
from .workspace import check_path_text, get_workspace


class ModelFacts(BaseModel):
    """Architecture numbers of a decoder-only transformer, and its computed parameter counts."""
    name: str
    source: Literal["local", "hub", "catalog"]
    architecture: str = Field(description="model_type, e.g. llama, qwen2, mixtral, gemma2.")
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    attention_bias: bool = Field(description="q/k/v projections carry a bias (Qwen2).")
    qk_norm: bool = Field(description="per-head RMSNorm on q and k (Qwen3, Gemma-3).")
    norms_per_layer: int
    num_experts: int = Field(description="1 for dense models.")
    num_experts_per_tok: int
    max_position_embeddings: int
    total_params: int
    embedding_params: int = Field(description="input embedding (plus the output head when untied).")
    linear_params: int = Field(description="parameters inside the decoder layers' linear layers "
                                           "(what 4-bit quantization and LoRA 'all-linear' act on).")
    active_params: int = Field(description="parameters used per token (differs from total for MoE).")
    params_per_layer: int
    notes: list[str] = []


def _n(cfg: dict, *keys, default=None):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def _facts(name: str, source: str, cfg: dict) -> ModelFacts:
    """Build ModelFacts from config.json-style keys (HF names)."""
    if isinstance(cfg.get("text_config"), dict):  # multimodal wrappers (Gemma-3, Llava...)
        cfg = {**cfg["text_config"], "tie_word_embeddings": cfg.get(
            "tie_word_embeddings", cfg["text_config"].get("tie_word_embeddings"))}
    arch = str(cfg.get("model_type") or "unknown")
    try:
        V = int(cfg["vocab_size"]); h = int(cfg["hidden_size"])
        L = int(_n(cfg, "num_hidden_layers", "n_layer"))
        heads = int(_n(cfg, "num_attention_heads", "n_head"))
        I = int(_n(cfg, "intermediate_size", "moe_intermediate_size", default=4 * h))
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"config of '{name}' lacks a usable {exc} entry.", field="model",
                        fix="Give a causal LM whose config.json has vocab_size, hidden_size, "
                            "intermediate_size, num_hidden_layers and num_attention_heads.") from None
    kv = int(_n(cfg, "num_key_value_heads", default=heads))
    hd = int(_n(cfg, "head_dim", default=h // heads))
    tie = bool(cfg.get("tie_word_embeddings", False))
    experts = int(_n(cfg, "num_local_experts", "num_experts", "n_routed_experts", default=1) or 1)
    topk = int(_n(cfg, "num_experts_per_tok", default=1) or 1) if experts > 1 else 1
    bias = bool(cfg.get("attention_bias", arch == "qwen2"))
    qk_norm = arch in ("qwen3", "qwen3_moe", "gemma3", "gemma3_text", "olmo2")
    norms = 4 if arch.startswith("gemma2") or arch.startswith("gemma3") else 2
    maxpos = int(_n(cfg, "max_position_embeddings", "n_positions", default=0) or 0)

    q, kvd = heads * hd, kv * hd
    attn = h * q + 2 * h * kvd + q * h + ((q + 2 * kvd) if bias else 0)
    mlp = 3 * h * I
    mlp_bias = (2 * I + h) if cfg.get("mlp_bias") else 0
    router = h * experts if experts > 1 else 0
    norm_p = norms * h + (2 * hd if qk_norm else 0)
    layer = attn + experts * (mlp + mlp_bias) + router + norm_p
    emb = V * h * (1 if tie else 2)
    total = emb + L * layer + h
    linear = L * (attn + experts * mlp + router - ((q + 2 * kvd) if bias else 0))
    active = total - L * (experts - topk) * (mlp + mlp_bias)
    notes = []
    if experts > 1:
        notes.append(f"MoE: {experts} experts, {topk} active per token; memory holds all experts.")
    return ModelFacts(name=name, source=source, architecture=arch, vocab_size=V, hidden_size=h,
                      intermediate_size=I, num_layers=L, num_attention_heads=heads,
                      num_kv_heads=kv, head_dim=hd, tie_word_embeddings=tie, attention_bias=bias,
                      qk_norm=qk_norm, norms_per_layer=norms, num_experts=experts,
                      num_experts_per_tok=topk, max_position_embeddings=maxpos, total_params=total,
                      embedding_params=emb, linear_params=linear, active_params=active,
                      params_per_layer=layer, notes=notes)


def _c(arch, V, h, I, L, heads, kv, hd, tie, maxpos, **extra) -> dict:
    return dict(model_type=arch, vocab_size=V, hidden_size=h, intermediate_size=I,
                num_hidden_layers=L, num_attention_heads=heads, num_key_value_heads=kv,
                head_dim=hd, tie_word_embeddings=tie, max_position_embeddings=maxpos, **extra)


# Numbers from each model's config.json on the hub (base models; instruct variants share them).
CATALOG: dict[str, tuple[str, dict]] = {
    "Llama-3.1-8B": ("meta-llama/Llama-3.1-8B", _c("llama", 128256, 4096, 14336, 32, 32, 8, 128, False, 131072)),
    "Llama-3.1-70B": ("meta-llama/Llama-3.1-70B", _c("llama", 128256, 8192, 28672, 80, 64, 8, 128, False, 131072)),
    "Llama-3.1-405B": ("meta-llama/Llama-3.1-405B", _c("llama", 128256, 16384, 53248, 126, 128, 8, 128, False, 131072)),
    "Llama-3.2-1B": ("meta-llama/Llama-3.2-1B", _c("llama", 128256, 2048, 8192, 16, 32, 8, 64, True, 131072)),
    "Llama-3.2-3B": ("meta-llama/Llama-3.2-3B", _c("llama", 128256, 3072, 8192, 28, 24, 8, 128, True, 131072)),
    "Qwen2.5-0.5B": ("Qwen/Qwen2.5-0.5B", _c("qwen2", 151936, 896, 4864, 24, 14, 2, 64, True, 32768)),
    "Qwen2.5-1.5B": ("Qwen/Qwen2.5-1.5B", _c("qwen2", 151936, 1536, 8960, 28, 12, 2, 128, True, 131072)),
    "Qwen2.5-3B": ("Qwen/Qwen2.5-3B", _c("qwen2", 151936, 2048, 11008, 36, 16, 2, 128, True, 32768)),
    "Qwen2.5-7B": ("Qwen/Qwen2.5-7B", _c("qwen2", 152064, 3584, 18944, 28, 28, 4, 128, False, 131072)),
    "Qwen2.5-14B": ("Qwen/Qwen2.5-14B", _c("qwen2", 152064, 5120, 13824, 48, 40, 8, 128, False, 131072)),
    "Qwen2.5-32B": ("Qwen/Qwen2.5-32B", _c("qwen2", 152064, 5120, 27648, 64, 40, 8, 128, False, 131072)),
    "Qwen2.5-72B": ("Qwen/Qwen2.5-72B", _c("qwen2", 152064, 8192, 29568, 80, 64, 8, 128, False, 131072)),
    "Qwen3-0.6B": ("Qwen/Qwen3-0.6B", _c("qwen3", 151936, 1024, 3072, 28, 16, 8, 128, True, 40960)),
    "Qwen3-1.7B": ("Qwen/Qwen3-1.7B", _c("qwen3", 151936, 2048, 6144, 28, 16, 8, 128, True, 40960)),
    "Qwen3-4B": ("Qwen/Qwen3-4B", _c("qwen3", 151936, 2560, 9728, 36, 32, 8, 128, True, 40960)),
    "Qwen3-8B": ("Qwen/Qwen3-8B", _c("qwen3", 151936, 4096, 12288, 36, 32, 8, 128, False, 40960)),
    "Qwen3-14B": ("Qwen/Qwen3-14B", _c("qwen3", 151936, 5120, 17408, 40, 40, 8, 128, False, 40960)),
    "Qwen3-32B": ("Qwen/Qwen3-32B", _c("qwen3", 151936, 5120, 25600, 64, 64, 8, 128, False, 40960)),
    "Mistral-7B-v0.1": ("mistralai/Mistral-7B-v0.1", _c("mistral", 32000, 4096, 14336, 32, 32, 8, 128, False, 32768)),
    "Mistral-7B-v0.3": ("mistralai/Mistral-7B-v0.3", _c("mistral", 32768, 4096, 14336, 32, 32, 8, 128, False, 32768)),
    "Mixtral-8x7B-v0.1": ("mistralai/Mixtral-8x7B-v0.1", _c("mixtral", 32000, 4096, 14336, 32, 32, 8, 128, False, 32768,
                                                           num_local_experts=8, num_experts_per_tok=2)),
    "gemma-2-2b": ("google/gemma-2-2b", _c("gemma2", 256000, 2304, 9216, 26, 8, 4, 256, True, 8192)),
    "gemma-2-9b": ("google/gemma-2-9b", _c("gemma2", 256000, 3584, 14336, 42, 16, 8, 256, True, 8192)),
    "gemma-2-27b": ("google/gemma-2-27b", _c("gemma2", 256000, 4608, 36864, 46, 32, 16, 128, True, 8192)),
    "gemma-3-1b-pt": ("google/gemma-3-1b-pt", _c("gemma3_text", 262144, 1152, 6912, 26, 4, 1, 256, True, 32768)),
    "gemma-3-4b-pt": ("google/gemma-3-4b-pt", _c("gemma3_text", 262208, 2560, 10240, 34, 8, 4, 256, True, 131072)),
    "gemma-3-12b-pt": ("google/gemma-3-12b-pt", _c("gemma3_text", 262208, 3840, 15360, 48, 16, 8, 256, True, 131072)),
    "gemma-3-27b-pt": ("google/gemma-3-27b-pt", _c("gemma3_text", 262208, 5376, 21504, 62, 32, 16, 128, True, 131072)),
    "Phi-3-mini-4k-instruct": ("microsoft/Phi-3-mini-4k-instruct", _c("phi3", 32064, 3072, 8192, 32, 32, 32, 96, False, 4096)),
    "Phi-3.5-mini-instruct": ("microsoft/Phi-3.5-mini-instruct", _c("phi3", 32064, 3072, 8192, 32, 32, 32, 96, False, 131072)),
    "phi-4": ("microsoft/phi-4", _c("phi3", 100352, 5120, 17920, 40, 40, 10, 128, False, 16384)),
    "SmolLM2-135M": ("HuggingFaceTB/SmolLM2-135M", _c("llama", 49152, 576, 1536, 30, 9, 3, 64, True, 8192)),
    "SmolLM2-360M": ("HuggingFaceTB/SmolLM2-360M", _c("llama", 49152, 960, 2560, 32, 15, 5, 64, True, 8192)),
    "SmolLM2-1.7B": ("HuggingFaceTB/SmolLM2-1.7B", _c("llama", 49152, 2048, 8192, 24, 32, 32, 64, True, 8192)),
}

_SUFFIX = re.compile(r"-(instruct|it|chat|base|pt|hf)(?=-|$)")


def _key(s: str) -> str:
    s = s.strip().lower().split("/")[-1]
    s = s.replace("meta-llama-", "llama-").replace("_", "-")
    s = _SUFFIX.sub("", s)
    return s.replace("mixtral-8x7b-v0.1", "mixtral-8x7b").replace("-4k", "")


_INDEX = {_key(k): k for k in CATALOG} | {_key(v[0]): k for k, v in CATALOG.items()}
_INDEX |= {"mistral-7b": "Mistral-7B-v0.3", "mixtral-8x7b": "Mixtral-8x7B-v0.1",
           "phi-3-mini": "Phi-3-mini-4k-instruct", "phi-3.5-mini": "Phi-3.5-mini-instruct",
           "llama-3.3-70b": "Llama-3.1-70B"}


def catalog_lookup(model: str) -> str | None:
    """Catalog name for a hub id or alias (case-insensitive), or None."""
    return _INDEX.get(_key(model))


def _read_config(path: Path, model: str) -> dict:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path.name} of '{model}': {exc}.", field="model",
                        fix="Check that config.json is a valid JSON file (re-download the model).") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path} is not a JSON object.", field="model",
                        fix="Check that config.json is a model config.")
    return cfg


def _hub_config(repo_id: str) -> dict | None:
    """config.json from the hub with a short timeout; None when offline or on any error."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or "/" not in repo_id:
        return None
    if hub_unreachable():
        return None
    try:
        from huggingface_hub import hf_hub_download
        p = hf_hub_download(repo_id, "config.json", etag_timeout=3)
        cfg = json.loads(Path(p).read_text(encoding="utf-8"))
        return cfg if isinstance(cfg, dict) else None
    except Exception:  # noqa: BLE001 - gated repo, bad id, timeout: fall back to the catalog
        return None


def _looks_local(model: str) -> bool:
    return model.startswith((".", "/", "~")) or model.count("/") > 1


def get_model_facts(
    model: Annotated[str, Field(description="A local model directory in the workspace (with "
                                            "config.json), a hub id such as 'meta-llama/Llama-3.1-8B', "
                                            "or a catalog name such as 'Qwen2.5-7B' (case-insensitive).")],
) -> ModelFacts:
    """Architecture facts of a model: vocab, hidden size, layers, heads (GQA), experts, context
    length, and parameter counts computed from the architecture (total, embeddings, linear layers,
    active per token). Reads a local config.json first, then the hub (when online), then a built-in
    catalog of popular models. Call it before planning memory or choosing a method."""
    if not model or not model.strip():
        raise UserError("is empty.", field="model", fix="Give a model directory, hub id or catalog name.")
    model = model.strip()
    ws = get_workspace()
    check_path_text(model, "model")  # NUL bytes, over-long names: refused before any filesystem call
    candidate = Path(model)
    local = candidate if candidate.is_absolute() else ws.root / candidate
    if local.exists() or _looks_local(model) and not catalog_lookup(model):
        path = ws.resolve(model, field="model", must_exist=True)
        cfg_path = path / "config.json" if path.is_dir() else path
        if not cfg_path.is_file():
            raise UserError(f"'{model}' has no config.json.", field="model",
                            fix="Point at a model directory saved with save_pretrained.")
        return _facts(path.name, "local", _read_config(cfg_path, model))
    name = catalog_lookup(model)
    hub = _hub_config(model if "/" in model else (CATALOG[name][0] if name else model))
    if hub is not None:
        return _facts(model, "hub", hub)
    if name:
        return _facts(name, "catalog", CATALOG[name][1])
    close = difflib.get_close_matches(_key(model), list(_INDEX), n=5, cutoff=0.5)
    names = sorted({_INDEX[c] for c in close}) or sorted(CATALOG)[:8]
    raise UserError(f"unknown model '{model}' (no local config.json, hub not reachable, not in the "
                    f"catalog).", field="model",
                    fix=f"Use a local model directory or a catalog name, e.g. {', '.join(names)}.")


def catalog_names() -> list[str]:
    return sorted(CATALOG)

