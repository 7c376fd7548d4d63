"""Held-out preference accuracy of a preference run (issue 12 item 6): does the tuned model's implicit
reward rank the chosen reply above the rejected one (DPO, ORPO), or give a desirable completion a
positive and an undesirable one a negative reward (KTO), more often than the model it started from?

Measured by tools.train_dpo before and after training on the dataset's TEST split (the one
convert_preference writes with test_size; the trainer's eval_dataset, never the training rows),
each row alone through the trainer's own `prediction_step`, so the reward is exactly the one the
trainer logs (no loss or log-prob of ours):

- DPO: the margin beta*((log pi - log ref)_chosen - (log pi - log ref)_rejected) > 0. Before training
  the policy is the reference: every margin is 0, which counts half, so an untrained policy
  scores 50% (chance). Also the policy's own ranking (sum log-prob chosen > rejected).
- ORPO: its reward is beta * the mean per-token log-prob of a reply (no reference), so the accuracy
  is the policy's own length-normalised ranking; before training that is the start model's own
  preference, not necessarily 50%.
- KTO: the row's reward beta*(log pi - log ref) has the label's sign (desirable > 0, undesirable
  < 0); 0 (before training) counts half. Rows of pairs are unpaired by TRL (chosen = desirable).
- GRPO: none (its evaluation generates; the reward curve is in method_metrics).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

HELDOUT_MAX_ROWS = 200  # held-out rows scored one by one before and after training (each a forward or two)
SPLIT = "test"          # what the summary names as the measured split (the recipe's dataset_test_split)
MEASURES = {
    "dpo": "share of held-out pairs whose DPO implicit reward margin beta*((log pi - log ref)_chosen - "
           "(log pi - log ref)_rejected) is > 0 (0 counts half: 50% = the policy is the reference)",
    "orpo": "share of held-out pairs whose ORPO reward (beta * mean token log-prob) is higher for chosen "
            "(no reference: before training this is the start model's own preference)",
    "kto": "share of held-out labelled rows whose KTO implicit reward beta*(log pi - log ref) has the label's "
           "sign (desirable > 0, undesirable < 0; 0 counts half)",
}


@dataclass(frozen=True)
class _Reader:
    """Where a trainer keeps the metrics of one prediction_step and under which names."""
    store: str       # trainer attribute: DPO/KTO `_metrics` (mode -> key -> list), ORPO `_stored_metrics`
    prefix: str      # ORPO names eval metrics 'eval_...'
    own: bool        # the policy's own log-prob ranking is a second, different figure


READERS = {"dpo": _Reader("_metrics", "", True), "orpo": _Reader("_stored_metrics", "eval_", False),
           "kto": _Reader("_metrics", "", False)}


def supports(trainer_name: str) -> bool:
    return trainer_name in READERS


def _columns(trainer, ds) -> list[str]:
    """The columns the collator reads (the trainer's signature columns, as Trainer's dataloader keeps)."""
    if hasattr(trainer, "_set_signature_columns_if_needed"):
        trainer._set_signature_columns_if_needed()
    sig = getattr(trainer, "_signature_columns", None)
    if not sig or not getattr(trainer.args, "remove_unused_columns", True):
        return list(ds.column_names)
    kept = [c for c in ds.column_names if c in sig]
    return kept or list(ds.column_names)


def _score(x: float) -> float:
    return 1.0 if x > 0 else 0.5 if x == 0 else 0.0


def _one(trainer, name: str, row: dict, store) -> tuple[float, Optional[float]]:
    """(signed reward: > 0 when the row is ranked right, the policy's own margin or None)."""
    r = READERS[name]
    batch = trainer._prepare_inputs(trainer.data_collator([row]))
    trainer.prediction_step(trainer.model, batch, prediction_loss_only=True)
    m = store()
    if name == "kto":
        desirable = bool(row["label"])
        reward = m["rewards/chosen" if desirable else "rewards/rejected"][-1]
        return (reward if desirable else -reward), None
    margin = m[f"{r.prefix}rewards/margins"][-1]
    own = m[f"{r.prefix}logps/chosen"][-1] - m[f"{r.prefix}logps/rejected"][-1] if r.own else None
    return margin, own


def heldout_accuracy(trainer, name: str, limit: int = HELDOUT_MAX_ROWS) -> Optional[dict[str, Any]]:
    """The held-out accuracy of `trainer`'s eval_dataset now (see the module doc), or None when the
    method has none or there is no test split. The trainer's eval metric store is left empty."""
    ds = trainer.eval_dataset
    if name not in READERS or ds is None or isinstance(ds, dict) or len(ds) == 0:
        return None
    r = READERS[name]
    store = lambda: getattr(trainer, r.store)["eval"]  # noqa: E731 (mode -> key -> list of values)
    cols = _columns(trainer, ds)
    model, was_training = trainer.model, trainer.model.training
    model.eval()
    signed, own, labels = [], [], []
    try:
        for i in range(min(len(ds), limit)):
            row = {k: ds[i][k] for k in cols}
            s, o = _one(trainer, name, row, store)
            signed.append(s)
            if o is not None:
                own.append(o)
            if name == "kto":
                labels.append(bool(row["label"]))
    finally:
        store().clear()  # the per-row values must not reach the next logged eval average
        model.train(was_training)
    return _figures(name, signed, own, labels)


def _figures(name: str, signed: list[float], own: list[float], labels: list[bool]) -> dict[str, Any]:
    acc = lambda xs: round(sum(_score(x) for x in xs) / len(xs), 4) if xs else None  # noqa: E731
    out: dict[str, Any] = {"rows": len(signed), "implicit_reward_accuracy": acc(signed)}
    if name == "kto":
        out.update(desirable=sum(labels), undesirable=len(labels) - sum(labels),
                   desirable_accuracy=acc([s for s, lab in zip(signed, labels) if lab]),
                   undesirable_accuracy=acc([s for s, lab in zip(signed, labels) if not lab]),
                   mean_signed_reward=round(sum(signed) / len(signed), 6))
        return out
    out.update(pairs=len(signed), mean_margin=round(sum(signed) / len(signed), 6))
    if own:
        out["policy_prefers_chosen"] = acc(own)
    return out


def preference_eval(name: str, before: Optional[dict], after: Optional[dict]) -> Optional[dict[str, Any]]:
    """summary.json's `preference_eval`: what was measured, on which split, before, after, the rise."""
    if not before and not after:
        return None
    out: dict[str, Any] = {"split": SPLIT, "rows": (after or before)["rows"], "measure": MEASURES[name],
                           "before": before, "after": after}
    if before and after:
        out["rise"] = round(after["implicit_reward_accuracy"] - before["implicit_reward_accuracy"], 4)
    return out


def reading(pe: Optional[dict]) -> Optional[str]:
    """One line for method_metrics' readings: 'held-out preference accuracy 50% -> 100% (32 test rows)'."""
    if not pe:
        return None
    fig = lambda d: "n/a" if not d else f"{d['implicit_reward_accuracy']:.0%}"  # noqa: E731
    return (f"held-out preference accuracy {fig(pe['before'])} -> {fig(pe['after'])} "
            f"({pe['rows']} {pe['split']} rows)")
