"""Spot-check a model: its replies to a few prompts, or to the first rows of a dataset split,
next to another model's (base vs fine-tuned) and the reference answer.

Models are local directories in the workspace: a full or merged model, or a PEFT adapter loaded
on its base (adapter_config.json base_model_name_or_path, or base_model=), never merged and
nothing downloaded. Prompts go through each model's own tokenizer and chat template (an adapter's
saved tokenizer carries the training template). Greedy by default; sampling is seeded per prompt,
so both models draw with the same seed and a call repeats.
"""
from __future__ import annotations

import contextlib
import gc
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from .errors import UserError
from .params import Dtype
from .results import SUMMARY_MAX_CHARS, ToolResult
from .workspace import get_workspace

MAX_PROMPTS = 32
CELL = 160  # characters of a reply in the side-by-side table; the rows hold the full text


class ModelOutput(BaseModel):
    """One model's reply to one prompt."""
    label: str
    text: str
    new_tokens: int
    stopped: Literal["end_of_turn", "max_new_tokens"] = Field(
        description="end_of_turn: the model ended its reply; max_new_tokens: it was cut off.")


class GenerationRow(BaseModel):
    """A prompt, its reference (from a dataset) and every model's reply."""
    index: int
    prompt: str = Field(description="the last user message (earlier turns are in `turns`).")
    system: str | None = None
    turns: int = Field(1, description="user/assistant messages before the reply.")
    line: int | None = Field(None, description="line of the dataset file.")
    reference: str | None = None
    outputs: list[ModelOutput]


class ModelInfo(BaseModel):
    """How one model was loaded and prompted."""
    label: str
    model: str
    adapter: str | None = None
    tokenizer: str
    chat_template: bool = Field(description="prompts were rendered with the chat template.")
    example_prompt: str = Field(description="the first prompt exactly as the model saw it.")
    elapsed_s: float


class GenerateResult(ToolResult):
    """Replies side by side, with how each model was loaded and the decoding settings."""
    rows: list[GenerationRow]
    models: list[ModelInfo]
    source: str | None = Field(None, description="the dataset file the prompts came from.")
    settings: dict[str, Any]
    table: str
    notes: list[str] = []
    elapsed_s: float

    def key_figures(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prompts": len(self.rows), "source": self.source}
        for k, m in enumerate(self.models):
            out[f"{m.label} replies cut"] = sum(r.outputs[k].stopped == "max_new_tokens" for r in self.rows)
        if len(self.models) == 2:
            out["replies that differ"] = sum(r.outputs[0].text != r.outputs[1].text for r in self.rows)
        out["elapsed_s"] = self.elapsed_s
        return {k: v for k, v in out.items() if v is not None}


# ----------------------------------------------------------------------------- prompts
def _prompt_rows(prompts: list[str] | None, dataset: str | None, split: str | None, rows: int,
                 prompt_field: str | None, answer_field: str | None, system_prompt: str | None,
                 notes: list[str]) -> tuple[list[dict], str | None]:
    """[{messages, reference, line}] from the prompts or the first `rows` rows of the dataset."""
    if bool(prompts) == bool(dataset):
        raise UserError("give either prompts or dataset." if prompts else "nothing to generate from.",
                        field="prompts", fix="Pass prompts=['...'] or dataset=<JSONL or dataset dir> "
                                             "(with split and rows), not both.")
    if split and not dataset:
        raise UserError("split applies to dataset.", field="split", fix="Pass dataset=<dir>, or drop split.")
    items: list[dict] = []
    source = None
    if prompts:
        if len(prompts) > MAX_PROMPTS:
            raise UserError(f"{len(prompts)} prompts; at most {MAX_PROMPTS}.", field="prompts",
                            fix="Spot-check a few; use evaluate for a whole split.")
        for i, p in enumerate(prompts):
            if not str(p).strip():
                raise UserError(f"prompt {i} is empty.", field=f"prompts[{i}]", fix="Give the prompt text.")
            items.append({"messages": [{"role": "user", "content": str(p)}], "reference": None, "line": None})
    else:
        from .eval_tasks import LETTERS, choice_prompt, read_examples
        rs = read_examples(dataset, split=split, prompt_field=prompt_field, answer_field=answer_field,
                           field="dataset")
        notes.extend(sorted(n for n in rs.notes if n.startswith("Skipped")))
        source = get_workspace().rel(rs.source)
        for ex in rs.examples[:rows]:
            msgs, ref = [dict(m) for m in ex.messages], ex.answer
            if ex.choices is not None:  # the same lettered question evaluate asks
                last = max(i for i, m in enumerate(msgs) if m["role"] != "system")
                msgs[last]["content"] = choice_prompt(msgs[last]["content"], ex.choices, True)
                ref = f"{LETTERS[ex.answer]}. {ex.choices[ex.answer]}"
            items.append({"messages": msgs, "reference": str(ref).strip(), "line": ex.line})
    if system_prompt is not None:
        for it in items:
            it["messages"] = ([{"role": "system", "content": system_prompt}]
                              + [m for m in it["messages"] if m["role"] != "system"])
    return items, source


def _render(tok, messages: list[dict], use_chat: bool) -> str:
    """The prompt text: the chat template with the assistant turn opened, or the plain text."""
    if not use_chat:
        return "\n\n".join(m["content"] for m in messages)
    try:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - jinja raises its own types (e.g. "no system role")
        if messages and messages[0]["role"] == "system":  # templates without a system role
            rest = [dict(m) for m in messages[1:]]
            rest[0]["content"] = f"{messages[0]['content']}\n\n{rest[0]['content']}"
            return _render(tok, rest, use_chat)
        raise UserError(f"the chat template fails on this prompt ({type(exc).__name__}: "
                        f"{str(exc)[:200]}).", field="apply_chat_template",
                        fix="Check the template (verify_masking shows it), or pass "
                            "apply_chat_template=false for plain text.") from None


# ----------------------------------------------------------------------------- models
def _model_dir(name: str, field: str) -> Path:
    """A full model directory inside the workspace (local only: nothing is downloaded)."""
    ws = get_workspace()
    p = ws.resolve(name, field=field, kind="dir")  # outside the workspace: refused here
    if not p.is_dir():
        raise UserError(f"'{name}' is not a model directory in the workspace ({ws.root}); generate "
                        "loads local models only, nothing is downloaded.", field=field,
                        fix="Download it into the workspace (`hf download ORG/NAME --local-dir "
                            "models/NAME`) and pass that path.")
    if not (p / "config.json").exists():
        raise UserError(f"'{name}' has no config.json, so it is not a full model directory.",
                        field=field, fix="Give a full or merged model dir, or an adapter dir as model.")
    return p


def _resolve(name: str, field: str, base_model: str | None) -> tuple[Path, Path | None]:
    """(base or full model dir, adapter dir or None) for `name`."""
    ws = get_workspace()
    p = ws.resolve(name, field=field, must_exist=True, kind="dir")
    if (p / "config.json").exists() or not (p / "adapter_config.json").exists():
        return _model_dir(name, field), None
    try:
        acfg = json.loads((p / "adapter_config.json").read_text())
    except ValueError as exc:
        raise UserError(f"adapter_config.json is not valid JSON ({exc}).", field=field,
                        fix="Re-save the adapter with PeftModel.save_pretrained.") from None
    base = base_model or acfg.get("base_model_name_or_path")
    if not base:
        raise UserError("the adapter names no base model.", field="base_model",
                        fix="Pass base_model=<the base model dir>.")
    return _model_dir(str(base), "base_model" if base_model else
                      f"{field} (adapter_config.json base_model_name_or_path)"), p


def _load(base: Path, adapter: Path | None, field: str, device: str, dtype_name: str):
    """(model, tokenizer, tokenizer dir): the adapter on its base, unmerged."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok_dir = adapter if adapter is not None and any(
        (adapter / f).exists() for f in ("tokenizer_config.json", "tokenizer.json")) else base
    try:
        tok = AutoTokenizer.from_pretrained(str(tok_dir))
        model = AutoModelForCausalLM.from_pretrained(
            str(base), dtype=getattr(torch, dtype_name),
            **({"device_map": device} if device != "cpu" else {}))
        if adapter is not None:
            from peft import PeftModel

            from .merge import _adapter_vocab
            want = _adapter_vocab(adapter) or (len(tok) if len(tok) > model.get_input_embeddings().weight.shape[0]
                                               else None)
            if want and want != model.get_input_embeddings().weight.shape[0]:
                model.resize_token_embeddings(want)
            model = PeftModel.from_pretrained(model, str(adapter))
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"could not load {_rel(adapter or base)} ({type(exc).__name__}: "
                        f"{str(exc)[:300]}).", field=field,
                        fix="Check that the directory holds a complete model (and that an adapter "
                            "matches its base: pass base_model=).") from None
    return model.to(device).eval(), tok, tok_dir


def _rel(p: Path) -> str:
    return get_workspace().rel(p)


def _stop_ids(model, tok) -> list[int]:
    """Token ids that end a reply: the tokenizer eos, the chat end-of-turn token, the model's eos."""
    from .merge import end_of_turn_token
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eot = end_of_turn_token(tok)
    for i in [*(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]), tok.eos_token_id,
              tok.convert_tokens_to_ids(eot) if eot else None]:
        if isinstance(i, int) and i >= 0 and i not in ids:
            ids.append(i)
    return ids


def _generate_all(model, tok, items: list[dict], use_chat: bool, settings: dict, label: str
                  ) -> tuple[list[ModelOutput], str]:
    """Every item's reply from one model, and the first prompt as rendered."""
    import torch
    from transformers import GenerationConfig
    stops = _stop_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (stops[0] if stops else 0)
    # A fresh config: only the settings returned are used, not the model's sampling defaults.
    gc_kw: dict[str, Any] = {"max_new_tokens": settings["max_new_tokens"], "do_sample": settings["do_sample"],
                             "eos_token_id": stops or None, "pad_token_id": pad}
    if settings["do_sample"]:
        gc_kw.update(temperature=settings["temperature"], top_p=settings["top_p"])
    gconf = GenerationConfig(**gc_kw)
    dev = next(model.parameters()).device
    outs, first = [], ""
    for i, it in enumerate(items):
        text = _render(tok, it["messages"], use_chat)
        first = first or text
        enc = tok(text, return_tensors="pt", add_special_tokens=not use_chat).to(dev)
        torch.manual_seed(settings["seed"] + i)  # the same draw per prompt for every model
        with torch.inference_mode():
            seq = model.generate(**enc, generation_config=gconf)
        new = seq[0, enc["input_ids"].shape[1]:].tolist()
        ended = bool(new) and new[-1] in stops
        outs.append(ModelOutput(label=label, text=tok.decode(new, skip_special_tokens=True).strip(),
                                new_tokens=len(new), stopped="end_of_turn" if ended else "max_new_tokens"))
    return outs, first


def _run_model(label: str, name: str, field: str, base_model: str | None, items: list[dict],
               settings: dict, notes: list[str]) -> tuple[list[ModelOutput], ModelInfo]:
    t0 = time.time()
    base, adapter = _resolve(name, field, base_model)
    model, tok, tok_dir = _load(base, adapter, field, settings["device"], settings["dtype"])
    use_chat = settings["apply_chat_template"]
    if use_chat and not getattr(tok, "chat_template", None):
        use_chat = False
        notes.append(f"{label}: the tokenizer has no chat template: prompts are sent as plain text.")
    try:
        outs, first = _generate_all(model, tok, items, use_chat, settings, label)
    finally:
        del model
        gc.collect()
        with contextlib.suppress(Exception):
            import torch
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    info = ModelInfo(label=label, model=_rel(base), adapter=_rel(adapter) if adapter else None,
                     tokenizer=_rel(tok_dir), chat_template=use_chat, example_prompt=first,
                     elapsed_s=round(time.time() - t0, 2))
    return outs, info


# ----------------------------------------------------------------------------- result
def _cell(text: str | None) -> str:
    if text is None:
        return "-"
    t = " ⏎ ".join(text.strip().splitlines()).replace("|", "\\|")
    t = "".join(ch if ch.isprintable() else "\ufffd" for ch in t)  # control bytes garble terminals
    return t if len(t) <= CELL else t[:CELL - 3] + "..."


def _table(rows: list[GenerationRow], labels: list[str], with_ref: bool) -> str:
    head = ["#", "prompt"] + (["reference"] if with_ref else []) + labels
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r.index), _cell(r.prompt)] + ([_cell(r.reference)] if with_ref else [])
        cells += [_cell(o.text) + (" (cut)" if o.stopped == "max_new_tokens" else "") for o in r.outputs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _compare_notes(rows: list[GenerationRow], labels: list[str], max_new_tokens: int) -> list[str]:
    notes = []
    if len(labels) == 2 and all(r.outputs[0].text == r.outputs[1].text for r in rows):
        notes.append(f"{labels[0]} and {labels[1]} give the same reply to every prompt: the "
                     "fine-tuning changes nothing visible here (an untrained adapter, or the same "
                     "model twice?).")
    for k, label in enumerate(labels):
        if all(r.outputs[k].stopped == "max_new_tokens" for r in rows):
            notes.append(f"{label}: no reply ended within max_new_tokens={max_new_tokens}: raise it, "
                         "or check that the model was trained to emit its end-of-turn token.")
    return notes


def _settings(max_new_tokens: int, do_sample: bool, temperature: float, top_p: float, seed: int,
              dtype: str, apply_chat_template: bool) -> dict[str, Any]:
    """The decoding settings every model gets (sampling values only when sampling)."""
    from .evaluate import _device_dtype
    device, dtype_name = _device_dtype(dtype)
    return {"max_new_tokens": max_new_tokens, "do_sample": do_sample,
            "temperature": temperature if do_sample else None, "top_p": top_p if do_sample else None,
            "seed": seed, "device": device, "dtype": dtype_name,
            "apply_chat_template": apply_chat_template,
            "decoding": "sampled" if do_sample else "greedy"}


def _result_rows(items: list[dict], outputs: list[list[ModelOutput]]) -> list[GenerationRow]:
    """One row per prompt: its last user turn, system prompt, reference and every model's reply."""
    rows = []
    for k, it in enumerate(items):
        msgs = it["messages"]
        system = next((m["content"] for m in msgs if m["role"] == "system"), None)
        turns = [m for m in msgs if m["role"] != "system"]
        rows.append(GenerationRow(index=k, prompt=turns[-1]["content"], system=system,
                                  turns=len(turns), line=it["line"], reference=it["reference"],
                                  outputs=[o[k] for o in outputs]))
    return rows


def _summary(r: GenerateResult) -> str:
    """How many prompts, which models, and what stands out: same replies, replies cut off."""
    names = " vs ".join(f"{m.label} ({m.adapter or m.model})" for m in r.models)
    text = f"{len(r.rows)} prompt(s){f' from {r.source}' if r.source else ''}, {names}"
    if len(r.models) == 2:
        same = sum(row.outputs[0].text == row.outputs[1].text for row in r.rows)
        text += f": {len(r.rows) - same} of {len(r.rows)} replies differ"
    cut = [sum(row.outputs[k].stopped == "max_new_tokens" for row in r.rows) for k in range(len(r.models))]
    text += (f"; cut at max_new_tokens={r.settings['max_new_tokens']}: "
             + ", ".join(f"{m.label} {c}" for m, c in zip(r.models, cut)) if any(cut)
             else "; every reply ended at its end-of-turn token") + "."
    return text if len(text) <= SUMMARY_MAX_CHARS else text[:SUMMARY_MAX_CHARS - 3] + "..."


def _next_steps(r: GenerateResult, model: str, compare_with: str | None, dataset: str | None,
                prompts: list[str] | None) -> list[str]:
    steps = []
    n = r.settings["max_new_tokens"]
    if all(row.outputs[0].stopped == "max_new_tokens" for row in r.rows) and n < 4096:
        source = f"dataset='{dataset}'" if dataset else (
            f"prompts={prompts!r}" if len(repr(prompts)) <= 160 else "prompts=[...]")
        other = f"compare_with='{compare_with}', " if compare_with else ""
        steps.append(f"generate(model='{model}', {other}{source}, max_new_tokens={min(4096, 4 * n)}) "
                     "to see whole replies")
    first = r.models[0]
    kind = "adapter" if first.adapter else "model"
    # evaluate's compare_with is a full model: an adapter given as the second model is left out
    base = f", compare_with='{compare_with}'" if compare_with and not r.models[1].adapter else ""
    data = f"'{dataset}'" if dataset else "'<test JSONL or dataset dir>'"
    steps.append(f"evaluate({kind}='{first.adapter or first.model}'{base}, local_task={data})")
    return steps


# ----------------------------------------------------------------------------- the tool
def generate(
    model: Annotated[str, Field(description="Model dir, or adapter dir (on its base).")],
    compare_with: Annotated[str | None, Field(description="Second model, e.g. the base.")] = None,
    prompts: Annotated[list[str] | None, Field(description="User prompts (instead of dataset).")] = None,
    dataset: Annotated[str | None, Field(description="JSONL or dataset dir: prompts + references.")] = None,
    split: str | None = None,
    rows: Annotated[int, Field(ge=1, le=MAX_PROMPTS)] = 5,
    prompt_field: str | None = None,
    answer_field: str | None = None,
    system_prompt: str | None = None,
    base_model: Annotated[str | None, Field(description="Base for an adapter model.")] = None,
    apply_chat_template: bool = True,
    max_new_tokens: Annotated[int, Field(ge=1, le=4096)] = 128,
    do_sample: bool = False,
    temperature: Annotated[float, Field(gt=0, le=2)] = 0.7,
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0,
    seed: Annotated[int, Field(ge=0, description="Prompt i uses seed+i.")] = 0,
    dtype: Dtype = "auto",
) -> GenerateResult:
    """Spot-check a model (full, merged or adapter) on a few prompts or a dataset's first rows,
    side by side with compare_with (e.g. the base). Local models only; writes nothing.

    Call before trusting a metric. Each model's chat template is applied; greedy by default, or
    sampled with a seed. Returns per prompt the prompt, the reference, each model's reply and
    whether it ended or was cut at max_new_tokens, how each model was prompted (the first prompt
    as rendered), and a markdown table.

    Parameters:
    - model: a full or merged model dir, or a PEFT adapter dir (loaded on its base, unmerged).
    - compare_with: a second model, e.g. the base: same prompts and settings, replies side by side.
    - prompts: user prompts (instead of dataset); at most 32.
    - dataset: JSONL or convert_dataset dir in the workspace: prompts and references from its
      first rows.
    - split: with a dataset dir, which <split>.jsonl (default test, else validation, else train).
    - rows: dataset rows to use.
    - prompt_field: prompt column (auto: question/prompt/..., or messages).
    - answer_field: reference column (auto: answer/completion/...).
    - system_prompt: system message for every prompt (default: the row's own, if any).
    - base_model: base dir for an adapter given as model (default: its adapter_config.json).
    - apply_chat_template: render prompts with each model's chat template.
    - max_new_tokens: max tokens per reply.
    - do_sample, temperature, top_p: sample instead of greedy decoding, with these settings.
    - seed: prompt i is sampled with seed+i, for every model (the same draw for both).
    - dtype: auto: bf16/fp16 on GPU, fp32 on CPU.
    """
    t0 = time.time()
    notes: list[str] = []
    items, source = _prompt_rows(prompts, dataset, split, rows, prompt_field, answer_field,
                                 system_prompt, notes)
    settings = _settings(max_new_tokens, do_sample, temperature, top_p, seed, dtype, apply_chat_template)
    plan = [("fine-tuned" if compare_with else "model", model, "model", base_model)]
    if compare_with:
        plan.append(("base", compare_with, "compare_with", None))
    for _label, name, field, base in plan:  # every path is checked before a model loads
        _resolve(name, field, base)
    outputs, infos = [], []
    with contextlib.redirect_stdout(sys.stderr):  # never write to an MCP stdio stream
        for label, name, field, base in plan:
            outs, info = _run_model(label, name, field, base, items, settings, notes)
            outputs.append(outs)
            infos.append(info)
    labels = [i.label for i in infos]
    result_rows = _result_rows(items, outputs)
    notes.extend(_compare_notes(result_rows, labels, max_new_tokens))
    r = GenerateResult(rows=result_rows, models=infos, source=source, settings=settings,
                       table=_table(result_rows, labels, source is not None), notes=notes,
                       elapsed_s=round(time.time() - t0, 2))
    r.summary, r.next_steps = _summary(r), _next_steps(r, model, compare_with, dataset, prompts)
    return r
