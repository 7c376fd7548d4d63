"""The checks of bench/gpu_acceptance.py and the steps they share (recipe, masking, launch, wait,
measured figures, the estimator's figures, merge). Each check drives the product's functions and
returns one record (or a list of records) for acceptance.jsonl.

A check is "real" when it trains on this machine: on CUDA all of them; in the CPU dry run only
stop_resume (and the in-process packing check and evaluate). The others then run the same recipe
and launch path with launch_training(..., dry_run=True) for the GPU the run is written for (an
H200, described), which returns the argv, environment and launch checks without starting
anything, and report `"ran": "plan only (no CUDA)"`: a broken recipe or config path fails on CPU.
"""
from __future__ import annotations

import importlib.util
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

GIB = 2 ** 30
PLAN_ONLY = "plan only (no CUDA)"

# Real widths (layers cut to fit the time budget), with the real 128k vocabulary: the LM head and
# the loss over 128k logits are a large share of a 1B model's memory and time. tools.tiny's
# build_tiny_model sizes the vocabulary to its byte-level tokenizer (259 tokens) and has no
# vocab_size argument, so build_shape pads the model's vocabulary past the tokenizer's (as
# Qwen's 151,936 rows over a 151,665-token tokenizer do); training uses the first 259 ids.
SHAPES = {
    # Llama-3.2-1B width (tied embeddings), 4 of its 16 layers
    "1b": dict(hidden_size=2048, intermediate_size=8192, heads=32, kv_heads=8, layers=4, vocab=128256, tie=True),
    # Llama-3.1-8B width, 2 of its 32 layers
    "8b": dict(hidden_size=4096, intermediate_size=14336, heads=32, kv_heads=8, layers=2, vocab=128256,
               tie=False),
    # CPU stand-ins (dry run), also with a vocabulary padded past the tokenizer's
    "tiny": dict(hidden_size=64, intermediate_size=256, heads=4, kv_heads=2, layers=2, vocab=384, tie=True),
    "tiny8b": dict(hidden_size=96, intermediate_size=256, heads=4, kv_heads=2, layers=2, vocab=384, tie=False),
}
WORDS = ("model data train token layer weight batch memory kernel attention gradient optimizer "
         "sequence packing adapter merge evaluate checkpoint resume precision shard process").split()


@dataclass
class Ctx:
    """What every check needs: where, what machine, the shapes and the run settings."""
    out: Path
    ws: Path
    dry: bool
    cuda: bool
    gpu_name: Optional[str]          # the detected GPU, or None on CPU
    seq: int                          # max_length
    micro_batch: int
    steps: int                        # max_steps of a measured run
    warm: int                         # steps left out of the steady tokens/s
    run_timeout_s: float
    real: bool = False                # train for real: on CUDA (or --cpu-real); else plan-only
    models: dict[str, str] = field(default_factory=dict)   # "1b"/"8b" -> workspace dir
    avg_row_tokens: int = 0
    done: dict[str, dict] = field(default_factory=dict)    # check -> record (later checks compare)
    masked: dict[str, str] = field(default_factory=dict)   # masking key -> verdict
    run_logs: list[str] = field(default_factory=list)      # log tails of runs that did not complete

    @property
    def est_gpu(self) -> str:
        """The GPU the estimates are for: this one, or the H200 the dry run writes recipes for."""
        return self.gpu_name or "H200"


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# ------------------------------------------------------------------------------------ setup
def build_shape(path: Path, shape: str, device: str) -> Path:
    """A random-init Llama of the shape with tools.tiny's tokenizer (ChatML template), saved the
    way hub models are (bf16 on a GPU, as the calibration runs; fp32 on CPU)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from tools.tiny import build_tokenizer
    s = SHAPES[shape]
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path)
    tok.model_max_length = 4096  # build_tokenizer's 512 would warn on every longer row
    tok.save_pretrained(str(path))
    cfg = LlamaConfig(vocab_size=max(s["vocab"], len(tok)), hidden_size=s["hidden_size"],
                      intermediate_size=s["intermediate_size"], num_hidden_layers=s["layers"],
                      num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                      max_position_embeddings=4096, tie_word_embeddings=s["tie"], rope_theta=500000.0,
                      bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      rms_norm_eps=1e-5)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model.to(torch.bfloat16 if device == "cuda" else torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                               bos_token_id=None, do_sample=False, max_new_tokens=64)
    model.save_pretrained(str(path))
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return path


def write_data(ws: Path, dry: bool) -> int:
    """data/train as prompt/completion chats and data/eval.jsonl; returns the mean characters
    (= tokens: one byte-level token each) per row. On a GPU the rows are as long as the
    calibration runs' (prompt 150-450, completion 80-400 tokens): 400 rows, ~240k tokens, ~230
    packed blocks of 1024 (a 25-step run at micro-batch 4 uses 100)."""
    if dry:
        train = [{"prompt": [{"role": "user", "content": f"What is {i}+{i}?"}],
                  "completion": [{"role": "assistant", "content": str(2 * i)}]} for i in range(64)]
    else:
        rnd = random.Random(0)

        def text(k: int) -> str:
            words: list[str] = []
            while sum(len(w) + 1 for w in words) < k:
                words.append(rnd.choice(WORDS))
            return " ".join(words)
        train = [{"prompt": [{"role": "user", "content": text(rnd.randint(150, 450))}],
                  "completion": [{"role": "assistant", "content": text(rnd.randint(80, 400))}]} for _ in range(400)]
    d = ws / "data" / "train"
    d.mkdir(parents=True, exist_ok=True)
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train), encoding="utf-8")
    (ws / "data" / "eval.jsonl").write_text("".join(
        json.dumps({"question": f"What is {i}+{i}?", "answer": str(2 * i)}) + "\n" for i in range(8)))
    chars = sum(len(r["prompt"][0]["content"]) + len(r["completion"][0]["content"]) for r in train)
    return round(chars / len(train)) + 20  # + the ChatML wrapping of two turns


# --------------------------------------------------------------------------- shared steps
def base_overrides(ctx: Ctx, **more) -> dict[str, Any]:
    over = {"max_steps": ctx.steps, "save_strategy": "no", "logging_steps": 1, "report_to": "none",
            "max_length": ctx.seq, "per_device_train_batch_size": ctx.micro_batch,
            "gradient_accumulation_steps": 1}
    over.update(more)
    return over


def make_recipe(ctx: Ctx, name: str, shape: str, method: str, *, real: bool, overrides: dict,
                dataset: str = "data/train", plan: Optional[dict] = None, spectrum: Optional[str] = None):
    """generate_recipe for this machine (real runs) or for an H200 (plan-only on CPU); the
    masking report launch_training requires, once per data/tokenizer/settings."""
    from tools.recipes import generate_recipe
    kw: dict[str, Any] = {}
    if plan is not None:
        kw["plan"] = plan
    else:
        kw.update(method=method, seq_len=ctx.seq)
        if not real and not ctx.cuda:
            kw["gpu"] = "H200"  # the GPU the acceptance run is written for
    if spectrum:
        kw["spectrum_config"] = spectrum
    rec = generate_recipe(ctx.models[shape], dataset, output_path=f"recipes/{name}.yaml",
                          output_dir=f"out/{name}", overrides=overrides, test_split=False, **kw)
    cfg = read_recipe(ctx, rec.recipe_path)
    ensure_masking(ctx, rec.recipe_path, cfg)
    return rec, cfg


def read_recipe(ctx: Ctx, rel: str) -> dict:
    import yaml
    return yaml.safe_load((ctx.ws / rel).read_text(encoding="utf-8")) or {}


def ensure_masking(ctx: Ctx, recipe: str, cfg: dict) -> str:
    from tools.masking import verify_masking
    key = json.dumps([cfg.get(k) for k in ("dataset_name", "model_name_or_path", "max_length", "packing",
                                           "completion_only_loss", "assistant_only_loss",
                                           "chat_template_path")], default=str)
    if key not in ctx.masked:
        ctx.masked[key] = verify_masking(recipe=recipe).verdict
    return ctx.masked[key]


def plan_record(launch) -> dict:
    """What a dry-run launch shows: the command, the environment and the checks it passed."""
    return {"ran": PLAN_ONLY, "argv": launch.command[1:], "env": launch.env,
            "num_processes": launch.num_processes, "launch_checks": launch.checks,
            "launch_warnings": launch.warnings}


def run(ctx: Ctx, check: str, recipe: str, **launch_kw):
    """launch_training, then training_status until the run ends. Returns (LaunchResult,
    TrainingStatus)."""
    from tools.runs import launch_training
    launch = launch_training(recipe, **launch_kw)
    return launch, wait(ctx, launch.run_id)


def wait(ctx: Ctx, run_id: str, *, until_step: Optional[int] = None, poll_s: float = 0.5):
    """training_status until the run ends (or reaches until_step); a run past the timeout is
    stopped and reported as "timeout"."""
    from tools.runs import stop_training, training_status
    t0 = time.time()
    while True:
        s = training_status(run_id, plot=False, log_lines=0)
        if s.state not in ("queued", "running"):
            break
        if until_step is not None and (s.step or 0) >= until_step:
            return s
        if time.time() - t0 > ctx.run_timeout_s:
            stop_training(run_id, timeout_s=20)
            s = training_status(run_id, plot=False, log_lines=0)
            s.state, s.error = "timeout", f"no end within {ctx.run_timeout_s:.0f} s: stopped"
            break
        time.sleep(poll_s)
    if s.state != "completed":
        keep_log(ctx, run_id)
    return s


def keep_log(ctx: Ctx, run_id: str, lines: int = 60) -> None:
    from tools.runs import training_status
    tail = training_status(run_id, plot=False, log_lines=lines).log_tail
    ctx.run_logs.append(f"===== {run_id}\n" + "\n".join(tail))


def steady_rate(metrics: list[dict], warm: int) -> dict[str, Any]:
    """Tokens/s over the logged steps after `warm` (the first steps compile kernels and fill the
    allocator): (tokens at the last log - tokens at step `warm`) / (time between the two logs)."""
    recs = sorted((r for r in metrics if isinstance(r.get("num_tokens"), (int, float))
                   and isinstance(r.get("timestamp"), (int, float)) and not r.get("final")),
                  key=lambda r: r["step"])
    base = [r for r in recs if r["step"] <= warm]
    if not base or recs[-1]["step"] <= base[-1]["step"]:
        return {"tokens_per_s_steady": None, "measured_steps": 0, "measured_tokens": 0}
    b, e = base[-1], recs[-1]
    dt, dn = e["timestamp"] - b["timestamp"], e["num_tokens"] - b["num_tokens"]
    return {"tokens_per_s_steady": round(dn / dt, 1) if dt > 0 else None,
            "measured_steps": e["step"] - b["step"], "measured_tokens": int(dn)}


def read_metrics(output_dir: Path) -> list[dict]:
    """metrics.jsonl as tools.train writes it, read as training_status reads it."""
    from tools.runs import _read_metrics
    return _read_metrics(output_dir)


def measured(ctx: Ctx, check: str, st) -> dict[str, Any]:
    """The run's own figures: state, steps, tokens/s (training_status's and the steady one),
    peak memory, and what tools.train recorded (fp32 master weights, kernel fallbacks)."""
    summ = st.run_summary or {}
    rec = {"state": st.state, "error": st.error, "run_id": st.run_id, "steps": st.step,
           "tokens_per_s": st.tokens_per_second, "peak_alloc_gib": st.peak_memory_gib,
           "peak_reserved_gib": st.peak_reserved_gib,
           "fp32_master_params": summ.get("fp32_master_params"), "fallbacks": summ.get("fallbacks"),
           "trainable_params": summ.get("trainable_params"), "run_s": st.elapsed_s}
    if st.output_dir:
        rec.update(steady_rate(read_metrics(Path(st.output_dir)), ctx.warm))
    return rec


def estimate(ctx: Ctx, shape: str, method: str, cfg: dict, fallbacks: Optional[list] = None, *,
             num_gpus: int = 1, sharding: str = "none", spectrum_fraction: float = 0.3) -> dict[str, Any]:
    """estimate_memory for the run as it ran: the recipe's settings, with the kernels tools.train
    fell back from (flash-attention -> sdpa, liger off) as its summary says."""
    from tools.memory import estimate_memory
    fb = " ".join(fallbacks or [])
    attn = cfg.get("attn_implementation") or "sdpa"
    if "attn_implementation" in fb or attn not in ("sdpa", "flash_attention_2", "eager"):
        attn = "sdpa"
    liger = bool(cfg.get("use_liger_kernel")) and "use_liger_kernel" not in fb
    ckpt = cfg.get("activation_checkpointing", cfg.get("gradient_checkpointing", True))
    dtype = "bf16" if cfg.get("bf16") else ("fp16" if cfg.get("fp16") else "fp32")
    try:
        e = estimate_memory(
            ctx.models[shape], method=method, seq_len=int(cfg.get("max_length") or 1024),
            micro_batch=int(cfg.get("per_device_train_batch_size") or 8), gradient_checkpointing=bool(ckpt),
            packing=bool(cfg.get("packing")), optimizer=str(cfg.get("optim") or "adamw_torch_fused"),
            dtype=dtype, liger=liger, lora_r=int(cfg.get("lora_r", 16)),
            lora_target_modules=cfg.get("lora_target_modules") or "all-linear",
            modules_to_save=cfg.get("lora_modules_to_save") if method in ("lora", "qlora") else None,
            spectrum_fraction=spectrum_fraction, num_gpus=num_gpus, sharding=sharding,
            gpu=ctx.est_gpu if dtype != "fp32" else None, attn_implementation=attn,
            lora_dropout=float(cfg.get("lora_dropout", 0.05)), avg_tokens_per_row=ctx.avg_row_tokens or None)
    except Exception as exc:  # noqa: BLE001 - a failing estimate is a finding, not a crash
        return {"est_error": f"{type(exc).__name__}: {exc}"[:300]}
    return {"est_peak_alloc_gib": e.peak_allocated_gib, "est_peak_reserved_gib": e.peak_reserved_gib,
            "est_total_gib": e.total_gib, "est_tokens_per_s": e.throughput_tokens_per_s, "est_fits": e.fits,
            "est_for": f"{attn}, liger={liger}, ckpt={bool(ckpt)}, {dtype}, {num_gpus} GPU(s) {sharding}"}


def merge(ctx: Ctx, adapter_dir: str, name: str, shape: str = "1b") -> dict[str, Any]:
    """merge_adapter with its defaults (bf16 on a GPU, fp32 on CPU) and the device it used."""
    from tools.merge import merge_adapter
    m = merge_adapter(adapter_dir=adapter_dir, output_dir=f"merged/{name}", base_model=ctx.models[shape])
    ok = m.verified or m.qlora_adapter  # a QLoRA adapter merges into the 16-bit base: not bit-equal
    if m.verified and "merged" not in ctx.done:
        ctx.done["merged"] = {"path": f"merged/{name}"}
    return {"merge_ok": ok, "merge_verified": m.verified, "merge_device": m.device, "merge_dtype": m.dtype,
            "merge_max_abs_diff": m.logits_check.max_abs_diff, "merge_tolerance": m.logits_check.tolerance,
            "merge_s": m.elapsed_s}


def changed_fraction(base: Path, trained: Path) -> dict[str, Any]:
    """Share of the weights a full fine-tune changed: every tensor both folders' safetensors
    hold, compared in fp32 (the base is bf16 on a GPU; fp32 master weights save fp32), and the
    update's norm relative to the base's."""
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        names: dict[str, Path] = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as fh:
                names.update({k: f for k in fh.keys()})
        return names

    b, t = index(base), index(trained)
    common = sorted(set(b) & set(t))
    changed = total = 0
    num = den = 0.0
    dtypes = set()
    handles: dict[Path, Any] = {}
    try:
        for name in common:
            for f in (b[name], t[name]):
                if f not in handles:
                    handles[f] = safe_open(str(f), "pt").__enter__()
            x = handles[b[name]].get_tensor(name).float()
            y_raw = handles[t[name]].get_tensor(name)
            dtypes.add(str(y_raw.dtype).replace("torch.", ""))
            y = y_raw.float()
            if x.shape != y.shape:
                continue
            changed += int((x != y).sum())
            total += x.numel()
            num += float((y - x).double().pow(2).sum())
            den += float(x.double().pow(2).sum())
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    return {"changed_fraction": round(changed / total, 4) if total else None, "tensors_compared": len(common),
            "params_compared": total, "rel_update_norm": (num / den) ** 0.5 if den else None,
            "saved_dtypes": sorted(dtypes)}


def packing_leak(ctx: Ctx, attn: str = "sdpa", dtype: str = "float32", tol: float = 1e-4) -> dict[str, Any]:
    """Two sequences packed in one row (position_ids restart, no mask, no cache: padding-free
    training) give the logits each gives alone: the kernel lets neither see the other. `tol` is
    relative to the largest logit."""
    import torch
    from transformers import AutoModelForCausalLM
    dev = "cuda" if ctx.cuda else "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(ctx.ws / ctx.models["1b"]), dtype=getattr(torch, dtype),
                                                 attn_implementation=attn).to(dev).eval()
    a = torch.arange(5, 17, device=dev).unsqueeze(0)
    b = torch.arange(30, 39, device=dev).unsqueeze(0)
    with torch.no_grad():
        la, lb = model(a, use_cache=False).logits.float(), model(b, use_cache=False).logits.float()
        pos = torch.cat([torch.arange(a.shape[1]), torch.arange(b.shape[1])]).unsqueeze(0).to(dev)
        # with a cache, transformers does not look for packed sequences in position_ids
        lp = model(torch.cat([a, b], 1), position_ids=pos, use_cache=False).logits.float()
    diff = max(float((lp[:, :a.shape[1]] - la).abs().max()), float((lp[:, a.shape[1]:] - lb).abs().max()))
    scale = max(float(la.abs().max()), float(lb.abs().max()), 1e-6)
    used = model.config._attn_implementation
    del model
    if dev == "cuda":
        torch.cuda.empty_cache()
    return {"ok": diff / scale < tol, "max_abs_diff": diff, "rel_diff": diff / scale, "tolerance_rel": tol,
            "attn": used, "dtype": dtype, "device": dev}
