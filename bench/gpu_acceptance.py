"""GPU acceptance run: the real tools on random-init real shapes, one JSON line per check.

    bash bench/gpu_run.sh                                   # on the GPU machine: wheels, env, timeout
    python bench/gpu_acceptance.py --out results/           # on one H100/H200 (budget 420 s)
    python bench/gpu_acceptance.py --dry-run --out /tmp/a   # on CPU, tiny shapes, the same code path
    python bench/gpu_acceptance.py --list                   # the checks, in order, with their GPU seconds

Each check drives the product's own functions (generate_recipe -> verify_masking ->
launch_training -> training_status / stop_training -> merge_adapter -> evaluate, estimate_memory
for the prediction) in a fresh workspace and prints `{"check": ..., "ok": ..., ...}`: measured
tokens/s (training_status's, and the steady rate after the warm-up steps with the steps and tokens
it covers), peak allocated (tools.train's summary) and reserved memory (gpu_checks.PROBE_SOURCE: a
sitecustomize the runs load, measurement only) next to estimate_memory's figures for the run as it
ran (the kernels it fell back from included). Exit code 0 when every check that ran is ok.

Checks run most valuable first; `--budget-s` skips those whose estimated GPU seconds no longer fit
(reported as `"skipped": "budget"`). In the dry run (CPU) stop_resume trains for real (then merge
and evaluate run on its adapter) and the packing check runs; every other check runs its recipe
and launch path with launch_training(dry_run=True) for an H200 and reports
`"ran": "plan only (no CUDA)"`.

State (2026-12-02): every check is written; run on CPU only (no GPU was lent yet). Skipped with the
reason on the GPU machine as it is: zero3_one_process (deepspeed has no wheel: 0.19.8 is an sdist),
flash_attention (flash-attn has no wheel for torch 2.11/CUDA 13), evaluate (lm-eval and its
dependencies do not fit the 64 MiB the machine accepts).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from gpu_checks import (GIB, PLAN_ONLY, Ctx, base_overrides, build_shape, changed_fraction, estimate,  # noqa: E402
                        has, make_recipe, measured, merge, packing_leak, plan_record, read_metrics,
                        read_recipe, run, wait, write_data)

WS_MARK = ".gpu-acceptance-workspace"
OOM_LEAVE_GIB = 5  # GPU memory the OOM check leaves to its run: the 8B-width model loads, a step cannot
NO_LM_EVAL = ("lm-eval not importable: it is not on the GPU machine, and lm_eval 0.4.13's wheel (9 MB) "
              "with scikit-learn and scipy (~45 MB) and its other dependencies is over the 64 MiB that "
              "travels there")
NO_DEEPSPEED = "deepspeed not importable: deepspeed 0.19.8 is an sdist on PyPI (no wheel to ship)"
NO_FLASH = ("flash_attn not importable: flash-attn has no wheel for torch 2.11/CUDA 13; the runs fell back "
            "to sdpa (their fallbacks say so)")


# ---------------------------------------------------------------------------------- checks
def _slug(name: str) -> str:
    return name.replace(":", "_")


def check_train(ctx: Ctx, method: str, *, name: Optional[str] = None, shape: str = "1b",
                over: Optional[dict] = None, dataset: str = "data/train", real: Optional[bool] = None,
                require_memory_fit: bool = True) -> dict:
    """generate_recipe -> verify_masking -> launch_training -> training_status for one method:
    measured figures next to the estimate (plan-only without CUDA)."""
    name = name or f"train:{method}"
    real = ctx.real if real is None else real
    spectrum, fraction = None, 0.3
    if method == "spectrum":
        from tools.spectrum import spectrum_scan
        spectrum = spectrum_scan(ctx.models[shape], top_percent=30).output_path
    rec, cfg = make_recipe(ctx, _slug(name), shape, method, real=real, dataset=dataset, spectrum=spectrum,
                           overrides=base_overrides(ctx, **(over or {})))
    out = {"check": name, "method": rec.method, "shape": shape, "recipe": rec.recipe_path,
           "output_dir": f"out/{_slug(name)}", "recipe_fits": rec.fits,
           "attn_implementation": cfg.get("attn_implementation"), "use_liger_kernel": cfg.get("use_liger_kernel"),
           "bf16": cfg.get("bf16"), "dtype": cfg.get("dtype")}
    if not real:
        from tools.runs import launch_training
        launch = launch_training(rec.recipe_path, dry_run=True, require_memory_fit=require_memory_fit)
        out.update(plan_record(launch), ok=True)
        out.update(estimate(ctx, shape, rec.method, cfg, spectrum_fraction=fraction))
        return out
    _, st = run(ctx, name, rec.recipe_path, require_memory_fit=require_memory_fit)
    m = measured(ctx, name, st)
    out.update(m)
    out.update(estimate(ctx, shape, rec.method, cfg, m["fallbacks"], spectrum_fraction=fraction))
    out["ok"] = st.state == "completed"
    return out


def check_adapter(ctx: Ctx, method: str, shape: str = "1b", name: Optional[str] = None) -> dict:
    """A LoRA/QLoRA run, then merge_adapter on its adapter (on CUDA when there is one)."""
    name = name or f"train:{method}"
    if method == "qlora" and ctx.real and not has("bitsandbytes"):
        return {"check": name, "ok": True, "skipped": "bitsandbytes not importable"}
    r = check_train(ctx, method, name=name, shape=shape)
    if r.get("state") == "completed" and shape == "1b":
        r.update(merge(ctx, r["output_dir"], _slug(name), shape))
        r["ok"] = r["ok"] and r["merge_ok"]
    return r


def check_full_precision(ctx: Ctx) -> list[dict]:
    """train:full at lr 1e-5 in bf16, and on it the precision check: >= 90% of the trained
    weights changed (saved weights against the base) and fp32 master weights reported."""
    r = check_train(ctx, "full", over={"learning_rate": 1e-5})
    p = {"check": "bf16_precision_on_cuda", "learning_rate": 1e-5, "bf16": r.get("bf16"), "dtype": r.get("dtype")}
    if not ctx.real:
        p.update(ok=True, ran=PLAN_ONLY, note="the train:full recipe (bf16 on the H200) is the run it checks")
    elif r.get("state") != "completed":
        p.update(ok=False, error=f"train:full did not complete ({r.get('state')})")
    else:
        ch = changed_fraction(ctx.ws / ctx.models["1b"], ctx.ws / r["output_dir"])
        fp32 = r.get("fp32_master_params") or 0
        # fp32 master weights are the point in bf16; a CPU run (--cpu-real) trains fp32 weights
        p.update(ch, steps=r.get("steps"), fp32_master_params=fp32,
                 ok=bool(ch["changed_fraction"] is not None and ch["changed_fraction"] >= 0.9
                         and (fp32 > 0 or not r.get("bf16"))))
    return [r, p]


def check_oom(ctx: Ctx) -> dict:
    """A run that must run out of memory, and must end within 60 s of it with the real exception
    in training_status and the overrides to relaunch with. The recipe fits the H200 (8B width,
    micro-batch 16 x 2048 tokens, no checkpointing: the launch gates pass), but this process holds
    all of the GPU's memory except 5 GiB while it runs, as another job on the GPU would: the model
    (3 GiB) loads, the first forward (8 GiB of logits alone) cannot. (A recipe the estimate says
    cannot fit is refused by launch_training even with require_memory_fit=false: validate_recipe
    calls it invalid, see docs/benchmarks.md.)"""
    over = {"max_steps": 3, "activation_checkpointing": False}
    over.update({"per_device_train_batch_size": 16, "max_length": 2048} if ctx.cuda else {})
    if not ctx.cuda:  # no GPU memory to hold: the recipe and launch path only (or a CPU run)
        r = check_train(ctx, "lora", name="oom_fails_fast", shape="8b", over=over)
        return {**r, "note": "the OOM itself needs CUDA"} if ctx.real else r
    import torch
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    hog = None
    for extra in range(6):  # one large block; a little less if the allocator cannot place it
        try:
            hog = torch.empty(max(0, free - (OOM_LEAVE_GIB + extra) * GIB), dtype=torch.uint8, device="cuda")
            break
        except torch.OutOfMemoryError:
            continue
    left = round((free - (hog.numel() if hog is not None else 0)) / GIB, 1)
    try:
        r = check_train(ctx, "lora", name="oom_fails_fast", shape="8b", over=over)
    finally:
        del hog
        torch.cuda.empty_cache()
    r.update(gpu_free_gib_during_run=left, gpu_total_gib=round(total / GIB, 1))
    if not r.get("run_id"):
        return {**r, "ok": False}
    from tools.runs import training_status
    st = training_status(r["run_id"], plot=False, log_lines=0)
    t_fail = (st.run_summary or {}).get("ended")
    t_end = _epoch(st.ended)
    lag = round(t_end - float(t_fail), 1) if t_fail and t_end else None
    oom = "OutOfMemoryError" in (st.error or "")
    r.update(oom_error=oom, exit_after_oom_s=lag, suggested_overrides=st.suggested_overrides,
             next_steps=st.next_steps[:1],
             ok=st.state == "failed" and oom and bool(st.suggested_overrides) and lag is not None and lag <= 60)
    return r


def _epoch(iso: Optional[str]) -> Optional[float]:
    from datetime import datetime
    try:
        return datetime.fromisoformat(iso).timestamp() if iso else None
    except ValueError:
        return None


def check_stop_resume(ctx: Ctx) -> dict:
    """Launch, stop_training after a few steps (checkpoint), relaunch the same recipe: it resumes
    from that checkpoint and the step count continues. Trains on CPU too (then merge runs on
    its adapter, for the dry run's merge and evaluate)."""
    from tools.runs import launch_training, stop_training
    stop_at, extra = (8, 10) if ctx.cuda else (2, 3)
    rec, _ = make_recipe(ctx, "stop_resume", "1b", "lora", real=True,
                         overrides=base_overrides(ctx, max_steps=2000 if ctx.cuda else 400))
    first = launch_training(rec.recipe_path)
    st = wait(ctx, first.run_id, until_step=stop_at, poll_s=0.2)
    out = {"check": "stop_resume", "first_run": first.run_id, "stop_requested_at_step": st.step}
    if st.state != "running":
        return {**out, "ok": False, "error": f"the run was {st.state} before the stop ({st.error})"}
    stop = stop_training(first.run_id, timeout_s=60)
    ck = stop.last_checkpoint
    out.update(stopped=stop.state, killed=stop.killed, stop_waited_s=stop.waited_s,
               checkpoint=Path(ck).name if ck else None)
    if stop.state != "stopped" or not ck:
        return {**out, "ok": False, "error": stop.message}
    ck_step = int(Path(ck).name.split("-")[1])
    second, st2 = run(ctx, "stop_resume", rec.recipe_path, overrides={"max_steps": ck_step + extra})
    steps = [r["step"] for r in read_metrics(ctx.ws / "out" / "stop_resume") if "loss" in r]
    facts = {"resumed_from_checkpoint": bool(second.resumes_from) and Path(second.resumes_from).name == Path(ck).name,
             "continues_run": st2.continues_run == first.run_id, "final_step": st2.step == ck_step + extra,
             "steps_continue": steps == list(range(1, ck_step + extra + 1))}
    out.update(facts, second_run=second.run_id, state=st2.state, error=st2.error, steps=st2.step,
               logged_steps=f"{steps[:1]}..{steps[-1:]} ({len(steps)})",
               ok=st2.state == "completed" and all(facts.values()))
    out.update({k: v for k, v in measured(ctx, "stop_resume", st2).items()
                if k in ("tokens_per_s_steady", "measured_steps", "peak_alloc_gib", "peak_reserved_gib")})
    if "merged" not in ctx.done and out["ok"]:  # the dry run's one adapter: merge and evaluate use it
        out.update(merge(ctx, "out/stop_resume", "stop_resume"))
        out["ok"] = out["merge_ok"]
    return out


def check_evaluate(ctx: Ctx) -> dict:
    """evaluate on the first verified merged model (or train:full's model), with its device."""
    if not has("lm_eval"):
        return {"check": "evaluate", "ok": True, "skipped": NO_LM_EVAL}
    model = (ctx.done.get("merged") or {}).get("path")
    if model is None and (ctx.done.get("train:full") or {}).get("state") == "completed":
        model = "out/train_full"
    if model is None:
        return {"check": "evaluate", "ok": True, "skipped": "no trained model to evaluate (merge/full did not run)"}
    from tools.evaluate import evaluate
    r = evaluate(model=model, local_task="data/eval.jsonl", limit=4, max_gen_toks=4, batch_size=4,
                 output_dir=f"evals/{Path(model).name}")
    m = r.runs[0].metrics[0]
    return {"check": "evaluate", "model": model, "device": r.settings.get("device"), "dtype": r.settings.get("dtype"),
            "eval_metric": m.metric, "eval_value": m.value, "eval_n": m.n, "eval_s": r.elapsed_s, "ok": m.n == 4}


def check_sharded(ctx: Ctx, sharding: str) -> dict:
    """A full fine-tune with generate_recipe's FSDP2 or ZeRO-3 accelerate config (a 2-GPU plan
    with that sharding), launched with num_processes=1 on this GPU."""
    from tools.recommend import recommend_method
    from tools.runs import launch_training
    name = "fsdp2_one_process" if sharding == "fsdp" else "zero3_one_process"
    p = recommend_method(ctx.models["1b"], gpu="H200", num_gpus=2, allow_methods=["full"], seq_len=ctx.seq,
                         dataset_rows=64)
    plan = {**p.model_dump(), "sharding": sharding, "cpu_offload": False}
    real = ctx.cuda and (sharding == "fsdp" or has("deepspeed"))
    rec, cfg = make_recipe(ctx, name, "1b", "full", real=real, plan=plan, overrides=base_overrides(ctx))
    acc = rec.accelerate_config_path
    out = {"check": name, "recipe": rec.recipe_path, "accelerate_config": acc,
           "distributed_type": read_recipe(ctx, acc).get("distributed_type")}
    est = estimate(ctx, "1b", "full", cfg, sharding=sharding)  # one GPU: nothing split, wrapper costs kept
    if not real:
        try:
            out.update(plan_record(launch_training(rec.recipe_path, accelerate_config=acc, num_processes=1,
                                                   dry_run=True)))
            out["ok"] = True
        except Exception as exc:  # noqa: BLE001 - refused at launch: a finding
            out.update(ok=False, plan_error=f"{type(exc).__name__}: {exc}"[:500])
        if sharding == "zero3" and ctx.cuda:
            out.update(ok=True, skipped=NO_DEEPSPEED)
        return {**out, **est}
    _, st = run(ctx, name, rec.recipe_path, accelerate_config=acc, num_processes=1)
    m = measured(ctx, name, st)
    return {**out, **m, **est, "ok": st.state == "completed"}


def check_liger(ctx: Ctx) -> dict:
    """train:lora again with use_liger_kernel flipped (the recipe turns it on where liger and
    CUDA are present): tokens/s and memory with and without it; a fallback is a failure."""
    base = ctx.done.get("train:lora")
    if base is None:  # not run in this call (a rerun of some checks): the recipe's default run first
        base = check_train(ctx, "lora", name="liger:baseline")
    if ctx.real and base.get("state") != "completed":
        return {"check": "liger", "ok": True, "skipped": "the lora run to compare with did not complete"}
    flip = not bool(base.get("use_liger_kernel"))
    r = check_train(ctx, "lora", name="liger", over={"use_liger_kernel": flip})
    on, off = (r, base) if flip else (base, r)
    keys = ("run_id", "state", "tokens_per_s_steady", "tokens_per_s", "peak_alloc_gib", "peak_reserved_gib",
            "est_tokens_per_s", "est_peak_alloc_gib", "fallbacks", "ran")
    out = {"check": "liger", "liger_on": {k: on.get(k) for k in keys if k in on},
           "liger_off": {k: off.get(k) for k in keys if k in off}, "ok": r["ok"]}
    if not ctx.real:
        return {**out, "ran": PLAN_ONLY}
    fell_back = [f for f in (on.get("fallbacks") or []) if "liger" in f]
    out["liger_fallback"] = fell_back or None
    if on.get("tokens_per_s_steady") and off.get("tokens_per_s_steady"):
        out["tokens_per_s_ratio_on_off"] = round(on["tokens_per_s_steady"] / off["tokens_per_s_steady"], 3)
    for k in ("peak_alloc_gib", "peak_reserved_gib"):
        if on.get(k) is not None and off.get(k) is not None:
            out[f"{k}_saved"] = round(off[k] - on[k], 3)
    out["ok"] = bool(r["ok"] and not fell_back)
    return out


def check_packing(ctx: Ctx) -> dict:
    # a leak changes the logits by O(1); 1e-3 leaves room for TF32 or another SDPA kernel on CUDA
    return {"check": "packing:no_cross_sequence_leak", **packing_leak(ctx, "sdpa", "float32", 1e-3)}


def check_flash(ctx: Ctx) -> dict:
    """With flash-attn importable: packed-vs-separate logits agree under flash_attention_2 (bf16),
    and train:lora ran with it (no attention fallback)."""
    if not ctx.cuda:
        return {"check": "flash_attention", "ok": True, "skipped": "needs CUDA",
                "recipe_attn": (ctx.done.get("train:lora") or {}).get("attn_implementation")}
    if not has("flash_attn"):
        return {"check": "flash_attention", "ok": True, "skipped": NO_FLASH}
    r = {"check": "flash_attention", **packing_leak(ctx, "flash_attention_2", "bfloat16", 2e-2)}
    fb = (ctx.done.get("train:lora") or {}).get("fallbacks")
    r["train_lora_attention_fallback"] = [f for f in fb or [] if "attn" in f] or None
    r["ok"] = r["ok"] and not r["train_lora_attention_fallback"]
    return r


@dataclass
class Check:
    name: str
    fn: Callable[[Ctx], object]
    gpu_s: int                 # estimated seconds on an H200 (launch ~20 s: python, torch, TRL, load)
    shapes: tuple = ("1b",)


# Most valuable first: the default paths, precision and failure handling, then the 8B width,
# sharding and kernels. gpu_s: a 1B-width run is ~25 s (python + torch + TRL imports, load, data
# preparation ~15-20 s; 25 steps ~3-10 s on the H100 calibration's step times; save), a merge ~10 s.
CHECKS = [
    Check("packing:no_cross_sequence_leak", check_packing, 8),
    Check("train:lora", lambda c: check_adapter(c, "lora"), 35),
    Check("train:qlora", lambda c: check_adapter(c, "qlora"), 40),
    Check("train:full", check_full_precision, 35),
    Check("oom_fails_fast", check_oom, 30, ("8b",)),
    Check("stop_resume", check_stop_resume, 50),
    Check("evaluate", check_evaluate, 20),           # 0 where lm-eval is missing (the GPU machine)
    Check("8b_shape:lora", lambda c: check_adapter(c, "lora", "8b", "8b_shape:lora"), 30, ("8b",)),
    Check("8b_shape:qlora", lambda c: check_adapter(c, "qlora", "8b", "8b_shape:qlora"), 35, ("8b",)),
    Check("fsdp2_one_process", lambda c: check_sharded(c, "fsdp"), 35),
    Check("liger", check_liger, 25),
    Check("train:spectrum", lambda c: check_train(c, "spectrum"), 30),
    Check("zero3_one_process", lambda c: check_sharded(c, "zero3"), 40),  # 0 without deepspeed
    Check("flash_attention", check_flash, 10),       # 0 without flash-attn
]
# what the GPU machine as shipped skips in no time (no lm-eval, deepspeed, flash-attn wheels)
INSTANT_THERE = ("evaluate", "zero3_one_process", "flash_attention")
SETUP_GPU_S = 45  # wheels are installed by gpu_run.sh; imports, two models built on the GPU, data


def run_checks(ctx: Ctx, checks: list[Check], budget_s: Optional[float], emit: Callable[[dict], dict],
               t0: float, clock: Callable[[], float] = time.time) -> list[dict]:
    """Each check in order, one JSON line each; a check whose estimate no longer fits the budget
    is skipped (`"skipped": "budget"`); one that raises is a failed line, the others still run."""
    results = []
    for c in checks:
        spent = clock() - t0
        if budget_s is not None and ctx.cuda and spent + c.gpu_s > budget_s:
            results.append(emit({"check": c.name, "ok": True, "skipped": "budget",
                                 "spent_s": round(spent, 1), "est_s": c.gpu_s, "budget_s": budget_s}))
            continue
        t = clock()
        try:
            recs = c.fn(ctx)
        except Exception as exc:  # noqa: BLE001 - one failing check must not hide the others
            recs = {"check": c.name, "ok": False, "error": f"{type(exc).__name__}: {str(exc)[:800]}"}
        for r in recs if isinstance(recs, list) else [recs]:
            r.setdefault("seconds", round(clock() - t, 1))
            ctx.done[r["check"]] = r
            results.append(emit(r))
    return results


# ------------------------------------------------------------------------------------ main
def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, same code path")
    ap.add_argument("--out", default="acceptance-out", help="folder for acceptance.jsonl (and run_logs.txt)")
    ap.add_argument("--ws", default=None, help="the workspace (default OUT/ws); emptied first")
    ap.add_argument("--checks", nargs="*", default=None, metavar="NAME",
                    help="run only these (names as --list shows them), e.g. for a rerun")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="GPU: skip checks whose estimate no longer fits (seconds from the start); 0: none")
    ap.add_argument("--steps", type=int, default=None, help="max_steps of a measured run (GPU 25, dry run 3)")
    ap.add_argument("--list", action="store_true", help="print the checks and their GPU seconds, run nothing")
    ap.add_argument("--cpu-real", action="store_true",
                    help="with --dry-run: train every check that can on CPU (the GPU code paths; slow, development)")
    return ap.parse_args(argv)


def _versions() -> dict:
    from importlib import metadata
    out = {}
    for d in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "liger-kernel",
              "flash-attn", "deepspeed", "lm_eval", "pydantic"):
        try:
            out[d] = metadata.version(d)
        except metadata.PackageNotFoundError:
            out[d] = None
    return out


def _workspace(path: Path) -> Path:
    """A fresh workspace: emptied only when it is one this script made (or empty)."""
    if path.exists() and any(path.iterdir()):
        if not (path / WS_MARK).exists():
            raise SystemExit(f"{path} is not empty and not an acceptance workspace: pass another --ws")
        _stop_leftover_runs(path)
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / WS_MARK).write_text("made by bench/gpu_acceptance.py; emptied by its next run\n")
    return path


def _stop_leftover_runs(path: Path) -> None:
    """Runs an earlier, interrupted acceptance run left going (their own process groups) would
    keep writing into the new workspace's folders and hold the GPU: stop_training them first."""
    from tools.run_registry import active_runs
    from tools.runs import stop_training
    from tools.workspace import set_workspace
    set_workspace(path)
    for r in active_runs():
        print(f"stopping {r['run_id']}, left by an earlier run: "
              f"{stop_training(r['run_id'], timeout_s=15).message}", file=sys.stderr)


def _setup(a, out: Path, checks: list[Check]) -> Ctx:
    import torch

    from tools.workspace import set_workspace
    cuda = torch.cuda.is_available()
    ws = _workspace(Path(a.ws).resolve() if a.ws else out / "ws")
    set_workspace(ws)
    steps = a.steps or (3 if a.dry_run else 25)
    ctx = Ctx(out=out, ws=ws, dry=a.dry_run, cuda=cuda, gpu_name=torch.cuda.get_device_name(0) if cuda else None,
              seq=64 if a.dry_run else 1024, micro_batch=4, steps=steps, warm=1 if a.dry_run else 5,
              run_timeout_s=300 if a.dry_run else 150, real=cuda or a.cpu_real)
    shapes = {s for c in checks for s in c.shapes} | {"1b"}
    for s in sorted(shapes):
        real = s if cuda else {"1b": "tiny", "8b": "tiny8b"}[s]
        ctx.models[s] = f"models/{real}"
        build_shape(ws / "models" / real, real, "cuda" if cuda else "cpu")
    ctx.avg_row_tokens = write_data(ws, dry=not cuda)
    return ctx


def main(argv=None) -> int:
    a = _args(argv)
    if a.list:
        for c in CHECKS:
            print(f"{c.name:34s} ~{c.gpu_s:3d} s on the GPU")
        there = SETUP_GPU_S + sum(c.gpu_s for c in CHECKS if c.name not in INSTANT_THERE)
        print(f"{'(setup)':34s} ~{SETUP_GPU_S:3d} s; total ~{SETUP_GPU_S + sum(c.gpu_s for c in CHECKS)} s, "
              f"~{there} s without lm-eval, deepspeed and flash-attn")
        return 0
    t0 = time.time()
    if a.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, also on a GPU machine (a smoke test there)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    if not a.dry_run and not torch.cuda.is_available():
        print("no CUDA GPU here: use --dry-run", file=sys.stderr)
        return 2
    names = {c.name for c in CHECKS}
    unknown = sorted(set(a.checks or []) - names)
    if unknown:
        print(f"unknown check(s) {unknown}; --list shows them", file=sys.stderr)
        return 2
    checks = [c for c in CHECKS if not a.checks or c.name in a.checks]
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "acceptance.jsonl"
    jsonl.write_text("")

    def emit(rec: dict) -> dict:
        line = json.dumps(rec, default=str)
        print(line, flush=True)
        with open(jsonl, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
        return rec

    ctx = _setup(a, out, checks)
    results = [emit({"check": "setup", "ok": True, "shape": "1b/8b" if ctx.cuda else "tiny stand-ins",
                     "cuda": ctx.cuda, "gpu": ctx.gpu_name, "date": time.strftime("%Y-%m-%d"),
                     "versions": _versions(), "models": ctx.models, "seconds": round(time.time() - t0, 1)})]
    results += run_checks(ctx, checks, a.budget_s or None, emit, t0)
    if ctx.run_logs:
        (out / "run_logs.txt").write_text("\n\n".join(ctx.run_logs) + "\n", encoding="utf-8")
    bad = [r["check"] for r in results if not r.get("ok")]
    skipped = [r["check"] for r in results if r.get("skipped")]
    print(json.dumps({"summary": "ok" if not bad else "failed", "failed": bad, "skipped": skipped,
                      "seconds": round(time.time() - t0, 1)}), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
