"""recommend_method: the four reference cases, CPU-only, constraints, bad input, MCP."""
from __future__ import annotations

import asyncio

import re

import pytest

from tools import hardware
from tools.errors import UserError
from tools.recommend import recommend_method


def _fits(rec):
    m = rec.memory
    assert m.fits is True and m.total_gib <= 0.9 * rec.gpu_memory_gib
    assert m.peak_allocated_gib > 0 and m.peak_phase and "weights" in m.breakdown_gib


def test_8b_on_24gb_is_qlora(ws):
    rec = recommend_method("meta-llama/Llama-3.1-8B", gpu="RTX 4090", dataset_rows=10_000)
    assert rec.method == "qlora" and rec.sharding == "none"
    _fits(rec)
    full = [a for a in rec.alternatives if a.method == "full"]
    assert full and all(a.fits is False and a.total_gib > 0.9 * 23.99 for a in full)
    assert rec.training_hours and rec.training_hours > 0 and rec.total_tokens == 10_000 * 512
    assert "QLoRA" in rec.decision_tree_branch


def test_8b_on_h100_is_better_than_qlora(ws):
    rec = recommend_method("Llama-3.1-8B", gpu="H100")
    assert rec.method == "spectrum"  # references/methods.md: "8B on 1x H100 -> Spectrum"
    _fits(rec)
    q = [a for a in rec.alternatives if a.method == "qlora"]
    assert q and q[0].fits is True  # QLoRA fits too but is not the best choice
    best = recommend_method("Llama-3.1-8B", gpu="H100", goal="quality")
    # "(goal=quality too: full needs ~128 GiB with fp32 master weights)"
    assert best.method == "spectrum" and best.memory.fits
    full = [a for a in best.alternatives if a.method == "full"]
    assert full and not any(a.fits for a in full) and full[0].total_gib > 120


def test_70b_on_2x24gb_is_fsdp_qlora_offload(ws):
    rec = recommend_method("Llama-3.1-70B", gpu_memory_gib=24, num_gpus=2)
    assert (rec.method, rec.sharding, rec.cpu_offload) == ("qlora", "fsdp", True)
    _fits(rec)
    no_off = [a for a in rec.alternatives if a.method == "qlora" and a.sharding == "fsdp" and not a.cpu_offload]
    assert no_off and no_off[0].fits is False and "GiB" in no_off[0].why_not
    assert rec.memory.breakdown_gib["weights"] == 0 and rec.memory.breakdown_gib["gathered_shards"] > 0


def test_70b_on_8x80gb_is_full_or_spectrum_zero3(ws):
    rec = recommend_method("Llama-3.1-70B", gpu="H100", num_gpus=8)
    assert (rec.method, rec.sharding) == ("spectrum", "zero3")  # "70B on 8x H100 -> Spectrum + ZeRO-3"
    _fits(rec)
    assert rec.global_batch_sequences >= 8


def test_cost_goal_and_allow_methods(ws):
    assert recommend_method("Llama-3.1-8B", gpu="A100 80GB", goal="cost").method == "qlora"
    rec = recommend_method("Llama-3.1-8B", gpu="A100 80GB", allow_methods=["lora", "qlora"])
    assert rec.method == "lora"


def test_no_bf16_warns_fp16(ws):
    rec = recommend_method("Llama-3.2-1B", gpu="T4")
    assert rec.dtype == "fp16" and any("fp16" in w for w in rec.warnings)


def test_max_hours_rejects_slow_plans(ws):
    rec = recommend_method("Llama-3.1-8B", gpu="H100", dataset_tokens=2_000_000_000, max_hours=1e6)
    with pytest.raises(UserError, match="slower than max_hours=0.01") as ei:
        recommend_method("Llama-3.1-8B", gpu="RTX 4090", dataset_tokens=2_000_000_000, max_hours=0.01)
    assert ei.value.field == "max_hours"  # a method fits, but is too slow
    assert re.search(r"the fastest, (qlora|lora|spectrum|full), is estimated [0-9.]+ h", str(ei.value))
    assert rec.training_hours > 0
    with pytest.raises(UserError, match="no method fits") as ei:  # nothing fits at all: the model
        recommend_method("Llama-3.1-70B", gpu="T4", seq_len=4096)
    assert ei.value.field == "model"


def test_cpu_only_tiny_model(tiny_model, monkeypatch):
    monkeypatch.setattr(hardware, "_gpus", lambda: (True, False, [], []))
    rec = recommend_method("models/tiny-llama", dataset_rows=100, seq_len=256)
    assert rec.num_gpus == 0 and rec.dtype == "fp32" and rec.method in ("full", "lora")
    assert rec.memory.fits is True and any("CPU" in w for w in rec.warnings)


@pytest.mark.parametrize("kw,field", [
    (dict(model="Llama-3.1-9B"), "model"), (dict(model="Llama-3.1-8B", micro_batch=0), "micro_batch"),
    (dict(model="Llama-3.1-8B", micro_batch=-2), "micro_batch"),
    (dict(model="Llama-3.1-8B", seq_len=200_000), "seq_len"), (dict(model="Llama-3.1-8B", gpu="Voodoo2"), "gpu"),
])
def test_bad_input(ws, kw, field):
    with pytest.raises(UserError) as e:
        recommend_method(**{"gpu_memory_gib": 24, **kw})
    assert e.value.field == field


def test_mcp_recommend_method(ws):
    from mcp import Client
    from server.app import create_server

    async def go():
        async with Client(create_server()) as c:
            r = await c.call_tool("recommend_method", {"model": "Llama-3.1-8B", "gpu": "RTX 4090"})
            assert not r.is_error and r.structured_content["method"] == "qlora"
            assert r.structured_content["memory"]["fits"] is True
            for args, field in (({"model": "nope-7b", "gpu": "H100"}, "model"),
                                ({"model": "Llama-3.1-8B", "gpu": "H100", "micro_batch": 0}, "micro_batch"),
                                ({"model": "Llama-3.1-8B", "gpu": "H100", "seq_len": 500000}, "seq_len")):
                bad = await c.call_tool("recommend_method", args)
                assert bad.is_error and field in bad.content[0].text
            again = await c.call_tool("recommend_method", {"model": "Llama-3.1-70B", "gpu": "H100", "num_gpus": 8})
            assert not again.is_error and again.structured_content["sharding"] == "zero3"
    asyncio.run(go())


def test_throughput_follows_the_hardware_and_the_model(ws):
    """The time estimate responds to what it models: a faster GPU, a smaller model, more GPUs and
    no offload are faster; twice the tokens take twice as long. (Its accuracy against measured
    runs is the throughput benchmark's business.)"""
    from tools.recommend import _throughput
    from tools.models import get_model_facts
    f8, f1 = get_model_facts("Llama-3.1-8B"), get_model_facts("Llama-3.2-1B")
    kw = dict(method="lora", seq_len=2048, micro_batch=2, gc=True, num_gpus=1, sharding="none", offload=False,
              spectrum_fraction=0.3)
    h100, l4 = _throughput(f8, tflops=989, **kw), _throughput(f8, tflops=121, **kw)
    assert h100 > 4 * l4
    assert _throughput(f1, tflops=989, **kw) > 1.5 * h100  # measured on H100: ~9.3k vs ~4.1k tokens/s
    eight = _throughput(f8, tflops=989, **{**kw, "num_gpus": 8, "sharding": "zero3"})
    assert 4 * h100 < eight < 8 * h100
    assert _throughput(f8, tflops=989, **{**kw, "offload": True}) < 0.5 * h100
    a = recommend_method("Llama-3.1-8B", gpu="H100", dataset_tokens=1_000_000_000)
    b = recommend_method("Llama-3.1-8B", gpu="H100", dataset_tokens=2_000_000_000)
    assert b.training_hours == pytest.approx(2 * a.training_hours, rel=1e-2)


def test_offload_is_the_last_resort_and_says_its_ram(ws):
    """70B full on 8x H100 fits only with ZeRO-3 offload: it must be tried (it never was) and
    say the CPU RAM it needs; but offloading never beats a method that fits without it, and
    offloading picks the smallest RAM footprint (QLoRA, not a terabyte of full-model states)."""
    full = recommend_method("Llama-3.1-70B", gpu="H100", num_gpus=8, allow_methods=["full"])
    assert (full.method, full.sharding, full.cpu_offload) == ("full", "zero3", True)
    assert any(re.search(r"needs ~\d{3,4} GiB of CPU RAM", w) for w in full.warnings), full.warnings
    best = recommend_method("Llama-3.1-70B", gpu="H100", num_gpus=8)
    assert (best.method, best.sharding, best.cpu_offload) == ("spectrum", "zero3", False)
    small = recommend_method("Llama-3.1-70B", gpu_memory_gib=24, num_gpus=2)
    assert (small.method, small.sharding, small.cpu_offload) == ("qlora", "fsdp", True)
