"""Regenerate demo/data/parity.jsonl: the synthetic task the demo fine-tunes a tiny model on.

Question/answer rows ("Is 48173 even or odd?" -> "odd"): a rule a tiny random-initialised model
learns in about a minute on a CPU (it must find the last digit), which it cannot guess before,
plus a few faulty rows (duplicates, empty answers) so the demo's inspect and convert reports
show what they catch. Deterministic: `python -m demo.make_data` rewrites the same file.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).parent / "data" / "parity.jsonl"


def rows(n: int = 2400, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    seen: set[int] = set()
    out = []
    while len(out) < n:
        x = rng.randint(10, 999_999)
        if x in seen:
            continue
        seen.add(x)
        out.append({"question": f"Is {x} even or odd?", "answer": "odd" if x % 2 else "even"})
    # Faults the tools must catch: two exact duplicates and two rows without an answer.
    out.insert(100, dict(out[5]))
    out.insert(700, dict(out[50]))
    out.insert(1200, {"question": "Is 77 even or odd?", "answer": ""})
    out.insert(1800, {"question": "Is 1234 even or odd?", "answer": "   "})
    return out


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("w") as fh:
        for r in rows():
            fh.write(json.dumps(r) + "\n")
    print(OUT)
