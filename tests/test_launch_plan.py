"""tools.launch_plan: process count, GPU placement and the launch line, decided without a GPU.

The host's GPU count is an argument of plan_launch (detect_hardware supplies it in
launch_training), so the multi-GPU cases are real calls, not mocks."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tools.errors import UserError
from tools.launch_plan import plan_launch

TRAIN = ["-m", "tools.train", "--config", "runs/x/recipe.yaml"]
ZERO3_8 = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config: {zero_stage: 3}
num_machines: 1
num_processes: 8
"""
TWO_NODES = """distributed_type: MULTI_GPU
num_machines: 2
num_processes: 16
machine_rank: 0
main_process_ip: 10.0.0.1
main_process_port: 29555
"""


@pytest.fixture(autouse=True)
def _server_sees_every_gpu(monkeypatch):
    """The tests below describe a server that sees the host's GPUs as 0..n-1."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def _cfg(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "acc.yaml"
    p.write_text(text)
    return p


def _plan(tmp_path, text=None, gpus=8, **kw):
    acc = _cfg(tmp_path, text) if text else None
    args = dict(num_processes=None, gpu_ids=None, acc_path=acc, acc_copy=acc, gpus_present=gpus,
                recipe_use_cpu=False)
    args.update(kw)
    return plan_launch(TRAIN, **args)


def test_the_config_sets_the_process_count(tmp_path):
    p = _plan(tmp_path, ZERO3_8)
    assert "--num_processes" not in p.argv  # it would override the config's 8
    assert p.world_size == p.num_processes == 8 and p.count_from == "accelerate config"
    assert p.argv[:3] == [sys.executable, "-m", "accelerate.commands.launch"] and p.argv[-4:] == TRAIN


def test_asked_count_overrides_and_is_checked_against_the_host(tmp_path):
    p = _plan(tmp_path, ZERO3_8, num_processes=4)
    assert p.argv[p.argv.index("--num_processes") + 1] == "4"
    with pytest.raises(UserError, match="8 processes per node but this host has 4") as ei:
        _plan(tmp_path, ZERO3_8, gpus=4)
    assert ei.value.field == "num_processes"


def test_gpu_ids_place_the_run(tmp_path):
    p = _plan(tmp_path, None, gpu_ids=[2, 3])
    assert p.env["CUDA_VISIBLE_DEVICES"] == "2,3" and p.world_size == 2
    assert p.argv[p.argv.index("--num_processes") + 1] == "2" and "--multi_gpu" in p.argv
    one = _plan(tmp_path, None, gpu_ids=[5])
    assert one.env["CUDA_VISIBLE_DEVICES"] == "5" and one.argv == [sys.executable, *TRAIN]
    for bad, field in (([8], "gpu_ids"), ([1, 1], "gpu_ids")):
        with pytest.raises(UserError) as ei:
            _plan(tmp_path, None, gpu_ids=bad)
        assert ei.value.field == field
    with pytest.raises(UserError, match="gpu_ids has 2") as ei:
        _plan(tmp_path, None, gpu_ids=[0, 1], num_processes=4)
    assert ei.value.field == "num_processes"


def test_gpu_ids_count_the_servers_own_gpus(tmp_path, monkeypatch):
    """A server started with CUDA_VISIBLE_DEVICES=4,5,6,7 sees 4 GPUs numbered 0-3: gpu_ids=[1, 2]
    are its physical 5 and 6, and a job given "1,2" would land on GPUs another user holds."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    p = _plan(tmp_path, None, gpus=4, gpu_ids=[1, 2])
    assert p.env["CUDA_VISIBLE_DEVICES"] == "5,6"
    assert _plan(tmp_path, None, gpus=4).env["CUDA_VISIBLE_DEVICES"] == "4"  # pinned: its first
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aa, GPU-bb")
    assert _plan(tmp_path, None, gpus=2, gpu_ids=[1]).env["CUDA_VISIBLE_DEVICES"] == "GPU-bb"
    from tools.run_registry import _child_env, cuda_visible
    assert _child_env([0], None)["CUDA_VISIBLE_DEVICES"] == "GPU-aa"  # evaluate's jobs too
    with pytest.raises(UserError, match=r"not among the 2 this server sees") as ei:
        cuda_visible([2])
    assert ei.value.field == "gpu_ids"


def test_one_process_on_a_multi_gpu_host_is_pinned(tmp_path):
    p = _plan(tmp_path, None, gpus=8)
    assert p.argv == [sys.executable, *TRAIN] and p.env == {"CUDA_VISIBLE_DEVICES": "0"}
    assert "DataParallel" in p.notes[0]
    assert _plan(tmp_path, None, gpus=1).env == {}


def test_single_node_runs_get_their_own_port_multi_node_keep_theirs(tmp_path):
    a, b = _plan(tmp_path, ZERO3_8), _plan(tmp_path, ZERO3_8)
    pa, pb = (x.argv[x.argv.index("--main_process_port") + 1] for x in (a, b))
    assert pa.isdigit() and pa != "29500"
    p = _plan(tmp_path, TWO_NODES)
    assert "--main_process_port" not in p.argv and p.num_processes == 8 and p.world_size == 16


def test_cpu_runs_are_not_checked_against_gpus(tmp_path):
    p = _plan(tmp_path, None, gpus=0, num_processes=2, recipe_use_cpu=True)
    assert "--multi_gpu" in p.argv and p.env == {}


def test_placeholder_numbers_in_the_config_are_refused(tmp_path):
    with pytest.raises(UserError, match="main_process_port") as ei:
        _plan(tmp_path, "num_machines: 2\nnum_processes: 16\nmain_process_port: PORT\n")
    assert ei.value.field == "accelerate_config"
    with pytest.raises(UserError, match="split evenly"):
        _plan(tmp_path, "num_machines: 2\nnum_processes: 15\nmain_process_port: 1\n")
