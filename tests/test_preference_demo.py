"""`make demo-dpo` as a test: a real stdio MCP client drives `python -m server` through the DPO
stage (demo/preference.py): raw pairs -> convert_preference -> verify_preference ->
generate_dpo_recipe -> launch_training -> training_status, held-out accuracy before/after."""
from __future__ import annotations

import asyncio
import json

import pytest


def test_demo_pairs_carry_the_faults_the_converter_drops():
    """The synthetic set: whole conversations sharing the user turn, one identical pair (line 11)
    and one empty chosen reply (line 21); every other pair differs only in the sound."""
    from demo.preference import ANIMALS, make_pairs
    rows = make_pairs(30)
    assert len(rows) == 32 and rows[10]["chosen"] == rows[10]["rejected"] and rows[20]["chosen"][1]["content"] == ""
    sounds = dict(ANIMALS)
    for r in rows[:10] + rows[11:20] + rows[21:]:
        assert r["chosen"][0] == r["rejected"][0]
        animal = r["chosen"][0]["content"].split("the ")[1].split(" say")[0]
        assert r["chosen"][1]["content"] == f"The {animal} says {sounds[animal]}."
        assert r["rejected"][1]["content"] != r["chosen"][1]["content"]
    assert make_pairs(30) == rows  # deterministic


@pytest.mark.slow
def test_preference_demo_through_stdio_client(tmp_path):
    from demo.preference import TARGET, run_preference_demo
    lines: list[str] = []
    out = asyncio.run(run_preference_demo(tmp_path / "ws", say=lines.append, progress=False))
    text = "\n".join(lines)
    assert out["verdict"] == "pass" and (out["train_pairs"], out["test_pairs"]) == (160, 40), text
    assert out["split"] == "test" and out["before"] == 0.5 and out["after"] >= TARGET, text
    assert out["steps"] == 80 and "adapter disabled" in out["reference"]
    assert "dropped: 1 identical (line 11), 1 empty_side (line 21)" in text
    for tool in ("convert_preference", "generate_dpo_recipe", "verify_preference", "launch_training",
                 "training_status"):
        assert f"[{tool}]" in text, tool
    assert "held-out preference accuracy 50% -> " in text and "| held-out implicit-reward accuracy" in text
    summary = json.loads((tmp_path / "ws/outputs/dpo/summary.json").read_text())
    assert summary["preference_eval"]["rows"] == 40
