"""Datasets in: `inspect_dataset` (what is this data, what is wrong with it) and
`convert_dataset` (turn it into the JSONL TRL trains on, with a report).

Formats, checks and the conversion rule are in tools/data_formats.py; reading files and the hub
in tools/data_io.py. Conversion streams: rows are read one at a time, written to a scratch file,
and only byte offsets (8 bytes a row) and 8-byte dedupe hashes stay in memory.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import random
import statistics
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, Field

from .data_formats import (CHANGE_HELP, MAPPING_KEYS, PROBLEM_HELP, SOURCE_FORMATS, TEMPLATE_KEYS,
                           Detection, RowError, add_system, build_row, detect, format_from_mapping,
                           mapping_columns, normalize, normalized, problems, template_fields,
                           to_messages, trim_trailing)
from .data_io import HUB_ID, open_source
from .hub import hub_offline, hub_unreachable
from .errors import UserError
from .template_guard import check_template
from .params import Tokenizer
from .results import SUMMARY_MAX_CHARS, ToolResult
from .workspace import get_workspace, short

MAX_LINES = 20          # line numbers kept per problem kind
TOKEN_BATCH = 256       # rows rendered, then tokenized together
SENTINEL = "\ue000system_prompt\ue000"  # private-use chars: never escaped, never in real data
PROBLEM_HELP = {**PROBLEM_HELP,
                "template_error": "the tokenizer's chat template raised on this conversation (the "
                                  "example quotes the template's own error, e.g. roles must "
                                  "alternate, one tool call per turn)",
                "tool_calls_not_rendered": "the chat template rendered the conversation without its "
                                           "tool calls, so training would teach an empty reply: the "
                                           "template has no tool-call support or expects another "
                                           "shape (DeepSeek-R1-Distill's renders calls only when "
                                           "content is null, which transformers drops). Use a "
                                           "tool-capable template (Qwen2.5, Qwen3, Llama 3.1) or "
                                           "leave the tool rows out",
                "too_long": "longer than max_length tokens (TRL would truncate it)"}
DEDUPE_NOTE = ("Duplicates are counted two ways: duplicate_rows compares whole source rows (every "
               "column, ids and metadata included, problem rows too); duplicate_conversations "
               "compares the converted conversation (+ tools) of usable rows, which is what "
               "convert_dataset drops with dedupe='exact' (counts.duplicates). Rows that differ "
               "only in unmapped columns are duplicates in the second sense only.")

SourceFormat = Literal["messages", "sharegpt", "alpaca", "prompt_completion", "question_answer", "text"]


# ---- report models ------------------------------------------------------------------------

class ProblemSummary(BaseModel):
    """Rows with one kind of problem (or change): how many, where (first 20), one example, what it
    means."""
    kind: str
    count: int
    lines: list[int] = Field(description="locations (see location_unit) of the first 20 rows.")
    example: str
    meaning: str


class ColumnInfo(BaseModel):
    name: str
    types: list[str] = Field(description="JSON types seen in the sampled rows.")
    non_empty: int = Field(description="sampled rows where the value is not null/empty.")
    example: Optional[str] = None


class TokenStats(BaseModel):
    """Token lengths of the full conversation rendered with the tokenizer's chat template, the
    same way TRL's SFTTrainer tokenizes it (prompt+completion, tools included)."""
    tokenizer: str
    rows: int = Field(description="rows measured.")
    p50: int
    p95: int
    max: int
    mean: float
    max_length: Optional[int] = None
    over_max_length: Optional[int] = Field(None, description="measured rows longer than max_length.")
    over_max_length_lines: list[int] = []
    template_errors: int = Field(0, description="rows the chat template raised on or rendered "
                                                "without their tool calls (see problems/skipped).")


class SuggestedConversion(BaseModel):
    """What to pass to convert_dataset: `arguments` is ready to use as is."""
    target_format: str
    source_format: str
    column_mapping: dict[str, str]
    arguments: dict[str, Any]


class DatasetReport(ToolResult):
    """What inspect_dataset found in the dataset (or its first sample_size rows)."""
    dataset: str
    source: str = Field(description="jsonl | json | csv | parquet | disk (a datasets.save_to_disk "
                                    "folder) | hub | mixed")
    split: str
    location_unit: Literal["line", "row"] = Field(
        description="'line': locations are 1-based file line numbers; 'row': 1-based row numbers.")
    rows: Optional[int] = Field(description="total rows in the split (None if unknown, e.g. hub).")
    rows_sampled: int
    columns: list[ColumnInfo]
    detected_format: Optional[str] = Field(
        description="messages | sharegpt | alpaca | prompt_completion | question_answer | text | None")
    format_evidence: str
    conversational: Optional[bool] = None
    column_mapping: dict[str, str] = Field(description="format key -> column, as convert_dataset takes it.")
    usable_rows: int = Field(description="sampled rows that convert without a problem.")
    roles: dict[str, int] = Field(description="messages per role (after alias folding) in the sample.")
    turns: dict[str, float] = Field(default_factory=dict, description="messages per row: min/median/max.")
    rows_with_system: int = 0
    rows_with_tools: int = 0
    rows_with_trailing_turns: int = Field(0, description="rows ending after the last assistant turn "
                                                         "(those turns are dropped on conversion).")
    problems: list[ProblemSummary]
    changes: list[ProblemSummary] = Field(
        default_factory=list, description="what conversion changes in rows it keeps (NaN read as "
                                          "null, legacy function_call rewritten, ...): kind, rows, lines.")
    empty_rows: int
    empty_row_lines: list[int]
    duplicate_rows: int = Field(description="whole-row duplicates: sampled rows equal to an earlier "
                                            "one in every column (ids and metadata included).")
    duplicate_row_lines: list[int]
    duplicate_conversations: int = Field(
        0, description="usable sampled rows whose converted conversation (+ tools) equals an earlier "
                       "one: what convert_dataset drops with dedupe='exact' (its counts.duplicates).")
    duplicate_conversation_lines: list[int] = []
    token_lengths: Optional[TokenStats] = None
    suggested_conversion: Optional[SuggestedConversion] = None
    samples: list[dict[str, Any]] = Field(description="first sampled rows as convert would read them.")
    notes: list[str]


class ConvertCounts(BaseModel):
    read: int = Field(description="source rows read.")
    converted: int = Field(description="rows written (train + test).")
    skipped: int = Field(description="rows dropped for a problem or length (see `skipped`).")
    duplicates: int = Field(description="rows dropped as duplicates of an earlier written row, "
                                        "compared after mapping (conversation + tools; see dedupe): "
                                        "inspect_dataset's duplicate_conversations, not its "
                                        "whole-row duplicate_rows.")
    train: int
    test: int
    system_prompt_added: int = 0
    trailing_turns_dropped: int = Field(0, description="rows that lost turns after the last assistant turn.")


class ConvertReport(ToolResult):
    """What convert_dataset wrote, what it dropped and why."""
    output_dir: str
    files: dict[str, str] = Field(description="split -> JSONL file (workspace-relative).")
    target_format: str
    source_format: str
    column_mapping: dict[str, str]
    location_unit: Literal["line", "row"]
    counts: ConvertCounts
    skipped: list[ProblemSummary]
    changes: list[ProblemSummary] = Field(
        default_factory=list, description="what was changed on the way: NaN read as null (rows read), "
                                          "legacy function_call rewritten, media parts dropped, "
                                          "assistant turns merged (rows written).")
    duplicate_lines: list[int] = Field(description="locations of the first 20 duplicates dropped.")
    dropped_columns: list[str] = Field(description="source columns not carried into the output.")
    token_lengths: Optional[TokenStats] = None
    samples: list[dict[str, Any]] = Field(description="the first converted rows (long strings cut).")
    notes: list[str] = Field(default_factory=list, description="how the input was read (encoding, "
                             "delimiter, array-in-JSONL, save_to_disk) and stale temporary folders "
                             "of interrupted earlier calls that were removed.")
    elapsed_s: float


# ---- helpers ---------------------------------------------------------------------------------

def _cut(obj: Any, n: int = 300) -> Any:
    if isinstance(obj, str):
        return obj if len(obj) <= n else obj[:n] + f"... [{len(obj)} chars]"
    if isinstance(obj, dict):
        return {k: _cut(v, n) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cut(v, n) for v in obj[:20]]
    return obj


class _Tally:
    """Counts and first locations per problem (or change) kind."""

    def __init__(self, meanings: dict[str, str] | None = None):
        self.items: dict[str, dict] = {}
        self.meanings = PROBLEM_HELP if meanings is None else meanings

    def add(self, kind: str, loc: int, detail: str):
        it = self.items.setdefault(kind, {"count": 0, "lines": [], "example": ""})
        it["count"] += 1
        if len(it["lines"]) < MAX_LINES:
            it["lines"].append(loc)
        if not it["example"]:
            it["example"] = f"{loc}: {detail}"

    def total(self) -> int:
        return sum(i["count"] for i in self.items.values())

    def summaries(self, unit: str) -> list[ProblemSummary]:
        return [ProblemSummary(kind=k, count=v["count"], lines=v["lines"],
                               example=f"{unit} {v['example']}", meaning=self.meanings.get(k, k))
                for k, v in sorted(self.items.items(), key=lambda kv: -kv[1]["count"])]


def _resolve_format(rows: list[dict], source_format: str | None,
                    column_mapping: dict[str, str] | None) -> Detection:
    """Auto-detect, or check the caller's format/mapping against the sampled columns."""
    cols: dict[str, None] = {}
    for r in rows:
        for k in r:
            cols.setdefault(k, None)
    if source_format is not None and source_format not in SOURCE_FORMATS:
        raise UserError(f"unknown source format {source_format!r}.", field="source_format",
                        fix=f"Use one of {', '.join(SOURCE_FORMATS)}, or leave it empty to auto-detect.")
    if not column_mapping:
        det = detect(rows)
        if source_format and det.format != source_format:
            if source_format in ("question_answer", "prompt_completion") and \
                    det.format in ("question_answer", "prompt_completion"):
                return Detection(source_format, det.mapping, det.conversational, det.evidence)
            raise UserError(f"source_format={source_format!r} but the columns {list(cols)} look like "
                            f"{det.format or 'no known format'}.", field="source_format",
                            fix="Leave source_format empty to auto-detect, or pass column_mapping "
                                f"with the keys {_keys_doc(source_format)}.")
        return det
    if not isinstance(column_mapping, dict) or not all(isinstance(v, str) for v in column_mapping.values()):
        raise UserError("must map format keys to column names (strings).", field="column_mapping",
                        fix='e.g. {"prompt": "question", "completion": "answer"}.')
    fmt = source_format or format_from_mapping(column_mapping)
    if fmt is None:
        raise UserError(f"cannot tell the format from the keys {sorted(column_mapping)}.",
                        field="column_mapping",
                        fix="Use the keys of one format: " + "; ".join(
                            f"{f}: {_keys_doc(f)}" for f in SOURCE_FORMATS) + " (or set source_format).")
    req, opt = MAPPING_KEYS[fmt]
    unknown = [k for k in column_mapping if k not in req + opt]
    missing_keys = [k for k in req if k not in column_mapping]
    if unknown or missing_keys:
        raise UserError(f"keys {unknown or missing_keys} {'are not used' if unknown else 'are required'} "
                        f"for format {fmt}.", field="column_mapping",
                        fix=f"Format {fmt} takes {_keys_doc(fmt)}.")
    _check_mapped_columns(column_mapping, list(cols))
    det = detect(rows)
    conv = det.conversational if det.format == fmt else None
    return Detection(fmt, dict(column_mapping), conv, "from column_mapping")


def _check_mapped_columns(column_mapping: dict[str, str], cols: list[str]) -> None:
    """Every mapped column exists; a value that is no column but has {column} placeholders is a
    template (text keys only), and each of its columns must exist too."""
    absent: dict[str, str] = {}
    for key, value in column_mapping.items():
        try:
            fields = None if value in cols else template_fields(value)
        except ValueError as exc:
            raise UserError(f"the {key} template {value!r}: {exc}.", field="column_mapping",
                            fix='Write placeholders as {column}, e.g. "Subject: {subject}\\n\\n'
                                '{message}"; double literal braces ({{ }}).') from None
        if fields is None:
            if value not in cols:
                absent[key] = value
            continue
        if key not in TEMPLATE_KEYS:
            raise UserError(f"'{key}' must name a column; templates ({value!r}) build text only.",
                            field="column_mapping",
                            fix=f"Use a template for one of {', '.join(TEMPLATE_KEYS)}.")
        missing = [c for c in fields if c not in cols]
        if missing:
            raise UserError(f"the {key} template {value!r} names column(s) {missing} that the dataset "
                            f"does not have. Columns: {cols}.", field="column_mapping",
                            fix="Use the dataset's column names inside the braces (they are "
                                "case-sensitive).")
    if absent:
        raise UserError(f"names columns that the dataset does not have: {absent}. Columns: {cols}.",
                        field="column_mapping", fix="Map each key to one of the dataset's columns, or "
                                                    "to a template of them like \"{title}: {body}\".")


def _keys_doc(fmt: str) -> str:
    req, opt = MAPPING_KEYS[fmt]
    return "required " + "/".join(req) + (", optional " + "/".join(opt) if opt else "")


def _fresh_tokenizer(src: str):
    from .heavy import warm
    warm("transformers")  # concurrent first imports race (tools/heavy.py)
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(src)


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(src: str, mtime: float):
    return _fresh_tokenizer(src)


def load_tokenizer(tokenizer: str, *, field: str = "tokenizer", fresh: bool = False,
                   require_template: bool = True):
    """A tokenizer from a workspace directory (tokenizer files or a model dir), or a hub id when
    the hub is reachable. require_template: the chat template must exist (lengths are measured
    with it). fresh: a new object the caller may change (e.g. set another chat_template), not
    the cached one other calls share."""
    ws = get_workspace()
    p = ws.resolve(tokenizer, field=field)
    if p.exists():
        if p.is_file():
            p = p.parent
        ws.contain_tree(p, field=field)
        if not any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json",
                                              "tokenizer.model", "vocab.json")):
            raise UserError(f"'{tokenizer}' has no tokenizer files (tokenizer.json, "
                            "tokenizer_config.json, tokenizer.model).", field=field,
                            fix="Give the model directory or a directory with its tokenizer files.")
        src, mtime = str(p), max(f.stat().st_mtime for f in p.iterdir())
    elif HUB_ID.match(tokenizer) and not os.path.isabs(tokenizer) and not hub_offline() \
            and not hub_unreachable():
        src, mtime = tokenizer, 0.0
    else:
        raise UserError(f"'{tokenizer}' does not exist (looked at {p}) and is not loadable from the "
                        "hub (offline or unreachable).", field=field,
                        fix="Give a local model/tokenizer directory inside the workspace.")
    try:
        tok = _fresh_tokenizer(src) if fresh else _cached_tokenizer(src, mtime)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"could not load a tokenizer from '{tokenizer}': {type(exc).__name__}: {exc}",
                        field=field, fix="Check the directory holds a transformers tokenizer.") from exc
    if not require_template:
        return tok
    if not getattr(tok, "chat_template", None):
        raise UserError(f"the tokenizer at '{tokenizer}' has no chat template, so chat rows cannot be "
                        "measured as TRL would render them.", field=field,
                        fix="Use the instruct model's tokenizer (it carries the template), or add a "
                            "chat_template to its tokenizer_config.json.")
    check_template(tok.chat_template if isinstance(tok.chat_template, str) else None, field=field)
    return tok


def _lengths(tok, items: list[tuple[list[dict], list | None]],
             kwargs: dict | None = None) -> list[int | RowError]:
    """Token count of each conversation as TRL tokenizes it: the chat template rendered without a
    generation prompt, then tokenized without extra special tokens; or the RowError saying why
    the template cannot train it (its own error, or tool calls it left out)."""
    checked = [_rendered(tok, msgs, tools, kwargs) for msgs, tools in items]
    ok = [t for t in checked if isinstance(t, str)]
    ids = tok(ok, add_special_tokens=False)["input_ids"] if ok else []
    it = iter(ids)
    return [len(next(it)) if isinstance(t, str) else t for t in checked]


def _rendered(tok, msgs: list[dict], tools: list | None, kwargs: dict | None = None) -> str | RowError:
    try:
        text = tok.apply_chat_template(msgs, tools=tools or None, tokenize=False, **(kwargs or {}))
    except Exception as exc:  # noqa: BLE001 - templates raise on what they reject
        return RowError("template_error", _cut(f"{type(exc).__name__}: {exc}", 240))
    lost = _dropped_call(tok, msgs, tools)
    return RowError("tool_calls_not_rendered", lost) if lost else text


def _dropped_call(tok, msgs: list[dict], tools: list | None) -> str | None:
    """The first tool call the template leaves out of the text, or None. Each call's name is
    replaced by a marker and the marker looked for: the real name also appears in the tool
    schemas, so finding it would prove nothing."""
    where = [(i, j) for i, m in enumerate(msgs) for j in range(len(m.get("tool_calls") or []))]
    if not where:
        return None
    probe = json.loads(json.dumps(msgs))
    for i, j in where:
        probe[i]["tool_calls"][j]["function"]["name"] = f"\ue001call{i}_{j}\ue001"
    try:
        text = tok.apply_chat_template(probe, tools=tools or None, tokenize=False)
    except Exception:  # noqa: BLE001 - the real rendering worked; do not guess
        return None
    for i, j in where:
        if f"\ue001call{i}_{j}\ue001" not in text:
            name = msgs[i]["tool_calls"][j]["function"]["name"]
            return f"message {i}: the template rendered no trace of the call to '{name}'"
    return None


def _token_stats(name: str, lengths: list[int], locs: list[int], max_length: int | None,
                 errors: int) -> TokenStats | None:
    if not lengths:
        return None
    s = sorted(lengths)

    def pct(p: float) -> int:
        return s[max(0, math.ceil(p * len(s)) - 1)]
    over = [loc for loc, n in zip(locs, lengths) if max_length and n > max_length]
    return TokenStats(tokenizer=name, rows=len(s), p50=pct(0.5), p95=pct(0.95), max=s[-1],
                      mean=round(sum(s) / len(s), 1), max_length=max_length,
                      over_max_length=len(over) if max_length else None,
                      over_max_length_lines=over[:MAX_LINES], template_errors=errors)


def _empty(v: Any) -> bool:
    return v is None or (isinstance(v, (str, list, dict)) and not (v.strip() if isinstance(v, str) else v))


def _jtype(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "list"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__


# ---- inspect ---------------------------------------------------------------------------------

def _prepare(row: dict, det: Detection, drop_media: bool,
             merge_assistant_turns: bool) -> tuple[list[dict], list | None, dict[str, int]]:
    """One source row -> (messages, tools, changes made), the same for inspect and convert: the
    mapping applied, then the messages normalized for chat templates. RowError if it cannot."""
    msgs, tools = to_messages(row, det.format, det.mapping)
    msgs, changes = normalize(msgs, drop_media=drop_media, merge_assistant=merge_assistant_turns)
    return msgs, tools, changes


def _column_infos(plain: list[dict]) -> list[ColumnInfo]:
    colnames = {k: None for r in plain for k in r}
    columns = []
    for c in colnames:
        vals = [r.get(c) for r in plain]
        non_empty = [v for v in vals if not _empty(v)]
        ex = json.dumps(non_empty[0], ensure_ascii=False)[:160] if non_empty else None
        columns.append(ColumnInfo(name=c, types=sorted({_jtype(v) for v in vals}),
                                  non_empty=len(non_empty), example=ex))
    return columns


class _Dupes:
    """Duplicates by an 8-byte hash: how many, and the locations of the first ones."""

    def __init__(self):
        self.seen: set[bytes] = set()
        self.count = 0
        self.lines: list[int] = []

    def add(self, loc: int, key: bytes) -> bool:
        """Record `key`; True when it was seen before (a duplicate)."""
        h = hashlib.blake2b(key, digest_size=8).digest()
        if h not in self.seen:
            self.seen.add(h)
            return False
        self.count += 1
        if len(self.lines) < MAX_LINES:
            self.lines.append(loc)
        return True


def _dedupe_key(text: bytes, out: dict, dedupe: str) -> bytes:
    """What dedupe compares: the written row's bytes (exact) or its normalized form."""
    if dedupe == "exact":
        return text
    return json.dumps(normalized(out), ensure_ascii=False, sort_keys=True).encode("utf-8")


def _whole_row_duplicates(rows: list[tuple[int, dict]]) -> tuple[_Dupes, int, list[int]]:
    """Whole-row duplicates (every column) and empty rows of the sample."""
    dupes, empty_lines, n_empty = _Dupes(), [], 0
    for loc, r in rows:
        if all(_empty(v) for v in r.values()):
            n_empty += 1
            if len(empty_lines) < MAX_LINES:
                empty_lines.append(loc)
            continue
        dupes.add(loc, json.dumps(r, sort_keys=True, ensure_ascii=False, default=str).encode())
    return dupes, n_empty, empty_lines


class _DryRun:
    """inspect's conversion of the sample, row by row as convert does it: problems, changes,
    roles, turns, and duplicates after mapping."""

    def __init__(self, det: Detection, system_prompt: str | None, drop_media: bool,
                 merge_assistant_turns: bool, changes: _Tally):
        self.det, self.system_prompt = det, system_prompt
        self.opts = (drop_media, merge_assistant_turns)
        self.tally, self.changes, self.dupes = _Tally(), changes, _Dupes()
        self.roles: dict[str, int] = {}
        self.turns: list[int] = []
        self.usable: list[tuple[int, list[dict], list | None]] = []
        self.with_system = self.with_tools = self.trailing = 0
        self.samples: list[dict] = []

    def row(self, loc: int, r: dict) -> None:
        try:
            msgs, tools, changes = _prepare(r, self.det, *self.opts)
        except RowError as e:
            self.tally.add(e.reason, loc, e.detail)
            return
        for m in msgs:
            self.roles[str(m.get("role"))] = self.roles.get(str(m.get("role")), 0) + 1
        self.turns.append(len(msgs))
        self.with_system += any(m.get("role") == "system" for m in msgs)
        self.with_tools += bool(tools)
        probs = problems(msgs)
        for kind, detail in probs:
            self.tally.add(kind, loc, detail)
        if probs:
            return
        msgs, dropped = trim_trailing(msgs)
        self.trailing += dropped > 0
        msgs, _ = add_system(msgs, self.system_prompt)
        for kind, n in changes.items():
            self.changes.add(kind, loc, f"{n} in this row")
        out = build_row(msgs, tools, "prompt_completion")
        self.dupes.add(loc, _dedupe_key(json.dumps(out, ensure_ascii=False).encode("utf-8"), out, "exact"))
        self.usable.append((loc, msgs, tools))
        if len(self.samples) < 3:
            self.samples.append(_cut({"messages": msgs, **({"tools": tools} if tools else {})}))


def _sample_lengths(tokenizer: str, det: Detection, rows, usable, tally: _Tally,
                    max_length: int | None) -> TokenStats | None:
    """Token lengths of the sample (chat rows as TRL renders them; raw text as is)."""
    tok = load_tokenizer(tokenizer)
    lengths, locs, errors = [], [], 0
    if det.format == "text":
        col = det.mapping["text"]
        texts = [(loc, r.get(col)) for loc, r in rows if isinstance(r.get(col), str)]
        for i in range(0, len(texts), TOKEN_BATCH):
            chunk = texts[i:i + TOKEN_BATCH]
            lengths += [len(x) for x in tok([t for _, t in chunk])["input_ids"]]
            locs += [loc for loc, _ in chunk]
    else:
        for i in range(0, len(usable), TOKEN_BATCH):
            chunk = usable[i:i + TOKEN_BATCH]
            for (loc, _, _), n in zip(chunk, _lengths(tok, [(m, t) for _, m, t in chunk])):
                if isinstance(n, RowError):
                    errors += 1
                    tally.add(n.reason, loc, n.detail)
                else:
                    lengths.append(n)
                    locs.append(loc)
    return _token_stats(tokenizer, lengths, locs, max_length, errors)


DATASET_DOC = "File, folder or hub id."
MAPPING_SHORT = 'Format key -> column, e.g. {"prompt": "q", "completion": "a"}.'


def inspect_dataset(
    dataset: Annotated[str, Field(description=DATASET_DOC)],
    split: str = "train",
    sample_size: Annotated[int, Field(ge=1, le=200_000)] = 1000,
    tokenizer: Tokenizer = None,
    max_length: Annotated[Optional[int], Field(ge=1)] = None,
    system_prompt: Optional[str] = None,
    source_format: Optional[SourceFormat] = None,
    column_mapping: Annotated[Optional[dict[str, str]], Field(description=MAPPING_SHORT)] = None,
    subset: Optional[str] = None,
    drop_media: bool = False,
    merge_assistant_turns: bool = False,
) -> DatasetReport:
    """Inspect a dataset before fine-tuning: format, role-order problems, empty and duplicate rows
    (with line numbers), token lengths with a tokenizer; suggests convert_dataset's arguments.

    Detects OpenAI/TRL messages (incl. tool calls and legacy function_call), ShareGPT (incl.
    glaive function_call/observation), Alpaca, prompt/completion, question/answer-like column
    pairs and raw text. Problems: assistant first, two user turns in a row, empty content, unknown
    roles, tool results without a call, image parts. Duplicates: whole rows, and conversations
    after mapping. With a tokenizer: p50/p95/max token lengths rendered with its chat template as
    TRL does, rows over max_length, and the template's own error for rows it rejects.
    `suggested_conversion.arguments` can be passed to convert_dataset as is (add output_dir,
    system_prompt, test_size).

    Parameters:
    - dataset: JSONL/JSON/CSV/Parquet file, a directory of them, a datasets.save_to_disk
      directory in the workspace, or a hub dataset id (when online).
    - split / subset: split and config (subset) of hub datasets and directories.
    - sample_size: rows analysed, from the start. max_length (with tokenizer): rows longer than
      this are counted (your SFTConfig max_length).
    - system_prompt: the system prompt you will add on conversion (counted in token lengths).
    - source_format: overrides format detection.
    - column_mapping: format key -> column name, e.g. {"prompt": "question", "completion":
      "answer"}; a text key (prompt, completion, instruction, input, output, system) may take a
      template of columns, e.g. {"prompt": "Subject: {subject}\\n\\n{message}", "completion":
      "reply"} (literal braces doubled). Checks a mapping before converting.
    - drop_media: drop image/audio/video/file parts (the models trained here are text-only) and
      keep the text; without it such rows are skipped as media_content.
    - merge_assistant_turns: join assistant turns in a row into one (blank line between); without
      it such rows are skipped as consecutive_assistant.
    """
    src = open_source(dataset, split=split, subset=subset)
    changes = _Tally(CHANGE_HELP)
    rows = list(src.rows(limit=sample_size, on_change=changes.add))
    if not rows:
        raise UserError(f"'{dataset}' has no rows (split '{split}').", field="dataset",
                        fix="Check the file is not empty and the split name is right.")
    if max_length and not tokenizer:
        raise UserError("max_length needs a tokenizer to count tokens.", field="max_length",
                        fix="Pass tokenizer= the model (or tokenizer) directory you will train.")
    total = len(rows) if len(rows) < sample_size else src.count_rows()
    plain = [r for _, r in rows]
    det = _resolve_format(plain, source_format, column_mapping)
    whole, n_empty, empty_lines = _whole_row_duplicates(rows)
    run = _DryRun(det, system_prompt, drop_media, merge_assistant_turns, changes)
    if det.format and det.format != "text":
        for loc, r in rows:
            run.row(loc, r)
    else:
        run.samples = [_cut(r) for _, r in rows[:3]]
    tstats = _sample_lengths(tokenizer, det, rows, run.usable, run.tally, max_length) if tokenizer else None
    suggestion = _suggestion(dataset, det, split, subset, drop_media, merge_assistant_turns)
    notes = src.notes + _inspect_notes(det, run, whole, tstats, system_prompt, max_length,
                                       list({k: None for r in plain for k in r}))
    if total is not None and total > len(rows):
        notes.append(f"Analysed the first {len(rows)} of {total} rows; raise sample_size for more.")
    ts = sorted(run.turns)
    report = DatasetReport(
        dataset=dataset, source=src.kind, split=split, location_unit=src.unit, rows=total,
        rows_sampled=len(rows), columns=_column_infos(plain), detected_format=det.format,
        format_evidence=det.evidence, conversational=det.conversational, column_mapping=det.mapping,
        usable_rows=len(run.usable), roles=run.roles,
        turns={"min": ts[0], "median": statistics.median(ts), "max": ts[-1]} if ts else {},
        rows_with_system=run.with_system, rows_with_tools=run.with_tools,
        rows_with_trailing_turns=run.trailing, problems=run.tally.summaries(src.unit),
        changes=changes.summaries(src.unit), empty_rows=n_empty, empty_row_lines=empty_lines,
        duplicate_rows=whole.count, duplicate_row_lines=whole.lines,
        duplicate_conversations=run.dupes.count, duplicate_conversation_lines=run.dupes.lines,
        token_lengths=tstats, suggested_conversion=suggestion, samples=run.samples, notes=notes)
    report.summary, report.next_steps = _inspect_summary(report), _inspect_next(report)
    return report


def _inspect_summary(r: DatasetReport) -> str:
    """'Detected sharegpt in 1,000 rows (1,000 analysed): 990 usable, 7 with problems, 3
    duplicates; p95 812 tokens, 4 over max_length 1024.'"""
    fmt = r.detected_format or "no known format"
    rows = f"{r.rows:,} rows" if r.rows is not None else "the rows"
    text = (f"Detected {fmt} in {rows} ({r.rows_sampled:,} analysed): {r.usable_rows:,} usable, "
            f"{sum(p.count for p in r.problems):,} with problems, "
            # a whole-row duplicate is also a duplicate conversation: count each row once
            f"{max(r.duplicate_rows, r.duplicate_conversations):,} duplicates")
    t = r.token_lengths
    if t:
        text += f"; p95 {t.p95:,} tokens" + (f", {t.over_max_length:,} over max_length {t.max_length}"
                                              if t.over_max_length else "")
    return short(text + ".", SUMMARY_MAX_CHARS)


def _inspect_next(r: DatasetReport) -> list[str]:
    if not r.suggested_conversion:
        return ["inspect_dataset(dataset=..., column_mapping={...}) naming the prompt and reply "
                "columns (see notes)."]
    args = dict(r.suggested_conversion.arguments, output_dir="data/<name>")
    return ["convert_dataset(" + ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}"
                                           for k, v in args.items()) + ")"]


def _suggestion(dataset: str, det: Detection, split: str, subset: str | None, drop_media: bool,
                merge_assistant_turns: bool) -> SuggestedConversion | None:
    if not det.format or det.format == "text":
        return None
    args = {"dataset": dataset, "target_format": "prompt_completion", "source_format": det.format,
            "column_mapping": det.mapping}
    if split != "train":
        args["split"] = split
    if subset:
        args["subset"] = subset
    if drop_media:
        args["drop_media"] = True
    if merge_assistant_turns:
        args["merge_assistant_turns"] = True
    return SuggestedConversion(target_format="prompt_completion", source_format=det.format,
                               column_mapping=det.mapping, arguments=args)


def _inspect_notes(det: Detection, run: _DryRun, whole: _Dupes, tstats: TokenStats | None,
                   system_prompt: str | None, max_length: int | None, colnames: list[str]) -> list[str]:
    notes: list[str] = []
    usable = len(run.usable)
    if det.format and det.format != "text":
        notes.append("Target prompt_completion (conversational) so TRL trains on the completion only "
                     "(completion_only_loss); use target_format='messages' only with "
                     "assistant_only_loss and a template with {% generation %} markers.")
        if run.with_system < usable // 2 and not system_prompt:
            notes.append(f"{usable - run.with_system} of {usable} usable rows have no system "
                         "message: pass system_prompt to convert_dataset if the model should learn "
                         "under one (it is added only where none exists).")
        if run.tally.items:
            notes.append(f"{run.tally.total()} problems in the sample: convert_dataset skips such rows and "
                         "reports them (strict=true stops at the first).")
        if run.with_tools:
            notes.append(f"{run.with_tools} rows carry tools: use a model whose chat template renders "
                         "tools and tool_calls (Qwen2.5, Qwen3, Llama 3.1+, Hermes...); pass tokenizer "
                         "to check it renders them, and verify_masking shows the rendering.")
        if det.format == "question_answer" and "chosen" in det.mapping.get("completion", ""):
            notes.append("Preference data (prompt/chosen/rejected): only 'chosen' is used for SFT.")
        if det.format in ("prompt_completion", "question_answer") and det.conversational is False:
            notes.append("String prompt/completion pairs become one user turn and one assistant turn.")
    elif det.format == "text":
        notes.append("Raw text has no roles: train it as language modeling (dataset_text_field='text', "
                     "no conversion), or map columns to a chat format with column_mapping.")
    else:
        notes.append(f"Unknown format. Columns: {colnames}. Pass column_mapping, e.g. "
                     '{"prompt": "<question column>", "completion": "<answer column>"} '
                     '(question_answer) or {"messages": "<column>"}; several columns combine with a '
                     'template: {"prompt": "Subject: {subject}\\n\\n{message}", ...}.')
    if whole.count or run.dupes.count:
        notes.append(f"{whole.count} whole-row duplicates, {run.dupes.count} duplicate conversations "
                     "in the sample (convert_dataset drops the latter by default). " + DEDUPE_NOTE)
    if tstats and tstats.over_max_length:
        notes.append(f"{tstats.over_max_length} rows exceed max_length={max_length} tokens; TRL would "
                     "truncate them (losing the end of the answer). Raise max_length or pass the same "
                     "tokenizer/max_length to convert_dataset to drop them.")
    return notes


# ---- convert ---------------------------------------------------------------------------------

def _test_count(test_size: float, n: int) -> int:
    if test_size < 0:
        raise UserError("must be >= 0.", field="test_size", fix="0 (no test split), a fraction "
                        "like 0.05, or a row count like 500.")
    if test_size == 0:
        return 0
    if test_size < 1:
        k = math.ceil(test_size * n)
    elif float(test_size).is_integer():
        k = int(test_size)
    else:
        raise UserError(f"{test_size} is neither a fraction (<1) nor a whole row count.",
                        field="test_size", fix="Use e.g. 0.1 or 200.")
    if k >= n:
        raise UserError(f"asks for {k} test rows but only {n} rows were converted.", field="test_size",
                        fix="Use a smaller fraction or count, so the train split keeps rows.")
    return k


def _permutation(n: int, seed: int) -> array:
    """Fisher-Yates over an 8-byte-per-row array (no per-row Python objects kept)."""
    perm = array("Q", range(n))
    rnd = random.Random(seed).random
    for i in range(n - 1, 0, -1):
        j = int(rnd() * (i + 1))
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def _write_split(scratch: Path, offsets: array, order, dst: Path) -> None:
    with open(scratch, "rb") as src, open(dst, "wb", buffering=1 << 20) as out:
        for i in order:
            src.seek(offsets[i])
            out.write(src.read(offsets[i + 1] - offsets[i]))


def _check_convert_args(target_format: str, dedupe: str, test_size: float, tokenizer: str | None,
                        max_length: int | None) -> None:
    """Refuse bad arguments before any work."""
    if max_length and not tokenizer:
        raise UserError("max_length needs a tokenizer to count tokens.", field="max_length",
                        fix="Pass tokenizer= the model (or tokenizer) directory you will train.")
    if target_format not in ("messages", "prompt_completion"):
        raise UserError(f"unknown target format {target_format!r}.", field="target_format",
                        fix="Use 'prompt_completion' (recommended) or 'messages'.")
    if dedupe not in ("none", "exact", "normalized"):
        raise UserError(f"unknown dedupe mode {dedupe!r}.", field="dedupe",
                        fix="Use 'none', 'exact' or 'normalized'.")
    if test_size < 0 or (test_size >= 1 and not float(test_size).is_integer()):
        _test_count(test_size, 2**62)  # raises the explanatory error now


def _check_output(output_dir: str, out_path: Path, src, overwrite: bool) -> None:
    for f in src.files:
        if f == out_path or out_path in f.parents:
            raise UserError(f"'{output_dir}' contains the input file {f.name}.", field="output_dir",
                            fix="Write the converted data to a new directory.")
    if out_path.exists() and not out_path.is_dir():
        raise UserError(f"'{output_dir}' is a file.", field="output_dir",
                        fix="Give a directory path (it will hold train.jsonl/test.jsonl).")
    if out_path.exists() and any(out_path.iterdir()) and not overwrite:
        raise UserError(f"'{output_dir}' exists and is not empty.", field="output_dir",
                        fix="Choose a new output directory, or pass overwrite=true.")


def _convertible_format(src, dataset: str, split: str, limit: int | None, source_format: str | None,
                        column_mapping: dict[str, str] | None) -> Detection:
    """The format and mapping, from the first 200 rows; refused when nothing can be converted."""
    peek = [r for _, r in src.rows(limit=min(200, limit or 200))]
    if not peek:
        raise UserError(f"'{dataset}' has no rows (split '{split}').", field="dataset",
                        fix="Check the file is not empty and the split name is right.")
    det = _resolve_format(peek, source_format, column_mapping)
    if det.format is None:
        cols = list({k: None for r in peek for k in r})
        raise UserError(f"unknown dataset format; columns: {cols}.", field="dataset",
                        fix='Pass column_mapping, e.g. {"prompt": "<question column>", "completion": '
                            '"<answer column>"} or {"messages": "<conversation column>"} '
                            "(inspect_dataset shows the columns).")
    if det.format == "text":
        raise UserError("the dataset is raw text (a 'text' column, no roles): there is no prompt or "
                        "assistant turn to convert.", field="source_format",
                        fix="Train it as language modeling as is (SFTConfig dataset_text_field='text'), "
                            "or pass column_mapping naming its prompt/answer columns.")
    return det


class _Converter:
    """convert_dataset's row pipeline: prepare, check, dedupe, measure with the tokenizer, and
    append to the scratch file (only byte offsets and dedupe hashes stay in memory)."""

    def __init__(self, det: Detection, fh, *, target_format: str, system_prompt: str | None,
                 dedupe: str, tok, max_length: int | None, strict: bool, unit: str,
                 drop_media: bool, merge_assistant_turns: bool, changes: _Tally,
                 template_kwargs: dict | None = None):
        self.det, self.fh, self.target, self.system_prompt = det, fh, target_format, system_prompt
        self.template_kwargs = template_kwargs or None
        self.dedupe, self.tok, self.max_length, self.strict, self.unit = dedupe, tok, max_length, strict, unit
        self.opts = (drop_media, merge_assistant_turns)
        self.skipped, self.changes, self.dupes = _Tally(), changes, _Dupes()
        self.counts = dict(read=0, system_prompt_added=0, trailing_turns_dropped=0)
        self.offsets = array("Q", [0])
        self.samples: list[dict] = []
        self.lengths: list[int] = []
        self.length_locs: list[int] = []
        self.template_errors = 0
        self.pending: list[tuple] = []
        self.used_cols = set(mapping_columns(det.mapping))
        self.dropped_cols: dict[str, None] = {}
        self.seen_keys: set[tuple] = set()
        # The same system prompt on every row: JSON-encoded once and spliced in (see _encode).
        self.sys_json = json.dumps(system_prompt or "", ensure_ascii=False)[1:-1]

    @property
    def written(self) -> int:
        return len(self.offsets) - 1

    def bad(self, loc: int, reason: str, detail: str) -> None:
        if self.strict:
            raise UserError(f"row cannot be converted: {reason}: {detail} "
                            f"({PROBLEM_HELP.get(reason, reason)}).", field=f"{self.unit} {loc}",
                            fix="Fix or remove that row, or run with strict=false to skip bad rows "
                                "(they are listed in the report).")
        self.skipped.add(reason, loc, detail)

    def row(self, loc: int, row: dict) -> None:
        self.counts["read"] += 1
        keys = tuple(row)
        if keys not in self.seen_keys:
            self.seen_keys.add(keys)
            self.dropped_cols.update((k, None) for k in keys if k not in self.used_cols)
        try:
            msgs, tools, changes = _prepare(row, self.det, *self.opts)
            msgs, added = add_system(msgs, self.system_prompt)
            probs = problems(msgs)
            if probs:
                raise RowError(*probs[0])
        except RowError as e:
            self.bad(loc, e.reason, e.detail)
            return
        msgs, dropped = trim_trailing(msgs)
        self.counts["system_prompt_added"] += added
        self.counts["trailing_turns_dropped"] += dropped > 0
        out = build_row(msgs, tools, self.target)
        if self.template_kwargs:  # TRL passes a row's chat_template_kwargs to the template
            out["chat_template_kwargs"] = self.template_kwargs
        b = self._encode(out, msgs, added)
        if self.dedupe != "none" and self.dupes.add(loc, _dedupe_key(b, out, self.dedupe)):
            return
        item = (loc, msgs, tools, b, out, changes)
        if self.tok is None:
            self._write(item)
            return
        self.pending.append(item)
        if len(self.pending) >= TOKEN_BATCH:
            self.flush()

    def _encode(self, out: dict, msgs: list[dict], added: bool) -> bytes:
        if not added:
            return (json.dumps(out, ensure_ascii=False) + "\n").encode("utf-8")
        turns = out["messages"] if self.target == "messages" else out["prompt"]
        turns[0] = {"role": "system", "content": SENTINEL}
        text = json.dumps(out, ensure_ascii=False).replace(SENTINEL, self.sys_json, 1)
        turns[0] = msgs[0]
        return (text + "\n").encode("utf-8")

    def flush(self) -> None:
        """Measure the pending rows with the tokenizer; write those its template can train."""
        if not self.pending:
            return
        ns = _lengths(self.tok, [(m, t) for _, m, t, _, _, _ in self.pending], self.template_kwargs)
        for item, n in zip(self.pending, ns):
            loc = item[0]
            if isinstance(n, RowError):
                self.template_errors += 1
                self.bad(loc, n.reason, n.detail)
            elif self.max_length and n > self.max_length:
                self.skipped.add("too_long", loc, f"{n} tokens > max_length {self.max_length}")
            else:
                self.lengths.append(n)
                self.length_locs.append(loc)
                self._write(item)
        self.pending.clear()

    def _write(self, item: tuple) -> None:
        loc, _, _, b, out, changes = item
        self.fh.write(b)
        self.offsets.append(self.offsets[-1] + len(b))
        for kind, k in changes.items():
            self.changes.add(kind, loc, f"{k} in this row")
        if len(self.samples) < 3:
            self.samples.append(_cut(out, 500))

    def refuse_if_empty(self, dataset: str) -> None:
        if self.counts["read"] == 0:
            raise UserError(f"'{dataset}' has no rows.", field="dataset", fix="Check the file.")
        if self.written == 0:
            reasons = "; ".join(f"{s.kind}: {s.count} (e.g. {s.example})"
                                for s in self.skipped.summaries(self.unit)) or \
                f"all {self.dupes.count} rows were duplicates"
            raise UserError(f"no row could be converted ({reasons}).", field="dataset",
                            fix="Run inspect_dataset to see the problems and their lines; check "
                                "column_mapping/source_format (and the tokenizer's chat template).")


def _write_splits(tmp: Path, scratch: Path, offsets: array, n_test: int, shuffle: bool,
                  seed: int) -> dict[str, Path]:
    """train.jsonl (and test.jsonl) from the scratch file, shuffled by `seed` when asked."""
    n = len(offsets) - 1
    files = {"train": tmp / "train.jsonl"}
    if n_test == 0 and not shuffle:
        os.replace(scratch, files["train"])
        return files
    order = _permutation(n, seed) if shuffle else range(n)
    train_order = order
    if n_test:
        files["test"] = tmp / "test.jsonl"
        test_order = order[:n_test] if shuffle else range(n - n_test, n)
        train_order = order[n_test:] if shuffle else range(n - n_test)
        _write_split(scratch, offsets, test_order, files["test"])
    _write_split(scratch, offsets, train_order, files["train"])
    scratch.unlink()
    return files


def _next_steps(rel: str, n_test: int, target_format: str, n_skipped: int) -> list[str]:
    steps = [
        f"verify_masking(dataset='{rel}', tokenizer=<the model you will train>) before training.",
        f"Recipe: dataset_name: {rel} (dataset_train_split: train"
        + (", dataset_test_split: test)" if n_test else ")")
        + (" — prompt/completion: TRL masks the prompt (completion_only_loss)." if target_format ==
           "prompt_completion" else " — messages: set assistant_only_loss: true (template needs "
                                     "{% generation %}) or every token is trained."),
    ]
    if n_skipped:
        steps.append(f"{n_skipped} rows skipped: see `skipped` for reasons and lines.")
    return steps


PROGRESS_EVERY_ROWS = 1000  # a report per thousand rows; the server throttles further


def convert_dataset(
    dataset: Annotated[str, Field(description=DATASET_DOC)],
    output_dir: str,
    target_format: Annotated[Literal["messages", "prompt_completion"], Field(
        description="prompt_completion (recommended) or messages.")] = "prompt_completion",
    system_prompt: Optional[str] = None,
    column_mapping: Optional[dict[str, str]] = None,
    source_format: Optional[SourceFormat] = None,
    test_size: Annotated[float, Field(ge=0, description="Fraction (<1) or row count; 0: none.")] = 0,
    seed: int = 42,
    dedupe: Literal["none", "exact", "normalized"] = "exact",
    tokenizer: Tokenizer = None,
    max_length: Annotated[Optional[int], Field(ge=1, description="With tokenizer: skip longer rows.")] = None,
    shuffle: bool = True,
    strict: bool = False,
    overwrite: bool = False,
    limit: Annotated[Optional[int], Field(ge=1)] = None,
    split: str = "train",
    subset: Optional[str] = None,
    drop_media: bool = False,
    merge_assistant_turns: bool = False,
    chat_template_kwargs: Annotated[Optional[dict[str, Any]], Field(
        description='Column TRL passes to the template, e.g. {"enable_thinking": false}.')] = None,
) -> ConvertReport:
    """Convert a dataset to the JSONL TRL trains on (output_dir/train.jsonl, test.jsonl), skipping
    bad rows with their line numbers; written atomically. Then verify_masking on output_dir.

    prompt_completion (default) rows are {"prompt": [system?, user, ...], "completion": [last
    assistant turn]}: every turn before the last assistant turn (tool calls and tool results
    included) is prompt, so TRL trains on the final answer only. messages rows are {"messages":
    [...]} (needs assistant_only_loss to mask prompts). Tools travel in a `tools` column; tool-call
    turns get "content": "" and object arguments; legacy function_call turns become tool_calls.
    Rows with problems (role order, empty content, image parts, ...) are skipped with their line
    numbers; duplicates and rows over max_length tokens are dropped; what was changed is in
    `changes`. Streams: large files convert in constant memory. A failure leaves nothing, and
    temporary folders of interrupted earlier calls are removed. `load_dataset(output_dir)` and a
    recipe's `dataset_name: output_dir` read the result.

    Parameters:
    - dataset, split, subset, source_format, column_mapping, drop_media, merge_assistant_turns:
      as in inspect_dataset (its suggested_conversion.arguments fill them).
    - output_dir: the folder to create. system_prompt: added to rows that have none.
    - test_size: a fraction (<1) or a row count (>=1) for test.jsonl; 0 = no test split.
    - seed, shuffle: rows are shuffled (with seed) before splitting and writing.
    - dedupe: drop duplicate output rows, compared after mapping (conversation + tools, not
      unmapped columns): exact, or normalized (case, Unicode, whitespace).
    - tokenizer: render every row with its chat template (rows it rejects or renders without their
      tool calls are skipped, with the template's error) and measure token lengths.
    - strict: fail on the first bad row instead of skipping it. overwrite: replace a non-empty
      output_dir. limit: read at most this many source rows.
    - chat_template_kwargs: written on every row as the chat_template_kwargs column TRL passes to
      the template, e.g. {"enable_thinking": false} for a non-thinking Qwen3 fine-tune.
    """
    t0 = time.monotonic()
    _check_convert_args(target_format, dedupe, test_size, tokenizer, max_length)
    ws = get_workspace()
    out_path = ws.resolve(output_dir, field="output_dir")
    src = open_source(dataset, split=split, subset=subset)
    _check_output(output_dir, out_path, src, overwrite)
    det = _convertible_format(src, dataset, split, limit, source_format, column_mapping)
    tok = load_tokenizer(tokenizer) if tokenizer else None
    changes, removed = _Tally(CHANGE_HELP), []
    with ws.atomic_dir(output_dir, overwrite=overwrite, removed=removed) as tmp:
        scratch = tmp / ".rows.jsonl.tmp"
        with open(scratch, "wb", buffering=1 << 20) as fh:
            conv = _Converter(det, fh, target_format=target_format, system_prompt=system_prompt,
                              dedupe=dedupe, tok=tok, max_length=max_length, strict=strict,
                              unit=src.unit, drop_media=drop_media,
                              merge_assistant_turns=merge_assistant_turns, changes=changes,
                              template_kwargs=chat_template_kwargs)
            _stream_rows(conv, src, limit, changes)
            conv.flush()
        conv.dupes.seen.clear()
        conv.refuse_if_empty(dataset)
        n_test = _test_count(test_size, conv.written)
        files = _write_splits(tmp, scratch, conv.offsets, n_test, shuffle, seed)

    return _convert_report(_Converted(conv, src, det, files, n_test, removed, changes), out_path,
                           target_format=target_format, dedupe=dedupe, tokenizer=tokenizer,
                           max_length=max_length, t0=t0)


def _stream_rows(conv: "_Converter", src, limit: int | None, changes: "_Tally") -> None:
    """Every source row through the converter, with a progress report per thousand rows."""
    from . import progress
    total = limit  # counting rows first would read a CSV/JSON source twice
    for n, (loc, row) in enumerate(src.rows(limit=limit, on_change=changes.add), start=1):
        conv.row(loc, row)
        if n % PROGRESS_EVERY_ROWS == 0:
            progress.report(n, total, f"{n} rows read")


@dataclass
class _Converted:
    """What convert_dataset wrote, for its report."""
    conv: "_Converter"
    src: Any
    det: Detection
    files: dict[str, Path]
    n_test: int
    removed: list[str]
    changes: "_Tally"


def _convert_report(w: _Converted, out_path: Path, *, target_format: str, dedupe: str,
                    tokenizer: str | None, max_length: int | None, t0: float) -> ConvertReport:
    ws, conv, src, det, n_test = get_workspace(), w.conv, w.src, w.det, w.n_test
    n = conv.written
    rel = ws.rel(out_path)
    tstats = _token_stats(tokenizer, conv.lengths, conv.length_locs, max_length,
                          conv.template_errors) if tokenizer else None
    n_skipped = conv.skipped.total()
    notes = src.notes + [f"removed {r}: the temporary folder of an interrupted earlier call" for r in w.removed]
    if conv.dupes.count:
        notes.append(f"{conv.dupes.count} duplicates dropped, compared after mapping (dedupe="
                     f"'{dedupe}'): rows that differ only in unmapped columns count as duplicates "
                     "here, unlike inspect_dataset's whole-row duplicate_rows.")
    c = conv.counts
    split_line = f"{n - n_test:,} train" + (f" + {n_test:,} test" if n_test else "")
    summary = (f"Wrote {split_line} rows ({target_format}, from {det.format}) to {rel}; "
               f"{n_skipped:,} skipped, {conv.dupes.count:,} duplicates dropped.")
    return ConvertReport(
        summary=short(summary, SUMMARY_MAX_CHARS),
        output_dir=rel, files={k: ws.rel(out_path / v.name) for k, v in w.files.items()},
        target_format=target_format, source_format=det.format, column_mapping=det.mapping,
        location_unit=src.unit,
        counts=ConvertCounts(read=c["read"], converted=n, skipped=n_skipped,
                             duplicates=conv.dupes.count, train=n - n_test, test=n_test,
                             system_prompt_added=c["system_prompt_added"],
                             trailing_turns_dropped=c["trailing_turns_dropped"]),
        skipped=conv.skipped.summaries(src.unit), changes=w.changes.summaries(src.unit),
        duplicate_lines=conv.dupes.lines, dropped_columns=list(conv.dropped_cols),
        token_lengths=tstats, samples=conv.samples, notes=notes,
        elapsed_s=round(time.monotonic() - t0, 3),
        next_steps=_next_steps(rel, n_test, target_format, n_skipped))
