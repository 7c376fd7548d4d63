"""verify_masking, second half: turn TRL's labels for the checked rows into evidence and reasons.

`analyse` walks every checked row once (`_row_labels`, `_attribute`, `_check_prompt`,
`_check_turns`, `_check_generation_prompt`) collecting `Evidence`, then writes the report's
figures (`_fields`) and the reasons, ordered by harm (`HARM_ORDER`): what silently trains the
wrong thing first, cosmetic findings last.
"""
from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional

from . import chat_templates
from . import masking_checks as mc
from .masking import (TRUNCATION_FAIL_SHARE, ExampleView, MaskingSettings, Reason, RoleTokens,
                      Spread, TruncationStats)

PROMPT_ROLES = ("system", "user", "tool", "assistant_context")
# A reply whose data tokens are trained less than this is not being learned (issue: a
# reasoning template trained 9 of 194 completion tokens and passed). Token counts of a reply
# alone and in context differ by a few boundary merges, far less than this margin.
MIN_COMPLETION_TRAINED = 0.8
HARM_ORDER = (  # most harmful first, within each severity
    "reasoning_stripped_by_template", "tool_calls_not_rendered", "completion_not_trained",
    "messages_trains_all_tokens", "prompt_tokens_trained", "assistant_not_trained",
    "zero_trained_examples", "eos_not_trained", "eos_masked", "template_mismatch",
    "truncation_cuts_completions", "message_not_rendered", "template_text_trained",
    "stop_token_not_eos", "prompt_boundary_merge", "double_bos", "text_contains_chat_markup",
    "roles_unattributed", "packing_unmatched")
SEVERITY_ORDER = {"fail": 0, "warn": 1, "info": 2}


@dataclass
class Ctx:
    """What stays the same for every row."""
    tok: Any
    fmt: str
    settings: MaskingSettings
    stop_ids: set[int]
    train_template: Optional[str]  # TRL's swapped-in variant; None = the tokenizer's own
    template_text: Optional[str]   # the template the rows are rendered with, for advice
    added_ids: set[int]


@dataclass
class RowView:
    row: int                # row number in the split
    ids: list[int]
    labels: list[int]       # untruncated labels
    kept: int               # tokens left after truncation (0: dropped)
    trained: list[bool]     # per token of `ids`: trained after truncation and collation
    dropped: bool           # TRL dropped the row (no trained token within max_length)
    conv: Any = None
    offsets: Optional[list] = None
    roles: list[str] = field(default_factory=list)
    turns: list[int] = field(default_factory=list)


@dataclass
class Evidence:
    n: int = 0
    by_role: dict[str, list[int]] = field(default_factory=dict)
    shares: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    turns_total: int = 0
    turns_full: int = 0
    prompt_trained: int = 0
    rows: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    detail: dict[str, str] = field(default_factory=dict)
    eot_tokens: set[int] = field(default_factory=set)
    injected: dict[int, str] = field(default_factory=dict)  # row -> template text trained
    coverage: list[tuple[int, int]] = field(default_factory=list)  # (data, trained) tokens, short turns
    dropped_roles: dict[str, list[int]] = field(default_factory=dict)
    views: list[ExampleView] = field(default_factory=list)

    def add(self, key: str, row: int) -> None:
        if row not in self.rows[key]:
            self.rows[key].append(row)


# --------------------------------------------------------------------------------------------
# Per row
# --------------------------------------------------------------------------------------------
def _row_labels(src: dict, run, row: int, max_length: Optional[int]) -> RowView:
    ids, labels = list(src["input_ids"]), list(src["labels"])
    fin = run.final.get(src["__row"])
    if fin is not None and list(fin[0]) == ids[:len(fin[0])]:
        kept, labels_k = len(fin[0]), list(fin[1])
    else:
        kept, labels_k = 0, []
    trained = [labels_k[p] != -100 if p < kept else False for p in range(len(ids))]
    return RowView(row, ids, labels, kept, trained, dropped=fin is None)


def _attribute(ctx: Ctx, src: dict, rv: RowView) -> None:
    """Map every token to the message (role, turn) it renders; best effort, labels stay exact."""
    tools = mc.json_tools(src.get("tools"))
    kwargs = src.get("chat_template_kwargs") or {}
    view = dict(train_template=ctx.train_template, infer_template=None, tools=tools,
                kwargs=kwargs)
    try:
        if ctx.fmt == "messages":
            rv.conv = mc.conversation_view(ctx.tok, src["messages"], first_trained_turn=0, **view)
        elif ctx.fmt == "prompt_completion":
            rv.conv = mc.conversation_view(ctx.tok, list(src["prompt"]) + list(src["completion"]),
                                           first_trained_turn=len(src["prompt"]), **view)
        elif ctx.fmt == "prompt_completion_text":
            rv.conv = mc.text_view(src["prompt"], src["completion"], None, ctx.tok.eos_token)
        else:
            rv.conv = mc.text_view(None, None, src.get("text", ""), None)
    except Exception:  # noqa: BLE001 - attribution is best effort; the labels are exact
        rv.conv = None
    if rv.conv is not None:
        rv.offsets = mc.token_offsets(ctx.tok, rv.conv.text, rv.ids)
    if rv.offsets is None:
        rv.roles = ["unattributed"] * len(rv.ids)
    else:
        rv.roles, rv.turns = mc.token_roles(rv.conv, rv.offsets)


def _count(ev: Evidence, ctx: Ctx, rv: RowView) -> None:
    ev.lengths.append(len(rv.ids))
    n_trained = sum(rv.trained)
    if n_trained == 0:
        ev.add("removed" if any(lbl != -100 for lbl in rv.labels) else "zero", rv.row)
    elif any(rv.labels[p] != -100 for p in range(rv.kept, len(rv.ids))):
        ev.add("cut", rv.row)
    if ctx.settings.max_length is not None and len(rv.ids) > ctx.settings.max_length:
        ev.add("over", rv.row)
    if rv.kept:
        ev.shares.append(n_trained / rv.kept)
    for p in range(rv.kept):
        acc = ev.by_role.setdefault(rv.roles[p], [0, 0])
        acc[0] += 1
        acc[1] += int(rv.trained[p])
    if rv.conv is not None:
        for _, role in rv.conv.missing:
            ev.dropped_roles.setdefault(role, []).append(rv.row)


def _check_prompt(ev: Evidence, ctx: Ctx, rv: RowView) -> None:
    bad = [p for p in range(rv.kept) if rv.trained[p] and rv.roles[p] in PROMPT_ROLES]
    if bad:
        ev.add("prompt", rv.row)
        ev.prompt_trained += len(bad)
    bos, eos = ctx.tok.bos_token_id, ctx.tok.eos_token_id
    if ctx.fmt == "text" and any(rv.ids[p] in ctx.added_ids and rv.ids[p] not in (bos, eos)
                                 for p in range(rv.kept)):
        ev.add("chat_markup", rv.row)


def _check_turns(ev: Evidence, ctx: Ctx, rv: RowView) -> None:
    expected = [t for t in rv.conv.assistant_turns if t["trained_expected"]]
    for t in expected:
        k = t["turn"]
        content = [p for p in range(len(rv.ids)) if rv.turns[p] == k and rv.roles[p] == "assistant"]
        in_kept = [p for p in content if p < rv.kept]
        if t.get("tool_calls_missing"):
            ev.add("tool_calls_missing", rv.row)
            ev.detail.setdefault("tool_calls_missing", ", ".join(t["tool_calls_missing"][:3]))
        if not in_kept and content:
            continue  # entirely cut by truncation: counted there
        ev.turns_total += 1
        if all(rv.trained[p] for p in in_kept):
            ev.turns_full += 1
        else:
            ev.add("not_trained", rv.row)
        if content and content[-1] < rv.kept:
            _check_coverage(ev, ctx, rv, k, in_kept)
            _check_injected(ev, ctx, rv, k, content)
        _check_end_of_turn(ev, ctx, rv, t, content, last=t is expected[-1])


def _check_coverage(ev: Evidence, ctx: Ctx, rv: RowView, k: int, in_kept: list[int]) -> None:
    """The reply the data holds vs what is trained of it: a template may drop part of it."""
    pieces = rv.conv.pieces.get(k, [])
    if not pieces:
        return
    data = sum(len(ctx.tok(p.text, add_special_tokens=False)["input_ids"]) for p in pieces)
    trained = sum(1 for p in in_kept if rv.trained[p])
    if data and trained < MIN_COMPLETION_TRAINED * data:
        ev.coverage.append((data, trained))
        stripped = any(p.kind == "reasoning" and not p.rendered for p in pieces)
        ev.add("reasoning_stripped" if stripped else "completion_short", rv.row)


def _check_injected(ev: Evidence, ctx: Ctx, rv: RowView, k: int, content: list[int]) -> None:
    """Trained template text before the reply that the data never had (Qwen3's empty think)."""
    pieces = rv.conv.pieces.get(k, [])
    if any(p.kind == "reasoning" and p.rendered for p in pieces):
        return  # <think> around the data's own reasoning is the reply's, not injected
    run = [p for p in range(content[0]) if rv.turns[p] == k and rv.trained[p]
           and rv.roles[p] == mc.TEMPLATE]
    text = ctx.tok.decode([rv.ids[p] for p in run], skip_special_tokens=False) if run else ""
    if text.strip():
        ev.injected.setdefault(rv.row, text)


def _check_end_of_turn(ev: Evidence, ctx: Ctx, rv: RowView, t: dict, content: list[int],
                       last: bool) -> None:
    tok, k = ctx.tok, t["turn"]
    start = (content[-1] + 1) if content else next(
        (p for p, o in enumerate(rv.offsets) if o[0] >= t["content_end"]), len(rv.ids))
    eot = next((p for p in range(start, len(rv.ids)) if tok.decode([rv.ids[p]]).strip()), None)
    if eot is None:
        ev.add("eot_missing", rv.row)
        return
    if eot >= rv.kept:
        return  # cut by truncation: counted there
    if not rv.trained[eot]:
        ev.add("eot_masked", rv.row)
    else:
        ev.eot_tokens.add(rv.ids[eot])
    if last and ctx.stop_ids and rv.trained[eot] and not any(
            rv.trained[p] and rv.ids[p] in ctx.stop_ids for p in range(eot, rv.kept)):
        ev.add("no_stop", rv.row)
    for p in range(start, min(rv.kept, len(rv.ids))):  # an EOS inside the reply span, masked
        if rv.turns[p] != k:
            break
        if rv.ids[p] == tok.eos_token_id and not rv.trained[p]:
            ev.add("eos_masked", rv.row)
            break


def _check_generation_prompt(ev: Evidence, ctx: Ctx, rv: RowView) -> None:
    """The add_generation_prompt=True rendering used at inference vs the tokens trained on."""
    tok, conv = ctx.tok, rv.conv
    special = ctx.fmt in ("prompt_completion_text", "text")
    for _, gp in conv.gen_prompts:
        gp_ids = tok(gp, add_special_tokens=special)["input_ids"]
        if rv.ids[:len(gp_ids)] == list(gp_ids):
            continue
        if conv.text.startswith(gp):
            ev.add("merge", rv.row)
            if "merge" not in ev.detail:
                j = mc.common_prefix_ids(gp_ids, rv.ids)
                ev.detail["merge"] = (f"prompt ends {tok.decode(gp_ids[j:])!r} but training "
                                      f"has {tok.decode(rv.ids[j:j + 3])!r}")
        else:
            ev.add("mismatch", rv.row)
            if "mismatch" not in ev.detail:
                c = mc._common_prefix(gp, conv.text)
                ev.detail["mismatch"] = (f"inference prompt continues {gp[c:c + 60]!r}, "
                                         f"training text continues {conv.text[c:c + 60]!r}")
                ev.detail["mismatch_think"] = str("<think>" in gp[c:c + 60])
        break  # one mismatch per row is enough


def _example(ev: Evidence, ctx: Ctx, rv: RowView, show: int) -> None:
    if len(ev.views) >= show:
        return
    shown = rv.kept or min(len(rv.ids), ctx.settings.max_length or len(rv.ids))
    note = "" if rv.kept else ("dropped: no trained token left within max_length"
                               if rv.dropped else "no trained token")
    ev.views.append(ExampleView(
        row=rv.row, tokens=rv.kept, trained_tokens=sum(rv.trained),
        text=mc.decoded_view(ctx.tok, rv.ids[:shown], rv.trained[:shown], len(rv.ids) - shown,
                             note=note)))


def _walk(ctx: Ctx, run, idx: list[int], show: int) -> Evidence:
    ev = Evidence(n=len(run.full))
    for src in run.full:
        rv = _row_labels(src, run, idx[src["__row"]], ctx.settings.max_length)
        _attribute(ctx, src, rv)
        _count(ev, ctx, rv)
        if rv.offsets is None:
            ev.add("unaligned", rv.row)
        else:
            _check_prompt(ev, ctx, rv)
            _check_turns(ev, ctx, rv)
            _check_generation_prompt(ev, ctx, rv)
        bos = ctx.tok.bos_token_id
        if bos is not None and len(rv.ids) >= 2 and rv.ids[0] == bos == rv.ids[1]:
            ev.add("double_bos", rv.row)
        _example(ev, ctx, rv, show)
    return ev


# --------------------------------------------------------------------------------------------
# The whole split: lengths and truncation
# --------------------------------------------------------------------------------------------
@dataclass
class Lengths:
    rows: int
    lengths: list[int]
    over: list[int]
    cut: list[int]
    removed: list[int]
    zero: list[int]
    whole_split: bool


def _lengths(ev: Evidence, run, max_length: Optional[int]) -> Lengths:
    """Truncation counted on every row of the split when TRL could tokenise it, else the sample."""
    ls = run.lengths
    if ls is None:
        return Lengths(ev.n, ev.lengths, ev.rows["over"], ev.rows["cut"], ev.rows["removed"],
                       ev.rows["zero"], whole_split=False)
    out = Lengths(len(ls.rows), ls.lengths, [], [], [], [], whole_split=True)
    for row, n, trained, within in zip(ls.rows, ls.lengths, ls.trained, ls.trained_within):
        if max_length is not None and n > max_length:
            out.over.append(row)
        if trained == 0:
            out.zero.append(row)
        elif within == 0:
            out.removed.append(row)
        elif within < trained:
            out.cut.append(row)
    return out


# --------------------------------------------------------------------------------------------
# Report fields and reasons
# --------------------------------------------------------------------------------------------
def _spread(values: list[float], nd: int = 4) -> Optional[Spread]:
    if not values:
        return None
    return Spread(mean=round(statistics.fmean(values), nd), min=round(min(values), nd),
                  max=round(max(values), nd))


def _fields(ev: Evidence, ctx: Ctx, run, lens: Lengths, extra_zero: int) -> dict:
    tok, r = ctx.tok, ev.rows
    pad_eq = run.pad_token_id is not None and run.pad_token_id == tok.eos_token_id
    aligned = ev.n > len(r["unaligned"])
    return dict(
        trained_share=_spread(ev.shares),
        tokens_per_example=_spread([float(x) for x in lens.lengths], 1),
        rows_length_checked=lens.rows,
        trained_by_role={k: RoleTokens(tokens=v[0], trained=v[1]) for k, v in sorted(ev.by_role.items())},
        assistant_turns=ev.turns_total, assistant_turns_fully_trained=ev.turns_full,
        all_assistant_turns_trained=(ev.turns_total == ev.turns_full) if ev.turns_total else None,
        end_of_turn_trained=(not r["eot_masked"] and not r["eot_missing"]) if ev.turns_total else None,
        prompt_tokens_trained=ev.prompt_trained,
        # Checked only on rows whose tokens could be mapped to roles: no such row, no evidence.
        no_prompt_tokens_trained=(not r["prompt"]) if aligned else None,
        template_matches_inference=(not r["mismatch"]) if aligned else None,
        template_mismatch_examples=len(r["mismatch"]),
        double_bos_examples=len(r["double_bos"]), pad_token=run.pad_token,
        pad_equals_eos=pad_eq, eos_masked_examples=len(r["eos_masked"]),
        stop_tokens=[tok.convert_ids_to_tokens(i) for i in sorted(ctx.stop_ids)],
        truncation=TruncationStats(max_length=ctx.settings.max_length,
                                   longest_tokens=max(lens.lengths) if lens.lengths else 0,
                                   examples_over_max_length=len(lens.over),
                                   completions_cut=len(lens.cut),
                                   examples_removed=len(lens.removed)),
        zero_trained_examples=len(lens.zero) + len(lens.removed) + extra_zero,
        examples=ev.views, trl_warnings=run.warnings)


def _reasoning_fix(ctx: Ctx) -> str:
    near = chat_templates.closest(ctx.template_text) if ctx.template_text else None
    variant = (f"'{chat_templates.PREFIX}{near.training_variant}' (TRL's training variant of "
               f"{near.name}, which keeps the reasoning)" if near and near.training_variant else
               "a template that renders the reasoning in every assistant turn (e.g. "
               "'trl:deepseek_r1_distill_training.jinja', 'trl:qwen3_training.jinja')")
    return (f"Train with {variant}: pass it as chat_template here and set the same "
            "chat_template_path in the recipe (with messages data and assistant_only_loss, every "
            "turn's reasoning is trained). Or, if the model should answer without reasoning, drop "
            "the <think>...</think> part from the data. Deleting '<think>' from the template's "
            "generation prompt is not a fix: the reasoning would still be stripped.")


def _content_reasons(ev: Evidence, ctx: Ctx, R) -> None:
    r, n = ev.rows, ev.n
    if ev.coverage:
        data = sum(d for d, _ in ev.coverage)
        got = sum(t for _, t in ev.coverage)
        share = f"{got} of {data} tokens of the replies in the data are trained"
    if r["reasoning_stripped"]:
        R(Reason(severity="fail", code="reasoning_stripped_by_template",
                 message=f"the chat template drops the reasoning (<think>...</think>) from the "
                         f"replies of {len(r['reasoning_stripped'])}/{n} examples: {share}, so "
                         "the model learns the final answers without the reasoning.",
                 fix=_reasoning_fix(ctx), rows=r["reasoning_stripped"][:20]))
    if r["completion_short"]:
        R(Reason(severity="fail", code="completion_not_trained",
                 message=f"in {len(r['completion_short'])}/{n} examples much of the reply is not "
                         f"trained ({share}): the template does not render it, or masks it.",
                 fix="Read the decoded examples ([[...]] is trained): use a template that renders "
                     "the whole reply inside the trained span, then verify again.",
                 rows=r["completion_short"][:20]))
    if r["tool_calls_missing"]:
        R(Reason(severity="fail", code="tool_calls_not_rendered",
                 message=f"the chat template drops the tool calls of assistant turns in "
                         f"{len(r['tool_calls_missing'])}/{n} examples (e.g. "
                         f"{ev.detail['tool_calls_missing']}): those turns train on nothing.",
                 fix="Use a tool-capable template (one that renders message.tool_calls, e.g. "
                     "'trl:qwen3_training.jinja', 'trl:llama3_training.jinja' for Llama 3.1+), or "
                     "drop the tool-use rows.", rows=r["tool_calls_missing"][:20]))
    # A header token merged with the reply's first characters is a boundary merge, named there.
    injected = {row: t for row, t in ev.injected.items()
                if row not in r["merge"] and row not in r["mismatch"]}
    if injected:
        text, count = Counter(injected.values()).most_common(1)[0]
        think = "<think>" in text
        fix = ("The template writes an empty reasoning block into every reply; training on it "
               "teaches the model never to reason. Choose one: (1) for a model that should keep "
               "thinking, add the reasoning to the data (reasoning_content or <think>...</think> "
               "in the reply); (2) for a non-thinking fine-tune, use prompt/completion data with "
               "a chat_template_kwargs column {\"enable_thinking\": false} on every row "
               "(convert_dataset(chat_template_kwargs={\"enable_thinking\": false})): the "
               "block then belongs to the prompt and is not trained (use enable_thinking=False "
               "at inference too); or a template without the block (e.g. "
               "'trl:qwen3_instruct_2507.jinja'); (3) accept it knowingly."
               if think else "Use a template whose trained span holds only the reply and its "
               "end-of-turn token, or accept it knowingly.")
        R(Reason(severity="warn", code="template_text_trained",
                 message=f"text the data never had is trained in {len(injected)}/{n} "
                         f"examples: the template writes {text!r} before the reply"
                         + (f" ({count} of them)." if count < len(injected) else "."),
                 fix=fix, rows=sorted(injected)[:20]))


def _prompt_reasons(ev: Evidence, ctx: Ctx, R) -> None:
    r, n, s = ev.rows, ev.n, ctx.settings
    if r["prompt"]:
        rows, pt = r["prompt"][:20], ev.prompt_trained
        if ctx.fmt == "messages" and not s.assistant_only_loss:
            R(Reason(severity="fail", code="messages_trains_all_tokens",
                     message=f"messages data without assistant_only_loss trains every token, "
                             f"system and user turns included ({pt} prompt tokens trained in "
                             f"{len(r['prompt'])}/{n} examples); completion_only_loss has no "
                             "effect on messages data.",
                     fix="Convert to prompt/completion (convert_dataset "
                         "target_format=prompt_completion; completion_only_loss then masks the "
                         "prompt), or set assistant_only_loss=true with a template that has "
                         "{% generation %} markers.", rows=rows))
        elif ctx.fmt == "prompt_completion" and s.completion_only_loss is False:
            R(Reason(severity="fail", code="prompt_tokens_trained",
                     message=f"completion_only_loss=false trains the prompt too ({pt} "
                             f"system/user tokens in {len(r['prompt'])}/{n} examples).",
                     fix="Leave completion_only_loss unset (None) or true.", rows=rows))
        else:
            R(Reason(severity="fail", code="prompt_tokens_trained",
                     message=f"{pt} system/user/tool tokens are trained in "
                             f"{len(r['prompt'])}/{n} examples.",
                     fix="Put tool results and earlier turns in the prompt (prompt/completion), "
                         "or use assistant_only_loss with generation markers.", rows=rows))
    if r["not_trained"]:
        R(Reason(severity="fail", code="assistant_not_trained",
                 message=f"assistant reply tokens are masked in {len(r['not_trained'])}/{n} "
                         "examples: the model does not learn those replies.",
                 fix="With prompt/completion data, put every reply to learn in `completion`; with "
                     "assistant_only_loss, the {% generation %} span must cover the whole reply.",
                 rows=r["not_trained"][:20]))


def _eos_reasons(ev: Evidence, ctx: Ctx, pad_eq: bool, R) -> None:
    r, n, tok = ev.rows, ev.n, ctx.tok
    if r["eot_masked"] or r["eot_missing"]:
        rows = sorted(set(r["eot_masked"] + r["eot_missing"]))
        why = ("the end-of-turn/EOS token after the reply is masked" if r["eot_masked"]
               else "the template writes no end-of-turn token after the reply")
        fix = ("Put the end-of-turn token inside {% generation %}...{% endgeneration %} (TRL's "
               "*_training.jinja templates do)" if ctx.settings.assistant_only_loss else
               "Use a chat template that ends each assistant turn with an end-of-turn token")
        if pad_eq:
            fix += "; pad == eos here, so also set a pad token distinct from EOS"
        R(Reason(severity="fail", code="eos_not_trained",
                 message=f"{why} in {len(rows)}/{n} examples: the model never learns to stop.",
                 fix=fix + ".", rows=rows[:20]))
    if r["no_stop"]:
        names = ", ".join(repr(tok.convert_ids_to_tokens(i)) for i in sorted(ev.eot_tokens)) or "?"
        R(Reason(severity="warn", code="stop_token_not_eos",
                 message=f"replies end with {names}, which is not the tokenizer's EOS "
                         f"{tok.eos_token!r} (or a generation_config eos): generation may not "
                         "stop after a reply.",
                 fix="Set eos_token in the recipe (SFTConfig.eos_token) to the end-of-turn token, "
                     "or add it to generation_config.eos_token_id.", rows=r["no_stop"][:20]))
    if r["eos_masked"] and not r["eot_masked"]:
        R(Reason(severity="fail", code="eos_masked",
                 message=f"an EOS token inside a reply is masked in {len(r['eos_masked'])}/{n} "
                         "examples.",
                 fix="Set a pad token distinct from EOS, and keep EOS inside the trained span.",
                 rows=r["eos_masked"][:20]))
    if pad_eq:
        R(Reason(severity="info", code="pad_equals_eos",
                 message=f"pad token == EOS ({tok.eos_token!r}). TRL 1.16's collator pads labels "
                         "with -100 separately, so EOS stays trained"
                         + (" (checked)." if not r["eot_masked"] else ".")))


def _template_reasons(ev: Evidence, ctx: Ctx, R) -> None:
    r, n, tok = ev.rows, ev.n, ctx.tok
    if r["mismatch"]:
        if ev.detail.get("mismatch_think") == "True":
            fix = ("The generation prompt opens a <think> block that the rendered replies do not "
                   "have. For reasoning data, train with a template that keeps the reasoning in "
                   "the reply (e.g. 'trl:deepseek_r1_distill_training.jinja'), whose rendered "
                   "replies then start with the same '<think>\\n' as the prompt. Do not just "
                   "remove '<think>' from the generation prompt: with reasoning data that leaves "
                   "the reasoning stripped from training. For data without reasoning, use a "
                   "template without the <think> prompt, and verify again.")
        else:
            fix = ("Use a template that renders the prompt identically in both cases (e.g. one "
                   "that does not add/strip blocks or headers only in the generation prompt), or "
                   "fix the template, and verify again.")
        R(Reason(severity="fail", code="template_mismatch",
                 message=f"in {len(r['mismatch'])}/{n} examples the training sequence does not "
                         "start with the add_generation_prompt=True rendering used at inference: "
                         f"{ev.detail['mismatch']}. The model is trained on a context it never "
                         "sees when generating.", fix=fix, rows=r["mismatch"][:20]))
    if r["merge"]:
        R(Reason(severity="warn", code="prompt_boundary_merge",
                 message=f"in {len(r['merge'])}/{n} examples the prompt's last tokens merge with "
                         f"the completion's first ({ev.detail['merge']}): TRL starts the "
                         "completion where they diverge.",
                 fix="End prompts on a token boundary (e.g. with a newline) or start completions "
                     "with the separating space.", rows=r["merge"][:20]))
    if r["double_bos"]:
        R(Reason(severity="warn", code="double_bos",
                 message=f"{len(r['double_bos'])}/{n} examples start with two BOS tokens "
                         f"({tok.bos_token!r}): the text already has BOS and the tokenizer adds "
                         "another.",
                 fix="Remove the BOS from the text (e.g. render prompts with the chat template "
                     "without bos_token) or use conversational data so TRL tokenises once.",
                 rows=r["double_bos"][:20]))
    for role, rws in sorted(ev.dropped_roles.items()):
        rws = sorted(set(rws))
        system = mc.norm_role(role) == "system"
        R(Reason(severity="warn" if system else "fail", code="message_not_rendered",
                 message=f"the chat template does not render the content of '{role}' messages "
                         f"in {len(rws)}/{n} examples"
                         + (" (it drops system prompts)." if system else
                            ": the model trains on text without them."),
                 fix="Use the roles the template knows (system/user/assistant/tool, with "
                     "role/content keys; convert ShareGPT human/gpt with convert_dataset), or a "
                     "template that renders every message.", rows=rws[:20]))


def _length_reasons(ev: Evidence, lens: Lengths, ctx: Ctx, R) -> None:
    where = (f"of all {lens.rows} rows" if lens.whole_split else f"of the {lens.rows} checked rows")
    if lens.cut or lens.removed:
        bad = len(lens.cut) + len(lens.removed)
        longest = max(lens.lengths) if lens.lengths else 0
        R(Reason(severity="fail" if bad > TRUNCATION_FAIL_SHARE * lens.rows else "warn",
                 code="truncation_cuts_completions",
                 message=f"max_length={ctx.settings.max_length} cuts trained tokens ({where}): "
                         f"{len(lens.cut)} example(s) lose part of the reply (and its EOS), "
                         f"{len(lens.removed)} lose all of it (TRL drops them, or with packing "
                         f"they train on nothing); longest example {longest} tokens.",
                 fix=f"Raise max_length (>= {longest} covers every example) if memory allows, or "
                     "drop/shorten long examples (convert_dataset length filter).",
                 rows=(lens.cut + lens.removed)[:20]))
    if lens.zero:
        R(Reason(severity="fail", code="zero_trained_examples",
                 message=f"{len(lens.zero)} examples ({where}) have no trained token at all.",
                 fix="Give every example a reply to learn (an assistant message / non-empty "
                     "completion), or drop those rows.", rows=lens.zero[:20]))


def _other_reasons(ev: Evidence, ctx: Ctx, run, R) -> None:
    r, n = ev.rows, ev.n
    if r["chat_markup"]:
        R(Reason(severity="warn", code="text_contains_chat_markup",
                 message="text rows contain chat-template tokens: every token is trained, user "
                         "turns included.",
                 fix="Convert to prompt/completion or messages (convert_dataset) so only replies "
                     "are trained.", rows=r["chat_markup"][:20]))
    if ctx.fmt == "text":
        R(Reason(severity="info", code="language_modeling",
                 message="text data: every token is trained (continued pre-training)."))
    if r["unaligned"]:
        none = len(r["unaligned"]) == n
        R(Reason(severity="warn", code="roles_unattributed",
                 message=f"could not map tokens to roles in {len(r['unaligned'])}/{n} examples, "
                         "so prompt masking, assistant turns, end-of-turn and the inference "
                         "template " + ("are NOT checked for any example (those flags are null: "
                                        "no evidence)" if none else
                                        "are checked on the other examples only")
                         + "; the trained-token counts are still TRL's own.",
                 fix="Read the decoded examples ([[...]] marks what is trained) before training; a "
                     "template whose output is not the concatenation of its messages causes this.",
                 rows=r["unaligned"][:20]))
    if run.unmatched_segments:
        R(Reason(severity="warn", code="packing_unmatched",
                 message=f"{run.unmatched_segments} packed segments could not be matched to rows."))


def by_harm(reasons: list[Reason]) -> list[Reason]:
    """Fail before warn before info; within each, what trains the wrong thing silently first."""
    rank = {c: i for i, c in enumerate(HARM_ORDER)}
    return sorted(reasons, key=lambda r: (SEVERITY_ORDER[r.severity], rank.get(r.code, len(rank))))


def analyse(base: dict, reasons: list[Reason], run, tok, idx: list[int], fmt: str,
            stop_ids: set[int], show_examples: int, template_text: Optional[str]) -> dict:
    """The report's fields and reasons for TRL's prepared rows (`run`)."""
    settings: MaskingSettings = base["settings"]
    ctx = Ctx(tok=tok, fmt=fmt, settings=settings, stop_ids=stop_ids,
              train_template=run.training_template, template_text=template_text,
              added_ids=set(tok.get_added_vocab().values()) | set(tok.all_special_ids))
    ev = _walk(ctx, run, idx, show_examples)
    lens = _lengths(ev, run, settings.max_length)
    report = dict(base)
    extra_zero = report.pop("zero_trained_examples_extra", 0)
    report.update(_fields(ev, ctx, run, lens, extra_zero))
    R = reasons.append
    _prompt_reasons(ev, ctx, R)
    _eos_reasons(ev, ctx, report["pad_equals_eos"], R)
    _template_reasons(ev, ctx, R)
    _content_reasons(ev, ctx, R)  # after the generation-prompt check: it reads its rows
    _length_reasons(ev, lens, ctx, R)
    _other_reasons(ev, ctx, run, R)
    return report
