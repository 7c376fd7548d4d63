"""Choose the fine-tuning method and batch layout for a model on given hardware, with evidence.

The skill's decision tree names the usual answer; the memory estimator decides: the best-quality
method that fits (full > spectrum > lora > qlora), then the micro-batch and checkpointing with the
highest estimated throughput within 90% of GPU memory. Throughput model: references/methods.md.
"""
from __future__ import annotations

import math
from typing import Annotated, Literal, Optional

from pydantic import BaseModel, Field

from .errors import UserError
from .memory import FITS_FRACTION, MemoryEstimate, estimate_for, find_gpu, require_gpu
from .models import ModelFacts, get_model_facts

H100_TFLOPS = 989.0
# Measured on one H100 (tests/fixtures/calibration/h100_sft_runs.jsonl, packed 4 x 1024, liger,
# checkpointing): tokens/s per (catalog model, method). MFU is derived from these at run time.
ANCHORS = {("Llama-3.2-1B", "qlora"): 6473.5, ("Llama-3.2-1B", "lora"): 9256.0,
           ("Llama-3.2-1B", "full"): 10512.2, ("Llama-3.1-8B", "qlora"): 3626.8}
QUALITY = ["full", "spectrum", "lora", "qlora"]
MICRO_BATCHES = [1, 2, 4, 8, 16, 32]


class Candidate(BaseModel):
    method: str
    sharding: str
    cpu_offload: bool
    optimizer: str
    micro_batch: int
    gradient_checkpointing: bool
    total_gib: float
    fits: Optional[bool]
    why_not: Optional[str] = None


class Recommendation(BaseModel):
    """The plan: method, parallelism, batch layout, memory evidence, time estimate, alternatives."""
    model: str
    total_params: int
    method: Literal["full", "lora", "qlora", "spectrum"]
    decision_tree_branch: str
    device: str
    num_gpus: int
    gpu_memory_gib: Optional[float]
    sharding: str
    cpu_offload: bool
    dtype: str
    optimizer: str
    seq_len: int
    packing: bool
    liger: bool
    micro_batch: int
    gradient_accumulation_steps: int
    global_batch_sequences: int
    gradient_checkpointing: bool
    lora_r: Optional[int] = None
    spectrum_fraction: Optional[float] = None
    memory: MemoryEstimate
    total_tokens: Optional[int] = None
    tokens_per_second: Optional[float] = Field(None, description="estimated, all GPUs together.")
    training_hours: Optional[float] = None
    reasons: list[str]
    alternatives: list[Candidate]
    warnings: list[str] = []


def _flops_per_token(f: ModelFacts, method: str, seq_len: int, gc: bool, spectrum_fraction: float) -> float:
    """Matmul FLOPs per trained token: forward 2N, input gradients 2N, weight gradients 2N for the
    trained share, recompute 2N with checkpointing; plus causal attention 2*L*seq*q per pass."""
    n = f.active_params - f.embedding_params // (1 if f.tie_word_embeddings else 2)  # head is a matmul
    wgrad = {"full": 1.0, "spectrum": spectrum_fraction}.get(method, 0.0)
    passes = 2 + 2 + 2 * wgrad + (2 if gc else 0)
    attn = 2 * f.num_layers * seq_len * f.num_attention_heads * f.head_dim * (3 + (1 if gc else 0))
    return n * passes + attn


def _mfu(f: ModelFacts, method: str) -> float:
    """Model-FLOPs utilisation on an H100 for this size and method, from the measured anchors."""
    from .models import get_model_facts as facts
    def m(name, meth):
        return ANCHORS[(name, meth)] * _flops_per_token(facts(name), meth, 1024, True, 0.3) / (H100_TFLOPS * 1e12)
    small, big = m("Llama-3.2-1B", "qlora"), m("Llama-3.1-8B", "qlora")
    n0, n1 = 1.236e9, 8.03e9
    x = min(max(math.log(f.total_params / n0) / math.log(n1 / n0), 0.0), 1.0)
    q = small * (big / small) ** x
    ratio = {"qlora": 1.0, "lora": m("Llama-3.2-1B", "lora") / small,
             "full": m("Llama-3.2-1B", "full") / small, "spectrum": m("Llama-3.2-1B", "full") / small}[method]
    return min(q * ratio, 0.6)


def _throughput(f, method, seq_len, micro_batch, gc, tflops, num_gpus, sharding, offload, spectrum_fraction):
    t = micro_batch * seq_len
    size_eff = (t / (t + 512)) / (4096 / (4096 + 512))  # small micro-batches under-use the GPU
    per_gpu = _mfu(f, method) * size_eff * tflops * 1e12 / _flops_per_token(f, method, seq_len, gc, spectrum_fraction)
    scale = 1.0 if num_gpus == 1 else (0.9 if sharding == "none" else 0.8)
    if offload:
        scale *= 0.35
    return per_gpu * num_gpus * scale


def offload_ram_gib(method: str, est: MemoryEstimate) -> float:
    """CPU RAM an offloaded run holds: QLoRA's 4-bit weights (~0.6 byte per parameter); ZeRO-3
    full/Spectrum: fp32 master weights and Adam moments of what is trained (12 bytes each) plus the
    16-bit parameters (2 bytes each), over all nodes' GPUs of one machine together."""
    if method == "qlora":
        return est.total_params * 0.6 / 2 ** 30
    return (est.trainable_params * 12 + est.total_params * 2) / 2 ** 30


def recommend_method(
    model: Annotated[str, Field(description="Model directory in the workspace, hub id or catalog name.")],
    gpu: Annotated[Optional[str], Field(description="GPU model, e.g. 'RTX 4090', 'H100'. Omit to detect this machine.")] = None,
    gpu_memory_gib: Annotated[Optional[float], Field(gt=0, description="VRAM per GPU in GiB (instead of or with gpu).")] = None,
    num_gpus: Annotated[Optional[int], Field(ge=1, description="GPUs to use (default: detected, or 1).")] = None,
    dataset_rows: Annotated[Optional[int], Field(ge=1, description="Training rows.")] = None,
    dataset_tokens: Annotated[Optional[int], Field(ge=1, description="Training tokens (overrides rows).")] = None,
    avg_tokens_per_row: Annotated[int, Field(ge=1, description="Average tokens per row, with dataset_rows.")] = 512,
    epochs: Annotated[float, Field(gt=0, description="num_train_epochs.")] = 1.0,
    seq_len: Annotated[int, Field(ge=1, description="max_length.")] = 1024,
    micro_batch: Annotated[Optional[int], Field(ge=1, description="Fix the micro-batch instead of searching.")] = None,
    goal: Annotated[Literal["quality", "balanced", "cost"], Field(
        description="quality: best method that fits; balanced: prefer Spectrum/LoRA over full; "
                    "cost: QLoRA first (cheapest hardware, compare with the base model).")] = "balanced",
    allow_methods: Annotated[Optional[list[Literal["full", "lora", "qlora", "spectrum"]]], Field(
        description="Restrict the methods considered.")] = None,
    max_hours: Annotated[Optional[float], Field(gt=0, description="Reject plans estimated slower than this.")] = None,
    global_batch: Annotated[int, Field(ge=1, description="Target sequences per optimizer step.")] = 16,
    modules_to_save: Annotated[Optional[list[str]], Field(
        description="LoRA/QLoRA: fully trained modules too, e.g. ['lm_head','embed_tokens'] when training "
                    "a base model with a new chat template (their copies, grads and states count).")] = None,
) -> Recommendation:
    """Recommend how to fine-tune `model` on this machine (detected) or on described hardware: the
    method (full, Spectrum, LoRA, QLoRA), multi-GPU sharding and CPU offload, micro-batch,
    gradient accumulation and checkpointing, each decided with estimate_memory (total within 90%
    of VRAM) and ranked by an estimated throughput; plus training time from the dataset size, the
    alternatives with their memory and why they were not chosen, and warnings (no bf16, CPU only,
    missing flash-attn/liger)."""
    f = get_model_facts(model)
    for name, v in (("seq_len", seq_len), ("micro_batch", micro_batch), ("num_gpus", num_gpus),
                    ("dataset_rows", dataset_rows), ("dataset_tokens", dataset_tokens)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise UserError(f"must be a positive integer (got {v!r}).", field=name, fix="Use 1 or more.")
    if f.max_position_embeddings and seq_len > f.max_position_embeddings:
        raise UserError(f"{seq_len} exceeds {f.name}'s max_position_embeddings ({f.max_position_embeddings}).",
                        field="seq_len", fix=f"Use seq_len <= {f.max_position_embeddings}.")
    warnings: list[str] = []
    spec = require_gpu(gpu) if gpu else None
    liger = False
    ram = None
    if spec is None and gpu_memory_gib is None:
        from .hardware import detect_hardware
        hw = detect_hardware()
        ram = hw.ram_available_gib
        if not hw.gpus:
            return _cpu_plan(f, hw, seq_len, micro_batch, dataset_rows, dataset_tokens,
                             avg_tokens_per_row, epochs, allow_methods, global_batch)
        g0 = hw.gpus[0]
        spec = find_gpu(g0.name)
        gpu_memory_gib = g0.total_memory_gib
        num_gpus = num_gpus or hw.gpu_count
        bf16 = hw.bf16_supported
        liger = hw.packages.get("liger-kernel") is not None
        if hw.packages.get("flash-attn") is None:
            warnings.append("flash-attn is not installed: attention uses PyTorch SDPA (estimates assume it).")
        if not liger:
            warnings.append("liger-kernel is not installed: estimates assume unfused RMSNorm/SwiGLU.")
        device = f"{hw.gpu_count}x {g0.name} (detected)"
    else:
        bf16 = spec.bf16 if spec else True
        device = f"{num_gpus or 1}x {spec.name if spec else f'{gpu_memory_gib} GiB GPU'} (described)"
    num_gpus = num_gpus or 1
    vram = gpu_memory_gib or spec.memory_gib
    tflops = spec.tflops_bf16 if spec else 150.0
    if spec is None:
        warnings.append("GPU model unknown: throughput assumes 150 dense TFLOPs.")
    dtype = "bf16" if bf16 else "fp16"
    if not bf16:
        warnings.append("No bf16 on this GPU: train in fp16 (fp16: true, bf16: false); "
                        "watch for loss spikes and overflow.")

    branch, preferred = _branch(vram, num_gpus, goal)
    # quality: best that fits; balanced: the decision tree's pick first, then by quality; cost: cheapest first
    order = {"quality": QUALITY, "balanced": preferred + [m for m in QUALITY if m not in preferred],
             "cost": ["qlora", "lora", "spectrum", "full"]}[goal]
    order = [m for m in order if not allow_methods or m in allow_methods]
    if not order:
        raise UserError("no method left.", field="allow_methods", fix="Allow at least one of full, spectrum, lora, qlora.")

    def layouts(method):
        if num_gpus == 1:
            shard = [("none", False)]
        elif method in ("full", "spectrum"):
            # last resort: optimizer states and parameters in CPU RAM (slow, but a 70B full run fits)
            shard = [("zero3", False), ("fsdp", False), ("zero3", True)]
        else:  # CPU offload only for QLoRA: 4-bit weights make the PCIe traffic and RAM affordable
            shard = [("none", False), ("fsdp", False)] + ([("fsdp", True)] if method == "qlora" else [])
        for sh, off in shard:
            yield sh, off, "adamw_torch_fused"
            if sh == "none" and method in ("full", "spectrum"):
                yield sh, off, "adamw_8bit"  # bitsandbytes optimizers: single GPU / DDP only

    alternatives: list[Candidate] = []
    too_slow: list[tuple[float, str]] = []  # (hours, method) of layouts that fit but exceed max_hours
    chosen = None
    tokens = dataset_tokens or (dataset_rows * avg_tokens_per_row if dataset_rows else None)
    # CPU offload is a last resort across methods: a slower-but-unoffloaded method that fits (e.g.
    # Spectrum with ZeRO-3) beats an offloaded one (full with ZeRO-3 offload).
    for offload_pass in (False, True):
        if chosen is not None:
            break
        # offloading: the method with the smallest CPU-RAM footprint first (QLoRA's 4-bit weights
        # need ~0.6 B/param of RAM, full ZeRO-3 offload ~14 B/param: a terabyte for 70B)
        pass_order = [m for m in ("qlora", "lora", "spectrum", "full") if m in order] if offload_pass else order
        for method in pass_order:
            picked = None
            for sh, off, opt in layouts(method):
                if off != offload_pass:
                    continue
                best = None
                for gc in (False, True):
                    for mb in ([micro_batch] if micro_batch else MICRO_BATCHES):
                        est = estimate_for(f, method=method, seq_len=seq_len, micro_batch=mb,
                                           gradient_checkpointing=gc, packing=True, optimizer=opt,
                                           dtype=dtype, liger=liger, num_gpus=num_gpus, sharding=sh,
                                           cpu_offload=off, gpu_memory_gib=vram,
                                           modules_to_save=modules_to_save if method in ("lora", "qlora") else None)
                        if not est.fits:
                            continue
                        tps = _throughput(f, method, seq_len, mb, gc, tflops, num_gpus, sh, off, 0.3)
                        if best is None or tps > best[0] * 1.02:
                            best = (tps, mb, gc, est)
                if best is None:
                    smallest = estimate_for(f, method=method, seq_len=seq_len, micro_batch=micro_batch or 1,
                                            gradient_checkpointing=True, packing=True, optimizer=opt, dtype=dtype,
                                            liger=liger, num_gpus=num_gpus, sharding=sh, cpu_offload=off,
                                            gpu_memory_gib=vram,
                                            modules_to_save=modules_to_save if method in ("lora", "qlora") else None)
                    alternatives.append(Candidate(
                        method=method, sharding=sh, cpu_offload=off, optimizer=opt, micro_batch=micro_batch or 1,
                        gradient_checkpointing=True, total_gib=smallest.total_gib, fits=False,
                        why_not=f"needs {smallest.total_gib:.1f} GiB per GPU at micro-batch {micro_batch or 1} "
                                f"with checkpointing; limit {FITS_FRACTION:.0%} of {vram:.1f} = "
                                f"{FITS_FRACTION * vram:.1f} GiB"))
                    continue
                tps, mb, gc, est = best
                hours = tokens * epochs / tps / 3600 if tokens else None
                if max_hours and hours and hours > max_hours:
                    too_slow.append((hours, method))
                    alternatives.append(Candidate(method=method, sharding=sh, cpu_offload=off, optimizer=opt,
                                                  micro_batch=mb, gradient_checkpointing=gc, total_gib=est.total_gib,
                                                  fits=True, why_not=f"estimated {hours:.1f} h > max_hours {max_hours}"))
                    continue
                need_ram = offload_ram_gib(method, est) if off else 0.0
                if off and ram is not None and need_ram > ram:
                    alternatives.append(Candidate(method=method, sharding=sh, cpu_offload=off, optimizer=opt,
                                                  micro_batch=mb, gradient_checkpointing=gc, total_gib=est.total_gib,
                                                  fits=True, why_not=f"CPU offload needs ~{need_ram:.0f} GiB of RAM, "
                                                                     f"{ram:.0f} GiB available"))
                    continue
                picked = (sh, off, opt, tps, mb, gc, est, hours)
                break
            if picked and chosen is None:
                chosen = (method, *picked)
            elif picked:
                sh, off, opt, tps, mb, gc, est, hours = picked
                alternatives.append(Candidate(method=method, sharding=sh, cpu_offload=off, optimizer=opt,
                                              micro_batch=mb, gradient_checkpointing=gc, total_gib=est.total_gib,
                                              fits=True, why_not=f"fits ({est.total_gib:.1f} GiB), but the "
                                              f"'{goal}' order ranks {chosen[0]} first"))
    if chosen is None:
        if too_slow:
            hours_, fastest = min(too_slow)
            raise UserError(f"every method that fits {f.name} on {device} is slower than max_hours={max_hours:g}: "
                            f"the fastest, {fastest}, is estimated {hours_:.1f} h.",
                            field="max_hours",
                            fix="Raise max_hours, train on fewer tokens (dataset_tokens / epochs), or use "
                                "more or faster GPUs.")
        raise UserError(f"no method fits {f.name} on {device} ({vram:.1f} GiB per GPU) with seq_len {seq_len}.",
                        field="model", fix="Use a smaller model, shorter seq_len, more or larger GPUs.")
    method, sh, off, opt, tps, mb, gc, est, hours = chosen
    if off:
        warnings.append(f"CPU offload: nothing fits without it; the host needs ~{offload_ram_gib(method, est):.0f} GiB "
                        "of CPU RAM for the offloaded states, and steps are several times slower.")
    ga = max(1, math.ceil(global_batch / (mb * num_gpus)))
    reasons = [f"{method} is the first method in the '{goal}' order ({' > '.join(order)}) whose "
               f"estimated total ({est.total_gib:.1f} GiB per GPU) stays within {FITS_FRACTION:.0%} "
               f"of {vram:.1f} GiB.",
               f"micro-batch {mb} with gradient checkpointing {'on' if gc else 'off'} has the highest "
               f"estimated throughput among the layouts that fit; gradient accumulation {ga} gives "
               f"{mb * ga * num_gpus} sequences per step."]
    if sh != "none":
        reasons.append(f"{num_gpus} GPUs: {sh.upper()} shards parameters, gradients and optimizer states"
                       + (" and offloads them to CPU RAM" if off else "") + ".")
    if goal == "cost" or method == "qlora":
        reasons.append("QLoRA trades some quality for memory: evaluate the result against the base model.")
    return Recommendation(
        model=f.name, total_params=f.total_params, method=method, decision_tree_branch=branch,
        device=device, num_gpus=num_gpus, gpu_memory_gib=vram, sharding=sh, cpu_offload=off, dtype=dtype,
        optimizer=opt, seq_len=seq_len, packing=True, liger=liger, micro_batch=mb,
        gradient_accumulation_steps=ga, global_batch_sequences=mb * ga * num_gpus, gradient_checkpointing=gc,
        lora_r=16 if method in ("lora", "qlora") else None,
        spectrum_fraction=0.3 if method == "spectrum" else None, memory=est,
        total_tokens=int(tokens * epochs) if tokens else None, tokens_per_second=round(tps, 1),
        training_hours=None if hours is None else round(hours, 2), reasons=reasons,
        alternatives=alternatives, warnings=warnings + est.notes)


def _branch(vram: float, num_gpus: int, goal: str) -> tuple[str, list[str]]:
    """The skill's decision tree: (branch, methods it prefers, best first)."""
    if goal == "cost":
        return "Limited compute budget -> QLoRA first, benchmark against the base model", ["qlora"]
    if num_gpus > 1:
        return ("Multi-GPU -> full fine-tuning or Spectrum with DeepSpeed ZeRO-3 "
                "(FSDP + QLoRA when the GPUs are too small)", ["full", "spectrum"])
    if vram >= 44:
        return "Single high-end GPU (48 GB+) -> Spectrum", ["spectrum"]
    return "Consumer GPU (~24 GB) -> QLoRA", ["qlora"]


def _cpu_plan(f, hw, seq_len, micro_batch, rows, tokens, avg, epochs, allow, global_batch) -> Recommendation:
    """No GPU: fp32 training in RAM; only tiny models are practical."""
    ram = hw.ram_available_gib or hw.ram_total_gib or 8.0
    warnings = ["No CUDA GPU: training runs on CPU in fp32 (use_cpu: true, bf16: false); only tiny "
                "models (well under 1B parameters) train in reasonable time."]
    if f.total_params > 1e9:
        warnings.append(f"{f.name} has {f.total_params / 1e9:.1f}B parameters: impractical on CPU.")
    alts: list[Candidate] = []
    mb = micro_batch or 1
    for method in [m for m in ("full", "lora") if not allow or m in allow]:
        est = estimate_for(f, method=method, seq_len=seq_len, micro_batch=mb, gradient_checkpointing=False,
                           packing=True, optimizer="adamw_torch", dtype="fp32", gpu_memory_gib=ram)
        if est.fits:
            for a in alts:
                a.why_not = a.why_not or f"'{method}' fits"
            ga = max(1, math.ceil(global_batch / mb))
            tok = tokens or (rows * avg if rows else None)
            return Recommendation(
                model=f.name, total_params=f.total_params, method=method,
                decision_tree_branch="CPU only -> tiny models, full fine-tuning or LoRA in fp32",
                device=f"CPU ({hw.cpu_cores} cores, {ram:.1f} GiB RAM available)", num_gpus=0,
                gpu_memory_gib=None, sharding="none", cpu_offload=False, dtype="fp32", optimizer="adamw_torch",
                seq_len=seq_len, packing=True, liger=False, micro_batch=mb, gradient_accumulation_steps=ga,
                global_batch_sequences=mb * ga, gradient_checkpointing=False,
                lora_r=16 if method == "lora" else None, memory=est,
                total_tokens=int(tok * epochs) if tok else None,
                reasons=[f"{method} fits in {FITS_FRACTION:.0%} of available RAM ({est.total_gib:.2f} GiB "
                         "estimated); QLoRA and liger need a GPU to be worthwhile."],
                alternatives=alts, warnings=warnings)
        alts.append(Candidate(method=method, sharding="none", cpu_offload=False, optimizer="adamw_torch",
                              micro_batch=mb, gradient_checkpointing=False, total_gib=est.total_gib,
                              fits=False, why_not=f"needs {est.total_gib:.1f} GiB of {ram:.1f} GiB RAM"))
    raise UserError(f"{f.name} does not fit in this machine's RAM for CPU training.", field="model",
                    fix="Use a tiny model on CPU, or describe a GPU (gpu=..., num_gpus=...).")
