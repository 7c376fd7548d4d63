"""Build an lm-evaluation-harness task from a JSONL file in the workspace.

Rows may be question/answer (GSM8K style), prompt/completion (strings or conversational
message lists, as convert_dataset writes), messages (the last assistant turn is the answer), or
multiple choice (`choices` + `answer`). The tool writes a normalised `data.jsonl` and a task YAML
(`dataset_path: json`, `output_type: generate_until` + a regex filter + `exact_match`, or
`multiple_choice` + `acc`) into `<workspace>/eval_tasks/<name>-<hash>/`, which lm-eval loads with
`TaskManager(include_path=<that dir>)`; the same YAML runs with `lm_eval --include_path`.
"""
from __future__ import annotations

import collections
import hashlib
import json
import re
from pathlib import Path
from typing import Literal

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
    answer_mode: Literal["numeric", "text", "choice"]
    answer_regex: str | None
    rows: int
    skipped: int
    system_prompt: str | None = None
    chat_style: bool
    notes: list[str] = []


def _norm(s: str) -> str:
    s = s.strip().replace(",", "").replace("$", "")
    return s[:-1] if s.endswith(".") else s


def final_answer(text: str, regex: str | None = None) -> str:
    """The gold final answer of an answer text: a custom regex's first group, `#### X`,
    `\\boxed{X}`, the whole text when it is one number, else the last number, else the text."""
    text = str(text)
    if regex:
        m = re.search(regex, text)
        if m:
            g = next((x for x in m.groups() if x), m.group(0))
            return g.strip()
    hashes = re.findall(r"####\s*([^\n]+)", text)
    if hashes:
        return _norm(hashes[-1])
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    if boxed:
        return _norm(boxed[-1])
    if re.fullmatch(rf"\s*\$?\s*{_NUM}\s*\.?\s*", text):
        return _norm(text)
    nums = re.findall(_NUM, text)
    if nums:
        return _norm(nums[-1])
    return text.strip()


def _is_number(s: str) -> bool:
    return bool(re.fullmatch(_NUM, _norm(s)))


def _content(m) -> str:
    c = m.get("content", "") if isinstance(m, dict) else m
    if isinstance(c, list):  # [{"type": "text", "text": ...}]
        c = "".join(p.get("text", "") for p in c if isinstance(p, dict))
    return str(c)


def _split_messages(msgs: list, notes: set[str]) -> tuple[str | None, str]:
    """(system prompt, user prompt text) from a list of chat messages before the answer."""
    system = None
    turns = []
    for m in msgs:
        if not isinstance(m, dict):
            raise ValueError("messages must be objects with role and content")
        role = m.get("role") or m.get("from")
        if role == "system":
            system = _content(m)
        else:
            turns.append((role, _content(m)))
    if not turns:
        raise ValueError("no user message before the answer")
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


def build_local_task(local_task: str, *, prompt_field: str | None = None,
                     answer_field: str | None = None, answer_regex: str | None = None,
                     chat_style: bool = True) -> LocalTask:
    """Write the normalised data and the task YAML for `local_task`; return where they are."""
    import yaml

    ws = get_workspace()
    src = ws.resolve(local_task, field="local_task", must_exist=True)
    notes: set[str] = set()
    if src.is_dir():  # a convert_dataset output directory
        for name in ("test.jsonl", "validation.jsonl", "train.jsonl"):
            if (src / name).is_file():
                if name == "train.jsonl":
                    notes.add("The directory has no test.jsonl: evaluating on train.jsonl measures "
                              "memorisation, not generalisation. Split off a test set.")
                src = src / name
                break
        else:
            raise UserError(f"'{local_task}' is a directory without test.jsonl or train.jsonl.",
                            field="local_task", fix="Give a JSONL file.")
    if answer_regex:
        try:
            rx = re.compile(answer_regex)
        except re.error as exc:
            raise UserError(f"invalid regex ({exc}).", field="answer_regex",
                            fix="Give a Python regex with one capture group, e.g. 'answer is (\\d+)'.") from None
        if rx.groups < 1:
            raise UserError("the regex has no capture group.", field="answer_regex",
                            fix="Wrap the answer part in parentheses, e.g. 'answer is (\\d+)'.")
    rows = _read_rows(src)
    first = rows[0][1]

    # ---- detect the format from the first row
    if prompt_field is None and answer_field is None and isinstance(first.get("messages"), list):
        fmt, pf, af = "messages", "messages", None
    elif "choices" in first and isinstance(first["choices"], list):
        fmt = "multiple_choice"
        pf = _pick(first, prompt_field, PROMPT_FIELDS, "prompt")
        af = _pick(first, answer_field, ["answer", "label", "target", "gold"], "answer")
    else:
        pf = _pick(first, prompt_field, PROMPT_FIELDS, "prompt")
        af = _pick(first, answer_field, ANSWER_FIELDS, "answer")
        fmt = "prompt_completion" if (pf == "prompt" and af == "completion") else "question_answer"
    if pf is None or af is None and fmt != "messages":
        raise UserError(f"could not find the {'prompt' if pf is None else 'answer'} field in "
                        f"{sorted(first)}.", field="prompt_field" if pf is None else "answer_field",
                        fix="Pass prompt_field and answer_field, or use rows with question/answer, "
                            "prompt/completion, messages, or choices+answer.")

    systems: collections.Counter = collections.Counter()
    docs: list[dict] = []
    skipped = 0
    for line, row in rows:
        try:
            system = None
            if fmt == "messages":
                msgs = row.get("messages")
                if not isinstance(msgs, list) or not msgs:
                    raise ValueError("no messages list")
                last = max((i for i, m in enumerate(msgs) if isinstance(m, dict)
                            and (m.get("role") or m.get("from")) in ("assistant", "gpt")), default=None)
                if last is None:
                    raise ValueError("no assistant message to take the answer from")
                system, prompt = _split_messages(msgs[:last], notes)
                answer_text = _content(msgs[last])
            else:
                p, a = row.get(pf), row.get(af)
                if p is None or a is None:
                    raise ValueError(f"missing '{pf}' or '{af}'")
                if isinstance(p, list):
                    system, prompt = _split_messages(p, notes)
                else:
                    prompt = str(p)
                if isinstance(a, list) and fmt != "multiple_choice":
                    a = next((_content(m) for m in reversed(a) if isinstance(m, dict)
                              and m.get("role") in ("assistant", None)), "")
                answer_text = a
            if not str(prompt).strip():
                raise ValueError("empty prompt")
            if system:
                systems[system] += 1
            if fmt == "multiple_choice":
                choices = [str(c) for c in row["choices"]]
                if not 2 <= len(choices) <= len(LETTERS):
                    raise ValueError("choices must hold 2 to 26 options")
                label = _choice_label(answer_text, choices)
                docs.append({"prompt": str(prompt), "options": choices,
                             "letters": list(LETTERS[:len(choices)]), "label": label})
            else:
                docs.append({"prompt": str(prompt), "target": final_answer(str(answer_text), answer_regex),
                             "fewshot_target": str(answer_text).strip()})
        except (ValueError, KeyError, TypeError) as exc:
            skipped += 1
            if skipped == 1:
                notes.add(f"Skipped rows, e.g. line {line}: {exc}.")
    if not docs:
        raise UserError(f"no usable rows ({skipped} skipped).", field="local_task",
                        fix="Check the fields; pass prompt_field/answer_field if auto-detection is wrong.")

    # ---- answer mode, prompts
    if fmt == "multiple_choice":
        kind, mode, regex = "multiple_choice", "choice", None
        for d in docs:
            opts = "\n".join(f"{l}. {o}" for l, o in zip(d["letters"], d["options"]))
            d["prompt"] = (f"{d['prompt']}\n\n{opts}\n\nAnswer with the letter of the correct option."
                           if chat_style else f"Question: {d['prompt']}\n{opts}\nAnswer:")
    else:
        kind = "generate_until"
        if answer_regex:
            mode, regex = ("numeric" if all(_is_number(d["target"]) for d in docs) else "text"), answer_regex
        elif all(_is_number(d["target"]) for d in docs):
            mode, regex = "numeric", NUMERIC_REGEX
            for d in docs:
                d["target"] = _norm(d["target"])
        else:
            mode, regex = "text", TEXT_REGEX
        if not chat_style:
            for d in docs:
                d["prompt"] = f"Question: {d['prompt']}\nAnswer:"
    system_prompt = None
    if systems:
        system_prompt, n = systems.most_common(1)[0]
        if len(systems) > 1:
            notes.add(f"Rows carry {len(systems)} different system prompts; lm-eval takes one: the "
                      f"most common ({n} rows) is used unless system_prompt is given.")

    stem = re.sub(r"[^a-z0-9_]+", "_", src.stem.lower()).strip("_") or "data"
    name = f"local_{stem}"
    data_text = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
    key = json.dumps([data_text, kind, mode, regex, chat_style], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    task_dir = ws.root / "eval_tasks" / f"{name}-{digest}"
    data_path = task_dir / "data.jsonl"

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
        ignore = [",", "\\$", "\\.$"] if mode == "numeric" else []
        cfg.update({
            "doc_to_target": "target",
            "fewshot_config": {"sampler": "first_n", "doc_to_target": "fewshot_target"},
            "target_delimiter": "\n" if chat_style else " ",
            "generation_kwargs": {"until": CHAT_UNTIL if chat_style else PLAIN_UNTIL,
                                  "do_sample": False, "temperature": 0.0, "max_gen_toks": 256},
            "filter_list": [{"name": "final-answer", "filter": [
                {"function": "regex", "regex_pattern": regex, "group_select": 0},
                {"function": "take_first"}]}],
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                             "ignore_case": True, "ignore_punctuation": mode == "text",
                             "regexes_to_ignore": ignore}],
        })
    cfg["metadata"] = {"version": 1.0, "source": ws.rel(src), "built_by": "tools.eval_tasks"}
    yaml_path = task_dir / f"{name}.yaml"
    ws.write_text(data_path, data_text, field="local_task")
    ws.write_text(yaml_path, yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), field="local_task")
    return LocalTask(
        name=name, task_dir=ws.rel(task_dir), yaml_path=ws.rel(yaml_path), data_path=ws.rel(data_path),
        source=ws.rel(src), format=fmt, prompt_field=pf, answer_field=af,
        kind=kind, answer_mode=mode, answer_regex=regex, rows=len(docs), skipped=skipped,
        system_prompt=system_prompt, chat_style=chat_style, notes=sorted(notes))
