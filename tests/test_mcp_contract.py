"""Every tool through an in-memory MCP client on the full server: a real call's structured output
validates against the tool's advertised outputSchema, and a bad argument comes back as an error
result that names the field and the fix, with the server still answering."""
from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest

QA = [{"question": f"What is {a}+{b}?", "answer": f"#### {a + b}"} for a in range(6) for b in range(5)]


@pytest.fixture
def contract_ws(ws, tiny_model):
    from test_merge import make_adapter
    (ws.root / "data").mkdir()
    with (ws.root / "data" / "qa.jsonl").open("w") as fh:
        for r in QA:
            fh.write(json.dumps(r) + "\n")
    make_adapter(tiny_model, ws.root / "adapters" / "a")
    with (ws.root / "data" / "pref.jsonl").open("w") as fh:  # HH-RLHF style preference pairs
        for a, b in [(1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7)]:
            q = f"\n\nHuman: What is {a}+{b}?\n\nAssistant:"
            fh.write(json.dumps({"chosen": f"{q} {a + b}.", "rejected": f"{q} I do not know."}) + "\n")
    yield ws
    from tools.run_registry import active_runs, signal_run
    for st in active_runs():
        signal_run(st, __import__("signal").SIGKILL)


# tool -> (good arguments, bad arguments, text the error must contain)
CASES = {
    "detect_hardware": ({}, None, None),
    "get_model_facts": ({"model": "Qwen2.5-7B"}, {"model": "no-such-model-xyz"}, "model"),
    "estimate_memory": ({"model": "Llama-3.1-8B", "method": "lora", "gpu": "A100 80GB"},
                        {"model": "Llama-3.1-8B", "gpu": "Voodoo 3"}, "gpu"),
    "recommend_method": ({"model": "models/tiny-llama", "dataset_rows": 30, "seq_len": 64},
                         {"model": "Llama-3.1-8B", "seq_len": 10 ** 7}, "seq_len"),
    "inspect_dataset": ({"dataset": "data/qa.jsonl"}, {"dataset": "data/missing.jsonl"}, "dataset"),
    "convert_dataset": ({"dataset": "data/qa.jsonl", "output_dir": "data/qa"},
                        {"dataset": "data/qa.jsonl", "output_dir": "data/qa2",
                         "column_mapping": {"prompt": "nope", "completion": "answer"}}, "nope"),
    "verify_masking": ({"dataset": "data/qa", "tokenizer": "models/tiny-llama", "max_length": 64},
                       {"dataset": "data/qa", "tokenizer": "models/missing"}, "tokenizer"),
    "generate_recipe": ({"model": "models/tiny-llama", "dataset": "data/qa", "method": "lora",
                         "output_path": "recipes/r.yaml", "output_dir": "out/r", "seq_len": 64},
                        {"model": "models/tiny-llama", "dataset": "data/none"}, "dataset"),
    "validate_recipe": ({"recipe": "recipes/r.yaml"}, {"recipe": "recipes/missing.yaml"}, "recipe"),
    "spectrum_scan": ({"model": "models/tiny-llama", "top_percent": 50},
                      {"model": "models/tiny-llama", "top_percent": 0}, "top_percent"),
    "launch_training": ({"recipe": "recipes/r.yaml", "require_masking_report": False},
                        {"recipe": "recipes/missing.yaml"}, "recipe"),
    # good arguments that need an earlier result are functions of the saved results
    "training_status": (lambda got: {"run_id": got["launch_training"]["run_id"], "log_lines": 5},
                        {"run_id": "no-such-run"}, "run_id"),
    "stop_training": (lambda got: {"run_id": got["launch_training"]["run_id"], "timeout_s": 60},
                      {"run_id": "no-such-run"}, "run_id"),
    "list_runs": ({}, None, None),
    "merge_adapter": ({"adapter_dir": "adapters/a", "output_dir": "models/merged", "dtype": "fp32"},
                      {"adapter_dir": "models/tiny-llama", "output_dir": "models/m"}, "adapter_config.json"),
    "evaluate": ({"model": "models/merged", "local_task": "data/qa/train.jsonl", "limit": 2, "max_gen_toks": 4,
                  "batch_size": 2},
                 {"model": "models/missing", "local_task": "data/qa/train.jsonl"}, "model"),
    "generate": ({"model": "adapters/a", "compare_with": "models/tiny-llama", "dataset": "data/qa",
                  "split": "train", "rows": 2, "max_new_tokens": 4},
                 {"model": "models/tiny-llama", "dataset": "data/qa", "split": "nope"}, "split"),
    "export_model": ({"model": "models/merged", "output_dir": "exports/tiny", "formats": ["f16"]},
                     {"model": "models/missing", "output_dir": "exports/x"}, "model"),
    "push_to_hub": ({"folder": "models/merged", "repo_id": "me/tiny-sft"},
                    {"folder": "models/missing", "repo_id": "me/tiny-sft"}, "folder"),
    "convert_preference": ({"dataset": "data/pref.jsonl", "output_dir": "data/pref"},
                           {"dataset": "data/pref.jsonl", "output_dir": "data/pref2",
                            "column_mapping": {"chosen": "nope"}}, "column_mapping"),
    "verify_preference": ({"dataset": "data/pref", "tokenizer": "models/tiny-llama", "max_length": 128},
                          {"dataset": "data/pref", "tokenizer": "models/missing"}, "tokenizer"),
    "generate_dpo_recipe": ({"model": "models/tiny-llama", "dataset": "data/pref",
                             "output_path": "recipes/dpo.yaml", "output_dir": "out/dpo", "cpu": True},
                            {"model": "models/tiny-llama", "dataset": "data/pref",
                             "output_path": "recipes/dpo2.yaml", "output_dir": "out/dpo2", "cpu": True,
                             "overrides": {"betta": 0.2}}, "betta"),
}


def test_every_tool_honours_its_schema_and_error_contract(contract_ws):
    from mcp import Client

    from server.app import create_server

    async def main():
        async with Client(create_server()) as c:
            tools = {t.name: t for t in (await c.list_tools()).tools}
            assert set(tools) == set(CASES), set(tools) ^ set(CASES)
            # Order matters: convert before masking/recipe, generate before validate, launch
            # before status/stop, merge before evaluate.
            got: dict[str, dict] = {}
            for name, (good, bad, needle) in CASES.items():
                schema = tools[name].output_schema
                assert good is not None, f"{name}: every tool is called with a real result"
                if name == "export_model":
                    # The tiny byte-level tokenizer is not one llama.cpp's converter knows (it
                    # refuses it, tested in test_export.py, where real exports run on a tiny
                    # model with the Qwen2.5 tokenizer): here only the error contract.
                    good = None
                if good is None:
                    r = await c.call_tool(name, bad)
                    assert r.is_error and needle in r.content[0].text, (name, r.content[0].text[:300])
                    continue
                args = good(got) if callable(good) else good
                r = await c.call_tool(name, args)
                assert not r.is_error, (name, r.content[0].text[:500])
                jsonschema.validate(r.structured_content, schema)
                got[name] = r.structured_content
                if bad is not None:
                    r = await c.call_tool(name, bad)
                    text = r.content[0].text
                    assert r.is_error, (name, text[:300])
                    assert needle in text, (name, text[:300])
                    assert "failed unexpectedly" not in text, (name, text[:300])
            assert (await c.call_tool("list_runs", {})).is_error is False
    asyncio.run(main())


def test_schemas_carry_no_generated_titles():
    """pydantic's titles repeat each property's name: a sixth of tools/list, paid by every client."""
    from mcp import Client

    from server.app import create_server

    async def go():
        async with Client(create_server()) as c:
            return [t.model_dump(mode="json", by_alias=True, exclude_none=True)
                    for t in (await c.list_tools()).tools]

    def titles(o):
        if isinstance(o, dict):
            return int(isinstance(o.get("title"), str)) + sum(
                titles(v) for k, v in o.items() if k != "properties") + sum(
                titles(v) for v in (o.get("properties") or {}).values())
        return sum(titles(x) for x in o) if isinstance(o, list) else 0
    tools = asyncio.run(go())
    assert tools and sum(titles(t.get("inputSchema")) + titles(t.get("outputSchema")) for t in tools) == 0
