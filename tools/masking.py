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
import statistics
from pathlib import Path
from typing import Annotated, Literal, Optional

from pydantic import BaseModel, Field

from .errors import UserError
from .template_guard import check_template
from .workspace import get_workspace

REPORT_DIR = "reports/masking"
DATA_EXT = (".jsonl", ".ndjson", ".json", ".parquet")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
TRUNCATION_FAIL_SHARE = 0.05  # more than this share of examples cut/removed -> fail
PROMPT_ROLES = ("system", "user", "tool", "assistant_context")


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


class MaskingReport(BaseModel):
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
    tokens_per_example: Optional[Spread] = Field(default=None, description="before truncation.")
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
    """(template text, label): a .jinja path inside the workspace, or literal template text."""
    if chat_template is None or not str(chat_template).strip():
        return None, "tokenizer"
    s = str(chat_template)
    if "{%" in s or "{{" in s:
        return s, "literal"
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
    """All rows of a JSONL / JSON (array or JSON Lines) / Parquet file; bad JSON names the line."""
    ext = file.suffix.lower()
    if ext == ".parquet":
        import pyarrow.parquet as pq
        return pq.read_table(file).to_pylist()
    raw = file.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise UserError(f"line {line}: not valid UTF-8.", field="dataset",
                        fix="Re-save the file as UTF-8.") from exc
    stripped = text.lstrip()
    if ext == ".json" and stripped.startswith(("[", "{")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if not stripped.startswith("{"):
                raise UserError(f"line {exc.lineno}: invalid JSON ({exc.msg}).", field="dataset",
                                fix="Fix the JSON at that line.") from exc
            data = None  # maybe JSON Lines under a .json name
        if isinstance(data, list):
            return [r for r in data if isinstance(r, dict)]
        if isinstance(data, dict):
            for v in data.values():
                if isinstance(v, list) and v and isinstance(v[0], dict):
                    return v
            return [data]
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"line {n}: invalid JSON ({exc.msg}).", field="dataset",
                            fix="Fix or remove that line (one JSON object per line).") from exc
        if not isinstance(row, dict):
            raise UserError(f"line {n}: a row must be a JSON object.", field="dataset",
                            fix="Write one JSON object per line.")
        rows.append(row)
    return rows


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
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001 - any loading failure is a bad input
        raise UserError(f"could not load a tokenizer from {path}: {type(exc).__name__}: {exc}",
                        field="tokenizer",
                        fix="Give a local model or tokenizer directory (tokenizer.json / "
                            "tokenizer_config.json) inside the workspace.") from exc


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
    dataset: Annotated[str, Field(description="Converted dataset directory (train.jsonl/test.jsonl "
                                              "from convert_dataset) or a .jsonl/.json file, in "
                                              "the workspace.")],
    tokenizer: Annotated[str, Field(description="Model or tokenizer directory in the workspace.")],
    completion_only_loss: Annotated[Optional[bool], Field(
        description="SFTConfig.completion_only_loss; None = TRL default (on for prompt/completion "
                    "data).")] = None,
    assistant_only_loss: Annotated[bool, Field(
        description="SFTConfig.assistant_only_loss (needs {% generation %} markers).")] = False,
    packing: Annotated[bool, Field(description="SFTConfig.packing (BFD, padding-free).")] = False,
    max_length: Annotated[Optional[int], Field(ge=1, description="SFTConfig.max_length; None = no "
                                                                 "truncation.")] = 1024,
    chat_template: Annotated[Optional[str], Field(
        description="A .jinja file in the workspace, or template text, that replaces the "
                    "tokenizer's template (as chat_template_path does; needed for a base model "
                    "without one).")] = None,
    split: Annotated[str, Field(description="Split file of a dataset directory.")] = "train",
    sample_size: Annotated[int, Field(ge=1, le=2000, description="Rows checked, spread over "
                                                                 "the split.")] = 64,
    show_examples: Annotated[int, Field(ge=0, le=20, description="Decoded examples in the "
                                                                 "report.")] = 3,
) -> MaskingReport:
    """Prove which tokens SFTTrainer will train on, before training. Call it after
    convert_dataset and before launch_training (which requires a passing report), with the
    recipe's masking settings.

    Runs TRL's own SFT dataset preparation and collator on a sample (tokenisation, chat
    template, completion/assistant-only masks, truncation, packing), then attributes every
    token to system/user/assistant/tool/template. Returns verdict pass/warn/fail with reasons
    and fixes (e.g. messages data trains user turns, EOS never trained, template differs from
    inference, truncation cuts replies, missing {% generation %} markers), the share of tokens
    trained, trained tokens per role, decoded examples with trained spans in [[...]], and the
    path of the saved JSON report.
    """
    from . import masking_checks as mc

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
    conversational = fmt in ("messages", "prompt_completion")

    tok = _load_tokenizer(t_path)
    if tpl_text is not None:
        tok.chat_template = tpl_text
    check_template(tok.chat_template if isinstance(tok.chat_template, str) else None,
                   field="chat_template" if tpl_text is not None else "tokenizer")
    if conversational and not tok.chat_template:
        raise UserError(f"the tokenizer in {ws.rel(t_path)} has no chat template, and the data is "
                        "conversational.", field="chat_template",
                        fix="Pass chat_template: a .jinja file (e.g. the Instruct model's template) "
                            "or the template text; the recipe must set the same "
                            "chat_template_path.")

    d_hash, t_hash, tp_hash = dataset_hash(d_path), tokenizer_hash(t_path), template_hash(tpl_text)
    key = _make_key(d_hash, t_hash, tp_hash, split, completion_only_loss, assistant_only_loss,
                    packing, max_length)
    settings = MaskingSettings(
        dataset=ws.rel(d_path), tokenizer=ws.rel(t_path), split=split,
        completion_only_loss=completion_only_loss, assistant_only_loss=assistant_only_loss,
        packing=packing, max_length=max_length, chat_template=tpl_label)
    base = dict(key=key, report_path="", created_at=_now(), settings=settings,
                dataset_format=fmt, dataset_rows=len(all_rows), examples_checked=len(rows),
                pad_token=tok.pad_token, eos_token=tok.eos_token,
                dataset_hash=d_hash, tokenizer_hash=t_hash, template_hash=tp_hash)

    reasons: list[Reason] = []
    if len(rows) < len(all_rows):
        reasons.append(Reason(severity="info", code="sampled",
                              message=f"checked {len(rows)} of {len(all_rows)} rows, spread "
                                      "evenly over the split.",
                              fix="Raise sample_size to check more rows."))

    try:
        run = mc.run_trl(rows, tok, completion_only_loss=completion_only_loss,
                         assistant_only_loss=assistant_only_loss, packing=packing,
                         max_length=max_length)
    except mc.TrlRefused as exc:
        dropped: list[int] = []
        if exc.kind == "no_assistant_tokens":
            dropped = [i for i, r in enumerate(rows) if not _has_assistant(r)]
            reasons.append(_zero_assistant_reason(exc.message, [idx[i] for i in dropped]))
            keep = [r for i, r in enumerate(rows) if i not in set(dropped)]
            if dropped and keep:
                idx = [idx[i] for i in range(len(rows)) if i not in set(dropped)]
                rows = keep
                try:  # still prove the masking of the other rows
                    run = mc.run_trl(rows, tok, completion_only_loss=completion_only_loss,
                                     assistant_only_loss=assistant_only_loss, packing=packing,
                                     max_length=max_length)
                except mc.TrlRefused as exc2:
                    reasons.append(_refusal_reason(exc2))
                    return _finish(base, reasons, zero=len(dropped))
            else:
                return _finish(base, reasons, zero=len(dropped))
        else:
            reasons.append(_refusal_reason(exc))
            return _finish(base, reasons)
        base["zero_trained_examples_extra"] = len(dropped)
    except Exception as exc:  # noqa: BLE001 - template errors etc. are findings about the inputs
        import traceback
        jinja = type(exc).__module__.startswith("jinja2") or any(
            f.filename == "<template>" for f in traceback.extract_tb(exc.__traceback__))
        reasons.append(Reason(
            severity="fail", code="template_error" if jinja else "trl_error",
            message=f"SFTTrainer could not prepare this data: {type(exc).__name__}: {exc}",
            fix="The chat template cannot render these messages (roles, order, tool calls): "
                "pick a template that supports them, or convert the data (convert_dataset)."
            if jinja else "Check that the dataset columns and settings fit SFTTrainer."))
        return _finish(base, reasons)

    settings.completion_only_loss_effective = run.completion_only_loss
    settings.padding_free = run.padding_free
    if run.training_template is not None:
        settings.training_template = "trl_training_variant"
        reasons.append(Reason(
            severity="info", code="training_template_swapped",
            message="assistant_only_loss: the chat template has no {% generation %} markers, so "
                    "TRL tokenises with its own training variant of this template. The checks "
                    "below compare it with the inference template."))
    return _analyse(base, reasons, run, tok, idx, fmt, _stop_ids(tok, t_path), show_examples, mc)


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


def _refusal_reason(exc) -> Reason:
    if exc.kind == "no_generation_markers":
        return Reason(
            severity="fail", code="assistant_only_loss_unsupported",
            message="assistant_only_loss needs a chat template with {% generation %} ... "
                    "{% endgeneration %} around assistant replies; this template has none and "
                    f"TRL has no training variant for it (TRL: {exc.message})",
            fix="Either convert to prompt/completion (convert_dataset "
                "target_format=prompt_completion) and use completion_only_loss, or pass "
                "chat_template with generation markers (e.g. TRL's qwen3_training.jinja / "
                "llama3_training.jinja or a copy of your template with {% generation %} around "
                "the assistant content and its end-of-turn token), and set the same "
                "chat_template_path in the recipe.")
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


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def _spread(values: list[float], nd: int = 4) -> Optional[Spread]:
    if not values:
        return None
    return Spread(mean=round(statistics.fmean(values), nd), min=round(min(values), nd),
                  max=round(max(values), nd))


def _analyse(base, reasons, run, tok, idx, fmt, stop_ids, show_examples, mc):
    eos_id, bos_id = tok.eos_token_id, tok.bos_token_id
    # None = the tokenizer's own template (after any chat_template replacement), which is also
    # the inference template; TRL's swapped-in training variant otherwise.
    train_template, infer_template = run.training_template, None
    by_role: dict[str, list[int]] = {}
    shares, lengths = [], []
    turns_total = turns_full = 0
    eot_missing_rows, eot_masked_rows, no_stop_rows, prompt_rows = [], [], [], []
    prompt_trained = 0
    mismatch_rows, merge_rows, double_bos_rows, eos_masked_rows = [], [], [], []
    cut_rows, removed_rows, zero_rows, over_rows, unaligned_rows = [], [], [], [], []
    mismatch_detail = merge_detail = ""
    not_trained_rows = []
    eot_tokens: set[int] = set()
    views: list[ExampleView] = []
    chat_markup_rows = []
    dropped_roles: dict[str, list[int]] = {}
    added_ids = set(tok.get_added_vocab().values()) | set(tok.all_special_ids)

    for src in run.full:
        i = src["__row"]
        row_no = idx[i]
        ids_full, labels_full = list(src["input_ids"]), list(src["labels"])
        lengths.append(len(ids_full))
        fin = run.final.get(i)
        if fin is not None and list(fin[0]) == ids_full[:len(fin[0])]:
            kept, labels_k = len(fin[0]), list(fin[1])
        else:
            kept, labels_k = 0, []
        trained = [labels_k[p] != -100 if p < kept else False for p in range(len(ids_full))]
        n_trained = sum(trained)
        if _over_max_length(base, len(ids_full)):
            over_rows.append(row_no)
        lost = sum(1 for p in range(kept, len(ids_full)) if labels_full[p] != -100)
        if n_trained == 0:
            (removed_rows if any(lbl != -100 for lbl in labels_full) else zero_rows).append(row_no)
        elif lost:
            cut_rows.append(row_no)
        if kept:
            shares.append(n_trained / kept)

        # Role attribution
        tools = mc.json_tools(src.get("tools"))
        kwargs = src.get("chat_template_kwargs") or {}
        conv = None
        try:
            if fmt == "messages":
                conv = mc.conversation_view(tok, src["messages"], first_trained_turn=0,
                                            train_template=train_template,
                                            infer_template=infer_template, tools=tools,
                                            kwargs=kwargs)
            elif fmt == "prompt_completion":
                conv = mc.conversation_view(tok, list(src["prompt"]) + list(src["completion"]),
                                            first_trained_turn=len(src["prompt"]),
                                            train_template=train_template,
                                            infer_template=infer_template, tools=tools,
                                            kwargs=kwargs)
            elif fmt == "prompt_completion_text":
                conv = mc.text_view(src["prompt"], src["completion"], None, tok.eos_token)
            else:
                conv = mc.text_view(None, None, src.get("text", ""), None)
        except Exception:  # noqa: BLE001 - attribution is best effort; labels above are exact
            conv = None
        offsets = mc.token_offsets(tok, conv.text, ids_full) if conv is not None else None
        if conv is not None and conv.missing:
            for _, role in conv.missing:
                dropped_roles.setdefault(role, []).append(row_no)
        if offsets is None:
            unaligned_rows.append(row_no)
            roles = ["unattributed"] * len(ids_full)
        else:
            roles, turns = mc.token_roles(conv, offsets)
        for p in range(kept):
            acc = by_role.setdefault(roles[p], [0, 0])
            acc[0] += 1
            acc[1] += int(trained[p])
        if offsets is not None:
            bad = [p for p in range(kept) if trained[p] and roles[p] in PROMPT_ROLES]
            if bad:
                prompt_rows.append(row_no)
                prompt_trained += len(bad)
            if fmt == "text" and any(ids_full[p] in added_ids and ids_full[p] not in (bos_id, eos_id)
                                     for p in range(kept)):
                chat_markup_rows.append(row_no)
            # Assistant turns
            last_expected = [t for t in conv.assistant_turns if t["trained_expected"]]
            for t in last_expected:
                k = t["turn"]
                content = [p for p in range(len(ids_full)) if turns[p] == k
                           and roles[p] == "assistant"]
                in_kept = [p for p in content if p < kept]
                if not in_kept and content:
                    continue  # entirely cut by truncation: counted there
                turns_total += 1
                if all(trained[p] for p in in_kept):
                    turns_full += 1
                elif row_no not in not_trained_rows:
                    not_trained_rows.append(row_no)
                start = (content[-1] + 1) if content else \
                    next((p for p, o in enumerate(offsets) if o[0] >= t["content_end"]),
                         len(ids_full))
                eot = next((p for p in range(start, len(ids_full))
                            if tok.decode([ids_full[p]]).strip()), None)
                if eot is None:
                    eot_missing_rows.append(row_no)
                    continue
                if eot >= kept:
                    continue  # cut by truncation: counted there
                if not trained[eot]:
                    if row_no not in eot_masked_rows:
                        eot_masked_rows.append(row_no)
                else:
                    eot_tokens.add(ids_full[eot])
                if t is last_expected[-1] and stop_ids:
                    if not any(trained[p] and ids_full[p] in stop_ids
                               for p in range(eot, kept)) and trained[eot]:
                        no_stop_rows.append(row_no)
                # EOS inside the reply span but masked
                for p in range(start, min(kept, len(ids_full))):
                    if turns[p] != k:
                        break
                    if ids_full[p] == eos_id and not trained[p]:
                        if row_no not in eos_masked_rows:
                            eos_masked_rows.append(row_no)
                        break
            # Generation prompt used at inference vs the tokens trained on
            special = fmt in ("prompt_completion_text", "text")
            for k, gp in conv.gen_prompts:
                gp_ids = tok(gp, add_special_tokens=special)["input_ids"]
                if ids_full[:len(gp_ids)] == list(gp_ids):
                    continue
                if conv.text.startswith(gp):
                    merge_rows.append(row_no)
                    if not merge_detail:
                        j = mc.common_prefix_ids(gp_ids, ids_full)
                        merge_detail = (f"prompt ends {tok.decode(gp_ids[j:])!r} but training "
                                        f"has {tok.decode(ids_full[j:j + 3])!r}")
                else:
                    mismatch_rows.append(row_no)
                    if not mismatch_detail:
                        c = mc._common_prefix(gp, conv.text)
                        mismatch_detail = (f"inference prompt continues {gp[c:c + 60]!r}, "
                                           f"training text continues {conv.text[c:c + 60]!r}")
                break  # one mismatch per row is enough
        if bos_id is not None and len(ids_full) >= 2 and ids_full[0] == bos_id == ids_full[1]:
            double_bos_rows.append(row_no)
        if len(views) < show_examples:
            shown = kept or min(len(ids_full), base["settings"].max_length or len(ids_full))
            note = "" if kept else ("dropped: no trained token left within max_length"
                                    if fin is None else "no trained token")
            views.append(ExampleView(row=row_no, tokens=kept, trained_tokens=n_trained,
                                     text=mc.decoded_view(tok, ids_full[:shown], trained[:shown],
                                                          len(ids_full) - shown, note=note)))

    n = len(run.full)
    extra_zero = base.pop("zero_trained_examples_extra", 0)
    settings: MaskingSettings = base["settings"]
    pad_eq = run.pad_token_id is not None and run.pad_token_id == eos_id
    report = dict(base)
    report.update(
        trained_share=_spread(shares), tokens_per_example=_spread([float(x) for x in lengths], 1),
        trained_by_role={r: RoleTokens(tokens=v[0], trained=v[1]) for r, v in sorted(by_role.items())},
        assistant_turns=turns_total, assistant_turns_fully_trained=turns_full,
        all_assistant_turns_trained=(turns_total == turns_full) if turns_total else None,
        end_of_turn_trained=(not eot_masked_rows and not eot_missing_rows) if turns_total else None,
        prompt_tokens_trained=prompt_trained,
        # Checked only on rows whose tokens could be mapped to roles: no such row, no evidence.
        no_prompt_tokens_trained=(not prompt_rows) if n > len(unaligned_rows) else None,
        template_matches_inference=(not mismatch_rows) if n > len(unaligned_rows) else None,
        template_mismatch_examples=len(mismatch_rows),
        double_bos_examples=len(double_bos_rows), pad_token=run.pad_token,
        pad_equals_eos=pad_eq, eos_masked_examples=len(eos_masked_rows),
        stop_tokens=[tok.convert_ids_to_tokens(i) for i in sorted(stop_ids)],
        truncation=TruncationStats(max_length=settings.max_length,
                                   longest_tokens=max(lengths) if lengths else 0,
                                   examples_over_max_length=len(over_rows),
                                   completions_cut=len(cut_rows),
                                   examples_removed=len(removed_rows)),
        zero_trained_examples=len(zero_rows) + len(removed_rows) + extra_zero,
        examples=views, trl_warnings=run.warnings)

    # ---- reasons ---------------------------------------------------------------------------
    R = reasons.append
    if prompt_rows:
        if fmt == "messages" and not settings.assistant_only_loss:
            R(Reason(severity="fail", code="messages_trains_all_tokens",
                     message=f"messages data without assistant_only_loss trains every token, "
                             f"system and user turns included ({prompt_trained} prompt tokens "
                             f"trained in {len(prompt_rows)}/{n} examples); completion_only_loss "
                             "has no effect on messages data.",
                     fix="Convert to prompt/completion (convert_dataset "
                         "target_format=prompt_completion; completion_only_loss then masks the "
                         "prompt), or set assistant_only_loss=true with a template that has "
                         "{% generation %} markers.", rows=prompt_rows[:20]))
        elif fmt == "prompt_completion" and settings.completion_only_loss is False:
            R(Reason(severity="fail", code="prompt_tokens_trained",
                     message=f"completion_only_loss=false trains the prompt too ({prompt_trained} "
                             f"system/user tokens in {len(prompt_rows)}/{n} examples).",
                     fix="Leave completion_only_loss unset (None) or true.", rows=prompt_rows[:20]))
        else:
            R(Reason(severity="fail", code="prompt_tokens_trained",
                     message=f"{prompt_trained} system/user/tool tokens are trained in "
                             f"{len(prompt_rows)}/{n} examples.",
                     fix="Put tool results and earlier turns in the prompt (prompt/completion), "
                         "or use assistant_only_loss with generation markers.",
                     rows=prompt_rows[:20]))
    if not_trained_rows:
        R(Reason(severity="fail", code="assistant_not_trained",
                 message=f"assistant reply tokens are masked in {len(not_trained_rows)}/{n} "
                         "examples: the model does not learn those replies.",
                 fix="With prompt/completion data, put every reply to learn in `completion`; with "
                     "assistant_only_loss, the {% generation %} span must cover the whole reply.",
                 rows=not_trained_rows[:20]))
    if eot_masked_rows or eot_missing_rows:
        rows_ = sorted(set(eot_masked_rows + eot_missing_rows))
        why = ("the end-of-turn/EOS token after the reply is masked" if eot_masked_rows
               else "the template writes no end-of-turn token after the reply")
        fix = ("Put the end-of-turn token inside {% generation %}...{% endgeneration %} (TRL's "
               "*_training.jinja templates do)" if settings.assistant_only_loss else
               "Use a chat template that ends each assistant turn with an end-of-turn token")
        if pad_eq:
            fix += "; pad == eos here, so also set a pad token distinct from EOS"
        R(Reason(severity="fail", code="eos_not_trained",
                 message=f"{why} in {len(rows_)}/{n} examples: the model never learns to stop.",
                 fix=fix + ".", rows=rows_[:20]))
    if no_stop_rows:
        names = ", ".join(repr(tok.convert_ids_to_tokens(i)) for i in sorted(eot_tokens)) or "?"
        R(Reason(severity="warn", code="stop_token_not_eos",
                 message=f"replies end with {names}, which is not the tokenizer's EOS "
                         f"{tok.eos_token!r} (or a generation_config eos): generation may not "
                         "stop after a reply.",
                 fix="Set eos_token in the recipe (SFTConfig.eos_token) to the end-of-turn token, "
                     "or add it to generation_config.eos_token_id.", rows=no_stop_rows[:20]))
    if eos_masked_rows and not eot_masked_rows:
        R(Reason(severity="fail", code="eos_masked",
                 message=f"an EOS token inside a reply is masked in {len(eos_masked_rows)}/{n} "
                         "examples.",
                 fix="Set a pad token distinct from EOS, and keep EOS inside the trained span.",
                 rows=eos_masked_rows[:20]))
    if pad_eq:
        R(Reason(severity="info", code="pad_equals_eos",
                 message=f"pad token == EOS ({tok.eos_token!r}). TRL 1.16's collator pads labels "
                         "with -100 separately, so EOS stays trained"
                         + (" (checked)." if not eot_masked_rows else ".")))
    if mismatch_rows:
        R(Reason(severity="fail", code="template_mismatch",
                 message=f"in {len(mismatch_rows)}/{n} examples the training sequence does not "
                         "start with the add_generation_prompt=True rendering used at inference: "
                         f"{mismatch_detail}. The model is trained on a context it never sees "
                         "when generating.",
                 fix="Use a template that renders the prompt identically in both cases (e.g. "
                     "one that does not add/strip <think> blocks or headers only in the "
                     "generation prompt), or fix the template, and verify again.",
                 rows=mismatch_rows[:20]))
    if merge_rows:
        R(Reason(severity="warn", code="prompt_boundary_merge",
                 message=f"in {len(merge_rows)}/{n} examples the prompt's last tokens merge with "
                         f"the completion's first ({merge_detail}): TRL starts the completion "
                         "where they diverge.",
                 fix="End prompts on a token boundary (e.g. with a newline) or start completions "
                     "with the separating space.", rows=merge_rows[:20]))
    if double_bos_rows:
        R(Reason(severity="warn", code="double_bos",
                 message=f"{len(double_bos_rows)}/{n} examples start with two BOS tokens "
                         f"({tok.bos_token!r}): the text already has BOS and the tokenizer adds "
                         "another.",
                 fix="Remove the BOS from the text (e.g. render prompts with the chat template "
                     "without bos_token) or use conversational data so TRL tokenises once.",
                 rows=double_bos_rows[:20]))
    if cut_rows or removed_rows:
        bad = len(cut_rows) + len(removed_rows)
        sev = "fail" if bad > TRUNCATION_FAIL_SHARE * n else "warn"
        longest = max(lengths) if lengths else 0
        R(Reason(severity=sev, code="truncation_cuts_completions",
                 message=f"max_length={settings.max_length} cuts trained tokens: "
                         f"{len(cut_rows)} example(s) lose part of the reply (and its EOS), "
                         f"{len(removed_rows)} lose all of it (TRL drops them, or with packing "
                         f"they train on nothing); longest example {longest} tokens.",
                 fix=f"Raise max_length (>= {longest} covers every checked example) if memory "
                     "allows, or drop/shorten long examples (convert_dataset length filter).",
                 rows=(cut_rows + removed_rows)[:20]))
    if zero_rows:
        R(Reason(severity="fail", code="zero_trained_examples",
                 message=f"{len(zero_rows)}/{n} examples have no trained token at all.",
                 fix="Give every example a reply to learn (an assistant message / non-empty "
                     "completion), or drop those rows.", rows=zero_rows[:20]))
    if chat_markup_rows:
        R(Reason(severity="warn", code="text_contains_chat_markup",
                 message="text rows contain chat-template tokens: every token is trained, user "
                         "turns included.",
                 fix="Convert to prompt/completion or messages (convert_dataset) so only replies "
                     "are trained.", rows=chat_markup_rows[:20]))
    if fmt == "text":
        R(Reason(severity="info", code="language_modeling",
                 message="text data: every token is trained (continued pre-training)."))
    for role, rws in sorted(dropped_roles.items()):
        rws = sorted(set(rws))
        kind = mc.norm_role(role)
        R(Reason(severity="warn" if kind == "system" else "fail", code="message_not_rendered",
                 message=f"the chat template does not render the content of '{role}' messages "
                         f"in {len(rws)}/{n} examples"
                         + (" (it drops system prompts)." if kind == "system" else
                            ": the model trains on text without them."),
                 fix="Use the roles the template knows (system/user/assistant/tool, with "
                     "role/content keys; convert ShareGPT human/gpt with convert_dataset), or a "
                     "template that renders every message.", rows=rws[:20]))
    if unaligned_rows:
        none = len(unaligned_rows) == n
        R(Reason(severity="warn", code="roles_unattributed",
                 message=f"could not map tokens to roles in {len(unaligned_rows)}/{n} examples, so "
                         "prompt masking, assistant turns, end-of-turn and the inference template "
                         + ("are NOT checked for any example (those flags are null: no evidence)"
                            if none else "are checked on the other examples only")
                         + "; the trained-token counts are still TRL's own.",
                 fix="Read the decoded examples ([[...]] marks what is trained) before training; a "
                     "template whose output is not the concatenation of its messages causes this.",
                 rows=unaligned_rows[:20]))
    if run.unmatched_segments:
        R(Reason(severity="warn", code="packing_unmatched",
                 message=f"{run.unmatched_segments} packed segments could not be matched to rows."))
    return _finish(report, reasons)


def _over_max_length(base, length: int) -> bool:
    ml = base["settings"].max_length
    return ml is not None and length > ml


def _finish(fields: dict, reasons: list[Reason], zero: int = 0) -> MaskingReport:
    fields = {k: v for k, v in fields.items() if k != "zero_trained_examples_extra"}
    if zero and not fields.get("zero_trained_examples"):
        fields["zero_trained_examples"] = zero
    sev = {r.severity for r in reasons}
    verdict = "fail" if "fail" in sev else "warn" if "warn" in sev else "pass"
    report = MaskingReport(verdict=verdict, reasons=reasons, **fields)
    ws = get_workspace()
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    ws.owned_dir(REPORT_DIR)  # a real folder: a symlink out is refused
    rel = f"{REPORT_DIR}/{stamp}-{report.key[:12]}.json"
    report.report_path = str(ws.resolve(rel, field="report_path"))
    ws.write_text(rel, report.model_dump_json(indent=2), field="report_path")
    return report


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
