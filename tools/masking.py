"""verify_masking: prove what TRL's SFTTrainer will train on, token by token, before training.

The check runs TRL's own dataset preparation and collator (see `tools.masking_checks`), then
attributes each token to a role and checks the classic masking failures. Reports are saved
under `<workspace>/reports/masking/`; `find_masking_report` finds the newest one for exactly
the same inputs (content hashes of the dataset files, the tokenizer files and the template).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, Field

from .errors import UserError
from .params import (AssistantOnlyLoss, ChatTemplate, CompletionOnlyLoss, MaxLength, Packing,
                     Tokenizer)
from .results import SUMMARY_MAX_CHARS, ToolResult
from .template_guard import check_template
from .workspace import get_workspace, short

REPORT_DIR = "reports/masking"
DATA_EXT = (".jsonl", ".ndjson", ".json", ".parquet")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
TRUNCATION_FAIL_SHARE = 0.05  # more than this share of examples cut/removed -> fail


# --------------------------------------------------------------------------------------------
# Report models
# --------------------------------------------------------------------------------------------
class Reason(BaseModel):
    severity: Literal["fail", "warn", "info"]
    code: str
    message: str
    fix: Optional[str] = None
    rows: list[int] = Field(default=[], description="0-based rows of the split affected (first 20).")


class Spread(BaseModel):
    mean: float
    min: float
    max: float


class RoleTokens(BaseModel):
    tokens: int
    trained: int


class TruncationStats(BaseModel):
    max_length: Optional[int]
    longest_tokens: int = Field(description="longest checked example before truncation.")
    examples_over_max_length: int
    completions_cut: int = Field(description="examples that lose trained tokens but keep some.")
    examples_removed: int = Field(description="examples left with no trained token (TRL drops "
                                              "them, or packing keeps them with zero loss).")


class ExampleView(BaseModel):
    row: int = Field(description="0-based row in the split.")
    tokens: int
    trained_tokens: int
    text: str = Field(description="decoded training sequence; trained spans between [[ and ]].")


class MaskingSettings(BaseModel):
    dataset: str
    tokenizer: str
    split: str
    completion_only_loss: Optional[bool] = Field(description="as given (None = TRL decides).")
    completion_only_loss_effective: Optional[bool] = Field(
        default=None, description="what SFTTrainer decided for this dataset.")
    assistant_only_loss: bool
    packing: bool
    packing_strategy: str = "bfd"
    padding_free: Optional[bool] = None
    max_length: Optional[int]
    chat_template: str = Field(description="'tokenizer' (its own), a path, or 'literal'.")
    training_template: str = Field(
        default="same", description="'same', or 'trl_training_variant' when TRL swaps in its "
                                    "{% generation %} template for assistant_only_loss.")


class MaskingReport(ToolResult):
    """What SFTTrainer will train on, with a verdict and the evidence behind it."""
    verdict: Literal["pass", "warn", "fail"]
    reasons: list[Reason]
    key: str = Field(description="identifies the inputs: dataset, tokenizer and template "
                                 "content hashes plus the masking settings.")
    report_path: str
    created_at: str
    settings: MaskingSettings
    dataset_format: str = Field(description="messages | prompt_completion (conversational) | "
                                            "prompt_completion_text | text")
    dataset_rows: int
    examples_checked: int
    trained_share: Optional[Spread] = Field(default=None,
                                            description="share of tokens trained per example.")
    tokens_per_example: Optional[Spread] = Field(default=None, description="before truncation, "
                                                 "over rows_length_checked rows.")
    rows_length_checked: int = Field(default=0, description="rows whose length and truncation "
                                     "were counted: every row of the split (the masking checks "
                                     "use the sample).")
    trained_by_role: dict[str, RoleTokens] = Field(
        default={}, description="tokens and trained tokens by role: system/user/assistant/tool "
                                "content, assistant_context (earlier replies inside a prompt), "
                                "template (headers, end-of-turn markers, BOS), text.")
    assistant_turns: int = 0
    assistant_turns_fully_trained: int = 0
    all_assistant_turns_trained: Optional[bool] = None
    end_of_turn_trained: Optional[bool] = Field(
        default=None, description="every assistant turn's end-of-turn/EOS token is trained.")
    prompt_tokens_trained: int = Field(
        default=0, description="system/user/tool/assistant_context content tokens trained.")
    no_prompt_tokens_trained: Optional[bool] = None
    template_matches_inference: Optional[bool] = Field(
        default=None, description="the add_generation_prompt=True rendering used at inference "
                                  "is a token prefix of every trained turn.")
    template_mismatch_examples: int = 0
    double_bos_examples: int = 0
    pad_token: Optional[str] = None
    eos_token: Optional[str] = None
    pad_equals_eos: Optional[bool] = None
    eos_masked_examples: int = 0
    stop_tokens: list[str] = []
    truncation: Optional[TruncationStats] = None
    zero_trained_examples: int = 0
    examples: list[ExampleView] = []
    trl_warnings: list[str] = []
    dataset_hash: str = ""
    tokenizer_hash: str = ""
    template_hash: str = ""


# --------------------------------------------------------------------------------------------
# Inputs: hashing, loading
# --------------------------------------------------------------------------------------------
def _sha256_files(files: list[Path], root: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root) if f != root else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def dataset_hash(path: Path) -> str:
    """Content hash of a dataset file, or of every data file in a dataset directory."""
    if path.is_file():
        return _sha256_files([path], path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DATA_EXT
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    return _sha256_files(files, path)


def tokenizer_hash(path: Path) -> str:
    files = sorted(path / n for n in TOKENIZER_FILES if (path / n).is_file())
    return _sha256_files(files, path)


def template_hash(text: Optional[str]) -> str:
    return hashlib.sha256((text or "").encode("utf-8")).hexdigest()


def _make_key(d_hash, t_hash, tpl_hash, split, completion_only_loss, assistant_only_loss,
              packing, max_length) -> str:
    blob = json.dumps({"dataset": d_hash, "tokenizer": t_hash, "template": tpl_hash,
                       "split": split, "completion_only_loss": completion_only_loss,
                       "assistant_only_loss": bool(assistant_only_loss),
                       "packing": bool(packing), "max_length": max_length}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _template_text(chat_template: Optional[str]) -> tuple[Optional[str], str]:
    """(template text, label): a .jinja path inside the workspace, `trl:<name>` (copied into
    the workspace, the label is its path), or literal template text."""
    from . import chat_templates
    if chat_template is None or not str(chat_template).strip():
        return None, "tokenizer"
    s = str(chat_template)
    if "{%" in s or "{{" in s:
        return s, "literal"
    if chat_templates.is_ref(s):
        s = chat_templates.materialize(s, field="chat_template")
    ws = get_workspace()
    p = ws.resolve(s, field="chat_template", must_exist=True, kind="file")
    try:
        return p.read_text(encoding="utf-8"), ws.rel(p)
    except UnicodeDecodeError as exc:
        raise UserError(f"'{s}' is not a UTF-8 text file.", field="chat_template",
                        fix="Give a .jinja chat template file or the template text.") from exc


def _split_file(path: Path, split: str) -> Path:
    return get_workspace().resolve(_find_split_file(path, split), field="dataset", kind="file")


def _find_split_file(path: Path, split: str) -> Path:
    """The data file of `split` in a converted dataset directory (or the file itself)."""
    if path.is_file():
        if path.suffix.lower() not in DATA_EXT:
            raise UserError(f"'{path.name}' is not a .jsonl/.json/.parquet file.", field="dataset",
                            fix="Give a converted dataset directory or a .jsonl/.json file.")
        return path
    for ext in DATA_EXT:
        for cand in (path / f"{split}{ext}", path / "data" / f"{split}{ext}"):
            if cand.is_file():
                return cand
    found = sorted(p.stem for p in path.iterdir() if p.is_file() and p.suffix.lower() in DATA_EXT)
    raise UserError(f"no '{split}' split in {path} (found: {', '.join(found) or 'no data files'}).",
                    field="split" if found else "dataset",
                    fix=f"Use split one of {found}." if found else
                    "Give the directory convert_dataset wrote (train.jsonl, test.jsonl).")


def _read_rows(file: Path) -> list[dict]:
    """All rows of a split file (JSONL, JSON array or lines, Parquet), read by the one dataset
    reader (tools.data_io): bad JSON, bad UTF-8 and non-object rows name their line."""
    from .data_io import open_source
    try:
        return [row for _, row in open_source(str(file), field_name="dataset").rows()]
    except UserError as exc:  # the reader names the line; these tools' argument is `dataset`
        if exc.field in (None, "dataset"):
            raise
        raise UserError(f"{file.name} {exc.field}: {exc.message}", field="dataset", fix=exc.fix) from exc


def _sample(rows: list[dict], k: int) -> tuple[list[int], list[dict]]:
    """Up to k rows spread evenly over the split (always the first; deterministic)."""
    n = len(rows)
    if n <= k:
        idx = list(range(n))
    elif k == 1:
        idx = [0]
    else:
        idx = sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})
    return idx, [rows[i] for i in idx]


def _detect_format(row: dict) -> str:
    """The dataset type SFTTrainer sees in a converted row (TRL's column names, exactly). Not
    data_formats.detect: that one guesses *source* formats (ShareGPT, Alpaca, column pairs), which
    must go through convert_dataset before they can be verified."""
    if "messages" in row or "conversations" in row:
        return "messages"
    if "prompt" in row and "completion" in row:
        return "prompt_completion" if isinstance(row["prompt"], list) else "prompt_completion_text"
    if "text" in row:
        return "text"
    raise UserError(f"rows have columns {sorted(row)}, none that SFTTrainer trains on "
                    "(messages, prompt+completion, or text).", field="dataset",
                    fix="Run convert_dataset first (target_format=prompt_completion or messages).")


def _load_tokenizer(path: Path):
    """A fresh tokenizer (its chat_template may be replaced) by the one loader, tools.data."""
    from .data import load_tokenizer
    return load_tokenizer(get_workspace().rel(path), fresh=True, require_template=False)


def _stop_ids(tok, tok_dir: Path) -> set[int]:
    ids = set()
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    gc = tok_dir / "generation_config.json"
    if gc.is_file():
        try:
            eos = json.loads(gc.read_text()).get("eos_token_id")
            ids.update([eos] if isinstance(eos, int) else [e for e in eos or [] if isinstance(e, int)])
        except (ValueError, OSError):
            pass
    return ids


# --------------------------------------------------------------------------------------------
# The tool
# --------------------------------------------------------------------------------------------
def verify_masking(
    dataset: Optional[str] = None,
    tokenizer: Tokenizer = None,
    completion_only_loss: CompletionOnlyLoss = None,
    assistant_only_loss: AssistantOnlyLoss = False,
    packing: Packing = False,
    max_length: MaxLength = 1024,
    chat_template: ChatTemplate = None,
    split: str = "train",
    sample_size: Annotated[int, Field(ge=1, le=2000)] = 64,
    show_examples: Annotated[int, Field(ge=0, le=20)] = 3,
    recipe: Annotated[Optional[str], Field(
        description="Recipe YAML: its dataset, model and masking settings.")] = None,
) -> MaskingReport:
    """Prove which tokens SFTTrainer will train on, with TRL's own preparation: pass/warn/fail
    with fixes. Call after convert_dataset; launch_training needs a passing report.

    Runs TRL's own SFT dataset preparation and collator on a sample (tokenisation, chat
    template, completion/assistant-only masks, truncation, packing), then attributes every
    token to system/user/assistant/tool/template. Returns verdict pass/warn/fail with reasons
    and fixes (e.g. messages data trains user turns, EOS never trained, template differs from
    inference, truncation cuts replies, missing {% generation %} markers, reasoning stripped by
    the template), the share of tokens trained, trained tokens per role, decoded examples with
    trained spans in [[...]], and the path of the saved JSON report.

    Parameters:
    - dataset: converted dataset directory (train.jsonl/test.jsonl) or a .jsonl/.json file in the
      workspace; split picks the file of a directory. tokenizer: model or tokenizer directory.
    - completion_only_loss: None = TRL's default (on for prompt/completion data).
      assistant_only_loss needs {% generation %} markers (TRL swaps in its training variant of a
      shipped template). packing: BFD, padding-free. max_length: None = no truncation.
    - chat_template: a .jinja file in the workspace, 'trl:<name>' (a template TRL ships, e.g.
      trl:qwen3_training.jinja, copied to chat_templates/), or template text; it replaces the
      tokenizer's template as chat_template_path does.
    - sample_size: rows whose masking is checked, spread over the split (lengths and truncation
      are counted on every row). show_examples: decoded examples in the report.
    - recipe: a recipe YAML whose dataset, model (tokenizer), chat_template_path and masking
      settings replace the arguments, so the report is the one launch_training looks for.
    """
    from .progress import report
    if recipe is not None:
        dataset, tokenizer, split, chat_template, completion_only_loss, assistant_only_loss, \
            packing, max_length = _from_recipe(recipe, dataset, tokenizer)
    if not dataset or not tokenizer:
        raise UserError("needs a dataset and a tokenizer.", field="dataset" if not dataset else "tokenizer",
                        fix="Pass dataset= and tokenizer=, or recipe=<the recipe YAML>.")
    report(0, 4, "loading the dataset, tokenizer and template")
    inp = _load(dataset, tokenizer, chat_template, split, sample_size, packing, max_length)
    report(1, 4, f"TRL prepares {len(inp.rows)} sampled rows and tokenises all {len(inp.all_rows)}")
    base = _base_fields(inp, completion_only_loss, assistant_only_loss, packing, max_length)
    reasons: list[Reason] = []
    if len(inp.rows) < len(inp.all_rows):
        reasons.append(Reason(severity="info", code="sampled",
                              message=f"masking checked on {len(inp.rows)} of {len(inp.all_rows)} "
                                      "rows, spread evenly over the split; lengths and "
                                      "truncation counted on every row.",
                              fix="Raise sample_size to check the masking of more rows."))
    settings = dict(completion_only_loss=completion_only_loss,
                    assistant_only_loss=assistant_only_loss, packing=packing, max_length=max_length)
    run = _run(inp, base, reasons, settings)
    report(2, 4, "TRL prepared the rows")
    if run is None:
        return _finish(base, reasons, zero=base.pop("zero_trained_examples_extra", 0))
    s: MaskingSettings = base["settings"]
    s.completion_only_loss_effective = run.completion_only_loss
    s.padding_free = run.padding_free
    if run.training_template is not None:
        s.training_template = "trl_training_variant"
        reasons.append(Reason(
            severity="info", code="training_template_swapped",
            message="assistant_only_loss: the chat template has no {% generation %} markers, so "
                    "TRL tokenises with its own training variant of this template. The checks "
                    "below compare it with the inference template."))
    from .masking_analysis import analyse
    report(3, 4, "attributing every token to its message")
    tpl = inp.tok.chat_template if isinstance(inp.tok.chat_template, str) else None
    fields = analyse(base, reasons, run, inp.tok, inp.idx, inp.fmt,
                     _stop_ids(inp.tok, inp.t_path), show_examples, tpl)
    out = _finish(fields, reasons)
    report(4, 4, f"verdict {out.verdict}")
    return out


def read_recipe(recipe: str) -> dict:
    """A recipe YAML named by a verify_* tool, inside the workspace."""
    from .runs import read_yaml_mapping
    return read_yaml_mapping(get_workspace().resolve(recipe, field="recipe", must_exist=True, kind="file"))


def pick_recipe_input(tok: Optional[str], inputs: list[tuple[str, str]], dataset: Optional[str],
                      tokenizer: Optional[str]) -> tuple[str, str]:
    """The (dataset, split) of a recipe a verify_* call checks; a tokenizer given must be the
    recipe's model (training loads its tokenizer from it)."""
    if not inputs or not tok:
        raise UserError("names no dataset or no model.", field="recipe",
                        fix="Set dataset_name (or datasets:) and model_name_or_path in the recipe.")
    if tokenizer is not None and tokenizer != tok:
        raise UserError(f"'{short(tokenizer)}' is not the recipe's model '{short(tok)}', which "
                        "training loads its tokenizer from.", field="tokenizer",
                        fix="Leave tokenizer out when recipe is given.")
    picked = [x for x in inputs if dataset is None or x[0] == dataset]
    if len(picked) != 1:
        names = ", ".join(d for d, _ in inputs)
        raise UserError(("the recipe trains on several datasets" if dataset is None else
                         f"'{short(dataset)}' is not one of the recipe's datasets")
                        + f" ({names}).", field="dataset",
                        fix="Pass dataset= one of them, once per dataset.")
    return picked[0]


def _from_recipe(recipe: str, dataset: Optional[str], tokenizer: Optional[str]) -> tuple:
    """verify_masking's inputs read from a recipe, the way launch_training reads them."""
    rm = recipe_masking(read_recipe(recipe))
    ds, split = pick_recipe_input(rm.tokenizer, rm.inputs, dataset, tokenizer)
    st = rm.settings
    return (ds, rm.tokenizer, split, st["chat_template_path"], st["completion_only_loss"],
            st["assistant_only_loss"], st["packing"], st["max_length"])


@dataclass
class _Inputs:
    """The resolved inputs of one verify_masking call."""
    d_path: Path
    t_path: Path
    file: Path
    tok: Any
    tpl_text: Optional[str]
    tpl_label: str
    split: str
    all_rows: list[dict]
    idx: list[int]           # split row number of each sampled row
    rows: list[dict]
    fmt: str


def _load(dataset, tokenizer, chat_template, split, sample_size, packing, max_length) -> _Inputs:
    ws = get_workspace()
    d_path = ws.resolve(dataset, field="dataset", must_exist=True)
    t_path = ws.resolve(tokenizer, field="tokenizer", must_exist=True, kind="dir")
    tpl_text, tpl_label = _template_text(chat_template)
    if packing and max_length is None:
        raise UserError("packing needs a max_length.", field="max_length",
                        fix="Set max_length (e.g. 1024 or 2048) or packing=false.")
    file = _split_file(d_path, split)
    all_rows = _read_rows(file)
    if not all_rows:
        raise UserError(f"{file.name} has no rows.", field="dataset",
                        fix="Check the file; convert_dataset writes one JSON object per line.")
    idx, rows = _sample(all_rows, sample_size)
    fmt = _detect_format(rows[0])
    tok = _load_tokenizer(t_path)
    if tpl_text is not None:
        tok.chat_template = tpl_text
    check_template(tok.chat_template if isinstance(tok.chat_template, str) else None,
                   field="chat_template" if tpl_text is not None else "tokenizer")
    if fmt in ("messages", "prompt_completion") and not tok.chat_template:
        raise UserError(f"the tokenizer in {ws.rel(t_path)} has no chat template, and the data is "
                        "conversational.", field="chat_template",
                        fix="Pass chat_template: a .jinja file (e.g. the Instruct model's template, "
                            "or one TRL ships, as 'trl:<name>') or the template text; the recipe "
                            "must set the same chat_template_path.")
    return _Inputs(d_path, t_path, file, tok, tpl_text, tpl_label, split, all_rows, idx, rows, fmt)


def _base_fields(inp: _Inputs, completion_only_loss, assistant_only_loss, packing,
                 max_length) -> dict:
    ws = get_workspace()
    d_hash, t_hash = dataset_hash(inp.d_path), tokenizer_hash(inp.t_path)
    tp_hash = template_hash(inp.tpl_text)
    key = _make_key(d_hash, t_hash, tp_hash, inp.split, completion_only_loss,
                    assistant_only_loss, packing, max_length)
    settings = MaskingSettings(
        dataset=ws.rel(inp.d_path), tokenizer=ws.rel(inp.t_path), split=inp.split,
        completion_only_loss=completion_only_loss, assistant_only_loss=assistant_only_loss,
        packing=packing, max_length=max_length, chat_template=inp.tpl_label)
    return dict(key=key, report_path="", created_at=_now(), settings=settings,
                dataset_format=inp.fmt, dataset_rows=len(inp.all_rows),
                examples_checked=len(inp.rows), pad_token=inp.tok.pad_token,
                eos_token=inp.tok.eos_token, dataset_hash=d_hash, tokenizer_hash=t_hash,
                template_hash=tp_hash)


def _run(inp: _Inputs, base: dict, reasons: list[Reason], settings: dict):
    """TRL's preparation of the sample (and the lengths of every row); None when it refused.

    Rows without an assistant message make TRL refuse the whole dataset under
    assistant_only_loss: they are named, and the other rows are still proven."""
    from . import masking_checks as mc
    everything = list(enumerate(inp.all_rows))
    try:
        return mc.run_trl(inp.rows, inp.tok, row_numbers=inp.idx, all_rows=everything, **settings)
    except mc.TrlRefused as exc:
        if exc.kind != "no_assistant_tokens":
            reasons.append(_refusal_reason(exc, inp.tok))
            return None
        dropped = [n for n, r in everything if not _has_assistant(r)]
        reasons.append(_zero_assistant_reason(exc.message, dropped))
        base["zero_trained_examples_extra"] = len(dropped)
        keep = [(i, r) for i, r in zip(inp.idx, inp.rows) if i not in set(dropped)]
        if not dropped or not keep:
            return None
        inp.idx, inp.rows = [i for i, _ in keep], [r for _, r in keep]
        try:  # still prove the masking of the other rows
            return mc.run_trl(inp.rows, inp.tok, row_numbers=inp.idx,
                              all_rows=[(n, r) for n, r in everything if n not in set(dropped)],
                              **settings)
        except mc.TrlRefused as exc2:
            reasons.append(_refusal_reason(exc2, inp.tok))
            return None
    except Exception as exc:  # noqa: BLE001 - template errors etc. are findings about the inputs
        reasons.append(_prepare_error(exc, inp))
        return None


def _prepare_error(exc: Exception, inp: _Inputs) -> Reason:
    """A template or data error while TRL prepared the rows, with the first row it hits."""
    import traceback

    from . import masking_checks as mc
    jinja = type(exc).__module__.startswith("jinja2") or any(
        f.filename == "<template>" for f in traceback.extract_tb(exc.__traceback__))
    where = mc.first_render_error(inp.tok, list(enumerate(inp.all_rows)), None) if jinja else None
    row = f" Row {where[0]}: {where[1]}." if where else ""
    return Reason(
        severity="fail", code="template_error" if jinja else "trl_error",
        message=f"SFTTrainer could not prepare this data: {type(exc).__name__}: {exc}.{row}",
        fix="The chat template cannot render these messages (roles, order, tool calls without "
            "content): pick a template that supports them, or convert the data (convert_dataset)."
        if jinja else "Check that the dataset columns and settings fit SFTTrainer.",
        rows=[where[0]] if where else [])


# --------------------------------------------------------------------------------------------
# Analysis
# --------------------------------------------------------------------------------------------
def _has_assistant(row: dict) -> bool:
    msgs = row.get("messages") or row.get("conversations") or \
        ((row.get("prompt") or []) + (row.get("completion") or [])
         if isinstance(row.get("prompt"), list) else [])
    from .masking_checks import norm_role
    return any(norm_role(m.get("role", m.get("from"))) == "assistant" for m in msgs
               if isinstance(m, dict))


def _zero_assistant_reason(trl_message: str, rows: list[int]) -> Reason:
    where = (f"{len(rows)} checked row(s) have no assistant message"
             if rows else "some rows render no assistant tokens")
    return Reason(
        severity="fail", code="zero_trained_examples",
        message=f"assistant_only_loss: {where}, so they would train on nothing and TRL refuses "
                f"the whole dataset (TRL: {trl_message.split('. ')[0]}).",
        fix="Drop conversations without an assistant reply (or whose template renders no "
            "{% generation %} span), e.g. re-run convert_dataset, then verify again.",
        rows=rows[:20])


def _refusal_reason(exc, tok=None) -> Reason:
    if exc.kind == "no_generation_markers":
        return _no_markers_reason(exc, tok)
    if exc.kind == "not_conversational":
        return Reason(severity="fail", code="assistant_only_loss_not_conversational",
                      message=f"assistant_only_loss needs conversational data (TRL: {exc.message})",
                      fix="Convert the data to role/content `messages` with convert_dataset "
                          "(TRL checks this before it converts ShareGPT from/value rows), or use "
                          "prompt/completion with completion_only_loss.")
    if exc.kind == "no_assistant_tokens":
        return _zero_assistant_reason(exc.message, [])
    return Reason(severity="fail", code="trl_refused", message=f"SFTTrainer refused: {exc.message}",
                  fix="Change the settings TRL names above.")


def _no_markers_reason(exc, tok) -> Reason:
    """assistant_only_loss refused: say why TRL did not swap in its training variant, and name
    the shipped template to use (TRL swaps only for a byte-identical copy of a template it ships)."""
    from . import chat_templates
    tpl = tok.chat_template if tok is not None and isinstance(tok.chat_template, str) else None
    near = chat_templates.closest(tpl) if tpl else None
    if near is not None:
        why = (f"Your template is close to TRL's {near.name} ({near.similarity:.0%} of lines alike) "
               f"but not identical (first difference at line {near.first_difference}), and TRL "
               "swaps in its training variant only for an exact copy of a template it ships.")
    else:
        why = "TRL has no training variant for a template like this one."
    use = (f"pass chat_template='{chat_templates.PREFIX}{near.training_variant}' (TRL's training "
           f"variant of {near.name}, copied into the workspace) and set the chat_template_path it "
           "reports in the recipe" if near and near.training_variant else
           "pass chat_template with generation markers (a copy of your template with "
           "{% generation %} around the assistant content and its end-of-turn token, or one TRL "
           "ships as 'trl:<family>_training.jinja', see the resource chat-templates://trl), and "
           "set the same chat_template_path in the recipe")
    return Reason(
        severity="fail", code="assistant_only_loss_unsupported",
        message="assistant_only_loss needs a chat template with {% generation %} ... "
                "{% endgeneration %} around assistant replies; this template has none. "
                f"{why} (TRL: {exc.message})",
        fix=f"Either {use}, or convert to prompt/completion (convert_dataset "
            "target_format=prompt_completion) and use completion_only_loss.")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def _finish(fields: dict, reasons: list[Reason], zero: int = 0) -> MaskingReport:
    fields = {k: v for k, v in fields.items() if k != "zero_trained_examples_extra"}
    if zero and not fields.get("zero_trained_examples"):
        fields["zero_trained_examples"] = zero
    from .masking_analysis import by_harm
    reasons = by_harm(reasons)
    sev = {r.severity for r in reasons}
    verdict = "fail" if "fail" in sev else "warn" if "warn" in sev else "pass"
    report = MaskingReport(verdict=verdict, reasons=reasons, **fields)
    report.summary, report.next_steps = _summary(report), _next(report)
    ws = get_workspace()
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    ws.owned_dir(REPORT_DIR)  # a real folder: a symlink out is refused
    rel = f"{REPORT_DIR}/{stamp}-{report.key[:12]}.json"
    report.report_path = str(ws.resolve(rel, field="report_path"))
    ws.write_text(rel, report.model_dump_json(indent=2), field="report_path")
    return report


def _summary(r: MaskingReport) -> str:
    """'Masking passes: 48 of 48 replies fully trained, 31% of tokens trained, no prompt token
    trained.' then the most harmful reason."""
    word = {"pass": "passes", "warn": "passes with warnings", "fail": "fails"}[r.verdict]
    parts = []
    if r.assistant_turns:
        parts.append(f"{r.assistant_turns_fully_trained} of {r.assistant_turns} replies fully trained")
    if r.trained_share:
        parts.append(f"{r.trained_share.mean:.0%} of tokens trained")
    parts.append("no prompt token trained" if not r.prompt_tokens_trained
                 else f"{r.prompt_tokens_trained} prompt tokens trained")
    text = f"Masking {word} on {r.examples_checked} rows: " + ", ".join(parts) + "."
    worst = next((x for x in r.reasons if x.severity != "info"), None)
    if worst:
        text += f" {worst.severity.upper()} {worst.code}: {worst.message}"
    return short(text, SUMMARY_MAX_CHARS)


def _next(r: MaskingReport) -> list[str]:
    s = r.settings
    if r.verdict == "fail":
        fixes = [f"{x.code}: {x.fix}" for x in r.reasons if x.severity == "fail" and x.fix]
        return fixes[:2] + [f"verify_masking(dataset='{s.dataset}', tokenizer='{s.tokenizer}', ...) "
                            "again after the fix."]
    return [f"generate_recipe(model='{s.tokenizer}', dataset='{s.dataset}', ...) with these masking "
            "settings (or launch_training on a recipe that has them)."]


# --------------------------------------------------------------------------------------------
# A recipe's masking inputs: one reading for verify_masking(recipe=) and launch_training
# --------------------------------------------------------------------------------------------
@dataclass
class RecipeMasking:
    tokenizer: Optional[str]
    inputs: list[tuple[str, str]]   # (dataset, split) a report must cover
    settings: dict                  # find_masking_report's keyword settings


def recipe_masking(cfg: dict) -> RecipeMasking:
    """What a recipe trains with, as the masking report's inputs (TRL's defaults where unset)."""
    settings = dict(completion_only_loss=cfg.get("completion_only_loss"),
                    assistant_only_loss=bool(cfg.get("assistant_only_loss", False)),
                    packing=bool(cfg.get("packing", False)),
                    max_length=cfg.get("max_length", 1024),
                    chat_template_path=cfg.get("chat_template_path"))
    tok = cfg.get("model_name_or_path")  # SFTTrainer loads its tokenizer from the model
    return RecipeMasking(str(tok) if tok else None, recipe_datasets(cfg), settings)


def recipe_datasets(cfg: dict) -> list[tuple[str, str]]:
    """(dataset path, split) pairs a masking report must cover."""
    out: list[tuple[str, str]] = []
    mixture = cfg.get("datasets")
    if isinstance(mixture, list) and mixture:
        for d in mixture:
            if not isinstance(d, dict):
                continue
            files = d.get("data_files")
            if isinstance(files, dict):
                files = files.get(d.get("split", "train")) or next(iter(files.values()), None)
            if isinstance(files, str):
                files = [files]
            if isinstance(files, list) and files:
                out.extend((str(f), "train") for f in files)
            elif d.get("path"):
                out.append((str(d["path"]), d.get("split", "train")))
    elif cfg.get("dataset_name"):
        out.append((str(cfg["dataset_name"]), str(cfg.get("dataset_train_split") or "train")))
    return out



# --------------------------------------------------------------------------------------------
# Lookup for launch_training
# --------------------------------------------------------------------------------------------
def find_masking_report(dataset_path: str, tokenizer_path: str, *,
                        completion_only_loss: Optional[bool], assistant_only_loss: bool,
                        packing: bool, max_length: Optional[int],
                        chat_template_path: Optional[str] = None,
                        split: str = "train") -> Optional[MaskingReport]:
    """The newest saved masking report for exactly these inputs, or None.

    The dataset is identified by the content hash of its data files, the tokenizer by the hash
    of its tokenizer files plus the chat template text (chat_template_path: a .jinja file or
    template text); the masking settings must be equal.
    """
    ws = get_workspace()
    d_path = ws.resolve(dataset_path, field="dataset_path")
    t_path = ws.resolve(tokenizer_path, field="tokenizer_path")
    if not d_path.exists() or not t_path.is_dir():
        return None
    if chat_template_path is not None and "{%" not in chat_template_path \
            and "{{" not in chat_template_path:
        p = ws.resolve(chat_template_path, field="chat_template_path")
        if not p.is_file():
            return None
        tpl = p.read_text(encoding="utf-8")
    else:
        tpl = chat_template_path
    key = _make_key(dataset_hash(d_path), tokenizer_hash(t_path), template_hash(tpl), split,
                    completion_only_loss, assistant_only_loss, packing, max_length)
    folder = ws.owned_dir(REPORT_DIR)  # a report planted outside the workspace is never read
    best: tuple[str, str, dict] | None = None
    for f in folder.glob(f"*-{key[:12]}.json"):
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if data.get("key") != key:
            continue
        cand = (str(data.get("created_at", "")), f.name, data)
        if best is None or cand[:2] > best[:2]:
            best = cand
    return MaskingReport.model_validate(best[2]) if best else None
