"""The demo's whole job, smaller, as a test: a real stdio MCP client drives `python -m server`
from a raw dataset to a merged, evaluated model (demo/__main__.py)."""
from __future__ import annotations

import asyncio
import json

import pytest


@pytest.mark.slow
def test_end_to_end_through_stdio_client(tmp_path):
    from demo.__main__ import run_demo

    lines: list[str] = []
    out = asyncio.run(run_demo(tmp_path / "ws", steps=150, eval_limit=60, say=lines.append,
                               progress=False))
    text = "\n".join(lines)
    assert out["masking"] == "pass", text
    assert out["merge_verified"] is True, text
    assert out["steps"] == 150
    assert out["final_loss"] < out["first_loss"] / 10, text
    # The random base cannot answer; the fine-tuned model learned the rule on held-out numbers.
    assert out["base_exact_match"] <= 0.1, text
    assert out["fine_tuned_exact_match"] >= 0.8, text
    assert out["n"] == 60
    # Per-sample outputs were saved by evaluate, inside the workspace.
    samples = next(iter(out["samples"].values()))
    rows = [json.loads(x) for x in (tmp_path / "ws" / samples).read_text().splitlines()]
    assert len(rows) == 60 and {"response", "target", "correct"} <= set(rows[0])
    # What the demo printed: every step of the workflow, through the tools.
    for tool in ("detect_hardware", "inspect_dataset", "convert_dataset", "verify_masking",
                 "recommend_method", "generate_recipe", "validate_recipe", "launch_training",
                 "training_status", "merge_adapter"):
        assert f"[{tool}]" in text, tool
    assert "| exact match, fine-tuned |" in text
    # The job ends shipped: a GGUF proven against the HF model (or a skip naming the install).
    assert out["export"].get("parity_passed") in (True, None), out["export"]
    assert "| GGUF parity | passed |" in text or "skipped" in text, text[-2000:]
