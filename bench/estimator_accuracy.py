"""Estimator accuracy: estimate_memory against measured peaks (torch.cuda.max_memory_allocated and
max_memory_reserved).

Run: HF_HUB_OFFLINE=1 .venv/bin/python bench/estimator_accuracy.py [runs.jsonl ...]
Default input: tests/fixtures/calibration/h100_sft_runs.jsonl (one H100 80GB, TRL 1.16).
Prints a markdown table: measured vs estimated peak allocated and peak reserved with their errors,
the estimated total (reserved + CUDA context) and the peak phase; then the worst errors.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools.memory import estimate_memory  # noqa: E402

SHAPES = {"llama-1b": "Llama-3.2-1B", "llama-3b": "Llama-3.2-3B", "llama-8b": "Llama-3.1-8B"}


def estimate(r: dict):
    """estimate_memory for one measured run, as it ran."""
    return estimate_memory(SHAPES.get(r["shape"], r["shape"]), method=r["method"], seq_len=r["seq"],
                           micro_batch=r["bs"], packing=r["packing"], liger=r["liger"],
                           gradient_checkpointing=r["gc"], optimizer="adamw_torch_fused",
                           attn_implementation=r.get("attn", "sdpa"),
                           spectrum_fraction=(r.get("top") or 30) / 100, gpu="H100",
                           # the calibration runs stepped AdamW on bf16 weights (no fp32 master
                           # copy); the product's full/Spectrum runs keep one and plan for it
                           fp32_master_weights=r.get("fp32_master_weights", False))


def _err(est: float, measured) -> float | None:
    return (est / measured - 1) if measured else None


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:+.1%}"


def main(paths: list[str]) -> int:
    rows = [json.loads(line) for p in paths for line in Path(p).read_text().splitlines() if line.strip()]
    print("| model | method | bs x seq | packing | liger | gc | allocated GiB (measured / est.) | error | "
          "reserved GiB (measured / est.) | error | est. total GiB | peak phase |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    worst = {"allocated": 0.0, "reserved": 0.0}
    for r in rows:
        e = estimate(r)
        ea, er = _err(e.peak_allocated_gib, r.get("peak_alloc_gib")), _err(e.peak_reserved_gib, r.get("peak_reserved_gib"))
        for k, v in (("allocated", ea), ("reserved", er)):
            worst[k] = max(worst[k], abs(v)) if v is not None else worst[k]
        print(f"| {r['shape']} | {r['method']} | {r['bs']} x {r['seq']} | {r['packing']} | {r['liger']} | {r['gc']} | "
              f"{r.get('peak_alloc_gib')} / {e.peak_allocated_gib:.2f} | {_pct(ea)} | "
              f"{r.get('peak_reserved_gib')} / {e.peak_reserved_gib:.2f} | {_pct(er)} | {e.total_gib:.2f} | "
              f"{e.peak_phase} |")
    print(f"\nrows: {len(rows)}, worst |error|: allocated {worst['allocated']:.1%}, reserved {worst['reserved']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or [str(ROOT / "tests/fixtures/calibration/h100_sft_runs.jsonl")]))
