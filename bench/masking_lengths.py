"""verify_masking wall time when lengths and truncation are counted on every row of the split
(the masking checks stay on the 64-row sample): gsm8k rows as conversational prompt/completion,
repeated to N rows, Qwen2.5 tokenizer, max_length 256.

Run: .venv/bin/python bench/masking_lengths.py [--rows 1000 20000]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(sizes: list[int]) -> None:
    import shutil

    from tools import workspace
    from tools.masking import verify_masking
    root = Path(tempfile.mkdtemp(prefix="bench_masking_"))
    workspace.set_workspace(root)
    fix = REPO / "tests/fixtures"
    shutil.copytree(fix / "tokenizers/qwen2_5", root / "tok")
    src = [json.loads(x) for x in (fix / "datasets/gsm8k/train_first1000.jsonl").read_text().splitlines()
           if x.strip()]
    for n in sizes:
        rows = [{"prompt": [{"role": "user", "content": r["question"]}],
                 "completion": [{"role": "assistant", "content": r["answer"]}]}
                for r in (src * (n // len(src) + 1))[:n]]
        d = root / f"d{n}"
        d.mkdir()
        (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        t = time.perf_counter()
        rep = verify_masking(f"d{n}", "tok", max_length=256)
        print(f"rows={n} checked={rep.examples_checked} lengths_counted={rep.rows_length_checked} "
              f"cut={rep.truncation.completions_cut} seconds={time.perf_counter() - t:.1f}", flush=True)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1000, 20000])
    main(ap.parse_args().rows)
