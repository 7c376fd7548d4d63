"""evaluate() with lm-eval on CPU: local tasks on the tiny model (+ adapter, vs base), a served
endpoint (a local fake OpenAI server with known answers), errors, background, and MCP."""
from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tools.errors import UserError

PAIRS = [(12, 7), (3, 4), (10, 5), (8, 8), (1, 2), (20, 30), (2, 2), (9, 1), (4, 4), (6, 7)]


def write_arith(path: Path) -> Path:
    rows = [{"question": f"What is {a}+{b}?", "answer": f"{a}+{b}={a + b}\n#### {a + b}"}
            for a, b in PAIRS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def adapter(ws, tiny_model) -> Path:
    from test_merge import make_adapter
    return make_adapter(tiny_model, ws.root / "runs" / "r1" / "output")


def read_jsonl(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def test_local_task_adapter_vs_base(ws, tiny_model, adapter):
    from tools.evaluate import evaluate
    write_arith(ws.root / "arith.jsonl")
    r = evaluate(adapter="runs/r1/output", compare_with="models/tiny-llama",
                 local_task="arith.jsonl", limit=10, max_gen_toks=8, batch_size=10)
    assert r.status == "completed" and r.tasks == ["local_arith"]
    lt = r.local_task
    assert lt["format"] == "question_answer" and lt["answer_mode"] == "numeric" and lt["rows"] == 10
    data = read_jsonl(ws.root / lt["data_path"])
    assert data[0]["target"] == "19" and data[0]["prompt"] == "What is 12+7?"
    assert (ws.root / lt["yaml_path"]).read_text().startswith("task: local_arith")

    assert [run.label for run in r.runs] == ["fine-tuned", "base"]
    tuned, base = r.runs
    assert tuned.adapter == "runs/r1/output" and tuned.model == "models/tiny-llama"
    assert base.adapter is None and tuned.apply_chat_template
    for run in r.runs:
        (m,) = run.metrics
        assert (m.task, m.metric, m.filter, m.n) == ("local_arith", "exact_match", "final-answer", 10)
        assert m.value is not None and 0 <= m.value <= 1 and m.stderr is not None
        rows = read_jsonl(ws.root / run.samples_files["local_arith"])
        assert len(rows) == 10
        assert {"prompt", "target", "response", "extracted", "correct"} <= set(rows[0])
        assert "<|im_start|>user\nWhat is" in rows[0]["prompt"]  # the chat template was applied
        assert (ws.root / run.raw_results_file).exists()
    (row,) = r.comparison
    assert row.delta == pytest.approx(row.fine_tuned - row.base)
    assert "| base | fine-tuned | delta |" in r.table
    assert f"local_arith exact_match {row.fine_tuned:.3f} vs {row.base:.3f} ({row.delta:+.3f}" in r.summary
    assert "merge_adapter(adapter_dir='runs/r1/output', output_dir='models/r1-merged')" in r.next_steps
    saved = json.loads((ws.root / r.results_file).read_text())
    assert saved["comparison"][0]["task"] == "local_arith"
    assert r.settings["decoding"].startswith("greedy") and r.settings["max_gen_toks"] == 8


def test_local_multiple_choice(ws, tiny_model):
    from tools.evaluate import evaluate
    rows = [{"question": f"Which city is number {i}?", "choices": ["Paris", "Rome", "Oslo"],
             "answer": ["A", 1, "Oslo"][i % 3]} for i in range(6)]
    (ws.root / "mc.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    r = evaluate(model="models/tiny-llama", local_task="mc.jsonl", limit=6)
    assert r.local_task["kind"] == "multiple_choice"
    (m,) = r.runs[0].metrics
    assert m.metric == "acc" and m.n == 6 and m.stderr is not None
    samples = read_jsonl(ws.root / r.runs[0].samples_files["local_mc"])
    assert [s["target"] for s in samples] == ["A", "B", "C"] * 2
    assert all(s["extracted"] in "ABC" and s["correct"] == (s["extracted"] == s["target"])
               for s in samples)
    assert m.value == pytest.approx(sum(s["correct"] for s in samples) / 6)


# ---------------------------------------------------------------- a served model (fake endpoint)
@pytest.fixture
def api_deps():
    """lm-eval's API models need the lm-eval[api] extra (tenacity, aiohttp), part of our eval extra."""
    import tenacity  # noqa: F401 - fails loudly when the extra is missing


@pytest.fixture
def fake_server():
    """An OpenAI-compatible server: right on even first operands, off by one on odd ones."""
    def arith(req) -> str:
        a, b = map(int, re.findall(r"(\d+)\+(\d+)", req["messages"][-1]["content"])[0])
        return f"{a} plus {b}.\n#### {a + b if a % 2 == 0 else a + b + 1}"
    with chat_server(arith, model_id="served-tiny", record_get=True) as served:
        yield served


def test_served_endpoint_exact_scores(ws, api_deps, fake_server):
    from tools.evaluate import evaluate
    url, requests = fake_server
    write_arith(ws.root / "arith.jsonl")
    r = evaluate(base_url=url, local_task="arith.jsonl", system_prompt="Be brief.", max_gen_toks=32)
    run = r.runs[0]
    assert run.backend == "local-chat-completions" and run.served_model == "served-tiny"
    assert run.base_url == url + "/chat/completions"
    (m,) = run.metrics
    right = sum(a % 2 == 0 for a, _ in PAIRS)  # 7 of 10
    assert m.value == pytest.approx(right / 10)
    assert m.stderr == pytest.approx((0.7 * 0.3 / 9) ** 0.5, rel=1e-6)  # sample std / sqrt(n)
    req = next(r for r in requests if "_get" not in r)
    assert req["model"] == "served-tiny" and req["temperature"] == 0 and req["max_tokens"] == 32
    assert req["messages"][0] == {"role": "system", "content": "Be brief."}
    samples = read_jsonl(ws.root / run.samples_files["local_arith"])
    s0 = next(s for s in samples if s["target"] == "19")
    assert s0["extracted"] == "19" and s0["correct"] is True and "#### 19" in s0["response"]


def test_mcp_summary_carries_the_score(ws, api_deps, fake_server):
    """Over MCP the text content leads with the summary: the score (7 of 10 right) with its
    stderr and n; the next calls name the same endpoint and task."""
    from mcp import Client

    from server.app import create_server
    url, _ = fake_server
    write_arith(ws.root / "arith.jsonl")

    async def go():
        async with Client(create_server()) as c:
            return await c.call_tool("evaluate", {"base_url": url, "local_task": "arith.jsonl",
                                                  "max_gen_toks": 16, "output_dir": "evals/mcp"})
    r = asyncio.run(go())
    assert not r.is_error, r.content
    sc = r.structured_content
    se = (0.7 * 0.3 / 9) ** 0.5
    assert f"local_arith exact_match 0.700 ± {se:.3f} (n=10)" in sc["summary"], sc["summary"]
    assert sc["summary"].startswith(f"Evaluated served-tiny at {url}")
    assert r.content[0].text.splitlines()[0] == sc["summary"]
    assert "model local_arith exact_match: 0.7" in r.content[0].text  # a key figure
    assert not any(s.startswith(("generate(", "export_model(")) for s in sc["next_steps"])  # local models only


def test_endpoint_key_only_when_named(ws, api_deps, fake_server, monkeypatch):
    """$OPENAI_API_KEY is never forwarded; the key goes only from the variable the caller names,
    and never lands in the saved results."""
    from tools.evaluate import evaluate
    url, requests = fake_server
    write_arith(ws.root / "arith.jsonl")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-global-secret")
    evaluate(base_url=url, local_task="arith.jsonl", limit=2, max_gen_toks=8, output_dir="evals/a")
    assert requests and all(r["_authorization"] is None for r in requests), requests
    requests.clear()
    monkeypatch.setenv("VLLM_KEY", "vllm-secret")
    evaluate(base_url=url, local_task="arith.jsonl", limit=2, max_gen_toks=8, api_key_env="VLLM_KEY",
             output_dir="evals/b")
    assert requests and all(r["_authorization"] == "Bearer vllm-secret" for r in requests)
    saved = "".join(p.read_text() for p in (ws.root / "evals").rglob("*") if p.is_file())
    assert "vllm-secret" not in saved and "sk-global-secret" not in saved
    with pytest.raises(UserError, match="not set") as ei:
        evaluate(base_url=url, local_task="arith.jsonl", api_key_env="NO_SUCH_KEY_VAR")
    assert ei.value.field == "api_key_env"


@pytest.mark.parametrize("url,needle", [
    ("http://169.254.169.254/latest/meta-data", "link-local"),
    ("http://[fe80::1]:8000/v1", "link-local"),
    ("http://100.100.100.200/v1", "metadata"),
    ("http://10.1.2.3:8000/v1", "--allow-endpoint 10.1.2.3"),
    ("http://localhost:8000/v1\r\nX-Injected: 1", "control characters"),
    ("http://user:pw@127.0.0.1:8000/v1", "credentials"),
])
def test_endpoint_policy_refuses(ws, url, needle):
    from tools.evaluate import evaluate
    write_arith(ws.root / "arith.jsonl")
    with pytest.raises(UserError, match=re.escape(needle)) as ei:
        evaluate(base_url=url, local_task="arith.jsonl")
    assert ei.value.field == "base_url"


def test_endpoint_allowlist(monkeypatch):
    from tools.endpoints import check_url, set_allowed_hosts
    monkeypatch.delenv("LLM_FT_ALLOWED_ENDPOINTS", raising=False)
    with pytest.raises(UserError, match="not loopback"):
        check_url("http://10.1.2.3:8000/v1")
    set_allowed_hosts(["10.1.2.3", "169.254.169.254"])
    assert check_url("http://10.1.2.3:8000/v1") == "http://10.1.2.3:8000/v1"
    with pytest.raises(UserError, match="refused always"):  # allowed or not
        check_url("http://169.254.169.254/")
    assert check_url("http://127.0.0.1:9/v1") and check_url("http://[::1]:9/v1")


def test_unreachable_endpoint_and_bad_inputs(ws, tiny_model, api_deps):
    from tools.evaluate import evaluate
    write_arith(ws.root / "arith.jsonl")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError, match="cannot reach") as ei:
        evaluate(base_url=f"http://127.0.0.1:{port}/v1", local_task="arith.jsonl")
    assert ei.value.field == "base_url" and "vllm serve" in ei.value.fix
    with pytest.raises(UserError, match="http"):
        evaluate(base_url="localhost:8000", local_task="arith.jsonl")
    with pytest.raises(UserError, match="does not exist"):
        evaluate(model="models/nope", local_task="arith.jsonl")
    with pytest.raises(UserError, match="nothing to evaluate"):
        evaluate(model="models/tiny-llama")
    with pytest.raises(UserError, match="adapter_config.json"):
        evaluate(adapter="models/tiny-llama", local_task="arith.jsonl")
    (ws.root / "bad.jsonl").write_text('{"question": "x", "answer": "1"}\nnot json\n')
    with pytest.raises(UserError, match="line 2"):
        evaluate(model="models/tiny-llama", local_task="bad.jsonl")
    (ws.root / "odd.jsonl").write_text('{"foo": "x", "bar": "1"}\n')
    with pytest.raises(UserError, match="prompt field"):
        evaluate(model="models/tiny-llama", local_task="odd.jsonl")


@pytest.fixture
def gsm8k_only_index(monkeypatch):
    """lm-eval's real TaskManager over its gsm8k folder only: indexing all ~15k task YAMLs takes
    tens of seconds on 2 cores, and the logic under test is the same."""
    import lm_eval.tasks as lt
    from lm_eval.tasks import TaskManager

    from tools import evaluate as ev
    tm = TaskManager(include_path=str(Path(lt.__file__).parent / "gsm8k"), include_defaults=False)
    monkeypatch.setattr(ev, "_known_task_names", lambda: set(tm.all_tasks))
    monkeypatch.setattr(ev, "_task_manager", lambda include, include_defaults: tm)
    return tm


def test_unknown_task_and_offline_dataset(ws, tiny_model, gsm8k_only_index):
    from tools.evaluate import evaluate
    with pytest.raises(UserError, match="no task, group or tag named 'gsm8k_cotx'") as ei:
        evaluate(model="models/tiny-llama", tasks=["gsm8k_cotx"])
    assert "gsm8k_cot" in str(ei.value) and ei.value.field == "tasks"
    # A real registry task whose dataset cannot be fetched (HF_DATASETS_OFFLINE=1 here).
    with pytest.raises(UserError, match="could not load the dataset of task") as ei:
        evaluate(model="models/tiny-llama", tasks=["gsm8k_cot"], limit=2)
    assert "local_task" in ei.value.fix


def test_background_job_and_cli(ws, tiny_model):
    """background=True runs `python -m tools.evaluate --spec` as a job of the real run registry."""
    import time

    from tools import evaluate as ev
    from tools.runs import training_status
    write_arith(ws.root / "arith.jsonl")
    r = ev.evaluate(model="models/tiny-llama", local_task="arith.jsonl", limit=3, max_gen_toks=4,
                    background=True, output_dir="evals/bg")
    assert r.status == "started" and r.run_id and r.runs == []
    deadline = time.time() + 300
    while (st := training_status(run_id=r.run_id, plot=False)).state in ("queued", "running"):
        assert time.time() < deadline, st.log_tail
        time.sleep(1)
    assert st.state == "completed", (st.error, st.log_tail)
    assert st.kind == "eval"
    spec = json.loads((ws.root / "evals" / "bg" / "spec.json").read_text())
    assert spec["workspace"] == str(ws.root) and spec["params"]["limit"] == 3
    res = json.loads((ws.root / "evals" / "bg" / "results.json").read_text())
    assert res["status"] == "completed" and res["runs"][0]["metrics"][0]["n"] == 3


def test_background_spec_is_the_resolved_request(ws, tiny_model, monkeypatch):
    """spec.json holds the request as resolved (the rows' system prompt, output_dir), which the
    job re-reads as an EvalRequest; gpu_ids go to the job's environment, not into the spec."""
    from tools import evaluate as ev
    from tools import runs
    started = {}
    monkeypatch.setattr(runs, "start_job", lambda kind, argv, **kw: started.update(argv=argv, **kw) or "run-x")
    d = ws.root / "data" / "conv"
    d.mkdir(parents=True)
    row = {"prompt": [{"role": "system", "content": "You are a calculator."},
                      {"role": "user", "content": "What is 2+2?"}],
           "completion": [{"role": "assistant", "content": "#### 4"}]}
    (d / "test.jsonl").write_text(json.dumps(row) + "\n")
    r = ev.evaluate(model="models/tiny-llama", local_task="data/conv", limit=2, gpu_ids=[1],
                    background=True, output_dir="evals/s")
    assert r.status == "started" and r.run_id == "run-x" and started["gpu_ids"] == [1]
    assert "run-x" in r.summary and r.next_steps == [
        "training_status(run_id='run-x') until it completes (poll every 30-60 s)"]
    spec_file = ws.root / "evals" / "s" / "spec.json"
    assert started["argv"][-2:] == ["--spec", str(spec_file)]
    params = json.loads(spec_file.read_text())["params"]
    assert set(params) == set(ev.EvalRequest.model_fields) - {"gpu_ids", "background"}
    req = ev.EvalRequest.model_validate(params)
    assert (req.system_prompt, req.output_dir, req.limit, req.model) == (
        "You are a calculator.", "evals/s", 2, "models/tiny-llama")
    assert req.gpu_ids is None and req.background is False


def test_mcp_tools(ws, tiny_model, adapter):
    from mcp import Client
    from mcp.server.mcpserver import MCPServer

    import server.post

    mcp = MCPServer("post-test")
    server.post.register(mcp)
    write_arith(ws.root / "arith.jsonl")

    async def go():
        async with Client(mcp) as c:
            tools = {t.name: t for t in (await c.list_tools()).tools}
            assert tools["merge_adapter"].annotations.destructive_hint is True
            assert tools["evaluate"].annotations.open_world_hint is True
            assert tools["evaluate"].annotations.destructive_hint is False
            assert "lm-evaluation-harness" in tools["evaluate"].description
            r = await c.call_tool("merge_adapter", {"adapter_dir": "runs/r1/output",
                                                    "output_dir": "models/merged"})
            assert not r.is_error, r.content
            assert r.structured_content["verified"] is True
            assert r.structured_content["logits_check"]["equivalent"] is True
            sc = r.structured_content  # the result contract: summary with the figures, real next calls
            lc = sc["logits_check"]
            assert "models/merged" in sc["summary"] and ": verified" in sc["summary"]
            assert f"within {lc['max_abs_diff']:.2g}" in sc["summary"] and r.content[0].text.startswith(sc["summary"])
            assert "evaluate(model='models/merged', compare_with='models/tiny-llama', local_task=" in \
                " | ".join(sc["next_steps"])
            r = await c.call_tool("evaluate", {"model": "models/merged", "local_task": "arith.jsonl",
                                               "limit": 4, "max_gen_toks": 4})
            assert not r.is_error, r.content
            m = r.structured_content["runs"][0]["metrics"][0]
            assert m["metric"] == "exact_match" and m["n"] == 4 and "stderr" in m
            sc = r.structured_content
            assert f"local_arith exact_match {m['value']:.3f} ± {m['stderr']:.3f} (n=4)" in sc["summary"]
            assert sc["summary"].startswith("Evaluated models/merged (limit=4)")
            assert "generate(model='models/merged', dataset='arith.jsonl', rows=5)" in sc["next_steps"]
            assert r.content[0].text.splitlines()[0] == sc["summary"]
            r = await c.call_tool("merge_adapter", {"adapter_dir": "models/tiny-llama",
                                                    "output_dir": "x"})
            assert r.is_error and "adapter_config.json" in r.content[0].text
            assert "Fix:" in r.content[0].text
    asyncio.run(go())


def test_local_task_formats_load_in_lm_eval(ws):
    """convert_dataset output (conversational prompt/completion with a system turn, in a dir),
    messages rows with text answers; the YAML loads in lm-eval's TaskManager."""
    from lm_eval.tasks import TaskManager

    from tools.eval_tasks import build_local_task
    d = ws.root / "data" / "converted"
    d.mkdir(parents=True)
    row = {"prompt": [{"role": "system", "content": "You are a calculator."},
                      {"role": "user", "content": "What is 2+2?"}],
           "completion": [{"role": "assistant", "content": "2+2 = 4.\n#### 4"}]}
    (d / "train.jsonl").write_text(json.dumps(row) + "\n")
    (d / "test.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(
        {**row, "completion": [{"role": "assistant", "content": "It is 1,000."}]}) + "\n")
    t = build_local_task("data/converted")
    assert (t.source, t.format, t.answer_mode) == ("data/converted/test.jsonl", "prompt_completion", "numeric")
    assert t.system_prompt == "You are a calculator." and t.rows == 2
    docs = read_jsonl(ws.root / t.data_path)
    assert [x["target"] for x in docs] == ["4", "1000"] and docs[0]["prompt"] == "What is 2+2?"

    (ws.root / "qa.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Capital of {c}?"}, {"role": "assistant", "content": a}]}) + "\n"
        for c, a in [("France", "Paris"), ("Italy", "Rome")]))
    t2 = build_local_task("qa.jsonl", chat_style=False)
    assert (t2.format, t2.answer_mode, t2.rows) == ("messages", "text", 2)
    tm = TaskManager(include_path=str(ws.root / t2.task_dir), include_defaults=False)
    task = tm.load([t2.name])["tasks"][t2.name]
    doc = next(iter(task.test_docs()))
    assert task.doc_to_text(doc) == "Question: Capital of France?\nAnswer:"
    assert task.doc_to_target(doc) == "Paris"


def test_known_difference_has_the_right_stderr_and_significance(ws, tiny_model, api_deps, fake_server):
    """Tuned = the fake server (right on 7 of 10, known), base = the random tiny model: the
    comparison row's delta, standard error and significance follow from the per-sample results."""
    from tools.evaluate import evaluate
    url, _ = fake_server
    write_arith(ws.root / "arith.jsonl")
    r = evaluate(base_url=url, compare_with="models/tiny-llama", local_task="arith.jsonl",
                 max_gen_toks=8, output_dir="evals/cmp")
    tuned, base = r.runs
    (row,) = r.comparison
    assert row.fine_tuned == pytest.approx(0.7)
    assert row.fine_tuned_stderr == pytest.approx((0.7 * 0.3 / 9) ** 0.5, rel=1e-6)
    base_rows = read_jsonl(ws.root / base.samples_files["local_arith"])
    p = sum(s["correct"] for s in base_rows) / len(base_rows)
    assert len(base_rows) == 10 and row.base == pytest.approx(p) and p <= 0.2
    se_b = (p * (1 - p) / 9) ** 0.5
    assert row.base_stderr == pytest.approx(se_b, abs=1e-9)
    assert row.delta == pytest.approx(0.7 - p)
    assert row.delta_stderr == pytest.approx((se_b ** 2 + 0.7 * 0.3 / 9) ** 0.5, rel=1e-6)
    assert row.significant is True  # 0.5+ > 1.96 * ~0.2
    assert "*" in r.table


def test_compare_marks_a_small_difference_not_significant():
    from tools.evaluate import ModelRun, TaskMetric, _compare

    def run(v, se):
        return ModelRun(label="x", backend="hf", apply_chat_template=True, samples_files={},
                        raw_results_file="r.json", elapsed_s=0.0,
                        metrics=[TaskMetric(task="t", metric="exact_match", filter="f", value=v, stderr=se, n=100)])
    (row,) = _compare(run(0.50, 0.05), run(0.55, 0.05))
    assert row.delta == pytest.approx(0.05) and row.delta_stderr == pytest.approx(0.0707, abs=1e-4)
    assert row.significant is False
    (row,) = _compare(run(0.30, 0.02), run(0.50, 0.02))
    assert row.significant is True


def test_batch_size_auto(ws, tiny_model):
    """batch_size='auto': lm-eval finds the batch size itself (on a GPU, the largest that fits)."""
    from tools.evaluate import evaluate
    write_arith(ws.root / "arith.jsonl")
    r = evaluate(model="models/tiny-llama", local_task="arith.jsonl", limit=3, max_gen_toks=4, batch_size="auto")
    (m,) = r.runs[0].metrics
    assert r.status == "completed" and m.n == 3 and r.settings["batch_size"] == "auto"


# ---------------------------------------------------------------- the metric follows the answers
SUPPORT = [
    ("How long does shipping take?", "Orders ship in 5-7 business days."),
    ("Can I return an item?", "Yes, you can return any item within 30 days of delivery for a full refund."),
    ("Do you ship abroad?", "We ship to most countries in Europe and North America."),
    ("How do I reset my password?", "Click 'Forgot password' on the login page and follow the email link."),
    ("Is there a phone line?", "Our phone line is open on weekdays from nine to five."),
    ("Can I change my order?", "You can change an order until it leaves the warehouse, usually within a day."),
]
# What the served "tuned" model replies: verbatim, a paraphrase, or off topic.
SUPPORT_REPLIES = {
    SUPPORT[0][0]: "Orders ship in 5-7 business days.",
    SUPPORT[1][0]: "You can return items within 30 days for a refund.",
    SUPPORT[2][0]: "I like turtles.",
    SUPPORT[3][0]: "Click 'Forgot password' on the login page and follow the email link.",
    SUPPORT[4][0]: "The phone line is open weekdays, nine to five.",
    SUPPORT[5][0]: "Sorry, I cannot help with that.",
}


def write_support(path: Path) -> Path:
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in SUPPORT))
    return path


@contextlib.contextmanager
def chat_server(reply, model_id: str = "served", record_get: bool = False):
    """An OpenAI-compatible server on loopback whose chat replies are reply(request json)."""
    requests: list[dict] = []

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, obj):
            body = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if record_get:
                requests.append({"_get": self.path, "_authorization": self.headers.get("Authorization")})
            self._send({"object": "list", "data": [{"id": model_id, "object": "model"}]})

        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append({**req, "_authorization": self.headers.get("Authorization")})
            self._send({"id": "c", "object": "chat.completion", "choices": [{
                "index": 0, "finish_reason": "stop",
                "message": {"role": "assistant", "content": reply(req)}}]})

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/v1", requests
    finally:
        srv.shutdown()


def support_reply(req) -> str:
    return SUPPORT_REPLIES[req["messages"][-1]["content"]]


def test_free_text_answers_are_scored_by_rouge_and_chrf(ws, api_deps):
    """Issue 10: free-text replies got numeric extraction ('5-7 business days' -> '-7') and 0 vs
    0. Now the whole reply is scored by ROUGE-L and chrF, with the values rouge-score and
    sacrebleu give for each reply."""
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import CHRF

    from tools.evaluate import evaluate
    write_support(ws.root / "support.jsonl")
    with chat_server(support_reply) as (url, _):
        r = evaluate(base_url=url, local_task="support.jsonl", max_gen_toks=32)
    lt = r.local_task
    assert lt["answer_mode"] == "free_text" and lt["metrics"] == ["rougeL", "chrf"]
    assert lt["answer_kinds"] == {"long": 6}
    data = read_jsonl(ws.root / lt["data_path"])
    assert data[0]["target"] == "Orders ship in 5-7 business days."  # not "-7"
    assert any("ROUGE-L" in n and "6 of 6" in n for n in r.notes), r.notes
    metrics = {m.metric: m for m in r.runs[0].metrics}
    assert set(metrics) == {"rougeL", "chrf"}
    rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    want_r = [rouge.score(a, SUPPORT_REPLIES[q])["rougeL"].fmeasure for q, a in SUPPORT]
    want_c = [CHRF().sentence_score(SUPPORT_REPLIES[q], [a]).score / 100 for q, a in SUPPORT]
    assert metrics["rougeL"].value == pytest.approx(sum(want_r) / 6)
    assert metrics["chrf"].value == pytest.approx(sum(want_c) / 6)
    assert 0.3 < metrics["rougeL"].value < 0.9 and metrics["rougeL"].stderr > 0
    assert metrics["rougeL"].n == 6 and metrics["rougeL"].higher_is_better is True
    rows = read_jsonl(ws.root / r.runs[0].samples_files["local_support"])
    verbatim = next(s for s in rows if s["target"].startswith("Orders"))
    assert verbatim["rougeL"] == pytest.approx(1.0) and verbatim["correct"] is None
    assert verbatim["response"] == verbatim["extracted"] == "Orders ship in 5-7 business days."


@pytest.mark.parametrize("answer,kind", [
    ("Orders ship in 5-7 business days.", "long"), ("#### 19", "numeric"), ("12+7=19\n#### 19", "numeric"),
    ("It is 1,000.", "numeric"), ("So the answer is 19.", "numeric"), ("Paris", "short"),
    ("even", "short"), ("\\boxed{x+1}", "short"), ("New York City", "short"),
    ("Yes, you can return any item within 30 days.", "long"),
])
def test_answer_kind(answer, kind):
    from tools.eval_tasks import answer_kind
    assert answer_kind(answer) == kind


def test_short_answers_keep_exact_match_on_the_whole_label(ws):
    """Labels and short phrases: exact match on the label itself, never on a number inside it."""
    from tools.eval_tasks import build_local_task
    rows = [("Which road?", "Route 66"), ("Capital of France?", "Paris"), ("Biggest city?", "New York City"),
            ("Colour of the sky?", "blue")]
    (ws.root / "labels.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                                                  for q, a in rows))
    t = build_local_task("labels.jsonl")
    assert (t.answer_mode, t.metrics) == ("text", ["exact_match"])
    assert [d["target"] for d in read_jsonl(ws.root / t.data_path)] == [a for _, a in rows]


def test_an_extraction_that_does_not_fit_the_answers_is_refused(ws):
    from tools.eval_tasks import build_local_task
    write_support(ws.root / "support.jsonl")
    with pytest.raises(UserError, match="only 0 of 6 reference answers are numbers") as ei:
        build_local_task("support.jsonl", answer_mode="numeric")
    assert ei.value.field == "answer_mode" and "free_text" in ei.value.fix
    with pytest.raises(UserError, match="exact match scores ~0") as ei:
        build_local_task("support.jsonl", answer_mode="text")
    assert ei.value.field == "answer_mode"
    with pytest.raises(UserError, match="finds an answer in only 1 of 6") as ei:
        build_local_task("support.jsonl", answer_regex=r"(\d+-\d+)")
    assert ei.value.field == "answer_regex"
    with pytest.raises(UserError, match="free_text scores the whole reply") as ei:
        build_local_task("support.jsonl", answer_regex=r"(\w+)", answer_mode="free_text")
    assert ei.value.field == "answer_regex"
    # Mostly numbers: numeric is allowed, and the odd row is named in a note.
    write_arith(ws.root / "arith.jsonl")
    with (ws.root / "arith.jsonl").open("a") as fh:
        fh.write(json.dumps({"question": "Name a number.", "answer": "Many exist, pick any one you like."}) + "\n")
    t = build_local_task("arith.jsonl", answer_mode="numeric")
    assert t.answer_mode == "numeric" and any("1 of 11" in n for n in t.notes), t.notes
    assert build_local_task("arith.jsonl").answer_mode == "text"  # auto: not all numbers


def test_answer_mode_and_judge_need_a_local_task(ws, tiny_model):
    from tools.evaluate import evaluate
    for kw, name in (({"answer_mode": "free_text"}, "answer_mode"),
                     ({"judge_url": "http://127.0.0.1:9/v1"}, "judge_url")):
        with pytest.raises(UserError, match="local_task only") as ei:
            evaluate(model="models/tiny-llama", tasks=["gsm8k_cot"], **kw)
        assert ei.value.field == name


def test_zero_for_every_model_is_called_out():
    """base 0.0 vs tuned 0.0 on exact match comes with a note that it measures nothing."""
    from tools.evaluate import ModelRun, TaskMetric, _zero_notes

    def run(v):
        return ModelRun(label="x", backend="hf", apply_chat_template=True, samples_files={},
                        raw_results_file="r.json", elapsed_s=0.0,
                        metrics=[TaskMetric(task="t", metric="exact_match", filter="f", value=v, n=9)])
    (note,) = _zero_notes([run(0.0), run(0.0)])
    assert "0 for every model" in note and "free_text" in note
    assert _zero_notes([run(0.0), run(0.5)]) == []


def judge_reply(req) -> str:
    """A judge that gives 5 to a candidate equal to the reference, 1 otherwise."""
    text = req["messages"][-1]["content"]
    ref = text.split("Reference answer:\n", 1)[1].split("\n\nCandidate answer:\n", 1)[0]
    cand = text.split("\n\nCandidate answer:\n", 1)[1]
    return "score: 5" if cand.strip() == ref.strip() else "Score: 1 (different)"


def test_llm_judge_scores_each_reply(ws, tiny_model, api_deps, monkeypatch):
    """judge_url: every reply of both models goes to the judge with question, reference and reply;
    its 1-5 scores become the 'judge' metric (0..1) side by side; the key only from the named
    variable."""
    from tools.evaluate import evaluate
    write_support(ws.root / "support.jsonl")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-global")
    monkeypatch.setenv("JUDGE_KEY", "judge-secret")
    with chat_server(support_reply) as (url, _), chat_server(judge_reply) as (jurl, jreqs):
        r = evaluate(base_url=url, compare_with="models/tiny-llama", local_task="support.jsonl",
                     max_gen_toks=8, judge_url=jurl, judge_api_key_env="JUDGE_KEY")
    assert len(jreqs) == 12 and all(q["_authorization"] == "Bearer judge-secret" for q in jreqs)
    assert jreqs[0]["model"] == "served" and jreqs[0]["temperature"] == 0
    assert "Reference answer:\n" in jreqs[0]["messages"][-1]["content"]
    tuned, base = r.runs
    jt = next(m for m in tuned.metrics if m.metric == "judge")
    assert jt.value == pytest.approx(2 / 6) and jt.n == 6  # two verbatim replies
    assert jt.stderr == pytest.approx((2 / 6 * 4 / 6 / 5) ** 0.5)
    jb = next(m for m in base.metrics if m.metric == "judge")
    assert jb.value == 0.0
    row = next(c for c in r.comparison if c.metric == "judge")
    assert row.delta == pytest.approx(2 / 6)
    rows = read_jsonl(ws.root / tuned.samples_files["local_support"])
    assert {s["judge_score"] for s in rows} == {1, 5} and rows[0]["judge_reply"]
    assert r.settings["judge"]["model"] == "served"
    saved = "".join(p.read_text() for p in (ws.root / "evals").rglob("*") if p.is_file())
    assert "judge-secret" not in saved


def test_judge_endpoint_policy(ws, tiny_model, monkeypatch):
    from tools.evaluate import evaluate
    monkeypatch.delenv("LLM_FT_ALLOWED_ENDPOINTS", raising=False)  # another test may allow 10.1.2.3
    write_support(ws.root / "support.jsonl")
    for url, needle in (("http://169.254.169.254/v1", "link-local"), ("http://10.1.2.3:8000/v1", "not loopback")):
        with pytest.raises(UserError, match=needle) as ei:
            evaluate(model="models/tiny-llama", local_task="support.jsonl", judge_url=url)
        assert ei.value.field == "judge_url"
    with pytest.raises(UserError, match="not set") as ei:
        evaluate(model="models/tiny-llama", local_task="support.jsonl", judge_url="http://127.0.0.1:9/v1",
                 judge_api_key_env="NO_SUCH_JUDGE_KEY")
    assert ei.value.field == "judge_api_key_env"
