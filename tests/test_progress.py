"""Long calls send MCP progress notifications when the client gives a progress token (SDK client)."""
from __future__ import annotations

import asyncio
import json
import shutil

import pytest

from conftest import FIXTURES as FIX  # noqa: E402


def _call_with_progress(name: str, args: dict) -> tuple[list[tuple], object]:
    from mcp import Client

    from server.app import create_server
    seen: list[tuple] = []

    async def on_progress(progress, total, message):
        seen.append((progress, total, message))

    async def go():
        async with Client(create_server()) as c:
            return await c.call_tool(name, args, progress_callback=on_progress)
    return seen, asyncio.run(go())


def test_verify_masking_reports_its_steps(ws):
    d = ws.root / "data/pc"
    d.mkdir(parents=True)
    rows = [{"prompt": [{"role": "user", "content": f"{i}+{i}?"}],
             "completion": [{"role": "assistant", "content": str(2 * i)}]} for i in range(5)]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copytree(FIX / "tokenizers/qwen2_5", ws.root / "tok")
    seen, r = _call_with_progress("verify_masking", {"dataset": "data/pc", "tokenizer": "tok"})
    assert not r.is_error, r.content
    steps = [p for p, _, _ in seen]  # throttled to a few a second: some steps may merge
    assert steps[0] == 0 and steps[-1] == 4 and steps == sorted(steps) and len(steps) >= 3
    assert all(t == 4 for _, t, _ in seen)
    assert seen[-1][2].startswith("verdict ")


def test_spectrum_scan_reports_matrices(ws, tiny_model):
    seen, r = _call_with_progress("spectrum_scan", {"model": "models/tiny-llama"})
    assert not r.is_error, r.content
    assert seen and "matrices scanned" in seen[-1][2]


@pytest.mark.parametrize("tool", ["verify_masking", "spectrum_scan"])
def test_the_schema_does_not_show_the_context(tool):
    from mcp import Client

    from server.app import create_server

    async def go():
        async with Client(create_server()) as c:
            return {t.name: t for t in (await c.list_tools()).tools}[tool]
    t = asyncio.run(go())
    assert "ctx" not in t.input_schema.get("properties", {})
    assert "ctx" not in t.input_schema.get("required", [])


def test_merge_adapter_reports_its_steps(ws, tiny_model):
    from test_merge import make_adapter
    make_adapter(tiny_model, ws.root / "ad")
    seen, r = _call_with_progress("merge_adapter", {"adapter_dir": "ad", "output_dir": "merged",
                                                    "base_model": "models/tiny-llama"})
    assert not r.is_error, r.content
    assert seen[0][0] == 0 and seen[-1][:2] == (5, 5) and seen[-1][2] == "verified=True"


def test_evaluate_reports_each_model(ws, tiny_model):
    from test_evaluate import write_arith
    write_arith(ws.root / "arith.jsonl")
    seen, r = _call_with_progress("evaluate", {"model": "models/tiny-llama", "local_task": "arith.jsonl",
                                               "limit": 2, "max_gen_toks": 4})
    assert not r.is_error, r.content
    assert seen[0][:2] == (0, 1) and seen[-1][:2] == (1, 1)


def test_convert_dataset_reports_rows(ws):
    rows = [{"question": f"q{i}?", "answer": f"a{i}"} for i in range(2500)]
    (ws.root / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen, r = _call_with_progress("convert_dataset", {"dataset": "qa.jsonl", "output_dir": "conv"})
    assert not r.is_error, r.content
    assert seen and seen[0][2] == "1000 rows read"
