"""The workspace boundary, concurrency and bad-input answers (issue: hold the workspace boundary).

Each test names the defect it guards against; each failed before the fix it came with."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tools.errors import UserError

QA = [{"question": f"What is {a}+{b}?", "answer": f"#### {a + b}"} for a in range(5) for b in range(4)]


def write_qa(path: Path, rows=QA) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder beside the workspace holding a secret row: nothing may read or write it."""
    d = tmp_path / "outside"
    d.mkdir()
    write_qa(d / "secret.jsonl", [{"question": "SECRET-ROW", "answer": "#### 1"}])
    return d


def tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else b"")
            for p in sorted(d.rglob("*"))}


# ------------------------------------------------------------------ 1. files inside allowed folders
def test_dataset_dir_with_a_link_out_is_refused(ws, outside):
    from tools.data import convert_dataset, inspect_dataset
    (ws.root / "ds").mkdir()
    os.symlink(outside / "secret.jsonl", ws.root / "ds" / "train.jsonl")
    before = tree(outside)
    with pytest.raises(UserError, match="outside the workspace") as ei:
        inspect_dataset("ds")
    assert ei.value.field == "dataset"
    with pytest.raises(UserError, match="outside the workspace"):
        convert_dataset("ds", output_dir="data/copied")
    assert not (ws.root / "data" / "copied").exists()
    assert tree(outside) == before


def test_tokenizer_dir_with_a_link_out_is_refused(ws, tiny_model, outside):
    from tools.masking import verify_masking
    write_qa(ws.root / "data" / "train.jsonl")
    tok = ws.root / "tok"
    tok.mkdir()
    for f in tiny_model.iterdir():
        if f.name.startswith("tokenizer"):
            (tok / f.name).write_bytes(f.read_bytes())
    (outside / "tokenizer_config.json").write_bytes((tok / "tokenizer_config.json").read_bytes())
    (tok / "tokenizer_config.json").unlink()
    os.symlink(outside / "tokenizer_config.json", tok / "tokenizer_config.json")
    with pytest.raises(UserError, match="outside the workspace") as ei:
        verify_masking(dataset="data", tokenizer="tok")
    assert ei.value.field == "tokenizer"


# ------------------------------------------------------------------ 2. every path in a recipe
@pytest.fixture
def qa_data(ws):
    write_qa(ws.root / "data" / "qa" / "train.jsonl")
    return "data/qa"


@pytest.mark.parametrize("out", ["../../etc/passwd", "/etc/passwd", "link-out/run"])
def test_generate_recipe_refuses_output_dir_outside(ws, tiny_model, qa_data, outside, out):
    from tools.recipes import generate_recipe
    os.symlink(outside, ws.root / "link-out")
    with pytest.raises(UserError, match="outside the workspace") as ei:
        generate_recipe(model="models/tiny-llama", dataset=qa_data, method="lora", output_dir=out,
                        seq_len=64)
    assert ei.value.field == "output_dir"
    assert not (ws.root / "recipes").exists()


RECIPE = """\
model_name_or_path: models/tiny-llama
dataset_name: data/qa
output_dir: out/r
use_cpu: true
bf16: false
max_steps: 1
report_to: none
"""


@pytest.mark.parametrize("extra,key", [
    ("output_dir: /etc/cron.d/x\n", "output_dir"),
    ("output_dir: ../x\n", "output_dir"),
    ("chat_template_path: /etc/hostname.jinja\n", "chat_template_path"),
    ("datasets:\n  - path: json\n    data_files: /etc/passwd\n", "datasets[0].data_files"),
    ("datasets:\n  - path: /etc\n", "datasets[0].path"),
    ("logging_dir: /tmp/outside-logs\n", "env.TENSORBOARD_LOGGING_DIR"),  # migrated to env
    ("deepspeed: /etc/ds.json\n", "deepspeed"),
])
def test_validate_recipe_refuses_every_path_outside(ws, tiny_model, qa_data, extra, key):
    from tools.recipes import validate_recipe
    text = "\n".join(line for line in RECIPE.splitlines()
                     if not (extra.startswith("output_dir") and line.startswith("output_dir"))
                     and not (extra.startswith("datasets") and line.startswith("dataset_name"))) + "\n" + extra
    v = validate_recipe(text)
    assert not v.valid
    assert any(e.startswith(key) and "outside the workspace" in e for e in v.errors), v.errors


def test_launch_refuses_recipe_paths_outside_even_without_masking_report(ws, tiny_model, qa_data):
    from tools.runs import launch_training
    (ws.root / "recipes").mkdir()
    text = RECIPE.replace("dataset_name: data/qa\n", "datasets:\n  - path: json\n    data_files: /etc/passwd\n")
    (ws.root / "recipes" / "r.yaml").write_text(text)
    with pytest.raises(UserError, match="outside the workspace"):
        launch_training("recipes/r.yaml", require_masking_report=False)
    from tools.run_registry import list_run_dirs
    assert list_run_dirs() == []


def test_trust_remote_code_and_report_to_all_are_said(ws, tiny_model, qa_data):
    from tools.recipes import validate_recipe
    from tools.runs import launch_training
    v = validate_recipe(RECIPE + "trust_remote_code: true\nreport_to: all\n".replace("report_to: none\n", ""))
    text = " ".join(v.warnings)
    assert "runs Python code from the model's repository" in text
    (ws.root / "recipes").mkdir()
    (ws.root / "recipes" / "r.yaml").write_text(RECIPE + "trust_remote_code: true\n")
    with pytest.raises(UserError, match="allow_remote_code=true") as ei:
        launch_training("recipes/r.yaml", require_masking_report=False)
    assert ei.value.field == "recipe"
    v2 = validate_recipe(RECIPE.replace("report_to: none", "report_to: all"))
    assert any("EVERY tracker" in w for w in v2.warnings)


# ------------------------------------------------------------------ 3./4. owned folders, caches
def test_runs_symlink_out_is_refused(ws, tiny_model, qa_data, outside):
    from tools.runs import launch_training, list_runs
    os.symlink(outside, ws.root / "runs")
    (ws.root / "recipes").mkdir()
    (ws.root / "recipes" / "r.yaml").write_text(RECIPE)
    before = tree(outside)
    for call in (list_runs, lambda: launch_training("recipes/r.yaml", require_masking_report=False)):
        with pytest.raises(UserError, match="must be a real directory"):
            call()
    assert tree(outside) == before


def test_reports_symlink_out_is_never_read(ws, outside):
    from tools.masking import REPORT_DIR
    from tools.workspace import get_workspace
    (ws.root / "reports").mkdir()
    os.symlink(outside, ws.root / REPORT_DIR)
    with pytest.raises(UserError, match="must be a real directory"):
        get_workspace().owned_dir(REPORT_DIR)


def test_run_caches_stay_in_the_workspace(ws, monkeypatch):
    from tools.run_registry import _child_env
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    env = _child_env(None, None)
    assert Path(env["HF_DATASETS_CACHE"]).is_relative_to(ws.root)
    monkeypatch.setenv("HF_DATASETS_CACHE", "/data/hf")  # the user's explicit choice wins
    assert _child_env(None, None)["HF_DATASETS_CACHE"] == "/data/hf"


# ------------------------------------------------------------------ 8. concurrency
def test_two_converts_to_one_new_dir_one_wins_the_other_is_told(ws):
    from tools.data import convert_dataset
    write_qa(ws.root / "qa.jsonl", QA * 200)
    results, errors = [], []
    barrier = threading.Barrier(2)

    def go():
        barrier.wait()
        try:
            results.append(convert_dataset("qa.jsonl", output_dir="data/out"))
        except UserError as exc:
            errors.append(str(exc))

    ts = [threading.Thread(target=go) for _ in range(2)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert len(results) == 1 and len(errors) == 1, (results, errors)
    assert "another call is writing" in errors[0] or "exists and is not empty" in errors[0]
    assert sorted(p.name for p in (ws.root / "data").iterdir()) == ["out"]


def test_exclusive_refuses_a_second_holder(ws):
    from tools.workspace import exclusive
    target = ws.root / "out" / "x"
    with exclusive(target, field="output_dir") as created:
        assert created and target.is_dir()
        with pytest.raises(UserError, match="another call is writing") as ei:
            with exclusive(target, field="output_dir"):
                pass
        assert ei.value.field == "output_dir"
    with exclusive(target, field="output_dir"):  # released
        pass


# ------------------------------------------------------------------ 9./10. run registry
def _fake_run(ws, rid: str, **status) -> Path:
    d = ws.root / "runs" / rid
    d.mkdir(parents=True)
    (d / "status.json").write_text(json.dumps({"run_id": rid, "kind": "train", "created_ts": time.time() - 5,
                                               **status}))
    return d


def test_unrelated_live_pid_is_not_the_run_and_is_not_killed(ws):
    from tools.run_registry import _proc_start_ticks
    from tools.runs import stop_training, training_status
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _fake_run(ws, "train-copied-1", pid=victim.pid, pgid=victim.pid,
                  pid_start_ticks=_proc_start_ticks(victim.pid), started="x")
        assert training_status("train-copied-1", plot=False).state == "failed"
        r = stop_training("train-copied-1", timeout_s=1)
        assert r.previous_state == "failed"
        time.sleep(0.3)
        assert victim.poll() is None, "stop_training killed an unrelated process"
    finally:
        victim.kill()
        victim.wait()


def test_one_bad_status_json_does_not_break_the_others(ws):
    from tools.runs import list_runs, stop_training, training_status
    _fake_run(ws, "train-good-1", exit_code=0)
    _fake_run(ws, "train-bad-1", created_ts="yesterday")
    _fake_run(ws, "train-bad-2", pid="abc")
    (ws.root / "runs" / "train-bad-3").mkdir()
    (ws.root / "runs" / "train-bad-3" / "status.json").write_text("{not json")
    rl = list_runs()
    assert [r.run_id for r in rl.runs] == ["train-good-1"]
    assert len(rl.skipped) == 3 and any("created_ts" in s for s in rl.skipped), rl.skipped
    assert training_status("train-good-1", plot=False).state == "completed"
    for call in (lambda: training_status("train-bad-1"), lambda: stop_training("train-bad-1")):
        with pytest.raises(UserError, match="created_ts") as ei:
            call()
        assert ei.value.field == "run_id"


# ------------------------------------------------------------------ 11.-13. bad input, clearly
@pytest.mark.parametrize("bad,needle", [
    ("data\x00.jsonl", "NUL byte"),
    ("a" * 300 + ".jsonl", "file names are limited"),
    ("x/" * 2100, "paths are limited"),
    ("~nosuchuser/data.jsonl", "'~' is not expanded"),
    ("~/data.jsonl", "'~' is not expanded"),
    ("data\r\n.jsonl", "line break"),
])
def test_bad_path_text_names_the_field(ws, bad, needle):
    from tools.data import inspect_dataset
    with pytest.raises(UserError, match=needle) as ei:
        inspect_dataset(bad)
    assert ei.value.field == "dataset"
    assert len(str(ei.value)) < 700


def test_fifo_dataset_is_refused_at_once(ws):
    from tools.data import inspect_dataset
    os.mkfifo(ws.root / "pipe.jsonl")
    (ws.root / "dir").mkdir()
    os.mkfifo(ws.root / "dir" / "train.jsonl")
    for name in ("pipe.jsonl", "dir"):
        errors: list[BaseException] = []

        def call():
            try:
                inspect_dataset(name)
            except BaseException as exc:  # noqa: BLE001 - checked below
                errors.append(exc)
        t = threading.Thread(target=call, daemon=True)  # a FIFO read would block forever
        t.start()
        t.join(10)
        if t.is_alive():
            with open(ws.root / name if name.endswith(".jsonl") else ws.root / name / "train.jsonl", "w"):
                pass  # unblock the reader
            pytest.fail(f"inspect_dataset({name!r}) blocked on a FIFO")
        assert errors and isinstance(errors[0], UserError), errors
        assert "FIFO" in str(errors[0]) or "not a regular file" in str(errors[0])


def test_long_tokens_in_any_error_are_cut():
    err = UserError(f"split '{'z' * 10_000}' is unknown", field="split", fix=f"use {'y' * 5000}")
    assert len(str(err)) < 800 and "z" * 201 not in str(err) and "y" * 201 not in str(err)


def test_runaway_chat_template_is_bounded(ws, tiny_model, monkeypatch):
    from tools import template_guard
    from tools.masking import verify_masking
    monkeypatch.setattr(template_guard, "RENDER_TIMEOUT_S", 3.0)
    write_qa(ws.root / "data" / "train.jsonl", [
        {"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]}
        for r in QA])
    (ws.root / "loop.jinja").write_text(
        "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}")
    (ws.root / "big.jinja").write_text("{{ 'x' * 200000000 }}")
    t0 = time.time()
    with pytest.raises(UserError, match="did not finish rendering") as ei:
        verify_masking(dataset="data", tokenizer="models/tiny-llama", chat_template="loop.jinja")
    assert ei.value.field == "chat_template" and time.time() - t0 < 30
    monkeypatch.setattr(template_guard, "RENDER_TIMEOUT_S", 60.0)
    with pytest.raises(UserError, match="renders more than"):
        verify_masking(dataset="data", tokenizer="models/tiny-llama", chat_template="big.jinja")


def _call(name: str, args: dict) -> tuple[bool, str]:
    import asyncio

    from mcp import Client

    from server.app import create_server

    async def main():
        async with Client(create_server()) as c:
            r = await c.call_tool(name, args)
            ok = await c.call_tool("list_runs", {})  # the server still answers
            assert not ok.is_error
            return r.is_error, r.content[0].text
    return asyncio.run(main())


def test_os_errors_name_the_field_they_came_from(ws):
    """A PermissionError (read-only output folder) deep in a tool names the field whose path it
    hit. Root ignores permissions, so the error is raised as the OS would raise it."""
    import errno

    from server.common import _to_tool_error
    from tools.workspace import get_workspace, tracking_fields
    with tracking_fields() as seen:
        out = get_workspace().resolve("ro/out", field="output_dir")
        for exc, needle in [
            (PermissionError(errno.EACCES, "Permission denied", str(out / "train.jsonl")), "permission denied"),
            (IsADirectoryError(errno.EISDIR, "Is a directory", str(out)), "is a directory"),
            (OSError(errno.ENOSPC, "No space left", str(out / "x")), "disk is full"),
            (OSError(errno.EROFS, "Read-only file system", str(out)), "read-only"),
        ]:
            text = str(_to_tool_error("convert_dataset", exc, seen))
            assert text.startswith("output_dir: ") and needle in text, text
    assert "nested too deeply" in str(_to_tool_error("x", RecursionError("maximum recursion")))
    assert "too large or infinite" in str(_to_tool_error("x", OverflowError("cannot convert float infinity")))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_read_only_output_folder_through_mcp(ws):
    ro = ws.root / "ro"
    ro.mkdir()
    write_qa(ws.root / "qa.jsonl")
    ro.chmod(0o500)
    try:
        is_err, text = _call("convert_dataset", {"dataset": "qa.jsonl", "output_dir": "ro/out"})
    finally:
        ro.chmod(0o700)
    assert is_err and "output_dir" in text and "permission denied" in text
    assert "failed unexpectedly" not in text


def test_inf_and_nan_in_raw_json_are_refused(ws):
    """A real client cannot send inf (it writes null), but raw JSON-RPC can: 1e309 parses to inf."""
    repo = Path(__file__).resolve().parent.parent
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                       "clientInfo": {"name": "raw", "version": "0"}}}
    raw = [json.dumps(init), json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}),
           '{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"estimate_memory",'
           '"arguments":{"model":"Llama-3.1-8B","gpu_memory_gib":1e309}}}',
           '{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"generate_recipe",'
           '"arguments":{"model":"Llama-3.1-8B","dataset":"d","epochs":NaN}}}']
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    proc = subprocess.Popen([sys.executable, "-m", "server", "--workspace", str(ws.root)], cwd=repo,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**env, "PYTHONPATH": str(repo)})
    replies: dict[int, dict] = {}
    try:
        for line in raw:
            proc.stdin.write(line + "\n")
            proc.stdin.flush()
            rid = json.loads(line.replace("1e309", "1").replace("NaN", "1")).get("id")
            while rid is not None and rid not in replies:
                out = proc.stdout.readline()
                assert out, "server closed stdout"
                obj = json.loads(out)
                if "id" in obj:
                    replies[obj["id"]] = obj
    finally:
        proc.kill()
        proc.wait()
    for rid, field in ((2, "gpu_memory_gib"), (3, "epochs")):
        r = replies[rid]
        text = json.dumps(r)
        assert ("error" in r or r["result"]["isError"]), text[:300]
        assert field in text and "failed unexpectedly" not in text, text[:300]


def test_deep_nesting_inf_and_huge_strings_through_mcp(ws, tiny_model, qa_data):
    deep = "[" * 100_000 + "]" * 100_000
    (ws.root / "deep.json").write_text(deep)
    (ws.root / "deep.jsonl").write_text('{"messages": ' + deep + "}\n")
    for name in ("deep.json", "deep.jsonl"):
        is_err, text = _call("inspect_dataset", {"dataset": name})
        assert is_err and "failed unexpectedly" not in text, text[:300]
    is_err, text = _call("validate_recipe", {"recipe": "a:\n" + "  - " * 1 + "[" * 50_000 + "]" * 50_000})
    assert is_err and "failed unexpectedly" not in text and "nested too deeply" in text, text[:300]
    huge = "z" * 10_000_000
    is_err, text = _call("inspect_dataset", {"dataset": huge})
    assert is_err and len(text) < 2_000, len(text)
    is_err, text = _call("training_status", {"run_id": huge})
    assert is_err and len(text) < 2_000, len(text)
    (ws.root / "adir").mkdir()
    is_err, text = _call("validate_recipe", {"recipe": "adir"})
    assert is_err and "recipe" in text and "failed unexpectedly" not in text, text[:300]


# ------------------------------------------------------------------ 7. cold-start import race
COLD = textwrap.dedent("""
    import asyncio, json, os, sys
    from pathlib import Path
    ws = Path(sys.argv[1])
    from tools.workspace import set_workspace
    set_workspace(ws)
    from mcp import Client
    from server.app import create_server

    async def main():
        async with Client(create_server()) as c:
            calls = [c.call_tool("validate_recipe", {"recipe": "recipes/r.yaml"}) for _ in range(6)]
            calls += [c.call_tool("verify_masking", {"dataset": "data/chat", "tokenizer": "models/tiny-llama",
                                                    "max_length": 64}) for _ in range(2)]
            res = await asyncio.gather(*calls)
            # a file, not stdout: tools redirect stdout while they run (from worker threads)
            (ws / "cold.json").write_text(json.dumps([[r.is_error, r.content[0].text[:300]] for r in res]))
    asyncio.run(main())
""")


@pytest.mark.slow
def test_cold_start_concurrent_calls_do_not_race_on_imports(ws, tiny_model, qa_data):
    (ws.root / "recipes").mkdir()
    (ws.root / "recipes" / "r.yaml").write_text(RECIPE)
    write_qa(ws.root / "data" / "chat" / "train.jsonl", [
        {"prompt": [{"role": "user", "content": r["question"]}],
         "completion": [{"role": "assistant", "content": r["answer"]}]} for r in QA])
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(repo)}
    p = subprocess.run([sys.executable, "-c", COLD, str(ws.root)], capture_output=True, text=True,
                       timeout=300, cwd=repo, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((ws.root / "cold.json").read_text())
    texts = [t for _, t in res]
    assert not any("cannot import name" in t or "failed unexpectedly" in t for t in texts), texts
    assert all(not err for err, _ in res), [t for err, t in res if err]


def test_accelerate_config_naming_a_deepspeed_file_outside_is_invalid(ws, tiny_model, qa_data):
    from tools.recipes import validate_recipe
    (ws.root / "acc.yaml").write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\nnum_processes: 2\n"
        "deepspeed_config:\n  deepspeed_config_file: /etc/ds_config.json\n  zero3_init_flag: false\n")
    v = validate_recipe(RECIPE, accelerate_config="acc.yaml")
    assert not v.valid and any("deepspeed_config_file" in e and "outside the workspace" in e
                               for e in v.errors), v.errors


def test_a_recipe_parse_touches_only_what_it_changed_in_the_environment(ws, monkeypatch):
    """validate_recipe runs TRL's parser in the server process, whose tool calls run in threads.
    TrainingArguments sets os.environ keys while it parses; undoing that by clearing and
    refilling os.environ let another thread see an empty environment (a child spawned then failed
    with EFAULT, "Bad address", in the cold-start test above). Only the keys the parse changed
    may be touched, and the environment afterwards is the one before."""
    from collections.abc import MutableMapping

    from tools.recipe_schema import trl_parse

    class Recording(MutableMapping):
        def __init__(self, real):
            self.real, self.removed = real, []

        def __getitem__(self, k):
            return self.real[k]

        def __setitem__(self, k, v):
            self.real[k] = v

        def __delitem__(self, k):
            self.removed.append(k)
            del self.real[k]

        def __iter__(self):
            return iter(list(self.real))

        def __len__(self):
            return len(self.real)

    trl_parse({"output_dir": "out/warm", "use_cpu": True, "report_to": "none"}, base_dir=ws.root)  # imports
    env = Recording(os.environ)
    monkeypatch.setattr(os, "environ", env)
    monkeypatch.setenv("LLM_FT_MARKER", "kept")
    before = dict(env)
    cfg = {"model_name_or_path": "models/x", "dataset_name": "data/x", "output_dir": "out/x",
           "use_cpu": True, "report_to": "none", "env": {"SOME_VAR": "1"}}
    _, err, _ = trl_parse(cfg, base_dir=ws.root)
    assert err is None
    assert dict(env) == before and "SOME_VAR" not in env  # `env:` is never exported here
    assert set(env.removed) <= {k for k in env.removed if k not in before}, sorted(set(env.removed) & set(before))
