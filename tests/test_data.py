"""inspect_dataset / convert_dataset on the real dataset fixtures, bad inputs, streaming memory,
TRL acceptance of the output, and the MCP wiring."""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tools.data import convert_dataset, inspect_dataset
from tools.errors import UserError

from conftest import REPO  # noqa: E402 - one definition of the repo root

ORCA_SYSTEM = (
    "Solve the given high school math problem by providing a clear explanation of each step leading "
    "to the final solution.\n\nProvide a detailed breakdown of your calculations, beginning with an "
    "explanation of the problem and describing how you derive each formula, value, or conclusion. "
    "Use logical steps that build upon one another, to arrive at the final answer in a systematic "
    "manner.\n\n# Steps\n\n1. **Understand the Problem**: Restate the given math problem and clearly "
    "identify the main question and any important given values.\n2. **Set Up**: Identify the key "
    "formulas or concepts that could help solve the problem (e.g., algebraic manipulation, geometry "
    "formulas, trigonometric identities).\n3. **Solve Step-by-Step**: Iteratively progress through "
    "each step of the math problem, justifying why each consecutive operation brings you closer to "
    "the solution.\n4. **Double Check**: If applicable, double check the work for accuracy and sense, "
    "and mention potential alternative approaches if any.\n5. **Final Answer**: Provide the numerical "
    "or algebraic solution clearly, accompanied by appropriate units if relevant.\n\n# Notes\n\n- "
    "Always clearly define any variable or term used.\n- Wherever applicable, include unit "
    "conversions or context to explain why each formula or step has been chosen.\n- Assume the level "
    "of mathematics is suitable for high school, and avoid overly advanced math techniques unless "
    "they are common at that level.\n")

# fixture -> (path under tests/fixtures/datasets, format, mapping, rows)
DATASET_FIXTURES = {
    "gsm8k": ("gsm8k/train_first1000.jsonl", "question_answer",
              {"prompt": "question", "completion": "answer"}, 1000),
    "gsm8k_test": ("gsm8k/test_first200.jsonl", "question_answer",
                   {"prompt": "question", "completion": "answer"}, 200),
    "alpaca": ("alpaca/alpaca_data_first2000.jsonl", "alpaca",
               {"instruction": "instruction", "output": "output", "input": "input"}, 2000),
    "toy_chat": ("openai_chat/toy_chat_fine_tuning.jsonl", "messages", {"messages": "messages"}, 5),
    "drone": ("openai_chat/drone_training_first83.jsonl", "messages",
              {"messages": "messages", "tools": "tools"}, 83),
    "fastchat": ("sharegpt/fastchat_dummy_conversation_first400.json", "sharegpt",
                 {"conversations": "conversations"}, 400),
    "glaive": ("sharegpt/glaive_toolcall_en_demo_first240.json", "sharegpt",
               {"conversations": "conversations", "tools": "tools"}, 240),
}


def put(ws, fixtures_dir, name: str) -> str:
    """Copy a dataset fixture into the workspace; return its workspace-relative path."""
    rel = DATASET_FIXTURES[name][0]
    dst = ws.root / "data" / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(fixtures_dir / "datasets" / rel, dst)
    return f"data/{rel}"


def write_jsonl(ws, name: str, rows, raw_lines=None) -> str:
    p = ws.root / name
    p.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in rows] if raw_lines is None else raw_lines
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return name


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def no_leftovers(ws, name: str):
    """Neither the output dir nor a temp sibling exists."""
    assert not (ws.root / name).exists()
    assert not [p for p in ws.root.iterdir() if p.name.startswith(f".{name}.")]


# ---- detection and conversion of every fixture -------------------------------------------

@pytest.mark.parametrize("name", sorted(DATASET_FIXTURES))
def test_inspect_detects_each_fixture(ws, fixtures_dir, name):
    path = put(ws, fixtures_dir, name)
    _, fmt, mapping, rows = DATASET_FIXTURES[name]
    r = inspect_dataset(path)
    assert r.detected_format == fmt
    assert r.column_mapping == mapping
    assert r.rows == rows and r.rows_sampled == min(rows, 1000)
    assert r.location_unit == "line"
    assert r.suggested_conversion.arguments["source_format"] == fmt
    assert r.suggested_conversion.arguments["column_mapping"] == mapping
    assert r.samples


@pytest.mark.parametrize("name", sorted(DATASET_FIXTURES))
@pytest.mark.parametrize("target", ["prompt_completion", "messages"])
def test_convert_each_fixture(ws, fixtures_dir, name, target):
    path = put(ws, fixtures_dir, name)
    rep = convert_dataset(path, "out", target_format=target, test_size=0.1)
    c = rep.counts
    assert c.read == DATASET_FIXTURES[name][3]
    assert c.read == c.converted + c.skipped + c.duplicates
    assert c.train + c.test == c.converted and c.test == -(-c.converted // 10)
    train = read_jsonl(ws.root / "out" / "train.jsonl")
    test = read_jsonl(ws.root / "out" / "test.jsonl")
    assert (len(train), len(test)) == (c.train, c.test)
    assert sorted(p.name for p in (ws.root / "out").iterdir()) == ["test.jsonl", "train.jsonl"]
    for row in train + test:
        if target == "messages":
            msgs = row["messages"]
            assert msgs[-1]["role"] == "assistant"
        else:
            assert [m["role"] for m in row["completion"]] == ["assistant"]
            assert row["prompt"] and row["prompt"][-1]["role"] in ("user", "tool")
            msgs = row["prompt"] + row["completion"]
        assert {m["role"] for m in msgs} <= {"system", "user", "assistant", "tool"}
        assert next(m for m in msgs if m["role"] != "system")["role"] == "user"
    assert rep.samples and rep.files["train"] == "out/train.jsonl"


def test_gsm8k_to_prompt_completion_with_orca_system_prompt(ws, fixtures_dir):
    path = put(ws, fixtures_dir, "gsm8k")
    rep = convert_dataset(path, "gsm", system_prompt=ORCA_SYSTEM, shuffle=False)
    assert rep.source_format == "question_answer" and rep.counts.system_prompt_added == 1000
    src = read_jsonl(ws.root / path)
    out = read_jsonl(ws.root / "gsm" / "train.jsonl")
    assert len(out) == 1000
    assert out[0] == {"prompt": [{"role": "system", "content": ORCA_SYSTEM},
                                 {"role": "user", "content": src[0]["question"]}],
                      "completion": [{"role": "assistant", "content": src[0]["answer"]}]}
    assert out[-1]["completion"][0]["content"].endswith("#### " + src[-1]["answer"].split("#### ")[-1])


def test_alpaca_joins_instruction_and_input_and_skips_empty_output(ws, fixtures_dir):
    path = put(ws, fixtures_dir, "alpaca")
    src = read_jsonl(ws.root / path)
    rep = convert_dataset(path, "al", target_format="messages", shuffle=False, dedupe="none")
    out = read_jsonl(ws.root / "al" / "train.jsonl")
    empty = [i + 1 for i, r in enumerate(src) if not r["output"].strip()]
    assert rep.counts.skipped == len(empty) and rep.skipped[0].kind == "empty_content"
    assert rep.skipped[0].lines == empty[:20] and 285 in empty
    with_input = next(i for i, r in enumerate(src) if r["input"].strip())
    assert out[with_input]["messages"][0]["content"] == \
        f"{src[with_input]['instruction']}\n\n{src[with_input]['input']}"
    assert out[0]["messages"][0]["content"] == src[0]["instruction"]


def test_toy_chat_problems_and_multi_turn_rule(ws, fixtures_dir):
    path = put(ws, fixtures_dir, "toy_chat")
    r = inspect_dataset(path)
    kinds = {p.kind: p for p in r.problems}
    assert set(kinds) == {"assistant_first"} and kinds["assistant_first"].lines == [4]
    assert r.usable_rows == 4 and r.roles["assistant"] == 8
    rep = convert_dataset(path, "toy", shuffle=False)
    assert rep.skipped[0].kind == "assistant_first" and rep.skipped[0].lines == [4]
    src = read_jsonl(ws.root / path)
    out = read_jsonl(ws.root / "toy" / "train.jsonl")
    multi = src[1]["messages"]  # system, then 4 user/assistant exchanges
    assert [m["role"] for m in multi] == ["system"] + ["user", "assistant"] * 4
    assert out[1] == {"prompt": multi[:-1], "completion": multi[-1:]}


def test_drone_tool_calls_kept_with_tools_column(ws, fixtures_dir):
    path = put(ws, fixtures_dir, "drone")
    rep = convert_dataset(path, "dr", shuffle=False)
    assert rep.dropped_columns == ["parallel_tool_calls"]
    src = read_jsonl(ws.root / path)
    out = read_jsonl(ws.root / "dr" / "train.jsonl")
    assert out[0]["tools"] == src[0]["tools"]
    call = out[0]["completion"][0]["tool_calls"][0]
    # OpenAI stores arguments as a JSON string; chat templates expect an object.
    assert call["function"] == {"name": "takeoff_drone", "arguments": {"altitude": 100}}
    assert [m["role"] for m in out[0]["prompt"]] == ["system", "user"]


def test_glaive_function_call_and_observation(ws, fixtures_dir):
    path = put(ws, fixtures_dir, "glaive")
    src = json.loads((ws.root / path).read_text())
    r = inspect_dataset(path)
    assert r.roles["tool"] == 162 and not r.problems
    assert r.rows_with_tools == sum(bool(json.loads(x["tools"])) for x in src) == 148
    assert r.duplicate_rows == 23  # the demo file repeats conversations
    rep = convert_dataset(path, "gl", shuffle=False, dedupe="none")
    assert rep.counts.converted == 240
    out = read_jsonl(ws.root / "gl" / "train.jsonl")
    first, conv = out[0], src[0]["conversations"]
    role_of = {"human": "user", "gpt": "assistant", "function_call": "assistant", "observation": "tool"}
    assert [m["role"] for m in first["prompt"]] == [role_of[t["from"]] for t in conv[:-1]]
    assert first["completion"] == [{"role": "assistant", "content": conv[-1]["value"]}]
    i = next(i for i, t in enumerate(conv) if t["from"] == "function_call")
    call = first["prompt"][i]["tool_calls"][0]["function"]
    assert call == json.loads(conv[i]["value"])  # {name, arguments-as-object}
    assert call["name"] == "search_recipes"
    assert first["prompt"][i + 1] == {"role": "tool", "content": conv[i + 1]["value"]}
    assert first["tools"] == [{"type": "function", "function": json.loads(src[0]["tools"])[0]}]
    dedup = convert_dataset(path, "gl2")
    assert dedup.counts.duplicates == 23 and dedup.counts.converted == 217


def test_load_dataset_reads_train_and_test(ws, fixtures_dir):
    from datasets import load_dataset
    for name in ("drone", "glaive", "gsm8k_test"):
        convert_dataset(put(ws, fixtures_dir, name), f"ld_{name}", test_size=5)
        ds = load_dataset(str(ws.root / f"ld_{name}"))
        assert set(ds) == {"train", "test"} and len(ds["test"]) == 5
    ex = load_dataset(str(ws.root / "ld_glaive"))["train"]
    assert "tools" in ex.column_names and "prompt" in ex.column_names


# ---- multi-turn rule, dedupe, split ---------------------------------------------------------

def test_trailing_turns_after_last_assistant_are_dropped(ws):
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"},
                          {"role": "user", "content": "thanks"}]}]
    path = write_jsonl(ws, "t.jsonl", rows)
    rep = convert_dataset(path, "o")
    out = read_jsonl(ws.root / "o" / "train.jsonl")[0]
    assert [m["content"] for m in out["prompt"]] == ["a", "b", "c"]
    assert out["completion"] == [{"role": "assistant", "content": "d"}]
    assert rep.counts.trailing_turns_dropped == 1
    msgs = read_jsonl(ws.root / convert_dataset(path, "m", target_format="messages").files["train"])
    assert [m["content"] for m in msgs[0]["messages"]] == ["a", "b", "c", "d"]


def test_dedupe_exact_and_normalized(ws):
    rows = [{"question": "What is 2+2?", "answer": "4"},
            {"question": "What is 2+2?", "answer": "4"},          # exact duplicate
            {"question": "what  is 2+2? ", "answer": "4"},        # duplicate once normalized
            {"question": "What is 3+3?", "answer": "6"}]
    path = write_jsonl(ws, "d.jsonl", rows)
    assert convert_dataset(path, "n", dedupe="none").counts.converted == 4
    ex = convert_dataset(path, "e", dedupe="exact")
    assert (ex.counts.converted, ex.counts.duplicates, ex.duplicate_lines) == (3, 1, [2])
    no = convert_dataset(path, "z", dedupe="normalized")
    assert (no.counts.converted, no.counts.duplicates, no.duplicate_lines) == (2, 2, [2, 3])
    assert inspect_dataset(path).duplicate_row_lines == [2]


def test_split_sizes_and_seed_determinism(ws, fixtures_dir):
    path = put(ws, fixtures_dir, "gsm8k_test")
    a = convert_dataset(path, "a", test_size=0.25, seed=1)
    b = convert_dataset(path, "b", test_size=0.25, seed=1)
    c = convert_dataset(path, "c", test_size=0.25, seed=2)
    assert (a.counts.train, a.counts.test) == (150, 50)
    for f in ("train.jsonl", "test.jsonl"):
        assert (ws.root / "a" / f).read_bytes() == (ws.root / "b" / f).read_bytes()
    assert (ws.root / "a" / "test.jsonl").read_bytes() != (ws.root / "c" / "test.jsonl").read_bytes()
    tr, te = read_jsonl(ws.root / "a" / "train.jsonl"), read_jsonl(ws.root / "a" / "test.jsonl")
    keys = {json.dumps(r) for r in tr}
    assert not keys & {json.dumps(r) for r in te} and len(keys | {json.dumps(r) for r in te}) == 200
    src_order = [r["question"] for r in read_jsonl(ws.root / path)]
    assert [r["prompt"][0]["content"] for r in tr] != src_order[:150]  # shuffled
    d = convert_dataset(path, "d", test_size=30, shuffle=False)
    assert (d.counts.train, d.counts.test) == (170, 30)
    assert [r["prompt"][0]["content"] for r in read_jsonl(ws.root / "d" / "test.jsonl")] == src_order[170:]
    assert [r["prompt"][0]["content"] for r in read_jsonl(ws.root / "d" / "train.jsonl")] == src_order[:170]
    assert convert_dataset(path, "e", limit=10, shuffle=False).counts.read == 10


# ---- token lengths ----------------------------------------------------------------------------

def test_token_length_filter_with_tiny_tokenizer(ws, fixtures_dir, tiny_model):
    from transformers import AutoTokenizer
    path = put(ws, fixtures_dir, "gsm8k_test")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    src = read_jsonl(ws.root / path)
    lens = [len(tok.apply_chat_template([{"role": "user", "content": r["question"]},
                                         {"role": "assistant", "content": r["answer"]}],
                                        tokenize=True, return_dict=False)) for r in src]
    limit = sorted(lens)[150]
    tok_arg = str(tiny_model.relative_to(ws.root))
    r = inspect_dataset(path, tokenizer=tok_arg, max_length=limit)
    over = [i + 1 for i, n in enumerate(lens) if n > limit]
    assert r.token_lengths.max == max(lens) and r.token_lengths.rows == 200
    assert r.token_lengths.over_max_length == len(over) and r.token_lengths.over_max_length_lines == over[:20]
    rep = convert_dataset(path, "tl", tokenizer=tok_arg, max_length=limit, shuffle=False)
    too_long = next(s for s in rep.skipped if s.kind == "too_long")
    assert too_long.count == len(over) and too_long.lines == over[:20]
    assert rep.counts.converted == 200 - len(over) and rep.token_lengths.max <= limit
    kept = read_jsonl(ws.root / "tl" / "train.jsonl")
    assert [r["prompt"][0]["content"] for r in kept] == [s["question"] for s, n in zip(src, lens) if n <= limit]


def test_token_lengths_with_real_tokenizer_and_tools(ws, fixtures_dir):
    shutil.copytree(fixtures_dir / "tokenizers" / "qwen2_5", ws.root / "tok" / "qwen2_5")
    path = put(ws, fixtures_dir, "drone")
    r = inspect_dataset(path, tokenizer="tok/qwen2_5", max_length=1024, sample_size=20)
    t = r.token_lengths
    assert t.rows == 20 and t.template_errors == 0
    assert 300 < t.p50 <= t.p95 <= t.max  # the tool schemas are rendered into the prompt
    with pytest.raises(UserError, match="max_length"):
        inspect_dataset(path, max_length=10)
    with pytest.raises(UserError, match="tokenizer"):
        inspect_dataset(path, tokenizer="tok/nope")


# ---- other inputs: CSV, Parquet, JSON arrays, directories, hub --------------------------------

def test_csv_parquet_json_inputs(ws):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [{"query": f"q{i}", "response": f"r{i}"} for i in range(5)]
    (ws.root / "d.csv").write_text('query,response\nq0,r0\n"multi\nline",r1\nq2,r2\n', encoding="utf-8")
    r = inspect_dataset("d.csv")
    assert r.detected_format == "question_answer" and r.rows == 3 and r.source == "csv"
    rep = convert_dataset("d.csv", "c", shuffle=False)
    assert read_jsonl(ws.root / "c" / "train.jsonl")[1]["prompt"][0]["content"] == "multi\nline"
    pq.write_table(pa.Table.from_pylist(rows), ws.root / "d.parquet")
    r = inspect_dataset("d.parquet")
    assert (r.detected_format, r.rows, r.location_unit) == ("question_answer", 5, "row")
    assert convert_dataset("d.parquet", "p").counts.converted == 5
    arr = [dict(r) for r in rows]
    arr[2]["response"] = ""  # item 2 starts on line 10 of the indented array
    (ws.root / "arr.json").write_text(json.dumps(arr, indent=2), encoding="utf-8")
    rep = convert_dataset("arr.json", "j")
    assert rep.counts.converted == 4 and rep.skipped[0].lines == [10]
    (ws.root / "lines.json").write_text("\n".join(json.dumps(x) for x in rows), encoding="utf-8")
    assert inspect_dataset("lines.json").rows == 5
    # a converted directory is itself a dataset: its splits are read by name
    convert_dataset("d.parquet", "split_dir", test_size=2)
    assert inspect_dataset("split_dir", split="test").rows == 2
    assert inspect_dataset("split_dir").detected_format == "prompt_completion"


def test_hub_id_offline_is_a_clear_error(ws):
    with pytest.raises(UserError, match="offline") as e:
        inspect_dataset("microsoft/orca-math-word-problems-200k")
    assert "workspace" in str(e.value)


def test_hub_unreachable_fails_fast(ws, monkeypatch):
    import time
    from tools import hub
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY",
                "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr(hub, "_probe", {})
    t = time.monotonic()
    with pytest.raises(UserError, match="unreachable"):
        convert_dataset("someone/some-dataset", "o")
    assert time.monotonic() - t < 10
    no_leftovers(ws, "o")


def test_outside_workspace_refused(ws):
    with pytest.raises(UserError, match="outside the workspace"):
        inspect_dataset("/etc/passwd")
    with pytest.raises(UserError, match="outside the workspace"):
        convert_dataset("x.jsonl", "../escape")


def test_inspect_reports_problems_with_lines(ws):
    U, A = "user", "assistant"
    rows = [
        {"messages": [{"role": U, "content": "hi"}, {"role": A, "content": "hello"}]},
        {"messages": [{"role": A, "content": "I start"}, {"role": U, "content": "odd"},
                      {"role": A, "content": "x"}]},
        {"messages": [{"role": U, "content": "one"}, {"role": U, "content": "two"},
                      {"role": A, "content": "x"}]},
        {"messages": [{"role": U, "content": ""}, {"role": A, "content": "x"}]},
        {"messages": [{"role": "narrator", "content": "once"}, {"role": U, "content": "q"},
                      {"role": A, "content": "x"}]},
        {"messages": [{"role": U, "content": "q"}, {"role": "tool", "content": "42"},
                      {"role": A, "content": "x"}]},
        {"messages": []},
        {"messages": [{"role": U, "content": "hi"}, {"role": A, "content": "hello"}]},
    ]
    path = write_jsonl(ws, "p.jsonl", rows[:6] + [rows[6]] + [rows[7]])
    r = inspect_dataset(path)
    kinds = {p.kind: p.lines for p in r.problems}
    assert kinds["assistant_first"] == [2]
    assert kinds["consecutive_user"] == [3]
    assert kinds["empty_content"] == [4]
    assert kinds["unknown_role"] == [5]
    assert kinds["tool_without_call"] == [6]
    assert 7 in kinds["empty_messages"] or 7 in kinds.get("bad_type", [])
    assert r.empty_rows == 1 and r.empty_row_lines == [7]
    assert r.duplicate_rows == 1 and r.duplicate_row_lines == [8]
    assert r.usable_rows == 2
    conv = convert_dataset(path, "o")
    assert conv.counts.converted == 1 and conv.counts.duplicates == 1 and conv.counts.skipped == 6


def test_suggested_arguments_pass_to_convert(ws):
    path = write_jsonl(ws, "qa.jsonl", [{"Problem": f"p{i}", "Solution": f"s{i}", "id": i}
                                        for i in range(4)])
    r = inspect_dataset(path)
    assert r.column_mapping == {"prompt": "Problem", "completion": "Solution"}
    rep = convert_dataset(output_dir="qa_out", **r.suggested_conversion.arguments)
    assert rep.counts.converted == 4 and rep.dropped_columns == ["id"]


def test_explicit_mapping(ws):
    path = write_jsonl(ws, "m.jsonl", [{"ask": "a", "say": "b", "sys": "be nice"}])
    rep = convert_dataset(path, "o", column_mapping={"prompt": "ask", "completion": "say", "system": "sys"})
    assert read_jsonl(ws.root / "o" / "train.jsonl")[0]["prompt"] == [
        {"role": "system", "content": "be nice"}, {"role": "user", "content": "a"}]
    assert rep.source_format == "prompt_completion"


# ---- bad input: clear errors, no partial output ----------------------------------------------

def test_missing_file(ws):
    with pytest.raises(UserError, match="does not exist") as e:
        convert_dataset("nope.jsonl", "o")
    assert e.value.field == "dataset"
    no_leftovers(ws, "o")


def test_non_utf8_line_named(ws):
    p = ws.root / "latin.jsonl"
    p.write_bytes(b'{"question": "a", "answer": "b"}\n{"question": "c", "answer": "d"}\n'
                  + '{"question": "caf\u00e9", "answer": "x"}\n'.encode("latin-1"))
    with pytest.raises(UserError, match="not valid UTF-8") as e:
        convert_dataset("latin.jsonl", "o")
    assert e.value.field == "line 3" and "iconv" in str(e.value)
    no_leftovers(ws, "o")
    with pytest.raises(UserError, match="line 3"):
        inspect_dataset("latin.jsonl")


def test_malformed_json_line_named(ws):
    path = write_jsonl(ws, "bad.jsonl", None, raw_lines=[
        '{"question": "a", "answer": "b"}', '', '{"question": "c", "answer": ', '{"question": "e"}'])
    with pytest.raises(UserError, match="malformed JSON") as e:
        convert_dataset(path, "o")
    assert e.value.field == "line 3"
    no_leftovers(ws, "o")
    with pytest.raises(UserError) as e:
        inspect_dataset(path)
    assert e.value.field == "line 3"
    (ws.root / "bad.json").write_text('[\n  {"a": 1},\n  {"a": 2,}\n]', encoding="utf-8")
    with pytest.raises(UserError) as e:
        inspect_dataset("bad.json")
    assert e.value.field == "line 3"


def test_mapping_with_absent_columns(ws, fixtures_dir):
    path = put(ws, fixtures_dir, "gsm8k_test")
    with pytest.raises(UserError, match="does not have") as e:
        convert_dataset(path, "o", column_mapping={"prompt": "question", "completion": "solution"})
    assert e.value.field == "column_mapping" and "'answer'" in str(e.value)
    with pytest.raises(UserError, match="column_mapping"):
        convert_dataset(path, "o", column_mapping={"foo": "question"})
    no_leftovers(ws, "o")


def test_empty_dataset(ws):
    (ws.root / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(UserError, match="no rows"):
        convert_dataset("empty.jsonl", "o")
    with pytest.raises(UserError, match="no rows"):
        inspect_dataset("empty.jsonl")
    no_leftovers(ws, "o")


def test_unknown_and_text_formats(ws):
    path = write_jsonl(ws, "u.jsonl", [{"foo": 1, "bar": "x"}])
    r = inspect_dataset(path)
    assert r.detected_format is None and r.suggested_conversion is None and "column_mapping" in r.notes[0]
    with pytest.raises(UserError, match="unknown dataset format") as e:
        convert_dataset(path, "o")
    assert "foo" in str(e.value)
    path = write_jsonl(ws, "t.jsonl", [{"text": "Once upon a time"}])
    assert inspect_dataset(path).detected_format == "text"
    with pytest.raises(UserError, match="raw text"):
        convert_dataset(path, "o")
    no_leftovers(ws, "o")


def test_all_rows_bad_leaves_nothing(ws):
    path = write_jsonl(ws, "b.jsonl", [{"messages": [{"role": "assistant", "content": "x"}]}] * 3)
    with pytest.raises(UserError, match="no row could be converted.*assistant_first"):
        convert_dataset(path, "o")
    no_leftovers(ws, "o")


def test_existing_output_dir_and_overwrite(ws, fixtures_dir):
    path = put(ws, fixtures_dir, "toy_chat")
    (ws.root / "o").mkdir()
    (ws.root / "o" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        convert_dataset(path, "o")
    assert (ws.root / "o" / "keep.txt").exists()
    convert_dataset(path, "o", overwrite=True)
    assert sorted(p.name for p in (ws.root / "o").iterdir()) == ["train.jsonl"]
    with pytest.raises(UserError, match="test_size"):
        convert_dataset(path, "o2", test_size=10)
    with pytest.raises(UserError, match="test_size"):
        convert_dataset(path, "o2", test_size=1.5)
    no_leftovers(ws, "o2")
    with pytest.raises(UserError, match="contains the input"):
        convert_dataset(path, "data", overwrite=True)
    assert (ws.root / path).exists()


def test_strict_fails_on_first_bad_row(ws, fixtures_dir):
    path = put(ws, fixtures_dir, "toy_chat")
    with pytest.raises(UserError, match="assistant_first") as e:
        convert_dataset(path, "o", strict=True)
    assert e.value.field == "line 4" and "strict=false" in str(e.value)
    no_leftovers(ws, "o")
    assert convert_dataset(put(ws, fixtures_dir, "drone"), "o", strict=True).counts.converted == 83


# ---- streaming: memory stays far below the file size -----------------------------------------

def test_streaming_memory(tmp_path):
    script = textwrap.dedent("""
        import json, os, resource, sys
        from tools.workspace import set_workspace
        from tools.data import convert_dataset
        ws = set_workspace(sys.argv[1])
        filler = "x" * 3000
        with open(ws.root / "big.jsonl", "w") as f:
            for i in range(17000):   # ~52 MB
                f.write(json.dumps({"question": f"q{i} {filler}", "answer": f"a{i} {filler}"}) + "\\n")
        with open(ws.root / "small.jsonl", "w") as f:
            f.write(json.dumps({"question": "q", "answer": "a"}) + "\\n")
        convert_dataset("small.jsonl", "warm", test_size=0)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rep = convert_dataset("big.jsonl", "out", test_size=0.1, system_prompt="S")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        size = os.path.getsize(ws.root / "big.jsonl")
        print(json.dumps({"growth_kb": peak - base, "size_kb": size // 1024,
                          "converted": rep.counts.converted}))
    """)
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "ws")], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["converted"] == 17000 and res["size_kb"] > 50_000
    assert res["growth_kb"] < res["size_kb"] / 5, res  # ~52 MB in, well under 10 MB growth


# ---- TRL accepts the output -------------------------------------------------------------------

@pytest.mark.slow
def test_trl_sft_trains_on_converted_output(ws, fixtures_dir, tiny_model):
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    # Short arithmetic rows fit max_length=128 with the byte-level tiny tokenizer; GSM8K rows do
    # not: TRL would truncate them to prompt-only rows and drop them, so convert filters them.
    gsm = read_jsonl(fixtures_dir / "datasets" / "gsm8k" / "test_first200.jsonl")[:4]
    short = [{"question": f"What is {a}+{a + 1}?", "answer": f"{a}+{a + 1} = {2 * a + 1}. #### {2 * a + 1}"}
             for a in range(12)]
    path = write_jsonl(ws, "mix.jsonl", short[:6] + gsm + short[6:])
    tok_dir = str(tiny_model.relative_to(ws.root))
    rep = convert_dataset(path, "sft", system_prompt="Add.", test_size=2, tokenizer=tok_dir, max_length=128)
    assert rep.skipped[0].kind == "too_long" and rep.skipped[0].lines == [7, 8, 9, 10]
    ds = load_dataset(str(ws.root / "sft"))
    assert len(ds["train"]) == 10 and isinstance(ds["train"][0]["prompt"], list)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    cfg = SFTConfig(output_dir=str(ws.root / "run"), max_steps=2, per_device_train_batch_size=2,
                    use_cpu=True, report_to="none", max_length=128, save_strategy="no", bf16=False,
                    logging_steps=1)
    trainer = SFTTrainer(model=str(tiny_model), args=cfg, train_dataset=ds["train"], processing_class=tok)
    assert len(trainer.train_dataset) == 10  # nothing truncated away
    row = trainer.train_dataset[0]
    # completion-only loss: TRL labels only the assistant answer (the prompt is -100)
    trained = tok.decode([t for t in row["labels"] if t != -100])
    assert trained.startswith(row["completion"][0]["content"]) and -100 in row["labels"]
    out = trainer.train()
    assert out.global_step == 2


# ---- MCP wiring -------------------------------------------------------------------------------

def test_mcp_inspect_and_convert_in_process(ws, fixtures_dir):
    from mcp import Client
    from mcp.server.mcpserver import MCPServer
    import server.data
    mcp = MCPServer("data-test")
    server.data.register(mcp)
    path = put(ws, fixtures_dir, "toy_chat")
    write_jsonl(ws, "bad.jsonl", None, raw_lines=['{"question": "a", "answer": "b"}', "{oops"])

    async def main():
        async with Client(mcp) as c:
            tools = {t.name: t for t in (await c.list_tools()).tools}
            assert {"inspect_dataset", "convert_dataset"} <= set(tools)
            assert tools["inspect_dataset"].annotations.read_only_hint is True
            assert tools["inspect_dataset"].annotations.open_world_hint is True
            assert tools["convert_dataset"].annotations.read_only_hint is False
            assert "dataset" in tools["inspect_dataset"].input_schema["required"]
            r = await c.call_tool("inspect_dataset", {"dataset": path})
            assert not r.is_error and r.structured_content["detected_format"] == "messages"
            bad = await c.call_tool("convert_dataset", {"dataset": "bad.jsonl", "output_dir": "o"})
            assert bad.is_error and "line 2" in bad.content[0].text and "Fix:" in bad.content[0].text
            ok = await c.call_tool("convert_dataset", {"dataset": path, "output_dir": "o",
                                                       "test_size": 1})
            assert not ok.is_error, ok.content
            assert ok.structured_content["counts"]["test"] == 1
    asyncio.run(main())
    assert (ws.root / "o" / "train.jsonl").exists()


def test_server_module_imports_nothing_heavy():
    code = ("import sys, server.data, tools.data; "
            "print([m for m in ('torch','transformers','datasets','trl','pyarrow') if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.stdout.strip() == "[]", r.stderr
