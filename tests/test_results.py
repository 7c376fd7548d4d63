"""Results an agent can relay (issue 10, item 8), over a real MCP client: the text content is the
summary, the key figures and the next calls, not a second copy of the JSON; the summary carries
the figures of the structured content, and the next steps name the right tool and paths."""
from __future__ import annotations

import asyncio
import json

from mcp import Client

from tools.results import SUMMARY_MAX_CHARS


def _rows(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                          {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}]}
            for i in range(n)]


async def _call(c, name: str, **args):
    r = await c.call_tool(name, args)
    assert not r.is_error, r.content[0].text
    text, data = r.content[0].text, r.structured_content
    assert text.splitlines()[0] == data["summary"] and len(data["summary"]) <= SUMMARY_MAX_CHARS
    assert not text.lstrip().startswith("{"), "the text content is a summary, not the JSON"
    assert list(data)[0] == "summary" and list(data)[-1] == "next_steps"
    return text, data


def test_data_and_masking_results_read_as_sentences(ws, tiny_model, monkeypatch):
    monkeypatch.setenv("LLM_FT_STRICT_RESULTS", "1")
    from server.app import create_server
    src = ws.root / "raw.jsonl"
    rows = _rows(12) + _rows(1)  # one duplicate conversation
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tok = ws.rel(tiny_model)

    async def main():
        async with Client(create_server()) as c:
            _, rep = await _call(c, "inspect_dataset", dataset="raw.jsonl")
            assert rep["summary"].startswith("Detected messages in 13 rows (13 analysed): 13 usable")
            assert "1 duplicates" in rep["summary"]
            step = rep["next_steps"][0]
            assert step.startswith("convert_dataset(") and '"raw.jsonl"' in step

            text, conv = await _call(c, "convert_dataset", dataset="raw.jsonl", output_dir="data/pc",
                                     test_size=2)
            assert conv["summary"].startswith("Wrote 10 train + 2 test rows (prompt_completion")
            assert "1 duplicates dropped" in conv["summary"]
            assert "verify_masking(dataset='data/pc'" in conv["next_steps"][0]
            assert "Next: verify_masking(" in text

            _, mask = await _call(c, "verify_masking", dataset="data/pc", tokenizer=tok, max_length=256)
            assert mask["verdict"] == "pass", mask["reasons"]
            assert mask["summary"].startswith(f"Masking passes on {mask['examples_checked']} rows: "
                                              f"{mask['assistant_turns']} of {mask['assistant_turns']}")
            assert "no prompt token trained" in mask["summary"]
            assert mask["next_steps"][0].startswith(f"generate_recipe(model='{tok}', dataset='data/pc'")

            _, runs = await _call(c, "list_runs")
            assert runs["summary"] == "0 run(s) in the workspace, 0 active." and runs["next_steps"] == []
    asyncio.run(main())
