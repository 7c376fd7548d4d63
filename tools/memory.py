"""Per-GPU peak training memory of TRL SFT, from the architecture (formulas: references/memory.md).

The model counts what PyTorch's caching allocator holds (torch.cuda.max_memory_allocated) while
the model loads (before ZeRO/FSDP shard it) and at each phase of a training step, and takes the
largest; what the allocator reserves beyond that (torch.cuda.max_memory_reserved) plus the CUDA
context is the total a GPU must have, and "fits" is decided on it. Activation bytes come from what autograd saves per token
per decoder layer (frozen linears save nothing for their input; LoRA dropout saves a mask and
its output), with TRL 1.16's fused LM head, which never materialises the logits.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, Field

from .errors import UserError
from .models import ModelFacts, get_model_facts
from .params import Gpu, GpuMemoryGib, NumGpus, Packing, SeqLen
from .results import ToolResult
from .throughput import estimate_tokens_per_s

GIB = 2 ** 30
FITS_FRACTION = 0.9  # a plan fits when its total stays within 90% of the GPU's memory
CONTEXT_GIB = 0.5     # CUDA context + cuBLAS/cuDNN handles, outside torch's allocator
LOAD_PHASE = "load (from_pretrained, before sharding)"
# Extra generations of the step's T x T attention-mask blocks that the caching allocator keeps
# reserved (see _slack): fitted on the 3 measured runs of 16k tokens per micro-batch (gaps of
# 3.5-19.6 GiB), where the mask is the largest block; a mechanism hypothesis, not a derivation.
MASK_CHURN = 2
TRL_TOKEN_TILE, TRL_VOCAB_TILE = 4096, 32768  # trl.kernels.chunked_logprob tile shape


class GPUSpec(BaseModel):
    name: str
    memory_gib: float
    bf16: bool
    tflops_bf16: float = Field(description="dense fp16/bf16 tensor-core TFLOPs from the spec sheet.")
    bandwidth_tbs: float = Field(description="memory bandwidth in TB/s from the spec sheet.")


GPUS: dict[str, GPUSpec] = {g.name: g for g in [
    GPUSpec(name="T4", memory_gib=14.58, bf16=False, tflops_bf16=65, bandwidth_tbs=0.32),
    GPUSpec(name="V100 16GB", memory_gib=15.77, bf16=False, tflops_bf16=125, bandwidth_tbs=0.9),
    GPUSpec(name="V100 32GB", memory_gib=31.74, bf16=False, tflops_bf16=125, bandwidth_tbs=0.9),
    GPUSpec(name="RTX 3090", memory_gib=23.69, bf16=True, tflops_bf16=71, bandwidth_tbs=0.936),
    GPUSpec(name="RTX 4090", memory_gib=23.99, bf16=True, tflops_bf16=165, bandwidth_tbs=1.008),
    GPUSpec(name="RTX 5090", memory_gib=31.84, bf16=True, tflops_bf16=209, bandwidth_tbs=1.79),
    GPUSpec(name="RTX A5000", memory_gib=23.68, bf16=True, tflops_bf16=111, bandwidth_tbs=0.768),
    GPUSpec(name="RTX A6000", memory_gib=47.54, bf16=True, tflops_bf16=155, bandwidth_tbs=0.768),
    GPUSpec(name="A10G", memory_gib=22.49, bf16=True, tflops_bf16=70, bandwidth_tbs=0.6),
    GPUSpec(name="L4", memory_gib=22.49, bf16=True, tflops_bf16=121, bandwidth_tbs=0.3),
    GPUSpec(name="L40S", memory_gib=44.99, bf16=True, tflops_bf16=362, bandwidth_tbs=0.864),
    GPUSpec(name="A40", memory_gib=44.99, bf16=True, tflops_bf16=150, bandwidth_tbs=0.696),
    GPUSpec(name="A100 40GB", memory_gib=39.39, bf16=True, tflops_bf16=312, bandwidth_tbs=1.555),
    GPUSpec(name="A100 80GB", memory_gib=79.15, bf16=True, tflops_bf16=312, bandwidth_tbs=2.039),
    GPUSpec(name="H100 80GB", memory_gib=79.19, bf16=True, tflops_bf16=989, bandwidth_tbs=3.35),
    GPUSpec(name="H200 141GB", memory_gib=139.8, bf16=True, tflops_bf16=989, bandwidth_tbs=4.8),
    GPUSpec(name="B200 180GB", memory_gib=178.4, bf16=True, tflops_bf16=2250, bandwidth_tbs=8.0),
]}


def require_gpu(name: str, field: str = "gpu") -> GPUSpec:
    """The catalog GPU for `name`, or a UserError listing the known ones."""
    spec = find_gpu(name)
    if spec is None:
        raise UserError(f"unknown GPU '{name}'.", field=field,
                        fix=f"Use one of {', '.join(GPUS)}, or give gpu_memory_gib.")
    return spec


def _gkey(s: str) -> str:
    s = s.lower().replace("nvidia", "").replace("geforce", "").replace("tesla", "")
    return re.sub(r"[^a-z0-9]", "", s.replace("gib", "gb"))


def find_gpu(name: str) -> GPUSpec | None:
    """Catalog GPU for a name such as 'H100', 'NVIDIA H100 80GB HBM3', 'rtx 4090', 'a100-40gb'."""
    k = _gkey(name)
    if not k:
        return None
    for spec in GPUS.values():  # exact, then "catalog key is a prefix of the given name"
        if _gkey(spec.name) == k:
            return spec
    best = [s for s in GPUS.values() if k.startswith(_gkey(s.name))]
    if best:
        return max(best, key=lambda s: len(s.name))
    bare = [s for s in GPUS.values() if _gkey(s.name).startswith(k) or k.startswith(_gkey(s.name.split()[-1] if s.name.startswith("RTX") else s.name.split()[0]))]
    if bare:  # 'A100' alone -> the larger variant; 'h100 pcie' -> H100
        return max(bare, key=lambda s: s.memory_gib)
    return None


class MemoryEstimate(ToolResult):
    """Estimated per-GPU training memory, with the breakdown at the peak phase."""
    model: str
    method: str
    total_params: int
    trainable_params: int
    breakdown_gib: dict[str, float] = Field(description="live memory by role at the peak phase.")
    peak_phase: str = Field(description="the step phase where memory peaks.")
    phases_gib: dict[str, float] = Field(description="allocated memory at each phase considered.")
    peak_allocated_gib: float = Field(description="what torch.cuda.max_memory_allocated() reports.")
    peak_reserved_gib: float = Field(description="what torch.cuda.max_memory_reserved() reports: peak "
                                                 "allocated + the caching allocator's slack.")
    total_gib: float = Field(description="peak reserved + CUDA context: what the GPU must hold ('fits' "
                                         "is decided on it).")
    gpu: Optional[str] = None
    gpu_memory_gib: Optional[float] = None
    fits: Optional[bool] = Field(None, description=f"total_gib <= {FITS_FRACTION:.0%} of gpu_memory_gib "
                                                   "(FITS_FRACTION); null when no GPU size is known.")
    fits_threshold_gib: Optional[float] = None
    headroom_gib: Optional[float] = None
    throughput_tokens_per_s: Optional[float] = Field(None, description=(
        "estimated real tokens/s, all GPUs (tools/throughput.py); null without a catalog gpu."))
    assumptions: list[str] = []
    notes: list[str] = []


LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ALIASES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj"),
            "w1": ("gate_proj",), "w3": ("up_proj",), "w2": ("down_proj",), "dense": ("o_proj",)}


def _targets(spec: Union[str, list[str], None]) -> set[str]:
    if spec is None or spec == "all-linear" or spec == ["all-linear"]:
        return set(LINEARS)
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    out: set[str] = set()
    for n in names:
        n = n.split(".")[-1]
        if n in LINEARS:
            out.add(n)
        elif n in _ALIASES:
            out.update(_ALIASES[n])
        else:
            raise UserError(f"unknown target module '{n}'.", field="lora_target_modules",
                            fix=f"Use 'all-linear' or names among {', '.join(LINEARS)}.")
    return out


_OPT_BYTES = {  # optimizer state bytes per trainable parameter; None = 2 x the parameter's bytes
    "adamw_torch": None, "adamw_torch_fused": None, "adamw_hf": None, "adamw": None,
    "adamw_8bit": 2.0, "adamw_bnb_8bit": 2.0, "paged_adamw_8bit": 2.0, "paged_adamw_32bit": 8.0,
    "adamw_bnb_32bit": 8.0, "paged_adamw": 8.0, "adafactor": 0.1, "sgd": 0.0, "lion_8bit": 1.0,
    "paged_lion_8bit": 1.0, "lion_32bit": 4.0,
}


def estimate_memory(
    model: Annotated[str, Field(description="Workspace dir, hub id or catalog name.")],
    method: Literal["full", "lora", "qlora", "spectrum"] = "qlora",
    seq_len: SeqLen = 1024,
    micro_batch: Annotated[int, Field(ge=1)] = 1,
    gradient_checkpointing: bool = True,
    packing: Packing = True,
    optimizer: Annotated[str, Field(description="transformers optim name.")] = "adamw_torch_fused",
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16",
    liger: bool = False,
    lora_r: Annotated[int, Field(ge=1)] = 16,
    lora_target_modules: Union[str, list[str]] = "all-linear",
    modules_to_save: Optional[list[str]] = None,
    spectrum_fraction: Annotated[float, Field(gt=0, le=1)] = 0.3,
    num_gpus: NumGpus = 1,
    sharding: Literal["none", "zero2", "zero3", "fsdp"] = "none",
    cpu_offload: bool = False,
    gpu: Gpu = None,
    gpu_memory_gib: GpuMemoryGib = None,
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = "sdpa",
    lora_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.05,
    fp32_master_weights: Optional[bool] = None,
    avg_tokens_per_row: Annotated[Optional[int], Field(ge=1)] = None,
) -> MemoryEstimate:
    """Estimate per-GPU memory of a TRL SFT run (load, each step phase, allocator reserve) and
    whether it fits a GPU; for what-ifs on batch, length, method and layout.

    Counts weights, trainable parameters, gradients, optimizer states, activations, loss buffers,
    the load-time peak (bitsandbytes puts the whole 4-bit model on every GPU before ZeRO/FSDP
    shard it), the caching allocator's reserve and the CUDA context; `fits` is decided on that
    total against FITS_FRACTION of the GPU's memory. Measured accuracy on 15 H100 runs:
    references/memory.md. The defaults are the plan's (recommend_method, generate_recipe):
    packing, fused AdamW, SDPA, LoRA r 16 on all linear layers.

    Parameters:
    - method: full, lora, qlora (4-bit NF4 base) or spectrum (a share of the layers trained).
    - seq_len: max_length, tokens per sequence or packed block; micro_batch:
      per_device_train_batch_size.
    - gradient_checkpointing: recompute each layer in backward; packing: TRL bfd, padding-free.
    - optimizer: a transformers `optim` name (adamw_torch, adamw_torch_fused, adamw_8bit,
      paged_adamw_8bit, adafactor, ...); liger: use_liger_kernel (fused RMSNorm, RoPE, SwiGLU).
    - lora_target_modules: 'all-linear' or module names; modules_to_save: fully trained modules
      next to LoRA (['lm_head', 'embed_tokens']).
    - spectrum_fraction: Spectrum's share of each linear type trained.
    - num_gpus, sharding (none = one GPU or DDP; zero2, zero3, fsdp = FSDP2 full shard),
      cpu_offload (ZeRO/FSDP only).
    - gpu or gpu_memory_gib: the GPU to check `fits` against; omitted: no fit decision.
    - fp32_master_weights: trainable weights kept in fp32 (default: what tools.train does, on for
      full/Spectrum 16-bit runs without ZeRO/FSDP).
    - avg_tokens_per_row: mean tokens per data row (default 512), for throughput_tokens_per_s:
      estimated when `gpu` names a catalog GPU, from the step's FLOPs, attention kernel, padding,
      checkpointing and CPU dispatch (tools/throughput.py; leave-one-out error on the H100 runs:
      docs/benchmarks.md)."""
    f = get_model_facts(model) if isinstance(model, str) else model
    settings = {k: v for k, v in locals().items() if k not in ("model", "f")}
    settings["seq_len"] = seq_len or 1024
    settings["num_gpus"] = num_gpus or 1
    est = _estimate(f, **settings)
    est.summary = _with_throughput(est.summary, est.throughput_tokens_per_s)
    est.next_steps = _next_steps(est, model if isinstance(model, str) else f.name, settings)
    return est


def _next_steps(est: MemoryEstimate, model: str, s: dict) -> list[str]:
    """What to call after an estimate: write the recipe when it fits, search when it does not."""
    where = f"gpu='{s['gpu']}'" if s["gpu"] else (f"gpu_memory_gib={s['gpu_memory_gib']:g}"
                                                 if s["gpu_memory_gib"] else "gpu='<your GPU>'")
    gpus = f", num_gpus={s['num_gpus']}" if s["num_gpus"] > 1 else ""
    if est.fits is None:
        return ["detect_hardware()", f"estimate_memory(model='{model}', method='{s['method']}', {where}{gpus})"]
    if est.fits:
        return [f"generate_recipe(model='{model}', dataset='<converted dataset dir>', method='{s['method']}', "
                f"{where}{gpus})"]
    return [f"recommend_method(model='{model}', {where}{gpus})"]


def _with_throughput(summary: str, tps: Optional[float]) -> str:
    """The summary, with the speed when there is one and it keeps within the 300-character limit."""
    more = f" About {tps:,.0f} tokens/s." if tps else ""
    return summary + more if len(summary + more) <= 300 else summary


def _throughput(e: _Est, p: _Params) -> Optional[float]:
    """Estimated tokens/s on the catalog GPU (None without one): tools.throughput's step model."""
    s = e.s
    if e.spec is None:
        return None
    tps = estimate_tokens_per_s(
        e.f, e.spec, method=s["method"], seq_len=s["seq_len"], micro_batch=s["micro_batch"],
        gradient_checkpointing=s["gradient_checkpointing"], packing=s["packing"],
        attn_implementation=s["attn_implementation"], trainable_params=p.trainable, adapted_linears=len(e.targets),
        avg_tokens_per_row=s.get("avg_tokens_per_row"), spectrum_fraction=s["spectrum_fraction"],
        num_gpus=s["num_gpus"], sharding=s["sharding"], cpu_offload=s["cpu_offload"])
    e.assumptions.append("Throughput: TRL SFT with logging every step, gradient accumulation 1; liger "
                         "changes it by under 5% on the measured runs and is not modelled.")
    return round(tps, 1)


def _check(f: ModelFacts, seq_len, micro_batch, num_gpus, sharding, cpu_offload, lora_r):
    for name, v in (("seq_len", seq_len), ("micro_batch", micro_batch), ("num_gpus", num_gpus),
                    ("lora_r", lora_r)):
        if not isinstance(v, int) or v < 1:
            raise UserError(f"must be a positive integer (got {v!r}).", field=name, fix="Use 1 or more.")
    if f.max_position_embeddings and seq_len > f.max_position_embeddings:
        raise UserError(f"{seq_len} exceeds {f.name}'s max_position_embeddings "
                        f"({f.max_position_embeddings}).", field="seq_len",
                        fix=f"Use seq_len <= {f.max_position_embeddings} (truncate or split long rows).")
    if cpu_offload and sharding == "none":
        raise UserError("CPU offload needs DeepSpeed ZeRO or FSDP.", field="cpu_offload",
                        fix="Set sharding to zero2, zero3 or fsdp, or cpu_offload=false.")


@dataclass
class _Est:
    """One estimate in the making: the settings, the model's sizes as the formulas name them, and
    what each step adds to the result's assumptions and notes."""
    f: ModelFacts
    s: dict                      # the settings (estimate_memory's parameters, by name)
    a: int                       # activation and 16-bit weight bytes (4 for fp32)
    T: int                       # tokens per micro-batch on one GPU
    lora: bool
    targets: set[str]            # LoRA target modules
    g_ad: int                    # adapter bytes: TRL keeps LoRA adapters fp32, bf16 for QLoRA
    frac: float                  # share of linears trained (Spectrum: int(L * fraction) layers per type)
    spec: Optional[GPUSpec]
    vram: Optional[float]        # GiB per GPU, when known
    assumptions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class _Params:
    """Parameter counts by role."""
    emb: int
    lin: int
    other: int                   # norms, biases
    lora: int
    save: int                    # modules_to_save copies
    saved: list[str]             # modules_to_save names (last component)
    head_trainable: bool
    trainable: int


@dataclass
class _State:
    """Persistent bytes per GPU after sharding, and the step's optimizer-side temporaries."""
    weights: float
    extra_w: float               # adapters and modules_to_save copies
    grads: float
    states: float
    ta: int                      # bytes of a trainable weight (and of its grad, Adam states)
    upcast: float = 0.0          # FSDP2: trainable 16-bit parameters upcast to fp32 (the extra bytes)
    gathered: float = 0.0        # ZeRO-3/FSDP: layers gathered for compute
    ddp_buckets: float = 0.0
    foreach_tmp: float = 0.0


@dataclass
class _Acts:
    """Activation and loss bytes per micro-batch."""
    act_all: float               # saved across all layers (checkpoints only, with checkpointing)
    layer_live: float            # one layer being recomputed/backpropagated, with its transients
    trans_T: float               # the transients alone (no checkpointing)
    dequant: float
    ckpt_T: float
    final_T: float
    loss_bwd: float
    head_grad: float
    emb_grad_tmp: float


def _start(f: ModelFacts, s: dict) -> _Est:
    _check(f, s["seq_len"], s["micro_batch"], s["num_gpus"], s["sharding"], s["cpu_offload"], s["lora_r"])
    if s["optimizer"] not in _OPT_BYTES:
        raise UserError(f"unknown optimizer '{s['optimizer']}'.", field="optimizer",
                        fix=f"Use one of {', '.join(sorted(_OPT_BYTES))}.")
    spec = require_gpu(s["gpu"]) if s["gpu"] else None
    a = 4 if s["dtype"] == "fp32" else 2
    T = s["seq_len"] * s["micro_batch"]
    lora = s["method"] in ("lora", "qlora")
    L = f.num_layers
    frac = {"full": 1.0, "spectrum": max(1, int(L * s["spectrum_fraction"])) / L}.get(s["method"], 0.0)
    return _Est(f=f, s=s, a=a, T=T, lora=lora, targets=_targets(s["lora_target_modules"]) if lora else set(),
                g_ad=2 if s["method"] == "qlora" and a == 2 else 4, frac=frac, spec=spec,
                vram=s["gpu_memory_gib"] or (spec.memory_gib if spec else None),
                assumptions=[f"{T} tokens per micro-batch per GPU ({s['micro_batch']} x {s['seq_len']}); "
                             "loss over every token (TRL's fused LM head, logits never materialised)."])


def _linear_shapes(f: ModelFacts) -> dict[str, tuple[int, int]]:
    h, I = f.hidden_size, f.intermediate_size
    q, kvd = f.num_attention_heads * f.head_dim, f.num_kv_heads * f.head_dim
    return {"q_proj": (h, q), "k_proj": (h, kvd), "v_proj": (h, kvd), "o_proj": (q, h),
            "gate_proj": (h, I), "up_proj": (h, I), "down_proj": (I, h)}


def _params(e: _Est) -> _Params:
    f, method = e.f, e.s["method"]
    emb, lin = f.embedding_params, f.linear_params
    shapes = _linear_shapes(f)
    mult = {n: (f.num_experts if n in ("gate_proj", "up_proj", "down_proj") else 1) for n in shapes}
    lora_params = f.num_layers * sum(e.s["lora_r"] * (shapes[n][0] + shapes[n][1]) * mult[n] for n in e.targets)
    save_params = 0
    for m in (e.s["modules_to_save"] or []) if e.lora else []:
        if m.split(".")[-1] in ("lm_head", "embed_tokens", "wte", "embed_out"):
            save_params += f.vocab_size * f.hidden_size
        else:
            raise UserError(f"modules_to_save entry '{m}' is not an embedding or lm_head.",
                            field="modules_to_save", fix="Use ['lm_head'] and/or ['embed_tokens'].")
    saved = [m.split(".")[-1] for m in e.s["modules_to_save"] or []] if e.lora else []
    head_trainable = method in ("full", "spectrum") or any(m in ("lm_head", "embed_out") for m in saved) \
        or (f.tie_word_embeddings and any(m in ("embed_tokens", "wte") for m in saved))
    if method == "full":
        trainable = f.total_params
    elif method == "spectrum":  # Spectrum's YAML also unfreezes embed_tokens and lm_head
        trainable = int(e.frac * lin) + emb
    else:
        trainable = lora_params + save_params
    return _Params(emb=emb, lin=lin, other=f.total_params - lin - emb, lora=lora_params, save=save_params,
                   saved=saved, head_trainable=head_trainable, trainable=trainable)


def _whole_model_state(e: _Est, p: _Params) -> _State:
    """Bytes per role for the whole model, before sharding."""
    f, s, a = e.f, e.s, e.a
    if s["method"] == "qlora":
        # NF4: 0.5 byte/param + double-quantised absmax (1 byte / 64 params + fp32 per 256 blocks)
        weights = p.lin * (0.5 + 1 / 64 + 4 / (64 * 256)) + (p.emb + p.other) * a
        e.assumptions.append("QLoRA: NF4 with double quantization; embeddings, lm_head and norms stay 16-bit.")
    else:
        weights = f.total_params * a
    extra_w = p.lora * e.g_ad + p.save * a
    master = s["fp32_master_weights"]
    if master is None:  # tools.train.fp32_master_weights: full/Spectrum, unsharded
        master = s["method"] in ("full", "spectrum") and a == 2 and s["sharding"] == "none"
    ta = 4 if master else a
    if master:
        weights += p.trainable * (4 - a)
        e.assumptions.append("fp32 master weights: the trainable weights (and their gradients and Adam "
                             "states) are fp32; frozen ones stay 16-bit; matmuls run in bf16 (autocast).")
    upcast = _fsdp_upcast(e, p)
    if upcast:
        ta = 4
    grads = extra_w + upcast if e.lora else p.trainable * ta
    ob = _OPT_BYTES[s["optimizer"]]
    if s["sharding"] in ("zero2", "zero3") and ob is None:
        states = p.trainable * 12.0   # fp32 master weights + fp32 Adam moments (DeepSpeed bf16)
        e.assumptions.append("DeepSpeed keeps fp32 master weights and fp32 Adam states (12 bytes/param).")
    elif ob is None:
        states = 2 * (extra_w + upcast) if e.lora else 2 * p.trainable * ta
    else:
        states = p.trainable * ob
    return _State(weights=weights, extra_w=extra_w, grads=grads, states=states, ta=ta, upcast=upcast)


def _fsdp_upcast(e: _Est, p: _Params) -> float:
    """FSDP2 (accelerate's fsdp2_prepare_model, mixed precision on) casts every trainable 16-bit
    parameter to fp32 before sharding, so its gradient and Adam states are fp32 too; the compute
    copy is gathered in bf16 (MixedPrecisionPolicy). Not with bitsandbytes 4-bit weights present
    (QLoRA): accelerate skips the upcast then. LoRA adapters are fp32 already; modules_to_save
    copies are not."""
    if e.s["sharding"] != "fsdp" or e.s["method"] == "qlora" or e.a != 2:
        return 0.0
    e.assumptions.append("FSDP2: trainable parameters upcast to fp32 before sharding (accelerate, mixed "
                         "precision), with fp32 gradients and Adam states; bf16 compute copies gathered.")
    return (p.save if e.lora else p.trainable) * (4 - e.a)


def _shard(e: _Est, p: _Params, st: _State) -> _State:
    """What stays on one GPU under the layout: ZeRO/FSDP shards, CPU offload, DDP buckets."""
    f, s, a, N = e.f, e.s, e.a, e.s["num_gpus"]
    sharding = s["sharding"]
    if sharding in ("zero3", "fsdp"):
        layer_bytes = (st.weights - (p.emb + p.other) * a) / f.num_layers
        # the layer being computed plus the prefetched next one, and the full head for the loss
        st.gathered = 2 * layer_bytes + f.vocab_size * f.hidden_size * a
        st.weights, st.extra_w, st.upcast = st.weights / N, st.extra_w / N, st.upcast / N
        st.grads, st.states = st.grads / N, st.states / N
        if s["cpu_offload"]:  # ZeRO-3 offload_param/offload_optimizer; FSDP CPUOffload(offload_params)
            st.weights, st.states, st.grads, st.upcast = 0.0, 0.0, 0.0, 0.0
            e.notes.append("CPU offload: optimizer states (and parameters) live in CPU RAM; "
                           "needs roughly the model's full training state in RAM, and is slower.")
    elif sharding == "zero2":
        st.grads, st.states = st.grads / N, st.states / N
        if s["cpu_offload"]:
            st.states, st.grads = 0.0, 0.0
    elif N > 1:
        # DDP keeps gradient buckets next to .grad (gradient_as_bucket_view=False by default)
        e.notes.append("DDP: each GPU holds the whole model; gradient buckets add one gradient copy.")
    st.ddp_buckets = st.grads if (sharding == "none" and N > 1) else 0.0
    # non-fused torch AdamW (foreach) allocates sqrt(v) for all parameters at the step
    st.foreach_tmp = st.states / 2 if s["optimizer"] in ("adamw_torch", "adamw_hf", "adamw") \
        and sharding not in ("zero2", "zero3") else 0.0
    return st


def _attention_bytes(e: _Est) -> tuple[float, int]:
    """(bytes saved per token per layer by attention, the float mask's share of it)."""
    f, s, a = e.f, e.s, e.a
    h, heads = f.hidden_size, f.num_attention_heads
    q, kvd = heads * f.head_dim, f.num_kv_heads * f.head_dim
    impl, packing, mb = s["attn_implementation"], s["packing"], s["micro_batch"]
    repeat = impl != "flash_attention_2" and (packing or mb > 1 or impl == "eager")
    kv_saved = 2 * a * (q if repeat else kvd)
    mask = 0
    if impl != "flash_attention_2" and (packing or mb > 1):
        mask = a * (e.T if packing else s["seq_len"])  # float mask per layer: rows x T_row^2 bytes
    eager = heads * s["seq_len"] * (4 + a) if impl == "eager" else 0
    S = e.frac  # share of linears whose input is saved for the weight gradient
    attn = (S * a * h + a * q + kv_saved + a * q + 4 * heads + S * a * q + mask + eager)
    if e.lora:
        drop = _dropout_bytes(e)
        qkv_in = sum(1 for n in ("q_proj", "k_proj", "v_proj") if n in e.targets)
        attn += (drop * h * qkv_in if drop else (a * h if qkv_in else 0))
        attn += (drop * q if drop else a * q) if "o_proj" in e.targets else 0
    return attn, mask


def _dropout_bytes(e: _Est) -> int:
    return (1 + e.a) if e.s["lora_dropout"] > 0 else 0  # mask + dropout output per input element


def _activations(e: _Est, p: _Params, st: _State) -> _Acts:
    """Bytes autograd saves per token per decoder layer, the backward transients and the loss."""
    f, s, a, T = e.f, e.s, e.a, e.T
    h, I, V = f.hidden_size, f.intermediate_size, f.vocab_size
    liger, method, k_act = s["liger"], s["method"], f.num_experts_per_tok
    norm = a * h if liger else 4 * h + (a * h if method == "full" else 0)
    attn, mask = _attention_bytes(e)
    mlp = e.frac * a * h + 2 * a * I + (0 if liger else a * I) + e.frac * a * I
    if e.lora:
        drop = _dropout_bytes(e)
        gu = sum(1 for n in ("gate_proj", "up_proj") if n in e.targets)
        mlp += (drop * h * gu if drop else (a * h if gu else 0))
        mlp += (drop * I if drop else a * I) if "down_proj" in e.targets else 0
    per_layer = f.norms_per_layer * norm + attn + k_act * mlp + (4 * f.num_experts if f.num_experts > 1 else 0)
    # transient while one layer runs backward: incoming grad, grad of the MLP product, the LoRA
    # dropout path's gradients (in the adapter dtype) and SwiGLU's unfused gradients
    trans = a * h + k_act * (a * I + (2 * e.g_ad * I if "down_proj" in e.targets else 0) + (0 if liger else 2 * a * I))
    ckpt = a * h                                # per token per layer: the layer input
    # final norm input + its output gathered for the head + the shared boolean attention mask
    final = (a if liger else 4) * h + a * h + (mask // a if mask else 0)
    dequant = I * h * a if method == "qlora" else 0  # one 4-bit weight dequantised at a time
    gc = s["gradient_checkpointing"]
    loss_tile = min(T, TRL_TOKEN_TILE) * min(V, TRL_VOCAB_TILE) * a
    full_like = method in ("full", "spectrum")
    return _Acts(
        act_all=f.num_layers * per_layer * T if not gc else f.num_layers * ckpt * T,
        layer_live=(per_layer + trans) * T + dequant, trans_T=trans * T, dequant=dequant, ckpt_T=ckpt * T,
        final_T=final * T,
        loss_bwd=loss_tile + (4 + 2 * a) * h * T + (V * h * (4 + a) if p.head_trainable else 0),
        head_grad=V * h * (st.ta if full_like else a) if p.head_trainable else 0,
        emb_grad_tmp=V * h * (st.ta if full_like else a) if full_like or any(
            m in ("embed_tokens", "wte") for m in p.saved) else 0)


def _phases(e: _Est, st: _State, ac: _Acts) -> dict[str, dict[str, float]]:
    """Live bytes by role at each phase of a step where the peak can be."""
    gc = e.s["gradient_checkpointing"]
    persistent = {"weights": st.weights, "trainable_copies": st.extra_w,
                  "optimizer_states": st.states, "gathered_shards": 0.0}
    if st.upcast:
        persistent["fsdp_fp32_upcast"] = st.upcast
    top_acts = (ac.act_all + ac.layer_live) if gc else (ac.act_all + ac.trans_T + ac.dequant)
    return {
        "loss backward (start of backward)": {
            **persistent, "activations": ac.act_all + ac.final_T, "logits_and_loss": ac.loss_bwd,
            "gathered_shards": st.gathered},
        "backward of the last layer": {
            **persistent, "activations": top_acts + ac.final_T, "gradients": ac.head_grad,
            "gathered_shards": st.gathered},
        "backward of the first layer": {
            **persistent, "activations": (ac.ckpt_T if gc else 0) + ac.layer_live,
            "gradients": st.grads + st.ddp_buckets, "gathered_shards": st.gathered},
        "end of backward / optimizer step": {
            **persistent, "gradients": st.grads + st.ddp_buckets,
            "optimizer_temporaries": st.foreach_tmp + ac.emb_grad_tmp},
    }


def _slack(e: _Est, phase: str, allocated: float) -> float:
    """What the caching allocator reserves beyond what is allocated (references/memory.md, 6): a
    base (rounding, small-block segments, fragmentation: 0.25 GiB + 5%, from the measured
    reserved-minus-allocated gap of 0.23-0.96 GiB on runs of up to 4096 tokens), plus, in training
    phases, the T x T attention-mask blocks live at the peak counted twice more: their size follows
    each step's packed token count, so a larger one cannot reuse the freed smaller block and new
    segments are cut (measured: 17-20 GiB more reserved than allocated at 16k tokens unchecked)."""
    slack = 0.05 * allocated + 0.25 * GIB
    if phase != LOAD_PHASE:
        _, mask = _attention_bytes(e)
        layers = 1 if e.s["gradient_checkpointing"] else e.f.num_layers
        slack += MASK_CHURN * layers * mask * e.T
    return slack


def _result(e: _Est, p: _Params, phases: dict[str, dict[str, float]]) -> MemoryEstimate:
    """Peak phase, reserved memory, total with the CUDA context, and whether it fits the GPU
    (decided on the reserved total: what the allocator takes from the GPU)."""
    s, spec, vram = e.s, e.spec, e.vram
    totals = {k: sum(v.values()) for k, v in phases.items()}
    peak_phase = max(totals, key=totals.get)
    peak = totals[peak_phase]
    reserved_by = {k: v + _slack(e, k, v) for k, v in totals.items()}
    reserved_phase = max(reserved_by, key=reserved_by.get)
    reserved = max(reserved_by.values())
    breakdown = {k: round(v / GIB, 3) for k, v in phases[reserved_phase].items()}
    breakdown["cuda_context"] = CONTEXT_GIB
    breakdown["allocator_slack"] = round((reserved - totals[reserved_phase]) / GIB, 3)
    total = reserved / GIB + CONTEXT_GIB
    if s["packing"]:
        e.assumptions.append("Packing: TRL bfd packs micro_batch rows of seq_len into one padding-free row.")
    if not s["gradient_checkpointing"]:
        e.notes.append("Gradient checkpointing off: every layer's activations stay until backward.")
    if s["sharding"] == "none" and s["num_gpus"] > 1 and s["method"] == "full" and vram \
            and total > FITS_FRACTION * vram:
        e.notes.append("Full fine-tuning on several GPUs needs ZeRO-3 or FSDP to shard the states.")
    fits = thr = head = None
    if vram:
        thr = round(FITS_FRACTION * vram, 2)
        fits = total <= FITS_FRACTION * vram
        head = round(FITS_FRACTION * vram - total, 2)
    return MemoryEstimate(
        summary=_summary(e, reserved_phase, total, totals[reserved_phase], fits, thr), model=e.f.name, method=s["method"],
        total_params=e.f.total_params, trainable_params=int(p.trainable),
        breakdown_gib=breakdown, peak_phase=reserved_phase,
        phases_gib={k: round(v / GIB, 3) for k, v in totals.items()},
        peak_allocated_gib=round(peak / GIB, 3), peak_reserved_gib=round(reserved / GIB, 3),
        total_gib=round(total, 3),
        gpu=spec.name if spec else None, gpu_memory_gib=vram, fits=fits, fits_threshold_gib=thr,
        headroom_gib=head, assumptions=e.assumptions, notes=e.notes)


def _summary(e: _Est, phase: str, total: float, peak: float, fits: Optional[bool], thr: Optional[float]) -> str:
    s = e.s
    what = f"{e.f.name} {s['method']}" + (f" ({s['sharding']}, {s['num_gpus']} GPUs)" if s["sharding"] != "none"
                                           else f" ({s['num_gpus']} GPUs)" if s["num_gpus"] > 1 else "")
    when = "while the model loads" if phase == LOAD_PHASE else phase
    text = (f"{what} needs {total:.1f} GiB per GPU ({peak / GIB:.1f} GiB allocated at the peak, {when}, "
            "plus allocator reserve and CUDA context).")
    if fits is None:
        return text + " No GPU given, so no fit decision."
    gpu = e.spec.name if e.spec and not s["gpu_memory_gib"] else f"a {e.vram:g} GiB GPU"
    return text + (f" Fits {gpu}" if fits else f" Does not fit {gpu}") + \
        f" (limit {thr:.1f} GiB = {FITS_FRACTION:.0%})."


def _load(e: _Est, p: _Params, whole: _State) -> dict[str, float]:
    """Bytes on one GPU while the model loads, before ZeRO/FSDP shard it. bitsandbytes quantizes on
    the GPU: transformers puts the whole 4-bit model on every rank (device_map = this rank's GPU;
    FSDP's rank-0-only loading and ZeRO-3's zero.Init skip quantized models), one 16-bit weight at a
    time being quantized, and PEFT adds the adapters there before sharding. Other models load
    sharded (ZeRO-3 zero.Init; FSDP2 cpu_ram_efficient_loading: rank 0 reads on CPU and broadcasts
    one parameter at a time) or whole where they also train whole (single GPU, DDP, ZeRO-2)."""
    f, s, a = e.f, e.s, e.a
    if s["method"] == "qlora":
        return {"weights": whole.weights, "trainable_copies": whole.extra_w,
                "load_transient": f.intermediate_size * f.hidden_size * a}
    if s["sharding"] in ("zero3", "fsdp"):
        shard = 0.0 if s["cpu_offload"] else (whole.weights + whole.upcast) / s["num_gpus"]
        biggest = f.vocab_size * f.hidden_size * (4 if whole.upcast else a)  # the embedding in flight
        return {"weights": shard, "load_transient": biggest}
    return {"weights": whole.weights - p.trainable * (whole.ta - a) if whole.ta > a else whole.weights}


def _estimate(f: ModelFacts, **settings) -> MemoryEstimate:
    """The estimate in named steps: parameters by role, their bytes, the layout's share on one
    GPU, activations, the phases of a step, and the peak."""
    settings.setdefault("fp32_master_weights", None)
    e = _start(f, settings)
    p = _params(e)
    whole = _whole_model_state(e, p)
    load = _load(e, p, whole)           # before _shard divides the state over the GPUs
    st = _shard(e, p, whole)
    phases = {LOAD_PHASE: load, **_phases(e, st, _activations(e, p, st))}
    if settings["sharding"] != "none" and max(phases, key=lambda k: sum(phases[k].values())) == LOAD_PHASE:
        e.notes.append(_load_note(e, sum(load.values())))
    tps = _throughput(e, p)
    est = _result(e, p, phases)
    est.throughput_tokens_per_s = tps
    return est


def _load_note(e: _Est, load: float) -> str:
    return (f"Load-time peak: {load / GIB:.1f} GiB per GPU while from_pretrained runs, before "
            f"{e.s['sharding'].upper()} shards the model: bitsandbytes loads the whole 4-bit model on every "
            "GPU. Sharding and CPU offload do not lower it; only GPUs that hold it do.")


def estimate_for(facts: ModelFacts, **kw) -> MemoryEstimate:
    """estimate_memory on ModelFacts already loaded (the recommender calls this in a loop), with
    estimate_memory's own defaults for what is not given (one place for them: its signature)."""
    return _estimate(facts, **{**_DEFAULTS, **kw})


_DEFAULTS = {name: p.default for name, p in inspect.signature(estimate_memory).parameters.items()
             if name != "model"}
