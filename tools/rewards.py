"""GRPO rewards: the built-in verifiable ones, and a user's reward function from a Python file.

A recipe lists them under `rewards:` (a key of ours, removed before TRL parses the recipe; TRL's
own `reward_funcs` takes names without parameters):

    rewards:
      - {name: answer}                              # the completion's final answer vs `solution`
      - {name: format, pattern: '(?s).*<answer>.*</answer>\\s*$'}
      - {name: length, max_tokens: 256}             # penalty beyond max_tokens
      - {file: rewards/my_reward.py, function: score}

Each reward follows TRL's reward-function contract: called with `prompts`, `completions`
(text, or a list of one assistant message for conversational data), `completion_ids`,
`trainer_state`, `log_extra`, `log_metric` and every dataset column as keyword lists; returns one
float (or None: not applicable) per completion. TRL logs each as rewards/<name>/mean and /std.

A user's file is checked here with `ast` only (the server never imports or runs it): it must
parse, define the named top-level function, and accept `completions` and `**kwargs`. It is
imported only in the training process (`load_rewards`).

The answer reward uses math-verify (the `math_verify` package, as TRL's accuracy_reward) when it
is installed; otherwise a numeric comparison (the last number of the completion, or the text after
'####' / 'answer:' / inside \\boxed{}, vs the reference, within 1e-6 relative) and, for a
non-numeric reference, normalised exact match.
"""
from __future__ import annotations

import ast
import importlib.util
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .errors import UserError

ANSWER_COLUMN = "solution"       # TRL's accuracy_reward reads the same column
DEFAULT_FORMAT = r"(?s).*<answer>.*?</answer>\s*$"
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?|-?\.\d+")
MARKERS = (re.compile(r"\\boxed\{([^{}]*)\}"), re.compile(r"####\s*(.+)"),
           re.compile(r"<answer>(.*?)</answer>", re.S), re.compile(r"(?i)answer\s*(?:is|:)\s*(.+)"))
BUILTIN = ("answer", "format", "length")
TRL_PASSES = {"prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric",
              "environments"}
REL_TOL = 1e-6


def math_verify_available() -> bool:
    return importlib.util.find_spec("math_verify") is not None


# --------------------------------------------------------------------------------------------
# The built-in rewards (picklable callables with a __name__, as TRL names rewards by it)
# --------------------------------------------------------------------------------------------
def text_of(completion: Any) -> str:
    """A completion's text: standard (str) or conversational (a list of messages)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(str(m.get("content") or "") for m in completion if isinstance(m, dict))
    return str(completion)


def final_answer(text: str) -> str:
    """The answer part of a text: inside \\boxed{}, after ####, inside <answer>, after 'answer:';
    else the whole text."""
    for rx in MARKERS:
        hits = rx.findall(text)
        if hits:
            return hits[-1].strip().splitlines()[0].strip() if hits[-1].strip() else ""
    return text.strip()


def _number(text: str) -> Optional[float]:
    hits = NUMBER.findall(text)
    if not hits:
        return None
    try:
        return float(hits[-1].replace(",", ""))
    except ValueError:
        return None


def _norm(text: str) -> str:
    return " ".join(text.lower().strip().strip(".").split())


def answer_matches(completion: str, reference: str) -> bool:
    """The numeric/exact-match rule without math-verify (see the module docstring)."""
    ref = final_answer(str(reference))
    ref_num = _number(ref) if NUMBER.fullmatch(ref.replace(" ", "")) else None
    got = final_answer(completion)
    if ref_num is not None:
        num = _number(got)
        return num is not None and math.isclose(num, ref_num, rel_tol=REL_TOL, abs_tol=REL_TOL)
    return _norm(got) == _norm(ref)


class AnswerReward:
    """1.0 when the completion's final answer equals the reference (column `solution`), else 0.0;
    None where a row has no reference."""
    __name__ = "answer"

    def __init__(self, column: str = ANSWER_COLUMN):
        self.column = column
        self.math_verify = math_verify_available()

    def _verify(self, got: str, ref: str) -> bool:
        if self.math_verify:
            from math_verify import parse, verify
            gold = parse(ref)
            if gold:
                return bool(verify(gold, parse(got)))
        return answer_matches(got, ref)

    def __call__(self, completions, **kwargs) -> list[Optional[float]]:
        refs = kwargs.get(self.column) or [None] * len(completions)
        return [None if ref is None or str(ref).strip() == "" else float(self._verify(text_of(c), str(ref)))
                for c, ref in zip(completions, refs)]


class FormatReward:
    """1.0 when the completion matches the regular expression (re.match: from its start), else 0.0."""
    __name__ = "format"

    def __init__(self, pattern: str = DEFAULT_FORMAT):
        self.pattern = pattern
        self._rx = re.compile(pattern)

    def __call__(self, completions, **kwargs) -> list[float]:
        return [1.0 if self._rx.match(text_of(c)) else 0.0 for c in completions]


class LengthPenalty:
    """0 up to max_tokens completion tokens, then -(excess / max_tokens), down to -1."""
    __name__ = "length"

    def __init__(self, max_tokens: int = 256):
        self.max_tokens = int(max_tokens)

    def __call__(self, completions, completion_ids=None, **kwargs) -> list[float]:
        lengths = [len(ids) for ids in completion_ids] if completion_ids is not None else \
            [len(text_of(c)) for c in completions]
        return [-min(1.0, max(0, n - self.max_tokens) / self.max_tokens) for n in lengths]


# Module-level instances, so that `trl grpo --config` can name them in `reward_funcs` by dotted path
# (tools.train_dpo --to-trl): TRL's CLI imports a function by name and passes no parameters.
answer = AnswerReward()
answer_format = FormatReward()


# --------------------------------------------------------------------------------------------
# Specs: check (server side, nothing of the user's runs) and load (training process)
# --------------------------------------------------------------------------------------------
@dataclass
class UserReward:
    """A user's reward function found by ast in a workspace file."""
    file: str
    function: str
    keywords: list[str]          # named parameters beyond TRL's (dataset columns it reads)
    is_async: bool


def parse_spec(text: str) -> dict:
    """A tool argument ('answer', 'format=<regex>', 'length=<max tokens>', 'path.py:function')
    as the recipe's dict form."""
    name, _, arg = text.partition("=")
    if name in BUILTIN:
        if name == "format":
            return {"name": "format", "pattern": arg or DEFAULT_FORMAT}
        if name == "length":
            return {"name": "length", "max_tokens": int(arg) if arg.isdigit() else 256}
        return {"name": "answer"}
    path, sep, func = text.rpartition(":")
    if sep and path.endswith(".py") and func.isidentifier():
        return {"file": path, "function": func}
    raise UserError(f"reward '{text}' is neither a built-in ({', '.join(BUILTIN)}) nor 'file.py:function'.",
                    field="rewards", fix="e.g. rewards=['answer', 'format=<regex>', 'length=256', "
                                         "'rewards/mine.py:score'].")


def check_user_reward(file: str, function: str) -> UserReward:
    """The file parses and defines `function(completions, ..., **kwargs)` at top level (ast only)."""
    from .workspace import get_workspace
    ws = get_workspace()
    path = ws.resolve(file, field="rewards", must_exist=True, kind="file")
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as exc:
        raise UserError(f"{file} does not parse: line {exc.lineno}: {exc.msg}.", field="rewards",
                        fix="Fix the syntax error; the file is imported in the training process.") from exc
    defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    node = defs.get(function)
    if node is None:
        raise UserError(f"{file} defines no top-level function '{function}' (it has: "
                        f"{', '.join(sorted(defs)) or 'none'}).", field="rewards",
                        fix="Name a function defined at the top level of the file: 'file.py:function'.")
    a = node.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    if "completions" not in names or a.kwarg is None:
        raise UserError(f"{file}:{function}{_signature(node)} must accept `completions` and `**kwargs` (TRL "
                        "passes prompts, completions, completion_ids, trainer_state and every dataset column "
                        "by keyword).", field="rewards",
                        fix=f"def {function}(completions, **kwargs) -> list[float]: one reward per completion.")
    required = [x.arg for x in (a.posonlyargs + a.args)[:len(a.posonlyargs + a.args) - len(a.defaults)]]
    required += [x.arg for x, d in zip(a.kwonlyargs, a.kw_defaults) if d is None]
    return UserReward(ws.rel(path), function, [n for n in required if n not in TRL_PASSES],
                      isinstance(node, ast.AsyncFunctionDef))


def _signature(node) -> str:
    try:
        return "(" + ast.unparse(node.args) + ")"
    except Exception:  # noqa: BLE001 - only for the message
        return "(...)"


def check_specs(specs: Any) -> list[str]:
    """Every reward spec of a recipe is one we can build; returns the reward names TRL will log.
    Raises ValueError (the recipe parser's error type) naming the bad one."""
    if not isinstance(specs, list) or not specs:
        raise ValueError("rewards: a GRPO recipe needs a non-empty list, e.g. [{name: answer}].")
    names = []
    for s in specs:
        if not isinstance(s, dict):
            raise ValueError(f"rewards: {s!r} is not a mapping ({{name: answer}} or {{file: f.py, function: f}}).")
        if "file" in s:
            try:
                names.append(check_user_reward(str(s["file"]), str(s.get("function", ""))).function)
            except UserError as exc:
                raise ValueError(f"rewards: {exc}") from exc
        elif s.get("name") in BUILTIN:
            _build(s)
            names.append(s["name"])
        else:
            raise ValueError(f"rewards: unknown reward {s!r}; built-ins: {', '.join(BUILTIN)}.")
    return names


def _build(spec: dict):
    extra = {k: v for k, v in spec.items() if k != "name"}
    try:
        if spec["name"] == "answer":
            return AnswerReward(**extra)
        if spec["name"] == "format":
            return FormatReward(**extra)
        return LengthPenalty(**extra)
    except (TypeError, re.error, ValueError) as exc:
        raise ValueError(f"rewards: {spec!r}: {exc}") from exc


def load_rewards(specs: list[dict]) -> list:
    """The reward callables, in the recipe's order (training process only: user files import here)."""
    out = []
    for s in specs:
        if "file" not in s:
            out.append(_build(s))
            continue
        path = Path(s["file"]).resolve()
        mod_spec = importlib.util.spec_from_file_location(f"user_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        out.append(getattr(module, s["function"]))
    return out
