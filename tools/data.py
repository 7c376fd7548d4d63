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
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, Field

from .data_formats import (MAPPING_KEYS, PROBLEM_HELP, SOURCE_FORMATS, Detection, RowError,
                           add_system, build_row, detect, format_from_mapping, normalized, problems,
                           to_messages, trim_trailing)
from .data_io import HUB_ID, jsonable, open_source
from .hub import hub_offline, hub_unreachable
from .errors import UserError
from .template_guard import check_template
from .workspace import get_workspace

MAX_LINES = 20          # line numbers kept per problem kind
TOKEN_BATCH = 256       # rows rendered, then tokenized together
SENTINEL = "\ue000system_prompt\ue000"  # private-use chars: never escaped, never in real data
PROBLEM_HELP = {**PROBLEM_HELP,
                "template_error": "the tokenizer's chat template rejected this conversation",
                "too_long": "longer than max_length tokens (TRL would truncate it)"}

SourceFormat = Literal["messages", "sharegpt", "alpaca", "prompt_completion", "question_answer", "text"]


# ---- report models ------------------------------------------------------------------------

class ProblemSummary(BaseModel):
    """Rows with one kind of problem: how many, where (first 20), one example, what it means."""
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
    template_errors: int = 0


class SuggestedConversion(BaseModel):
    """What to pass to convert_dataset: `arguments` is ready to use as is."""
    target_format: str
    source_format: str
    column_mapping: dict[str, str]
    arguments: dict[str, Any]


class DatasetReport(BaseModel):
    """What inspect_dataset found in the dataset (or its first sample_size rows)."""
    dataset: str
    source: str = Field(description="jsonl | json | csv | parquet | hub | mixed")
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
    empty_rows: int
    empty_row_lines: list[int]
    duplicate_rows: int = Field(description="exact duplicates of an earlier sampled row.")
    duplicate_row_lines: list[int]
    token_lengths: Optional[TokenStats] = None
    suggested_conversion: Optional[SuggestedConversion] = None
    samples: list[dict[str, Any]] = Field(description="first sampled rows as convert would read them.")
    notes: list[str]


class ConvertCounts(BaseModel):
    read: int = Field(description="source rows read.")
    converted: int = Field(description="rows written (train + test).")
    skipped: int = Field(description="rows dropped for a problem or length (see `skipped`).")
    duplicates: int = Field(description="rows dropped as duplicates.")
    train: int
    test: int
    system_prompt_added: int = 0
    trailing_turns_dropped: int = Field(0, description="rows that lost turns after the last assistant turn.")


class ConvertReport(BaseModel):
    """What convert_dataset wrote, what it dropped and why."""
    output_dir: str
    files: dict[str, str] = Field(description="split -> JSONL file (workspace-relative).")
    target_format: str
    source_format: str
    column_mapping: dict[str, str]
    location_unit: Literal["line", "row"]
    counts: ConvertCounts
    skipped: list[ProblemSummary]
    duplicate_lines: list[int] = Field(description="locations of the first 20 duplicates dropped.")
    dropped_columns: list[str] = Field(description="source columns not carried into the output.")
    token_lengths: Optional[TokenStats] = None
    samples: list[dict[str, Any]] = Field(description="the first converted rows (long strings cut).")
    elapsed_s: float
    next_steps: list[str]


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
    """Counts and first locations per problem kind."""

    def __init__(self):
        self.items: dict[str, dict] = {}

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
                               example=f"{unit} {v['example']}", meaning=PROBLEM_HELP.get(k, k))
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
    absent = {k: v for k, v in column_mapping.items() if v not in cols}
    if absent:
        raise UserError(f"names columns that the dataset does not have: {absent}. Columns: {list(cols)}.",
                        field="column_mapping", fix="Map each key to one of the dataset's columns.")
    det = detect(rows)
    conv = det.conversational if det.format == fmt else None
    return Detection(fmt, dict(column_mapping), conv, "from column_mapping")


def _keys_doc(fmt: str) -> str:
    req, opt = MAPPING_KEYS[fmt]
    return "required " + "/".join(req) + (", optional " + "/".join(opt) if opt else "")


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(src: str, mtime: float):
    from .heavy import warm
    warm("transformers")  # concurrent first imports race (tools/heavy.py)
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(src)


def load_tokenizer(tokenizer: str, *, field: str = "tokenizer"):
    """A tokenizer from a workspace directory (tokenizer files or a model dir), or a hub id when
    the hub is reachable. The chat template must exist: lengths are measured with it."""
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
        tok = _cached_tokenizer(src, mtime)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"could not load a tokenizer from '{tokenizer}': {type(exc).__name__}: {exc}",
                        field=field, fix="Check the directory holds a transformers tokenizer.") from exc
    if not getattr(tok, "chat_template", None):
        raise UserError(f"the tokenizer at '{tokenizer}' has no chat template, so chat rows cannot be "
                        "measured as TRL would render them.", field=field,
                        fix="Use the instruct model's tokenizer (it carries the template), or add a "
                            "chat_template to its tokenizer_config.json.")
    check_template(tok.chat_template if isinstance(tok.chat_template, str) else None, field=field)
    return tok


def _lengths(tok, items: list[tuple[list[dict], list | None]]) -> list[int | None]:
    """Token count of each conversation as TRL tokenizes it: the chat template rendered without a
    generation prompt, then tokenized without extra special tokens. None: the template failed."""
    texts: list[str | None] = []
    for msgs, tools in items:
        try:
            texts.append(tok.apply_chat_template(msgs, tools=tools or None, tokenize=False))
        except Exception:  # noqa: BLE001 - templates raise on role orders they reject
            texts.append(None)
    ok = [t for t in texts if t is not None]
    ids = tok(ok, add_special_tokens=False)["input_ids"] if ok else []
    it = iter(ids)
    return [None if t is None else len(next(it)) for t in texts]


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

def inspect_dataset(
    dataset: Annotated[str, Field(description="JSONL/JSON/CSV/Parquet file or directory in the "
                                              "workspace, or a hub dataset id (when online).")],
    split: Annotated[str, Field(description="split to read (hub datasets and directories).")] = "train",
    sample_size: Annotated[int, Field(ge=1, le=200_000, description="rows to analyse (from the start).")] = 1000,
    tokenizer: Annotated[Optional[str], Field(
        description="model or tokenizer directory: adds token-length statistics using its chat template.")] = None,
    max_length: Annotated[Optional[int], Field(
        ge=1, description="with tokenizer: count rows longer than this (your SFTConfig max_length).")] = None,
    system_prompt: Annotated[Optional[str], Field(
        description="system prompt you will add on conversion (counted in token lengths).")] = None,
    source_format: Annotated[Optional[SourceFormat], Field(
        description="override format detection.")] = None,
    column_mapping: Annotated[Optional[dict[str, str]], Field(
        description="format key -> column name, to check a mapping before converting.")] = None,
    subset: Annotated[Optional[str], Field(description="hub dataset config (subset) name.")] = None,
) -> DatasetReport:
    """Inspect a dataset before fine-tuning: detect its format (OpenAI/TRL messages incl. tool
    calls, ShareGPT incl. glaive function_call/observation, Alpaca, prompt/completion, question/
    answer-like column pairs, raw text), and find what would break or weaken training: role-order
    problems (assistant first, two user turns in a row, empty content, unknown roles, tool results
    without a call) with line numbers, empty and duplicate rows, and, given a tokenizer, token
    lengths (p50/p95/max, rows over max_length) rendered with its chat template as TRL does.
    Call it first on any dataset. Returns a DatasetReport whose `suggested_conversion.arguments`
    can be passed to convert_dataset as is (add output_dir, system_prompt, test_size)."""
    src = open_source(dataset, split=split, subset=subset)
    rows: list[tuple[int, dict]] = []
    for loc, row in src.rows(limit=sample_size):
        rows.append((loc, jsonable(row) if src.kind in ("parquet", "hub", "mixed") else row))
    if not rows:
        raise UserError(f"'{dataset}' has no rows (split '{split}').", field="dataset",
                        fix="Check the file is not empty and the split name is right.")
    total = len(rows) if len(rows) < sample_size else src.count_rows()
    plain = [r for _, r in rows]
    det = _resolve_format(plain, source_format, column_mapping)

    # columns
    colnames: dict[str, None] = {}
    for r in plain:
        for k in r:
            colnames.setdefault(k, None)
    columns = []
    for c in colnames:
        vals = [r.get(c) for r in plain]
        types = sorted({_jtype(v) for v in vals})
        non_empty = [v for v in vals if not _empty(v)]
        ex = json.dumps(non_empty[0], ensure_ascii=False)[:160] if non_empty else None
        columns.append(ColumnInfo(name=c, types=types, non_empty=len(non_empty), example=ex))

    # empty and duplicate rows (exact, on the raw row)
    empty_lines, dup_lines, seen = [], [], set()
    n_empty = n_dup = 0
    for loc, r in rows:
        if all(_empty(v) for v in r.values()):
            n_empty += 1
            if len(empty_lines) < MAX_LINES:
                empty_lines.append(loc)
            continue
        h = hashlib.blake2b(json.dumps(r, sort_keys=True, ensure_ascii=False, default=str).encode(),
                            digest_size=8).digest()
        if h in seen:
            n_dup += 1
            if len(dup_lines) < MAX_LINES:
                dup_lines.append(loc)
        seen.add(h)

    # conversion dry run: problems, roles, turns
    tally = _Tally()
    roles: dict[str, int] = {}
    turns: list[int] = []
    usable: list[tuple[int, list[dict], list | None]] = []
    with_system = with_tools = trailing = 0
    samples: list[dict] = []
    if det.format and det.format != "text":
        for loc, r in rows:
            try:
                msgs, tools = to_messages(r, det.format, det.mapping)
            except RowError as e:
                tally.add(e.reason, loc, e.detail)
                continue
            for m in msgs:
                roles[str(m.get("role"))] = roles.get(str(m.get("role")), 0) + 1
            turns.append(len(msgs))
            with_system += any(m.get("role") == "system" for m in msgs)
            with_tools += bool(tools)
            probs = problems(msgs)
            for kind, detail in probs:
                tally.add(kind, loc, detail)
            if probs:
                continue
            msgs, dropped = trim_trailing(msgs)
            trailing += dropped > 0
            msgs, _ = add_system(msgs, system_prompt)
            usable.append((loc, msgs, tools))
            if len(samples) < 3:
                samples.append(_cut({"messages": msgs, **({"tools": tools} if tools else {})}))
    elif det.format == "text":
        samples = [_cut(r) for _, r in rows[:3]]
    else:
        samples = [_cut(r) for _, r in rows[:3]]

    # token lengths
    tstats = None
    if tokenizer:
        tok = load_tokenizer(tokenizer)
        lengths, locs, errors = [], [], 0
        if det.format == "text":
            col = det.mapping["text"]
            texts = [(loc, r.get(col)) for loc, r in rows if isinstance(r.get(col), str)]
            for i in range(0, len(texts), TOKEN_BATCH):
                chunk = texts[i:i + TOKEN_BATCH]
                ids = tok([t for _, t in chunk])["input_ids"]
                lengths += [len(x) for x in ids]
                locs += [loc for loc, _ in chunk]
        else:
            for i in range(0, len(usable), TOKEN_BATCH):
                chunk = usable[i:i + TOKEN_BATCH]
                for (loc, msgs, _), n in zip(chunk, _lengths(tok, [(m, t) for _, m, t in chunk])):
                    if n is None:
                        errors += 1
                        tally.add("template_error", loc, "the chat template raised on this conversation")
                    else:
                        lengths.append(n)
                        locs.append(loc)
        tstats = _token_stats(tokenizer, lengths, locs, max_length, errors)
    elif max_length:
        raise UserError("max_length needs a tokenizer to count tokens.", field="max_length",
                        fix="Pass tokenizer= the model (or tokenizer) directory you will train.")

    # suggestion and notes
    notes: list[str] = []
    suggestion = None
    if det.format and det.format != "text":
        args = {"dataset": dataset, "target_format": "prompt_completion", "source_format": det.format,
                "column_mapping": det.mapping}
        if split != "train":
            args["split"] = split
        if subset:
            args["subset"] = subset
        suggestion = SuggestedConversion(target_format="prompt_completion", source_format=det.format,
                                         column_mapping=det.mapping, arguments=args)
        notes.append("Target prompt_completion (conversational) so TRL trains on the completion only "
                     "(completion_only_loss); use target_format='messages' only with "
                     "assistant_only_loss and a template with {% generation %} markers.")
        if with_system < len(usable) // 2 and not system_prompt:
            notes.append(f"{len(usable) - with_system} of {len(usable)} usable rows have no system "
                         "message: pass system_prompt to convert_dataset if the model should learn "
                         "under one (it is added only where none exists).")
        if tally.items:
            notes.append(f"{tally.total()} problems in the sample: convert_dataset skips such rows and "
                         "reports them (strict=true stops at the first).")
        if with_tools:
            notes.append(f"{with_tools} rows carry tools: use a model whose chat template renders "
                         "tools and tool_calls (Qwen2.5, Llama 3.1+, Hermes...); verify_masking shows "
                         "the rendering.")
        if det.format == "question_answer" and "chosen" in det.mapping.get("completion", ""):
            notes.append("Preference data (prompt/chosen/rejected): only 'chosen' is used for SFT.")
        if det.format in ("prompt_completion", "question_answer") and det.conversational is False:
            notes.append("String prompt/completion pairs become one user turn and one assistant turn.")
    elif det.format == "text":
        notes.append("Raw text has no roles: train it as language modeling (dataset_text_field='text', "
                     "no conversion), or map columns to a chat format with column_mapping.")
    else:
        notes.append(f"Unknown format. Columns: {list(colnames)}. Pass column_mapping, e.g. "
                     '{"prompt": "<question column>", "completion": "<answer column>"} '
                     '(question_answer) or {"messages": "<column>"}.')
    if n_dup:
        notes.append(f"{n_dup} exact duplicate rows in the sample: convert_dataset dedupes by default.")
    if tstats and tstats.over_max_length:
        notes.append(f"{tstats.over_max_length} rows exceed max_length={max_length} tokens; TRL would "
                     "truncate them (losing the end of the answer). Raise max_length or pass the same "
                     "tokenizer/max_length to convert_dataset to drop them.")
    if total is not None and total > len(rows):
        notes.append(f"Analysed the first {len(rows)} of {total} rows; raise sample_size for more.")

    ts = sorted(turns)
    return DatasetReport(
        dataset=dataset, source=src.kind, split=split, location_unit=src.unit, rows=total,
        rows_sampled=len(rows), columns=columns, detected_format=det.format,
        format_evidence=det.evidence, conversational=det.conversational, column_mapping=det.mapping,
        usable_rows=len(usable), roles=roles,
        turns={"min": ts[0], "median": statistics.median(ts), "max": ts[-1]} if ts else {},
        rows_with_system=with_system, rows_with_tools=with_tools, rows_with_trailing_turns=trailing,
        problems=tally.summaries(src.unit), empty_rows=n_empty, empty_row_lines=empty_lines,
        duplicate_rows=n_dup, duplicate_row_lines=dup_lines, token_lengths=tstats,
        suggested_conversion=suggestion, samples=samples, notes=notes)


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


def convert_dataset(
    dataset: Annotated[str, Field(description="JSONL/JSON/CSV/Parquet file or directory in the "
                                              "workspace, or a hub dataset id (when online).")],
    output_dir: Annotated[str, Field(description="directory to create (workspace-relative); gets "
                                                 "train.jsonl and, with test_size, test.jsonl.")],
    target_format: Annotated[Literal["messages", "prompt_completion"], Field(
        description="prompt_completion (conversational; completion-only loss, recommended) or "
                    "messages (whole conversation; needs assistant_only_loss to mask prompts).")] = "prompt_completion",
    system_prompt: Annotated[Optional[str], Field(
        description="system message added to rows that have none.")] = None,
    column_mapping: Annotated[Optional[dict[str, str]], Field(
        description="format key -> column name, e.g. {\"prompt\": \"question\", \"completion\": "
                    "\"answer\"}; default: the detected mapping (see inspect_dataset).")] = None,
    source_format: Annotated[Optional[SourceFormat], Field(
        description="source format; default: auto-detect.")] = None,
    test_size: Annotated[float, Field(ge=0, description="test split: a fraction (<1) or a row count "
                                                        "(>=1); 0 = no test split.")] = 0,
    seed: Annotated[int, Field(description="seed for shuffle and split.")] = 42,
    dedupe: Annotated[Literal["none", "exact", "normalized"], Field(
        description="drop duplicate output rows: exact, or normalized (case, Unicode, whitespace).")] = "exact",
    tokenizer: Annotated[Optional[str], Field(
        description="model or tokenizer directory: measure token lengths with its chat template.")] = None,
    max_length: Annotated[Optional[int], Field(
        ge=1, description="with tokenizer: skip rows longer than this many tokens.")] = None,
    shuffle: Annotated[bool, Field(description="shuffle rows before splitting and writing.")] = True,
    strict: Annotated[bool, Field(description="fail on the first bad row instead of skipping it.")] = False,
    overwrite: Annotated[bool, Field(description="replace a non-empty output_dir.")] = False,
    limit: Annotated[Optional[int], Field(ge=1, description="read at most this many source rows.")] = None,
    split: Annotated[str, Field(description="source split (hub datasets and directories).")] = "train",
    subset: Annotated[Optional[str], Field(description="hub dataset config (subset) name.")] = None,
) -> ConvertReport:
    """Convert a dataset into the JSONL TRL's SFTTrainer trains on, and report what happened.
    Writes the directory output_dir with train.jsonl (and test.jsonl when test_size > 0), one JSON
    object per line; `load_dataset(output_dir)` and a recipe's `dataset_name: output_dir` read it.
    prompt_completion (default) rows are {"prompt": [system?, user, ...], "completion":
    [last assistant turn]}: every turn before the last assistant turn (tool calls and tool results
    included) is prompt, so TRL trains on the final answer only. messages rows are {"messages":
    [...]}. Tools travel in a `tools` column. Rows with problems (role order, empty content, ...)
    are skipped with their line numbers; duplicates and rows over max_length tokens are dropped.
    Streams: large files convert in constant memory. Written atomically: a failure leaves nothing.
    Call inspect_dataset first; then verify_masking on the output. Returns a ConvertReport."""
    t0 = time.monotonic()
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
        _test_count(test_size, 2**62)  # raises the explanatory error now, before any work
    ws = get_workspace()
    out_path = ws.resolve(output_dir, field="output_dir")
    src = open_source(dataset, split=split, subset=subset)
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

    def coerce(row):
        return jsonable(row) if src.kind in ("parquet", "hub", "mixed") else row

    peek = [coerce(r) for _, r in src.rows(limit=min(200, limit or 200))]
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
    tok = load_tokenizer(tokenizer) if tokenizer else None
    used_cols = set(det.mapping.values())

    skipped, dup_lines = _Tally(), []
    counts = dict(read=0, duplicates=0, system_prompt_added=0, trailing_turns_dropped=0)
    seen: set[bytes] = set()
    offsets = array("Q", [0])
    samples: list[dict] = []
    lengths: list[int] = []
    length_locs: list[int] = []
    template_errors = 0
    dropped_cols: dict[str, None] = {}
    seen_keys: set[tuple] = set()
    sys_placeholder = {"role": "system", "content": SENTINEL}
    sys_json = json.dumps(system_prompt or "", ensure_ascii=False)[1:-1]
    unit = src.unit

    def bad(loc: int, reason: str, detail: str):
        if strict:
            raise UserError(f"row cannot be converted: {reason}: {detail} "
                            f"({PROBLEM_HELP.get(reason, reason)}).", field=f"{unit} {loc}",
                            fix="Fix or remove that row, or run with strict=false to skip bad rows "
                                "(they are listed in the report).")
        skipped.add(reason, loc, detail)

    with ws.atomic_dir(output_dir, overwrite=overwrite) as tmp:
        scratch = tmp / ".rows.jsonl.tmp"
        pending: list[tuple[int, list, Any, bytes, dict]] = []
        with open(scratch, "wb", buffering=1 << 20) as fh:
            pos = 0

            def write(b: bytes, out: dict):
                nonlocal pos
                fh.write(b)
                pos += len(b)
                offsets.append(pos)
                if len(samples) < 3:
                    samples.append(_cut(out, 500))

            def flush():
                nonlocal template_errors
                ns = _lengths(tok, [(m, t) for _, m, t, _, _ in pending])
                for (loc, _, _, b, out), n in zip(pending, ns):
                    if n is None:
                        template_errors += 1
                        bad(loc, "template_error", "the tokenizer's chat template raised")
                    elif max_length and n > max_length:
                        skipped.add("too_long", loc, f"{n} tokens > max_length {max_length}")
                    else:
                        lengths.append(n)
                        length_locs.append(loc)
                        write(b, out)
                pending.clear()

            for loc, row in src.rows(limit=limit):
                counts["read"] += 1
                row = coerce(row)
                keys = tuple(row)
                if keys not in seen_keys:
                    seen_keys.add(keys)
                    dropped_cols.update((k, None) for k in keys if k not in used_cols)
                try:
                    msgs, tools = to_messages(row, det.format, det.mapping)
                    msgs, added = add_system(msgs, system_prompt)
                    probs = problems(msgs)
                    if probs:
                        raise RowError(*probs[0])
                except RowError as e:
                    bad(loc, e.reason, e.detail)
                    continue
                msgs, dropped = trim_trailing(msgs)
                counts["system_prompt_added"] += added
                counts["trailing_turns_dropped"] += dropped > 0
                out = build_row(msgs, tools, target_format)
                if added:  # the same system prompt on every row: encode it once, splice it in
                    turns = out["messages"] if target_format == "messages" else out["prompt"]
                    turns[0] = sys_placeholder
                    text = json.dumps(out, ensure_ascii=False).replace(SENTINEL, sys_json, 1)
                    turns[0] = msgs[0]
                else:
                    text = json.dumps(out, ensure_ascii=False)
                b = (text + "\n").encode("utf-8")
                if dedupe != "none":
                    key_src = b if dedupe == "exact" else json.dumps(
                        normalized(out), ensure_ascii=False, sort_keys=True).encode("utf-8")
                    h = hashlib.blake2b(key_src, digest_size=8).digest()
                    if h in seen:
                        counts["duplicates"] += 1
                        if len(dup_lines) < MAX_LINES:
                            dup_lines.append(loc)
                        continue
                    seen.add(h)
                if tok is not None:
                    pending.append((loc, msgs, tools, b, out))
                    if len(pending) >= TOKEN_BATCH:
                        flush()
                else:
                    write(b, out)
            if pending:
                flush()
        seen.clear()
        n = len(offsets) - 1
        if counts["read"] == 0:
            raise UserError(f"'{dataset}' has no rows.", field="dataset", fix="Check the file.")
        if n == 0:
            reasons = ", ".join(f"{s.kind}: {s.count}" for s in skipped.summaries(unit)) or \
                f"all {counts['duplicates']} rows were duplicates"
            raise UserError(f"no row could be converted ({reasons}).", field="dataset",
                            fix="Run inspect_dataset to see the problems and their lines; check "
                                "column_mapping/source_format.")
        n_test = _test_count(test_size, n)
        files = {"train": tmp / "train.jsonl"}
        if n_test == 0 and not shuffle:
            os.replace(scratch, files["train"])
        else:
            order = _permutation(n, seed) if shuffle else range(n)
            if n_test:
                files["test"] = tmp / "test.jsonl"
                test_order = order[:n_test] if shuffle else range(n - n_test, n)
                train_order = order[n_test:] if shuffle else range(n - n_test)
                _write_split(scratch, offsets, test_order, files["test"])
            else:
                train_order = order
            _write_split(scratch, offsets, train_order, files["train"])
            scratch.unlink()

    rel = ws.rel(out_path)
    tstats = _token_stats(tokenizer, lengths, length_locs, max_length, template_errors) if tok else None
    n_skipped = skipped.total()
    next_steps = [
        f"verify_masking on {rel}/train.jsonl with the model's tokenizer before training.",
        f"Recipe: dataset_name: {rel} (dataset_train_split: train"
        + (", dataset_test_split: test)" if n_test else ")")
        + (" — prompt/completion: TRL masks the prompt (completion_only_loss)." if target_format ==
           "prompt_completion" else " — messages: set assistant_only_loss: true (template needs "
                                     "{% generation %}) or every token is trained."),
    ]
    if n_skipped:
        next_steps.append(f"{n_skipped} rows skipped: see `skipped` for reasons and lines.")
    return ConvertReport(
        output_dir=rel, files={k: ws.rel(out_path / v.name) for k, v in files.items()},
        target_format=target_format, source_format=det.format, column_mapping=det.mapping,
        location_unit=unit,
        counts=ConvertCounts(read=counts["read"], converted=n, skipped=n_skipped,
                             duplicates=counts["duplicates"], train=n - n_test, test=n_test,
                             system_prompt_added=counts["system_prompt_added"],
                             trailing_turns_dropped=counts["trailing_turns_dropped"]),
        skipped=skipped.summaries(unit), duplicate_lines=dup_lines,
        dropped_columns=list(dropped_cols), token_lengths=tstats, samples=samples,
        elapsed_s=round(time.monotonic() - t0, 3), next_steps=next_steps)
