"""verify_preference for KTO and GRPO (tools.preference proves DPO / ORPO pairs).

KTO: a `KTOTrainer` is built on throw-away 1-layer models, so its constructor prepares the split
as training will (prompt extraction, unpairing of pairs, EOS for text rows, the chat template,
tokenisation, the drop of rows whose prompt fills max_length, the KL completions); every row then
goes through its `DataCollatorForUnpairedPreference`. Checked: nothing of the prompt is scored,
the end of turn is scored, truncation, TRL's drops, the label balance.

GRPO: nothing is scored from the data (the completions are generated); what can ruin the run is
checked instead: every prompt renders with the generation prompt (as GRPOTrainer renders it), the
generation can stop (the template's end of turn is a stop token), the prompt lengths, and the
rewards: a user's file is checked with ast (never run here), its required parameters are dataset
columns, and the built-in answer reward gives the reference answer itself 1 and an empty answer 0
on every row (a reward the correct answer cannot earn teaches nothing).
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Optional

from pydantic import BaseModel, Field

from .masking import Reason

SHARE_FAIL = 0.05


class CompletionView(BaseModel):
    row: int
    label: bool
    prompt_tokens: int
    tokens: int = Field(description="completion tokens before truncation.")
    scored: int
    end_of_turn_scored: bool
    scored_by_role: dict[str, int]
    text: str = Field(description="the sequence; scored spans between [[ and ]].")


class RewardCheck(BaseModel):
    name: str
    kind: str = Field(description="builtin or file (a user's file: checked with ast, not run).")
    reference_scores_1: Optional[float] = Field(None, description="answer: share of rows whose reference "
                                                                  "answer earns 1.")
    empty_scores_0: Optional[float] = None
    note: str = ""


def kind_of(rows: list[dict], trainer: Optional[str]) -> Optional[str]:
    """The proof to run: dpo (also ORPO's pairs), kto or grpo; None when the rows fit none."""
    r = rows[0]
    if trainer == "grpo" or (trainer is None and "prompt" in r and not {"chosen", "completion"} & set(r)):
        return "grpo"
    if trainer == "kto" or (trainer is None and {"completion", "label"} <= set(r)):
        return "kto" if ({"completion", "label"} <= set(r) or {"chosen", "rejected"} <= set(r)) else None
    return "dpo" if {"chosen", "rejected"} <= set(r) else None


# --------------------------------------------------------------------------------------------
# KTO
# --------------------------------------------------------------------------------------------
def _kto_trainer(ds, tok, max_length: Optional[int], tmp: str):
    from trl import KTOConfig, KTOTrainer

    from .masking_checks import _dummy_model
    args = KTOConfig(output_dir=tmp, max_length=max_length, use_cpu=True, bf16=False, fp16=False, report_to="none",
                     gradient_checkpointing=False, save_strategy="no", logging_strategy="no", disable_tqdm=True,
                     per_device_train_batch_size=2)
    return KTOTrainer(model=_dummy_model(tok), ref_model=_dummy_model(tok), args=args, train_dataset=ds,
                      processing_class=tok)


def run_trl_kto(rows: list[dict], tok, max_length: Optional[int]) -> tuple[list[dict], list[str]]:
    """Every row as KTOTrainer prepares it, with its collated input_ids / completion_mask."""
    import tempfile

    from datasets import Dataset

    from .masking_checks import _quiet
    from .workspace import TMP_DIR, get_workspace
    ds = Dataset.from_list([{**r, "__row": i} for i, r in enumerate(rows)])
    with _quiet() as cap, tempfile.TemporaryDirectory(prefix="verify-kto-",
                                                      dir=get_workspace().owned_dir(TMP_DIR)) as tmp:
        trainer = _kto_trainer(ds, tok, max_length, tmp)
        data, out = trainer.train_dataset, []
        for i in range(len(data)):
            ex = data[i]
            b = trainer.data_collator([{k: ex[k] for k in ("prompt_ids", "completion_ids", "label")}])
            out.append({**ex, "input_ids": b["input_ids"][0].tolist(), "completion_mask": b["completion_mask"][0].tolist()})
        return out, list(cap.messages)


def prove_kto(inp, max_length: Optional[int], sample_size: int, show: int) -> dict:
    """(fields of the PreferenceReport) for KTO data."""
    from .masking import _sample, _stop_ids
    from .preference import _roles, _spread
    from .masking_checks import decoded_view
    stop = _stop_ids(inp.tok, inp.t_path)
    prepared, warnings = run_trl_kto(inp.rows, inp.tok, max_length)
    sample = set(_sample(list(range(len(prepared))), sample_size)[0])
    hits: dict[str, list[int]] = {}
    views, lens, prompt_scored, labels = [], {"prompt": [], "completion": []}, 0, Counter()
    for j, ex in enumerate(prepared):
        n, ids, mask = ex["__row"], ex["input_ids"], ex["completion_mask"]
        labels[bool(ex["label"])] += 1
        lens["prompt"].append(len(ex["prompt_ids"]))
        lens["completion"].append(len(ex["completion_ids"]))
        scored = [t >= 1 and bool(mask[t]) for t in range(len(ids))]
        cut = len(ids) < len(ex["prompt_ids"]) + len(ex["completion_ids"])
        eot = any(ids[t] in stop for t in range(len(ids)) if scored[t])
        if cut:
            hits.setdefault("truncation_cuts_replies", []).append(n)
        if not eot:
            hits.setdefault("end_of_turn_cut" if cut else "end_of_turn_not_scored", []).append(n)
        if j not in sample:
            continue
        roles = _roles(inp.tok, {"prompt": ex["prompt"], "completion": ex["completion"]}, "completion",
                       ex["prompt_ids"] + ex["completion_ids"])
        by_role = Counter(roles[t] for t in range(len(ids)) if scored[t]) if roles else Counter(
            {"unattributed": sum(scored)})
        bad = sum(by_role[r] for r in ("system", "user", "tool"))
        if bad:
            prompt_scored += bad
            hits.setdefault("prompt_tokens_scored", []).append(n)
        views.append(CompletionView(row=n, label=bool(ex["label"]), prompt_tokens=len(ex["prompt_ids"]),
                                    tokens=len(ex["completion_ids"]), scored=sum(scored), end_of_turn_scored=eot,
                                    scored_by_role=dict(by_role),
                                    text=decoded_view(inp.tok, ids, scored,
                                                      len(ex["prompt_ids"]) + len(ex["completion_ids"]) - len(ids))))
    kept = {ex["__row"] for ex in prepared}
    dropped = sorted(set(range(len(inp.rows))) - kept)
    reasons = _kto_reasons(hits, dropped, len(prepared), labels)
    flagged = {n for rows in hits.values() for n in rows}
    views.sort(key=lambda v: v.row not in flagged)
    return dict(reasons=reasons, pairs_prepared=len(kept), pairs_dropped_by_trl=len(dropped),
                examples_checked=len(views), prompt_tokens=_spread(lens["prompt"]),
                completion_tokens=_spread(lens["completion"]), truncated_pairs=len(hits.get("truncation_cuts_replies", [])),
                end_of_turn_missing=len(hits.get("end_of_turn_not_scored", [])), prompt_tokens_scored=prompt_scored,
                stop_tokens=[inp.tok.convert_ids_to_tokens(i) for i in sorted(stop)], completions=views[:show],
                labels={"desirable": labels[True], "undesirable": labels[False]}, trl_warnings=warnings)


def _kto_reasons(hits: dict, dropped: list[int], n: int, labels: Counter) -> list[Reason]:
    from .preference import CHECKS
    out = []
    for code in ("prompt_tokens_scored", "end_of_turn_not_scored", "truncation_cuts_replies"):
        rows = sorted(set(hits.get(code, [])))
        if not rows:
            continue
        sev, msg, fix = CHECKS[code]
        if sev == "share":
            sev = "fail" if len(rows) / max(n, 1) > SHARE_FAIL else "warn"
        out.append(Reason(severity=sev, code=code, rows=rows[:20], fix=fix,
                          message=msg.format(n=len(rows), share=len(rows) / max(n, 1), detail="")
                          .replace("pair(s)", "row(s)").replace("both sides", "the completion")))
    if dropped:
        out.append(Reason(severity="fail" if len(dropped) / max(n + len(dropped), 1) > SHARE_FAIL else "warn",
                          code="dropped_by_trl", rows=dropped[:20],
                          message=f"TRL drops {len(dropped)} row(s) whose prompt alone fills max_length.",
                          fix="Raise max_length or shorten/drop those prompts."))
    if not labels[True] or not labels[False]:
        out.append(Reason(severity="warn", code="one_label", message="every row has the same label: KTO has "
                          "no contrast to learn from.", fix="Add rows of the other label."))
    if not n:
        out.append(Reason(severity="fail", code="no_pairs", message="TRL keeps no row of this split.",
                          fix="Raise max_length or check the data."))
    return sorted(out, key=lambda r: {"fail": 0, "warn": 1, "info": 2}[r.severity])


# --------------------------------------------------------------------------------------------
# GRPO
# --------------------------------------------------------------------------------------------
def _render_prompt(tok, prompt: Any, tools: Any = None) -> str:
    """The prompt as GRPOTrainer renders it for generation (maybe_apply_chat_template)."""
    from trl.data_utils import maybe_apply_chat_template
    ex = {"prompt": prompt}
    if tools is not None:
        ex["tools"] = tools
    return maybe_apply_chat_template(ex, tok)["prompt"]


def prove_grpo(inp, rewards: Optional[list[dict]], show: int) -> dict:
    """(fields of the PreferenceReport) for GRPO prompts, with the reward checks."""
    from .masking import _stop_ids
    from .preference import _spread
    stop = _stop_ids(inp.tok, inp.t_path)
    lens, texts, failed = [], [], []
    for n, r in enumerate(inp.rows):
        try:
            text = _render_prompt(inp.tok, r.get("prompt"), r.get("tools"))
        except Exception as exc:  # noqa: BLE001 - the template's error is the finding
            failed.append((n, f"{type(exc).__name__}: {str(exc)[:200]}"))
            continue
        texts.append(text)
        lens.append(len(inp.tok(text, add_special_tokens=False)["input_ids"]))
    reasons = _grpo_data_reasons(inp, failed, stop)
    checks, more = check_rewards(inp.rows, rewards)
    reasons.extend(more)
    reasons.sort(key=lambda r: {"fail": 0, "warn": 1, "info": 2}[r.severity])
    return dict(reasons=reasons, pairs_prepared=len(texts), pairs_dropped_by_trl=0, examples_checked=len(texts),
                prompt_tokens=_spread(lens), stop_tokens=[inp.tok.convert_ids_to_tokens(i) for i in sorted(stop)],
                prompts_shown=texts[:show], rewards_checked=checks)


def _grpo_data_reasons(inp, failed: list, stop: set[int]) -> list[Reason]:
    out = []
    if failed:
        out.append(Reason(severity="fail", code="template_error", rows=[n for n, _ in failed][:20],
                          message=f"{len(failed)} prompt(s) do not render with the generation prompt: {failed[0][1]}",
                          fix="Pick a chat template that supports these messages, or fix the rows."))
    missing = [n for n, r in enumerate(inp.rows) if not r.get("prompt")]
    if missing:
        out.append(Reason(severity="fail", code="no_prompt", rows=missing[:20],
                          message=f"{len(missing)} row(s) have no prompt: GRPO generates from the prompt.",
                          fix="Run convert_preference (source_format='prompt_answer') on the source."))
    eos = inp.tok.eos_token_id
    if eos is None or (stop and eos not in stop):
        out.append(Reason(severity="warn", code="no_stop_token", message="the tokenizer's EOS is not the "
                          "template's end of turn: generation may not stop before max_completion_length.",
                          fix="Use the model's Instruct template, or set generation_config.eos_token_id."))
    return out


def check_rewards(rows: list[dict], specs: Optional[list[dict]]) -> tuple[list[RewardCheck], list[Reason]]:
    """Each reward spec checked against the data; the built-ins run here, a user's file does not."""
    from .errors import UserError
    from .rewards import AnswerReward, check_user_reward, load_rewards
    if not specs:
        return [], [Reason(severity="info", code="rewards_not_checked", message="no recipe given: the rewards "
                           "were not checked.", fix="verify_preference(recipe=<the GRPO recipe>) checks them.")]
    checks, reasons = [], []
    columns = set(rows[0])
    for spec in specs:
        if "file" in spec:
            try:
                u = check_user_reward(spec["file"], spec["function"])
            except UserError as exc:
                reasons.append(Reason(severity="fail", code="reward_file", message=str(exc), fix=exc.fix or ""))
                continue
            missing = [k for k in u.keywords if k not in columns]
            if missing:
                reasons.append(Reason(severity="fail", code="reward_columns", message=f"{u.file}:{u.function} "
                                      f"requires {missing}, which are no dataset column.",
                                      fix="Give them defaults or add the columns."))
            checks.append(RewardCheck(name=u.function, kind="file", note=f"{u.file}: signature checked (ast), "
                                      "runs in the training process only"))
            continue
        fn = load_rewards([spec])[0]
        check = RewardCheck(name=fn.__name__, kind="builtin")
        if isinstance(fn, AnswerReward):
            _prove_answer(fn, rows, check, reasons)
        checks.append(check)
    return checks, reasons


def _prove_answer(fn, rows: list[dict], check: RewardCheck, reasons: list[Reason]) -> None:
    refs = [r.get(fn.column) for r in rows]
    missing = [n for n, x in enumerate(refs) if x in (None, "")]
    if missing:
        reasons.append(Reason(severity="fail", code="no_answer", rows=missing[:20],
                              message=f"{len(missing)} row(s) have no '{fn.column}': the answer reward skips them.",
                              fix="convert_preference(source_format='prompt_answer') writes it."))
    kw = {fn.column: refs}
    own = fn([str(x) for x in refs], **kw)
    empty = fn([""] * len(refs), **kw)
    scored = [(n, s) for n, s in enumerate(own) if s is not None]
    ones = [n for n, s in scored if s != 1.0]
    check.reference_scores_1 = round(1 - len(ones) / max(len(scored), 1), 4)
    check.empty_scores_0 = round(sum(1 for s in empty if s == 0.0) / max(len(scored), 1), 4)
    check.note = "math-verify" if fn.math_verify else "math-verify is not installed: numeric / exact match"
    if ones:
        reasons.append(Reason(severity="fail", code="reference_not_rewarded", rows=ones[:20],
                              message=f"the answer reward gives {len(ones)} reference answer(s) less than 1: "
                                      "the correct answer cannot earn the reward there.",
                              fix="Normalise the solutions (one final answer each) or use a custom reward."))
