"""evaluate's engines and GPU layouts (issue 8 item 11): the hf backend sharded over several GPUs,
lm-eval's vLLM backend. This host has no GPU and no vllm, so the decision functions are tested
with explicit inputs (GPU count, gpu_ids, the adapter's config), and the request path up to the
lm-eval call with the GPU count given; no run on a GPU or through vLLM happens here."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tools import evaluate as ev
from tools.errors import UserError


def write_arith(path: Path) -> Path:
    from test_evaluate import write_arith as w
    return w(path)


@pytest.fixture
def adapter(ws, tiny_model) -> Path:
    from test_merge import make_adapter
    return make_adapter(tiny_model, ws.root / "runs" / "r1" / "output")


# ---------------------------------------------------------------- hf: one GPU or sharded
def test_two_gpus_shard_the_hf_model_one_gpu_takes_a_device():
    """Several GPUs: HFLM parallelize=True (device_map='auto' over what the process sees);
    one GPU: a plain device, whichever it is."""
    for gpu_ids in ([0, 1], None):
        lay = ev._layout("hf", gpu_ids, visible=2, in_job=False)
        assert (lay.shard, lay.gpus, lay.own_process) == (True, (0, 1), None)
        assert lay.describe() == "cuda (sharded over 2 GPUs: 0,1)"
        assert ev._hf_placement(lay, Path("/w/out/offload")) == {
            "device": "cuda", "parallelize": True, "offload_folder": "/w/out/offload"}
    one = ev._layout("hf", [1], visible=2, in_job=False)
    assert (one.shard, one.device, one.own_process, one.describe()) == (False, "cuda:1", None, "cuda:1")
    assert ev._hf_placement(one, Path("/w/out/offload")) == {"device": "cuda:1"}
    assert ev._hf_placement(ev._layout("hf", [1], visible=0, in_job=False), None) == {"device": "cpu"}


def test_a_subset_of_the_gpus_shards_only_in_a_process_of_its_own():
    """lm-eval shards over every GPU the process sees: GPUs 2,3 of 4 need a job that sees only
    them (there they are 0,1, all it sees: no further job); a duplicate id counts once."""
    lay = ev._layout("hf", [2, 3, 3], visible=4, in_job=False)
    assert lay.gpus == (2, 3) and lay.shard and "GPUs 2,3 of 4" in lay.own_process
    job = ev._layout("hf", None, visible=2, in_job=True)
    assert job.gpus == (0, 1) and job.shard and job.own_process is None
    assert ev._layout("hf", [0, 1, 2, 3], visible=4, in_job=False).own_process is None
    with pytest.raises(UserError) as e:
        ev._layout("hf", [0, 5], visible=2, in_job=False)
    assert e.value.field == "gpu_ids" and "sees 2 GPU(s)" in str(e.value)


def test_a_gpu_subset_request_runs_as_the_job_that_sees_only_them(ws, tiny_model, monkeypatch):
    """The request path with 4 GPUs visible (the count given: no GPU here): gpu_ids=[2,3] in the
    foreground starts the background job with CUDA_VISIBLE_DEVICES=2,3 (each once) and says why."""
    from tools import runs
    started = {}
    monkeypatch.setattr(ev, "_visible_gpus", lambda: 4)
    monkeypatch.setattr(runs, "start_job", lambda kind, argv, **kw: started.update(kw) or "run-s")
    write_arith(ws.root / "arith.jsonl")
    r = ev.evaluate(model="models/tiny-llama", local_task="arith.jsonl", gpu_ids=[2, 3, 3], limit=2,
                    output_dir="evals/shard")
    assert r.status == "started" and r.run_id == "run-s" and started["gpu_ids"] == [2, 3]
    assert any(n.startswith("Runs as a background job: sharding over GPUs 2,3 of 4") for n in r.notes)
    assert r.settings["device"] == "cuda (sharded over 2 GPUs: 2,3)"
    params = json.loads((ws.root / "evals" / "shard" / "spec.json").read_text())["params"]
    assert "gpu_ids" not in params and params["engine"] == "hf"


# ---------------------------------------------------------------- vLLM
def test_vllm_model_args():
    """tensor_parallel_size = the job's GPUs; the adapter as lora_local_path with its rank;
    the adapter's tokenizer (the training chat template); the precision."""
    args = ev._vllm_model_args("/w/models/base", adapter="/w/runs/r1/output", lora_rank=32,
                               tokenizer="/w/runs/r1/output", n_gpus=2, dtype="bfloat16",
                               max_gen_toks=128)
    assert args == {"pretrained": "/w/models/base", "dtype": "bfloat16", "tensor_parallel_size": 2,
                    "gpu_memory_utilization": 0.9, "max_gen_toks": 128,
                    "tokenizer": "/w/runs/r1/output", "lora_local_path": "/w/runs/r1/output",
                    "max_lora_rank": 32}
    plain = ev._vllm_model_args("/w/models/merged", adapter=None, lora_rank=None, tokenizer=None,
                                n_gpus=1, dtype="float16", max_gen_toks=256)
    assert plain == {"pretrained": "/w/models/merged", "dtype": "float16", "tensor_parallel_size": 1,
                     "gpu_memory_utilization": 0.9, "max_gen_toks": 256}
    lay = ev._layout("vllm", [2, 3], visible=4, in_job=False)
    assert lay.gpus == (2, 3) and lay.own_process and "vLLM starts worker processes" in lay.own_process
    assert lay.describe() == "cuda (vLLM, tensor parallel over 2 GPU(s): 2,3)"
    assert ev._layout("vllm", None, visible=2, in_job=True).own_process is None  # the job itself


def test_vllm_lora_rank_and_the_adapters_it_cannot_apply():
    assert ev._vllm_lora_rank({"r": 8}, "a") == 8
    assert ev._vllm_lora_rank({"r": 4}, "a") == 8       # the smallest slot vLLM has
    assert ev._vllm_lora_rank({"r": 24}, "a") == 32     # rounded up to a slot size
    assert ev._vllm_lora_rank({"r": 16, "rank_pattern": {"q_proj": 64}}, "a") == 64
    for cfg, needle in (({"r": 8, "use_dora": True}, "DoRA"),
                        ({"r": 8, "modules_to_save": ["lm_head"]}, "modules_to_save ['lm_head']"),
                        ({"r": 8, "bias": "lora_only"}, "bias='lora_only'"),
                        ({"r": 1024}, "rank 1024")):
        with pytest.raises(UserError) as e:
            ev._vllm_lora_rank(cfg, "runs/r1/output")
        assert e.value.field == "adapter" and needle in str(e.value)
        assert "merge_adapter(adapter_dir='runs/r1/output'" in e.value.fix


def test_vllm_needs_a_gpu_and_the_package():
    ev._check_engine("hf", local=True, cuda=False, vllm_installed=False)  # hf: nothing needed
    ev._check_engine("vllm", local=True, cuda=True, vllm_installed=True)
    for kw, needle in (({"local": True, "cuda": False, "vllm_installed": True}, "needs a CUDA GPU"),
                       ({"local": True, "cuda": True, "vllm_installed": False}, "pip install vllm"),
                       ({"local": False, "cuda": True, "vllm_installed": True}, "already served")):
        with pytest.raises(UserError) as e:
            ev._check_engine("vllm", **kw)
        assert e.value.field == "engine" and needle in str(e.value)
        assert "engine='hf'" in e.value.fix or "Drop engine" in e.value.fix


def test_tensor_parallel_must_divide_the_attention_heads(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 14}))
    ev._check_tensor_parallel(str(tmp_path), 2)
    ev._check_tensor_parallel("Qwen/Qwen2.5-0.5B", 4)  # a hub id: vLLM says so itself
    with pytest.raises(UserError) as e:
        ev._check_tensor_parallel(str(tmp_path), 4)
    assert e.value.field == "gpu_ids" and "14 attention heads" in str(e.value)
    assert "Use 2 GPU(s)" in e.value.fix


def test_vllm_request_runs_as_a_job_and_the_job_calls_lm_eval_vllm(ws, tiny_model, adapter,
                                                                    monkeypatch):
    """With 2 GPUs and vllm given as present (neither is here): the foreground request starts
    the job; the job (in_job) calls lm-eval's simple_evaluate with model='vllm' and the args
    built from the adapter (its rank, its tokenizer) and the job's 2 GPUs. lm-eval's call is the
    one thing replaced: vLLM cannot run here."""
    import lm_eval

    from tools import runs
    started, calls = {}, []
    monkeypatch.setattr(ev, "_visible_gpus", lambda: 2)
    monkeypatch.setattr(ev, "_vllm_installed", lambda: True)
    monkeypatch.setattr(runs, "start_job", lambda kind, argv, **kw: started.update(kw) or "run-v")
    monkeypatch.setattr(lm_eval, "simple_evaluate",
                        lambda **kw: calls.append(kw) or {"results": {}, "samples": {}, "configs": {}})
    write_arith(ws.root / "arith.jsonl")
    kw = dict(adapter="runs/r1/output", local_task="arith.jsonl", engine="vllm", dtype="bf16",
              batch_size="auto", limit=2, output_dir="evals/v")
    r = ev.evaluate(**kw)
    assert r.status == "started" and r.run_id == "run-v" and started["gpu_ids"] is None
    assert any("Runs as a background job: vLLM starts worker processes" in n for n in r.notes)
    params = json.loads((ws.root / "evals" / "v" / "spec.json").read_text())["params"]
    assert params["engine"] == "vllm" and not calls

    done = ev.run_request(ev.EvalRequest.model_validate({**params, "background": False}), in_job=True)
    assert done.status == "completed" and done.runs[0].backend == "vllm"
    (call,) = calls
    assert (call["model"], call["batch_size"], call["device"]) == ("vllm", "auto", None)
    assert call["apply_chat_template"] is True  # the adapter's tokenizer has a chat template
    a = str(adapter)
    assert call["model_args"] == {"pretrained": str(tiny_model), "dtype": "bfloat16",
                                  "tensor_parallel_size": 2, "gpu_memory_utilization": 0.9,
                                  "max_gen_toks": 256, "tokenizer": a, "lora_local_path": a,
                                  "max_lora_rank": 8}
    s = done.settings
    assert s["device"].startswith("cuda (vLLM, tensor parallel over 2 GPU(s): 0,1)")
    assert (s["engine"], s["tensor_parallel_size"], s["max_lora_rank"]) == ("vllm", 2, 8)


def test_hf_on_a_gpu_offers_vllm_when_it_is_installed(ws):
    req = ev.EvalRequest.model_validate({"model": "models/m", "tasks": ["gsm8k_cot"]})
    job = ev._Eval(req=req, tasks=["gsm8k_cot"], layout=ev._layout("hf", [0], 1, False),
                   vllm_installed=True)
    assert ev._offers_vllm(job)
    result = ev.EvalResult(summary="s", status="completed", output_dir="evals/x", tasks=job.tasks)
    assert "evaluate(model='models/m', tasks=['gsm8k_cot'], engine='vllm')" in ev._next_steps(job, result)
    for change in ({"vllm_installed": False}, {"layout": ev._layout("hf", [0], 0, False)},
                   {"layout": ev._layout("vllm", [0], 1, True)}):
        other = ev._Eval(**{**job.__dict__, **change})
        assert not ev._offers_vllm(other)
        assert not any("engine='vllm'" in s for s in ev._next_steps(other, result))


# ---------------------------------------------------------------- over MCP, on this host
def test_mcp_vllm_on_this_host_names_the_field(ws, tiny_model):
    """No GPU here: evaluate(engine='vllm') is refused at once, naming the field and the fix."""
    from mcp import Client

    from server.app import create_server
    write_arith(ws.root / "arith.jsonl")

    async def go():
        async with Client(create_server()) as c:
            return await c.call_tool("evaluate", {"model": "models/tiny-llama", "engine": "vllm",
                                                  "local_task": "arith.jsonl"})
    r = asyncio.run(go())
    assert r.is_error
    text = r.content[0].text
    assert "engine: vLLM needs a CUDA GPU" in text and "Fix: Use engine='hf'" in text, text
    assert not (ws.root / "evals").exists()  # nothing started, nothing written
