"""generate(): real transformers generation on the tiny model, an adapter on its base vs the base,
the merged model, dataset rows with references, seeded sampling, refusals, and MCP."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tools.errors import UserError

PROMPTS = ["What is 2+2?", "Write one word about the sea."]


@pytest.fixture
def adapter(ws, tiny_model) -> Path:
    from test_merge import make_adapter
    return make_adapter(tiny_model, ws.root / "runs" / "r1" / "output")


def texts(r, k: int) -> list[str]:
    return [row.outputs[k].text for row in r.rows]


def test_adapter_vs_base_side_by_side(ws, tiny_model, adapter):
    """The adapter loads on the base named in adapter_config.json; its replies are the merged
    model's and differ from the base's, which are the base's alone."""
    from tools.generate import generate
    from tools.merge import merge_adapter
    r = generate(model="runs/r1/output", compare_with="models/tiny-llama", prompts=PROMPTS,
                 max_new_tokens=6)
    assert [m.label for m in r.models] == ["fine-tuned", "base"]
    tuned, base = r.models
    assert (tuned.model, tuned.adapter, tuned.tokenizer) == ("models/tiny-llama", "runs/r1/output",
                                                             "runs/r1/output")
    assert base.adapter is None and tuned.chat_template and base.chat_template
    assert tuned.example_prompt == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    for row, p in zip(r.rows, PROMPTS):
        assert row.prompt == p and row.reference is None and row.turns == 1
        assert [o.label for o in row.outputs] == ["fine-tuned", "base"]
        assert all(o.new_tokens == 6 and o.stopped == "max_new_tokens" for o in row.outputs)
    assert texts(r, 0) != texts(r, 1)  # the adapter was applied
    assert r.settings["decoding"] == "greedy" and r.settings["temperature"] is None
    assert "| # | prompt | fine-tuned | base |" in r.table
    alone = generate(model="models/tiny-llama", prompts=PROMPTS, max_new_tokens=6)
    assert texts(alone, 0) == texts(r, 1) and alone.models[0].label == "model"
    merge_adapter(adapter_dir="runs/r1/output", output_dir="models/merged", dtype="fp32")
    merged = generate(model="models/merged", prompts=PROMPTS, max_new_tokens=6)
    assert texts(merged, 0) == texts(r, 0)


def test_chat_template_applied_or_not(ws, tiny_model):
    from tools.generate import generate
    chat = generate(model="models/tiny-llama", prompts=PROMPTS[:1], max_new_tokens=6,
                    system_prompt="Be brief.")
    assert chat.models[0].example_prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert chat.rows[0].system == "Be brief."
    plain = generate(model="models/tiny-llama", prompts=PROMPTS[:1], max_new_tokens=6,
                     apply_chat_template=False)
    assert plain.models[0].example_prompt == "What is 2+2?" and not plain.models[0].chat_template
    assert texts(plain, 0) != texts(chat, 0)


def test_dataset_rows_with_references(ws, tiny_model):
    """A convert_dataset dir: split picks the file, the first `rows` rows come with their
    reference answer and line; conversational rows keep their system turn."""
    from tools.generate import generate
    d = ws.root / "data" / "conv"
    d.mkdir(parents=True)
    rows = [{"prompt": [{"role": "system", "content": "You are a calculator."},
                        {"role": "user", "content": f"What is {i}+1?"}],
             "completion": [{"role": "assistant", "content": f"{i + 1}"}]} for i in range(5)]
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "train.jsonl").write_text(json.dumps({"question": "Train?", "answer": "yes"}) + "\n")
    r = generate(model="models/tiny-llama", dataset="data/conv", rows=3, max_new_tokens=4)
    assert r.source == "data/conv/test.jsonl" and len(r.rows) == 3
    assert [(x.prompt, x.reference, x.line, x.system) for x in r.rows] == [
        (f"What is {i}+1?", str(i + 1), i + 1, "You are a calculator.") for i in range(3)]
    assert "| # | prompt | reference | model |" in r.table
    assert r.models[0].example_prompt.startswith("<|im_start|>system\nYou are a calculator.")
    t = generate(model="models/tiny-llama", dataset="data/conv", split="train", max_new_tokens=2)
    assert t.source == "data/conv/train.jsonl" and [x.reference for x in t.rows] == ["yes"]
    with pytest.raises(UserError, match="without validation.jsonl") as ei:
        generate(model="models/tiny-llama", dataset="data/conv", split="validation")
    assert ei.value.field == "split" and "test" in ei.value.fix


def test_sampling_is_seeded(ws, tiny_model):
    from tools.generate import generate
    kw = dict(model="models/tiny-llama", prompts=PROMPTS, max_new_tokens=8, do_sample=True,
              temperature=1.0)
    a, b = generate(**kw, seed=1), generate(**kw, seed=1)
    c = generate(**kw, seed=2)
    greedy = generate(model="models/tiny-llama", prompts=PROMPTS, max_new_tokens=8)
    assert texts(a, 0) == texts(b, 0)
    assert texts(a, 0) != texts(c, 0) and texts(a, 0) != texts(greedy, 0)
    assert a.settings["decoding"] == "sampled" and a.settings["temperature"] == 1.0


def test_replies_stop_at_the_end_of_turn_token(ws, tiny_model):
    """The chat end-of-turn token (<|im_end|> in ChatML) ends a reply even when the model's
    generation_config names another eos."""
    from transformers import AutoTokenizer

    from tools.generate import _stop_ids
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    tok.eos_token = "<|endoftext|>"  # as in Qwen2.5 base: eos is not the template's end of turn

    class M:  # only generation_config is read
        class generation_config:  # noqa: N801
            eos_token_id = 0

    assert _stop_ids(M, tok) == [0, tok.convert_tokens_to_ids("<|endoftext|>"),
                                 tok.convert_tokens_to_ids("<|im_end|>")]


def test_refusals(ws, tiny_model, adapter, tmp_path):
    from tools.generate import generate
    cases = [
        (dict(model="models/tiny-llama"), "prompts", "nothing to generate"),
        (dict(model="models/tiny-llama", prompts=["a"], dataset="x.jsonl"), "prompts", "either prompts"),
        (dict(model="models/tiny-llama", prompts=[" "]), "prompts[0]", "empty"),
        (dict(model="models/tiny-llama", prompts=["a"], split="test"), "split", "applies to dataset"),
        (dict(model="models/nope", prompts=["a"]), "model", "does not exist"),
        (dict(model="models/tiny-llama", compare_with="Qwen/Qwen2.5-0.5B", prompts=["a"]),
         "compare_with", "does not exist"),
        (dict(model="models/tiny-llama", prompts=["a"] * 33), "prompts", "at most 32"),
    ]
    for kw, field, needle in cases:
        with pytest.raises(UserError, match=needle) as ei:
            generate(**kw)
        assert ei.value.field == field, (kw, ei.value)
    # An adapter whose base is a hub id, or a folder outside the workspace: local models only.
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    for base, needle in (("Qwen/Qwen2.5-0.5B", "local models only"), (str(tmp_path), "outside")):
        cfg_path.write_text(json.dumps({**cfg, "base_model_name_or_path": base}))
        with pytest.raises(UserError, match=needle) as ei:
            generate(model="runs/r1/output", prompts=["a"])
        assert ei.value.field == "model (adapter_config.json base_model_name_or_path)"
    r = generate(model="runs/r1/output", base_model="models/tiny-llama", prompts=["a"], max_new_tokens=2)
    assert r.models[0].model == "models/tiny-llama" and r.models[0].adapter == "runs/r1/output"


def test_mcp_generate(ws, tiny_model, adapter):
    from mcp import Client
    from mcp.server.mcpserver import MCPServer

    import server.post

    mcp = MCPServer("generate-test")
    server.post.register(mcp)

    async def go():
        async with Client(mcp) as c:
            tools = {t.name: t for t in (await c.list_tools()).tools}
            ann = tools["generate"].annotations
            assert (ann.read_only_hint, ann.destructive_hint, ann.open_world_hint) == (True, False, False)
            assert tools["generate"].description.startswith("Spot-check a model")
            r = await c.call_tool("generate", {"model": "runs/r1/output", "compare_with": "models/tiny-llama",
                                               "prompts": PROMPTS, "max_new_tokens": 4})
            assert not r.is_error, r.content
            sc = r.structured_content
            assert len(sc["rows"]) == 2 and [o["label"] for o in sc["rows"][0]["outputs"]] == ["fine-tuned", "base"]
            assert sc["models"][0]["adapter"] == "runs/r1/output"
            cut = sum(row["outputs"][0]["stopped"] == "max_new_tokens" for row in sc["rows"])
            differ = sum(row["outputs"][0]["text"] != row["outputs"][1]["text"] for row in sc["rows"])
            assert sc["summary"].startswith("2 prompt(s), fine-tuned (runs/r1/output) vs base (models/tiny-llama)")
            assert f"{differ} of 2 replies differ" in sc["summary"] and f"fine-tuned {cut}" in sc["summary"]
            assert "evaluate(adapter='runs/r1/output', compare_with='models/tiny-llama', local_task=" \
                in sc["next_steps"][-1]
            assert r.content[0].text.startswith(sc["summary"])
            r = await c.call_tool("generate", {"model": "models/tiny-llama", "prompts": ["a"],
                                               "dataset": "data/x.jsonl"})
            assert r.is_error and "prompts:" in r.content[0].text and "Fix:" in r.content[0].text
            r = await c.call_tool("generate", {"model": "models/tiny-llama", "prompts": ["a"],
                                               "temperature": 0})
            assert r.is_error and "temperature" in r.content[0].text
    asyncio.run(go())
