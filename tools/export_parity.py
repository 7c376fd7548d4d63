"""Parity proof: the GGUF, run by llama.cpp on CPU, against the Hugging Face model it came from.

Per sample prompt, on the rendered chat: (1) llama.cpp tokenizes the HF-rendered prompt to the
same ids; (2) the chat template embedded in the GGUF, rendered by llama-cpp-python's Jinja
formatter, gives the same prompt text; (3) greedy continuations agree token for token (16/32-bit)
or in most positions (quantized, teacher-forced top-1 agreement); (4) generation stops at the
trained end-of-turn (llama.cpp marks it end-of-generation, and stops there when HF does);
(5) llama-cpp-python's chat completion (the served path) returns HF's text.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from pydantic import BaseModel, Field

DEFAULT_PROMPTS = [
    "What is 12 + 7? Answer with the number only.",
    "Write one sentence about the sea.",
    "Name three primary colours.",
    "Translate 'good morning' into French.",
]
EXACT_TYPES = ("f32", "f16", "bf16")
# Greedy may flip where HF's two best logits are closer than the format's rounding moves them:
# that is a tie, not a defect. Logit units.
TIE_MARGIN = {"f32": 1e-3, "f16": 2e-2, "bf16": 1e-1}
# Minimum teacher-forced top-1 agreement for a quantized GGUF to pass.
MIN_AGREEMENT = {"q8_0": 0.95, "Q6_K": 0.9, "Q5_K_M": 0.88, "Q5_K_S": 0.88, "Q4_K_M": 0.85,
                 "Q4_K_S": 0.83, "Q3_K_M": 0.75, "Q2_K": 0.6}


class PromptParity(BaseModel):
    """One sample prompt: HF (transformers) vs the GGUF (llama.cpp)."""
    prompt: str
    prompt_tokens: int
    tokens_identical: bool = Field(description="llama.cpp tokenizes the HF-rendered chat to the same ids.")
    first_token_difference: int | None = None
    template_identical: bool = Field(description="the GGUF's embedded chat template renders the same text.")
    hf_continuation: str
    gguf_continuation: str
    greedy_identical: bool = Field(description="greedy tokens identical, including where they stop.")
    matching_prefix: int = Field(description="greedy tokens equal before the first difference.")
    divergence_margin: float | None = Field(
        default=None, description="HF's top-1 minus top-2 logit where greedy first differs "
                                  "(tiny: a tie that rounding may flip).")
    teacher_forced_agreement: float = Field(
        description="fraction of HF's continuation tokens that are llama.cpp's argmax given "
                    "the same prefix.")
    hf_stopped_at_end_of_turn: bool
    gguf_stopped_at_end_of_turn: bool
    served_text_identical: bool = Field(description="llama-cpp-python chat completion (greedy) "
                                                    "returns HF's text.")
    served_finish_reason: str | None = None


class FormatParity(BaseModel):
    """One GGUF file against the HF model."""
    format: str
    file: str
    tensor_types: dict[str, int] = Field(description="GGUF tensor types and counts (k-quants fall "
                                                     "back for rows not divisible by 256).")
    chat_template_identical: bool = Field(description="the GGUF's tokenizer.chat_template is the "
                                                      "training template, character for character.")
    end_of_turn_is_eog: bool = Field(description="llama.cpp ends generation on the trained "
                                                 "end-of-turn token.")
    prompts: list[PromptParity]
    greedy_identical: int = Field(description="prompts whose greedy continuation is identical.")
    ties: int = Field(description="prompts that differ only after a near-tie in HF's logits.")
    agreement: float = Field(description="mean teacher-forced top-1 agreement over the prompts.")
    passed: bool
    why: str


class ParityReport(BaseModel):
    """Evidence that the GGUF files behave like the HF model."""
    hf_model: str
    hf_dtype: str
    prompts: int
    max_new_tokens: int
    end_of_turn: str | None
    end_of_turn_ids: list[int]
    formats: list[FormatParity]
    passed: bool
    verdict: str = Field(description="one line: what holds, per format.")
    elapsed_s: float


# ----------------------------------------------------------------------------- HF reference
def stop_ids(tok, model_dir: Path) -> tuple[str | None, list[int]]:
    """The trained end-of-turn token and every id generation should stop on (generation_config
    eos list, tokenizer eos, the chat template's end-of-turn)."""
    import json

    from .merge import end_of_turn_token
    eot = end_of_turn_token(tok)
    ids: list[int] = []
    gc = model_dir / "generation_config.json"
    if gc.is_file():
        with contextlib.suppress(ValueError, OSError):
            e = json.loads(gc.read_text()).get("eos_token_id")
            ids += [i for i in (e if isinstance(e, list) else [e]) if isinstance(i, int)]
    for i in (tok.eos_token_id, tok.convert_tokens_to_ids(eot) if eot else None):
        if isinstance(i, int) and i >= 0 and i not in ids:
            ids.append(i)
    return eot, ids


def hf_reference(model_dir: Path, tok, prompts: list[str], max_new_tokens: int,
                 eos_ids: list[int], adapter: Path | None = None) -> list[dict]:
    """Rendered chat, its ids and the greedy continuation of the HF model (fp32 on CPU: the
    reference every GGUF is compared with), with the top-2 logit margin at each step. With
    `adapter`: the base with the PEFT adapter applied (what a GGUF LoRA must reproduce)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    with contextlib.redirect_stdout(sys.stderr):
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        if adapter is not None:
            from peft import PeftModel
            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.eval()
    gen = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos_ids,
                           pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos_ids[0],
                           output_scores=True, return_dict_in_generate=True)
    refs = []
    for p in prompts:
        chat = [{"role": "user", "content": p}]
        text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        ids = tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=False)
        ids = list(ids.tolist() if hasattr(ids, "tolist") else ids)
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 generation_config=gen)
        cont = out.sequences[0, len(ids):].tolist()
        margins = [float(t.topk(2).values[0, 0] - t.topk(2).values[0, 1]) for t in out.scores]
        stopped = bool(cont) and cont[-1] in eos_ids  # one row: generate ends on the eos itself
        refs.append({"prompt": p, "chat": chat, "text": text, "prompt_ids": ids, "continuation": cont,
                     "margins": margins, "stopped": stopped,
                     "reply": tok.decode([t for t in cont if t not in eos_ids], skip_special_tokens=False)})
    del model
    return refs


# ----------------------------------------------------------------------------- comparison
def _prefix(a: list[int], b: list[int]) -> int:
    from .masking_checks import common_prefix_ids  # one helper for "where token lists diverge"
    return common_prefix_ids(a, b)


def compare_prompt(ref: dict, got: dict, tok, eos_ids: list[int]) -> PromptParity:
    greedy = got["greedy"]["tokens"]
    cont = ref["continuation"]
    k = _prefix(cont, greedy)
    same = greedy == cont
    tf = got["teacher_forced"]
    agree = sum(int(a == b) for a, b in zip(tf, cont)) / len(cont) if cont else 1.0
    diff = None if got["ids"] == ref["prompt_ids"] else _prefix(got["ids"], ref["prompt_ids"])
    return PromptParity(
        prompt=ref["prompt"], prompt_tokens=len(ref["prompt_ids"]), tokens_identical=diff is None,
        first_token_difference=diff, template_identical=got["template_text"] == ref["text"],
        hf_continuation=tok.decode(cont, skip_special_tokens=False),
        gguf_continuation=tok.decode(greedy, skip_special_tokens=False),
        greedy_identical=same, matching_prefix=k,
        divergence_margin=None if same or k >= len(ref["margins"]) else round(ref["margins"][k], 5),
        teacher_forced_agreement=round(agree, 4), hf_stopped_at_end_of_turn=ref["stopped"],
        gguf_stopped_at_end_of_turn=bool(got["greedy"]["stopped"]) and greedy[-1] in eos_ids,
        served_text_identical=got["served"]["text"] == ref["reply"],
        served_finish_reason=got["served"]["finish_reason"])


def judge(fmt: str, file: str, got: dict, rows: list[PromptParity], hf_template: str,
          eot_id: int | None) -> FormatParity:
    """Pass/fail for one format, with the reason."""
    eog = bool(got["is_eog"].get(str(eot_id), False)) if eot_id is not None else True
    same_tmpl = got["chat_template"] == hf_template
    exact = sum(r.greedy_identical for r in rows)
    tie = TIE_MARGIN.get(fmt, 0.0)
    ties = sum(1 for r in rows if not r.greedy_identical and r.divergence_margin is not None
               and r.divergence_margin < tie)
    agreement = round(sum(r.teacher_forced_agreement for r in rows) / max(1, len(rows)), 4)
    problems = []
    if not all(r.tokens_identical for r in rows):
        problems.append("tokenization differs")
    if not same_tmpl or not all(r.template_identical for r in rows):
        problems.append("the embedded chat template renders differently")
    if not eog:
        problems.append("the end-of-turn token does not end generation")
    stops = [r for r in rows if r.hf_stopped_at_end_of_turn]
    if fmt in EXACT_TYPES:
        if exact + ties < len(rows):
            problems.append(f"greedy differs on {len(rows) - exact - ties}/{len(rows)} prompts")
        if any(not r.gguf_stopped_at_end_of_turn for r in stops if r.greedy_identical):
            problems.append("llama.cpp does not stop where HF stops")
    elif agreement < MIN_AGREEMENT.get(fmt, 0.8):
        problems.append(f"agreement {agreement:.1%} < {MIN_AGREEMENT.get(fmt, 0.8):.0%}")
    if fmt in EXACT_TYPES:
        why = (f"greedy identical on {exact}/{len(rows)} prompts" + (f" (+{ties} near-tie)" if ties else "")
               + f", stops at end-of-turn on {sum(r.gguf_stopped_at_end_of_turn for r in stops)}/{len(stops)}")
    else:
        why = f"top-1 agreement {agreement:.1%}, greedy identical on {exact}/{len(rows)}"
    if problems:
        why = "; ".join(problems) + f" ({why})"
    return FormatParity(format=fmt, file=file, tensor_types=got.get("tensor_types") or {},
                        chat_template_identical=same_tmpl, end_of_turn_is_eog=eog, prompts=rows,
                        greedy_identical=exact, ties=ties, agreement=agreement,
                        passed=not problems, why=why)


def probe_request(gguf: Path, refs: list[dict], eos_ids: list[int], max_new_tokens: int,
                  gguf_py: Path | None, lora: Path | None = None) -> dict:
    longest = max(len(r["prompt_ids"]) for r in refs)
    return {"gguf": str(gguf), "lora": str(lora) if lora else None, "chats": [r["chat"] for r in refs], "texts": [r["text"] for r in refs],
            "references": [{"prompt_ids": r["prompt_ids"], "continuation": r["continuation"]} for r in refs],
            "eot_ids": eos_ids, "max_new_tokens": max_new_tokens,
            "n_ctx": longest + max_new_tokens + 16, "threads": os.cpu_count() or 1,
            "gguf_py": str(gguf_py) if gguf_py else None}


def verdict_line(formats: list[FormatParity], n_prompts: int, eot: str | None) -> str:
    ok = all(f.passed for f in formats)
    parts = [f"{f.format} {'ok' if f.passed else 'FAIL'}: {f.why}" for f in formats]
    head = "PARITY OK" if ok else "PARITY FAILED"
    return (f"{head} on {n_prompts} prompts (tokens, embedded template, greedy; end-of-turn "
            f"{eot or 'unknown'}): " + "; ".join(parts))

