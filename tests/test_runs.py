"""Runs through the MCP tools (in-process client on a fresh MCPServer): launch_training ->
training_status polling -> completed for QLoRA, LoRA, Spectrum and full; stop + resume;
2-process data parallel and DeepSpeed ZeRO-3 on CPU (gloo); crashes; conflicts; a restarted
server's view of the registry."""
from __future__ import annotations

import asyncio
import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO  # noqa: E402 - one definition of the repo root
POLL_TIMEOUT_S = 420


# ------------------------------------------------------------------ fixtures and helpers

@pytest.fixture
def runs_ws(ws, tiny_model):
    """Workspace with the tiny model and a conversational prompt/completion dataset."""
    d = ws.root / "data" / "arith"
    d.mkdir(parents=True)
    with open(d / "train.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"What is {i}+{i}?"}],
                                "completion": [{"role": "assistant", "content": str(2 * i)}]}) + "\n")
    yield ws
    _kill_active(ws)


def _kill_active(ws) -> None:
    """Never leave a background process behind a test."""
    from tools.run_registry import active_runs, signal_run
    for st in active_runs():
        signal_run(st, signal.SIGKILL)


def recipe(ws, name: str, **over) -> str:
    cfg = dict(model_name_or_path="models/tiny-llama", dataset_name="data/arith", output_dir=f"out/{name}",
               max_steps=4, per_device_train_batch_size=2, max_length=64, use_cpu=True, bf16=False,
               report_to="none", save_steps=2, logging_steps=1, learning_rate=1e-3, seed=0)
    cfg.update(over)
    (ws.root / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return f"{name}.yaml"


def server():
    from mcp.server.mcpserver import MCPServer

    import server.runs
    mcp = MCPServer("runs-test")
    server.runs.register(mcp)
    return mcp


async def call(c, name: str, **args):
    r = await c.call_tool(name, args)
    if r.is_error:
        raise AssertionError(f"{name} failed: {r.content[0].text}")
    return r


async def wait_done(c, run_id: str, timeout: float = POLL_TIMEOUT_S, until=None):
    """Poll training_status until the run leaves queued/running (or `until(status)` holds)."""
    t0 = time.time()
    seen = []
    while True:
        r = await call(c, "training_status", run_id=run_id, log_lines=40, plot=False)
        s = r.structured_content
        seen.append((s["state"], s.get("step")))
        if until is not None and until(s):
            return s
        if s["state"] not in ("queued", "running"):
            return s
        if time.time() - t0 > timeout:
            raise AssertionError(f"{run_id} still {s['state']} after {timeout}s; log:\n" + "\n".join(s["log_tail"]))
        await asyncio.sleep(1.0)


def run(coro):
    return asyncio.run(coro)


def launch_and_wait(recipe_path: str, timeout: float = POLL_TIMEOUT_S, **launch_args) -> tuple[dict, dict]:
    """launch_training (no masking report needed) then poll until the run ends: (launch, status)."""
    async def main():
        async with __import__("mcp").Client(server()) as c:
            res = (await call(c, "launch_training", recipe=recipe_path, require_masking_report=False,
                              **launch_args)).structured_content
            return res, await wait_done(c, res["run_id"], timeout=timeout)
    return run(main())


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def tensors(path: Path) -> dict:
    from safetensors import safe_open
    with safe_open(str(path), framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def check_completed(s: dict, out: Path, method: str, steps: int = 4) -> dict:
    assert s["state"] == "completed", (s["error"], s["log_tail"])
    assert s["exit_code"] == 0 and s["step"] == steps and s["max_steps"] == steps
    assert s["progress_pct"] == 100.0 and s["loss"] is not None and s["peak_memory_gib"] > 0
    summ = json.loads((out / "summary.json").read_text())
    assert summ["status"] == "completed" and summ["method"] == method and summ["steps"] == steps
    assert summ["base_model"] == "models/tiny-llama" and summ["train_loss"] > 0 and summ["tokens"] > 0
    train_recs = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in train_recs] == list(range(1, steps + 1))
    for k in ("epoch", "learning_rate", "grad_norm", "num_tokens", "tokens_per_second", "peak_memory_gib",
              "timestamp"):
        assert train_recs[-1].get(k) is not None, k
    assert json.loads((out / "progress.json").read_text())["step"] == steps
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()
    return summ


# ------------------------------------------------------------------ the four methods

@pytest.mark.slow
def test_lora_two_processes_with_masking_report_and_image(runs_ws):
    """LoRA, data parallel over 2 processes (accelerate launch, gloo on CPU), with the masking
    gate ON: refused without a report, then a real verify_masking report lets it start;
    training_status carries the loss-curve image."""
    ws = runs_ws
    r = recipe(ws, "lora", use_peft=True, lora_r=4, lora_alpha=8, lora_target_modules="all-linear")

    async def main():
        async with __import__("mcp").Client(server()) as c:
            bad = await c.call_tool("launch_training", {"recipe": r, "num_processes": 2})
            assert bad.is_error and "verify_masking(" in bad.content[0].text, bad.content[0].text
            from tools.masking import verify_masking
            assert verify_masking(dataset="data/arith", tokenizer="models/tiny-llama", max_length=64).verdict == "pass"
            res = (await call(c, "launch_training", recipe=r, num_processes=2)).structured_content
            assert any("masking report" in x and "pass" in x for x in res["checks"]), res["checks"]
            cmd = res["command"]
            assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and "--multi_gpu" in cmd
            assert cmd[cmd.index("--num_processes") + 1] == "2" and cmd[-4:-1] == ["-m", "tools.train", "--config"]
            s = await wait_done(c, res["run_id"])
            img = await call(c, "training_status", run_id=res["run_id"])
            return res, s, img

    res, s, img = run(main())
    out = Path(res["output_dir"])
    summ = check_completed(s, out, "lora")
    assert summ["world_size"] == 2
    assert summ["adapter_path"] == str(out) and (out / "adapter_model.safetensors").exists()
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    kinds = [b.type for b in img.content]
    assert "image" in kinds and img.structured_content["loss_plot_path"].endswith("loss.png")
    png = next(b for b in img.content if b.type == "image")
    assert png.mime_type == "image/png" and len(png.data) > 1000
    assert img.structured_content["state"] == "completed"


@pytest.mark.slow
def test_qlora_4bit_on_cpu(runs_ws):
    pytest.importorskip("bitsandbytes")
    ws = runs_ws
    r = recipe(ws, "qlora", use_peft=True, load_in_4bit=True, lora_r=4, lora_alpha=8,
               lora_target_modules="all-linear")

    res, s = launch_and_wait(r)
    assert res["method"] == "qlora" and res["command"][1:4] == ["-m", "tools.train", "--config"]
    out = Path(res["output_dir"])
    summ = check_completed(s, out, "qlora")
    assert summ["load_in_4bit"] is True and summ["loaded_in_4bit"] is True  # really NF4 on CPU
    assert (out / "adapter_model.safetensors").exists()
    assert 0 < summ["trainable_params"] < summ["total_params"] / 5


@pytest.mark.slow
def test_spectrum_trains_only_selected_layers(runs_ws, tiny_model):
    ws = runs_ws
    (ws.root / "spectrum").mkdir()
    (ws.root / "spectrum/tiny.yaml").write_text(
        "unfrozen_parameters:\n- ^lm_head.weight$\n- ^model.layers.0.self_attn.q_proj\n- ^model.layers.1.mlp.down_proj\n")
    r = recipe(ws, "spectrum", spectrum_config_path="spectrum/tiny.yaml")

    res, s = launch_and_wait(r)
    assert res["method"] == "spectrum"
    out = Path(res["output_dir"])
    summ = check_completed(s, out, "spectrum")
    assert summ["spectrum_unfrozen"] == 3 and summ["model_path"] == str(out)
    before, after = tensors(tiny_model / "model.safetensors"), tensors(out / "model.safetensors")
    changed = {k for k in before if not (before[k] == after[k]).all()}
    assert changed == {"lm_head.weight", "model.layers.0.self_attn.q_proj.weight",
                       "model.layers.1.mlp.down_proj.weight"}


@pytest.mark.slow
def test_full_with_chat_template_path(runs_ws, tiny_model):
    from tools.tiny import CHATML_TEMPLATE
    ws = runs_ws
    tpl = "{# custom training template #}" + CHATML_TEMPLATE
    (ws.root / "chatml.jinja").write_text(tpl)
    r = recipe(ws, "full", chat_template_path="chatml.jinja")

    res, s = launch_and_wait(r)
    assert res["method"] == "full"
    out = Path(res["output_dir"])
    summ = check_completed(s, out, "full")
    assert summ["chat_template"] == "chatml.jinja" and summ["model_path"] == str(out)
    assert (out / "chat_template.jinja").read_text() == tpl  # the recipe's template was honoured
    before, after = tensors(tiny_model / "model.safetensors"), tensors(out / "model.safetensors")
    assert all(not (before[k] == after[k]).all() for k in before)  # every weight trained


# ------------------------------------------------------------------ stop, resume

@pytest.mark.slow
def test_stop_then_resume_continues_from_checkpoint(runs_ws):
    ws = runs_ws
    r = recipe(ws, "resume", max_steps=3000, save_steps=100000, learning_rate=1e-4)

    async def main():
        async with __import__("mcp").Client(server()) as c:
            res = (await call(c, "launch_training", recipe=r, require_masking_report=False)).structured_content
            rid = res["run_id"]
            s = await wait_done(c, rid, until=lambda s: (s["step"] or 0) >= 3)
            assert s["state"] == "running" and s["max_steps"] == 3000
            assert s["eta_s"] is not None and s["eta_s"] > 0 and s["seconds_per_step"] > 0
            stop = (await call(c, "stop_training", run_id=rid, timeout_s=120)).structured_content
            assert stop["state"] == "stopped" and not stop["killed"], stop
            s = (await call(c, "training_status", run_id=rid, plot=False)).structured_content
            assert s["state"] == "stopped" and s["run_summary"]["status"] == "stopped"
            n = s["run_summary"]["steps"]
            assert f"is stopped at step {n}/" in s["summary"] and "launch_training(recipe=" in s["next_steps"][0]
            stopped_summary = s["run_summary"]
            assert stop["last_checkpoint"].endswith(f"checkpoint-{n}")
            # Relaunch the same output_dir with a closer max_steps and an edited save cadence: it
            # resumes at step n, applies the new cadence (Trainer would keep the checkpoint's), and
            # says so; the two runs are linked as one logical run.
            recipe(ws, "resume", max_steps=n + 3, save_steps=1, learning_rate=1e-4)
            res2 = (await call(c, "launch_training", recipe=r, require_masking_report=False)).structured_content
            assert res2["resumes_from"] == stop["last_checkpoint"]
            s2 = await wait_done(c, res2["run_id"])
            assert s2["continues_run"] == rid and s2["logical_run"] == rid
            assert any("save_steps 1 (the checkpoint had 100000)" in w for w in s2["warnings"]), s2["warnings"]
            return n, res2, s2, stopped_summary

    n, res2, s2, stopped_summary = run(main())
    assert (Path(res2["output_dir"]) / f"checkpoint-{n + 1}").is_dir()  # the recipe's cadence
    out = Path(res2["output_dir"])
    assert stopped_summary["stop_signal"] == "SIGTERM" and stopped_summary["model_path"] is None
    assert 3 <= n < 3000
    assert s2["state"] == "completed", s2["log_tail"]
    summ = json.loads((out / "summary.json").read_text())
    assert summ["resumed_from"].endswith(f"checkpoint-{n}") and summ["steps"] == n + 3
    steps = [m["step"] for m in metrics(out) if "loss" in m]
    assert steps == list(range(1, n + 4))  # steps 1..n from run 1, n+1..n+3 from the resumed run


# ------------------------------------------------------------------ DeepSpeed

ZERO3 = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  zero_stage: 3
  offload_optimizer_device: none
  offload_param_device: none
  zero3_init_flag: true
  zero3_save_16bit_model: true
machine_rank: 0
mixed_precision: 'no'
num_machines: 1
num_processes: 2
rdzv_backend: static
same_network: true
use_cpu: true
"""


@pytest.mark.slow
def test_deepspeed_zero3_two_processes_cpu(runs_ws, tiny_model):
    """ZeRO-3 on CPU through accelerate launch (gloo). The first run on a machine JIT-compiles
    DeepSpeed's shm comm op (cached in ~/.cache/torch_extensions afterwards)."""
    pytest.importorskip("deepspeed")
    ws = runs_ws
    (ws.root / "accelerate_zero3.yaml").write_text(ZERO3)
    r = recipe(ws, "z3")

    res, s = launch_and_wait(r, timeout=540, num_processes=2, accelerate_config="accelerate_zero3.yaml")
    assert "--config_file" in res["command"] and "--multi_gpu" not in res["command"]
    out = Path(res["output_dir"])
    summ = check_completed(s, out, "full")
    assert summ["world_size"] == 2
    assert any((out / "checkpoint-4").glob("global_step*"))  # a DeepSpeed checkpoint
    before, after = tensors(tiny_model / "model.safetensors"), tensors(out / "model.safetensors")
    assert set(before) == set(after) and all(before[k].shape == after[k].shape for k in before)
    # the gathered 16-bit model is the trained one, not the initial weights or zeros
    changed = [k for k in before if not (before[k] == after[k]).all()]
    assert len(changed) == len(before), sorted(set(before) - set(changed))
    assert all(abs(after[k]).sum() > 0 for k in after)
    port = res["command"][res["command"].index("--main_process_port") + 1]
    assert port.isdigit() and port != "29500"  # a free port per run: two runs never collide


# ------------------------------------------------------------------ failures and conflicts

@pytest.mark.slow
def test_crash_is_failed_with_reason_and_force_overrides_conflict(runs_ws, tiny_model):
    """A sleeping job holds the CPU: a second launch is refused unless force; the forced run has
    corrupt weights, so it crashes -> failed with the exception from its log."""
    from tools.runs import start_job
    ws = runs_ws
    (tiny_model / "model.safetensors").write_bytes(b"\x00" * 64)
    r = recipe(ws, "crash")
    holder = start_job("train", [sys.executable, "-c", "import time; time.sleep(300)"], name="holder")

    async def main():
        async with __import__("mcp").Client(server()) as c:
            bad = await c.call_tool("launch_training", {"recipe": r, "require_masking_report": False})
            assert bad.is_error
            text = bad.content[0].text
            assert holder in text and "stop_training" in text and "force" in text
            res = (await call(c, "launch_training", recipe=r, require_masking_report=False,
                              force=True)).structured_content
            s = await wait_done(c, res["run_id"])
            runs = (await call(c, "list_runs")).structured_content
            stop = (await call(c, "stop_training", run_id=holder, timeout_s=30)).structured_content
            return s, runs, stop

    s, runs, stop = run(main())
    assert s["state"] == "failed" and s["exit_code"] not in (0, None)
    assert s["error"] and "Error" in s["error"].split(":")[0], s["error"]
    assert "safetensors" in s["error"].lower() or "header" in s["error"].lower(), s["error"]
    assert s["run_summary"]["status"] == "failed" and s["next_steps"] and "failed" in s["summary"]
    assert {x["run_id"]: x["state"] for x in runs["runs"]}[holder] == "running"
    assert holder in runs["active"]
    assert stop["state"] == "stopped" and stop["previous_state"] == "running"


def test_unknown_run_id_is_a_tool_error(runs_ws):
    async def main():
        async with __import__("mcp").Client(server()) as c:
            for tool in ("training_status", "stop_training"):
                r = await c.call_tool(tool, {"run_id": "train-nope-20990101-000000-beef"})
                assert r.is_error and "list_runs" in r.content[0].text, r.content[0].text
            r = await c.call_tool("training_status", {"run_id": "../../etc"})
            assert r.is_error and "run_id" in r.content[0].text
            r = await c.call_tool("launch_training", {"recipe": "missing.yaml"})
            assert r.is_error and "recipe" in r.content[0].text
    run(main())


def test_restarted_server_sees_runs_and_dead_process_is_failed(runs_ws):
    """A supervisor killed without recording an exit -> failed; a new process (a restarted
    server) reads every run's state from disk."""
    from tools.run_registry import describe, run_dir_for
    from tools.runs import start_job
    ws = runs_ws
    done = start_job("evaluate", [sys.executable, "-c", "print('hello from the job')"], name="ok")
    dead = start_job("train", [sys.executable, "-c", "import time; time.sleep(300)"], name="dead", force=True)
    st = json.loads((run_dir_for(dead) / "status.json").read_text())
    t0 = time.time()
    while describe(run_dir_for(done))["state"] != "completed" and time.time() - t0 < 60:
        time.sleep(0.2)
    assert describe(run_dir_for(dead))["state"] == "running"
    os.killpg(st["pgid"], signal.SIGKILL)  # the supervisor and its child die without a trace
    t0 = time.time()
    while describe(run_dir_for(dead))["state"] == "running" and time.time() - t0 < 30:
        time.sleep(0.2)
    d = describe(run_dir_for(dead))
    assert d["state"] == "failed" and "without recording an exit code" in d["reason"]

    code = ("import json; from tools.runs import list_runs, training_status; "
            "print(json.dumps({'runs': list_runs().model_dump()['runs'], "
            f"'st': training_status(run_id='{dead}', plot=False).model_dump()}}))")
    env = dict(os.environ, PYTHONPATH=str(REPO), LLM_FT_WORKSPACE=str(ws.root))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    view = json.loads(out.stdout.strip().splitlines()[-1])
    states = {r["run_id"]: (r["state"], r["kind"], r["name"]) for r in view["runs"]}
    assert states == {done: ("completed", "evaluate", "ok"), dead: ("failed", "train", "dead")}
    assert view["st"]["state"] == "failed" and "exit code" in view["st"]["error"]
    assert any("hello from the job" in ln for ln in
               (run_dir_for(done) / "log.txt").read_text().splitlines())


def test_error_from_log_picks_the_root_cause():
    from tools.runs import error_from_log
    log = ["Traceback (most recent call last):", '  File "x.py", line 1, in <module>',
           "[rank1]: ValueError: Can't find a valid checkpoint at out/checkpoint-9",
           "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ", "====="]
    assert error_from_log(log) == "ValueError: Can't find a valid checkpoint at out/checkpoint-9"
    assert error_from_log(["all good"]) is None
    assert error_from_log(["torch.OutOfMemoryError: CUDA out of memory."]).startswith("torch.OutOfMemoryError")


def _two_process_run(ws, name: str, steps: int = 400):
    """A 2-process gloo LoRA run long enough to be signalled; returns (run_id, output_dir) once
    both ranks have finished a step."""
    from tools.run_registry import describe, descendants, run_dir_for
    from tools.runs import launch_training
    r = recipe(ws, name, use_peft=True, lora_r=4, lora_alpha=8, lora_target_modules="all-linear",
               max_steps=steps, save_steps=1000, logging_steps=1)
    res = launch_training(r, num_processes=2, require_masking_report=False)
    out = Path(res.output_dir)
    t0 = time.time()
    while not (out / "progress.json").exists():
        assert time.time() - t0 < 300, "the run did not reach its first step"
        assert describe(run_dir_for(res.run_id))["state"] == "running", describe(run_dir_for(res.run_id))
        time.sleep(0.5)
    pid = describe(run_dir_for(res.run_id))["pid"]
    workers = [p for p in descendants(pid) if b"tools.train" in Path(f"/proc/{p}/cmdline").read_bytes()
               and b"accelerate" not in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(workers) == 2, workers
    return res.run_id, out, workers


@pytest.mark.slow
def test_two_process_stop_is_graceful(runs_ws):
    """stop_training on a 2-process run: both ranks stop at the same step with a checkpoint, and
    the run is stopped well within the wait (the launcher's shutdown timeout is not in the way)."""
    from tools.runs import stop_training
    rid, out, _ = _two_process_run(runs_ws, "stop2")
    r = stop_training(rid, timeout_s=120)
    assert r.state == "stopped" and not r.killed, r
    assert r.last_checkpoint and Path(r.last_checkpoint).is_dir()
    assert json.loads((out / "summary.json").read_text())["status"] == "stopped"


@pytest.mark.slow
def test_a_rank_that_dies_ends_the_run_within_a_minute(runs_ws):
    """SIGKILL rank 0 (what the OOM killer does): the run must be failed within about a minute,
    and summary.json must say so although rank 0, which writes it, is gone (the supervisor writes
    it). On CPU the surviving rank's gloo collective errors out at once; with NCCL it would wait,
    and the launcher's 30 s shutdown timeout bounds that (not testable without GPUs)."""
    from tools.run_registry import describe, run_dir_for
    rid, out, workers = _two_process_run(runs_ws, "dead2")
    rank0 = next(p for p in workers if b"\0RANK=0\0" in b"\0" + Path(f"/proc/{p}/environ").read_bytes())
    os.kill(rank0, signal.SIGKILL)
    t0 = time.time()
    while describe(run_dir_for(rid))["state"] == "running":
        assert time.time() - t0 < 90, "the run still runs 90 s after a rank died"
        time.sleep(1)
    d = describe(run_dir_for(rid))
    assert d["state"] == "failed", d
    summ = json.loads((out / "summary.json").read_text())
    assert summ["status"] == "failed" and summ.get("error") and summ["written_by"] == "supervisor", summ


@pytest.mark.slow
def test_multi_node_recipe_slurm_script_and_a_two_machine_launch(runs_ws, tiny_model):
    """generate_recipe(num_nodes=2) writes the multi-node accelerate config, a Slurm script and the
    torchrun line; the config is refused until node 0's address is filled in; and the same config
    runs for real as two 'machines' on 127.0.0.1 (machine_rank 0 and 1, gloo on CPU)."""
    import socket

    from tools.recipes import generate_recipe, validate_recipe
    ws = runs_ws
    r = generate_recipe("models/tiny-llama", "data/arith", method="lora", gpu="H100", num_gpus=1, num_nodes=2,
                        output_path="recipes/mn.yaml", seq_len=64)
    acc = yaml.safe_load((ws.root / r.accelerate_config_path).read_text())
    assert (acc["num_machines"], acc["num_processes"], acc["main_process_ip"]) == (2, 2, "MAIN_NODE_IP")
    assert acc["distributed_type"] == "MULTI_GPU"
    slurm = (ws.root / "recipes/mn.slurm.sh").read_text()
    assert "#SBATCH --nodes=2" in slurm and "--machine_rank \\$SLURM_NODEID" in slurm and "srun" in slurm
    assert subprocess.run(["bash", "-n", str(ws.root / "recipes/mn.slurm.sh")]).returncode == 0
    assert r.launch_commands["slurm"] == "sbatch recipes/mn.slurm.sh"
    assert "--nnodes 2" in r.launch_commands["torchrun"] and any("MAIN_NODE_IP" in w for w in r.warnings)
    v = validate_recipe(r.recipe_path, accelerate_config=r.accelerate_config_path)
    assert not v.valid and any("MAIN_NODE_IP" in e for e in v.errors)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    text = ((ws.root / r.accelerate_config_path).read_text().replace("MAIN_NODE_IP", "127.0.0.1")
            .replace("main_process_port: 29500", f"main_process_port: {port}"))
    text = re.sub(r"mixed_precision: .*", "mixed_precision: 'no'", text)
    (ws.root / "node.yaml").write_text(text)
    cpu_recipe = recipe(ws, "mn_cpu", use_peft=True, lora_r=4, lora_alpha=8, max_steps=3, save_strategy="no")
    env = {**os.environ, "PYTHONPATH": str(REPO), "LLM_FT_WORKSPACE": str(ws.root), "OMP_NUM_THREADS": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("PYTEST_")}
    procs = [subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--config_file", "node.yaml",
                               "--machine_rank", str(rank), "-m", "tools.train", "--config", cpu_recipe],
                              cwd=ws.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
    summ = json.loads((ws.root / "out/mn_cpu/summary.json").read_text())
    assert summ["status"] == "completed" and summ["world_size"] == 2 and summ["steps"] == 3


def test_an_evaluation_run_shows_its_metrics_and_no_training_fields(runs_ws):
    """training_status of a background evaluate: the metrics (not summary null), and none of the
    training-only fields (loss, steps, checkpoints) in what the client receives."""
    from test_evaluate import write_arith

    from tools import evaluate as ev
    write_arith(runs_ws.root / "arith.jsonl")
    r = ev.evaluate(model="models/tiny-llama", local_task="arith.jsonl", limit=2, max_gen_toks=4,
                    background=True, output_dir="evals/st")

    async def main():
        async with __import__("mcp").Client(server()) as c:
            return await wait_done(c, r.run_id)

    s = run(main())
    assert s["state"] == "completed", s["log_tail"]
    assert s["run_summary"]["metrics"] and s["run_summary"]["table"]
    label, metrics_ = next(iter(s["run_summary"]["metrics"].items()))
    assert metrics_[0]["n"] == 2
    # the sentence to relay names the model and its first metric with its value
    assert s["summary"].startswith(f"Evaluation {s['run_id']}: ") and metrics_[0]["metric"] in s["summary"], s["summary"]
    for k in ("loss", "step", "max_steps", "last_checkpoint", "eval_loss", "tokens_per_second"):
        assert k not in s, k


def test_a_one_point_loss_curve_is_drawn(tmp_path):
    from PIL import Image

    from tools.runs import _plot_loss
    png = _plot_loss([{"step": 1, "loss": 2.5}], tmp_path / "loss.png", "one point")
    img = Image.open(png).convert("RGB")
    w, h = img.size
    # A single point sits in the middle of the axes; the legend's line sample is in a corner.
    box = img.crop((int(w * 0.35), int(h * 0.3), int(w * 0.75), int(h * 0.7)))
    blue = [px for px in box.convert("RGB").get_flattened_data() if abs(px[0] - 31) < 40 and abs(px[1] - 119) < 40 and px[2] > 150]
    assert len(blue) >= 4  # matplotlib's first colour, #1f77b4


@pytest.mark.slow
def test_a_generated_recipe_logs_to_tensorboard_in_the_workspace(runs_ws):
    pytest.importorskip("tensorboard")
    from tools.recipes import generate_recipe
    ws = runs_ws
    r = generate_recipe("models/tiny-llama", "data/arith", method="lora", output_dir="out/tb",
                        report_to="tensorboard", test_split=False,
                        overrides={"max_steps": 2, "logging_steps": 1, "save_strategy": "no",
                                   "max_length": 64})
    cfg = yaml.safe_load((ws.root / r.recipe_path).read_text())
    assert cfg["report_to"] == "tensorboard"
    assert cfg["env"]["TENSORBOARD_LOGGING_DIR"] == "out/tb/tensorboard"
    _, s = launch_and_wait(r.recipe_path)
    assert s["state"] == "completed", (s["error"], s["log_tail"])
    tb = ws.root / "out/tb/tensorboard"
    assert any(f.name.startswith("events.out.tfevents") for f in tb.rglob("*"))  # the Trainer wrote it
    assert s["tracking"] == {"report_to": ["tensorboard"], "log_dirs": {"tensorboard": str(tb)}}
