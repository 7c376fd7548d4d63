"""The engine behind `verify_masking`: run TRL's own SFT preparation, then attribute every token.

1. `run_trl` builds an `SFTTrainer` on a throw-away tiny model (no forward pass ever runs), so
   the trainer's own constructor decides what training would decide: the pad token, whether
   completion-only loss applies, the `{% generation %}` training template swapped in for
   `assistant_only_loss` (or the error TRL raises), padding-free/packing, and it prepares the
   dataset with `_prepare_dataset` (ChatML conversion, EOS, tokenisation, labels, truncation,
   dropping fully masked rows, BFD packing). The real `DataCollatorForLanguageModeling` then
   builds the batches whose `labels` (-100 = not trained) are the ground truth.
   The same trainer prepares the rows once more with `max_length=None`: the untruncated view
   that tells what truncation cut.
2. `analyse_row` maps each token to the message it renders (system/user/assistant/tool) or to
   the template (headers, end-of-turn markers, BOS), by rendering the conversation
   incrementally with the chat template and tokenizing with character offsets. Nothing is
   hard-coded per template.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

from .workspace import TMP_DIR, get_workspace

CONTENT_ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "model": "assistant", "function": "tool",
                "observation": "tool", "ipython": "tool", "developer": "system",
                "function_call": "assistant"}
TEMPLATE = "template"
TEXT = "text"
CONTEXT = "assistant_context"


class TrlRefused(Exception):
    """TRL refused the settings or data (its own ValueError/RuntimeError): a finding, not a crash."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass
class TrlRun:
    """What TRL produced: untruncated rows, final per-row labels, and the trainer's decisions."""
    full: list[dict]                      # one per input row: input_ids, labels (+ source columns)
    final: dict[int, tuple[list[int], list[int]]]  # row -> (input_ids, labels) after collator
    unmatched_segments: int
    completion_only_loss: bool
    padding_free: bool
    pad_token_id: int | None
    pad_token: str | None
    training_template: str | None       # TRL's swapped-in template, None = the tokenizer's
    warnings: list[str] = field(default_factory=list)
    lengths: "LengthStats | None" = None  # every row of the split, untruncated


@dataclass
class LengthStats:
    """Per row of the whole split (not only the checked sample): what truncation would do."""
    rows: list[int]            # row number in the split
    lengths: list[int]         # tokens before truncation
    trained: list[int]         # trained tokens before truncation
    trained_within: list[int]  # trained tokens inside max_length (keep_start truncation)


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):  # pragma: no cover - trivial
        with contextlib.suppress(Exception):
            msg = record.getMessage()
            if msg not in self.messages:
                self.messages.append(msg)


@contextlib.contextmanager
def _quiet():
    """No progress bars, nothing on stdout (the MCP stdio stream), TRL warnings captured."""
    import warnings

    from datasets.utils import logging as ds_logging
    bars = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    cap = _Capture()
    trl_log = logging.getLogger("trl")
    trl_log.addHandler(cap)
    try:
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield cap
    finally:
        trl_log.removeHandler(cap)
        if bars:
            ds_logging.enable_progress_bar()


def _dummy_model(tokenizer):
    """A 1-layer Llama sized to the vocabulary: SFTTrainer needs a model, it never runs here."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=max(len(tokenizer), 8), hidden_size=8, intermediate_size=8,
                      num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None)
    return LlamaForCausalLM(cfg)


def run_trl(rows: list[dict], tokenizer, *, completion_only_loss: bool | None,
            assistant_only_loss: bool, packing: bool, max_length: int | None,
            batch_size: int = 8, row_numbers: list[int] | None = None,
            all_rows: list[tuple[int, dict]] | None = None) -> TrlRun:
    """Prepare `rows` exactly as SFTTrainer would and collate them with its collator.

    `row_numbers`: each sample row's number in the split. `all_rows` ((number, row) for the whole
    split) is only tokenised, untruncated, for the length and truncation counts: a cut that hits
    1 row in 200 is invisible in a 64-row sample."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    ds = Dataset.from_list([{**r, "__row": i} for i, r in enumerate(rows)])
    with _quiet() as cap, tempfile.TemporaryDirectory(
            prefix="verify-masking-", dir=get_workspace().owned_dir(TMP_DIR)) as tmp:
        args = SFTConfig(
            output_dir=tmp, max_length=max_length, completion_only_loss=completion_only_loss,
            assistant_only_loss=assistant_only_loss, packing=packing, dataset_num_proc=None,
            report_to="none", use_cpu=True, bf16=False, fp16=False,
            gradient_checkpointing=False, per_device_train_batch_size=batch_size,
            save_strategy="no", logging_strategy="no", disable_tqdm=True)
        try:
            trainer = SFTTrainer(model=_dummy_model(tokenizer), args=args, train_dataset=ds,
                                 processing_class=tokenizer)
        except RuntimeError as exc:
            if "assistant" in str(exc):
                raise TrlRefused("no_assistant_tokens", str(exc)) from exc
            raise
        except ValueError as exc:
            text = str(exc)
            if "not training-compatible" in text or "generation" in text:
                raise TrlRefused("no_generation_markers", text) from exc
            if "not conversational" in text:
                raise TrlRefused("not_conversational", text) from exc
            raise TrlRefused("trl_value_error", text) from exc

        # The untruncated view: same trainer, same decisions, no truncation, no packing.
        full_args = copy.copy(trainer.args)
        full_args.max_length = None
        full_ds = trainer._prepare_dataset(ds, tokenizer, full_args, False, None, "verify")
        full = [dict(r) for r in full_ds]
        full.sort(key=lambda r: r["__row"])

        final, unmatched = _collate(trainer, full, batch_size)
        if all_rows is None or len(all_rows) == len(rows):
            lengths = length_stats(full_ds, max_length)
            lengths.rows = [(row_numbers or range(len(rows)))[i] for i in lengths.rows]
        else:
            lengths = _all_row_lengths(trainer, tokenizer, full_args, all_rows, max_length)
        return TrlRun(full=full, final=final, unmatched_segments=unmatched,
                      completion_only_loss=bool(trainer.completion_only_loss),
                      padding_free=bool(trainer.padding_free),
                      pad_token_id=getattr(trainer.data_collator, "pad_token_id", None),
                      pad_token=tokenizer.pad_token, training_template=trainer.chat_template,
                      warnings=list(cap.messages), lengths=lengths)


def _all_row_lengths(trainer, tokenizer, full_args, all_rows, max_length) -> LengthStats | None:
    """Tokenise the whole split as the trainer would, untruncated; None when TRL refuses a row
    outside the sample (the sample's own findings still stand, the counts fall back to it)."""
    from datasets import Dataset
    ds = Dataset.from_list([{**r, "__row": i} for i, r in all_rows])
    try:
        prepared = trainer._prepare_dataset(ds, tokenizer, full_args, False, None, "lengths")
    except RuntimeError as exc:
        if "assistant" in str(exc):  # a row outside the sample: training would refuse it too
            raise TrlRefused("no_assistant_tokens", str(exc)) from exc
        return None
    except (ValueError, TypeError, KeyError):
        return None
    return length_stats(prepared, max_length)


def length_stats(prepared, max_length: int | None) -> LengthStats:
    """Lengths and trained-token counts per row, straight from the Arrow columns (fast on 100k rows)."""
    import numpy as np
    table = prepared.data.table
    ids = table.column("input_ids").combine_chunks()
    labels = table.column("labels").combine_chunks()
    offs = ids.offsets.to_numpy()
    lengths = np.diff(offs - offs[0])
    loffs = labels.offsets.to_numpy()
    loffs = loffs - loffs[0]
    trained_flags = labels.flatten().to_numpy(zero_copy_only=False) != -100
    cs = np.concatenate([[0], np.cumsum(trained_flags)])
    trained = cs[loffs[1:]] - cs[loffs[:-1]]
    if max_length is None:
        within = trained
    else:
        within = cs[np.minimum(loffs[:-1] + max_length, loffs[1:])] - cs[loffs[:-1]]
    rows = table.column("__row").to_pylist() if "__row" in table.column_names \
        else list(range(len(lengths)))
    return LengthStats(rows=rows, lengths=lengths.tolist(), trained=trained.tolist(),
                       trained_within=within.tolist())


def _collate(trainer, full: list[dict], batch_size: int):
    """Run the trainer's collator over its prepared dataset; split back into rows."""
    prepared = trainer.train_dataset
    collator = trainer.data_collator
    keys = [k for k in ("input_ids", "labels", "seq_lengths") if k in prepared.column_names]
    has_row = "__row" in prepared.column_names
    items = [{k: r[k] for k in keys} | ({"__row": r["__row"]} if has_row else {})
             for r in prepared]
    segments: list[tuple[int | None, list[int], list[int]]] = []
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        out = collator([{k: v for k, v in b.items() if k != "__row"} for b in batch])
        ids, labels = out["input_ids"].tolist(), out["labels"].tolist()
        if "cu_seq_lens_q" in out:  # padding-free: one flat sequence, split at each start
            cu = out["cu_seq_lens_q"].tolist()
            flat_rows = [b.get("__row") for b in batch for _ in range(
                len(b["seq_lengths"]) if "seq_lengths" in b else 1)]
            for j in range(len(cu) - 1):
                a, b_ = cu[j], cu[j + 1]
                row = flat_rows[j] if has_row and j < len(flat_rows) else None
                segments.append((row, ids[0][a:b_], labels[0][a:b_]))
        else:
            for j, b in enumerate(batch):
                n = len(b["input_ids"])
                segments.append((b.get("__row"), ids[j][:n], labels[j][:n]))

    final: dict[int, tuple[list[int], list[int]]] = {}
    unmatched = 0
    if has_row:
        for row, ids, labels in segments:
            final[row] = (ids, labels)
        return final, unmatched
    # Packed: every segment is the start of one prepared row (BFD truncates, never mixes).
    by_head: dict[tuple, list[int]] = {}
    for r in full:
        by_head.setdefault(tuple(r["input_ids"][:8]), []).append(r["__row"])
    ids_of = {r["__row"]: r["input_ids"] for r in full}
    for _, ids, labels in segments:
        cands = [c for c in by_head.get(tuple(ids[:8]), [])
                 if c not in final and ids_of[c][:len(ids)] == ids]
        if cands:
            final[cands[0]] = (ids, labels)
        else:
            unmatched += 1
    return final, unmatched


# --------------------------------------------------------------------------------------------
# Token attribution
# --------------------------------------------------------------------------------------------
def norm_role(role: Any) -> str:
    r = str(role or "").strip().lower()
    r = ROLE_ALIASES.get(r, r)
    return r if r in CONTENT_ROLES else r or "unknown"


def _content_texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content] if content else []
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str) and part["text"]:
                out.append(part["text"])
            elif isinstance(part, str) and part:
                out.append(part)
        return out
    return []


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def common_prefix_ids(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _clean(msg: dict) -> dict:
    return {k: v for k, v in msg.items() if v is not None}


@dataclass
class Conversation:
    """The text TRL tokenised, with per-character role/turn and the assistant turns."""
    text: str
    char_role: list[str]
    char_turn: list[int]
    assistant_turns: list[dict]  # {turn, out_start, content_end, trained_expected}
    gen_prompts: list[tuple[int, str]]  # (turn index, generation prompt by the inference tpl)
    missing: list[tuple[int, str]] = field(default_factory=list)  # (turn, role) not rendered
    pieces: dict[int, list["Piece"]] = field(default_factory=dict)  # what each message holds
    bounds: list[int] = field(default_factory=list)  # char where each turn starts (+ the end)

    def turn_text(self, k: int) -> str:
        return self.text[self.bounds[k]:self.bounds[k + 1]] if self.bounds else ""


@dataclass
class Piece:
    """A part of a message's data: its content, or the reasoning and the answer in it."""
    kind: str        # content | reasoning | answer
    text: str
    rendered: bool = False


def split_reasoning(text: str) -> tuple[str, str] | None:
    """(reasoning, answer) of a reply that holds `<think>...</think>`, else None."""
    if "</think>" not in text:
        return None
    head, _, answer = text.partition("</think>")
    return head.split("<think>")[-1].strip(), answer.strip()


def message_pieces(msg: dict) -> list[Piece]:
    """What the data asks the template to render for `msg`, as searchable pieces.

    Reasoning is its own piece (`reasoning_content`, or the `<think>` part of the content), so a
    template that drops it is seen as dropping it: the answer alone is not the whole reply."""
    out = []
    reasoning = msg.get("reasoning_content")
    if isinstance(reasoning, str) and reasoning.strip():
        out.append(Piece("reasoning", reasoning.strip()))
    for text in _content_texts(msg.get("content")):
        split = split_reasoning(text) if norm_role(msg.get("role")) == "assistant" else None
        if split is None:
            out.append(Piece("content", text))
        else:
            out += [Piece("reasoning", split[0]), Piece("answer", split[1])]
    return [p for p in out if p.text.strip()]


def _locate(full: str, claimed: list[bool], text: str, lo: int, hi: int):
    """Where `text` (as written or trimmed) is rendered: in its own turn, else anywhere not
    yet claimed (the template moved it, e.g. a system prompt folded into the first user turn)."""
    def find(a: int, b: int):
        for cand in (text, text.strip()):
            j = full.find(cand, a, b) if cand else -1
            if j >= 0:
                return j, j + len(cand)
        return None
    loc = find(lo, hi)
    j = 0
    while loc is None:
        loc = find(j, len(full))
        if loc is None or not any(claimed[loc[0]:loc[1]]):
            return loc
        j, loc = loc[0] + 1, None
    return loc


def tool_call_names(msg: dict) -> list[str]:
    """Names of the tool calls an assistant message makes (OpenAI nested or flat form)."""
    out = []
    for tc in msg.get("tool_calls") or []:
        if isinstance(tc, dict):
            fn = tc.get("function") if isinstance(tc.get("function"), dict) else tc
            if isinstance(fn.get("name"), str) and fn["name"]:
                out.append(fn["name"])
    return out


def render(tokenizer, messages, *, template, tools, kwargs, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(
        [_clean(m) for m in messages], tokenize=False, chat_template=template, tools=tools,
        add_generation_prompt=add_generation_prompt, **kwargs)


@dataclass
class _Chat:
    """One conversation being attributed: how it renders and what each character is."""
    tokenizer: Any
    messages: list[dict]
    template: str | None
    tools: Any
    kwargs: dict
    full: str = ""
    char_role: list[str] = field(default_factory=list)
    claimed: list[bool] = field(default_factory=list)
    bounds: list[int] = field(default_factory=list)
    spans: dict[int, list[tuple[int, int]]] = field(default_factory=dict)

    def render(self, k: int, *, template: Any = "training", gen: bool = False) -> str:
        """The first k messages rendered with the training template, or with `template` (None:
        the tokenizer's own)."""
        return render(self.tokenizer, self.messages[:k],
                      template=self.template if template == "training" else template,
                      tools=self.tools, kwargs=self.kwargs, add_generation_prompt=gen)


def _turn_bounds(chat: _Chat) -> list[int]:
    """Turn boundaries: the longest common prefix of each partial rendering with the full one."""
    bounds = [0]
    for k in range(1, len(chat.messages) + 1):
        if k == len(chat.messages):
            b = len(chat.full)
        else:
            try:
                b = _common_prefix(chat.render(k), chat.full)
            except Exception:  # noqa: BLE001 - some templates refuse partial chats
                b = bounds[-1]
        bounds.append(max(b, bounds[-1]))
    return bounds


def _attribute_pieces(chat: _Chat, first_trained_turn: int):
    """Each message's pieces located in the rendering; their characters get the message's role.
    Returns the pieces per turn and the turns none of whose pieces were rendered."""
    missing: list[tuple[int, str]] = []
    pieces: dict[int, list[Piece]] = {}
    for k, msg in enumerate(chat.messages):
        role = norm_role(msg.get("role"))
        if role == "assistant" and k < first_trained_turn:
            role = CONTEXT  # an earlier reply given in the prompt: context, not trained
        found_any = False
        for piece in message_pieces(msg):
            loc = _locate(chat.full, chat.claimed, piece.text, chat.bounds[k], chat.bounds[k + 1])
            piece.rendered = loc is not None
            pieces.setdefault(k, []).append(piece)
            if loc is None:
                continue
            found_any = True
            for c in range(*loc):
                chat.char_role[c] = role
                chat.claimed[c] = True
            chat.spans.setdefault(k, []).append(loc)
        if pieces.get(k) and not found_any:
            missing.append((k, str(msg.get("role"))))
    return pieces, missing


def _output_start(chat: _Chat, k: int) -> int:
    """Where the model's own output of turn k starts: after the generation prompt."""
    lo, hi = chat.bounds[k], chat.bounds[k + 1]
    try:
        gp = chat.render(k, gen=True) if k else ""
        if k and chat.full.startswith(gp) and lo <= len(gp) <= hi:
            return len(gp)
    except Exception:  # noqa: BLE001 - a template may refuse the partial chat
        pass
    return lo


def _content_end(chat: _Chat, k: int, out_start: int, added: set[str]) -> int:
    """End of turn k's content; a reply of tool calls only runs up to its last special marker
    (its characters are the assistant's)."""
    if k in chat.spans:
        return max(b for _, b in chat.spans[k])
    hi = chat.bounds[k + 1]
    region = chat.full[out_start:hi]
    best = max((region.rfind(tok) for tok in added if tok and tok.strip()), default=-1)
    end = out_start + best if best > 0 else hi
    for c in range(out_start, end):
        if not chat.claimed[c]:
            chat.char_role[c] = "assistant"
    return end


def conversation_view(tokenizer, messages: list[dict], *, first_trained_turn: int,
                      train_template: str | None, infer_template: str | None, tools,
                      kwargs: dict) -> Conversation:
    """Render `messages` with the training template; attribute every character."""
    chat = _Chat(tokenizer, messages, train_template, tools, kwargs)
    chat.full = chat.render(len(messages))
    n = len(chat.full)
    chat.char_role, chat.claimed = [TEMPLATE] * n, [False] * n
    chat.bounds = _turn_bounds(chat)
    char_turn = [0] * n
    for k in range(len(messages)):
        for c in range(chat.bounds[k], chat.bounds[k + 1]):
            char_turn[c] = k
    pieces, missing = _attribute_pieces(chat, first_trained_turn)

    added = set(tokenizer.get_added_vocab().keys()) | set(tokenizer.all_special_tokens)
    assistant_turns, gen_prompts = [], []
    for k, msg in enumerate(messages):
        if norm_role(msg.get("role")) != "assistant":
            continue
        out_start = _output_start(chat, k)
        if k >= first_trained_turn and k:
            with contextlib.suppress(Exception):  # the inference template may refuse it
                gen_prompts.append((k, chat.render(k, template=infer_template, gen=True)))
        content_end = _content_end(chat, k, out_start, added)
        calls = tool_call_names(msg)
        rendered = chat.full[chat.bounds[k]:chat.bounds[k + 1]]
        assistant_turns.append({"turn": k, "out_start": out_start, "content_end": content_end,
                                "trained_expected": k >= first_trained_turn, "tool_calls": calls,
                                "tool_calls_missing": [c for c in calls if c not in rendered]})
    return Conversation(chat.full, chat.char_role, char_turn, assistant_turns, gen_prompts,
                        missing=missing, pieces=pieces, bounds=chat.bounds)


def text_view(prompt: str | None, completion: str | None, text: str | None,
              eos_token: str | None) -> Conversation:
    """Standard (non-chat) rows: prompt -> user, completion -> assistant, text -> text."""
    if text is not None:
        return Conversation(text, [TEXT] * len(text), [0] * len(text), [], [])
    prompt, completion = prompt or "", completion or ""
    full = prompt + completion
    body = completion[:-len(eos_token)] if eos_token and completion.endswith(eos_token) \
        else completion
    roles = ["user"] * len(prompt) + ["assistant"] * len(body) + \
        [TEMPLATE] * (len(completion) - len(body))
    turns = [0] * len(prompt) + [1] * len(completion)
    turn = {"turn": 1, "out_start": len(prompt), "content_end": len(prompt) + len(body),
            "trained_expected": True}
    return Conversation(full, roles, turns, [turn], [(1, prompt)])


def token_offsets(tokenizer, text: str, ids: list[int]) -> list[tuple[int, int]] | None:
    """Character span of each token of `ids` in `text` (None when they cannot be aligned)."""
    for special in (False, True):
        try:
            enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
        except Exception:  # noqa: BLE001 - slow tokenizers have no offsets
            return None
        if list(enc["input_ids"]) == list(ids):
            return [tuple(o) for o in enc["offset_mapping"]]
    return None


def token_roles(conv: Conversation, offsets: list[tuple[int, int]]):
    """Role and turn of each token (content role wins over template within a token)."""
    roles, turns = [], []
    n = len(conv.text)
    for a, b in offsets:
        a, b = max(0, min(a, n)), max(0, min(b, n))
        counts: dict[str, int] = {}
        for c in range(a, b):
            counts[conv.char_role[c]] = counts.get(conv.char_role[c], 0) + 1
        # Majority of the token's characters; content beats template on a tie.
        role = max(counts, key=lambda r: (counts[r], r != TEMPLATE)) if counts else TEMPLATE
        roles.append(role)
        turns.append(conv.char_turn[min(a, n - 1)] if n else 0)
    return roles, turns


def decoded_view(tokenizer, ids: list[int], trained: list[bool], cut: int,
                 limit: int = 4000, note: str = "") -> str:
    """The example as text, trained spans between [[ and ]]."""
    parts = []
    i = 0
    while i < len(ids):
        j = i
        while j < len(ids) and trained[j] == trained[i]:
            j += 1
        text = tokenizer.decode(ids[i:j], skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)
        parts.append(f"[[{text}]]" if trained[i] else text)
        i = j
    view = "".join(parts)
    if note:
        view += f" <<{note}>>"
    elif cut:
        view += f" <<{cut} tokens cut by truncation>>"
    if len(view) > limit:
        head = limit // 3
        view = view[:head] + f" <<... {len(view) - limit} chars elided ...>> " + \
            view[-(limit - head):]
    return view


def json_tools(value):
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return json.loads(value)
    return value


def row_messages(row: dict) -> list | None:
    """The conversation of a chat row (messages, or prompt + completion), else None."""
    if isinstance(row.get("messages"), list):
        return row["messages"]
    if isinstance(row.get("prompt"), list) and isinstance(row.get("completion"), list):
        return list(row["prompt"]) + list(row["completion"])
    return None


def first_render_error(tokenizer, rows: list[tuple[int, dict]], template: str | None,
                       limit: int = 100_000) -> tuple[int, str] | None:
    """(row number, the template's own error) for the first row the template cannot render."""
    for n, row in rows[:limit]:
        msgs = row_messages(row)
        if msgs is None:
            continue
        try:
            render(tokenizer, msgs, template=template, tools=json_tools(row.get("tools")),
                   kwargs=row.get("chat_template_kwargs") or {})
        except Exception as exc:  # noqa: BLE001 - the template's error is the finding
            return n, f"{type(exc).__name__}: {exc}"
    return None
