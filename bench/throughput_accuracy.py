"""Throughput accuracy: the tokens/s model (tools/throughput.py) against measured runs.

Run: HF_HUB_OFFLINE=1 .venv/bin/python bench/throughput_accuracy.py [runs.jsonl ...] [--refit]
Default input: the 15 H100 runs in tests/fixtures/calibration (one H100 80GB, TRL 1.16; copies of
../shared/calibration). Prints a markdown table of measured vs estimated tokens/s per run with the
shipped constants (in-sample: they were fitted on these runs) and the leave-one-out estimate
(constants refitted on the other runs, then predicting this one: the honest figure), the worst of
each, and the constants refitted on all runs (--refit prints them as Python to paste).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools.memory import GPUS  # noqa: E402
from tools.models import catalog_facts  # noqa: E402
from tools import throughput as tp  # noqa: E402

SHAPES = {"llama-1b": "Llama-3.2-1B", "llama-3b": "Llama-3.2-3B", "llama-8b": "Llama-3.1-8B"}
GPU = GPUS["H100 80GB"]
# the runs' data (../shared/tools/sft_anchor.py): prompt U[150, 450) + completion U[80, 400) tokens
RUN_ROW_TOKENS = 539
FIXTURES = ROOT / "tests/fixtures/calibration"
DEFAULT_RUNS = [FIXTURES / "h100_sft_runs.jsonl", FIXTURES / "h100_sft_runs_more.jsonl"]


def load_runs(paths) -> list[dict]:
    return [json.loads(line) for p in paths for line in Path(p).read_text().splitlines() if line.strip()]


def measured(r: dict, c: tp.ThroughputConstants = tp.CONSTANTS) -> tp.Measured:
    """One run as the model sees it: its step's work on the H100, and what it measured."""
    f = catalog_facts(SHAPES.get(r["shape"], r["shape"]))
    w = tp.step_work(f, r["method"], r["seq"], r["bs"], r["gc"], r["packing"], r["attn"], r["trainable"],
                     7, RUN_ROW_TOKENS, (r.get("top") or 30) / 100, c)
    return tp.Measured(w, GPU.tflops_bf16, GPU.bandwidth_tbs, r["tokens_per_s"])


def errors(runs: list[dict]) -> tuple[list[float], list[float]]:
    """(in-sample error with the shipped constants, leave-one-out error) per run."""
    ms = [measured(r) for r in runs]
    ins = [tp.tokens_per_second(m.work, m.tflops_bf16, m.bandwidth_tbs) / m.tokens_per_s - 1 for m in ms]
    loo = []
    for k, m in enumerate(ms):
        c = tp.fit_constants([x for i, x in enumerate(ms) if i != k])
        loo.append(tp.tokens_per_second(m.work, m.tflops_bf16, m.bandwidth_tbs, c) / m.tokens_per_s - 1)
    return ins, loo


def main(argv: list[str]) -> int:
    paths = [a for a in argv if not a.startswith("--")] or DEFAULT_RUNS
    runs = load_runs(paths)
    ins, loo = errors(runs)
    print("| model | method | variant | bs x seq | attn | packing | liger | gc | measured tok/s | "
          "estimated | error | leave-one-out |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r, e, l in zip(runs, ins, loo):
        est = r["tokens_per_s"] * (1 + e)
        print(f"| {r['shape']} | {r['method']} | {r['variant']} | {r['bs']} x {r['seq']} | {r['attn']} | "
              f"{r['packing']} | {r['liger']} | {r['gc']} | {r['tokens_per_s']:,.0f} | {est:,.0f} | {e:+.0%} | {l:+.0%} |")
    print(f"\nrows: {len(runs)}; worst |error| with the shipped constants {max(map(abs, ins)):.0%}, "
          f"leave-one-out {max(map(abs, loo)):.0%}; within 20% leave-one-out: "
          f"{sum(abs(x) <= 0.2 for x in loo)} of {len(runs)}")
    print("constants refitted on all rows:", tp.fmt_constants(tp.fit_constants([measured(r) for r in runs])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
