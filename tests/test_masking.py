"""verify_masking: TRL's own preparation under real tokenizers and templates, every classic failure.

Datasets are small JSONL files written into the test workspace from the shared fixtures
(gsm8k, OpenAI chat). Each classic failure is shown under at least two real templates.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tools.errors import UserError
from tools.masking import find_masking_report, verify_masking
from tools.tiny import CHATML_TEMPLATE

from conftest import FIXTURES as FIX  # noqa: E402
TOKENIZERS = ["llama3", "phi3", "qwen2_5"]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _gsm(n: int) -> list[dict]:
    """gsm8k rows as conversational prompt/completion (what convert_dataset produces)."""
    rows = _jsonl(FIX / "datasets/gsm8k/train_first1000.jsonl")[:n]
    return [{"prompt": [{"role": "user", "content": r["question"]}],
             "completion": [{"role": "assistant", "content": r["answer"]}]} for r in rows]


def _toy() -> list[dict]:
    return _jsonl(FIX / "datasets/openai_chat/toy_chat_fine_tuning.jsonl")


def _chat_pc(rows: list[dict]) -> list[dict]:
    """OpenAI chat rows as prompt/completion: everything before the last reply is the prompt."""
    out = []
    for r in rows:
        msgs = r["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        out.append({"prompt": msgs[:last], "completion": msgs[last:last + 1]})
    return out


def _write(ws, name: str, rows: list[dict]) -> str:
    d = ws.root / "data" / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return f"data/{name}"


def _tok(ws, name: str) -> str:
    dst = ws.root / "tok" / name
    if not dst.exists():
        shutil.copytree(FIX / "tokenizers" / name, dst)
    return f"tok/{name}"


def _tpl(ws, rel: str) -> str:
    src = FIX / "templates" / rel
    dst = ws.root / "tpl" / src.name
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)
    return f"tpl/{src.name}"


def _codes(rep, severities=("fail", "warn")) -> set[str]:
    return {r.code for r in rep.reasons if r.severity in severities}


def _trained_spans(text: str) -> str:
    return "".join(re.findall(r"\[\[(.*?)\]\]", text, flags=re.S))


# ---------------------------------------------------------------------------------------------
# correct data passes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tok", TOKENIZERS)
def test_prompt_completion_passes_under_real_tokenizers(ws, tok):
    rows = _gsm(3) + _chat_pc(_toy()[:4])
    rep = verify_masking(_write(ws, "pc", rows), _tok(ws, tok), show_examples=5)

    assert rep.verdict == "pass", rep.reasons
    assert rep.examples_checked == len(rows)
    assert rep.settings.completion_only_loss_effective is True
    assert rep.all_assistant_turns_trained and rep.end_of_turn_trained
    assert rep.no_prompt_tokens_trained and rep.prompt_tokens_trained == 0
    assert rep.template_matches_inference and rep.double_bos_examples == 0
    roles = rep.trained_by_role
    assert roles["user"].trained == 0 and roles["user"].tokens > 0
    assert roles["system"].trained == 0
    assert roles["assistant_context"].trained == 0  # earlier replies inside the prompt
    assert roles["assistant"].trained == roles["assistant"].tokens > 0
    assert 0 < rep.trained_share.min <= rep.trained_share.max < 1
    assert rep.assistant_turns == len(rows) == rep.assistant_turns_fully_trained
    # Evidence: the reply and its end-of-turn token are inside the trained spans, the question is not.
    first = rep.examples[0].text
    assert "#### 72" in _trained_spans(first)
    assert "Natalia sold clips" not in _trained_spans(first)
    eos_like = {"llama3": "<|eot_id|>", "phi3": "<|end|>", "qwen2_5": "<|im_end|>"}[tok]
    assert eos_like in _trained_spans(first)
    tennis = rep.examples[4].text  # multi-turn chat: only the last reply is trained
    assert "It's easy to learn!" in _trained_spans(tennis)
    assert "Golf is fun too!" not in _trained_spans(tennis)


def test_tiny_model_passes_and_report_is_found(ws, tiny_model):
    data, tok = _write(ws, "pc", _gsm(3)), ws.rel(tiny_model)
    rep = verify_masking(data, tok, max_length=512)
    assert rep.verdict == "pass", rep.reasons
    assert rep.end_of_turn_trained and rep.no_prompt_tokens_trained

    path = Path(rep.report_path)
    assert path.is_file() and path.parent == ws.root / "reports" / "masking"
    assert json.loads(path.read_text())["key"] == rep.key

    kw = dict(completion_only_loss=None, assistant_only_loss=False, packing=False, max_length=512)
    found = find_masking_report(data, tok, **kw)
    assert found is not None and found.key == rep.key and found.verdict == "pass"
    rep2 = verify_masking(data, tok, max_length=512, show_examples=0)
    assert rep2.key == rep.key
    assert find_masking_report(data, tok, **kw).report_path == rep2.report_path  # newest wins

    for change in (dict(max_length=1024), dict(packing=True), dict(assistant_only_loss=True),
                   dict(completion_only_loss=True)):
        assert find_masking_report(data, tok, **{**kw, **change}) is None, change
    tpl = ws.root / "chatml.jinja"
    tpl.write_text(CHATML_TEMPLATE + " ")  # another template text: another key
    assert find_masking_report(data, tok, **kw, chat_template_path="chatml.jinja") is None
    assert find_masking_report("data/none", tok, **kw) is None
    # The dataset is identified by content: any change invalidates the report.
    f = ws.root / data / "train.jsonl"
    f.write_text(f.read_text() + json.dumps(_gsm(4)[3]) + "\n")
    assert find_masking_report(data, tok, **kw) is None


def test_text_data_trains_everything_by_design(ws, tiny_model):
    rows = [{"text": "Q: " + r["question"] + "\nA: " + r["answer"]}
            for r in _jsonl(FIX / "datasets/gsm8k/train_first1000.jsonl")[:3]]
    rep = verify_masking(_write(ws, "text", rows), ws.rel(tiny_model), max_length=512)
    assert rep.verdict == "pass" and rep.dataset_format == "text"
    assert "language_modeling" in _codes(rep, ("info",))
    assert rep.trained_by_role["text"].trained == rep.trained_by_role["text"].tokens


# ---------------------------------------------------------------------------------------------
# classic failures
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tok", ["qwen2_5", "llama3"])
def test_messages_with_completion_only_loss_trains_all_tokens(ws, tok):
    rep = verify_masking(_write(ws, "msgs", _toy()[:3]), _tok(ws, tok), completion_only_loss=True)
    assert rep.verdict == "fail"
    reason = next(r for r in rep.reasons if r.code == "messages_trains_all_tokens")
    assert "prompt_completion" in reason.fix and "generation" in reason.fix
    assert rep.trained_share.min == 1.0
    assert rep.trained_by_role["user"].trained == rep.trained_by_role["user"].tokens > 0
    assert rep.no_prompt_tokens_trained is False


def _chatml_eos_outside(ws) -> str:
    """The real Qwen2.5 template with {% generation %} that leaves <|im_end|> outside."""
    text = (FIX / "templates/llama.cpp/Qwen-Qwen2.5-7B-Instruct.jinja").read_text()
    line = "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    assert line in text
    new = ("{%- if message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}{%- generation %}"
           "{{- message.content }}{%- endgeneration %}{{- '<|im_end|>\\n' }}{%- else %}"
           + line + "{%- endif %}")
    (ws.root / "qwen_eos_outside.jinja").write_text(text.replace(line, new))
    return "qwen_eos_outside.jinja"


def _llama_eos_outside(ws) -> str:
    """TRL's llama3_training template with <|eot_id|> moved out of the generation block."""
    text = (FIX / "templates/trl/llama3_training.jinja").read_text()
    old = "{{- message['content'] | trim + '<|eot_id|>' }}\n        {%- endgeneration %}"
    assert old in text
    new = "{{- message['content'] | trim }}\n        {%- endgeneration %}{{- '<|eot_id|>' }}"
    (ws.root / "llama_eos_outside.jinja").write_text(text.replace(old, new))
    return "llama_eos_outside.jinja"


@pytest.mark.parametrize("tok,make,eot", [("qwen2_5", _chatml_eos_outside, "<|im_end|>"),
                                          ("llama3", _llama_eos_outside, "<|eot_id|>")])
def test_end_of_turn_outside_generation_markers_is_not_trained(ws, tok, make, eot):
    rep = verify_masking(_write(ws, "msgs", _toy()[:3]), _tok(ws, tok), assistant_only_loss=True,
                         chat_template=make(ws))
    assert rep.verdict == "fail"
    assert "eos_not_trained" in _codes(rep)
    assert rep.end_of_turn_trained is False and rep.all_assistant_turns_trained is True
    assert rep.no_prompt_tokens_trained
    assert "]]" + eot in rep.examples[0].text.replace("\n", "")
    assert eot not in _trained_spans(rep.examples[0].text)


@pytest.mark.parametrize("tok", ["phi3", "llama3_pad_eos"])
def test_pad_equals_eos_still_trains_eos(ws, tok):
    if tok == "llama3_pad_eos":  # Llama 3 with pad set to its EOS, as many recipes do
        name = _tok(ws, "llama3")
        for fname in ("tokenizer_config.json", "special_tokens_map.json"):
            f = ws.root / name / fname
            cfg = json.loads(f.read_text())
            cfg["pad_token"] = "<|eot_id|>"
            f.write_text(json.dumps(cfg))
    else:
        name = _tok(ws, tok)
    rep = verify_masking(_write(ws, "pc", _gsm(2)), name)
    assert rep.pad_equals_eos is True
    assert "pad_equals_eos" in _codes(rep, ("info",))
    assert rep.end_of_turn_trained is True and rep.eos_masked_examples == 0
    assert rep.verdict == "pass"


@pytest.mark.parametrize("tok", ["qwen2_5", "phi3"])
def test_truncation_cutting_and_removing_completions(ws, tok):
    long_reply = _chat_pc(_toy()[4:5])  # the toy set's very long reply
    long_prompt = [{"prompt": [{"role": "user", "content": "Summarise: " + "All work and no play. " * 80}],
                    "completion": [{"role": "assistant", "content": "A dull boy."}]}]
    data = _write(ws, "long", _gsm(2) + long_reply + long_prompt)
    rep = verify_masking(data, _tok(ws, tok), max_length=160)
    assert rep.verdict == "fail"
    reason = next(r for r in rep.reasons if r.code == "truncation_cuts_completions")
    assert "max_length" in reason.fix
    assert rep.truncation.completions_cut >= 1 and rep.truncation.examples_removed >= 1
    assert set(reason.rows) >= {2, 3}
    assert rep.truncation.longest_tokens > 160
    if tok == "qwen2_5":  # packing (BFD, padding-free) truncates too, and keeps zero-loss rows
        packed = verify_masking(data, _tok(ws, tok), max_length=160, packing=True)
        assert packed.settings.padding_free is True
        assert "truncation_cuts_completions" in _codes(packed)
        assert packed.zero_trained_examples >= 1


def _tiny_tok(ws, request) -> str:
    return ws.rel(request.getfixturevalue("tiny_model"))


@pytest.mark.parametrize("tok", ["tiny", "llama3"])
def test_assistant_only_loss_without_generation_markers_fails(ws, request, tok):
    name = _tiny_tok(ws, request) if tok == "tiny" else _tok(ws, tok)
    rep = verify_masking(_write(ws, "msgs", _toy()[:3]), name, assistant_only_loss=True)
    assert rep.verdict == "fail"
    reason = next(r for r in rep.reasons if r.code == "assistant_only_loss_unsupported")
    assert "{% generation %}" in reason.message
    assert "prompt_completion" in reason.fix and "chat_template" in reason.fix


@pytest.mark.parametrize("tok,tpl", [("qwen2_5", "trl/qwen3_training.jinja"),
                                     ("llama3", "trl/llama3_training.jinja"),
                                     ("qwen2_5", None)])
def test_assistant_only_loss_with_generation_markers_passes(ws, tok, tpl):
    rep = verify_masking(_write(ws, "msgs", _toy()[:3]), _tok(ws, tok), assistant_only_loss=True,
                         chat_template=_tpl(ws, tpl) if tpl else None)
    if tpl and "qwen3" in tpl:  # Qwen3 writes an empty <think> block into every reply: named
        assert rep.verdict == "warn" and _codes(rep) == {"template_text_trained"}, rep.reasons
    else:
        assert rep.verdict == "pass", rep.reasons
    assert rep.assistant_turns == 6 == rep.assistant_turns_fully_trained  # 1 + 4 + 1 replies
    assert rep.end_of_turn_trained and rep.template_matches_inference
    assert rep.trained_by_role["user"].trained == 0 and rep.trained_by_role["system"].trained == 0
    if tpl is None:  # Qwen2.5's own template: TRL swaps in its training variant
        assert rep.settings.training_template == "trl_training_variant"
        assert "training_template_swapped" in _codes(rep, ("info",))


@pytest.mark.parametrize("tok,tpl", [
    ("llama3", "llama.cpp/deepseek-ai-DeepSeek-R1-Distill-Llama-8B.jinja"),
    ("qwen2_5", "llama.cpp/Qwen-QwQ-32B.jinja")])
def test_template_mismatch_between_training_and_inference(ws, tok, tpl):
    # Both templates end the generation prompt with "<think>\n" but drop it from a rendered reply.
    rows = _gsm(3)
    rep = verify_masking(_write(ws, "pc", rows), _tok(ws, tok), chat_template=_tpl(ws, tpl))
    assert rep.verdict == "fail"
    reason = next(r for r in rep.reasons if r.code == "template_mismatch")
    assert "<think>" in reason.message
    assert rep.template_matches_inference is False
    assert rep.template_mismatch_examples == len(rows)


@pytest.mark.parametrize("tok,tpl", [("qwen2_5", "trl/qwen3_training.jinja"),
                                     ("llama3", "trl/llama3_training.jinja")])
def test_rows_with_zero_trained_tokens(ws, tok, tpl):
    rows = _toy()[:2] + [{"messages": [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "Hello?"}]}]
    rep = verify_masking(_write(ws, "zero", rows), _tok(ws, tok), assistant_only_loss=True,
                         chat_template=_tpl(ws, tpl))
    assert rep.verdict == "fail"
    reason = next(r for r in rep.reasons if r.code == "zero_trained_examples")
    assert reason.rows == [2] and rep.zero_trained_examples == 1
    assert rep.assistant_turns == 5 == rep.assistant_turns_fully_trained  # other rows still proven


@pytest.mark.parametrize("case", ["sharegpt_roles", "phi3_drops_system"])
def test_messages_the_template_does_not_render(ws, case):
    if case == "sharegpt_roles":  # raw ShareGPT: TRL renames from/value but keeps human/gpt
        rows = json.loads((FIX / "datasets/sharegpt/fastchat_dummy_conversation_first400.json")
                          .read_text())[:3]
        rep = verify_masking(_write(ws, "sg", rows), _tok(ws, "qwen2_5"))
        reason = next(r for r in rep.reasons if r.code == "message_not_rendered")
        assert reason.severity == "fail" and rep.verdict == "fail"
        assert "convert_dataset" in reason.fix
    else:  # the original Phi-3 template silently drops system prompts
        rep = verify_masking(_write(ws, "pc", _chat_pc(_toy()[:2])), _tok(ws, "phi3"),
                             chat_template=_tpl(ws, "gguf/microsoft-Phi-3-mini-4k-instruct.jinja"))
        reason = next(r for r in rep.reasons if r.code == "message_not_rendered")
        assert reason.severity == "warn" and "system" in reason.message
        assert rep.no_prompt_tokens_trained and rep.end_of_turn_trained


def test_double_bos_and_prompt_boundary(ws):
    """Plain-text prompts pre-rendered with the template already hold BOS; Llama 3 adds another."""
    from transformers import AutoTokenizer
    name = _tok(ws, "llama3")
    tk = AutoTokenizer.from_pretrained(ws.root / name)
    gsm = _jsonl(FIX / "datasets/gsm8k/train_first1000.jsonl")[:2]
    rows = [{"prompt": tk.apply_chat_template([{"role": "user", "content": r["question"]}],
                                              tokenize=False, add_generation_prompt=True),
             "completion": r["answer"]} for r in gsm]
    rep = verify_masking(_write(ws, "bos", rows), name)
    assert rep.dataset_format == "prompt_completion_text"
    assert "double_bos" in _codes(rep) and rep.double_bos_examples == 2
    assert rep.examples[0].text.startswith("<|begin_of_text|><|begin_of_text|>")


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------
def _field(exc_info) -> str:
    return exc_info.value.field


def test_bad_inputs_name_the_field(ws, tiny_model):
    tok = ws.rel(tiny_model)
    data = _write(ws, "pc", _gsm(2))
    with pytest.raises(UserError) as e:
        verify_masking("data/missing", tok)
    assert _field(e) == "dataset"
    with pytest.raises(UserError) as e:
        verify_masking("/etc/passwd", tok)
    assert _field(e) == "dataset"
    with pytest.raises(UserError) as e:
        verify_masking(data, "models/missing")
    assert _field(e) == "tokenizer"
    with pytest.raises(UserError) as e:
        verify_masking(data, tok, split="test")
    assert _field(e) == "split" and "train" in str(e.value)
    bad = ws.root / "bad.jsonl"
    bad.write_text(json.dumps(_gsm(1)[0]) + "\n{not json\n")
    with pytest.raises(UserError) as e:
        verify_masking("bad.jsonl", tok)
    assert _field(e) == "dataset" and "line 2" in str(e.value)
    with pytest.raises(UserError) as e:
        verify_masking(data, tok, chat_template="tpl/missing.jinja")
    assert _field(e) == "chat_template"


def test_tokenizer_without_chat_template(ws, tiny_model):
    """A base model's tokenizer: UserError naming chat_template, then pass with one given."""
    base = ws.root / "models" / "base-tok"
    base.mkdir(parents=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model / f, base / f)
    data = _write(ws, "pc", _gsm(2))
    with pytest.raises(UserError) as e:
        verify_masking(data, "models/base-tok")
    assert _field(e) == "chat_template" and "chat_template" in (e.value.fix or "")

    (ws.root / "chatml.jinja").write_text(CHATML_TEMPLATE)
    rep = verify_masking(data, "models/base-tok", chat_template="chatml.jinja", max_length=512)
    assert rep.verdict == "pass", rep.reasons
    assert rep.settings.chat_template == "chatml.jinja"
    literal = verify_masking(data, "models/base-tok", chat_template=CHATML_TEMPLATE, max_length=512)
    assert literal.key == rep.key  # the template is identified by its text
    kw = dict(completion_only_loss=None, assistant_only_loss=False, packing=False, max_length=512)
    assert find_masking_report(data, "models/base-tok", **kw, chat_template_path="chatml.jinja")
    assert find_masking_report(data, "models/base-tok", **kw) is None


@pytest.mark.parametrize("tok", ["qwen2_5", "llama3"])
def test_roles_unattributed_says_there_is_no_evidence(ws, tok, monkeypatch):
    """A tokenizer without offset mapping (slow, sentencepiece-only ones have none) leaves no
    token mappable to a role. The labels are still TRL's, but the report must not claim that the
    prompt is masked or the template matches (no evidence), and must say why. The offsets are
    withheld as such a tokenizer would; TRL's preparation runs for real."""
    from tools import masking_checks
    monkeypatch.setattr(masking_checks, "token_offsets", lambda *a, **k: None)
    rep = verify_masking(_write(ws, "pc", _gsm(4)), _tok(ws, tok))
    reason = next(r for r in rep.reasons if r.code == "roles_unattributed")
    assert reason.severity == "warn" and reason.rows == [0, 1, 2, 3]
    assert "NOT checked for any example" in reason.message and "no evidence" in reason.message
    assert rep.no_prompt_tokens_trained is None and rep.template_matches_inference is None
    assert rep.end_of_turn_trained is None and rep.all_assistant_turns_trained is None
    assert rep.verdict == "warn" and set(rep.trained_by_role) == {"unattributed"}


def test_a_template_that_drops_the_reply_trains_nothing(ws, tiny_model):
    """A template that renders earlier replies but drops the last one (a broken 'inference-only'
    variant): TRL's completion is empty, so every row trains on nothing - a fail naming the rows."""
    tpl = ("{% for m in messages %}{% if m['role'] != 'assistant' %}<|im_start|>{{ m['role'] }}\n"
           "{{ m['content'] }}<|im_end|>\n{% elif not loop.last %}<|im_start|>assistant\n{{ m['content'] }}"
           "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (ws.root / "drop_last.jinja").write_text(tpl)
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}],
             "completion": [{"role": "assistant", "content": f"answer {i}"}]} for i in range(4)]
    rep = verify_masking(_write(ws, "dropped", rows), ws.rel(tiny_model), chat_template="drop_last.jinja",
                         max_length=64)
    assert rep.verdict == "fail" and rep.zero_trained_examples == 4
    reason = next(r for r in rep.reasons if r.code == "zero_trained_examples")
    assert reason.rows == [0, 1, 2, 3] and "no trained token" in reason.message
