"""get_model_facts: computed parameter counts, aliases, local configs, errors (also through MCP)."""
from __future__ import annotations

import asyncio
import json

import pytest

from tools.errors import UserError
from tools.models import CATALOG, get_model_facts

# Published exact counts (model cards / safetensors metadata); ours are computed from the shapes.
PUBLISHED = {
    "Llama-3.1-8B": 8_030_261_248, "Llama-3.1-70B": 70_553_706_496, "Llama-3.1-405B": 405_853_388_800,
    "Llama-3.2-1B": 1_235_814_400, "Llama-3.2-3B": 3_212_749_824, "Qwen2.5-0.5B": 494_032_768,
    "Qwen2.5-7B": 7_615_616_512, "Mistral-7B-v0.1": 7_241_732_096, "Mixtral-8x7B-v0.1": 46_702_792_704,
}


@pytest.mark.parametrize("name,count", sorted(PUBLISHED.items()))
def test_published_counts(ws, name, count):
    f = get_model_facts(name)
    assert f.source == "catalog"
    assert f.total_params == count


def test_every_catalog_entry_is_consistent(ws):
    for name in CATALOG:
        f = get_model_facts(name)
        assert f.linear_params < f.total_params
        assert f.active_params <= f.total_params
        assert f.embedding_params == f.vocab_size * f.hidden_size * (1 if f.tie_word_embeddings else 2)


def test_moe_active_params(ws):
    f = get_model_facts("Mixtral-8x7B")
    assert (f.num_experts, f.num_experts_per_tok) == (8, 2)
    assert 12.8e9 < f.active_params < 13.0e9  # "12.9B active"


@pytest.mark.parametrize("alias,name", [
    ("meta-llama/Llama-3.1-8B", "Llama-3.1-8B"), ("Llama-3.1-8B-Instruct", "Llama-3.1-8B-Instruct"),
    ("meta-llama/Meta-Llama-3.1-8B-Instruct", "Llama-3.1-8B-Instruct"), ("LLAMA-3.2-1B", "Llama-3.2-1B"),
    ("Qwen/Qwen2.5-7B-Instruct", "Qwen2.5-7B-Instruct"),
    ("mistralai/Mixtral-8x7B-Instruct-v0.1", "Mixtral-8x7B-Instruct-v0.1"),
    ("google/gemma-2-9b-it", "gemma-2-9b-it"), ("microsoft/Phi-3-mini-4k-instruct", "Phi-3-mini-4k-instruct"),
    ("mixtral-8x7b", "Mixtral-8x7B-v0.1"),
])
def test_aliases(ws, alias, name):
    assert get_model_facts(alias).name == name


# (given, catalog name, exact hub id, variant): base and instruct are different repositories.
VARIANTS = [
    ("Qwen2.5-7B-Instruct", "Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct", "instruct"),
    ("qwen2.5-7b", "Qwen2.5-7B", "Qwen/Qwen2.5-7B", "base"),
    ("Llama-3.1-8B-Instruct", "Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B-Instruct", "instruct"),
    ("Llama-3.1-8B", "Llama-3.1-8B", "meta-llama/Llama-3.1-8B", "base"),
    ("gemma-2-9b-it", "gemma-2-9b-it", "google/gemma-2-9b-it", "instruct"),
    ("gemma-2-9b", "gemma-2-9b", "google/gemma-2-9b", "base"),
    ("Qwen3-8B", "Qwen3-8B", "Qwen/Qwen3-8B", "instruct"),  # Qwen3's plain name is the chat model
    ("Qwen3-8B-Base", "Qwen3-8B-Base", "Qwen/Qwen3-8B-Base", "base"),
    ("Mistral-7B-Instruct-v0.3", "Mistral-7B-Instruct-v0.3", "mistralai/Mistral-7B-Instruct-v0.3", "instruct"),
    ("Llama-3.3-70B-Instruct", "Llama-3.3-70B-Instruct", "meta-llama/Llama-3.3-70B-Instruct", "instruct"),
    # a full hub id is kept as given, whoever publishes it
    ("Qwen/Qwen2.5-7B-Instruct", "Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct", "instruct"),
    ("unsloth/Qwen2.5-7B-Instruct", "Qwen2.5-7B-Instruct", "unsloth/Qwen2.5-7B-Instruct", "instruct"),
]


@pytest.mark.parametrize("given,name,hub_id,variant", VARIANTS)
def test_a_variant_keeps_its_exact_hub_id(ws, given, name, hub_id, variant):
    """'-Instruct' was dropped: Qwen2.5-7B-Instruct came back as Qwen/Qwen2.5-7B (another model)."""
    f = get_model_facts(given)
    assert (f.name, f.hub_id, f.variant) == (name, hub_id, variant)


def test_variants_share_architecture_numbers_not_hub_ids(ws):
    base, chat = get_model_facts("Qwen2.5-7B"), get_model_facts("Qwen2.5-7B-Instruct")
    assert base.total_params == chat.total_params and base.hub_id != chat.hub_id
    ids = [hub for hub, _ in CATALOG.values()]
    assert len(ids) == len(set(ids)), "two catalog names map to one repository"
    for name, (hub, _) in CATALOG.items():
        assert hub.split("/")[-1].lower() == name.lower(), (name, hub)  # the name is the repository


def test_renamed_repos_are_said_and_others_are_not(ws):
    """Only a repository its owner really renamed gets the redirect note (the note once claimed
    Qwen/Qwen2.5-7B-Instruct had become Qwen/Qwen2.5-7B)."""
    old = get_model_facts("meta-llama/Meta-Llama-3.1-8B-Instruct")
    assert old.hub_id == "meta-llama/Meta-Llama-3.1-8B-Instruct"  # kept as given
    assert any("renamed 'meta-llama/Llama-3.1-8B-Instruct'" in n for n in old.notes), old.notes
    assert not any("renamed" in n for n in get_model_facts("Qwen/Qwen2.5-7B-Instruct").notes)
    short = get_model_facts("gemma-3-1b")  # no bare repository: read as the base, and said
    assert short.hub_id == "google/gemma-3-1b-pt" and any("gemma-3-1b-it" not in n and "base" in n
                                                           for n in short.notes)


def test_tiny_model_count_matches_torch(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM
    f = get_model_facts(str(tiny_model.relative_to(tiny_model.parents[1])))
    assert f.source == "local" and f.architecture == "llama"
    m = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    assert f.total_params == sum(p.numel() for p in m.parameters())


def test_qwen2_bias_counted_exactly(ws):
    # A real Qwen2 module built from the catalog config has exactly the computed count.
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = dict(CATALOG["Qwen2.5-0.5B"][1])
    small = {**cfg, "num_hidden_layers": 2, "vocab_size": 1000}
    (ws.root / "q").mkdir()
    (ws.root / "q" / "config.json").write_text(json.dumps(small))
    f = get_model_facts("q")
    with torch.device("meta"):
        m = Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in small.items() if k != "model_type"}))
    assert f.attention_bias and f.total_params == sum(p.numel() for p in m.parameters())


def test_unknown_model_suggests_names(ws):
    with pytest.raises(UserError) as e:
        get_model_facts("Llama-3.1-9B")
    assert e.value.field == "model" and "Llama-3.1-8B" in str(e.value)


def test_invalid_config(ws):
    (ws.root / "broken").mkdir()
    (ws.root / "broken" / "config.json").write_text("{not json")
    with pytest.raises(UserError) as e:
        get_model_facts("broken")
    assert e.value.field == "model" and "config.json" in str(e.value)
    (ws.root / "partial").mkdir()
    (ws.root / "partial" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(UserError, match="vocab_size"):
        get_model_facts("partial")


def test_path_outside_workspace(ws, tmp_path):
    with pytest.raises(UserError) as e:
        get_model_facts(str(tmp_path))
    assert e.value.field == "model"


def test_mcp_get_model_facts(ws):
    from mcp import Client
    from server.app import create_server

    async def go():
        async with Client(create_server()) as c:
            r = await c.call_tool("get_model_facts", {"model": "Qwen2.5-7B"})
            assert not r.is_error and r.structured_content["total_params"] == 7_615_616_512
            got = r.structured_content  # the summary carries the count; the next call plans this model
            assert "7.62B parameters" in got["summary"] and got["summary"] in r.content[0].text
            assert got["next_steps"][0] == "recommend_method(model='Qwen2.5-7B')"
            bad = await c.call_tool("get_model_facts", {"model": "no-such-model-xyz"})
            assert bad.is_error and "model:" in bad.content[0].text
            again = await c.call_tool("get_model_facts", {"model": "Llama-3.2-1B"})
            assert not again.is_error and again.structured_content["tie_word_embeddings"] is True
    asyncio.run(go())
