"""verify_masking on the silent failures of real templates: reasoning stripped, text the data
never had, tool calls dropped, truncation outside the sample, templates TRL will not swap.

Every template here is one TRL ships (trl/chat_templates/), named as `trl:<name>` (the tools copy
it into the workspace) or edited the way a user would; tokenizers are the fixtures'.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tools import chat_templates
from tools.errors import UserError
from tools.masking import verify_masking

from test_masking import _tok, _write  # the same workspace helpers

from conftest import FIXTURES as FIX  # noqa: E402
REASONING = "Let me think. " + " ".join(f"Step {i}: add the partial sums and check them."
                                        for i in range(20))


def _pc(n: int, reasoning: bool, key: str = "content") -> list[dict]:
    rows = []
    for i in range(n):
        reply = {"role": "assistant", "content": f"The answer is {7 * i}."}
        if reasoning and key == "content":
            reply["content"] = f"<think>\n{REASONING}\n</think>\n\n" + reply["content"]
        elif reasoning:
            reply[key] = REASONING
        rows.append({"prompt": [{"role": "user", "content": f"What is 7 times {i}?"}],
                     "completion": [reply]})
    return rows


def _codes(rep) -> list[str]:
    return [r.code for r in rep.reasons if r.severity in ("fail", "warn")]


def _r1_without_think_prompt(ws) -> str:
    """What a user does to silence template_mismatch: drop '<think>\\n' from the prompt."""
    text = chat_templates.shipped()["deepseek_r1_distill.jinja"].read_text(encoding="utf-8")
    edited = text.replace("{{'<｜Assistant｜><think>\\n'}}", "{{'<｜Assistant｜>'}}")
    assert edited != text
    (ws.root / "tpl").mkdir(exist_ok=True)
    (ws.root / "tpl/r1_edited.jinja").write_text(edited, encoding="utf-8")
    return "tpl/r1_edited.jinja"


# ---------------------------------------------------------------------------------------------
# 1 + 3: reasoning removed by the template is a fail, named first, whatever else is wrong
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("template,key", [
    ("trl:deepseek_r1_distill.jinja", "content"),   # strips up to </think>, prompt opens <think>
    ("edited", "content"),                           # the same with the mismatch "fixed"
    ("trl:deepseek_r1_distill.jinja", "reasoning_content"),  # ignores reasoning_content
])
def test_reasoning_stripped_by_the_template_fails(ws, template, key):
    tpl = _r1_without_think_prompt(ws) if template == "edited" else template
    rep = verify_masking(_write(ws, "r1", _pc(4, True, key)), _tok(ws, "llama3"), chat_template=tpl)
    assert rep.verdict == "fail"
    first = rep.reasons[0]
    assert first.code == "reasoning_stripped_by_template", _codes(rep)
    assert first.rows == [0, 1, 2, 3]
    trained, data = [int(x) for x in first.message.split(": ")[1].split(" tokens")[0].split(" of ")]
    assert trained < 0.2 * data  # the answer alone is trained, not "the completion"
    assert "trl:deepseek_r1_distill_training.jinja" in first.fix
    assert "not a fix" in first.fix
    if template != "edited":
        mismatch = next(r for r in rep.reasons if r.code == "template_mismatch") \
            if key == "content" else None
        if mismatch:  # its fix must not lead back to the stripped case
            assert "Do not just remove '<think>'" in mismatch.fix


def test_a_template_that_keeps_the_reasoning_trains_it(ws):
    rep = verify_masking(_write(ws, "r1t", _pc(4, True)), _tok(ws, "llama3"),
                         chat_template="trl:deepseek_r1_distill_training.jinja")
    codes = _codes(rep)
    assert "reasoning_stripped_by_template" not in codes and "template_mismatch" not in codes
    assert "completion_not_trained" not in codes and "template_text_trained" not in codes
    assert rep.trained_by_role["assistant"].trained > 900  # the reasoning is trained


@pytest.mark.parametrize("fmt", ["prompt_completion", "messages"])
def test_qwen3_reasoning_data_is_trained_in_full(ws, fmt):
    rows = _pc(3, True)
    if fmt == "messages":
        rows = [{"messages": r["prompt"] + r["completion"]} for r in rows]
    rep = verify_masking(_write(ws, "q3r", rows), _tok(ws, "qwen2_5"),
                         chat_template="trl:qwen3.jinja", assistant_only_loss=fmt == "messages")
    assert rep.verdict == "pass", rep.reasons


# ---------------------------------------------------------------------------------------------
# 2: text the data never had (Qwen3's empty think block), and the fix that removes it
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("template,aol", [("trl:qwen3.jinja", False),
                                          ("trl:qwen3_training.jinja", True)])
def test_template_text_the_data_never_had_is_named(ws, template, aol):
    rows = _pc(4, False)
    if aol:
        rows = [{"messages": r["prompt"] + r["completion"]} for r in rows]
    rep = verify_masking(_write(ws, "q3", rows), _tok(ws, "qwen2_5"), chat_template=template,
                         assistant_only_loss=aol)
    assert rep.verdict == "warn" and _codes(rep) == ["template_text_trained"], rep.reasons
    reason = rep.reasons[0]
    assert "'<think>\\n\\n</think>\\n\\n'" in reason.message and reason.rows == [0, 1, 2, 3]
    assert "enable_thinking" in reason.fix and "accept it knowingly" in reason.fix


def test_enable_thinking_false_moves_the_empty_block_into_the_prompt(ws):
    rows = _pc(4, False)
    for r in rows:
        r["chat_template_kwargs"] = {"enable_thinking": False}
    rep = verify_masking(_write(ws, "q3nt", rows), _tok(ws, "qwen2_5"),
                         chat_template="trl:qwen3.jinja")
    assert rep.verdict == "pass", rep.reasons


# ---------------------------------------------------------------------------------------------
# 4: lengths and truncation on every row, not the sample
# ---------------------------------------------------------------------------------------------
def test_truncation_is_counted_on_every_row(ws):
    rows = _pc(300, False)
    for i in (150, 151):
        rows[i]["completion"][0]["content"] = "word " * 400
    rep = verify_masking(_write(ws, "long", rows), _tok(ws, "qwen2_5"), chat_template="trl:qwen2_5.jinja",
                         max_length=128, sample_size=8)
    assert rep.examples_checked == 8 and rep.rows_length_checked == 300
    assert rep.truncation.completions_cut == 2 and rep.truncation.examples_over_max_length == 2
    assert rep.truncation.longest_tokens > 400
    reason = next(r for r in rep.reasons if r.code == "truncation_cuts_completions")
    assert reason.rows == [150, 151] and reason.severity == "warn"  # 2 of 300 < 5%
    assert "of all 300 rows" in reason.message


def test_a_row_outside_the_sample_without_a_reply_is_found(ws):
    rows = [{"messages": r["prompt"] + r["completion"]} for r in _pc(40, False)]
    rows[17] = {"messages": [{"role": "user", "content": "Hello?"}]}
    rep = verify_masking(_write(ws, "noreply", rows), _tok(ws, "qwen2_5"), sample_size=4,
                         chat_template="trl:qwen2_5_training.jinja", assistant_only_loss=True)
    reason = next(r for r in rep.reasons if r.code == "zero_trained_examples")
    assert reason.rows == [17] and rep.verdict == "fail"


def test_a_template_error_names_its_row(ws):
    rows = _pc(30, False)
    rows[21]["prompt"].insert(0, {"role": "system", "content": "Be brief."})  # Gemma refuses it
    rep = verify_masking(_write(ws, "gem", rows), _tok(ws, "qwen2_5"), sample_size=4,
                         chat_template="trl:gemma.jinja")
    reason = next(r for r in rep.reasons if r.code == "template_error")
    assert reason.rows == [21] and "Row 21" in reason.message
    assert "System role not supported" in reason.message


# ---------------------------------------------------------------------------------------------
# 5: a template TRL will not swap, said exactly, and TRL's shipped templates by name
# ---------------------------------------------------------------------------------------------
def test_an_older_qwen3_template_is_explained_and_the_shipped_one_offered(ws):
    shutil.copy(FIX / "templates/llama.cpp/Qwen-Qwen3-0.6B.jinja", ws.root / "qwen3_old.jinja")
    rows = [{"messages": r["prompt"] + r["completion"]} for r in _pc(3, True)]
    data, tok = _write(ws, "old", rows), _tok(ws, "qwen2_5")
    rep = verify_masking(data, tok, chat_template="qwen3_old.jinja", assistant_only_loss=True)
    reason = next(r for r in rep.reasons if r.code == "assistant_only_loss_unsupported")
    assert "close to TRL's qwen3.jinja" in reason.message and "exact copy" in reason.message
    assert "chat_template='trl:qwen3_training.jinja'" in reason.fix
    again = verify_masking(data, tok, chat_template="trl:qwen3_training.jinja",
                           assistant_only_loss=True)
    assert again.verdict == "pass", again.reasons
    assert again.settings.chat_template == "chat_templates/qwen3_training.jinja"
    copied = ws.root / "chat_templates/qwen3_training.jinja"
    assert copied.read_text() == chat_templates.shipped()["qwen3_training.jinja"].read_text()


@pytest.mark.parametrize("ref", ["trl:../../../etc/passwd", "trl:qwen9.jinja", "trl:"])
def test_shipped_template_names_are_checked(ws, ref):
    with pytest.raises(UserError) as e:
        chat_templates.materialize(ref)
    assert e.value.field == "chat_template"
    assert not (ws.root / "chat_templates").exists() or not any((ws.root / "chat_templates").iterdir())


def test_an_edited_copy_is_never_overwritten(ws):
    rel = chat_templates.materialize("trl:qwen3_training")
    (ws.root / rel).write_text("{{ 'mine' }}")
    with pytest.raises(UserError) as e:
        chat_templates.materialize("trl:qwen3_training.jinja")
    assert "differs" in str(e.value) and (ws.root / rel).read_text() == "{{ 'mine' }}"


# ---------------------------------------------------------------------------------------------
# 6 (masking side): a template that drops tool calls trains nothing on those turns
# ---------------------------------------------------------------------------------------------
def _tool_rows(n: int) -> list[dict]:
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather.",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    return [{"prompt": [{"role": "user", "content": f"Weather in city {i}?"}],
             "completion": [{"role": "assistant", "content": "", "tool_calls": [
                 {"type": "function", "function": {"name": "get_weather",
                                                   "arguments": {"city": f"c{i}"}}}]}],
             "tools": json.dumps(tools)} for i in range(n)]


@pytest.mark.parametrize("template,dropped", [("trl:gemma3.jinja", True),
                                              ("trl:phi3.jinja", True),
                                              ("trl:qwen3_training.jinja", False),
                                              ("trl:qwen2_5.jinja", False)])
def test_templates_that_drop_tool_calls_fail(ws, template, dropped):
    rep = verify_masking(_write(ws, "tools", _tool_rows(3)), _tok(ws, "qwen2_5"),
                         chat_template=template)
    codes = _codes(rep)
    if dropped:
        assert rep.verdict == "fail" and rep.reasons[0].code == "tool_calls_not_rendered", codes
        assert "get_weather" in rep.reasons[0].message
    else:
        assert "tool_calls_not_rendered" not in codes, rep.reasons
        assert rep.trained_by_role["assistant"].trained >= 3 * 10  # the calls are trained


def test_every_reason_code_is_documented():
    import re
    src = "".join((Path(__file__).resolve().parent.parent / "tools" / f).read_text()
                  for f in ("masking.py", "masking_analysis.py"))
    codes = set(re.findall(r'code="([a-z_]+)"', src))
    doc = (Path(__file__).resolve().parent.parent / "references/masking.md").read_text()
    assert len(codes) > 20
    assert not {c for c in codes if f"`{c}`" not in doc}


def test_verify_masking_reads_the_recipe_as_launch_training_does(ws):
    import yaml

    from tools.runs import _check_masking
    data, tok = _write(ws, "pc", _pc(3, False)), _tok(ws, "qwen2_5")
    tpl = chat_templates.materialize("trl:qwen2_5.jinja")
    cfg = {"model_name_or_path": tok, "dataset_name": data, "max_length": 77, "chat_template_path": tpl}
    (ws.root / "r.yaml").write_text(yaml.safe_dump(cfg))
    rep = verify_masking(recipe="r.yaml")
    assert rep.verdict == "pass", rep.reasons
    assert rep.settings.max_length == 77 and rep.settings.chat_template == tpl
    checks: list[str] = []
    _check_masking(cfg, checks, [])  # the launch gate finds exactly this report
    assert f"masking report for {data} [train]: pass" in checks
    with pytest.raises(UserError) as e:
        verify_masking(recipe="r.yaml", tokenizer="tok/other")
    assert e.value.field == "tokenizer"


def test_the_enable_thinking_fix_through_convert_dataset(ws):
    """The fix template_text_trained names, done with the tools: convert with the kwargs column."""
    from tools.data import convert_dataset
    src = ws.root / "raw.jsonl"
    src.write_text("".join(json.dumps({"question": f"What is 7 times {i}?", "answer": f"{7 * i}."}) + "\n"
                           for i in range(6)))
    tok = _tok(ws, "qwen2_5")
    for out, kwargs in (("plain", None), ("nothink", {"enable_thinking": False})):
        convert_dataset("raw.jsonl", f"data/{out}", test_size=0, chat_template_kwargs=kwargs)
        rep = verify_masking(f"data/{out}", tok, chat_template="trl:qwen3.jinja")
        if kwargs is None:
            assert _codes(rep) == ["template_text_trained"], rep.reasons
        else:
            assert rep.verdict == "pass", rep.reasons
            row = json.loads((ws.root / "data/nothink/train.jsonl").read_text().splitlines()[0])
            assert row["chat_template_kwargs"] == {"enable_thinking": False}
