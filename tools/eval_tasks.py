"""Build an lm-evaluation-harness task from a JSONL file in the workspace.

Rows may be question/answer (GSM8K style), prompt/completion (strings or conversational
message lists, as convert_dataset writes), messages (the last assistant turn is the answer), or
multiple choice (`choices` + `answer`). The metric follows the answers: numbers (`#### 72`, a
bare number, a line ending in one) -> exact match on the extracted number; short answers (labels,
a few words) -> exact match on the reply's first line; free text -> ROUGE-L and chrF of the whole
reply (exact match scores ~0 on any paraphrase); choices -> log-likelihood `acc`.

The tool writes a normalised `data.jsonl` and a task YAML (`dataset_path: json`, `output_type:
generate_until` + a regex filter + `exact_match`, or `process_results` for ROUGE-L/chrF, or
`multiple_choice` + `acc`) into `<workspace>/eval_tasks/<name>-<hash>/`, which lm-eval loads with
`TaskManager(include_path=<that dir>)`; the same YAML runs with `lm_eval --include_path` where this
package is importable. `read_examples` (the rows as chat messages) is shared with tools.generate.
"""
from __future__ import annotations

import collections
import hashlib
import json
import re
import statistics
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from .errors import UserError
from .workspace import get_workspace

PROMPT_FIELDS = ["question", "prompt", "input", "query", "instruction", "problem"]
ANSWER_FIELDS = ["answer", "completion", "output", "response", "target", "solution", "label"]

_NUM = r"-?[0-9][0-9,]*(?:\.[0-9]+)?"
# "#### N" anywhere (GSM8K), else the last number of the response. One regex so that the YAML
# runs unchanged under `lm_eval`: findall + group_select 0 takes the first match, and the second
# branch only matches a number that has no digit after it.
NUMERIC_REGEX = rf"#### *\$? *({_NUM})|({_NUM})(?![\s\S]*[0-9])"
# "#### answer" if present, else the first non-empty line.
TEXT_REGEX = r"#### *([^\n]*\S)|^\s*(?![\s\S]*####)([^\n]*\S)"
# Stop strings in chat mode: the common end-of-turn tokens (lm-eval adds the tokenizer eos; the
# chat-completions API accepts 4 stop strings).
CHAT_UNTIL = ["<|im_end|>", "<|eot_id|>", "<end_of_turn>"]
PLAIN_UNTIL = ["Question:", "</s>", "<|im_end|>"]
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# An answer of at most this many words on one line is closed (a label, a name, a short phrase):
# exact match is fair there. Longer answers are free text.
SHORT_WORDS = 5
FREE_TEXT_METRICS = ["rougeL", "chrf"]
# lm-eval resolves this from the YAML (a file next to it first, else an importable module).
FREE_TEXT_SCORER = "tools.eval_tasks.score_free_text"
AnswerMode = Literal["auto", "numeric", "text", "free_text"]
_ROLES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


class LocalTask(BaseModel):
    """A task built from a workspace JSONL."""
    name: str
    task_dir: str
    yaml_path: str
    data_path: str
    source: str
    format: Literal["question_answer", "prompt_completion", "messages", "multiple_choice"]
    prompt_field: str | None
    answer_field: str | None
    kind: Literal["generate_until", "multiple_choice"]
    answer_mode: Literal["numeric", "text", "free_text", "choice"]
    answer_regex: str | None
    metrics: list[str] = []
    answer_kinds: dict[str, int] = {}
    scoring: str = ""
    rows: int
    skipped: int
    system_prompt: str | None = None
    chat_style: bool
    notes: list[str] = []


@dataclass
class Example:
    """One row as a chat: the messages before the answer ({role, content}), and the answer."""
    line: int
    messages: list[dict]
    answer: Any  # the answer text; for multiple choice the index of the right choice
    choices: list[str] | None = None


@dataclass
class RowSet:
    """The usable rows of a dataset file, with what was detected about them."""
    source: Path
    format: str
    prompt_field: str | None
    answer_field: str | None
    examples: list[Example]
    skipped: int = 0
    notes: set[str] = dc_field(default_factory=set)


# ----------------------------------------------------------------------------- answers
def _norm(s: str) -> str:
    s = s.strip().replace(",", "").replace("$", "")
    return s[:-1] if s.endswith(".") else s


def _marked(text: str) -> str | None:
    """The explicitly marked final answer (`#### X` or `\\boxed{X}`), or None."""
    hashes = re.findall(r"####\s*([^\n]+)", text)
    if hashes:
        return _norm(hashes[-1])
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    return _norm(boxed[-1]) if boxed else None


def final_answer(text: str, regex: str | None = None) -> str:
    """The gold final answer of an answer text: a custom regex's first group, `#### X`,
    `\\boxed{X}`, the whole text when it is one number, else the last number, else the text."""
    text = str(text)
    if regex:
        m = re.search(regex, text)
        if m:
            g = next((x for x in m.groups() if x), m.group(0))
            return g.strip()
    marked = _marked(text)
    if marked is not None:
        return marked
    if re.fullmatch(rf"\s*\$?\s*{_NUM}\s*\.?\s*", text):
        return _norm(text)
    nums = re.findall(_NUM, text)
    if nums:
        return _norm(nums[-1])
    return text.strip()


def _is_number(s: str) -> bool:
    return bool(re.fullmatch(_NUM, _norm(s)))


def answer_kind(text: str) -> Literal["numeric", "short", "long"]:
    """numeric: a marked number, a bare number, or text ending in a number ("... = 19.");
    short: a marked text answer or at most SHORT_WORDS words on one line; long: free text."""
    t = str(text).strip()
    marked = _marked(t)
    if marked is not None:
        return "numeric" if _is_number(marked) else "short"
    # The number must close the answer: "Orders ship in 5-7 business days." is not numeric.
    if re.search(rf"(?<![\w.,-]){_NUM}\s*[.!)]?$", t):
        return "numeric"
    return "short" if "\n" not in t and len(t.split()) <= SHORT_WORDS else "long"


def _gold(text: str, mode: str, regex: str | None) -> str:
    """The reference the metric compares with: extracted like the reply for exact match, the
    whole answer for free text."""
    text = str(text)
    if mode == "numeric":
        return final_answer(text, regex) if regex else _norm(final_answer(text))
    if mode == "text":
        if regex:
            return final_answer(text, regex)
        marked = _marked(text)
        return marked if marked is not None else text.strip().splitlines()[0].strip()
    return text.strip()


# ----------------------------------------------------------------------------- rows
def _content(m) -> str:
    c = m.get("content", m.get("value", "")) if isinstance(m, dict) else m
    if isinstance(c, list):  # [{"type": "text", "text": ...}]
        c = "".join(p.get("text", "") for p in c if isinstance(p, dict))
    return str(c)


def _role(m: dict) -> str | None:
    r = m.get("role") or m.get("from")
    return _ROLES.get(r, r)


def _chat(msgs: list) -> list[dict]:
    """Messages normalised to {role, content} with user/assistant/system roles."""
    out = []
    for m in msgs:
        if not isinstance(m, dict):
            raise ValueError("messages must be objects with role and content")
        out.append({"role": _role(m), "content": _content(m)})
    return out


def _split_messages(msgs: list[dict], notes: set[str]) -> tuple[str | None, str]:
    """(system prompt, user prompt text) from the chat before the answer: lm-eval sends one
    user turn per question, so several turns are flattened into 'role: text' lines."""
    system = None
    turns = []
    for m in msgs:
        if m["role"] == "system":
            system = m["content"]
        else:
            turns.append((m["role"], m["content"]))
    if len(turns) > 1:
        notes.add("Multi-turn prompts are flattened into one user message ('role: text' lines): "
                  "lm-eval sends one user turn per question.")
        return system, "\n".join(f"{r}: {t}" for r, t in turns)
    return system, turns[0][1]


def _read_rows(path: Path) -> list[tuple[int, dict]]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise UserError(f"line {i} is not valid JSON ({exc.msg}).", field=f"local_task line {i}",
                                fix="Make the file JSONL: one JSON object per line.") from None
            if not isinstance(row, dict):
                raise UserError(f"line {i} is not a JSON object.", field=f"local_task line {i}",
                                fix="Each line must be an object such as {\"question\": ..., \"answer\": ...}.")
            rows.append((i, row))
    if not rows:
        raise UserError("the file has no rows.", field="local_task", fix="Give a non-empty JSONL file.")
    return rows


def _pick(row: dict, given: str | None, candidates: list[str], what: str) -> str | None:
    if given:
        if given not in row:
            raise UserError(f"first row has no field '{given}' (fields: {sorted(row)}).",
                            field=f"{what}_field", fix=f"Pass {what}_field as one of {sorted(row)}.")
        return given
    return next((c for c in candidates if c in row), None)


def _choice_label(ans, choices: list[str]) -> int:
    if isinstance(ans, bool):
        raise ValueError("answer must be an index, a letter or the choice text")
    if isinstance(ans, int):
        if 0 <= ans < len(choices):
            return ans
        raise ValueError(f"answer index {ans} outside 0..{len(choices) - 1}")
    s = str(ans).strip()
    if s.isdigit() and 0 <= int(s) < len(choices):
        return int(s)
    m = re.fullmatch(r"\(?([A-Za-z])\)?\.?", s)
    if m and LETTERS.index(m.group(1).upper()) < len(choices):
        return LETTERS.index(m.group(1).upper())
    if s in choices:
        return choices.index(s)
    raise ValueError(f"answer {ans!r} is not an index, a letter or one of the choices")


def choice_prompt(prompt: str, choices: list[str], chat_style: bool) -> str:
    """A multiple-choice question with lettered options."""
    opts = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(choices))
    return (f"{prompt}\n\n{opts}\n\nAnswer with the letter of the correct option."
            if chat_style else f"Question: {prompt}\n{opts}\nAnswer:")


def dataset_file(path: str, *, split: str | None = None, field: str = "local_task",
                 notes: set[str] | None = None) -> Path:
    """The JSONL file of `path`: the file itself, or in a convert_dataset dir `<split>.jsonl`
    (default: test, else validation, else train with a note)."""
    src = get_workspace().resolve(path, field=field, must_exist=True)
    if not src.is_dir():
        if split:
            raise UserError(f"split='{split}' applies to a dataset directory, and '{path}' is a file.",
                            field="split", fix="Drop split, or pass the directory holding <split>.jsonl.")
        return src
    names = [f"{split}.jsonl"] if split else ["test.jsonl", "validation.jsonl", "train.jsonl"]
    for name in names:
        if (src / name).is_file():
            if name == "train.jsonl" and not split and notes is not None:
                notes.add("The directory has no test.jsonl: evaluating on train.jsonl measures "
                          "memorisation, not generalisation. Split off a test set.")
            return src / name
    have = sorted(p.name for p in src.glob("*.jsonl"))
    raise UserError(f"'{path}' is a directory without {' or '.join(names)} (it has: "
                    f"{', '.join(have) or 'no JSONL'}).", field="split" if split else field,
                    fix="Pass split as one of " + (", ".join(p[:-6] for p in have) or "test/train")
                        + ", or give a JSONL file.")


def _detect_format(first: dict, prompt_field: str | None, answer_field: str | None):
    """(format, prompt field, answer field) from the first row."""
    if prompt_field is None and answer_field is None and isinstance(first.get("messages"), list):
        return "messages", "messages", None
    if "choices" in first and isinstance(first["choices"], list):
        return ("multiple_choice", _pick(first, prompt_field, PROMPT_FIELDS, "prompt"),
                _pick(first, answer_field, ["answer", "label", "target", "gold"], "answer"))
    pf = _pick(first, prompt_field, PROMPT_FIELDS, "prompt")
    af = _pick(first, answer_field, ANSWER_FIELDS, "answer")
    fmt = "prompt_completion" if (pf == "prompt" and af == "completion") else "question_answer"
    return fmt, pf, af


def _parse_row(line: int, row: dict, fmt: str, pf: str | None, af: str | None) -> Example:
    """One row as an Example; ValueError/KeyError/TypeError when it cannot be used."""
    if fmt == "messages":
        msgs = row.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("no messages list")
        chat = _chat(msgs)
        last = max((i for i, m in enumerate(chat) if m["role"] == "assistant"), default=None)
        if last is None:
            raise ValueError("no assistant message to take the answer from")
        prior, answer = chat[:last], chat[last]["content"]
    else:
        p, a = row.get(pf), row.get(af)
        if p is None or a is None:
            raise ValueError(f"missing '{pf}' or '{af}'")
        prior = _chat(p) if isinstance(p, list) else [{"role": "user", "content": str(p)}]
        if isinstance(a, list) and fmt != "multiple_choice":
            a = next((_content(m) for m in reversed(a) if isinstance(m, dict)
                      and _role(m) in ("assistant", None)), "")
        answer = a
    turns = [m["content"] for m in prior if m["role"] != "system"]
    if not turns:
        raise ValueError("no user message before the answer")
    if not "".join(turns).strip():
        raise ValueError("empty prompt")
    if fmt != "multiple_choice":
        return Example(line, prior, str(answer))
    choices = [str(c) for c in row["choices"]]
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError("choices must hold 2 to 26 options")
    return Example(line, prior, _choice_label(answer, choices), choices)


def read_examples(path: str, *, split: str | None = None, prompt_field: str | None = None,
                  answer_field: str | None = None, field: str = "local_task") -> RowSet:
    """The usable rows of a workspace JSONL (or dataset dir) as chat examples; bad rows are
    skipped with a note naming the first."""
    notes: set[str] = set()
    src = dataset_file(path, split=split, field=field, notes=notes)
    rows = _read_rows(src)
    fmt, pf, af = _detect_format(rows[0][1], prompt_field, answer_field)
    if pf is None or af is None and fmt != "messages":
        raise UserError(f"could not find the {'prompt' if pf is None else 'answer'} field in "
                        f"{sorted(rows[0][1])}.", field="prompt_field" if pf is None else "answer_field",
                        fix="Pass prompt_field and answer_field, or use rows with question/answer, "
                            "prompt/completion, messages, or choices+answer.")
    out = RowSet(src, fmt, pf, af, [], notes=notes)
    for line, row in rows:
        try:
            out.examples.append(_parse_row(line, row, fmt, pf, af))
        except (ValueError, KeyError, TypeError) as exc:
            out.skipped += 1
            if out.skipped == 1:
                notes.add(f"Skipped rows, e.g. line {line}: {exc}.")
    if not out.examples:
        raise UserError(f"no usable rows ({out.skipped} skipped).", field=field,
                        fix="Check the fields; pass prompt_field/answer_field if auto-detection is wrong.")
    return out


# ----------------------------------------------------------------------------- scoring choice
def _check_regex(answer_regex: str) -> None:
    try:
        rx = re.compile(answer_regex)
    except re.error as exc:
        raise UserError(f"invalid regex ({exc}).", field="answer_regex",
                        fix="Give a Python regex with one capture group, e.g. 'answer is (\\d+)'.") from None
    if rx.groups < 1:
        raise UserError("the regex has no capture group.", field="answer_regex",
                        fix="Wrap the answer part in parentheses, e.g. 'answer is (\\d+)'.")


def _mode_with_regex(answers: list[str], requested: str, regex: str, notes: set[str]) -> str:
    """The mode when the caller gave answer_regex: it must find an answer in most references."""
    if requested == "free_text":
        raise UserError("answer_regex extracts one answer for exact match; free_text scores the "
                        "whole reply.", field="answer_regex",
                        fix="Drop answer_regex, or use answer_mode='numeric' or 'text'.")
    hits = sum(bool(re.search(regex, a)) for a in answers)
    if 2 * hits < len(answers):
        raise UserError(f"the regex finds an answer in only {hits} of {len(answers)} reference "
                        "answers, so exact match would compare the rest whole.", field="answer_regex",
                        fix="Fit the regex to the answer field, or drop it: the metric is then chosen "
                            "from the answers.")
    if hits < len(answers):
        notes.add(f"answer_regex matches {hits} of {len(answers)} reference answers; the others "
                  "are compared whole.")
    if requested in ("numeric", "text"):
        return requested
    return "numeric" if all(_is_number(final_answer(a, regex)) for a in answers) else "text"


def _choose_mode(answers: list[str], requested: str, kinds: collections.Counter,
                 notes: set[str]) -> str:
    """numeric / text (exact match) / free_text (ROUGE-L, chrF) from what the answers are; an
    explicit mode that does not fit them is refused (or noted when it fits most)."""
    n, num, long = len(answers), kinds["numeric"], kinds["long"]
    if requested == "auto":
        if num == n:
            return "numeric"
        if long * 10 <= n:  # labels and short phrases, the odd long one aside
            if long:
                notes.add(f"{long} of {n} reference answers are longer than {SHORT_WORDS} words: "
                          "exact match will rarely match them.")
            return "text"
        return "free_text"
    if requested == "numeric":
        if 2 * num < n:
            raise UserError(f"only {num} of {n} reference answers are numbers (e.g. "
                            f"'{_example(answers, 'numeric', False)}'): numeric extraction would "
                            "compare stray numbers such as '-7' from '5-7 days'.", field="answer_mode",
                            fix="Use answer_mode='auto' (the metric follows the answers) or "
                                "'free_text' (ROUGE-L, chrF), or give answer_regex.")
        if num < n:
            notes.add(f"answer_mode='numeric': {n - num} of {n} reference answers are not numbers; "
                      "their last number (or the text) is the target.")
    elif requested == "text":
        if 2 * long > n:
            raise UserError(f"{long} of {n} reference answers are free text longer than {SHORT_WORDS} "
                            "words: exact match scores ~0 on any paraphrase, so it would measure "
                            "nothing.", field="answer_mode",
                            fix="Use answer_mode='auto' or 'free_text' (ROUGE-L and chrF).")
        if long:
            notes.add(f"{long} of {n} reference answers are longer than {SHORT_WORDS} words: exact "
                      "match will rarely match them.")
    elif long == 0:
        notes.add("answer_mode='free_text' on short answers: exact match (answer_mode='auto') is "
                  "the stricter measure for them.")
    return requested


def _example(answers: list[str], kind: str, want: bool) -> str:
    a = next((a for a in answers if (answer_kind(a) == kind) == want), answers[0])
    return a if len(a) <= 60 else a[:57] + "..."


def _scoring_text(mode: str, kinds: collections.Counter, answers: list[str]) -> str:
    n = len(answers)
    if mode == "numeric":
        return (f"exact match on the final number (`#### N`, else the reply's last number); "
                f"{kinds['numeric']} of {n} reference answers are numbers.")
    if mode == "text":
        return (f"exact match on the reply's first line (or `#### X`), case and punctuation "
                f"ignored; {n - kinds['long']} of {n} reference answers are short (at most "
                f"{SHORT_WORDS} words).")
    words = statistics.median(len(a.split()) for a in answers)
    return (f"ROUGE-L F1 and chrF of the whole reply against the reference (0..1 per reply, mean "
            f"± stderr); {kinds['long']} of {n} reference answers are free text (median {words:g} "
            "words), where exact match would score ~0 on any paraphrase.")


# ----------------------------------------------------------------------------- free-text metrics
_SCORERS: dict[str, Any] = {}


def rouge_l(reference: str, reply: str) -> float:
    """ROUGE-L F1 (rouge-score, Porter stemmer, as lm-eval's summarisation tasks use it)."""
    if "rouge" not in _SCORERS:
        from rouge_score import rouge_scorer
        _SCORERS["rouge"] = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(_SCORERS["rouge"].score(reference, reply)["rougeL"].fmeasure)


def chrf(reference: str, reply: str) -> float:
    """Sentence chrF (sacrebleu), scaled to 0..1: character n-grams, so any script and any
    inflection count."""
    if "chrf" not in _SCORERS:
        from sacrebleu.metrics import CHRF
        _SCORERS["chrf"] = CHRF()
    return float(_SCORERS["chrf"].sentence_score(reply, [reference]).score) / 100


def score_free_text(doc: dict, results: list) -> dict[str, float]:
    """lm-eval process_results for free-text tasks: the reply against doc['target']."""
    reply = str(results[0] if results else "").strip()
    ref = str(doc["target"])
    return {"rougeL": rouge_l(ref, reply), "chrf": chrf(ref, reply)}


# ----------------------------------------------------------------------------- the task
def _docs(rs: RowSet, mode: str, regex: str | None, chat_style: bool, notes: set[str]):
    """The normalised rows lm-eval reads, and the system prompt counts."""
    systems: collections.Counter = collections.Counter()
    docs = []
    for ex in rs.examples:
        system, prompt = _split_messages(ex.messages, notes)
        if system:
            systems[system] += 1
        if ex.choices is not None:
            docs.append({"prompt": choice_prompt(prompt, ex.choices, chat_style), "options": ex.choices,
                         "letters": list(LETTERS[:len(ex.choices)]), "label": ex.answer})
            continue
        docs.append({"prompt": prompt if chat_style else f"Question: {prompt}\nAnswer:",
                     "target": _gold(ex.answer, mode, regex), "fewshot_target": ex.answer.strip()})
    return docs, systems


def _task_yaml(name: str, data_path: Path, kind: str, mode: str, regex: str | None,
               chat_style: bool, source: str) -> str:
    import yaml
    cfg: dict = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_path)}},
        "test_split": "test",
        "fewshot_split": "test",  # the sampler leaves the evaluated row out of its own shots
        "output_type": kind,
        "doc_to_text": "prompt",
    }
    if kind == "multiple_choice":
        cfg.update({"doc_to_choice": "letters", "doc_to_target": "label",
                    "target_delimiter": "" if chat_style else " ",
                    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]})
    else:
        cfg.update({
            "doc_to_target": "target",
            "fewshot_config": {"sampler": "first_n", "doc_to_target": "fewshot_target"},
            "target_delimiter": "\n" if chat_style else " ",
            "generation_kwargs": {"until": CHAT_UNTIL if chat_style else PLAIN_UNTIL,
                                  "do_sample": False, "temperature": 0.0, "max_gen_toks": 256}})
        if mode == "free_text":  # the whole reply is scored: no extraction filter
            cfg["metric_list"] = [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                  for m in FREE_TEXT_METRICS]
        else:
            cfg["filter_list"] = [{"name": "final-answer", "filter": [
                {"function": "regex", "regex_pattern": regex, "group_select": 0},
                {"function": "take_first"}]}]
            cfg["metric_list"] = [{
                "metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                "ignore_case": True, "ignore_punctuation": mode == "text",
                "regexes_to_ignore": [",", "\\$", "\\.$"] if mode == "numeric" else []}]
    cfg["metadata"] = {"version": 1.0, "source": source, "built_by": "tools.eval_tasks"}
    text = yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)
    if mode == "free_text":  # a YAML tag safe_dump cannot write
        text += f"process_results: !function {FREE_TEXT_SCORER}\n"
    return text


def build_local_task(local_task: str, *, prompt_field: str | None = None,
                     answer_field: str | None = None, answer_regex: str | None = None,
                     chat_style: bool = True, answer_mode: AnswerMode = "auto") -> LocalTask:
    """Write the normalised data and the task YAML for `local_task`; return where they are."""
    ws = get_workspace()
    if answer_regex:
        _check_regex(answer_regex)
    rs = read_examples(local_task, prompt_field=prompt_field, answer_field=answer_field)
    notes = rs.notes
    if rs.format == "multiple_choice":
        kind, mode, regex, kinds = "multiple_choice", "choice", None, collections.Counter()
        if answer_mode not in ("auto", None):
            notes.add(f"answer_mode='{answer_mode}' ignored: multiple choice is scored by acc.")
    else:
        kind = "generate_until"
        answers = [ex.answer for ex in rs.examples]
        kinds = collections.Counter(answer_kind(a) for a in answers)
        if answer_regex:
            mode, regex = _mode_with_regex(answers, answer_mode, answer_regex, notes), answer_regex
        else:
            mode = _choose_mode(answers, answer_mode, kinds, notes)
            regex = {"numeric": NUMERIC_REGEX, "text": TEXT_REGEX}.get(mode)
    # The gold is extracted with the caller's regex only: the built-in ones are for replies.
    docs, systems = _docs(rs, mode, answer_regex, chat_style, notes)
    scoring = ("acc: the log-likelihood of each option's letter." if kind == "multiple_choice"
               else _scoring_text(mode, kinds, [ex.answer for ex in rs.examples]))
    system_prompt = None
    if systems:
        system_prompt, n = systems.most_common(1)[0]
        if len(systems) > 1:
            notes.add(f"Rows carry {len(systems)} different system prompts; lm-eval takes one: the "
                      f"most common ({n} rows) is used unless system_prompt is given.")

    stem = re.sub(r"[^a-z0-9_]+", "_", rs.source.stem.lower()).strip("_") or "data"
    name = f"local_{stem}"
    data_text = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
    key = json.dumps([data_text, kind, mode, regex, chat_style], sort_keys=True)
    task_dir = ws.root / "eval_tasks" / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    data_path, yaml_path = task_dir / "data.jsonl", task_dir / f"{name}.yaml"
    ws.write_text(data_path, data_text, field="local_task")
    ws.write_text(yaml_path, _task_yaml(name, data_path, kind, mode, regex, chat_style, ws.rel(rs.source)),
                  field="local_task")
    metrics = {"multiple_choice": ["acc"], "free_text": FREE_TEXT_METRICS}.get(
        "multiple_choice" if kind == "multiple_choice" else mode, ["exact_match"])
    return LocalTask(
        name=name, task_dir=ws.rel(task_dir), yaml_path=ws.rel(yaml_path), data_path=ws.rel(data_path),
        source=ws.rel(rs.source), format=rs.format, prompt_field=rs.prompt_field,
        answer_field=rs.answer_field, kind=kind, answer_mode=mode, answer_regex=regex,
        metrics=list(metrics), answer_kinds=dict(kinds), scoring=scoring, rows=len(docs),
        skipped=rs.skipped, system_prompt=system_prompt, chat_style=chat_style, notes=sorted(notes))
