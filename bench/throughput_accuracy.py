"""Throughput accuracy: recommend_method's tokens/s model against measured runs.

Run: HF_HUB_OFFLINE=1 .venv/bin/python bench/throughput_accuracy.py [runs.jsonl ...]
Default input: tests/fixtures/calibration/h100_sft_runs.jsonl (one H100 80GB, TRL 1.16; the 15
runs of ../shared/calibration are the wider check). Prints a markdown table of measured vs
estimated tokens/s per run and the worst error, and marks the runs the model is anchored on
(recommend.ANCHORS: their error is zero by construction and says nothing about accuracy).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools.memory import GPUS  # noqa: E402
from tools.models import get_model_facts  # noqa: E402
from tools.recommend import ANCHORS, _throughput  # noqa: E402

SHAPES = {"llama-1b": "Llama-3.2-1B", "llama-3b": "Llama-3.2-3B", "llama-8b": "Llama-3.1-8B"}


def _anchored(r: dict, name: str) -> bool:
    return (ANCHORS.get((name, r["method"])) == r["tokens_per_s"])


def main(paths: list[str]) -> int:
    rows = [json.loads(line) for p in paths for line in Path(p).read_text().splitlines() if line.strip()]
    tflops = GPUS["H100 80GB"].tflops_bf16
    print("| model | method | variant | bs x seq | attn | packing | liger | gc | measured tok/s | estimated | error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    worst, checked = 0.0, 0
    for r in rows:
        name = SHAPES.get(r["shape"], r["shape"])
        est = _throughput(get_model_facts(name), r["method"], r["seq"], r["bs"], r["gc"], tflops, 1, "none", False,
                          (r.get("top") or 30) / 100)
        err = est / r["tokens_per_s"] - 1
        anchor = _anchored(r, name)
        if not anchor:
            worst, checked = max(worst, abs(err)), checked + 1
        print(f"| {r['shape']} | {r['method']} | {r['variant']} | {r['bs']} x {r['seq']} | {r['attn']} | {r['packing']} | "
              f"{r['liger']} | {r['gc']} | {r['tokens_per_s']:,.0f} | {est:,.0f} | {err:+.0%}"
              f"{' (anchor)' if anchor else ''} |")
    print(f"\nrows: {len(rows)} ({len(rows) - checked} anchors), worst |error| on the others: {worst:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or [str(ROOT / "tests/fixtures/calibration/h100_sft_runs.jsonl")]))
