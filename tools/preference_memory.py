"""Memory plan of a preference / RL run, built on tools.memory.estimate_memory (the SFT estimator
of one policy forward + backward) plus what each method adds:

- DPO / ORPO: chosen and rejected are concatenated into ONE forward (DataCollatorForPreference:
  2 x micro-batch sequences), so the policy's activations are those of 2 x micro-batch.
- KTO: one forward of the completions with gradients, plus a no-grad forward of the KL
  completions (freed layer by layer: its activations never add up).
- The reference (DPO / KTO; GRPO when beta > 0): with PEFT it is the policy with the adapter
  disabled: no second copy, only a no-grad forward. From an SFT adapter TRL keeps a frozen copy of
  the adapter ('ref' adapter): adapter-sized. Full training loads a second, frozen copy of the
  weights, unless `precompute_ref_log_probs: true` (log-probs computed once, before training, then
  the copy is released). ORPO and GRPO with beta 0 have no reference.
- GRPO: generation first. transformers' generate holds the KV cache of the whole generation batch
  (per_device_train_batch_size x steps_per_generation completions of prompt + completion tokens):
  2 (K, V) x layers x kv_heads x head_dim x 2 bytes per token. With vLLM colocate the generation
  runs in the same GPU inside vLLM's share (vllm_gpu_memory_utilization of the GPU, weights copy +
  KV pool); with vLLM server mode (trl vllm-serve on other GPUs) the training GPU holds no
  generation memory. The training step then runs on per_device_train_batch_size sequences of
  prompt + completion tokens.
"""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, Field

GRPO_PROMPT_TOKENS = 256   # assumed prompt length when the recipe gives none (TRL 1.16 has no max_prompt_length)
BYTES_BF16 = 2


class PreferenceMemory(BaseModel):
    """Where a preference / RL run's GPU memory goes (GiB), per micro-batch on one GPU."""
    trainer: str
    policy_gib: float = Field(description="tools.memory's estimate of the policy's forward + backward, "
                                          "at the sequences this method runs at once.")
    reference_gib: float = Field(description="extra memory of the reference model (0 with PEFT).")
    generation_gib: float = Field(0.0, description="GRPO: KV cache of the generation batch (0 with vLLM).")
    vllm_gib: Optional[float] = Field(None, description="GRPO colocate: vLLM's share of the GPU.")
    total_gib: float
    gpu_memory_gib: Optional[float] = None
    fits: Optional[bool] = None
    policy_sequences: int = Field(description="sequences in one policy forward.")
    seq_len: int
    reference: str
    assumptions: list[str] = []
    notes: list[str] = []


def _facts(model: str):
    from .models import get_model_facts
    from .train_dpo import adapter_base
    from .workspace import get_workspace
    try:
        path = get_workspace().resolve(model, field="model")
        base = adapter_base(str(path)) if path.is_dir() else None
    except Exception:  # noqa: BLE001 - a hub id or catalog name
        base = None
    return get_model_facts(base or model)


def _reference_gib(trainer: str, cfg: dict, facts, sft_adapter: bool, trainable_gib: float) -> tuple[float, str]:
    peft = bool(cfg.get("use_peft")) or sft_adapter
    if trainer == "orpo" or (trainer == "grpo" and not cfg.get("beta")):
        return 0.0, "none (no reference model)"
    if sft_adapter and trainer != "grpo":
        return trainable_gib, "frozen copy of the SFT adapter ('ref' adapter): adapter-sized"
    if peft:
        return 0.0, "the policy with the adapter disabled: no second copy, a no-grad forward"
    if cfg.get("precompute_ref_log_probs"):
        return 0.0, "log-probs precomputed before training: the copy is released"
    return facts.total_params * BYTES_BF16 / 2**30, "a second, frozen copy of the weights (bf16)"


def _grpo_generation(cfg: dict, facts, prompt_tokens: int, notes: list[str]) -> tuple[float, Optional[float], int]:
    """(KV cache GiB on the training GPU, vLLM share GiB or None, training sequence length)."""
    completion = int(cfg.get("max_completion_length", 512))
    seq = prompt_tokens + completion
    per_step = int(cfg.get("per_device_train_batch_size", 8))
    gen_batch = per_step * int(cfg.get("steps_per_generation") or cfg.get("gradient_accumulation_steps", 1))
    kv = 2 * facts.num_layers * facts.num_kv_heads * facts.head_dim * BYTES_BF16 * gen_batch * seq / 2**30
    notes.append(f"generation batch {gen_batch} completions per device ({cfg.get('num_generations', 8)} per "
                 f"prompt) of up to {seq} tokens: KV cache {kv:.2f} GiB with transformers' generate.")
    if not cfg.get("use_vllm"):
        notes.append("vLLM (use_vllm: true) generates several times faster on a GPU: colocate shares this GPU "
                     "(vllm_gpu_memory_utilization, 0.3 by default), server mode (trl vllm-serve on other "
                     "GPUs, vllm_mode: server) takes generation off it.")
        return kv, None, seq
    if cfg.get("vllm_mode", "colocate") == "server":
        notes.append("vLLM server mode: generation runs on the vLLM server's GPUs; none here.")
        return 0.0, None, seq
    share = float(cfg.get("vllm_gpu_memory_utilization", 0.3))
    notes.append(f"vLLM colocate: vLLM reserves {share:.0%} of the GPU (weights copy + KV pool); "
                 "vllm_enable_sleep_mode frees it during the training step.")
    return 0.0, share, seq


def plan_memory(trainer: str, model: str, cfg: dict, *, method: str, sft_adapter: bool = False,
                gpu_memory_gib: Optional[float] = None) -> PreferenceMemory:
    """The memory plan of one recipe (cfg = its keys)."""
    from .memory import FITS_FRACTION, estimate_memory
    facts = _facts(model)
    micro = int(cfg.get("per_device_train_batch_size", 1))
    notes: list[str] = []
    kv, share, seq = 0.0, None, int(cfg.get("max_length") or 1024)
    if trainer == "grpo":
        kv, share, seq = _grpo_generation(cfg, facts, GRPO_PROMPT_TOKENS, notes)
    sequences = 2 * micro if trainer in ("dpo", "orpo") else micro
    est = estimate_memory(facts, method=method, seq_len=seq,
                          micro_batch=sequences, gradient_checkpointing=bool(cfg.get("gradient_checkpointing", True)),
                          dtype="fp32" if cfg.get("use_cpu") else "bf16",
                          lora_r=int(cfg.get("lora_r", 16)), gpu_memory_gib=gpu_memory_gib)
    trainable_gib = est.trainable_params * BYTES_BF16 / 2**30
    ref_gib, ref = _reference_gib(trainer, cfg, facts, sft_adapter, trainable_gib)
    vllm_gib = share * gpu_memory_gib if share is not None and gpu_memory_gib else None
    total = est.total_gib + ref_gib + kv + (vllm_gib or 0.0)
    assumptions = list(est.assumptions)
    if trainer in ("dpo", "orpo"):
        assumptions.append(f"chosen + rejected concatenated: {sequences} sequences of {seq} tokens per forward.")
    if trainer == "grpo":
        assumptions.append(f"prompts of {GRPO_PROMPT_TOKENS} tokens assumed (verify_preference measures them).")
    if share is not None and not gpu_memory_gib:
        notes.append(f"vLLM's share ({share:.0%} of the GPU) is not in total_gib: no GPU size given.")
    fits = None if not gpu_memory_gib else total <= FITS_FRACTION * gpu_memory_gib
    return PreferenceMemory(trainer=trainer, policy_gib=round(est.total_gib, 3), reference_gib=round(ref_gib, 3),
                            generation_gib=round(kv, 3), vllm_gib=round(vllm_gib, 3) if vllm_gib else None,
                            total_gib=round(total, 3), gpu_memory_gib=gpu_memory_gib, fits=fits,
                            policy_sequences=sequences, seq_len=seq, reference=ref, assumptions=assumptions,
                            notes=notes + list(est.notes))


def plan_or_note(trainer: str, model: str, cfg: dict, **kw: Any) -> tuple[Optional[PreferenceMemory], Optional[str]]:
    """plan_memory, or why it could not be made (an unknown architecture must not block a recipe)."""
    try:
        return plan_memory(trainer, model, cfg, **kw), None
    except Exception as exc:  # noqa: BLE001 - the recipe is still useful without the estimate
        return None, f"no memory estimate: {type(exc).__name__}: {str(exc)[:200]}"
