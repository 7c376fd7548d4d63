"""The safety checks refuse bad input, not only pass good input: each launch gate, the stop
escalation to SIGKILL, and the loss warnings of training_status."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml

from tools.errors import UserError


def _rows(n: int, long: bool = False) -> list[dict]:
    reply = ("The answer, explained at length: " + "step by step " * 40) if long else "{}"
    return [{"prompt": [{"role": "user", "content": f"What is {i}+{i}?"}],
             "completion": [{"role": "assistant", "content": reply.format(2 * i)}]} for i in range(n)]


@pytest.fixture
def gate_ws(ws, tiny_model):
    d = ws.root / "data" / "long"
    d.mkdir(parents=True)
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(8, long=True)))
    yield ws
    from tools.run_registry import active_runs, signal_run
    for st in active_runs():
        signal_run(st, signal.SIGKILL)


def _recipe(ws, name: str, **over) -> str:
    cfg = dict(model_name_or_path="models/tiny-llama", dataset_name="data/long", output_dir=f"out/{name}",
               max_steps=2, per_device_train_batch_size=2, max_length=64, use_cpu=True, bf16=False,
               report_to="none")
    cfg.update(over)
    (ws.root / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return f"{name}.yaml"


def _no_runs():
    from tools.run_registry import list_run_dirs
    return list_run_dirs() == []


def test_launch_refuses_a_failing_masking_report(gate_ws):
    from tools.masking import verify_masking
    from tools.runs import launch_training
    rep = verify_masking("data/long", "models/tiny-llama", max_length=64)
    assert rep.verdict == "fail"  # max_length 64 cuts every reply
    r = _recipe(gate_ws, "cut")
    with pytest.raises(UserError, match="masking report for data/long failed") as ei:
        launch_training(r)
    assert ei.value.field == "recipe" and "max_length=64 cuts trained tokens" in str(ei.value)
    assert _no_runs()


def test_launch_refuses_without_a_matching_masking_report(gate_ws):
    from tools.masking import verify_masking
    from tools.runs import launch_training
    verify_masking("data/long", "models/tiny-llama", max_length=512)  # other settings than the recipe
    with pytest.raises(UserError, match="no masking report matches") as ei:
        launch_training(_recipe(gate_ws, "nomatch"))
    assert "verify_masking(" in ei.value.fix and "max_length" in str(ei.value)
    assert _no_runs()


def test_launch_refuses_an_invalid_recipe(gate_ws):
    from tools.runs import launch_training
    with pytest.raises(UserError, match="the recipe is not valid: unknown key 'max_seq_lenght'") as ei:
        launch_training(_recipe(gate_ws, "bad", max_seq_lenght=64), require_masking_report=False)
    assert ei.value.field == "recipe"
    assert _no_runs()


def test_launch_refuses_a_plan_over_the_gpu(gate_ws, monkeypatch):
    """This host is made to report one 24 GB GPU (the hardware probe's seam, as in
    test_recommend): a full bf16 8B recipe needs far more, so the launch must refuse before it
    starts anything."""
    from tools import hardware
    from tools.runs import launch_training
    gpu = hardware.GPUInfo(index=0, name="NVIDIA GeForce RTX 4090", total_memory_gib=23.99,
                           compute_capability="8.9", bf16_supported=True)
    monkeypatch.setattr(hardware, "_gpus", lambda: (True, True, [gpu], []))
    r = _recipe(gate_ws, "big", model_name_or_path="Llama-3.1-8B", use_cpu=False, bf16=True,
                dtype="bfloat16", max_length=2048, per_device_train_batch_size=4)
    with pytest.raises(UserError, match=r"memory: estimated [0-9.]+ GiB per GPU exceeds the 24.0 GiB") as ei:
        launch_training(r, require_masking_report=False)
    assert ei.value.field == "recipe"
    assert _no_runs()
    # The fix it names works: require_memory_fit=false launches anyway, with the warning, and
    # overrides only the memory error (a recipe with another error is still refused).
    # (fp32: TRL's own parse refuses bf16 on this CPU host, an error no flag may override)
    r = _recipe(gate_ws, "big32", model_name_or_path="Llama-3.2-1B", use_cpu=False, bf16=False,
                dtype="float32", max_length=4096, per_device_train_batch_size=16, save_strategy="no")
    plan = launch_training(r, require_masking_report=False, require_memory_fit=False, dry_run=True)
    assert any(w.startswith("memory: the estimated peak memory") and "Launched anyway" in w
               for w in plan.warnings), plan.warnings
    bad = _recipe(gate_ws, "big2", model_name_or_path="Llama-3.2-1B", use_cpu=False, bf16=False,
                  dtype="float32", max_length=4096, per_device_train_batch_size=16, save_strategy="no",
                  max_seq_lenght=64)
    with pytest.raises(UserError, match="the recipe is not valid: unknown key 'max_seq_lenght'") as ei:
        launch_training(bad, require_masking_report=False, require_memory_fit=False, dry_run=True)
    assert "exceeds" not in str(ei.value)
    assert _no_runs()


def test_launch_refuses_a_second_run_into_the_same_output_dir(gate_ws):
    from tools.runs import launch_training, start_job
    holder = start_job("train", [sys.executable, "-c", "import time; time.sleep(120)"], name="holder",
                       meta={"output_dir": str(gate_ws.root / "out" / "same")})
    with pytest.raises(UserError, match=f"run '{holder}' \\(running\\) is already writing to out/same"):
        launch_training(_recipe(gate_ws, "same"), require_masking_report=False, force=True)


@pytest.mark.slow
def test_stop_kills_a_run_that_ignores_sigterm(gate_ws):
    from tools.run_registry import describe, read_json, run_dir_for
    from tools.runs import start_job, stop_training
    code = ("import signal, time, pathlib; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "pathlib.Path('ready').write_text('1'); time.sleep(300)")
    rid = start_job("train", [sys.executable, "-c", code], name="stubborn")
    t0 = time.time()
    while not (gate_ws.root / "ready").exists():
        assert time.time() - t0 < 30, "the job did not start"
        time.sleep(0.2)
    child = None
    while child is None and time.time() - t0 < 30:
        child = read_json(run_dir_for(rid) / "status.json").get("child_pid")
        time.sleep(0.1)
    r = stop_training(rid, timeout_s=2)
    assert r.killed and r.signal_sent == "SIGTERM+SIGKILL" and r.state == "stopped", r
    assert 2 <= r.waited_s < 20
    time.sleep(0.5)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
    assert describe(run_dir_for(rid))["state"] == "stopped"


def _finished_run(ws, rid: str, losses: list[float]) -> None:
    out = ws.root / "out" / rid
    out.mkdir(parents=True)
    now = time.time()
    (out / "metrics.jsonl").write_text("".join(
        json.dumps({"step": i + 1, "loss": x, "timestamp": now}) + "\n" for i, x in enumerate(losses)))
    d = ws.root / "runs" / rid
    d.mkdir(parents=True)
    (d / "status.json").write_text(json.dumps({
        "run_id": rid, "kind": "train", "created_ts": now - 10, "exit_code": 0, "pid": None,
        "meta": {"output_dir": str(out), "method": "lora"}}))


@pytest.mark.parametrize("losses,needle", [
    ([2.3, float("nan"), float("nan")], "NaN/inf"),
    ([2.3, 1.1, float("inf")], "NaN/inf"),
    ([2.3, 0.0, 0.0, 0.0], "loss is exactly 0"),
])
def test_status_warns_on_nan_and_zero_loss(ws, losses, needle):
    from tools.runs import training_status
    _finished_run(ws, "train-x-1", losses)
    s = training_status("train-x-1", plot=False)
    assert any(needle in w for w in s.warnings), s.warnings


def test_status_shows_the_peak_reserved_memory(ws):
    """A GPU run's metrics carry the allocator's peak next to the allocated one (tools.train);
    training_status shows the highest, and summary.json's figure once the run is done."""
    from tools.runs import training_status
    _finished_run(ws, "train-mem-1", [2.3, 1.9])
    out = ws.root / "out" / "train-mem-1"
    recs = [{"step": 1, "loss": 2.3, "peak_memory_gib": 10.2, "peak_reserved_gib": 11.5},
            {"step": 2, "loss": 1.9, "peak_memory_gib": 10.1, "peak_reserved_gib": 12.0}]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    s = training_status("train-mem-1", plot=False)
    assert (s.peak_memory_gib, s.peak_reserved_gib) == (10.2, 12.0)
    (out / "summary.json").write_text(json.dumps({"status": "completed", "steps": 2, "peak_memory_gib": 10.3,
                                                  "peak_reserved_gib": 12.4, "started": time.time()}))
    assert training_status("train-mem-1", plot=False).peak_reserved_gib == 12.4


def test_status_has_no_loss_warning_on_a_healthy_run(ws):
    from tools.runs import training_status
    _finished_run(ws, "train-ok-1", [2.3, 1.9, 1.2, 0.8])
    assert training_status("train-ok-1", plot=False).warnings == []


def test_launch_refuses_when_checkpoints_will_not_fit_on_disk(gate_ws):
    """A full 70B run keeping 3 checkpoints (fp32 master weights + Adam states: ~12 bytes per
    parameter each) needs terabytes: refused before anything starts, with the amount."""
    from tools.runs import launch_training
    r = _recipe(gate_ws, "huge", model_name_or_path="Llama-3.1-70B", save_total_limit=3, save_steps=1,
                max_steps=10)
    with pytest.raises(UserError, match=r"needs about [0-9,.]+ GiB of disk \(3 checkpoint\(s\)") as ei:
        launch_training(r, require_masking_report=False, dry_run=True)
    assert ei.value.field == "recipe" and "save_total_limit" in ei.value.fix
    small = launch_training(_recipe(gate_ws, "small"), require_masking_report=False, dry_run=True)
    assert any(c.startswith("disk: ~") for c in small.checks), small.checks


def test_disk_estimate_per_method():
    from tools.launch_plan import disk_needed
    n = 8_030_261_248
    full = disk_needed("full", n, n, save_total_limit=2, save_steps_count=10, sharding="none")
    assert full.checkpoint_gib == pytest.approx(n * 12 / 2**30, rel=1e-3)  # fp32 weights + Adam
    assert full.total_gib == pytest.approx((2 * n * 12 + n * 4) / 2**30 * 1.1, rel=1e-3)
    lora = disk_needed("lora", n, 42_000_000, save_total_limit=None, save_steps_count=4, sharding="none")
    assert lora.checkpoints == 4 and lora.total_gib == pytest.approx((4 * 42e6 * 12 + 42e6 * 4) / 2**30 * 1.1, rel=1e-3)
    z3 = disk_needed("full", n, n, save_total_limit=1, save_steps_count=5, sharding="zero3")
    assert z3.checkpoint_gib == pytest.approx(n * (2 + 12) / 2**30, rel=1e-3) and z3.final_gib == pytest.approx(
        n * 2 / 2**30, rel=1e-3)


def test_oom_says_what_to_lower_and_the_retry_keeps_the_global_batch(gate_ws):
    from tools.runs import launch_training, training_status
    r = _recipe(gate_ws, "oom", per_device_train_batch_size=4, gradient_accumulation_steps=2)
    out = gate_ws.root / "out" / "oom"
    out.mkdir(parents=True)
    d = gate_ws.root / "runs" / "train-oom-1"
    d.mkdir(parents=True)
    (d / "recipe.yaml").write_text((gate_ws.root / r).read_text())
    (d / "log.txt").write_text("step 1\n[rank0]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate "
                               "2.00 GiB. GPU 0 has a total capacity of 23.99 GiB\n")
    (d / "status.json").write_text(json.dumps({
        "run_id": "train-oom-1", "kind": "train", "created_ts": time.time() - 30, "exit_code": 1,
        "meta": {"output_dir": str(out), "recipe": r, "recipe_copy": str(d / "recipe.yaml")}}))
    s = training_status("train-oom-1", plot=False)
    assert s.state == "failed" and "OutOfMemoryError" in s.error
    assert s.suggested_overrides == {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4}
    step = " ".join(s.next_steps)
    assert "same global batch" in step and "overrides=" in step
    plan = launch_training(r, overrides=s.suggested_overrides, require_masking_report=False, dry_run=True)
    assert any("oom.override.yaml" in w for w in plan.warnings)
    new = yaml.safe_load((gate_ws.root / "oom.override.yaml").read_text())
    assert new["per_device_train_batch_size"] * new["gradient_accumulation_steps"] == 8
    assert yaml.safe_load((gate_ws.root / r).read_text())["per_device_train_batch_size"] == 4  # untouched


def test_a_missing_training_library_names_the_install_command(monkeypatch):
    """In the plugin's light venv torch & co are absent: say so and give the command."""
    from server.common import _to_tool_error
    monkeypatch.setenv("LLM_FT_INSTALL_COMMAND", "python3 /p/server/launcher.py --install train,eval")
    err = _to_tool_error("spectrum_scan", ModuleNotFoundError("No module named 'torch'", name="torch"))
    assert "torch is not installed" in str(err)
    assert "python3 /p/server/launcher.py --install train,eval" in str(err)
    other = _to_tool_error("x", ModuleNotFoundError("No module named 'foo'", name="foo"))
    assert "failed unexpectedly" in str(other)  # an unknown module stays a bug report
