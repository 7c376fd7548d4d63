"""convert_dataset / inspect_dataset on the inputs issue 9 names: tool-call data under real TRL
chat templates (rendered and trained), NaN, image parts, Excel ';' CSV, UTF-16 without BOM, a
JSON array in a .jsonl file, save_to_disk folders, legacy function_call, consecutive assistant
turns, prompt templates over several columns, leftovers of killed writers, and the two duplicate
counts."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tools.data import convert_dataset, inspect_dataset
from tools.errors import UserError

from conftest import REPO  # noqa: E402 - one definition of the repo root
TOOL_USE = "tool_use/openai_tools_from_glaive_first40.jsonl"
LEGACY = "tool_use/legacy_function_call_from_glaive.jsonl"


def trl_template(name: str) -> str:
    """The text of one of TRL's shipped chat templates (trl/chat_templates/<name>.jinja)."""
    import trl
    return (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")


def tokenizer_with(ws, fixtures_dir, family: str, template: str | None, name: str) -> str:
    """A fixture tokenizer copied into the workspace, its chat template replaced by `template`."""
    dst = ws.root / "tok" / name
    shutil.copytree(fixtures_dir / "tokenizers" / family, dst)
    if template is not None:
        cfg_path = dst / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg["chat_template"] = template
        cfg_path.write_text(json.dumps(cfg), encoding="utf-8")
    return f"tok/{name}"


def put(ws, fixtures_dir, rel: str) -> str:
    dst = ws.root / "data" / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(fixtures_dir / "datasets" / rel, dst)
    return f"data/{rel}"


def write_jsonl(ws, name: str, rows) -> str:
    p = ws.root / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return name


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def kinds(summaries) -> dict[str, object]:
    return {s.kind: s for s in summaries}


def tool_turns(row: dict) -> list[dict]:
    return [m for m in row.get("prompt", []) + row.get("completion", []) + row.get("messages", [])
            if m.get("tool_calls")]


# ---- 6. tool-call data renders under real templates and trains --------------------------------

# (template, fixture tokenizer, how the first call of fixture row 1 must appear in the text)
TOOL_TEMPLATES = [
    ("qwen3", "qwen2_5", '<tool_call>\n{"name": "search_recipes", "arguments": {"ingredients": '
                         '["chicken", "bell peppers", "rice"]}}\n</tool_call>'),
    ("qwen2_5", "qwen2_5", '<tool_call>\n{"name": "search_recipes", "arguments": {"ingredients": '
                           '["chicken", "bell peppers", "rice"]}}\n</tool_call>'),
    ("llama3_1", "llama3", '{"name": "search_recipes", "parameters": {"ingredients": '
                           '["chicken", "bell peppers", "rice"]}}<|eot_id|>'),
    # reads message.content on tool-call turns: raised on the missing key before the fix
    ("deepseekv3_training", "llama3", '<｜tool▁call▁begin｜>function<｜tool▁sep｜>search_recipes\n'
                                      '```json\n{"ingredients": ["chicken", "bell peppers", "rice"]}'),
]


@pytest.mark.parametrize("template,family,expected", TOOL_TEMPLATES, ids=[t[0] for t in TOOL_TEMPLATES])
def test_tool_call_rows_render_with_real_trl_templates(ws, fixtures_dir, template, family, expected):
    from datasets import load_dataset
    from transformers import AutoTokenizer
    path = put(ws, fixtures_dir, TOOL_USE)
    tok_dir = tokenizer_with(ws, fixtures_dir, family, trl_template(template), template)
    rep = convert_dataset(path, "out", tokenizer=tok_dir, shuffle=False)
    assert rep.skipped == [] and rep.counts.converted == 40, rep.skipped
    assert rep.token_lengths.template_errors == 0
    out = read_jsonl(ws.root / "out" / "train.jsonl")
    calls = [m for r in out for m in tool_turns(r)]
    assert len(calls) >= 40
    # what templates accept: "content": "" on tool-call turns, arguments as an object
    assert all(m["content"] == "" and isinstance(m["tool_calls"][0]["function"]["arguments"], dict)
               for m in calls)
    # TRL's own rendering of the written rows (SFTTrainer.tokenize_fn): prompt with the generation
    # prompt, then prompt + completion, tools passed through
    tok = AutoTokenizer.from_pretrained(ws.root / tok_dir)
    ds = load_dataset(str(ws.root / "out"))["train"]
    for ex in ds:
        tok.apply_chat_template(ex["prompt"], tools=ex["tools"], add_generation_prompt=True, tokenize=False)
    first = ds[0]
    text = tok.apply_chat_template(first["prompt"] + first["completion"], tools=first["tools"], tokenize=False)
    assert expected in text
    assert "Chicken and Bell Pepper Stir Fry" in text  # the tool result is rendered too


def test_template_errors_are_named_with_the_templates_message(ws, fixtures_dir):
    src = read_jsonl(fixtures_dir / "datasets" / TOOL_USE)[:6]
    two = json.loads(json.dumps(src[2]))
    turn = next(m for m in two["messages"] if m.get("tool_calls"))
    turn["tool_calls"].append(json.loads(json.dumps(turn["tool_calls"][0])))  # parallel calls
    plain = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    path = write_jsonl(ws, "calls.jsonl", src[:2] + [two] + src[3:] + [plain])
    llama = tokenizer_with(ws, fixtures_dir, "llama3", trl_template("llama3_1"), "llama3_1")
    rep = convert_dataset(path, "o1", tokenizer=llama, shuffle=False)
    err = kinds(rep.skipped)["template_error"]
    assert err.count == 1 and err.lines == [3]
    assert "This model only supports single tool-calls at once!" in err.example  # its own words
    assert rep.counts.converted == 6 and rep.token_lengths.template_errors == 1
    r = inspect_dataset(path, tokenizer=llama)
    assert kinds(r.problems)["template_error"].lines == [3]
    assert "single tool-calls" in kinds(r.problems)["template_error"].example
    # a template that renders tool-call turns as empty replies: counted and named, not written
    ds_tok = tokenizer_with(ws, fixtures_dir, "llama3", trl_template("deepseek_r1_distill"), "r1")
    rep = convert_dataset(path, "o2", tokenizer=ds_tok, shuffle=False)
    lost = kinds(rep.skipped)["tool_calls_not_rendered"]
    assert lost.count == 6 and lost.lines == [1, 2, 3, 4, 5, 6]
    assert "search_recipes" in lost.example or "'" in lost.example
    assert "tool-capable template" in lost.meaning
    assert rep.counts.converted == 1  # only the row without tools
    with pytest.raises(UserError, match="tool_calls_not_rendered") as e:
        convert_dataset(path, "o3", tokenizer=ds_tok, strict=True)
    assert e.value.field == "line 1"


def test_bad_tool_call_arguments_are_a_named_problem(ws):
    def row(args):
        return {"messages": [{"role": "user", "content": "weather?"},
                             {"role": "assistant", "content": None, "tool_calls": [
                                 {"type": "function", "function": {"name": "get_weather", "arguments": args}}]},
                             {"role": "tool", "content": "20C"}, {"role": "assistant", "content": "20C."}]}
    path = write_jsonl(ws, "args.jsonl", [row('{"city": "Paris"}'), row("{city: Paris"), row("[1, 2]"), row("")])
    rep = convert_dataset(path, "o", shuffle=False, dedupe="none")
    bad = kinds(rep.skipped)["bad_tool_call"]
    assert bad.lines == [2, 3] and "not valid JSON" in bad.example
    out = read_jsonl(ws.root / "o" / "train.jsonl")
    assert [tool_turns(r)[0]["tool_calls"][0]["function"]["arguments"] for r in out] == [{"city": "Paris"}, {}]


# (template, how a tool call and a tool result appear in the training text, what the trained
# text starts with: Qwen3 writes an empty think block before the answer)
TRAINING_TEMPLATES = [("qwen3", '<tool_call>\n{"name": ', "<tool_response>", "<think>"),
                      ("llama3_1", '{"name": ', "<|start_header_id|>ipython<|end_header_id|>", "")]


@pytest.mark.slow
@pytest.mark.parametrize("template,call,result,trained_start", TRAINING_TEMPLATES,
                         ids=[t[0] for t in TRAINING_TEMPLATES])
def test_converted_tool_calls_train_under_sft_trainer(ws, fixtures_dir, tmp_path, template, call,
                                                      result, trained_start):
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from tools.tiny import build_tiny_model
    # the tiny byte-level Llama with a tool-capable TRL template; rows with tool schemas run to
    # ~1,500 bytes (Qwen3) and ~3,000 (Llama 3.1 writes the schemas and a date header), so the
    # model gets 4,096 positions
    model_dir = build_tiny_model(ws.root / "models" / "tiny-tools", max_position_embeddings=4096)
    (model_dir / "chat_template.jinja").write_text(trl_template(template), encoding="utf-8")
    path = put(ws, fixtures_dir, TOOL_USE)
    rep = convert_dataset(path, "sft", tokenizer="models/tiny-tools", max_length=4096, test_size=4)
    assert rep.counts.converted + rep.counts.skipped == 40
    assert "template_error" not in kinds(rep.skipped) and rep.counts.train >= 20
    ds = load_dataset(str(ws.root / "sft"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    args = SFTConfig(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=2,
                     use_cpu=True, report_to="none", max_length=4096, save_strategy="no",
                     bf16=False, logging_steps=1)
    trainer = SFTTrainer(model=str(model_dir), args=args, train_dataset=ds["train"], processing_class=tok)
    assert len(trainer.train_dataset) == rep.counts.train  # no row lost in TRL's preparation
    row = trainer.train_dataset[0]
    text = tok.decode(row["input_ids"])
    assert call in text and result in text
    trained = tok.decode([t for t in row["labels"] if t != -100])
    # only the final answer is trained
    assert trained.startswith(trained_start) and row["completion"][0]["content"] in trained
    assert call not in trained
    assert trainer.train().global_step == 3


# ---- 7. inputs that were wrong or unclear ------------------------------------------------------

def test_nan_is_read_as_null_and_counted(ws):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (ws.root / "nan.jsonl").write_text(
        '{"question": NaN, "answer": "a0"}\n'
        '{"question": "q1", "answer": "a1", "score": NaN}\n'
        '{"question": "q2", "answer": "a2", "score": -Infinity}\n'
        '{"question": "q3", "answer": "a3", "score": 1.5}\n', encoding="utf-8")
    rep = convert_dataset("nan.jsonl", "o", shuffle=False)
    assert kinds(rep.skipped)["missing_field"].lines == [1]  # not a prompt reading "nan"
    nan = kinds(rep.changes)["nan_as_null"]
    assert (nan.count, nan.lines) == (3, [1, 2, 3]) and "null" in nan.meaning
    out = read_jsonl(ws.root / "o" / "train.jsonl")
    assert [r["prompt"][0]["content"] for r in out] == ["q1", "q2", "q3"]
    r = inspect_dataset("nan.jsonl")
    assert kinds(r.changes)["nan_as_null"].lines == [1, 2, 3]
    assert next(c for c in r.columns if c.name == "score").types == ["null", "number"]
    # Parquet floats can hold NaN too (pandas writes a missing number that way)
    pq.write_table(pa.Table.from_pylist([{"question": "q", "answer": float("nan")},
                                         {"question": "q", "answer": 2.0}]), ws.root / "nan.parquet")
    rep = convert_dataset("nan.parquet", "p")
    assert kinds(rep.skipped)["missing_field"].lines == [1]
    assert kinds(rep.changes)["nan_as_null"].lines == [1]
    assert read_jsonl(ws.root / "p" / "train.jsonl")[0]["completion"][0]["content"] == "2.0"


IMAGE_ROW = {"messages": [
    {"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A cat on a mat."}]}]}


def test_image_parts_are_refused_or_dropped_when_asked(ws, fixtures_dir):
    from transformers import AutoTokenizer
    text_only = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"},
                                                           {"type": "text", "text": "there"}]},
                              {"role": "assistant", "content": "Hello!"}]}
    image = {"messages": [{"role": "user", "content": [{"type": "image", "image": "cat.png"},
                                                       {"type": "text", "text": "Describe it."}]},
                          {"role": "assistant", "content": "A cat."}]}
    path = write_jsonl(ws, "img.jsonl", [IMAGE_ROW, text_only, image])
    r = inspect_dataset(path)
    media = kinds(r.problems)["media_content"]
    assert media.lines == [1, 3] and "'image_url'" in media.example
    assert "text-only" in media.meaning and "drop_media=true" in media.meaning
    rep = convert_dataset(path, "refused", shuffle=False)
    assert kinds(rep.skipped)["media_content"].lines == [1, 3] and rep.counts.converted == 1
    # text parts become one string: text-only templates concatenate content
    assert read_jsonl(ws.root / "refused" / "train.jsonl")[0]["prompt"][0]["content"] == "Hi\nthere"
    with pytest.raises(UserError, match="media_content") as e:
        convert_dataset(path, "strict", strict=True)
    assert e.value.field == "line 1"
    tok_dir = tokenizer_with(ws, fixtures_dir, "qwen2_5", None, "qwen2_5")
    rep = convert_dataset(path, "dropped", drop_media=True, shuffle=False, tokenizer=tok_dir)
    assert rep.skipped == [] and rep.counts.converted == 3
    dropped = kinds(rep.changes)["media_parts_dropped"]
    assert (dropped.count, dropped.lines) == (2, [1, 3])
    out = read_jsonl(ws.root / "dropped" / "train.jsonl")
    assert out[0] == {"prompt": [{"role": "user", "content": "What is in this picture?"}],
                      "completion": [{"role": "assistant", "content": "A cat on a mat."}]}
    tok = AutoTokenizer.from_pretrained(ws.root / tok_dir)
    assert "What is in this picture?<|im_end|>" in tok.apply_chat_template(
        out[0]["prompt"] + out[0]["completion"], tokenize=False)
    assert inspect_dataset(path, drop_media=True).suggested_conversion.arguments["drop_media"] is True


def gsm_rows(fixtures_dir, n: int = 20) -> list[dict]:
    return read_jsonl(fixtures_dir / "datasets" / "gsm8k" / "test_first200.jsonl")[:n]


def test_excel_semicolon_csv(ws, fixtures_dir):
    src = gsm_rows(fixtures_dir)
    with open(ws.root / "excel.csv", "w", encoding="utf-8-sig", newline="") as f:
        w = csv.writer(f, delimiter=";", dialect="excel")  # what Excel writes in ',' decimal locales
        w.writerow(["question", "answer"])
        w.writerows([r["question"], r["answer"]] for r in src)
    r = inspect_dataset("excel.csv")
    assert (r.detected_format, r.rows) == ("question_answer", 20)
    assert any("';'" in n for n in r.notes)
    rep = convert_dataset("excel.csv", "o", shuffle=False)
    out = read_jsonl(ws.root / "o" / "train.jsonl")
    assert [(o["prompt"][0]["content"], o["completion"][0]["content"]) for o in out] == \
        [(s["question"], s["answer"]) for s in src]  # commas and newlines inside fields intact
    assert any("';'" in n for n in rep.notes)
    (ws.root / "comma.csv").write_text("question,answer\nWhat is 1;2?,3\n", encoding="utf-8")
    assert inspect_dataset("comma.csv").samples[0]["messages"][0]["content"] == "What is 1;2?"


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-16"])
def test_utf16_files_are_decoded(ws, fixtures_dir, encoding):
    src = gsm_rows(fixtures_dir, 5)
    src[0] = {**src[0], "question": src[0]["question"] + " Café, naïve, 日本語."}
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in src)
    (ws.root / "u16.jsonl").write_bytes(text.encode(encoding))  # "utf-16": with a BOM
    r = inspect_dataset("u16.jsonl")
    assert (r.detected_format, r.rows) == ("question_answer", 5)
    convert_dataset("u16.jsonl", "o", shuffle=False)
    out = read_jsonl(ws.root / "o" / "train.jsonl")
    assert [o["prompt"][0]["content"] for o in out] == [s["question"] for s in src]
    assert any(encoding.upper() in n for n in r.notes)
    # Excel's "Unicode text": UTF-16, tab-separated
    (ws.root / "u16.tsv").write_bytes(("question\tanswer\n" + "".join(
        f"{s['question']}\t{s['answer'].splitlines()[-1]}\n" for s in src)).encode(encoding))
    assert inspect_dataset("u16.tsv").rows == 5
    (ws.root / "u16.json").write_bytes(json.dumps(src, indent=1, ensure_ascii=False).encode(encoding))
    rep = convert_dataset("u16.json", "j")
    assert rep.counts.converted == 5


def test_json_array_in_a_jsonl_file(ws, fixtures_dir):
    src = gsm_rows(fixtures_dir, 6)
    src[3] = {**src[3], "answer": ""}
    (ws.root / "arr.jsonl").write_text(json.dumps(src, indent=2), encoding="utf-8")
    r = inspect_dataset("arr.jsonl")
    assert (r.detected_format, r.rows, r.rows_sampled) == ("question_answer", 6, 6)
    assert any("JSON array" in n for n in r.notes)
    rep = convert_dataset("arr.jsonl", "o", shuffle=False)
    starts = [i + 1 for i, ln in enumerate(json.dumps(src, indent=2).splitlines()) if ln == "  {"]
    assert kinds(rep.skipped)["empty_content"].lines == [starts[3]]  # the line item 3 starts on
    assert rep.counts.converted == 5
    # one array per line is not JSON Lines: an error naming the line, not a silent first line
    (ws.root / "lines.jsonl").write_text(json.dumps(src[:2]) + "\n" + json.dumps(src[2:]) + "\n")
    with pytest.raises(UserError, match="extra data") as e:
        convert_dataset("lines.jsonl", "x")
    assert e.value.field == "line 2"
    assert not (ws.root / "x").exists()


def test_save_to_disk_folders(ws, fixtures_dir):
    from datasets import Dataset, DatasetDict
    src = gsm_rows(fixtures_dir, 12)
    Dataset.from_list(src).save_to_disk(str(ws.root / "saved"))
    r = inspect_dataset("saved")
    assert (r.source, r.detected_format, r.rows, r.location_unit) == ("disk", "question_answer", 12, "row")
    rep = convert_dataset("saved", "o", shuffle=False)
    assert [o["prompt"][0]["content"] for o in read_jsonl(ws.root / "o" / "train.jsonl")] == \
        [s["question"] for s in src]
    DatasetDict({"train": Dataset.from_list(src[:8]), "test": Dataset.from_list(src[8:])}
                ).save_to_disk(str(ws.root / "saved_dict"))
    assert inspect_dataset("saved_dict", split="test").rows == 4
    with pytest.raises(UserError, match="no split 'validation'") as e:
        inspect_dataset("saved_dict", split="validation")
    assert e.value.field == "split" and "train" in str(e.value)
    with pytest.raises(UserError, match="contains the input"):
        convert_dataset("saved", "saved", overwrite=True)
    # load_from_disk opens the folder's files itself: a link out of the workspace is refused
    outside = ws.root.parent / "outside.arrow"
    outside.write_bytes(b"x")
    (ws.root / "saved_dict" / "train" / "extra.arrow").symlink_to(outside)
    with pytest.raises(UserError, match="outside the workspace"):
        inspect_dataset("saved_dict")


def test_legacy_function_call_becomes_tool_calls(ws, fixtures_dir):
    from transformers import AutoTokenizer
    path = put(ws, fixtures_dir, LEGACY)
    src = read_jsonl(ws.root / path)
    r = inspect_dataset(path)
    assert r.problems == [] and r.usable_rows == 20 and r.rows_with_tools == 20
    assert kinds(r.changes)["function_call_converted"].count == 20
    tok_dir = tokenizer_with(ws, fixtures_dir, "qwen2_5", trl_template("qwen2_5"), "qwen2_5")
    rep = convert_dataset(path, "o", shuffle=False, tokenizer=tok_dir)
    assert rep.skipped == [] and rep.counts.converted == 20
    out = read_jsonl(ws.root / "o" / "train.jsonl")[0]
    legacy = src[0]["messages"]
    i = next(k for k, m in enumerate(legacy) if m.get("function_call"))
    assert out["prompt"][i] == {"role": "assistant", "content": "", "tool_calls": [{
        "type": "function", "function": {"name": legacy[i]["function_call"]["name"],
                                         "arguments": json.loads(legacy[i]["function_call"]["arguments"])}}]}
    assert out["prompt"][i + 1] == {"role": "tool", "name": legacy[i + 1]["name"],
                                    "content": legacy[i + 1]["content"]}
    assert out["tools"] == [{"type": "function", "function": f} for f in src[0]["functions"]]
    tok = AutoTokenizer.from_pretrained(ws.root / tok_dir)
    text = tok.apply_chat_template(out["prompt"] + out["completion"], tools=out["tools"], tokenize=False)
    assert '<tool_call>\n{"name": "calculate_loan_payment", "arguments": {"principal": 50000' in text


def test_consecutive_assistant_turns_merge_when_asked(ws):
    U, A = "user", "assistant"
    split_reply = {"messages": [{"role": U, "content": "Tell me a joke."},
                                {"role": A, "content": "Why did the chicken cross the road?"},
                                {"role": A, "content": "To get to the other side."}]}
    call_then_text = {"messages": [
        {"role": U, "content": "weather?"},
        {"role": A, "tool_calls": [{"type": "function", "function": {"name": "w", "arguments": {}}}]},
        {"role": A, "content": "It is sunny."}]}
    path = write_jsonl(ws, "aa.jsonl", [split_reply, call_then_text])
    r = inspect_dataset(path)
    problem = kinds(r.problems)["consecutive_assistant"]
    assert problem.lines == [1, 2] and "merge_assistant_turns=true" in problem.meaning
    rep = convert_dataset(path, "o", merge_assistant_turns=True, shuffle=False)
    assert rep.counts.converted == 1
    assert kinds(rep.skipped)["consecutive_assistant"].lines == [2]  # a call is never merged away
    assert kinds(rep.changes)["assistant_turns_merged"].lines == [1]
    assert read_jsonl(ws.root / "o" / "train.jsonl")[0]["completion"] == [
        {"role": A, "content": "Why did the chicken cross the road?\n\nTo get to the other side."}]
    assert inspect_dataset(path, merge_assistant_turns=True).usable_rows == 1


def test_prompt_template_over_several_columns(ws):
    rows = [{"subject": "Refund", "message": "I was charged twice.", "reply": "Refunded.", "id": 1},
            {"subject": "Login", "message": "Cannot sign in {sic}.", "reply": "Reset sent.", "id": 2},
            {"subject": None, "message": "Hello?", "reply": "Hi.", "id": 3}]
    path = write_jsonl(ws, "mail.jsonl", rows)
    mapping = {"prompt": "Subject: {subject}\n\n{message}", "completion": "reply"}
    r = inspect_dataset(path, column_mapping=mapping)
    assert r.samples[0]["messages"][0]["content"] == "Subject: Refund\n\nI was charged twice."
    rep = convert_dataset(path, "o", column_mapping=mapping, shuffle=False)
    out = read_jsonl(ws.root / "o" / "train.jsonl")
    assert [o["prompt"][0]["content"] for o in out] == [
        "Subject: Refund\n\nI was charged twice.", "Subject: Login\n\nCannot sign in {sic}."]
    assert rep.dropped_columns == ["id"]  # subject and message are used
    assert "'subject'" in kinds(rep.skipped)["missing_field"].example
    with pytest.raises(UserError, match="'subjet'") as e:
        convert_dataset(path, "x", column_mapping={"prompt": "Subject: {subjet}\n\n{message}",
                                                   "completion": "reply"})
    assert e.value.field == "column_mapping" and "subject" in str(e.value)
    with pytest.raises(UserError, match="plain column name"):
        inspect_dataset(path, column_mapping={"prompt": "{subject:>20}", "completion": "reply"})
    with pytest.raises(UserError, match="must name a column"):
        inspect_dataset(path, column_mapping={"messages": "{subject}"})
    alpaca = convert_dataset(path, "a", column_mapping={"instruction": "Answer the mail about {subject}.",
                                                        "input": "message", "output": "reply"},
                             shuffle=False)
    assert read_jsonl(ws.root / "a" / "train.jsonl")[0]["prompt"][0]["content"] == \
        "Answer the mail about Refund.\n\nI was charged twice."
    assert alpaca.counts.converted == 2
    assert not (ws.root / "x").exists()


# ---- 8. no leftovers ----------------------------------------------------------------------------

def _leftovers(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_killed_conversion_leftover_is_removed_by_the_next_call(ws):
    import fcntl
    filler = "x" * 2000
    with open(ws.root / "big.jsonl", "w") as f:
        for i in range(20000):  # ~80 MB: seconds to convert, time to kill it half way
            f.write(json.dumps({"question": f"q{i} {filler}", "answer": f"a{i} {filler}"}) + "\n")
    script = textwrap.dedent("""
        import sys
        from tools.workspace import set_workspace
        from tools.data import convert_dataset
        set_workspace(sys.argv[1])
        convert_dataset("big.jsonl", "out", dedupe="none")
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, str(ws.root)], cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            tmp = _leftovers(ws.root, "out")
            scratch = tmp[0] / ".rows.jsonl.tmp" if tmp else None
            if scratch and scratch.exists() and scratch.stat().st_size > 5_000_000:
                break
            assert proc.poll() is None, "the conversion finished before it could be killed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # what a timeout or the OOM killer does
    finally:
        proc.wait()
    [stale] = _leftovers(ws.root, "out")
    assert stale.is_dir() and not any((ws.root / "out").iterdir())  # the lock folder stays empty
    # other folders next to it: a live writer's (its flock held), an unrelated hidden folder, and
    # an untagged leftover of this very output from an earlier version
    live = ws.root / ".other.abcd1234.llmft.tmp"
    live.mkdir()
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    user_dir = ws.root / ".cache.abcd1234.tmp"
    user_dir.mkdir()
    old_version = ws.root / ".out.abcd1234.tmp"
    old_version.mkdir()
    (old_version / "train.jsonl").write_text("{}\n")
    try:
        write_jsonl(ws, "small.jsonl", [{"question": "q", "answer": "a"}])
        rep = convert_dataset("small.jsonl", "out", overwrite=True)
        assert live.exists() and user_dir.exists()
    finally:
        os.close(fd)
    assert not stale.exists() and not old_version.exists()
    assert _leftovers(ws.root, "out") == []
    said = [n for n in rep.notes if "interrupted" in n]
    assert len(said) == 2 and any(stale.name in n and "MiB" in n for n in said)
    assert rep.counts.converted == 1
    # once its writer is gone (the flock released), the next write next to it removes it too
    third = convert_dataset("small.jsonl", "third")
    assert not live.exists() and any(live.name in n for n in third.notes)
    assert user_dir.exists()  # never ours: not tagged, not this output's name


@pytest.mark.slow
def test_merge_removes_a_killed_merges_leftover(ws, tiny_model):
    from test_merge import make_adapter
    from tools.merge import merge_adapter
    make_adapter(tiny_model, ws.root / "runs" / "r1" / "output")
    stale = ws.root / "models" / ".merged.k1ll3d00.llmft.tmp"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"\0" * 2_000_000)
    r = merge_adapter(adapter_dir="runs/r1/output", output_dir="models/merged", dtype="fp32")
    assert not stale.exists() and r.verified
    assert any(".merged.k1ll3d00.llmft.tmp" in n and "1.9 MiB" in n for n in r.notes)
    assert _leftovers(ws.root / "models", "merged") == []


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_output_dirs_get_the_umask_permissions(ws, umask):
    path = write_jsonl(ws, "qa.jsonl", [{"question": "q", "answer": "a"}])
    old = os.umask(umask)
    try:
        convert_dataset(path, "out")
    finally:
        os.umask(old)
    assert (ws.root / "out").stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    assert (ws.root / "out" / "train.jsonl").stat().st_mode & 0o777 == 0o666 & ~umask


# ---- 9. duplicate counts that agree -------------------------------------------------------------

def test_both_duplicate_counts_are_reported_and_agree_with_convert(ws):
    rows = [{"id": 1, "question": "What is 2+2?", "answer": "4"},
            {"id": 2, "question": "What is 2+2?", "answer": "4"},   # same conversation, other id
            {"id": 1, "question": "What is 2+2?", "answer": "4"},   # whole-row duplicate of row 1
            {"id": 3, "question": "What is 3+3?", "answer": "6"},
            {"id": 4, "question": "", "answer": "x"},
            {"id": 4, "question": "", "answer": "x"}]               # whole-row duplicate, unusable
    path = write_jsonl(ws, "dups.jsonl", rows)
    r = inspect_dataset(path)
    assert (r.duplicate_rows, r.duplicate_row_lines) == (2, [3, 6])
    assert (r.duplicate_conversations, r.duplicate_conversation_lines) == (2, [2, 3])
    assert any("whole source rows" in n and "duplicate_conversations" in n for n in r.notes)
    for name in ("duplicate_rows", "duplicate_conversations"):
        assert "duplicate" in type(r).model_fields[name].description
    rep = convert_dataset(path, "o", shuffle=False)
    assert (rep.counts.duplicates, rep.duplicate_lines) == (r.duplicate_conversations,
                                                            r.duplicate_conversation_lines)
    assert any("after mapping" in n for n in rep.notes)
    assert "duplicate_conversations" in type(rep.counts).model_fields["duplicates"].description


# ---- MCP wiring of the new parameters -----------------------------------------------------------

def test_mcp_exposes_the_new_parameters(ws):
    import asyncio

    from mcp import Client

    from server.app import create_server
    mcp = create_server()
    path = write_jsonl(ws, "img.jsonl", [IMAGE_ROW])

    async def main():
        async with Client(mcp) as c:
            tools = {t.name: t for t in (await c.list_tools()).tools}
            for name in ("inspect_dataset", "convert_dataset"):
                props = tools[name].input_schema["properties"]
                assert props["drop_media"]["type"] == "boolean"
                assert props["merge_assistant_turns"]["type"] == "boolean"
            # the details live in the tool's help page, not in every client's tools/list
            page = (await c.read_resource("tool-help://inspect_dataset")).contents[0].text
            assert "text-only" in page and "{subject}" in page and "consecutive_assistant" in page
            refused = await c.call_tool("convert_dataset", {"dataset": path, "output_dir": "o"})
            assert refused.is_error and "media_content" in refused.content[0].text
            ok = await c.call_tool("convert_dataset", {"dataset": path, "output_dir": "o", "drop_media": True})
            assert not ok.is_error, ok.content
            assert ok.structured_content["changes"][0]["kind"] == "media_parts_dropped"
    asyncio.run(main())
