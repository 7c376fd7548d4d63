"""bench/gpu_acceptance.py: its CPU dry run (the real tools end to end: recipe, masking, launch,
status, stop/resume, merge, evaluate; every CUDA check through launch_training(dry_run=True)),
and the pieces the GPU run relies on that the dry run cannot show (steady tokens/s, the changed
share of weights, the budget, the run script)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO  # noqa: E402 - one definition of the repo root

sys.path.insert(0, str(REPO / "bench"))
import gpu_acceptance as ga  # noqa: E402
import gpu_checks as gc  # noqa: E402

PLANNED = ("train:lora", "train:qlora", "train:full", "train:spectrum", "oom_fails_fast", "8b_shape:lora",
           "8b_shape:qlora", "fsdp2_one_process", "zero3_one_process")


@pytest.mark.slow
def test_acceptance_dry_run_passes(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    p = subprocess.run([sys.executable, "bench/gpu_acceptance.py", "--dry-run", "--out", str(tmp_path)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    lines = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    checks = {r.get("check"): r for r in lines if "check" in r}
    assert set(checks) >= {c.name for c in ga.CHECKS} | {"bf16_precision_on_cuda"}
    sr = checks["stop_resume"]  # trains on CPU: stop at a checkpoint, resume, steps continue
    assert sr["ok"] and sr["stopped"] == "stopped" and sr["state"] == "completed", sr
    assert sr["resumed_from_checkpoint"] and sr["continues_run"] and sr["steps_continue"], sr
    assert "peak_reserved_gib" in sr and sr["peak_reserved_gib"] is None  # tools.train's; CUDA only
    assert sr["merge_verified"] is True and sr["merge_device"] == "cpu"
    assert checks["evaluate"]["eval_n"] == 4 and checks["evaluate"]["device"] == "cpu"
    assert checks["packing:no_cross_sequence_leak"]["ok"]
    for name in PLANNED:  # the GPU recipe and launch path, checked without starting anything
        r = checks[name]
        assert r["ok"] and r["ran"] == gc.PLAN_ONLY, r
        assert "tools.train" in r["argv"] and "validate_recipe: valid" in r["launch_checks"], r
        assert r.get("est_peak_reserved_gib") and r.get("est_tokens_per_s"), r
    for name, dist in (("fsdp2_one_process", "FSDP"), ("zero3_one_process", "DEEPSPEED")):
        r = checks[name]
        assert r["distributed_type"] == dist and r["argv"][:2] == ["-m", "accelerate.commands.launch"], r
        assert r["argv"][r["argv"].index("--num_processes") + 1] == "1"
    assert checks["train:qlora"]["method"] == "qlora" and checks["train:lora"]["bf16"] is True
    assert checks["liger"]["liger_on"]["ran"] == gc.PLAN_ONLY
    assert lines[-1]["summary"] == "ok" and lines[-1]["failed"] == []
    assert (tmp_path / "acceptance.jsonl").read_text().count("\n") == len(lines) - 1


def test_steady_rate_leaves_out_warm_up_and_the_final_log():
    recs = [{"step": s, "num_tokens": 1000 * s, "timestamp": 10.0 + s} for s in range(1, 11)]
    recs[0]["timestamp"] = 0.0  # a slow first step (compilation) must not count
    recs.append({"step": 10, "num_tokens": 10_000, "timestamp": 99.0, "final": True})
    r = gc.steady_rate(recs, warm=3)
    assert r == {"tokens_per_s_steady": 1000.0, "measured_steps": 7, "measured_tokens": 7000}
    assert gc.steady_rate(recs[:3], warm=3)["tokens_per_s_steady"] is None  # nothing after warm-up


def test_changed_fraction_counts_changed_weights(tmp_path):
    import torch
    from safetensors.torch import save_file
    base, trained = tmp_path / "base", tmp_path / "trained"
    base.mkdir()
    trained.mkdir()
    w = torch.randn(4, 8, dtype=torch.bfloat16)
    save_file({"a.weight": w, "b.weight": w.clone()}, str(base / "model.safetensors"))
    moved = w.float().clone()
    moved[:2] += 1e-5  # an fp32 master-weight update far below one bf16 step
    save_file({"a.weight": moved, "b.weight": w.float()}, str(trained / "model.safetensors"))
    r = gc.changed_fraction(base, trained)
    assert r["changed_fraction"] == 0.25 and r["tensors_compared"] == 2 and r["params_compared"] == 64
    assert r["saved_dtypes"] == ["float32"] and 0 < r["rel_update_norm"] < 1e-3


def test_budget_skips_what_no_longer_fits_and_a_raising_check_fails_alone():
    ctx = gc.Ctx(out=REPO, ws=REPO, dry=False, cuda=True, gpu_name="H200", seq=8, micro_batch=1, steps=1,
                 warm=0, run_timeout_s=1, real=True)
    now = [0.0]

    def check(seconds):
        def fn(_ctx):
            now[0] += seconds
            return {"check": f"c{seconds}", "ok": True}
        return fn

    def boom(_ctx):
        raise RuntimeError("planted")
    checks = [ga.Check("c30", check(30), 30), ga.Check("boom", boom, 5), ga.Check("c60", check(60), 60),
              ga.Check("c10", check(10), 10)]
    out = ga.run_checks(ctx, checks, 50, lambda r: r, t0=0.0, clock=lambda: now[0])
    by = {r["check"]: r for r in out}
    assert by["c30"]["ok"] and "skipped" not in by["c30"]
    assert by["boom"]["ok"] is False and "planted" in by["boom"]["error"]
    assert by["c60"]["skipped"] == "budget" and by["c10"]["ok"] and "skipped" not in by["c10"]
    assert [r["check"] for r in ga.run_checks(ctx, checks[2:3], None, lambda r: r, 0.0, lambda: now[0])] == ["c60"]


def test_every_issue_check_is_planned_in_budget_order():
    names = [c.name for c in ga.CHECKS]
    assert set(names) >= {"8b_shape:lora", "8b_shape:qlora", "fsdp2_one_process", "zero3_one_process", "liger",
                          "flash_attention", "oom_fails_fast", "train:full", "stop_resume", "evaluate",
                          "train:lora", "train:qlora", "train:spectrum", "packing:no_cross_sequence_leak"}
    assert names.index("train:lora") < names.index("8b_shape:lora") < names.index("zero3_one_process")
    there = ga.SETUP_GPU_S + sum(c.gpu_s for c in ga.CHECKS if c.name not in ga.INSTANT_THERE)
    budget = ga._args([]).budget_s
    assert there <= budget  # all of it runs on the machine as shipped, if the estimates hold
    assert budget + 60 <= 480  # a check started in budget ends before gpu_run.sh's hard limit (480 s)


def test_run_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_run.sh")], check=True, timeout=30)
