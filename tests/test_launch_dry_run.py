"""launch_training(dry_run=True): every check runs, the exact command and environment come back,
and nothing is started or written. The host is made to report GPUs through the hardware probe's
seam (tools.hardware._gpus, as in test_recommend), since this machine has none."""
from __future__ import annotations

import json
import sys

import pytest
import yaml

from tools.errors import UserError

ZERO3_8 = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config: {zero_stage: 3, zero3_init_flag: true}
mixed_precision: 'no'
num_machines: 1
num_processes: 8
use_cpu: true
"""


@pytest.fixture
def dry_ws(ws, tiny_model):
    d = ws.root / "data" / "arith"
    d.mkdir(parents=True)
    (d / "train.jsonl").write_text("".join(json.dumps(
        {"prompt": [{"role": "user", "content": f"{i}+{i}?"}], "completion": [{"role": "assistant", "content": str(2 * i)}]})
        + "\n" for i in range(10)))
    cfg = dict(model_name_or_path="models/tiny-llama", dataset_name="data/arith", output_dir="out/r",
               max_steps=2, per_device_train_batch_size=2, max_length=64, use_cpu=True, bf16=False,
               report_to="none")
    (ws.root / "r.yaml").write_text(yaml.safe_dump(cfg))
    (ws.root / "zero3.yaml").write_text(ZERO3_8)
    return ws


def _host_gpus(monkeypatch, n: int):
    from tools import hardware
    gpus = [hardware.GPUInfo(index=i, name="NVIDIA H100 80GB HBM3", total_memory_gib=79.19,
                             compute_capability="9.0", bf16_supported=True) for i in range(n)]
    monkeypatch.setattr(hardware, "_gpus", lambda: (True, bool(n), gpus, []))


def _nothing_started(ws):
    from tools.run_registry import list_run_dirs
    assert list_run_dirs() == [] and not (ws.root / "out" / "r").exists()


def test_dry_run_returns_the_command_and_starts_nothing(dry_ws):
    from tools.runs import launch_training
    r = launch_training("r.yaml", require_masking_report=False, dry_run=True)
    assert r.state == "dry_run" and r.dry_run and r.run_id == "<run_id>"
    assert r.command == [sys.executable, "-m", "tools.train", "--config", r.recipe_copy]
    assert any("validate_recipe: valid" in c for c in r.checks) and "nothing was started" in r.summary and "launch_training(" in r.next_steps[0]
    _nothing_started(dry_ws)


def test_dry_run_still_refuses(dry_ws):
    from tools.runs import launch_training
    with pytest.raises(UserError, match="no masking report matches"):
        launch_training("r.yaml", dry_run=True)
    _nothing_started(dry_ws)


def test_the_accelerate_config_sets_the_count(dry_ws):
    from tools.runs import launch_training
    r = launch_training("r.yaml", accelerate_config="zero3.yaml", require_masking_report=False, dry_run=True)
    assert "--num_processes" not in r.command and r.num_processes == 8
    assert "--config_file" in r.command and "--main_process_port" in r.command
    _nothing_started(dry_ws)


def test_gpu_ids_place_the_run_and_are_checked(dry_ws, monkeypatch):
    from tools.runs import launch_training
    _host_gpus(monkeypatch, 8)
    text = (dry_ws.root / "r.yaml").read_text().replace("use_cpu: true", "use_cpu: false")
    (dry_ws.root / "g.yaml").write_text(text)
    r = launch_training("g.yaml", gpu_ids=[4, 5], require_masking_report=False, dry_run=True)
    assert r.env == {"CUDA_VISIBLE_DEVICES": "4,5"} and r.num_processes == 2 and r.gpu_ids == [4, 5]
    assert r.command_line.startswith("CUDA_VISIBLE_DEVICES=4,5 ")
    one = launch_training("g.yaml", require_masking_report=False, dry_run=True)
    assert one.env == {"CUDA_VISIBLE_DEVICES": "0"} and any("DataParallel" in w for w in one.warnings)
    with pytest.raises(UserError, match="do not exist") as ei:
        launch_training("g.yaml", gpu_ids=[8], require_masking_report=False, dry_run=True)
    assert ei.value.field == "gpu_ids"
    _host_gpus(monkeypatch, 4)
    (dry_ws.root / "z.yaml").write_text(ZERO3_8.replace("use_cpu: true", "use_cpu: false"))
    with pytest.raises(UserError, match="8 processes per node but this host has 4") as ei:
        launch_training("g.yaml", accelerate_config="z.yaml", require_masking_report=False, dry_run=True)
    assert ei.value.field == "num_processes"


@pytest.mark.slow
def test_runs_on_disjoint_gpu_sets_do_not_conflict(dry_ws):
    """Two jobs holding GPUs {0,1} and {2,3}: both may run; a third on {1,2} is refused."""
    from tools.run_registry import check_devices_free
    from tools.runs import start_job
    a = start_job("train", [sys.executable, "-c", "import time; time.sleep(60)"], gpu_ids=[0, 1])
    start_job("train", [sys.executable, "-c", "import time; time.sleep(60)"], gpu_ids=[2, 3])
    with pytest.raises(UserError, match=f"run '{a}'") as ei:
        check_devices_free([1, 2])
    assert ei.value.field == "force"
    check_devices_free([4, 5])  # free
    from tools.run_registry import active_runs, signal_run
    import signal
    for st in active_runs():
        signal_run(st, signal.SIGKILL)


def test_background_evaluate_runs_on_its_gpu_set(dry_ws):
    from tools.evaluate import evaluate
    from tools.run_registry import _child_env, active_runs, read_json, run_dir_for, signal_run
    import signal
    (dry_ws.root / "qa.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    r = evaluate(model="models/tiny-llama", local_task="qa.jsonl", background=True, gpu_ids=[3], limit=1)
    try:
        st = read_json(run_dir_for(r.run_id) / "status.json")
        assert st["gpu_ids"] == [3] and st["kind"] == "eval"
        assert _child_env([3], None)["CUDA_VISIBLE_DEVICES"] == "3"
        assert "gpu_ids" not in r.settings  # the job sees its GPUs renumbered from 0
    finally:
        for s in active_runs():
            signal_run(s, signal.SIGKILL)


def test_a_launch_refused_by_the_plan_leaves_no_run_folder(dry_ws, monkeypatch):
    from tools.runs import launch_training
    _host_gpus(monkeypatch, 2)
    text = (dry_ws.root / "r.yaml").read_text().replace("use_cpu: true", "use_cpu: false")
    (dry_ws.root / "g.yaml").write_text(text)
    with pytest.raises(UserError, match="do not exist"):
        launch_training("g.yaml", gpu_ids=[5], require_masking_report=False)
    assert [p.name for p in (dry_ws.root / "runs").iterdir()] == []
