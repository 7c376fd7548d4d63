"""Architecture facts of a causal LM: from a local config.json, the hub, or a built-in catalog.

Parameter counts are computed from the architecture (embeddings, tied head, GQA projections with
their biases, gated MLP, norms, experts and router), never copied from a model card.
"""
from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Annotated, Literal, NamedTuple, Optional

from pydantic import BaseModel, Field

from .errors import UserError
from .hub import hub_unreachable
from .results import ToolResult
from .workspace import check_path_text, get_workspace


def safetensors_shapes(files) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from safetensors headers (8-byte length + JSON): no tensor is read,
    no framework imported. OSError / ValueError for a file that is not safetensors."""
    out: dict[str, tuple[int, ...]] = {}
    for f in files:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        out.update({k: tuple(v.get("shape") or ()) for k, v in header.items()
                    if k != "__metadata__" and isinstance(v, dict)})
    return out


class ModelFacts(ToolResult):
    """Architecture numbers of a decoder-only transformer, and its computed parameter counts."""
    name: str
    source: Literal["local", "hub", "catalog"]
    hub_id: Optional[str] = Field(None, description="the exact hub repository: as given for a hub id, the "
                                                    "catalog's for a catalog name; null for a local directory.")
    variant: Optional[Literal["base", "instruct"]] = Field(
        None, description="base (pretrained only) or instruct (chat/instruction-tuned), when the catalog "
                          "knows the model; they share architecture numbers but are different models.")
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


# Architecture numbers from each model's config.json on the hub. A base model and its
# instruction-tuned variant share them, but they are different models with different hub ids:
# every variant is its own catalog name and maps to its exact repository; a lookup never falls
# back from one variant to the other.
Variant = Literal["base", "instruct"]


class _Entry(NamedTuple):
    hub_id: str
    config: dict
    family: str        # siblings of other sizes (recommend_method suggests one for small data)
    variant: Variant   # base = pretrained only; instruct = chat/instruction-tuned


CATALOG: dict[str, tuple[str, dict]] = {}   # catalog name -> (exact hub id, config)
_ENTRIES: dict[str, _Entry] = {}


def _add(family: str, cfg: dict, *names: tuple[str, str, Variant]) -> None:
    """Register the variants (catalog name, hub id, variant) of one architecture."""
    for name, hub_id, variant in names:
        _ENTRIES[name] = _Entry(hub_id, cfg, family, variant)
        CATALOG[name] = (hub_id, cfg)


def _base_instruct(family: str, cfg: dict, org: str, name: str, instruct: str) -> None:
    """The common case: `org/name` (base) and `org/<instruct>` (instruction-tuned)."""
    _add(family, cfg, (name, f"{org}/{name}", "base"), (instruct, f"{org}/{instruct}", "instruct"))


_LLAMA_70B = _c("llama", 128256, 8192, 28672, 80, 64, 8, 128, False, 131072)
for _nm, _cfg in (("Llama-3.1-8B", _c("llama", 128256, 4096, 14336, 32, 32, 8, 128, False, 131072)),
                 ("Llama-3.1-70B", _LLAMA_70B),
                 ("Llama-3.1-405B", _c("llama", 128256, 16384, 53248, 126, 128, 8, 128, False, 131072)),
                 ("Llama-3.2-1B", _c("llama", 128256, 2048, 8192, 16, 32, 8, 64, True, 131072)),
                 ("Llama-3.2-3B", _c("llama", 128256, 3072, 8192, 28, 24, 8, 128, True, 131072))):
    _base_instruct("llama-3", _cfg, "meta-llama", _nm, f"{_nm}-Instruct")
_add("llama-3", _LLAMA_70B, ("Llama-3.3-70B-Instruct", "meta-llama/Llama-3.3-70B-Instruct", "instruct"))
for _nm, _cfg in (("Qwen2.5-0.5B", _c("qwen2", 151936, 896, 4864, 24, 14, 2, 64, True, 32768)),
                 ("Qwen2.5-1.5B", _c("qwen2", 151936, 1536, 8960, 28, 12, 2, 128, True, 131072)),
                 ("Qwen2.5-3B", _c("qwen2", 151936, 2048, 11008, 36, 16, 2, 128, True, 32768)),
                 ("Qwen2.5-7B", _c("qwen2", 152064, 3584, 18944, 28, 28, 4, 128, False, 131072)),
                 ("Qwen2.5-14B", _c("qwen2", 152064, 5120, 13824, 48, 40, 8, 128, False, 131072)),
                 ("Qwen2.5-32B", _c("qwen2", 152064, 5120, 27648, 64, 40, 8, 128, False, 131072)),
                 ("Qwen2.5-72B", _c("qwen2", 152064, 8192, 29568, 80, 64, 8, 128, False, 131072))):
    _base_instruct("qwen2.5", _cfg, "Qwen", _nm, f"{_nm}-Instruct")
# Qwen3: the plain name is the post-trained (chat) model; the pretrained one is "-Base" (none for 32B).
for _nm, _cfg in (("Qwen3-0.6B", _c("qwen3", 151936, 1024, 3072, 28, 16, 8, 128, True, 40960)),
                 ("Qwen3-1.7B", _c("qwen3", 151936, 2048, 6144, 28, 16, 8, 128, True, 40960)),
                 ("Qwen3-4B", _c("qwen3", 151936, 2560, 9728, 36, 32, 8, 128, True, 40960)),
                 ("Qwen3-8B", _c("qwen3", 151936, 4096, 12288, 36, 32, 8, 128, False, 40960)),
                 ("Qwen3-14B", _c("qwen3", 151936, 5120, 17408, 40, 40, 8, 128, False, 40960))):
    _add("qwen3", _cfg, (_nm, f"Qwen/{_nm}", "instruct"), (f"{_nm}-Base", f"Qwen/{_nm}-Base", "base"))
_add("qwen3", _c("qwen3", 151936, 5120, 25600, 64, 64, 8, 128, False, 40960),
     ("Qwen3-32B", "Qwen/Qwen3-32B", "instruct"))
# Mistral puts the variant before the version: Mistral-7B-Instruct-v0.3.
_MISTRAL_V01 = _c("mistral", 32000, 4096, 14336, 32, 32, 8, 128, False, 32768)
_add("mistral", _MISTRAL_V01, ("Mistral-7B-v0.1", "mistralai/Mistral-7B-v0.1", "base"),
     ("Mistral-7B-Instruct-v0.1", "mistralai/Mistral-7B-Instruct-v0.1", "instruct"),
     ("Mistral-7B-Instruct-v0.2", "mistralai/Mistral-7B-Instruct-v0.2", "instruct"))
_add("mistral", _c("mistral", 32768, 4096, 14336, 32, 32, 8, 128, False, 32768),
     ("Mistral-7B-v0.3", "mistralai/Mistral-7B-v0.3", "base"),
     ("Mistral-7B-Instruct-v0.3", "mistralai/Mistral-7B-Instruct-v0.3", "instruct"))
_add("mistral", _c("mixtral", 32000, 4096, 14336, 32, 32, 8, 128, False, 32768, num_local_experts=8,
                   num_experts_per_tok=2),
     ("Mixtral-8x7B-v0.1", "mistralai/Mixtral-8x7B-v0.1", "base"),
     ("Mixtral-8x7B-Instruct-v0.1", "mistralai/Mixtral-8x7B-Instruct-v0.1", "instruct"))
for _nm, _cfg in (("gemma-2-2b", _c("gemma2", 256000, 2304, 9216, 26, 8, 4, 256, True, 8192)),
                 ("gemma-2-9b", _c("gemma2", 256000, 3584, 14336, 42, 16, 8, 256, True, 8192)),
                 ("gemma-2-27b", _c("gemma2", 256000, 4608, 36864, 46, 32, 16, 128, True, 8192))):
    _base_instruct("gemma-2", _cfg, "google", _nm, f"{_nm}-it")
# Gemma 3: "-pt" pretrained, "-it" instruction-tuned (the 4b-27b -it repos wrap this text model
# with a vision tower; the numbers here are its text_config).
for _nm, _cfg in (("gemma-3-1b", _c("gemma3_text", 262144, 1152, 6912, 26, 4, 1, 256, True, 32768)),
                 ("gemma-3-4b", _c("gemma3_text", 262208, 2560, 10240, 34, 8, 4, 256, True, 131072)),
                 ("gemma-3-12b", _c("gemma3_text", 262208, 3840, 15360, 48, 16, 8, 256, True, 131072)),
                 ("gemma-3-27b", _c("gemma3_text", 262208, 5376, 21504, 62, 32, 16, 128, True, 131072))):
    _add("gemma-3", _cfg, (f"{_nm}-pt", f"google/{_nm}-pt", "base"), (f"{_nm}-it", f"google/{_nm}-it", "instruct"))
# Phi: only instruction-tuned releases.
_add("phi", _c("phi3", 32064, 3072, 8192, 32, 32, 32, 96, False, 4096),
     ("Phi-3-mini-4k-instruct", "microsoft/Phi-3-mini-4k-instruct", "instruct"))
_add("phi", _c("phi3", 32064, 3072, 8192, 32, 32, 32, 96, False, 131072),
     ("Phi-3.5-mini-instruct", "microsoft/Phi-3.5-mini-instruct", "instruct"))
_add("phi", _c("phi3", 100352, 5120, 17920, 40, 40, 10, 128, False, 16384), ("phi-4", "microsoft/phi-4", "instruct"))
for _nm, _cfg in (("SmolLM2-135M", _c("llama", 49152, 576, 1536, 30, 9, 3, 64, True, 8192)),
                 ("SmolLM2-360M", _c("llama", 49152, 960, 2560, 32, 15, 5, 64, True, 8192)),
                 ("SmolLM2-1.7B", _c("llama", 49152, 2048, 8192, 24, 32, 32, 64, True, 8192))):
    _base_instruct("smollm2", _cfg, "HuggingFaceTB", _nm, f"{_nm}-Instruct")

# Hub repositories renamed by their owner (the old id still redirects): old id -> catalog name.
RENAMED: dict[str, str] = {f"meta-llama/meta-{n.lower()}": n for n in _ENTRIES if n.startswith("Llama-3.1-")}
# Short names that mean one variant (said in ModelFacts.notes): the base where the hub has a bare
# base name, else the one release.
_SHORT: dict[str, str] = {"mistral-7b": "Mistral-7B-v0.3", "mixtral-8x7b": "Mixtral-8x7B-v0.1",
                          "phi-3-mini": "Phi-3-mini-4k-instruct", "phi-3.5-mini": "Phi-3.5-mini-instruct",
                          **{n[:-3].lower(): n for n in _ENTRIES if n.startswith("gemma-3-") and n.endswith("-pt")}}


def _key(s: str) -> str:
    """Lookup key: the repository part, lower case; the variant suffix is kept (it names the model)."""
    return s.strip().lower().split("/")[-1].replace("_", "-")


_INDEX = {_key(k): k for k in _ENTRIES} | {_key(old): n for old, n in RENAMED.items()} | _SHORT


def catalog_lookup(model: str) -> str | None:
    """Catalog name for a hub id or name (case-insensitive, the variant included), or None."""
    return _INDEX.get(_key(model))


def catalog_entry(name: str) -> _Entry:
    """Hub id, config, family and variant of a catalog name."""
    return _ENTRIES[name]


def renamed_hub_id(model: str) -> str | None:
    """The current hub id when `model` is a repository its owner renamed (the old id redirects)."""
    name = RENAMED.get(model.strip().lower())
    return _ENTRIES[name].hub_id if name else None


def catalog_facts(name: str) -> ModelFacts:
    """ModelFacts of a catalog name from the catalog's numbers alone (no hub call)."""
    e = _ENTRIES[name]
    return _identify(_facts(name, "catalog", e.config), name, name, e.hub_id)


def smaller_siblings(name: str) -> list[str]:
    """Catalog models of the same family and variant with fewer parameters, largest first."""
    if name not in _ENTRIES:
        return []
    e = _ENTRIES[name]
    size = _facts(name, "catalog", e.config).total_params
    sizes = {n: _facts(n, "catalog", o.config).total_params for n, o in _ENTRIES.items()
             if o.family == e.family and o.variant == e.variant and n != name}
    return sorted((n for n, s in sizes.items() if s < size), key=lambda n: -sizes[n])


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
    model: Annotated[str, Field(description="Workspace dir, hub id or catalog name.")],
) -> ModelFacts:
    """Architecture facts of a model (layers, heads, experts, context) and its parameter counts.
    Call it before planning memory or a method.

    Reads a local config.json first, then the hub (when online), then a built-in catalog of popular
    models. Counts: total, embeddings, linear layers (what 4-bit quantization and LoRA act on),
    active per token (MoE).

    Parameters:
    - model: a model directory in the workspace (with config.json), a hub id such as
      'meta-llama/Llama-3.1-8B', or a catalog name such as 'Qwen2.5-7B' (case-insensitive)."""
    facts = _model_facts(model)
    return _described(facts, model.strip())


def _described(f: ModelFacts, model: str) -> ModelFacts:
    """The facts with the summary an agent relays and the planning calls that follow."""
    moe = f" ({f.num_experts} experts, {f.num_experts_per_tok} active)" if f.num_experts > 1 else ""
    where = {"local": "config.json", "hub": "the hub", "catalog": "the built-in catalog"}[f.source]
    f.summary = (f"{f.name} ({f.architecture}{', ' + f.variant if f.variant else ''}): "
                 f"{f.total_params / 1e9:.2f}B parameters{moe}, {f.num_layers} layers, hidden {f.hidden_size}, "
                 f"{f.num_attention_heads} heads / {f.num_kv_heads} KV heads, context "
                 f"{f.max_position_embeddings:,}; read from {where}.")
    f.next_steps = [f"recommend_method(model='{model}')",
                    f"estimate_memory(model='{model}', method='qlora', gpu='<your GPU>')"]
    return f


def _model_facts(model: str) -> ModelFacts:
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
    hub_id = model if "/" in model else (CATALOG[name][0] if name else None)
    hub = _hub_config(hub_id) if hub_id else None
    if hub is not None:
        return _identify(_facts(model, "hub", hub), model, name, hub_id)
    if name:
        return _identify(_facts(name, "catalog", CATALOG[name][1]), model, name, hub_id)
    close = difflib.get_close_matches(_key(model), list(_INDEX), n=5, cutoff=0.5)
    names = sorted({_INDEX[c] for c in close}) or sorted(CATALOG)[:8]
    raise UserError(f"unknown model '{model}' (no local config.json, hub not reachable, not in the "
                    f"catalog).", field="model",
                    fix=f"Use a local model directory or a catalog name, e.g. {', '.join(names)}.")


def _identify(f: ModelFacts, model: str, name: str | None, hub_id: str | None) -> ModelFacts:
    """ModelFacts with the exact hub id and variant, and a note whenever the id read differs from
    the one given (never a silent swap)."""
    f.hub_id = hub_id
    if name is None:
        return f
    entry = _ENTRIES[name]
    f.variant = entry.variant
    renamed = renamed_hub_id(model)
    if renamed:
        f.notes.append(f"'{model}' was renamed '{renamed}' by its owner on the hub (the old id redirects).")
    elif _key(model) in _SHORT:
        f.notes.append(f"'{model}' is read as {name} ({entry.hub_id}, the {entry.variant} model); give the "
                       "full name to choose another variant.")
    elif "/" in model and model.lower() != entry.hub_id.lower() and f.source == "catalog":
        f.notes.append(f"architecture numbers from the catalog's {name} ({entry.hub_id}); the hub id "
                       f"'{model}' is kept as given.")
    return f


def catalog_names() -> list[str]:
    return sorted(CATALOG)

