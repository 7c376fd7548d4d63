"""Benchmark convert_dataset on 200,000 Orca-Math-like question/answer rows.

Generates a JSONL file (in a temp dir) of synthetic word problems shaped like
microsoft/orca-math-word-problems-200k (a `question` of ~250 characters and a worked `answer`
of ~700 characters, 1% exact duplicates), then times one convert_dataset call to conversational
prompt/completion with the Orca-Math system prompt, a 5% test split and exact dedupe, and prints
a markdown table row: rows, input MB, output MB, wall and CPU seconds, rows/s, peak RSS
(ru_maxrss of the whole process, generation included).

    python bench/convert_bench.py [--rows 200000] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ORCA_SYSTEM = """Solve the given high school math problem by providing a clear explanation of each step leading to the final solution.

Provide a detailed breakdown of your calculations, beginning with an explanation of the problem and describing how you derive each formula, value, or conclusion. Use logical steps that build upon one another, to arrive at the final answer in a systematic manner.

# Steps

1. **Understand the Problem**: Restate the given math problem and clearly identify the main question and any important given values.
2. **Set Up**: Identify the key formulas or concepts that could help solve the problem (e.g., algebraic manipulation, geometry formulas, trigonometric identities).
3. **Solve Step-by-Step**: Iteratively progress through each step of the math problem, justifying why each consecutive operation brings you closer to the solution.
4. **Double Check**: If applicable, double check the work for accuracy and sense, and mention potential alternative approaches if any.
5. **Final Answer**: Provide the numerical or algebraic solution clearly, accompanied by appropriate units if relevant.

# Notes

- Always clearly define any variable or term used.
- Wherever applicable, include unit conversions or context to explain why each formula or step has been chosen.
- Assume the level of mathematics is suitable for high school, and avoid overly advanced math techniques unless they are common at that level.
"""

NAMES = ["Jungkook", "Yoongi", "Yuna", "Hoseok", "Seokjin", "Taehyung", "Jimin", "Eunji", "Minyoung"]
ITEMS = ["apples", "marbles", "books", "pencils", "stickers", "cookies", "balloons", "coins"]


def make_row(rnd: random.Random, i: int) -> dict:
    a, b, c = rnd.randint(2, 999), rnd.randint(2, 99), rnd.randint(2, 9)
    n1, n2 = rnd.sample(NAMES, 2)
    item = rnd.choice(ITEMS)
    q = (f"{n1} has {a} {item}. {n2} gives {n1} {b} more {item}, and then {n1} shares the {item} "
         f"equally among {c} friends, keeping whatever is left over. How many {item} does each "
         f"friend get, and how many {item} does {n1} keep? (problem {i})")
    total = a + b
    each, left = divmod(total, c)
    ans = (f"First, let's find out how many {item} {n1} has after receiving {b} more from {n2}. "
           f"{n1} originally has {a} {item}, so after receiving {b} more, {n1} has:\n\n"
           f"{a} + {b} = {total} {item}\n\n"
           f"Next, {n1} shares these {total} {item} equally among {c} friends. To find out how many "
           f"each friend gets, we divide the total number of {item} by the number of friends:\n\n"
           f"{total} ÷ {c} = {each} with a remainder of {left}\n\n"
           f"This means each friend gets {each} {item}, and the remainder is what {n1} keeps. "
           f"We can double check: {each} × {c} + {left} = {each * c + left}, which matches the "
           f"total of {total}.\n\nSo, each friend gets {each} {item}, and {n1} keeps {left} {item}.")
    return {"question": q, "answer": ans}


def generate(path: Path, rows: int, seed: int = 0) -> None:
    rnd = random.Random(seed)
    recent: list[dict] = []
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            if recent and rnd.random() < 0.01:       # ~1% exact duplicates
                row = rnd.choice(recent)
            else:
                row = make_row(rnd, i)
                recent = (recent + [row])[-100:]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--keep", help="use this directory instead of a temp dir (kept afterwards)")
    args = ap.parse_args()

    from tools.data import convert_dataset
    from tools.workspace import set_workspace

    tmp = tempfile.TemporaryDirectory(prefix="convert_bench_") if not args.keep else None
    root = Path(args.keep or tmp.name)
    ws = set_workspace(root)
    src = ws.root / "orca_like.jsonl"
    t = time.perf_counter()
    generate(src, args.rows)
    gen_s = time.perf_counter() - t
    in_mb = src.stat().st_size / 1e6

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cpu0 = time.process_time()
    t = time.perf_counter()
    rep = convert_dataset("orca_like.jsonl", "orca_converted", target_format="prompt_completion",
                          system_prompt=ORCA_SYSTEM, test_size=0.05, seed=42, dedupe="exact",
                          overwrite=True)
    wall = time.perf_counter() - t
    cpu = time.process_time() - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out_mb = sum((ws.root / f).stat().st_size for f in rep.files.values()) / 1e6
    c = rep.counts
    print(f"generated {args.rows} rows ({in_mb:.0f} MB) in {gen_s:.1f} s; "
          f"RSS before convert {rss_before:.0f} MiB; cpus={os.cpu_count()}", file=sys.stderr)
    print("| rows | input MB | output MB | train | test | duplicates | wall s | CPU s | rows/s | "
          "peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {c.read} | {in_mb:.0f} | {out_mb:.0f} | {c.train} | {c.test} | {c.duplicates} | "
          f"{wall:.1f} | {cpu:.1f} | {c.read / wall:,.0f} | {peak:.0f} |")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
