"""`python bench/gpu_acceptance.py --dry-run`: the GPU acceptance run's code path on CPU with tiny
shapes (the real tools, end to end: recipe, masking, launch, status, merge, evaluate)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO  # noqa: E402 - one definition of the repo root


@pytest.mark.slow
def test_acceptance_dry_run_passes(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    p = subprocess.run([sys.executable, "bench/gpu_acceptance.py", "--dry-run", "--out", str(tmp_path)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    lines = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    checks = {r.get("check"): r for r in lines if "check" in r}
    for m in ("lora", "spectrum", "full"):
        r = checks[f"train:{m}"]
        assert r["ok"] and r["state"] == "completed" and r["steps"] == 3 and r["masking"] == "pass", r
        assert r["tokens_per_s"] and r["eval_n"] == 4
    assert checks["train:lora"]["merge_verified"] is True
    assert checks["packing:no_cross_sequence_leak"]["ok"]
    assert lines[-1] == {"summary": "ok", "failed": []}
    assert (tmp_path / "acceptance.jsonl").read_text().count("\n") == len(lines) - 1
