"""convert_preference's two further data kinds (tools.preference reads the paired ones):

- unpaired (KTO): a prompt, one completion and a thumbs-up/down `label` per row. Written as
  `{"prompt", "completion", "label": true|false}`, the form KTOTrainer reads. Labels are read from
  booleans, 0/1 and the usual words (up/down, good/bad, desirable/undesirable, ...). Dropped: an
  unreadable label, an empty completion or prompt, a duplicate, and both rows of a contradiction
  (the same prompt and completion labelled both ways). Warned: labels so unbalanced that KTO's
  default weights fall outside the paper's band (Eq. 8), with the weight to set.
- prompt_answer (GRPO): a prompt and a reference answer (`solution`, `answer`, `ground_truth`,
  ...). Written as `{"prompt", "solution"}` (TRL's accuracy_reward and tools.rewards' answer
  reward read `solution`); a GSM8K-style answer keeps only what follows '####'. Dropped: no prompt,
  no answer, a prompt ending with an assistant turn (the generation would continue it), duplicates,
  and prompts given two different answers.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import UserError

LABEL_KEYS = ("label", "desirable", "thumbs_up", "is_good", "good")
COMPLETION_KEYS = ("completion", "response", "output", "answer_text")
ANSWER_KEYS = ("solution", "answer", "ground_truth", "reference_answer", "final_answer", "target")
TRUE_WORDS = {"true", "1", "yes", "y", "up", "thumbs_up", "thumbsup", "good", "desirable", "positive", "accept",
              "accepted", "\U0001F44D", "+1", "+"}
FALSE_WORDS = {"false", "0", "no", "n", "down", "thumbs_down", "thumbsdown", "bad", "undesirable", "negative",
               "reject", "rejected", "\U0001F44E", "-1", "-"}
KTO_BAND = 4 / 3          # w_d*n_d / (w_u*n_u) should lie in [1, 4/3] (KTO paper, Eq. 8)
GSM8K_MARK = "####"

PROBLEMS: dict[str, tuple[str, str]] = {
    "bad_label": ("the label is not a thumbs-up/down value (bool, 0/1, up/down, good/bad, ...)",
                  "Map the label column (column_mapping={'label': '<column>'}) or fix the values."),
    "conflicting_labels": ("the same prompt and completion are labelled both desirable and undesirable: "
                           "KTO would push the completion up and down at once",
                           "Resolve the contradiction in the source (both rows were dropped)."),
    "label_imbalance": ("{n_d} desirable vs {n_u} undesirable rows: with equal weights KTO under-weights the "
                        "minority side (the paper's band for w_d*n_d / (w_u*n_u) is [1, 4/3])",
                        "Set {weight} (generate_dpo_recipe(trainer='kto') does it)."),
    "one_label": ("every row has the same label ({label}): KTO then learns only to raise (or lower) those "
                  "completions, with no contrast",
                  "Add rows of the other label if you have them (thumbs-down replies are valuable)."),
    "empty_side": ("the completion is empty: there is nothing to label", "Drop such rows (done)."),
    "no_answer": ("the reference answer is empty: a verifiable reward cannot score the completions",
                  "Drop such rows (done) or fill in the answer."),
    "prompt_ends_with_assistant": ("the prompt's last message is an assistant turn: generation would continue "
                                   "it instead of answering",
                                   "End each prompt with the user's turn."),
    "conflicting_answers": ("the same prompt has two different reference answers: the reward contradicts "
                            "itself", "Keep one answer per prompt (both rows were dropped)."),
}


def _messages_of(v: Any, role: str):
    from .preference import _messages
    return _messages(v) if isinstance(v, list) else [{"role": role, "content": v}]


def _key(*parts: Any) -> bytes:
    from .preference import _norm_key
    return hashlib.sha256(json.dumps([_norm_key(p) for p in parts]).encode()).digest()[:8]


def read_label(v: Any) -> Optional[bool]:
    """A thumbs-up/down value as a bool, None when it is none."""
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str):
        w = v.strip().lower().replace(" ", "_")
        return True if w in TRUE_WORDS else False if w in FALSE_WORDS else None
    return None


def detect_more(rows: list[dict], source_format: Optional[str], mapping: dict[str, str]) -> Optional["Cols"]:
    """The unpaired or prompt_answer columns, when the rows have them (None otherwise)."""
    from .preference import PROMPT_KEYS, _first_key
    pick = lambda part, keys: mapping.get(part) or _first_key(rows, keys)  # noqa: E731
    prompt = pick("prompt", PROMPT_KEYS)
    completion, label = pick("completion", COMPLETION_KEYS), pick("label", LABEL_KEYS)
    answer = pick("answer", ANSWER_KEYS)
    kind = source_format or ("unpaired" if prompt and completion and label else
                             "prompt_answer" if prompt and answer else None)
    if kind not in ("unpaired", "prompt_answer"):
        return None
    cols = set().union(*(r.keys() for r in rows))
    need = {"unpaired": {"prompt": prompt, "completion": completion, "label": label},
            "prompt_answer": {"prompt": prompt, "answer": answer}}[kind]
    missing = [p for p, c in need.items() if not c or c not in cols]
    if missing:
        raise UserError(f"source_format {kind} needs the {', '.join(missing)} column(s); the rows have "
                        f"{', '.join(sorted(cols))[:300]}.", field="column_mapping",
                        fix=f"Map them, e.g. column_mapping={{'{missing[0]}': '<column>'}}.")
    return Cols(kind, prompt, completion if kind == "unpaired" else None, label if kind == "unpaired" else None,
                answer if kind == "prompt_answer" else None)


@dataclass
class Cols:
    kind: str
    prompt: str
    completion: Optional[str] = None
    label: Optional[str] = None
    answer: Optional[str] = None

    def mapping(self) -> dict[str, str]:
        names = {"prompt": self.prompt, "completion": self.completion, "label": self.label,
                 "solution": self.answer}
        return {src: dst for dst, src in names.items() if src}


@dataclass
class RowsConvert:
    """One conversion of unpaired or prompt_answer rows; the interface of tools.preference._Convert."""
    cols: Cols
    strict: bool
    pairs: list[dict] = field(default_factory=list)            # rows written (named as _Convert's)
    locs: list[int] = field(default_factory=list)
    dropped: dict[str, list[int]] = field(default_factory=dict)
    changes: Counter = field(default_factory=Counter)
    seen: dict[bytes, Any] = field(default_factory=dict)       # key -> label / answer of the first row
    conflicts: set = field(default_factory=set)
    read: int = 0
    margins: list = field(default_factory=list)               # (none here: the report reads it)
    chars: dict = field(default_factory=dict)

    def row(self, loc: int, row: dict) -> None:
        from .preference import _Skip
        self.read += 1
        try:
            out, key, value = (self._unpaired if self.cols.kind == "unpaired" else self._prompt)(row)
            if key in self.seen:
                if self.seen[key] == value:
                    raise _Skip("duplicate")
                self.conflicts.add(key)
                raise _Skip("conflicting_labels" if self.cols.kind == "unpaired" else "conflicting_answers")
        except _Skip as s:
            if self.strict:
                msg, fix = help_for(s.code)
                raise UserError(f"{msg} ({s}).", field=f"location {loc}",
                                fix=fix + " Or pass strict=false to drop such rows.") from None
            self.dropped.setdefault(s.code, []).append(loc)
            return
        self.seen[key] = value
        out["__key"] = key
        self.pairs.append(out)
        self.locs.append(loc)

    def _prompt_of(self, row: dict, reply: Any = None):
        from .preference import _has_text, _Skip
        p = row.get(self.cols.prompt)
        if not isinstance(p, (str, list)) or not _has_text(p):
            raise _Skip("empty_prompt" if p in (None, "", []) or isinstance(p, (str, list)) else "bad_row")
        if isinstance(p, str) and isinstance(reply, list):
            self.changes["prompt_text_as_user_message"] += 1
            return [{"role": "user", "content": p}]
        return _messages_of(p, "user") if isinstance(p, list) else p

    def _unpaired(self, row: dict):
        from .preference import _check_reply, _has_text, _Skip, _strip_prompt
        c = row.get(self.cols.completion)
        if not isinstance(c, (str, list)) or not _has_text(c):
            raise _Skip("empty_side" if c in (None, "", []) or isinstance(c, (str, list)) else "bad_row")
        label = read_label(row.get(self.cols.label))
        if label is None:
            raise _Skip("bad_label", f"label {str(row.get(self.cols.label))[:40]!r}")
        p = self._prompt_of(row, c)
        if isinstance(p, list):
            c = _strip_prompt(p, _messages_of(c, "assistant"), self.changes)
            _check_reply(c)
        elif isinstance(c, list):
            raise _Skip("bad_row", "a text prompt with a message completion")
        return {"prompt": p, "completion": c, "label": label}, _key(p, c), label

    def _prompt(self, row: dict):
        from .preference import _Skip
        p = self._prompt_of(row)
        if isinstance(p, list) and p[-1]["role"] == "assistant":
            raise _Skip("prompt_ends_with_assistant")
        a = row.get(self.cols.answer)
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            a = f"{a:g}" if isinstance(a, float) else str(a)
        if not isinstance(a, str) or not a.strip():
            raise _Skip("no_answer" if a in (None, "") or isinstance(a, str) else "bad_row")
        if GSM8K_MARK in a:
            a = a.rsplit(GSM8K_MARK, 1)[1]
            self.changes["answer_after_####"] += 1
        a = a.strip()
        out = {"prompt": p, "solution": a}
        if isinstance(p, list) and row.get("tools") is not None:
            out["tools"] = row["tools"]
        return out, _key(p), " ".join(a.split())

    def finish(self) -> None:
        """Drop both sides of every contradiction (seen only once all rows are read)."""
        if not self.conflicts:
            for r in self.pairs:
                r.pop("__key", None)
            return
        code = "conflicting_labels" if self.cols.kind == "unpaired" else "conflicting_answers"
        keep, keep_locs = [], []
        for r, loc in zip(self.pairs, self.locs):
            if r.pop("__key") in self.conflicts:
                self.dropped.setdefault(code, []).append(loc)
            else:
                keep.append(r)
                keep_locs.append(loc)
        self.pairs, self.locs = keep, keep_locs
        self.dropped[code].sort()

    def labels(self) -> Optional[dict[str, int]]:
        if self.cols.kind != "unpaired":
            return None
        n_d = sum(1 for r in self.pairs if r["label"])
        return {"desirable": n_d, "undesirable": len(self.pairs) - n_d}

    def problems(self) -> list:
        from .preference import MAX_ROWS, PreferenceProblem
        out = [PreferenceProblem(code=code, severity="dropped", count=len(locs), rows=locs[:MAX_ROWS],
                                 message=help_for(code)[0], fix=help_for(code)[1])
               for code, locs in sorted(self.dropped.items(), key=lambda kv: -len(kv[1]))]
        lab = self.labels()
        if lab and self.pairs:
            out.extend(_label_problems(lab["desirable"], lab["undesirable"]))
        return out


def _label_problems(n_d: int, n_u: int) -> list:
    from .preference import PreferenceProblem
    if not n_d or not n_u:
        msg, fix = PROBLEMS["one_label"]
        return [PreferenceProblem(code="one_label", severity="warn", count=n_d + n_u, rows=[],
                                  message=msg.format(label="desirable" if n_d else "undesirable"), fix=fix)]
    ratio = n_d / n_u
    if 1 <= ratio <= KTO_BAND:
        return []
    weight = (f"desirable_weight between {n_u / n_d:.2f} and {KTO_BAND * n_u / n_d:.2f}" if n_d < n_u else
              f"undesirable_weight between {n_d / (KTO_BAND * n_u):.2f} and {n_d / n_u:.2f}")
    msg, fix = PROBLEMS["label_imbalance"]
    return [PreferenceProblem(code="label_imbalance", severity="warn", count=min(n_d, n_u), rows=[],
                              message=msg.format(n_d=n_d, n_u=n_u), fix=fix.format(weight=weight))]


def help_for(code: str) -> tuple[str, str]:
    from .preference import PROBLEM_HELP
    return PROBLEMS.get(code) or PROBLEM_HELP[code]
