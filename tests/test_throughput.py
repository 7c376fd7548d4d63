"""The tokens/s model (tools/throughput.py): its mechanisms, its fit to the measured H100 runs
(leave-one-out), and what estimate_memory / recommend_method report from it."""
from __future__ import annotations

import asyncio
import importlib.util

import pytest

from tools import throughput as tp
from tools.memory import GPUS, estimate_memory
from tools.models import catalog_facts

from conftest import REPO

H100 = GPUS["H100 80GB"]
F1, F8 = catalog_facts("Llama-3.2-1B"), catalog_facts("Llama-3.1-8B")
LORA_1B = 11_272_192


def _bench():
    spec = importlib.util.spec_from_file_location("throughput_accuracy", REPO / "bench/throughput_accuracy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _work(f=F1, method="qlora", seq=1024, mb=4, gc=True, packing=True, attn="sdpa", trainable=LORA_1B, row=539):
    return tp.step_work(f, method, seq, mb, gc, packing, attn, trainable, 7, row)


def _tps(w):
    return tp.tokens_per_second(w, H100.tflops_bf16, H100.bandwidth_tbs)


def _cpu_seconds(w, c=tp.CONSTANTS):
    return c.step_overhead_s + c.layer_pass_s * w.layer_passes + c.adapter_pass_s * w.adapter_passes


def test_naive_eager_batch_one_is_dispatch_bound_and_slower_per_token():
    """The seed's naive recipe (eager, unpacked, batch 1) spends most of its step launching kernels:
    measured 1,730 tokens/s against 6,474 for the packed batch-4 run of the same 1B QLoRA."""
    naive, packed = _work(mb=1, packing=False, attn="eager"), _work(attn="flash_attention_2")
    assert _tps(naive) < 0.4 * _tps(packed)
    step = tp.step_seconds(naive, H100.tflops_bf16, H100.bandwidth_tbs)
    assert _cpu_seconds(naive) > 0.6 * step
    assert naive.real_tokens == 539  # one row, no padding: only real tokens count


def test_checkpointing_recomputes_the_forward():
    """Full fine-tuning: 6N per token without checkpointing, 8N with it (~1/3 more compute; the LM
    head is not recomputed); LoRA trains no base weight, so 4N becomes 6N (+1/2)."""
    full = [_work(F8, method="full", gc=g, trainable=F8.total_params).gemm_flops for g in (False, True)]
    assert full[1] / full[0] == pytest.approx(4 / 3, abs=0.04)
    lora = [_work(F8, method="lora", gc=g, trainable=41_943_040).gemm_flops for g in (False, True)]
    assert lora[1] / lora[0] == pytest.approx(1.5, abs=0.06)


def test_attention_cost_follows_the_kernel():
    """SDPA over a packed micro-batch attends over the whole flattened micro-batch (block-diagonal
    mask, no block skipped): its attention FLOPs per token grow with the micro-batch; flash
    attention (varlen, causal within each row) does not."""
    sdpa = [_work(mb=m).masked_attn_flops / _work(mb=m).real_tokens for m in (4, 16)]
    assert sdpa[1] == pytest.approx(4 * sdpa[0], rel=0.01)
    flash = [_work(mb=m, attn="flash_attention_2") for m in (4, 16)]
    assert all(w.masked_attn_flops == 0 for w in flash)
    per_tok = [w.gemm_flops / w.real_tokens for w in flash]
    assert per_tok[1] == pytest.approx(per_tok[0], rel=1e-6)
    assert _tps(flash[1]) > _tps(_work(mb=16))


def test_unpacked_rows_pad_to_the_longest():
    """Without packing a micro-batch is padded to its longest row: compute covers more tokens than
    count. Packing is padding-free."""
    w = _work(mb=8, packing=False)
    gemm_per_real = w.gemm_flops / w.real_tokens
    packed = _work(mb=8)
    assert gemm_per_real > 1.3 * packed.gemm_flops / packed.real_tokens


def test_leave_one_out_on_the_measured_runs():
    """Fit on 14 of the 15 H100 runs, predict the 15th: measured worst 42% (the 1B QLoRA packed run,
    which no setting of the constants reconciles with the 3B and 8B QLoRA runs), 13 of 15 within
    20%; the shipped constants are the fit on all 15."""
    bench = _bench()
    runs = bench.load_runs(bench.DEFAULT_RUNS)
    assert len(runs) == 15
    ins, loo = bench.errors(runs)
    assert max(map(abs, loo)) <= 0.45
    assert sum(abs(e) <= 0.20 for e in loo) >= 13
    assert sorted(map(abs, loo))[-2] <= 0.22
    assert max(map(abs, ins)) <= 0.40
    refit = tp.fit_constants([bench.measured(r) for r in runs])
    for name in ("matmul_efficiency", "masked_attention_efficiency", "step_overhead_s", "layer_pass_s",
                 "adapter_pass_s"):
        assert getattr(refit, name) == pytest.approx(getattr(tp.CONSTANTS, name), rel=0.02), name


def test_estimate_memory_reports_throughput_over_mcp(ws):
    """estimate_memory returns throughput_tokens_per_s for a catalog GPU and says it in the summary;
    memory figures are untouched by it; without a GPU model there is no speed."""
    from mcp import Client  # noqa: PLC0415
    from server.app import create_server  # noqa: PLC0415

    async def go():
        async with Client(create_server()) as c:
            got = await c.call_tool("estimate_memory", {"model": "Llama-3.1-8B", "gpu": "H100"})
            none = await c.call_tool("estimate_memory", {"model": "Llama-3.1-8B", "gpu_memory_gib": 80})
            return got, none
    got, none = asyncio.run(go())
    tps = got.structured_content["throughput_tokens_per_s"]
    assert 1000 < tps < 3000  # 8B QLoRA, 1 x 1024 packed, checkpointing: dispatch-bound on one H100
    assert f"{tps:,.0f} tokens/s" in got.structured_content["summary"]
    assert none.structured_content.get("throughput_tokens_per_s") is None
    assert "tokens/s" not in none.structured_content["summary"]
    a = estimate_memory("Llama-3.1-8B", gpu="H100")
    assert a.peak_allocated_gib == estimate_memory("Llama-3.1-8B", gpu_memory_gib=80).peak_allocated_gib
    eager = estimate_memory("Llama-3.2-1B", micro_batch=1, packing=False, attn_implementation="eager", gpu="H100",
                            avg_tokens_per_row=539)
    assert eager.throughput_tokens_per_s == pytest.approx(1730, rel=0.2)  # measured naive run
