"""Training throughput (tokens/s) of a TRL SFT step, from the work the step does.

A step's time is its CPU dispatch (Python, PyTorch and PEFT launching kernels, the per-step
optimizer and logging syncs) plus its GPU work (matmul FLOPs at a kernel's achievable share of the
GPU's peak bf16 rate, and memory traffic at its bandwidth). They add rather than overlap: with
`logging_steps` 1 and TRL's per-step metrics, every step ends in a host sync, and small layers
launch faster than the GPU finishes them only on large micro-batches. What goes in:

- FLOPs per computed token from the architecture: forward 2 N, input gradients 2 N, weight
  gradients 2 N_trained, and with gradient checkpointing a second forward of the decoder
  layers (2 N_decoder: +1/3 of a full run's compute, +1/2 of a LoRA run's).
- Attention: SDPA and eager attention over a packed (padding-free) micro-batch attend over the
  whole flattened micro-batch with a block-diagonal mask (transformers' packed-sequence mask; no
  block is skipped): 4 T q_dim FLOPs per token and layer, T = tokens in the micro-batch. Flash
  attention (varlen) and SDPA on one unpadded row (is_causal) attend causally within each row.
- QLoRA: bitsandbytes 0.50 runs the frozen 4-bit forward (and recompute) in its fused NF4 GEMM
  up to 1,536 tokens per micro-batch on CUDA, and as dequantise + cuBLAS above that; backward
  dequantises each weight (memory traffic) and uses cuBLAS. Fitted apart, the NF4 GEMM came out
  no slower than cuBLAS, so both share matmul_efficiency. A per-call dispatch cost of the
  dequantise path (and CPU/GPU overlap) fits the 15 runs in-sample better but predicts held-out
  runs worse, so it is not in the model (docs/benchmarks.md).
- Without packing, rows are padded to the longest in the micro-batch; only real tokens count.
- Eager attention also writes and reads the fp32 score matrix (memory traffic).

The constants (CONSTANTS) are fitted on measured H100 runs (bench/throughput_accuracy.py, which
also reports the leave-one-out error); they are a few physical quantities, not per-run anchors.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterable

from .models import ModelFacts


@dataclass(frozen=True)
class ThroughputConstants:
    """What the step time is made of, per unit of work. Fitted on the 15 H100 runs of
    ../shared/calibration (tests/fixtures/calibration) by fit_constants()."""
    # Achieved share of the GPU's dense bf16 peak in cuBLAS GEMMs of a training step (also used
    # for flash attention, which no run measured).
    matmul_efficiency: float = 0.336
    # Share of peak of SDPA's memory-efficient kernel with an explicit (packed) mask, and of eager
    # attention's batched matmuls.
    masked_attention_efficiency: float = 0.254
    # Per optimizer step: optimizer and grad-norm kernels, TRL's logged metrics (host syncs),
    # the dataloader.
    step_overhead_s: float = 0.169
    # CPU dispatch per decoder layer per pass (forward, backward, recompute).
    layer_pass_s: float = 7.7e-4
    # CPU dispatch per LoRA-wrapped linear per pass (PEFT's dropout, two small GEMMs, scale, add).
    adapter_pass_s: float = 3.0e-4
    # BFD packing leaves ~waste x row^2 / seq_len of each block empty (measured fill with 540-token
    # rows: 90% at 1024, 97% at 2048); fitted on the fill, not on the speed.
    packing_waste: float = 0.35


CONSTANTS = ThroughputConstants()
EAGER_SCORE_BYTES = 20  # bytes moved per attention score per pass (bf16 scores, mask add, fp32 softmax)
NF4_BWD_BYTES = 4.5     # per 4-bit parameter per backward: read NF4 (0.5), write and re-read bf16 (2 + 2)
OPT_BYTES = 16          # per trained parameter per optimizer step (weights, grads, two moments)
PAD_SPREAD = 0.5        # unpacked: longest row of a large micro-batch ~1.5x the mean row


@dataclass(frozen=True)
class StepWork:
    """The work of one optimizer step on one GPU (gradient accumulation 1), by kind."""
    real_tokens: float         # tokens that count (no padding)
    gemm_flops: float          # cuBLAS matmuls, and flash / causal attention
    masked_attn_flops: float   # full-mask attention (SDPA memory-efficient kernel, eager)
    nf4_flops: float           # bitsandbytes' fused 4-bit GEMM (at matmul_efficiency)
    bytes_moved: float         # memory-bound traffic counted explicitly
    layer_passes: float        # decoder layers x passes
    adapter_passes: float      # LoRA-wrapped linears x passes


def _tokens(seq_len: int, micro_batch: int, packing: bool, row: int, waste: float) -> tuple[float, float]:
    """(real tokens, computed tokens) per micro-batch."""
    r = min(row, seq_len)
    if packing:
        fill = max(0.5, 1 - waste * (r / seq_len) ** 2)
        return micro_batch * seq_len * fill, micro_batch * seq_len * fill
    padded = r if micro_batch == 1 else min(seq_len, r * (1 + PAD_SPREAD * (1 - 1 / micro_batch)))
    return micro_batch * r, micro_batch * padded


def _attention(f: ModelFacts, attn: str, packing: bool, micro_batch: int, row: float, computed: float,
               seq_len: int) -> tuple[bool, float]:
    """(full mask?, keys each query attends to) for one forward."""
    r = min(row, seq_len)
    causal = attn == "flash_attention_2" or (attn == "sdpa" and not packing and micro_batch == 1)
    if causal:
        return False, r / 2
    return True, computed if packing else computed / micro_batch


def step_work(f: ModelFacts, method: str, seq_len: int, micro_batch: int, gradient_checkpointing: bool,
              packing: bool, attn_implementation: str, trainable_params: int, adapted_linears: int = 7,
              avg_tokens_per_row: int = 512, spectrum_fraction: float = 0.3,
              c: ThroughputConstants = CONSTANTS) -> StepWork:
    """Count a step's work: FLOPs by kernel, explicit memory traffic and CPU dispatch units."""
    gc = bool(gradient_checkpointing)
    real, comp = _tokens(seq_len, micro_batch, packing, avg_tokens_per_row, c.packing_waste)
    head = f.vocab_size * f.hidden_size
    dec = f.linear_params * f.active_params // max(f.total_params, 1)  # decoder linears a token uses
    lora = method in ("lora", "qlora")
    trained = _trained_matmul_params(f, method, trainable_params, dec, head, spectrum_fraction)
    per_tok = 4 * (dec + head) + 2 * trained + (2 * dec if gc else 0) + (6 + 2 * gc) * (trainable_params if lora else 0)
    nf4 = 2 * dec * (1 + gc) if method == "qlora" else 0
    masked, keys = _attention(f, attn_implementation, packing, micro_batch, avg_tokens_per_row, comp, seq_len)
    q = f.num_attention_heads * f.head_dim
    attn = comp * f.num_layers * 4 * keys * q * (3 + gc)  # forward 1, backward 2, recompute 1
    passes = 2 + gc
    traffic = (NF4_BWD_BYTES * f.linear_params if method == "qlora" else 0) + \
        (OPT_BYTES * trainable_params if not lora else 0)
    if attn_implementation == "eager":
        traffic += comp * f.num_layers * f.num_attention_heads * keys * EAGER_SCORE_BYTES * passes
    return StepWork(real_tokens=real, gemm_flops=comp * (per_tok - nf4) + (0 if masked else attn),
                    masked_attn_flops=attn if masked else 0.0, nf4_flops=comp * nf4, bytes_moved=traffic,
                    layer_passes=f.num_layers * passes,
                    adapter_passes=f.num_layers * adapted_linears * passes if lora else 0.0)


def _trained_matmul_params(f: ModelFacts, method: str, trainable: int, dec: int, head: int, frac: float) -> float:
    """Parameters whose weight gradient is a matmul (the input embedding's is a scatter)."""
    if method == "full":
        return dec + head
    if method == "spectrum":
        return min(trainable, dec * frac + head)
    return 0.0


def _features(w: StepWork, peak_flops: float, bandwidth: float) -> list[float]:
    """Step time = features . (1/efficiencies, CPU seconds) + known traffic time."""
    return [(w.gemm_flops + w.nf4_flops) / peak_flops, w.masked_attn_flops / peak_flops,
            1.0, w.layer_passes, w.adapter_passes]


def _theta(c: ThroughputConstants) -> list[float]:
    return [1 / c.matmul_efficiency, 1 / c.masked_attention_efficiency,
            c.step_overhead_s, c.layer_pass_s, c.adapter_pass_s]


def step_seconds(w: StepWork, tflops_bf16: float, bandwidth_tbs: float, c: ThroughputConstants = CONSTANTS) -> float:
    peak, bw = tflops_bf16 * 1e12, bandwidth_tbs * 1e12
    return sum(x * t for x, t in zip(_features(w, peak, bw), _theta(c))) + w.bytes_moved / bw


def tokens_per_second(w: StepWork, tflops_bf16: float, bandwidth_tbs: float,
                      c: ThroughputConstants = CONSTANTS) -> float:
    """Real tokens per second on one GPU."""
    return w.real_tokens / step_seconds(w, tflops_bf16, bandwidth_tbs, c)


# ----------------------------------------------------------------------------- fitting
@dataclass(frozen=True)
class Measured:
    work: StepWork
    tflops_bf16: float
    bandwidth_tbs: float
    tokens_per_s: float


def fit_constants(runs: Iterable[Measured], base: ThroughputConstants = CONSTANTS) -> ThroughputConstants:
    """Least squares on the relative step time: the model is linear in (1/efficiency, seconds),
    so this is a small linear solve (non-negative by dropping a term that goes negative)."""
    rows, ys = [], []
    for m in runs:
        peak, bw = m.tflops_bf16 * 1e12, m.bandwidth_tbs * 1e12
        t = m.work.real_tokens / m.tokens_per_s
        rows.append([x / t for x in _features(m.work, peak, bw)])
        ys.append(1 - m.work.bytes_moved / bw / t)
    keep, theta = _nnls(rows, ys, _usable(rows))
    full = _theta(base)
    for i, v in zip(keep, theta):
        full[i] = v
    return _constants(full, base)


def _usable(rows: list[list[float]]) -> list[int]:
    """Terms some run exercises (the masked/nf4 kernels may be absent from a subset)."""
    return [j for j in range(len(rows[0])) if any(r[j] > 0 for r in rows)]


def _nnls(rows, ys, keep: list[int]) -> tuple[list[int], list[float]]:
    """Least squares over the `keep` columns, dropping (fixing at a tiny value) any that come out
    non-positive and solving again: a term cannot take time away."""
    keep = list(keep)
    while True:
        sol = _lstsq([[r[j] for j in keep] for r in rows], ys)
        bad = [j for j, v in zip(keep, sol) if v <= 0]
        if not bad:
            return keep, sol
        keep = [j for j in keep if j not in bad]  # the caller keeps the base value for dropped terms


def _lstsq(a: list[list[float]], y: list[float]) -> list[float]:
    """Normal equations solved by Gaussian elimination (a handful of unknowns; no numpy needed)."""
    n = len(a[0])
    m = [[sum(r[i] * r[j] for r in a) for j in range(n)] + [sum(r[i] * v for r, v in zip(a, y))] for i in range(n)]
    for i in range(n):
        p = max(range(i, n), key=lambda k: abs(m[k][i]))
        m[i], m[p] = m[p], m[i]
        if abs(m[i][i]) < 1e-300:
            raise ValueError("singular fit: the runs do not separate the constants")
        for k in range(n):
            if k != i:
                fac = m[k][i] / m[i][i]
                m[k] = [x - fac * z for x, z in zip(m[k], m[i])]
    return [m[i][n] / m[i][i] for i in range(n)]


def _constants(theta: list[float], base: ThroughputConstants) -> ThroughputConstants:
    names = [x.name for x in fields(ThroughputConstants)]
    return ThroughputConstants(**{**{n: getattr(base, n) for n in names},
                                  "matmul_efficiency": 1 / theta[0], "masked_attention_efficiency": 1 / theta[1],
                                  "step_overhead_s": theta[2], "layer_pass_s": theta[3], "adapter_pass_s": theta[4]})


def fmt_constants(c: ThroughputConstants) -> str:
    return ", ".join(f"{x.name}={getattr(c, x.name):.3g}" for x in fields(ThroughputConstants))


# ----------------------------------------------------------------------------- the tools' entry
DEFAULT_ROW_TOKENS = 512  # tokens per row when the data is not described (recommend_method's default)
# Several GPUs: DDP's all-reduce and ZeRO/FSDP's gathers cost a share of each step (not measured
# here; the usual 10% / 20%); CPU offload moves states over PCIe every step.
DDP_SCALE, SHARDED_SCALE, OFFLOAD_SCALE = 0.9, 0.8, 0.35


def layout_scale(num_gpus: int, sharding: str, cpu_offload: bool) -> float:
    """All GPUs' tokens/s over one GPU's."""
    scale = 1.0 if num_gpus == 1 else num_gpus * (DDP_SCALE if sharding == "none" else SHARDED_SCALE)
    return scale * (OFFLOAD_SCALE if cpu_offload else 1.0)


def estimate_tokens_per_s(f: ModelFacts, gpu, *, method: str, seq_len: int, micro_batch: int,
                          gradient_checkpointing: bool, packing: bool, attn_implementation: str,
                          trainable_params: int, adapted_linears: int = 7, avg_tokens_per_row: int | None = None,
                          spectrum_fraction: float = 0.3, num_gpus: int = 1, sharding: str = "none",
                          cpu_offload: bool = False) -> float:
    """Real tokens per second of the whole run (all GPUs) on a catalog GPU (tools.memory.GPUSpec)."""
    w = step_work(f, method, seq_len, micro_batch, gradient_checkpointing, packing, attn_implementation,
                  trainable_params, adapted_linears, avg_tokens_per_row or DEFAULT_ROW_TOKENS, spectrum_fraction)
    return tokens_per_second(w, gpu.tflops_bf16, gpu.bandwidth_tbs) * layout_scale(num_gpus, sharding, cpu_offload)
