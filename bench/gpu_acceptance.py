"""GPU acceptance run: the real tools on random-init real shapes, one JSON line per check.

    python bench/gpu_acceptance.py --out results/          # on one H100/H200 (<= ~9 minutes)
    python bench/gpu_acceptance.py --dry-run --out /tmp/a  # on CPU, tiny shapes, the same code path

Each check drives the product's own functions (generate_recipe -> verify_masking ->
launch_training -> training_status -> merge_adapter -> evaluate) in a fresh workspace and prints
`{"check": ..., "ok": ..., ...}` with measured tokens/s and peak memory next to the estimator's
prediction. Exit code 0 when every check that ran is ok. Checks that need CUDA report
`"skipped": "needs CUDA"` in a dry run.

State of this script (2026-12-01): written and run on CPU only (no GPU was lent). Not yet in it:
the 8B shape, FSDP2 and ZeRO-3 on one process, liger, flash-attention and the OOM case; they are
listed as skipped with the reason so the GPU run shows what is missing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# the real shape (layers cut to fit the time budget) and the dry-run stand-in
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, heads=32, kv_heads=8, layers=4),
    "tiny": dict(hidden_size=64, intermediate_size=256, heads=4, kv_heads=2, layers=2),
}
METHODS = ("lora", "qlora", "spectrum", "full")
WS = Path(".")  # the acceptance workspace, set in main()


def emit(out: Path, rec: dict) -> dict:
    line = json.dumps(rec, default=str)
    print(line, flush=True)
    with open(out / "acceptance.jsonl", "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
    return rec


def _setup(ws: Path, shape: str) -> None:
    from tools.tiny import build_tiny_model
    from tools.workspace import set_workspace
    ws.mkdir(parents=True, exist_ok=True)
    set_workspace(ws)
    s = SHAPES[shape]
    build_tiny_model(ws / "models" / "base", hidden_size=s["hidden_size"], layers=s["layers"], heads=s["heads"],
                     kv_heads=s["kv_heads"], intermediate_size=s["intermediate_size"])
    d = ws / "data" / "arith"
    d.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": [{"role": "user", "content": f"What is {i}+{i}?"}],
             "completion": [{"role": "assistant", "content": str(2 * i)}]} for i in range(64)]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (ws / "data" / "eval.jsonl").write_text("".join(
        json.dumps({"question": f"What is {i}+{i}?", "answer": str(2 * i)}) + "\n" for i in range(8)))


def _wait(run_id: str, timeout: float) -> dict:
    from tools.runs import training_status
    t0 = time.time()
    while True:
        s = training_status(run_id, plot=False)
        if s.state not in ("queued", "running"):
            return s.model_dump()
        if time.time() - t0 > timeout:
            return {**s.model_dump(), "state": "timeout"}
        time.sleep(2)


def check_method(method: str, dry: bool, steps: int) -> dict:
    """generate -> masking -> launch -> status (-> merge) -> evaluate for one method."""
    from tools.masking import verify_masking
    from tools.recipes import generate_recipe
    from tools.runs import launch_training
    from tools.spectrum import spectrum_scan
    t0 = time.time()
    over = {"max_steps": steps, "save_strategy": "no", "logging_steps": 1, "report_to": "none",
            "max_length": 64, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1}
    if method == "qlora":
        over.update(load_in_4bit=True, use_peft=True, bnb_4bit_quant_type="nf4")
    kw = {}
    if method == "spectrum":
        kw["spectrum_config"] = spectrum_scan("models/base", top_percent=50).output_path
    rec = generate_recipe("models/base", "data/arith", method="lora" if method == "qlora" else method,
                          output_path=f"recipes/{method}.yaml", output_dir=f"out/{method}", seq_len=64,
                          overrides=over, test_split=False, **kw)
    import yaml
    cfg = yaml.safe_load((WS / rec.recipe_path).read_text())
    rep = verify_masking("data/arith", "models/base", max_length=cfg.get("max_length"),
                         packing=bool(cfg.get("packing")), completion_only_loss=cfg.get("completion_only_loss"),
                         assistant_only_loss=bool(cfg.get("assistant_only_loss")))
    launch = launch_training(rec.recipe_path, require_memory_fit=not dry)
    st = _wait(launch.run_id, timeout=400)
    res = {"check": f"train:{method}", "ok": st["state"] == "completed", "state": st["state"],
           "error": st.get("error"), "masking": rep.verdict, "steps": st.get("step"),
           "tokens_per_s": st.get("tokens_per_second"), "peak_alloc_gib": st.get("peak_memory_gib"),
           "est_peak_alloc_gib": rec.memory.peak_allocated_gib if rec.memory else None,
           "est_total_gib": rec.memory.total_gib if rec.memory else None,
           "est_reserved_gib": getattr(rec.memory, "peak_reserved_gib", None) if rec.memory else None,
           "fp32_master_params": (st.get("run_summary") or {}).get("fp32_master_params"),
           "fallbacks": (st.get("run_summary") or {}).get("fallbacks"), "seconds": round(time.time() - t0, 1)}
    if res["ok"] and method in ("lora", "qlora"):
        res.update(_merge_and_eval(method))
    elif res["ok"]:
        res.update(_eval(f"out/{method}"))
    if rec.memory is None:
        res["est_note"] = "no estimate (CPU target)"
    return res


def _merge_and_eval(method: str) -> dict:
    from tools.merge import merge_adapter
    m = merge_adapter(adapter_dir=f"out/{method}", output_dir=f"merged/{method}", dtype="fp32",
                      base_model="models/base")
    out = {"merge_verified": m.verified, "merge_max_abs_diff": m.logits_check.max_abs_diff}
    out.update(_eval(f"merged/{method}"))
    out["ok_merge"] = m.verified or m.qlora_adapter  # a QLoRA adapter merges into the 16-bit base
    return out


def _eval(model: str) -> dict:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return {"eval": "skipped: lm-eval not installed"}
    from tools.evaluate import evaluate
    r = evaluate(model=model, local_task="data/eval.jsonl", limit=4, max_gen_toks=4, batch_size=4,
                 output_dir=f"evals/{Path(model).name}")
    m = r.runs[0].metrics[0]
    return {"eval_metric": m.metric, "eval_value": m.value, "eval_n": m.n}


def check_packing_no_leak() -> dict:
    """Two sequences packed in one row (position_ids restart) give the same logits as each alone:
    the attention kernel does not let one sequence see the other."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(WS / "models" / "base"), dtype=torch.float32).eval()
    a, b = torch.arange(5, 17).unsqueeze(0), torch.arange(30, 39).unsqueeze(0)
    with torch.no_grad():
        la, lb = model(a, use_cache=False).logits, model(b, use_cache=False).logits
        packed = torch.cat([a, b], 1)
        pos = torch.cat([torch.arange(a.shape[1]), torch.arange(b.shape[1])]).unsqueeze(0)
        # as in padding-free training: no attention mask, no cache (with a cache, transformers does
        # not look for packed sequences in position_ids, and the two would see each other)
        lp = model(packed, position_ids=pos, use_cache=False).logits
    diff = max(float((lp[:, :a.shape[1]] - la).abs().max()), float((lp[:, a.shape[1]:] - lb).abs().max()))
    return {"check": "packing:no_cross_sequence_leak", "ok": diff < 1e-4, "max_abs_diff": diff,
            "attn": model.config._attn_implementation}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, same code path")
    ap.add_argument("--out", default="acceptance-out", help="folder for the workspace and acceptance.jsonl")
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    ap.add_argument("--steps", type=int, default=None)
    a = ap.parse_args()
    import torch
    cuda = torch.cuda.is_available()
    if not a.dry_run and not cuda:
        print("no CUDA GPU here: use --dry-run", file=sys.stderr)
        return 2
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "acceptance.jsonl").write_text("")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    shape = "tiny" if a.dry_run else "1b"
    global WS
    WS = out / "ws"
    _setup(WS, shape)
    steps = a.steps or (3 if a.dry_run else 30)
    results = [emit(out, {"check": "setup", "ok": True, "shape": shape, "cuda": cuda,
                          "gpu": torch.cuda.get_device_name(0) if cuda else None, "date": time.strftime("%Y-%m-%d")})]
    for method in a.methods:
        if method == "qlora" and a.dry_run and os.environ.get("LLM_FT_ACCEPT_QLORA_CPU") != "1":
            results.append(emit(out, {"check": "train:qlora", "ok": True,
                                      "skipped": "4-bit on CPU is slow; set LLM_FT_ACCEPT_QLORA_CPU=1"}))
            continue
        try:
            results.append(emit(out, check_method(method, a.dry_run, steps)))
        except Exception as exc:  # noqa: BLE001 - one failing check must not hide the others
            results.append(emit(out, {"check": f"train:{method}", "ok": False,
                                      "error": f"{type(exc).__name__}: {str(exc)[:500]}"}))
    results.append(emit(out, check_packing_no_leak()))
    for name in ("8b_shape", "fsdp2_one_process", "zero3_one_process", "liger", "flash_attention", "oom_fails_fast",
                 "bf16_precision_on_cuda"):
        results.append(emit(out, {"check": name, "ok": True,
                                  "skipped": "needs CUDA" if not cuda else "not written yet (see the docstring)"}))
    bad = [r["check"] for r in results if not r.get("ok")]
    print(json.dumps({"summary": "ok" if not bad else "failed", "failed": bad}), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
