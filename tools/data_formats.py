"""Dataset formats: detection, the column mapping of each, conversion of one row to chat
messages, and the role-order checks a training conversation must pass.

Every source format is turned into one list of OpenAI/TRL messages (`role`, `content`, and for
tool use `tool_calls` on assistant turns and role `tool` for results) plus an optional `tools`
list; the target formats (`messages`, conversational `prompt`/`completion`) are cut from it.
`normalize` then rewrites the messages into the shape chat templates render (tool-call turns
with "content": "", legacy function_call as tool_calls, content parts as one string) and counts
what it changed; `problems` lists what still makes a row unusable.
"""
from __future__ import annotations

import functools
import json
import string
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Iterable

SOURCE_FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "question_answer", "text")

# format -> (required mapping keys, optional mapping keys). A column_mapping maps these keys to
# the dataset's column names, e.g. question_answer: {"prompt": "question", "completion": "answer"}.
MAPPING_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "messages": (("messages",), ("tools", "system")),
    "sharegpt": (("conversations",), ("tools", "system")),
    "alpaca": (("instruction", "output"), ("input", "system")),
    "prompt_completion": (("prompt", "completion"), ("tools", "system")),
    "question_answer": (("prompt", "completion"), ("system",)),
    "text": (("text",), ()),
}

CONVERSATION_COLUMNS = ("messages", "conversations", "conversation", "chat", "dialog", "dialogue",
                        "turns")
# Column pairs read as (prompt, completion), most specific first.
QA_PAIRS = (("question", "answer"), ("query", "response"), ("question", "response"),
            ("prompt", "response"), ("instruction", "response"), ("problem", "solution"),
            ("question", "solution"), ("input", "output"), ("prompt", "answer"),
            ("query", "answer"), ("input", "response"), ("input", "target"), ("source", "target"),
            ("context", "response"), ("human", "assistant"), ("user", "assistant"),
            ("prompt", "output"), ("prompt", "chosen"))
SYSTEM_COLUMNS = ("system", "system_prompt", "system_message")
TOOLS_COLUMNS = ("tools", "functions")

KNOWN_ROLES = ("system", "user", "assistant", "tool")
# Aliases folded into the four roles. ShareGPT (from/value) and glaive/LLaMA-Factory tool roles.
ROLE_ALIASES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
    "bot": "assistant", "system": "system", "developer": "system", "tool": "tool",
    "observation": "tool", "function": "tool", "function_response": "tool",
    "tool_response": "tool", "ipython": "tool",
}
TOOL_CALL_ROLES = {"function_call", "tool_call", "tool_calls"}

# Problem kinds: any of them makes a row unusable for training (convert skips it).
PROBLEM_HELP = {
    "missing_field": "a mapped column is absent or null in this row",
    "bad_type": "a value has the wrong type (e.g. messages not a list of objects)",
    "empty_messages": "the conversation has no messages",
    "unknown_role": "a role outside system/user/assistant/tool (and known aliases)",
    "empty_content": "a turn with empty content (assistant turns may be empty only with tool_calls)",
    "system_not_first": "a system message after the first turn",
    "assistant_first": "the first non-system turn is the assistant's (no user turn before it)",
    "consecutive_user": "two user turns in a row",
    "consecutive_assistant": "two assistant turns in a row (convert_dataset(merge_assistant_turns="
                             "true) joins them into one turn)",
    "tool_without_call": "a tool result not preceded by an assistant tool call",
    "no_assistant": "no assistant turn to train on",
    "bad_tool_call": "a tool call that is not {name, arguments} JSON, or whose arguments are not a "
                     "JSON object",
    "bad_tools": "a tools value that is not a JSON list of function schemas",
    "raw_text": "raw text has no roles to convert",
    "media_content": "an image/audio/video/file content part: the models trained here are text-only "
                     "and TRL's text path cannot render it. convert_dataset(drop_media=true) drops "
                     "those parts and keeps the text; a vision model needs a VLM pipeline instead",
}

# Changes made to rows that are kept (counted, with lines, in both reports).
CHANGE_HELP = {
    "nan_as_null": "NaN/Infinity in the JSON (not valid JSON; pandas writes it) read as null",
    "function_call_converted": "legacy OpenAI `function_call` turns rewritten as `tool_calls` "
                               "(role `function` results become role `tool`)",
    "media_parts_dropped": "image/audio/video/file content parts dropped (drop_media=true); the "
                           "text parts are kept",
    "assistant_turns_merged": "consecutive assistant turns joined into one (merge_assistant_turns=true)",
}
TEXT_PART_TYPES = ("text", "input_text", "output_text")
TEMPLATE_KEYS = ("prompt", "completion", "instruction", "input", "output", "system")


class RowError(Exception):
    """A row that cannot become a training conversation: `reason` is a PROBLEM_HELP key."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass
class Detection:
    format: str | None
    mapping: dict[str, str] = field(default_factory=dict)
    conversational: bool | None = None
    evidence: str = ""


def _columns(rows: Iterable[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        for k in r:
            seen.setdefault(k, None)
    return list(seen)


def _first(rows: list[dict], col: str) -> Any:
    for r in rows:
        v = r.get(col)
        if v is not None and v != "":
            return v
    return None


def _maybe_json(v: Any) -> Any:
    """CSV/Parquet often store nested values as JSON strings."""
    if isinstance(v, str) and v[:1] in "[{":
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v


def _is_msg_list(v: Any, keys: tuple[str, ...]) -> bool:
    v = _maybe_json(v)
    return isinstance(v, list) and bool(v) and isinstance(v[0], dict) and all(k in v[0] for k in keys)


def detect(rows: list[dict]) -> Detection:
    """Guess the source format and its column mapping from sample rows."""
    cols = _columns(rows)
    lower = {c.lower(): c for c in cols}

    def extras(fmt: str) -> dict[str, str]:
        out = {}
        opt = MAPPING_KEYS[fmt][1]
        if "system" in opt:
            for c in SYSTEM_COLUMNS:
                if c in lower and isinstance(_first(rows, lower[c]), str):
                    out["system"] = lower[c]
                    break
        if "tools" in opt:
            for c in TOOLS_COLUMNS:
                if c in lower and _first(rows, lower[c]) is not None:
                    out["tools"] = lower[c]
                    break
        return out

    for name in CONVERSATION_COLUMNS:
        col = lower.get(name)
        if col is None:
            continue
        v = _first(rows, col)
        if _is_msg_list(v, ("role",)):
            return Detection("messages", {"messages": col, **extras("messages")}, True,
                             f"column '{col}' holds lists of {{role, content}} messages")
        if _is_msg_list(v, ("from", "value")):
            return Detection("sharegpt", {"conversations": col, **extras("sharegpt")}, True,
                             f"column '{col}' holds lists of {{from, value}} turns (ShareGPT)")
    if "prompt" in lower and "completion" in lower:
        p = _maybe_json(_first(rows, lower["prompt"]))
        conv = _is_msg_list(p, ("role",))
        return Detection("prompt_completion", {"prompt": lower["prompt"], "completion": lower["completion"],
                                               **extras("prompt_completion")}, conv,
                         "columns 'prompt' and 'completion' ("
                         + ("conversational: lists of messages)" if conv else "standard: strings)"))
    if "instruction" in lower and "output" in lower:
        m = {"instruction": lower["instruction"], "output": lower["output"]}
        if "input" in lower:
            m["input"] = lower["input"]
        return Detection("alpaca", {**m, **extras("alpaca")}, False,
                         "columns instruction/input/output (Alpaca)")
    for p, c in QA_PAIRS:
        if p in lower and c in lower and not isinstance(_maybe_json(_first(rows, lower[p])), (list, dict)):
            note = " (preference data: the chosen answer becomes the completion)" if c == "chosen" else ""
            return Detection("question_answer", {"prompt": lower[p], "completion": lower[c],
                                                 **extras("question_answer")}, False,
                             f"column pair '{lower[p]}' -> '{lower[c]}'{note}")
    if "text" in lower:
        return Detection("text", {"text": lower["text"]}, False,
                         "a 'text' column and no role structure (raw text / language modeling)")
    return Detection(None, {}, None, f"no known format among columns {cols}")


def format_from_mapping(mapping: dict[str, str]) -> str | None:
    keys = set(mapping)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    return None


# ---- one row -> messages --------------------------------------------------------------------

def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal parts: [{"type": "text", "text": ...}, ...]
        return " ".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return "" if content is None else str(content)


def _tool_call(tc: Any) -> dict:
    tc = _maybe_json(tc)
    if not isinstance(tc, dict):
        raise RowError("bad_tool_call", f"tool call is a {type(tc).__name__}")
    fn = tc.get("function") if isinstance(tc.get("function"), dict) else None
    if fn is None:  # {"name", "arguments"} at top level (glaive function_call)
        if "name" not in tc:
            raise RowError("bad_tool_call", "tool call without a function name")
        fn, tc = {"name": tc["name"], "arguments": tc.get("arguments", {})}, {}
    if not isinstance(fn.get("name"), str) or not fn["name"]:
        raise RowError("bad_tool_call", "tool call without a function name")
    out = {k: v for k, v in tc.items() if k not in ("function", "type")}
    return {**out, "type": "function", "function": {**fn, "arguments": _arguments(fn)}}


def _arguments(fn: dict) -> dict:
    """A call's arguments as an object: OpenAI stores a JSON string, but HF chat templates render
    `arguments | tojson` or `| items` (a string would come out quoted, or raise)."""
    args = fn.get("arguments")
    if args is None:
        return {}
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise RowError("bad_tool_call", f"the arguments of '{fn['name']}' are not valid JSON: "
                                            f"{args[:60]!r}") from None
    if not isinstance(args, dict):
        raise RowError("bad_tool_call", f"the arguments of '{fn['name']}' are a "
                                        f"{type(args).__name__}, not a JSON object")
    return args


def _message(m: Any, idx: int, *, sharegpt: bool) -> dict:
    if not isinstance(m, dict):
        raise RowError("bad_type", f"message {idx} is a {type(m).__name__}, not an object")
    rkey, ckey = ("from", "value") if sharegpt else ("role", "content")
    raw_role = m.get(rkey)
    if not isinstance(raw_role, str):
        raise RowError("bad_type" if raw_role is not None else "missing_field",
                       f"message {idx} has no '{rkey}'")
    r = raw_role.strip().lower()
    content = m.get(ckey)
    if r in TOOL_CALL_ROLES:  # glaive: {"from": "function_call", "value": "{\"name\":..}"}
        calls = _maybe_json(content)
        if isinstance(calls, dict):
            calls = [calls]
        if not isinstance(calls, list) or not calls:
            raise RowError("bad_tool_call", f"message {idx}: {str(content)[:60]!r} is not a JSON call")
        return {"role": "assistant", "tool_calls": [_tool_call(c) for c in calls]}
    role = ROLE_ALIASES.get(r, raw_role)
    if isinstance(content, (int, float)) and not isinstance(content, bool):
        content = str(content)
    if content is not None and not isinstance(content, (str, list)):
        raise RowError("bad_type", f"message {idx} content is a {type(content).__name__}")
    out: dict[str, Any] = {"role": role}
    if content is not None:
        out["content"] = content
    if not sharegpt:
        for k, v in m.items():
            if k in ("role", "content") or v is None:
                continue
            if k == "tool_calls":
                if v:
                    out["tool_calls"] = [_tool_call(tc) for tc in (_maybe_json(v) or [])]
            else:
                out[k] = v
    return out


def _tools(v: Any) -> list | None:
    if v is None or v == "" or v == []:
        return None
    v = _maybe_json(v)
    if isinstance(v, dict):
        v = [v]
    if not isinstance(v, list):
        raise RowError("bad_tools", f"tools is a {type(v).__name__}")
    out = []
    for t in v:
        t = _maybe_json(t)
        if not isinstance(t, dict):
            raise RowError("bad_tools", "a tool is not an object")
        if isinstance(t.get("function"), dict):
            out.append({**t, "type": t.get("type", "function")})
        elif "name" in t:  # bare function schema (glaive): wrap as OpenAI/HF expect
            out.append({"type": "function", "function": t})
        else:
            raise RowError("bad_tools", "a tool has neither 'function' nor 'name'")
    return out or None


class _Rendered(str):
    """Text built from a mapping template: always one plain turn, never parsed as JSON."""


@functools.lru_cache(maxsize=64)
def _template_parts(value: str) -> tuple[tuple[str, str | None], ...]:
    """(literal text, column or None) pieces of a mapping template. ValueError: bad syntax."""
    parts = []
    for literal, name, spec, conv in string.Formatter().parse(value):
        if name is not None and (not name.strip() or spec or conv or any(c in name for c in ".[]")):
            raise ValueError(f"placeholder {{{name}{'!' + conv if conv else ''}"
                             f"{':' + spec if spec else ''}}} must be a plain column name "
                             "(no format spec, conversion, '.', '[', or empty {})")
        parts.append((literal, name))
    return tuple(parts)


def template_fields(value: str) -> tuple[str, ...] | None:
    """The column names of a mapping value like "Subject: {subject}\n\n{message}", or None when
    the value has no {column} placeholder (it is then a column name). ValueError: bad syntax."""
    names = tuple(dict.fromkeys(n for _, n in _template_parts(value) if n is not None))
    return names or None


def _as_template(value: str) -> tuple[str, ...] | None:
    """template_fields, or None for a value that is no valid template (a column name with a
    stray brace): templates given by the caller are validated before any row is read."""
    try:
        return template_fields(value) if "{" in value else None
    except ValueError:
        return None


def mapping_columns(mapping: dict[str, str]) -> dict[str, None]:
    """The source columns a mapping reads, templates included, in mapping order."""
    cols: dict[str, None] = {}
    for v in mapping.values():
        cols.update((c, None) for c in (_as_template(v) or (v,)))
    return cols


def _render(tpl: str, row: dict, key: str) -> _Rendered:
    """The template filled in from the row (numbers as text); a null column is a missing_field."""
    out = []
    for literal, name in _template_parts(tpl):
        out.append(literal)
        if name is not None:
            v = row.get(name)
            if v is None:
                raise RowError("missing_field", f"column '{name}' (in the {key} template) is null")
            out.append(_scalar(v, name))
    return _Rendered("".join(out))


def _get(row: dict, mapping: dict[str, str], key: str, required: bool = True) -> Any:
    col = mapping.get(key)
    if col is None:
        return None
    if col not in row and _as_template(col):
        return _render(col, row, key)
    v = row.get(col)
    if required and (v is None or (isinstance(v, str) and not v.strip() and key != "input")):
        raise RowError("missing_field" if v is None else "empty_content",
                       f"column '{col}' is {'null' if v is None else 'empty'}")
    return v


def _scalar(v: Any, col: str) -> str:
    if isinstance(v, str):
        return str(v)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    raise RowError("bad_type", f"column '{col}' is a {type(v).__name__}, expected text")


def _side(v: Any, col: str, role: str) -> list[dict]:
    if isinstance(v, _Rendered):
        return [{"role": role, "content": str(v)}]
    v = _maybe_json(v)
    if isinstance(v, list):
        if not v:
            raise RowError("empty_messages", f"column '{col}' is an empty list")
        return [_message(m, i, sharegpt=False) for i, m in enumerate(v)]
    return [{"role": role, "content": _scalar(v, col)}]


def to_messages(row: dict, fmt: str, mapping: dict[str, str]) -> tuple[list[dict], list | None]:
    """One source row -> (messages, tools). Raises RowError for rows that cannot convert."""
    tools = None
    if fmt in ("messages", "sharegpt"):
        key = "messages" if fmt == "messages" else "conversations"
        raw = _maybe_json(_get(row, mapping, key))
        if not isinstance(raw, list):
            raise RowError("bad_type", f"column '{mapping[key]}' is a {type(raw).__name__}, not a list")
        msgs = [_message(m, i, sharegpt=fmt == "sharegpt") for i, m in enumerate(raw)]
    elif fmt == "alpaca":
        instr = _scalar(_get(row, mapping, "instruction"), mapping["instruction"])
        inp = _get(row, mapping, "input", required=False)
        inp = "" if inp is None else _scalar(inp, mapping["input"])
        out = _scalar(_get(row, mapping, "output"), mapping["output"])
        user = f"{instr}\n\n{inp}" if inp.strip() else instr
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": out}]
    elif fmt in ("prompt_completion", "question_answer"):
        p = _side(_get(row, mapping, "prompt"), mapping["prompt"], "user")
        c = _side(_get(row, mapping, "completion"), mapping["completion"], "assistant")
        msgs = p + c
    elif fmt == "text":
        raise RowError("raw_text", "a 'text' row has no user/assistant roles")
    else:
        raise RowError("bad_type", f"unknown format {fmt!r}")
    if "tools" in mapping:
        tools = _tools(row.get(mapping["tools"]))
    if "system" in mapping:
        sys_v = _get(row, mapping, "system", required=False)
        if isinstance(sys_v, str) and sys_v.strip() and not any(m.get("role") == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": sys_v})
    return msgs, tools


def normalize(msgs: list[dict], *, drop_media: bool = False,
              merge_assistant: bool = False) -> tuple[list[dict], dict[str, int]]:
    """Rewrite a row's messages into what chat templates render, before the checks; returns the
    messages and the changes made, counted by CHANGE_HELP kind. RowError: a row that cannot be
    repaired (an image part without drop_media, a malformed legacy call)."""
    changes: dict[str, int] = {}
    if not merge_assistant and not any("function_call" in m or isinstance(m.get("content"), list)
                                       or "content" not in m or m["content"] is None for m in msgs):
        return msgs, changes  # the common case: nothing to rewrite, no copies
    steps = [("function_call_converted", _legacy_function_calls),
             ("media_parts_dropped", functools.partial(_text_content, drop_media=drop_media)),
             (None, _tool_call_content)]
    if merge_assistant:
        steps.append(("assistant_turns_merged", _merge_assistant_turns))
    for kind, step in steps:
        msgs, n = step(msgs)
        if n and kind:
            changes[kind] = n
    return msgs, changes


def _legacy_function_calls(msgs: list[dict]) -> tuple[list[dict], int]:
    """OpenAI's pre-tools format: an assistant `function_call` {name, arguments} becomes one
    `tool_calls` entry (role `function` results are already folded into `tool`)."""
    out, n = [], 0
    for m in msgs:
        if "function_call" in m and m.get("role") == "assistant":
            m = dict(m)
            fc = m.pop("function_call")
            if fc:
                m["tool_calls"] = list(m.get("tool_calls") or []) + [_tool_call(fc)]
                n += 1
        out.append(m)
    return out, n


def _text_content(msgs: list[dict], *, drop_media: bool) -> tuple[list[dict], int]:
    """Content given as a list of parts becomes one string: text-only templates concatenate
    `message.content` (a list raises, or renders as nothing). Non-text parts are an error unless
    drop_media; the count is of parts dropped."""
    out, dropped = [], 0
    for i, m in enumerate(msgs):
        content = m.get("content")
        if isinstance(content, list):
            texts, media = _split_parts(content)
            if media and not drop_media:
                raise RowError("media_content", f"message {i} ({m.get('role')}) has a "
                                                f"'{media[0]}' part")
            dropped += len(media)
            m = {**m, "content": "\n".join(texts)}
        out.append(m)
    return out, dropped


def _split_parts(parts: list) -> tuple[list[str], list[str]]:
    """(texts, types of the non-text parts) of a multimodal content list."""
    texts, media = [], []
    for p in parts:
        if isinstance(p, str):
            texts.append(p)
        elif isinstance(p, dict) and (p.get("type") in TEXT_PART_TYPES or
                                      ("type" not in p and isinstance(p.get("text"), str))):
            texts.append(str(p.get("text") or ""))
        else:
            media.append(str(p.get("type", "untyped")) if isinstance(p, dict) else type(p).__name__)
    return texts, media


def _tool_call_content(msgs: list[dict]) -> tuple[list[dict], int]:
    """Tool-call turns without content get "": templates that read `message.content` on every
    assistant turn (DeepSeek-V3, Phi-3, LFM2...) raise on the missing key, and transformers drops
    a null content before rendering, so null is no better than missing."""
    out, n = [], 0
    for m in msgs:
        if m.get("tool_calls") and m.get("content") is None:
            m, n = {**m, "content": ""}, n + 1
        out.append(m)
    return out, n


def _merge_assistant_turns(msgs: list[dict]) -> tuple[list[dict], int]:
    """Join runs of assistant turns (a reply split in two) into one; an earlier turn with
    tool_calls is never merged (its result would be missing between the turns)."""
    out: list[dict] = []
    n = 0
    for m in msgs:
        prev = out[-1] if out else None
        if prev is not None and m.get("role") == prev.get("role") == "assistant" \
                and not prev.get("tool_calls"):
            text = "\n\n".join(t for t in (_text_of(prev.get("content")), _text_of(m.get("content")))
                                if t.strip())
            out[-1] = {**m, **{k: v for k, v in prev.items() if k not in m}, "content": text}
            n += 1
            continue
        out.append(m)
    return out, n


def problems(msgs: list[dict]) -> list[tuple[str, str]]:
    """Every role-order and content problem of a conversation, as (kind, detail)."""
    out: list[tuple[str, str]] = []
    if not msgs:
        return [("empty_messages", "no messages")]
    prev = None
    prev_calls = False
    seen_non_system = False
    has_assistant = False
    for i, m in enumerate(msgs):
        role = m.get("role")
        text = _text_of(m.get("content"))
        calls = bool(m.get("tool_calls"))
        if role not in KNOWN_ROLES:
            out.append(("unknown_role", f"message {i} has role {role!r}"))
        if not text.strip() and not (role == "assistant" and calls):
            out.append(("empty_content", f"message {i} ({role}) is empty"))
        if role == "system":
            if i > 0:
                out.append(("system_not_first", f"message {i} is a system message"))
            prev, prev_calls = role, False
            continue
        if not seen_non_system and role == "assistant":
            out.append(("assistant_first", f"message {i} is the assistant's, before any user turn"))
        if role == "tool" and not (prev == "tool" or (prev == "assistant" and prev_calls)):
            out.append(("tool_without_call", f"message {i} is a tool result with no tool call before it"))
        if role == "user" and prev == "user":
            out.append(("consecutive_user", f"messages {i - 1} and {i} are both user turns"))
        if role == "assistant" and prev == "assistant":
            out.append(("consecutive_assistant", f"messages {i - 1} and {i} are both assistant turns"))
        has_assistant |= role == "assistant"
        seen_non_system = True
        prev, prev_calls = role, calls
    if not has_assistant:
        out.append(("no_assistant", "no assistant turn"))
    return out


def trim_trailing(msgs: list[dict]) -> tuple[list[dict], int]:
    """Drop turns after the last assistant turn (nothing to train on); return (msgs, dropped)."""
    if msgs and msgs[-1].get("role") == "assistant":
        return msgs, 0
    last = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), default=-1)
    return msgs[:last + 1], len(msgs) - last - 1


def add_system(msgs: list[dict], system_prompt: str | None) -> tuple[list[dict], bool]:
    """Prepend `system_prompt` when the conversation has no system message."""
    if system_prompt and not any(m.get("role") == "system" for m in msgs):
        return [{"role": "system", "content": system_prompt}] + msgs, True
    return msgs, False


def build_row(msgs: list[dict], tools: list | None, target: str) -> dict:
    """The output row: {"messages": ...} or conversational {"prompt": [...], "completion": [last
    assistant turn]}; every turn before the last assistant turn (tool calls included) is prompt."""
    msgs, _ = trim_trailing(msgs)
    if target == "messages":
        row: dict[str, Any] = {"messages": msgs}
    else:
        row = {"prompt": msgs[:-1], "completion": msgs[-1:]}
    if tools:
        row["tools"] = tools
    return row


def normalized(obj: Any) -> Any:
    """For near-duplicate detection: NFKC, casefolded, whitespace collapsed, recursively."""
    if isinstance(obj, str):
        return " ".join(unicodedata.normalize("NFKC", obj).casefold().split())
    if isinstance(obj, dict):
        return {k: normalized(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [normalized(v) for v in obj]
    return obj
