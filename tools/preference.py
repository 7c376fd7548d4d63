"""Preference data for DPO: `convert_preference` (detect, convert and check pairs) and
`verify_preference` (prove, with TRL's own DPO preparation, which tokens enter the loss).

Formats read (references/preference.md):
- explicit: `prompt` + `chosen` + `rejected`, conversational (message lists) or standard (text);
- implicit: `chosen` + `rejected` whole conversations (HH-RLHF); the shared message prefix is the
  prompt. HH-RLHF's raw text ("\\n\\nHuman: ... \\n\\nAssistant: ...") is parsed into messages;
- scored: a prompt with several scored completions (UltraFeedback `instruction` + `completions`
  [{response, overall_score}], or `responses` + `scores`): best vs worst, when the score margin is
  at least `min_score_margin`.

Written: `{"prompt", "chosen", "rejected"}` JSONL, the explicit-prompt form DPOTrainer reads
without guessing (conversational: prompt messages, chosen/rejected assistant messages).

The proof builds a `DPOTrainer` on a throw-away tiny model, lets it prepare the split
(`_prepare_dataset`: prompt extraction, EOS, chat template, tokenisation, the drop of rows whose
prompt fills max_length) and runs its `DataCollatorForPreference` (truncation, completion mask):
the masks in the report are the ones the loss uses. Then every token is attributed to the message
it renders (tools.masking_checks), so "the prompt is never scored" and "the end of turn is scored"
are checked on tokens, not assumed.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, Field

from .errors import UserError
from .masking import Reason, Spread
from .results import ToolResult
from .workspace import get_workspace, short

MAX_ROWS = 20               # locations kept per problem
BIAS_SHARE = 0.9            # chosen longer (or best at one position) in >= this share: bias
BIAS_MIN_PAIRS = 10         # fewer pairs say nothing about a bias
DETECT_ROWS = 50            # rows looked at to tell the format
PROMPT_KEYS = ("prompt", "instruction", "question", "input", "query")
COMPLETION_LIST_KEYS = ("completions", "responses", "candidates")
SCORE_LIST_KEYS = ("scores", "ratings", "rewards")
TEXT_KEYS = ("response", "text", "completion", "content", "output", "answer")
SCORE_KEYS = ("overall_score", "score", "rating", "reward", "fine-grained_score")
HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")
PROMPT_ROLES = ("system", "user", "tool", "assistant_context")

SourceKind = Literal["explicit", "implicit", "scored", "unpaired", "prompt_answer"]

PROBLEM_HELP: dict[str, tuple[str, str]] = {
    "identical": ("chosen and rejected are the same text (whitespace aside): the pair has no "
                  "preference, its loss is log 2 whatever the model does",
                  "Drop such pairs (done) or fix the join that produced them."),
    "different_prompts": ("chosen and rejected answer different conversations (they differ "
                          "before the last assistant turn, or one side repeats another prompt): "
                          "DPO compares two replies to ONE prompt",
                          "Pair replies to the same prompt; for implicit data the only "
                          "difference may be the final assistant turn(s)."),
    "empty_side": ("chosen or rejected is empty: the pair compares a reply with nothing",
                   "Drop such pairs (done) or fill in the missing reply."),
    "empty_prompt": ("the prompt is empty: the replies answer nothing",
                     "Give the prompt column (column_mapping) or drop such rows."),
    "bad_row": ("the row's values are not text or role/content messages",
                "Fix the row, or map the right columns with column_mapping."),
    "too_few_completions": ("fewer than two scored completions: no pair can be formed",
                            "Drop such rows (done) or score more completions."),
    "score_margin_below": ("best and worst scores differ by less than min_score_margin (ties "
                           "included): a near-tie is a noisy preference",
                           "Lower min_score_margin to keep more pairs, or keep it to keep only "
                           "clear preferences."),
    "duplicate": ("the same prompt/chosen/rejected as an earlier pair",
                  "Nothing to do: dropped."),
    "length_bias": ("chosen is longer than rejected in {share:.0%} of pairs: DPO can learn "
                    "'longer wins' instead of 'better wins' (length exploitation)",
                    "Balance the lengths (pick rejected replies as long as the chosen ones), or "
                    "add length-controlled pairs; with TRL use loss_type sigmoid_norm or ld_alpha "
                    "(LD-DPO) to weaken the length signal."),
    "position_bias": ("the best completion sits at position {position} in {share:.0%} of scored "
                      "rows: the scores may follow the order (a generator or annotator bias), not "
                      "the quality",
                      "Check how the completions were generated and scored; shuffle them before "
                      "scoring."),
}


# --------------------------------------------------------------------------------------------
# Report models
# --------------------------------------------------------------------------------------------
class PreferenceProblem(BaseModel):
    code: str
    severity: Literal["dropped", "warn"] = Field(description="dropped: the rows were not written; "
                                                             "warn: a property of the whole set.")
    count: int
    rows: list[int] = Field(description="source locations (see location_unit), first 20.")
    message: str
    fix: str


class ConvertPreferenceReport(ToolResult):
    """What convert_preference wrote, what it dropped and why."""
    output_dir: str
    files: dict[str, str] = Field(description="split -> JSONL file (workspace-relative).")
    source_format: SourceKind
    conversational: bool = Field(description="prompt/chosen/rejected are message lists (the chat "
                                             "template applies) rather than text.")
    columns: dict[str, str] = Field(description="what each source column became.")
    location_unit: Literal["line", "row"]
    rows_read: int
    written: Literal["pairs", "unpaired", "prompts"] = Field(
        "pairs", description="pairs (DPO/ORPO/KTO), unpaired label rows (KTO), prompts + solution (GRPO).")
    pairs_written: int = Field(description="rows written: pairs, label rows or prompts.")
    labels: Optional[dict[str, int]] = Field(None, description="unpaired: desirable / undesirable rows.")
    train: int
    test: int
    problems: list[PreferenceProblem]
    changes: dict[str, int] = Field(default={}, description="what was rewritten on the way.")
    chosen_longer_share: Optional[float] = Field(None, description="pairs whose chosen reply is "
                                                                   "longer (characters).")
    mean_chars: dict[str, float] = Field(default={}, description="mean reply length per side.")
    score_margins: Optional[dict[str, float]] = Field(None, description="scored data: min/median/"
                                                                        "max best-minus-worst.")
    samples: list[dict[str, Any]] = Field(description="the first pairs written (long text cut).")


# --------------------------------------------------------------------------------------------
# Rows: messages, formats, one pair
# --------------------------------------------------------------------------------------------
class _Skip(Exception):
    """A row that cannot become a pair: its problem code and a short detail."""

    def __init__(self, code: str, detail: str = ""):
        super().__init__(detail)
        self.code = code


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: their text, in order
        parts = [p.get("text") if isinstance(p, dict) else p for p in content]
        if all(isinstance(p, str) for p in parts):
            return "".join(parts)
    raise _Skip("bad_row", "a message content is neither text nor text parts")


def _message(m: Any) -> dict:
    from .masking_checks import CONTENT_ROLES, norm_role
    if not isinstance(m, dict):
        raise _Skip("bad_row", "a message is not an object")
    role = norm_role(m.get("role", m.get("from")))
    if role not in CONTENT_ROLES:
        raise _Skip("bad_row", f"unknown role {short(m.get('role', m.get('from')), 40)!r}")
    content = m.get("content", m.get("value"))
    out = {"role": role, "content": "" if content is None and m.get("tool_calls") else _text_of(content)}
    for k in ("tool_calls", "name", "tool_call_id", "reasoning_content"):
        if m.get(k) is not None:
            out[k] = m[k]
    return out


def _messages(value: Any) -> list[dict]:
    if not isinstance(value, list):
        raise _Skip("bad_row", "expected a list of messages")
    return [_message(m) for m in value]


def parse_hh(text: str) -> list[dict] | None:
    """HH-RLHF's raw text ("\\n\\nHuman: ...\\n\\nAssistant: ...") as messages, else None."""
    parts = HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts) - 1, 2)]


def _is_conv(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and isinstance(v[0], dict)


def _has_text(v: Any) -> bool:
    if isinstance(v, str):
        return bool(v.strip())
    return any(str(m.get("content") or "").strip() or m.get("tool_calls") for m in v)


def _norm_key(v: Any) -> str:
    """Whitespace-insensitive form of a side, to tell identical replies."""
    if isinstance(v, str):
        return " ".join(v.split())
    return json.dumps([[m["role"], " ".join(str(m.get("content") or "").split()),
                        m.get("tool_calls")] for m in v], sort_keys=True, default=str)


@dataclass
class _Columns:
    """The detected format and which source column plays which part."""
    kind: SourceKind
    prompt: Optional[str] = None
    chosen: Optional[str] = None
    rejected: Optional[str] = None
    completions: Optional[str] = None
    scores: Optional[str] = None         # a parallel list of scores (responses + scores)
    score_key: Optional[str] = None      # the score inside each completion object
    text_key: Optional[str] = None       # the text inside each completion object

    def mapping(self) -> dict[str, str]:
        names = {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected,
                 "completions": self.completions, "scores": self.scores}
        return {src: dst for dst, src in names.items() if src}


def _first_key(rows: list[dict], keys: tuple[str, ...]) -> Optional[str]:
    return next((k for k in keys if any(k in r for r in rows)), None)


def _detect(rows: list[dict], source_format: Optional[str], mapping: dict[str, str],
            score_key: Optional[str]) -> _Columns:
    """The format of the first rows: explicit, implicit or scored (or the one asked for)."""
    cols = set().union(*(r.keys() for r in rows))
    pick = lambda part, keys: mapping.get(part) or _first_key(rows, keys)  # noqa: E731
    chosen, rejected = pick("chosen", ("chosen",)), pick("rejected", ("rejected",))
    prompt = pick("prompt", PROMPT_KEYS)
    completions = pick("completions", COMPLETION_LIST_KEYS)
    kind = source_format or ("explicit" if chosen and rejected and prompt else
                             "implicit" if chosen and rejected else
                             "scored" if completions and prompt else None)
    if kind is None:
        raise UserError(f"no preference columns found (columns: {', '.join(sorted(cols))[:300]}).",
                        field="dataset",
                        fix="Give prompt+chosen+rejected, chosen+rejected conversations, or a prompt "
                            "with scored completions; or name the columns with column_mapping, "
                            "e.g. {'prompt': 'question', 'chosen': 'response_j', 'rejected': "
                            "'response_k'}.")
    need = {"explicit": ("prompt", "chosen", "rejected"), "implicit": ("chosen", "rejected"),
            "scored": ("prompt", "completions")}[kind]
    found = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "completions": completions}
    missing = [p for p in need if not found[p] or found[p] not in cols]
    if missing:
        raise UserError(f"source_format {kind} needs the {', '.join(missing)} column(s); the rows "
                        f"have {', '.join(sorted(cols))[:300]}.", field="column_mapping",
                        fix=f"Map them, e.g. column_mapping={{'{missing[0]}': '<column>'}}.")
    c = _Columns(kind, prompt=prompt if kind != "implicit" else None, chosen=chosen if kind != "scored" else None,
                 rejected=rejected if kind != "scored" else None,
                 completions=completions if kind == "scored" else None)
    if kind == "scored":
        _detect_scores(c, rows, mapping, score_key)
    elif kind == "implicit":
        _check_implicit(rows, c)
    return c


def _detect_scores(c: _Columns, rows: list[dict], mapping: dict[str, str], score_key: Optional[str]):
    """Where the scores are: inside each completion object, or in a parallel list column."""
    items = [x for r in rows for x in (r.get(c.completions) or []) if isinstance(r.get(c.completions), list)]
    if items and all(isinstance(x, dict) for x in items):
        c.text_key = next((k for k in TEXT_KEYS if any(k in x for x in items)), None)
        c.score_key = score_key or next((k for k in SCORE_KEYS if any(k in x for x in items)), None)
        if c.text_key and c.score_key:
            return
        raise UserError(f"the completion objects have keys {sorted(set().union(*(x.keys() for x in items)))[:20]}; "
                        f"no text ({'/'.join(TEXT_KEYS)}) or no score ({'/'.join(SCORE_KEYS)}) key among them.",
                        field="score_key", fix="Name the score key with score_key=, e.g. 'overall_score'.")
    c.scores = mapping.get("scores") or _first_key(rows, SCORE_LIST_KEYS)
    if not c.scores:
        raise UserError(f"'{c.completions}' holds plain texts but no scores column "
                        f"({'/'.join(SCORE_LIST_KEYS)}) is beside it.", field="column_mapping",
                        fix="Map the scores list, e.g. column_mapping={'scores': 'ratings'}.")


def _check_implicit(rows: list[dict], c: _Columns) -> None:
    """Implicit text pairs must be HH-RLHF dialogues: plain texts have no shared prompt to find."""
    texts = [r.get(c.chosen) for r in rows if isinstance(r.get(c.chosen), str)]
    if texts and not any(parse_hh(t) for t in texts):
        raise UserError("chosen/rejected are plain texts without 'Human:'/'Assistant:' turns and "
                        "there is no prompt column, so the prompt cannot be told apart.",
                        field="column_mapping",
                        fix="Map the prompt column (column_mapping={'prompt': '<column>'}), or give "
                            "chosen/rejected as whole conversations (role/content messages).")


def _strip_prompt(prompt: list[dict], side: list[dict], changes: Counter) -> list[dict]:
    """A side that repeats the prompt messages first keeps only its reply."""
    if len(side) > len(prompt) and side[:len(prompt)] == prompt:
        changes["prompt_removed_from_replies"] += 1
        return side[len(prompt):]
    return side


def _check_reply(side: list[dict]) -> None:
    """A reply is assistant turns (and tool results between them), never a user or system turn."""
    if side and (side[0]["role"] != "assistant" or any(m["role"] in ("user", "system") for m in side)):
        raise _Skip("different_prompts", "a side holds a user/system turn after the shared prompt")


def _explicit(row: dict, c: _Columns, changes: Counter) -> tuple[Any, Any, Any]:
    p, ch, rj = row.get(c.prompt), row.get(c.chosen), row.get(c.rejected)
    if any(v is None or (not isinstance(v, (str, list))) for v in (p, ch, rj)):
        raise _Skip("bad_row" if any(v is not None for v in (p, ch, rj)) else "empty_side",
                    "a column is missing or not text/messages")
    if isinstance(p, str) and isinstance(ch, str) and isinstance(rj, str):
        if p and ch.startswith(p) and rj.startswith(p):  # each side repeats the prompt text
            changes["prompt_removed_from_replies"] += 1
            ch, rj = ch[len(p):], rj[len(p):]
        return p, ch, rj
    if not (isinstance(ch, list) or isinstance(rj, list) or isinstance(p, list)):
        raise _Skip("bad_row", "mixed value types")
    prompt = _messages(p) if isinstance(p, list) else [{"role": "user", "content": p}]
    sides = []
    for v in (ch, rj):
        side = _messages(v) if isinstance(v, list) else [{"role": "assistant", "content": v}]
        side = _strip_prompt(prompt, side, changes)
        _check_reply(side)
        sides.append(side)
    if isinstance(p, str):
        changes["prompt_text_as_user_message"] += 1
    return prompt, sides[0], sides[1]


def _implicit(row: dict, c: _Columns, changes: Counter) -> tuple[Any, Any, Any]:
    ch, rj = row.get(c.chosen), row.get(c.rejected)
    if isinstance(ch, str) and isinstance(rj, str):
        ch_m, rj_m = parse_hh(ch), parse_hh(rj)
        if ch_m is None or rj_m is None:
            raise _Skip("empty_side" if not (ch.strip() and rj.strip()) else "bad_row",
                        "not a Human:/Assistant: dialogue")
        changes["hh_text_parsed"] += 1
        ch, rj = ch_m, rj_m
    if not (isinstance(ch, list) and isinstance(rj, list)):
        raise _Skip("empty_side" if ch in (None, "", []) or rj in (None, "", []) else "bad_row",
                    "chosen/rejected are not both conversations")
    ch, rj = _messages(ch), _messages(rj)
    k = 0
    while k < min(len(ch), len(rj)) and ch[k] == rj[k]:
        k += 1
    prompt, c_side, r_side = ch[:k], ch[k:], rj[k:]
    if not c_side and not r_side:
        raise _Skip("identical", "the two conversations are the same")
    if not prompt:
        raise _Skip("different_prompts", "the conversations differ from their first message")
    _check_reply(c_side)
    _check_reply(r_side)
    return prompt, c_side, r_side


def _scored(row: dict, c: _Columns, min_margin: float, changes: Counter) -> tuple[Any, Any, Any, dict]:
    """Best vs worst of the scored completions; the extra dict has the scores and positions."""
    items = row.get(c.completions)
    if not isinstance(items, list):
        raise _Skip("too_few_completions", "no completions list")
    if c.scores:
        scores = row.get(c.scores)
        pairs = list(zip(items, scores)) if isinstance(scores, list) and len(scores) == len(items) else []
    else:
        pairs = [(x.get(c.text_key), x.get(c.score_key)) for x in items if isinstance(x, dict)]
    scored = [(i, t, float(s)) for i, (t, s) in enumerate(pairs)
              if isinstance(s, (int, float)) and not isinstance(s, bool) and isinstance(t, (str, list))]
    if len(scored) < len(items):
        changes["unscored_completions_ignored"] += len(items) - len(scored)
    if len(scored) < 2:
        raise _Skip("too_few_completions", f"{len(scored)} scored completion(s)")
    best = max(scored, key=lambda x: x[2])
    worst = min(scored, key=lambda x: x[2])
    margin = best[2] - worst[2]
    if margin <= 0 or margin < min_margin:
        raise _Skip("score_margin_below", f"margin {margin:g}")
    p = row.get(c.prompt)
    if not isinstance(p, (str, list)):
        raise _Skip("empty_prompt" if p is None else "bad_row", "no prompt")
    prompt = _messages(p) if isinstance(p, list) else [{"role": "user", "content": p}]
    sides = [_messages(t) if isinstance(t, list) else [{"role": "assistant", "content": t}]
             for t in (best[1], worst[1])]
    extra = {"score_chosen": best[2], "score_rejected": worst[2]}
    return prompt, sides[0], sides[1], {**extra, "_position": best[0], "_margin": margin}


# --------------------------------------------------------------------------------------------
# convert_preference
# --------------------------------------------------------------------------------------------
@dataclass
class _Convert:
    """State of one conversion: the pairs kept, what was dropped where, the bias counts."""
    cols: _Columns
    min_margin: float
    strict: bool
    pairs: list[dict] = field(default_factory=list)
    dropped: dict[str, list[int]] = field(default_factory=dict)   # code -> locations
    changes: Counter = field(default_factory=Counter)
    seen: set = field(default_factory=set)
    positions: Counter = field(default_factory=Counter)           # scored: index of the best
    margins: list[float] = field(default_factory=list)
    longer: list[int] = field(default_factory=list)               # locations where chosen is longer
    shorter: int = 0
    chars: dict[str, int] = field(default_factory=lambda: {"chosen": 0, "rejected": 0})
    read: int = 0

    def row(self, loc: int, row: dict) -> None:
        self.read += 1
        try:
            pair = self._pair(row)
        except _Skip as s:
            if self.strict:
                raise UserError(f"{PROBLEM_HELP[s.code][0]} ({s}).", field=f"location {loc}",
                                fix=PROBLEM_HELP[s.code][1] + " Or pass strict=false to drop such rows.") from None
            self.dropped.setdefault(s.code, []).append(loc)
            return
        self._tally(loc, pair)
        self.pairs.append(pair)

    def _pair(self, row: dict) -> dict:
        extra: dict = {}
        if self.cols.kind == "explicit":
            p, ch, rj = _explicit(row, self.cols, self.changes)
        elif self.cols.kind == "implicit":
            p, ch, rj = _implicit(row, self.cols, self.changes)
        else:
            p, ch, rj, extra = _scored(row, self.cols, self.min_margin, self.changes)
        if not _has_text(p):
            raise _Skip("empty_prompt")
        if not _has_text(ch) or not _has_text(rj):
            raise _Skip("empty_side")
        if _norm_key(ch) == _norm_key(rj):
            raise _Skip("identical")
        key = hashlib.sha256(json.dumps([_norm_key(p), _norm_key(ch), _norm_key(rj)]).encode()).digest()[:8]
        if key in self.seen:
            raise _Skip("duplicate")
        self.seen.add(key)
        out = {"prompt": p, "chosen": ch, "rejected": rj, **extra}
        if isinstance(p, list) and row.get("tools") is not None:
            out["tools"] = row["tools"]  # DPOTrainer passes a tools column to the chat template
        return out

    def _tally(self, loc: int, pair: dict) -> None:
        lc, lr = len(_norm_key(pair["chosen"])), len(_norm_key(pair["rejected"]))
        self.chars["chosen"] += lc
        self.chars["rejected"] += lr
        if lc > lr:
            self.longer.append(loc)
        elif lc < lr:
            self.shorter += 1
        if "_position" in pair:
            self.positions[pair.pop("_position")] += 1
            self.margins.append(pair.pop("_margin"))

    def problems(self) -> list[PreferenceProblem]:
        out = [PreferenceProblem(code=code, severity="dropped", count=len(locs), rows=locs[:MAX_ROWS],
                                 message=PROBLEM_HELP[code][0], fix=PROBLEM_HELP[code][1])
               for code, locs in sorted(self.dropped.items(), key=lambda kv: -len(kv[1]))]
        n = len(self.pairs)
        if n >= BIAS_MIN_PAIRS and len(self.longer) / n >= BIAS_SHARE:
            msg, fix = PROBLEM_HELP["length_bias"]
            out.append(PreferenceProblem(code="length_bias", severity="warn", count=len(self.longer),
                                         rows=self.longer[:MAX_ROWS], message=msg.format(share=len(self.longer) / n),
                                         fix=fix))
        if sum(self.positions.values()) >= BIAS_MIN_PAIRS:
            pos, k = self.positions.most_common(1)[0]
            if k / sum(self.positions.values()) >= BIAS_SHARE:
                msg, fix = PROBLEM_HELP["position_bias"]
                out.append(PreferenceProblem(code="position_bias", severity="warn", count=k, rows=[],
                                             message=msg.format(position=pos, share=k / sum(self.positions.values())),
                                             fix=fix))
        return out


def _write_pairs(tmp: Path, pairs: list[dict], n_test: int, shuffle: bool, seed: int) -> dict[str, list[dict]]:
    order = list(range(len(pairs)))
    if shuffle:
        random.Random(seed).shuffle(order)
    splits = {"train": [pairs[i] for i in order[n_test:]]}
    if n_test:
        splits["test"] = [pairs[i] for i in order[:n_test]]
    for name, rows in splits.items():
        with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return splits


WRITTEN = {"explicit": "pairs", "implicit": "pairs", "scored": "pairs", "unpaired": "unpaired",
           "prompt_answer": "prompts"}
TRAINER_HINT = {"pairs": "dpo (or orpo, kto)", "unpaired": "kto", "prompts": "grpo"}


def _convert_notes(rel: str, conv, n_test: int) -> list[str]:
    """The next calls, with real arguments where they are known."""
    written = WRITTEN[conv.cols.kind]
    steps = [f"verify_preference(dataset='{rel}', tokenizer='<the model you will train>')"]
    trainer = {"pairs": "dpo", "unpaired": "kto", "prompts": "grpo"}[written]
    rewards = ", rewards=['answer']" if written == "prompts" else ""
    steps.append(f"generate_dpo_recipe(model='<SFT model or adapter>', dataset='{rel}', trainer='{trainer}'"
                 f"{rewards}, output_path='recipes/{trainer}.yaml', output_dir='outputs/{trainer}')")
    if not n_test and written != "prompts":
        steps.append(f"convert_preference(..., output_dir='{rel}', test_size=0.05, overwrite=true) for a "
                     "held-out split")
    return steps


def _open_converter(head: list[dict], source_format: Optional[str], mapping: dict[str, str],
                    score_key: Optional[str], min_margin: float, strict: bool):
    """The converter for the rows' kind: pairs (_Convert), or unpaired / prompt_answer rows."""
    from .preference_data import RowsConvert, detect_more
    if source_format not in ("unpaired", "prompt_answer"):
        try:
            return _Convert(_detect(head, source_format, mapping, score_key), min_margin, strict)
        except UserError as exc:
            if source_format is not None or exc.field != "dataset":
                raise
            more = detect_more(head, None, mapping)
            if more is None:
                cols = ", ".join(sorted(set().union(*(r.keys() for r in head))))[:300]
                raise UserError(f"no preference columns found (columns: {cols}).", field="dataset",
                                fix="Give prompt+chosen+rejected, chosen+rejected conversations, a prompt with "
                                    "scored completions, prompt+completion+label (KTO) or prompt+answer (GRPO); "
                                    "or name the columns with column_mapping, e.g. {'prompt': 'question', "
                                    "'chosen': 'response_j', 'rejected': 'response_k'}.") from None
            return RowsConvert(more, strict)
    return RowsConvert(detect_more(head, source_format, mapping), strict)


def convert_preference(
    dataset: Annotated[str, Field(description="file, directory, save_to_disk folder or hub id")],
    output_dir: str,
    source_format: Optional[SourceKind] = None,
    column_mapping: Annotated[Optional[dict[str, str]], Field(description="source column per part")] = None,
    score_key: Optional[str] = None,
    min_score_margin: Annotated[float, Field(ge=0)] = 1.0,
    test_size: Annotated[float, Field(ge=0)] = 0,
    seed: int = 42,
    shuffle: bool = True,
    strict: bool = False,
    overwrite: bool = False,
    limit: Annotated[Optional[int], Field(ge=1)] = None,
    split: str = "train",
    subset: Optional[str] = None,
) -> ConvertPreferenceReport:
    """Convert preference / RL data: DPO pairs, KTO label rows or GRPO prompts with an answer;
    drops broken rows with their locations, warns on length/position/label bias.

    Writes train.jsonl (and test.jsonl) atomically into output_dir. Then call verify_preference.

    Kinds read (source_format, default detected):
    - explicit: prompt + chosen + rejected (messages or text); implicit: chosen/rejected whole
      conversations (HH-RLHF: the shared prefix becomes the prompt; raw "Human:/Assistant:" text
      is parsed); scored: a prompt + scored completions (UltraFeedback: best vs worst when
      best - worst >= min_score_margin; score_key names the score inside each completion).
      Written {"prompt", "chosen", "rejected"}.
    - unpaired (KTO): prompt + completion + label (bool, 0/1, up/down, good/bad...). Written
      {"prompt", "completion", "label"}.
    - prompt_answer (GRPO): prompt + a reference answer (solution/answer/ground_truth; GSM8K's
      '#### 72' keeps 72). Written {"prompt", "solution"}.
    Dropped, counted with their locations: chosen == rejected, different prompts in a pair, empty
    sides or prompts, duplicates, near-tie scores, unreadable labels, contradictory labels or
    answers, prompts ending with an assistant turn. Warned: length bias (chosen longer in >= 90%
    of pairs), position bias (best completion at one index in >= 90% of rows), label imbalance
    outside KTO's band (with the weight to set).

    Parameters:
    - dataset: JSONL/JSON/CSV/Parquet file, a directory of them, a save_to_disk folder
      (workspace), or a hub id (when online).
    - column_mapping: source column per part: prompt, chosen, rejected, completions, scores,
      completion, label, answer.
    - test_size: a fraction (<1) or a row count for test.jsonl.
    - strict: fail on the first row with a problem instead of dropping it.
    - split / subset: the source split and hub config name.
    """
    from .data import _check_output, _test_count
    from .data_io import open_source
    from .preference_data import RowsConvert, help_for
    _test_count(test_size, 2 ** 62) if test_size else None  # a bad test_size fails before any work
    ws = get_workspace()
    out_path = ws.resolve(output_dir, field="output_dir")
    src = open_source(dataset, split=split, subset=subset)
    _check_output(output_dir, out_path, src, overwrite)
    head = [r for _, r in src.rows(limit=min(DETECT_ROWS, limit or DETECT_ROWS))]
    if not head:
        raise UserError(f"'{dataset}' has no rows (split '{split}').", field="dataset",
                        fix="Check the file is not empty and the split name is right.")
    conv = _open_converter(head, source_format, column_mapping or {}, score_key, min_score_margin, strict)
    for loc, row in src.rows(limit=limit):
        conv.row(loc, row)
    if isinstance(conv, RowsConvert):
        conv.finish()
    if not conv.pairs:
        worst = max(conv.dropped.items(), key=lambda kv: len(kv[1]), default=("bad_row", []))
        raise UserError(f"no usable row in {conv.read} rows; most were dropped as {worst[0]} "
                        f"({help_for(worst[0])[0]}; locations {worst[1][:10]}).", field="dataset",
                        fix=help_for(worst[0])[1])
    n_test = _test_count(test_size, len(conv.pairs))
    with ws.atomic_dir(output_dir, overwrite=overwrite) as tmp:
        splits = _write_pairs(tmp, conv.pairs, n_test, shuffle, seed)
    return _convert_report(out_path, conv, splits, src.unit, n_test)


def _convert_report(out_path: Path, conv, splits: dict, unit: str, n_test: int) -> ConvertPreferenceReport:
    from .data import _cut
    ws = get_workspace()
    rel = ws.rel(out_path)
    n = len(conv.pairs)
    written = WRITTEN[conv.cols.kind]
    paired = written == "pairs"
    margins = sorted(conv.margins)
    problems = conv.problems()
    dropped = sum(p.count for p in problems if p.severity == "dropped")
    warns = [p.code for p in problems if p.severity == "warn"]
    noun = {"pairs": "pairs", "unpaired": "label rows", "prompts": "prompts"}[written]
    labels = None if paired else conv.labels()
    lab = f" ({labels['desirable']} up / {labels['undesirable']} down)" if labels else ""
    summary = (f"Wrote {n:,} {noun}{lab} for {TRAINER_HINT[written]} to {rel} ({len(splits['train']):,} train, "
               f"{len(splits.get('test', [])):,} test); dropped {dropped:,} of {conv.read:,} rows"
               + (f"; warnings: {', '.join(warns)}." if warns else "."))
    return ConvertPreferenceReport(
        summary=summary[:300], next_steps=_convert_notes(rel, conv, n_test),
        output_dir=rel, files={k: f"{rel}/{k}.jsonl" for k in splits}, source_format=conv.cols.kind,
        conversational=isinstance(conv.pairs[0]["prompt"], list), columns=conv.cols.mapping(),
        location_unit="line" if unit == "line" else "row", rows_read=conv.read, written=written, pairs_written=n,
        labels=labels, train=len(splits["train"]), test=len(splits.get("test", [])), problems=problems,
        changes=dict(conv.changes), chosen_longer_share=round(len(conv.longer) / n, 4) if paired else None,
        mean_chars={k: round(v / n, 1) for k, v in conv.chars.items()} if paired else {},
        score_margins={"min": margins[0], "median": margins[len(margins) // 2], "max": margins[-1]}
        if margins else None,
        samples=[_cut(p, 200) for p in splits["train"][:3]])


# --------------------------------------------------------------------------------------------
# verify_preference: report models
# --------------------------------------------------------------------------------------------
REPORT_DIR = "reports/preference"
SHARE_FAIL = 0.05   # more than this share of pairs identical / cut / dropped -> fail


class SideView(BaseModel):
    tokens: int = Field(description="reply tokens before truncation.")
    scored: int = Field(description="reply tokens that enter the loss after truncation.")
    end_of_turn_scored: bool
    scored_by_role: dict[str, int] = Field(description="scored tokens by what they render: assistant "
                                                       "(the reply), template (end-of-turn, markers), "
                                                       "or a prompt role (a defect).")
    text: str = Field(description="the sequence as the model sees it; scored spans between [[ and ]].")


class PairView(BaseModel):
    row: int = Field(description="0-based row in the split.")
    prompt_tokens: int
    first_difference: Optional[int] = Field(description="first reply token where chosen and rejected "
                                                        "differ (None: identical).")
    chosen: SideView
    rejected: SideView


class PreferenceSettings(BaseModel):
    dataset: str
    tokenizer: str
    split: str
    max_length: Optional[int]
    max_prompt_length: Optional[int] = Field(None, description="a check only: DPOConfig has no such key.")
    truncation_mode: str = "keep_start"
    chat_template: str = Field(description="'tokenizer' (its own), a path, or 'literal'.")


class PreferenceReport(ToolResult):
    """What the trainer will score (DPO/ORPO pairs, KTO rows) or generate from (GRPO prompts),
    with a verdict and the evidence behind it."""
    verdict: Literal["pass", "warn", "fail"]
    trainer: Literal["dpo", "kto", "grpo"] = Field("dpo", description="the proof run: dpo (DPOTrainer's "
                                                                       "preparation, also for ORPO), kto, grpo.")
    reasons: list[Reason]
    key: str
    report_path: str
    created_at: str
    settings: PreferenceSettings
    conversational: bool
    prompt_source: Literal["explicit", "implicit"] = Field(description="implicit: TRL extracts the "
                                                                       "shared prefix as the prompt.")
    dataset_rows: int
    pairs_prepared: int = Field(description="pairs TRL keeps (it drops those whose prompt fills max_length).")
    pairs_dropped_by_trl: int
    examples_checked: int = Field(description="pairs attributed token by token (the sample).")
    prompt_tokens: Optional[Spread] = None
    chosen_tokens: Optional[Spread] = None
    rejected_tokens: Optional[Spread] = None
    identical_pairs: int = Field(0, description="chosen and rejected tokenize to the same ids.")
    identical_after_truncation: int = Field(0, description="they differ only beyond max_length.")
    truncated_pairs: int = Field(0, description="pairs with a side cut by max_length.")
    end_of_turn_missing: int = Field(0, description="sides whose end of turn is not scored, truncation aside.")
    prompt_tokens_scored: int = Field(0, description="prompt tokens inside the scored spans (sample).")
    stop_tokens: list[str] = []
    pairs: list[PairView] = []
    trl_warnings: list[str] = []
    completion_tokens: Optional[Spread] = Field(None, description="KTO: completion tokens before truncation.")
    labels: Optional[dict[str, int]] = Field(None, description="KTO: desirable / undesirable rows TRL keeps.")
    completions: list[Any] = Field([], description="KTO: decoded rows, scored spans in [[...]].")
    prompts_shown: list[str] = Field([], description="GRPO: prompts as generation sees them.")
    rewards_checked: list[Any] = Field([], description="GRPO: each reward's check on the data.")
    dataset_hash: str = ""
    tokenizer_hash: str = ""
    template_hash: str = ""

    def key_figures(self) -> dict[str, Any]:
        out = {"verdict": self.verdict, "trainer": self.trainer, "rows": self.dataset_rows,
               "prepared": self.pairs_prepared, "dropped_by_trl": self.pairs_dropped_by_trl,
               "prompt_tokens_scored": self.prompt_tokens_scored, "truncated": self.truncated_pairs,
               "end_of_turn_missing": self.end_of_turn_missing, "report_path": self.report_path}
        if self.trainer == "dpo":
            out["identical_pairs"] = self.identical_pairs
        return out


# --------------------------------------------------------------------------------------------
# verify_preference: TRL's own preparation
# --------------------------------------------------------------------------------------------
@dataclass
class _Pair:
    """One pair as DPOTrainer prepared and collated it."""
    row: int
    values: dict                          # prompt/chosen/rejected after TRL's prompt extraction / EOS
    prompt_ids: list[int]
    reply_ids: dict[str, list[int]]       # side -> reply tokens, untruncated
    seq: dict[str, tuple[list[int], list[int]]]  # side -> (input_ids, completion_mask) after the collator

    def scored(self, side: str) -> list[int]:
        """Token ids that enter the loss: completion_mask 1, from position 1 (the loss scores
        token t from the logits at t-1, so position 0 never is)."""
        ids, mask = self.seq[side]
        return [ids[t] for t in range(1, len(ids)) if mask[t]]


@dataclass
class _DpoRun:
    prepared: int                         # pairs TRL keeps
    dropped: list[int]                    # rows TRL filtered out (prompt fills max_length)
    warnings: list[str]


def _dpo_trainer(ds, tok, max_length: Optional[int], tmp: str):
    """A DPOTrainer on two throw-away 1-layer models (policy and reference: no forward ever
    runs); its constructor prepares `ds` exactly as training would."""
    from trl import DPOConfig, DPOTrainer

    from .masking_checks import _dummy_model
    args = DPOConfig(output_dir=tmp, max_length=max_length, use_cpu=True, bf16=False, fp16=False,
                     report_to="none", gradient_checkpointing=False, save_strategy="no",
                     logging_strategy="no", disable_tqdm=True, dataset_num_proc=None,
                     per_device_train_batch_size=1)
    return DPOTrainer(model=_dummy_model(tok), ref_model=_dummy_model(tok), args=args,
                      train_dataset=ds, processing_class=tok)


def _collated(trainer, batch: list[dict]) -> list[_Pair]:
    """One batch through DataCollatorForPreference, split back into pairs (the batch is
    [chosen..., rejected...], right-padded: the attention mask gives each length)."""
    out = trainer.data_collator([{k: b[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for b in batch])
    ids, att, comp = (out[k].tolist() for k in ("input_ids", "attention_mask", "completion_mask"))
    pairs = []
    for j, b in enumerate(batch):
        seq = {}
        for side, k in (("chosen", j), ("rejected", j + len(batch))):
            n = sum(att[k])
            seq[side] = (ids[k][:n], comp[k][:n])
        values = {k: b.get(k) for k in ("prompt", "chosen", "rejected", "tools", "chat_template_kwargs")}
        pairs.append(_Pair(b["__row"], values, b["prompt_ids"],
                           {"chosen": b["chosen_ids"], "rejected": b["rejected_ids"]}, seq))
    return pairs


def run_trl_dpo(rows: list[dict], tok, max_length: Optional[int], visit, batch_size: int = 64) -> _DpoRun:
    """Prepare every row with DPOTrainer, collate it with its DataCollatorForPreference and hand
    each pair to `visit` (pairs are not kept: a large split stays in constant memory)."""
    import tempfile

    from datasets import Dataset

    from .masking_checks import _quiet
    from .workspace import TMP_DIR
    ds = Dataset.from_list([{**r, "__row": i} for i, r in enumerate(rows)])
    with _quiet() as cap, tempfile.TemporaryDirectory(
            prefix="verify-preference-", dir=get_workspace().owned_dir(TMP_DIR)) as tmp:
        trainer = _dpo_trainer(ds, tok, max_length, tmp)
        data, seen = trainer.train_dataset, set()
        for start in range(0, len(data), batch_size):
            for pair in _collated(trainer, [data[i] for i in range(start, min(start + batch_size, len(data)))]):
                seen.add(pair.row)
                visit(pair)
        return _DpoRun(len(seen), [i for i in range(len(rows)) if i not in seen], list(cap.messages))


# --------------------------------------------------------------------------------------------
# verify_preference: the checks
# --------------------------------------------------------------------------------------------
@dataclass
class _Findings:
    rows: dict[str, list[int]] = field(default_factory=dict)     # code -> row numbers
    detail: dict[str, str] = field(default_factory=dict)
    prompt_scored: int = 0
    stop_ids: set[int] = field(default_factory=set)
    lengths: dict[str, list[int]] = field(default_factory=lambda: {"prompt": [], "chosen": [], "rejected": []})

    def add(self, code: str, row: int) -> None:
        rows = self.rows.setdefault(code, [])
        if not rows or rows[-1] != row:
            rows.append(row)


def _check_pair(p: _Pair, max_prompt_length: Optional[int], stop_ids: set[int], f: _Findings) -> None:
    """Checks that need no attribution, on every pair of the split."""
    n = p.row
    f.lengths["prompt"].append(len(p.prompt_ids))
    for side in ("chosen", "rejected"):
        f.lengths[side].append(len(p.reply_ids[side]))
    if p.reply_ids["chosen"] == p.reply_ids["rejected"]:
        f.add("identical_tokens", n)
    elif p.scored("chosen") == p.scored("rejected"):
        f.add("identical_after_truncation", n)
    for side in ("chosen", "rejected"):
        cut = len(p.seq[side][0]) < len(p.prompt_ids) + len(p.reply_ids[side])
        if cut:
            f.add("truncation_cuts_replies", n)
        if not stop_ids & set(p.scored(side)):
            f.add("end_of_turn_cut" if cut else "end_of_turn_not_scored", n)
    if max_prompt_length is not None and len(p.prompt_ids) > max_prompt_length:
        f.add("prompt_over_max_prompt_length", n)


def _roles(tok, values: dict, side: str, ids: list[int]) -> Optional[list[str]]:
    """Per token of prompt+reply: the message role it renders, or template (masking_checks)."""
    from . import masking_checks as mc
    prompt, reply = values["prompt"], values[side]
    if isinstance(prompt, list):
        conv = mc.conversation_view(tok, list(prompt) + list(reply), first_trained_turn=len(prompt),
                                    train_template=None, infer_template=None,
                                    tools=mc.json_tools(values.get("tools")),
                                    kwargs=values.get("chat_template_kwargs") or {})
    else:
        conv = mc.text_view(prompt, reply, None, tok.eos_token)
    offsets = mc.token_offsets(tok, conv.text, ids)
    return None if offsets is None else mc.token_roles(conv, offsets)[0]


def _side_view(tok, p: _Pair, side: str, stop_ids: set[int], f: _Findings) -> SideView:
    from .masking_checks import decoded_view
    full = p.prompt_ids + p.reply_ids[side]
    ids, mask = p.seq[side]
    scored = [t >= 1 and bool(mask[t]) for t in range(len(ids))]
    roles = _roles(tok, p.values, side, full)
    if roles is None:
        f.add("roles_unattributed", p.row)
        by_role = Counter({"unattributed": sum(scored)})
    else:
        by_role = Counter(roles[t] for t in range(len(ids)) if scored[t])
        hits = sum(by_role[r] for r in PROMPT_ROLES)
        if hits:
            f.prompt_scored += hits
            f.add("prompt_tokens_scored", p.row)
        unscored = sum(1 for t in range(len(ids)) if roles[t] == "assistant" and not scored[t])
        if unscored:
            f.add("reply_not_scored", p.row)
    eot = any(ids[t] in stop_ids for t in range(len(ids)) if scored[t])
    return SideView(tokens=len(p.reply_ids[side]), scored=sum(scored), end_of_turn_scored=eot,
                    scored_by_role=dict(by_role),
                    text=decoded_view(tok, ids, scored, len(full) - len(ids)))


def _prompt_alone(tok, p: _Pair, f: _Findings) -> None:
    """TRL tokenises the prompt alone (with the generation prompt) and prompt+reply, and starts
    the reply where they diverge: a prompt that renders differently alone loses its end."""
    from trl.data_utils import _tokenize

    from .masking_checks import json_tools
    prompt = p.values["prompt"]
    if isinstance(prompt, list):
        kw = {"tools": json_tools(p.values.get("tools")), **(p.values.get("chat_template_kwargs") or {})}
        alone = _tokenize(tok, prompt, add_generation_prompt=True, **kw)["input_ids"]
    else:
        alone = _tokenize(tok, prompt)["input_ids"]
    if len(alone) > len(p.prompt_ids):
        f.add("prompt_not_prefix", p.row)
        f.detail.setdefault("prompt_not_prefix", tok.decode(alone[len(p.prompt_ids):]))


def _pair_view(tok, p: _Pair, stop_ids: set[int], f: _Findings) -> PairView:
    _prompt_alone(tok, p, f)
    c, r = p.reply_ids["chosen"], p.reply_ids["rejected"]
    from .masking_checks import common_prefix_ids
    k = common_prefix_ids(c, r)
    return PairView(row=p.row, prompt_tokens=len(p.prompt_ids),
                    first_difference=None if c == r else k,
                    chosen=_side_view(tok, p, "chosen", stop_ids, f),
                    rejected=_side_view(tok, p, "rejected", stop_ids, f))


# code -> (severity when it happens, message, fix); "share" codes fail above SHARE_FAIL of pairs
CHECKS: dict[str, tuple[str, str, str]] = {
    "prompt_tokens_scored": (
        "fail", "prompt tokens are inside the scored span of {n} checked pair(s): the loss rewards "
                "or punishes the prompt, which is the same on both sides, and the reply boundary is wrong",
        "A reply that repeats the prompt messages (chosen = the whole conversation next to a prompt "
        "column) is scored as a reply: run convert_preference, which strips the repeated prompt."),
    "reply_not_scored": (
        "fail", "reply tokens of {n} checked pair(s) are outside the scored span (the chat template "
                "renders the prompt alone differently, so the reply starts late)",
        "Use a chat template that renders the prompt the same alone (add_generation_prompt=True) and "
        "followed by a reply."),
    "end_of_turn_not_scored": (
        "fail", "the end-of-turn/EOS token is not scored on {n} pair(s) that truncation does not "
                "touch: DPO never compares where the replies stop, and the chat template may not "
                "close assistant turns",
        "Use a chat template that ends every assistant turn with the EOS / end-of-turn token "
        "(the model's Instruct template, or one TRL ships: chat_template='trl:<name>')."),
    "identical_tokens": (
        "share", "chosen and rejected tokenize to the same ids in {n} pair(s) ({share:.1%}): the "
                 "difference is lost by the template (trimmed whitespace, dropped fields) and these "
                 "pairs carry no preference",
        "Drop them (convert_preference drops text-identical pairs) or fix the data so the replies "
        "really differ."),
    "identical_after_truncation": (
        "share", "chosen and rejected differ only beyond max_length in {n} pair(s) ({share:.1%}): both "
                 "sides are cut to the same tokens and the pair scores zero margin",
        "Raise max_length (DPOConfig.max_length applies to prompt+reply) or drop long pairs."),
    "truncation_cuts_replies": (
        "share", "max_length cuts a reply in {n} pair(s) ({share:.1%}); their end of turn is lost "
                 "(end_of_turn_cut) and long replies are compared on their starts only",
        "Raise max_length to cover prompt + the longer reply, or filter long pairs."),
    "dropped_by_trl": (
        "share", "TRL drops {n} pair(s) ({share:.1%}) whose prompt alone fills max_length (keep_start "
                 "would leave no reply token)",
        "Raise max_length or shorten/drop those prompts."),
    "prompt_not_prefix": (
        "warn", "the prompt rendered alone (with the generation prompt) is not a prefix of prompt + "
                "reply in {n} checked pair(s); TRL starts the reply where they diverge and leaves "
                "out {detail!r} (the model is trained on a context it does not see at inference)",
        "Use a chat template that renders the prompt the same way in both cases."),
    "prompt_over_max_prompt_length": (
        "warn", "{n} prompt(s) are longer than max_prompt_length; DPOConfig in TRL 1.x has no "
                "max_prompt_length (prompt+reply is cut to max_length, keep_start), so these prompts "
                "take the reply's budget",
        "Filter the long prompts before training if they must not eat into max_length."),
    "roles_unattributed": (
        "info", "{n} checked pair(s) could not be mapped token by token to their messages (the "
                "tokenizer has no offsets for this text); their scored spans are shown unattributed",
        "Check the decoded views by eye."),
}


def _reasons(f: _Findings, run: _DpoRun, n_rows: int) -> list[Reason]:
    out = []
    rows = dict(f.rows)
    if run.dropped:
        rows["dropped_by_trl"] = run.dropped
    for code, (sev, msg, fix) in CHECKS.items():
        hit = rows.get(code)
        if not hit:
            continue
        share = len(hit) / max(n_rows, 1)
        if sev == "share":
            sev = "fail" if share > SHARE_FAIL else "warn"
        out.append(Reason(severity=sev, code=code, rows=hit[:MAX_ROWS], fix=fix,
                          message=msg.format(n=len(hit), share=share, detail=f.detail.get(code, ""))))
    cut = rows.get("end_of_turn_cut")
    if cut and "truncation_cuts_replies" not in rows:
        out.append(Reason(severity="warn", code="end_of_turn_cut", rows=cut[:MAX_ROWS],
                          message=f"{len(cut)} pair(s) lose their end of turn to truncation.",
                          fix=CHECKS["truncation_cuts_replies"][2]))
    if not run.prepared:
        out.append(Reason(severity="fail", code="no_pairs", message="TRL keeps no pair of this split.",
                          fix="Raise max_length or check the data."))
    order = {"fail": 0, "warn": 1, "info": 2}
    return sorted(out, key=lambda r: order[r.severity])


def _spread(xs: list[int]) -> Optional[Spread]:
    return Spread(mean=round(sum(xs) / len(xs), 2), min=min(xs), max=max(xs)) if xs else None


def _preference_key(d_hash: str, t_hash: str, tpl_hash: str, split: str, max_length: Optional[int],
                    kind: str = "dpo", rewards: Optional[list] = None) -> str:
    blob = {"kind": kind, "dataset": d_hash, "tokenizer": t_hash, "template": tpl_hash, "split": split,
            "max_length": max_length}
    if rewards:  # GRPO: the rewards the report checked
        blob["rewards"] = rewards
    blob = json.dumps(blob, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _save(report: PreferenceReport) -> PreferenceReport:
    ws = get_workspace()
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    ws.owned_dir(REPORT_DIR)
    rel = f"{REPORT_DIR}/{stamp}-{report.key[:12]}.json"
    report.report_path = str(ws.resolve(rel, field="report_path"))
    ws.write_text(rel, report.model_dump_json(indent=2), field="report_path")
    return report


@dataclass
class _VInputs:
    d_path: Path
    t_path: Path
    tok: Any
    tpl_text: Optional[str]
    tpl_label: str
    split: str
    rows: list[dict]
    kind: str = "dpo"   # the proof: dpo (pairs, also ORPO), kto or grpo


def _load_inputs(dataset: str, tokenizer: str, chat_template: Optional[str], split: str,
                 trainer: Optional[str] = None) -> _VInputs:
    from .masking import _find_split_file, _load_tokenizer, _read_rows, _template_text
    from .preference_verify import kind_of
    from .template_guard import check_template
    ws = get_workspace()
    d_path = ws.resolve(dataset, field="dataset", must_exist=True)
    t_path = ws.resolve(tokenizer, field="tokenizer", must_exist=True, kind="dir")
    tpl_text, tpl_label = _template_text(chat_template)
    file = ws.resolve(_find_split_file(d_path, split), field="dataset", kind="file")
    rows = _read_rows(file)
    if not rows:
        raise UserError(f"{file.name} has no rows.", field="dataset", fix="Run convert_preference first.")
    kind = kind_of(rows, trainer)
    need = {"dpo": ("chosen", "rejected"), "kto": ("prompt",), "grpo": ("prompt",), None: ("chosen", "rejected")}
    bad = [i for i, r in enumerate(rows) if kind is None or any(k not in r for k in need[kind])]
    if bad:
        raise UserError(f"row {bad[0]} (and {len(bad) - 1} more) has no chosen/rejected column, nor "
                        f"completion + label (KTO), nor a prompt alone (GRPO) (columns: "
                        f"{sorted(rows[bad[0]])[:12]}).", field="dataset",
                        fix="Run convert_preference on the source data first.")
    tok = _load_tokenizer(t_path)
    if tpl_text is not None:
        tok.chat_template = tpl_text
    check_template(tok.chat_template if isinstance(tok.chat_template, str) else None,
                   field="chat_template" if tpl_text is not None else "tokenizer")
    if _conversational(rows[0]) and not tok.chat_template:
        raise UserError(f"the tokenizer in {ws.rel(t_path)} has no chat template and the rows are "
                        "conversational.", field="chat_template",
                        fix="Pass chat_template (a .jinja file, 'trl:<name>' or the text); the DPO "
                            "recipe must set the same chat_template_path.")
    return _VInputs(d_path, t_path, tok, tpl_text, tpl_label, split, rows, kind)


def _conversational(row: dict) -> bool:
    return any(_is_conv(row.get(k)) for k in ("prompt", "chosen", "completion"))


def _trl_failure(exc: Exception, inp: _VInputs) -> Reason:
    """TRL could not prepare the split: the row and the template's (or Arrow's) own error."""
    from .masking_checks import render
    for n, r in enumerate(inp.rows):
        p = r.get("prompt")
        if not isinstance(p, list):
            continue
        for side in ("chosen", "rejected"):
            try:
                render(inp.tok, list(p) + list(r[side]), template=None, tools=None, kwargs={})
            except Exception as e:  # noqa: BLE001 - the template's error is the finding
                return Reason(severity="fail", code="template_error", rows=[n],
                              message=f"the chat template cannot render row {n} ({side}): "
                                      f"{type(e).__name__}: {short(e, 300)}",
                              fix="Pick a template that supports these messages, or fix the rows.")
    mixed = "ArrowInvalid" in type(exc).__name__ or "ArrowTypeError" in type(exc).__name__
    return Reason(severity="fail", code="mixed_formats" if mixed else "trl_error",
                  message=f"DPOTrainer could not prepare this data: {type(exc).__name__}: {short(exc, 400)}",
                  fix="Every row must have the same shape (all conversational or all text): run "
                      "convert_preference." if mixed else "Check the columns (prompt/chosen/rejected).")


def verify_preference(
    dataset: Optional[str] = None,
    tokenizer: Annotated[Optional[str], Field(description="model, SFT adapter or tokenizer dir")] = None,
    max_length: Annotated[Optional[int], Field(ge=2, description="prompt + reply tokens; None: no cut")] = 1024,
    max_prompt_length: Annotated[Optional[int], Field(ge=1)] = None,
    chat_template: Optional[str] = None,
    split: str = "train",
    sample_size: Annotated[int, Field(ge=1, le=2000)] = 64,
    show_examples: Annotated[int, Field(ge=0, le=20)] = 3,
    recipe: Annotated[Optional[str], Field(description="a preference recipe: its inputs are used")] = None,
) -> PreferenceReport:
    """Prove before training, with TRL's own preparation, what DPO/ORPO/KTO scores (or check GRPO
    prompts and rewards); saves the report launch_training requires.

    DPO / ORPO pairs: DPOTrainer's dataset preparation (prompt extraction, EOS, chat template,
    tokenisation, the drop of pairs whose prompt fills max_length) and its collator (truncation,
    completion mask) run on a throw-away tiny model; every token is mapped to its message.
    Checks: nothing of the prompt is scored, the whole reply is, the end-of-turn token is scored
    on both sides, chosen and rejected still differ after tokenization and after truncation, how
    many pairs TRL drops or truncates. KTO rows (completion + label, or pairs TRL unpairs): the
    same with KTOTrainer's preparation and collator, plus the label balance. GRPO prompts: each
    renders with the generation prompt, generation can stop, prompt lengths; with recipe= the
    rewards: a user's file by ast (never run here), the answer reward gives every reference answer
    1 and an empty answer 0. Returns pass/warn/fail with reasons and fixes, decoded examples with
    scored spans in [[...]], and the saved report's path.

    Parameters:
    - dataset: convert_preference's directory or a .jsonl file (from the recipe when given).
    - max_prompt_length: a check only: names prompts longer than this (TRL 1.x has no such key).
    - chat_template: a .jinja file, 'trl:<name>' or template text (the recipe's chat_template_path).
    - sample_size: rows attributed token by token; the other checks cover every row.
    - recipe: a DPO/KTO/ORPO/GRPO recipe YAML: its dataset, model, max_length, template (and GRPO
      rewards) are used, so the report is the one launch_training looks for.
    """
    from .progress import report
    trainer, rewards = None, None
    if recipe is not None:
        dataset, tokenizer, split, chat_template, max_length, trainer, rewards = _from_recipe(recipe, dataset,
                                                                                              tokenizer)
    if not dataset or not tokenizer:
        raise UserError("needs a dataset and a tokenizer.", field="dataset" if not dataset else "tokenizer",
                        fix="Pass dataset= and tokenizer=, or recipe=<the recipe YAML>.")
    report(0, 3, "loading the rows, tokenizer and template")
    inp = _load_inputs(dataset, tokenizer, chat_template, split, trainer)
    if inp.kind == "grpo":
        max_length = None
    base = _base_fields(inp, max_length, max_prompt_length, rewards)
    if inp.kind != "dpo":
        report(1, 3, f"{inp.kind.upper()}: preparing {len(inp.rows)} rows")
        return _save(_finish(_other_proof(inp, max_length, sample_size, show_examples, rewards, base), recipe))
    report(1, 3, f"DPOTrainer prepares and collates {len(inp.rows)} pairs")
    f = _Findings()
    try:
        run, views = _prove(inp, max_length, max_prompt_length, sample_size, f)
    except Exception as exc:  # noqa: BLE001 - template/data errors are findings about the inputs
        return _save(_finish(PreferenceReport(verdict="fail", reasons=[_trl_failure(exc, inp)], pairs_prepared=0,
                                              pairs_dropped_by_trl=0, examples_checked=0, **base), recipe))
    report(2, 3, "checking the scored tokens")
    reasons = _reasons(f, run, len(inp.rows))
    out = PreferenceReport(
        verdict=_verdict(reasons), reasons=reasons, pairs_prepared=run.prepared, pairs_dropped_by_trl=len(run.dropped),
        examples_checked=len(views), prompt_tokens=_spread(f.lengths["prompt"]),
        chosen_tokens=_spread(f.lengths["chosen"]), rejected_tokens=_spread(f.lengths["rejected"]),
        identical_pairs=len(f.rows.get("identical_tokens", [])),
        identical_after_truncation=len(f.rows.get("identical_after_truncation", [])),
        truncated_pairs=len(f.rows.get("truncation_cuts_replies", [])),
        end_of_turn_missing=len(f.rows.get("end_of_turn_not_scored", [])), prompt_tokens_scored=f.prompt_scored,
        stop_tokens=[inp.tok.convert_ids_to_tokens(i) for i in sorted(f.stop_ids)],
        pairs=_shown(views, f, show_examples), trl_warnings=run.warnings, **base)
    report(3, 3, f"verdict {out.verdict}")
    return _save(_finish(out, recipe))


def _verdict(reasons: list[Reason]) -> str:
    return "fail" if any(r.severity == "fail" for r in reasons) else \
        "warn" if any(r.severity == "warn" for r in reasons) else "pass"


def _other_proof(inp: _VInputs, max_length: Optional[int], sample_size: int, show: int, rewards: Optional[list],
                 base: dict) -> PreferenceReport:
    """KTO (KTOTrainer's preparation and collator) or GRPO (prompts and rewards)."""
    from .preference_verify import prove_grpo, prove_kto
    try:
        fields = prove_kto(inp, max_length, sample_size, show) if inp.kind == "kto" else \
            prove_grpo(inp, rewards, show)
    except Exception as exc:  # noqa: BLE001 - template/data errors are findings about the inputs
        return PreferenceReport(verdict="fail", reasons=[Reason(
            severity="fail", code="trl_error", message=f"{inp.kind.upper()} preparation failed: "
            f"{type(exc).__name__}: {short(exc, 400)}", fix="Check the columns; run convert_preference.")],
            pairs_prepared=0, pairs_dropped_by_trl=0, examples_checked=0, **base)
    return PreferenceReport(verdict=_verdict(fields["reasons"]), **fields, **base)


def _finish(r: PreferenceReport, recipe: Optional[str]) -> PreferenceReport:
    """The summary and the next calls."""
    noun = {"dpo": "pairs", "kto": "rows", "grpo": "prompts"}[r.trainer]
    who = {"dpo": "DPOTrainer", "kto": "KTOTrainer", "grpo": "GRPO's chat template"}[r.trainer]
    fails = [x.code for x in r.reasons if x.severity == "fail"]
    warns = [x.code for x in r.reasons if x.severity == "warn"]
    if r.trainer == "grpo":
        ok = [f"{c.name} (reference earns 1 on {c.reference_scores_1:.0%})" if c.reference_scores_1 is not None
              else c.name for c in r.rewards_checked]
        detail = f"rewards checked: {', '.join(ok)}" if ok else "rewards not checked (pass recipe=)"
    else:
        detail = (f"{r.prompt_tokens_scored} prompt tokens scored, {r.end_of_turn_missing} without a scored end "
                  f"of turn, {r.truncated_pairs} truncated")
    tail = f"; fails: {', '.join(fails)}" if fails else f"; warnings: {', '.join(warns)}" if warns else ""
    r.summary = (f"{r.verdict.upper()}: {r.pairs_prepared:,} of {r.dataset_rows:,} {noun} prepared by {who}; "
                 f"{detail}{tail}.")[:300]
    s = r.settings
    if fails:
        r.next_steps = [x.fix for x in r.reasons if x.severity == "fail"][:2]
    elif recipe:
        r.next_steps = [f"launch_training(recipe='{recipe}')"]
    else:
        trainer = {"dpo": "dpo", "kto": "kto", "grpo": "grpo"}[r.trainer]
        r.next_steps = [f"generate_dpo_recipe(model='{s.tokenizer}', dataset='{s.dataset}', trainer='{trainer}', "
                        f"output_path='recipes/{trainer}.yaml', output_dir='outputs/{trainer}')"]
    return r


def _base_fields(inp: _VInputs, max_length: Optional[int], max_prompt_length: Optional[int],
                 rewards: Optional[list] = None) -> dict:
    """The report's identity: settings, content hashes and the key launch_training looks up."""
    from .masking import dataset_hash, template_hash, tokenizer_hash
    ws = get_workspace()
    hashes = dict(dataset_hash=dataset_hash(inp.d_path), tokenizer_hash=tokenizer_hash(inp.t_path),
                  template_hash=template_hash(inp.tpl_text))
    key = _preference_key(hashes["dataset_hash"], hashes["tokenizer_hash"], hashes["template_hash"],
                          inp.split, max_length, inp.kind, rewards)
    settings = PreferenceSettings(dataset=ws.rel(inp.d_path), tokenizer=ws.rel(inp.t_path), split=inp.split,
                                  max_length=max_length, max_prompt_length=max_prompt_length,
                                  chat_template=inp.tpl_label)
    return dict(key=key, report_path="", settings=settings, trainer=inp.kind,
                created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds"),
                conversational=_conversational(inp.rows[0]),
                prompt_source="explicit" if "prompt" in inp.rows[0] else "implicit",
                dataset_rows=len(inp.rows), **hashes)


def _prove(inp: _VInputs, max_length: Optional[int], max_prompt_length: Optional[int], sample_size: int,
           f: _Findings) -> tuple[_DpoRun, list[PairView]]:
    """TRL prepares every pair; each is checked as it comes, the sample is attributed token by token."""
    from .masking import _sample, _stop_ids
    f.stop_ids = _stop_ids(inp.tok, inp.t_path)
    sample = set(_sample(list(range(len(inp.rows))), sample_size)[0])
    views: list[PairView] = []

    def visit(p: _Pair) -> None:
        _check_pair(p, max_prompt_length, f.stop_ids, f)
        if p.row in sample:
            views.append(_pair_view(inp.tok, p, f.stop_ids, f))
    return run_trl_dpo(inp.rows, inp.tok, max_length, visit), views


def _shown(views: list[PairView], f: _Findings, k: int) -> list[PairView]:
    """The pairs to show: those a reason names first, then the first ones."""
    flagged = {n for code, rows in f.rows.items() for n in rows}
    return (sorted(views, key=lambda v: v.row not in flagged))[:k]


# --------------------------------------------------------------------------------------------
# A DPO recipe's inputs, and the lookup launch_training uses
# --------------------------------------------------------------------------------------------
PROOF_OF = {"dpo": "dpo", "orpo": "dpo", "kto": "kto", "grpo": "grpo"}  # ORPO's pairs: DPO's proof


def recipe_preference(cfg: dict) -> tuple[Optional[str], list[tuple[str, str]], dict]:
    """(tokenizer, [(dataset, split)], settings) a preference recipe trains with (TRL defaults
    where unset); settings are find_preference_report's keywords."""
    from .masking import recipe_datasets
    tok = cfg.get("model_name_or_path")
    proof = PROOF_OF.get(str(cfg.get("trainer", "dpo")).lower(), "dpo")
    st = {"max_length": None if proof == "grpo" else cfg.get("max_length", 1024),
          "chat_template_path": cfg.get("chat_template_path"), "trainer": proof}
    if proof == "grpo":
        st["rewards"] = cfg.get("rewards")
    return str(tok) if tok else None, recipe_datasets(cfg), st


def _from_recipe(recipe: str, dataset: Optional[str], tokenizer: Optional[str]) -> tuple:
    from .masking import pick_recipe_input, read_recipe
    tok, inputs, st = recipe_preference(read_recipe(recipe))
    ds, split = pick_recipe_input(tok, inputs, dataset, tokenizer)
    return ds, tok, split, st["chat_template_path"], st["max_length"], st["trainer"], st.get("rewards")


def find_preference_report(dataset_path: str, tokenizer_path: str, *, max_length: Optional[int],
                           chat_template_path: Optional[str] = None, split: str = "train",
                           trainer: str = "dpo", rewards: Optional[list] = None) -> Optional[PreferenceReport]:
    """The newest saved verify_preference report for exactly these inputs (content hashes of the
    dataset, tokenizer and template, the split and max_length), or None."""
    from .masking import dataset_hash, template_hash, tokenizer_hash
    ws = get_workspace()
    d_path = ws.resolve(dataset_path, field="dataset_path")
    t_path = ws.resolve(tokenizer_path, field="tokenizer_path")
    if not d_path.exists() or not t_path.is_dir():
        return None
    tpl = chat_template_path
    if tpl is not None and "{%" not in tpl and "{{" not in tpl:
        p = ws.resolve(tpl, field="chat_template_path")
        if not p.is_file():
            return None
        tpl = p.read_text(encoding="utf-8")
    key = _preference_key(dataset_hash(d_path), tokenizer_hash(t_path), template_hash(tpl), split, max_length,
                          trainer, rewards)
    best = None
    for fp in ws.owned_dir(REPORT_DIR).glob(f"*-{key[:12]}.json"):
        try:
            data = json.loads(fp.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if data.get("key") == key and (best is None or (data.get("created_at", ""), fp.name) > best[:2]):
            best = (data.get("created_at", ""), fp.name, data)
    return PreferenceReport.model_validate(best[2]) if best else None
