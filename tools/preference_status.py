"""A preference / RL run's own metrics, read from TRL's log history (metrics.jsonl records or
trainer.state.log_history): what training_status shows beside the loss.

- DPO / ORPO: rewards/margins (grows), rewards/accuracies (toward 1), rewards/chosen and
  rewards/rejected (both falling far below 0 = the chosen log-probs collapse too); ORPO's
  log_odds_ratio and nll_loss.
- KTO: rewards/chosen, rewards/rejected, rewards/margins and kl (the batch KL estimate).
- GRPO: reward (mean over the generation batch) and reward_std, rewards/<function>/mean and /std per
  reward function, completions/mean_length and clipped_ratio (completions cut at
  max_completion_length), frac_reward_zero_std (groups without any signal), kl (beta > 0).

`method_metrics(trainer, log_history)` returns first / last / last-window mean per metric and plain
readings ("reward rose from 0.12 to 0.61"); tools/train_dpo.py writes it into summary.json.
"""
from __future__ import annotations

from typing import Any, Optional

WINDOW = 5  # last records averaged: one GRPO step's reward is noisy

KEYS: dict[str, tuple[str, ...]] = {
    "dpo": ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected", "logps/chosen",
            "logps/rejected"),
    "orpo": ("rewards/margins", "rewards/accuracies", "log_odds_ratio", "nll_loss", "rewards/chosen",
             "rewards/rejected"),
    "kto": ("rewards/margins", "rewards/chosen", "rewards/rejected", "kl", "logps/chosen", "logps/rejected"),
    "grpo": ("reward", "reward_std", "completions/mean_length", "completions/clipped_ratio",
             "frac_reward_zero_std", "kl", "entropy"),
}
EVAL_KEYS = {"dpo": ("eval_rewards/accuracies", "eval_rewards/margins"),
             "orpo": ("eval_rewards/accuracies", "eval_rewards/margins"),
             "kto": ("eval_rewards/margins", "eval_kl"), "grpo": ("eval_reward",)}


def _num(x: Any) -> Optional[float]:
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, str):  # tools.train's callback may log formatted numbers
        try:
            return float(x)
        except ValueError:
            return None
    return None


def _series(logs: list[dict], key: str) -> list[float]:
    return [v for v in (_num(r.get(key)) for r in logs) if v is not None]


def _figures(xs: list[float]) -> dict[str, float]:
    tail = xs[-WINDOW:]
    return {"first": round(xs[0], 6), "last": round(xs[-1], 6), "last_mean": round(sum(tail) / len(tail), 6),
            "points": len(xs)}


def method_metrics(trainer: str, log_history: list[dict]) -> dict:
    """The method's metrics (first, last, mean of the last 5 logged values) and readings."""
    trainer = trainer.lower()
    logs = [r for r in log_history if isinstance(r, dict)]
    metrics = {k: _figures(xs) for k in KEYS.get(trainer, ()) + EVAL_KEYS.get(trainer, ())
               if (xs := _series(logs, k))}
    out: dict[str, Any] = {"trainer": trainer, "metrics": metrics}
    if trainer == "grpo":
        out["rewards"] = _per_function(logs)
    out["readings"] = _readings(trainer, metrics, out.get("rewards", {}))
    return out


def _per_function(logs: list[dict]) -> dict[str, dict]:
    """rewards/<name>/mean and /std per reward function: first and last-window mean."""
    names = sorted({k[len("rewards/"):-len("/mean")] for r in logs for k in r
                    if k.startswith("rewards/") and k.endswith("/mean")})
    out = {}
    for name in names:
        mean, std = _series(logs, f"rewards/{name}/mean"), _series(logs, f"rewards/{name}/std")
        if mean:
            out[name] = {"mean": _figures(mean), "std_last": round(std[-1], 6) if std else None}
    return out


def _readings(trainer: str, m: dict, rewards: dict) -> list[str]:
    said = []
    if trainer in ("dpo", "orpo", "kto") and "rewards/margins" in m:
        g = m["rewards/margins"]
        said.append(f"reward margin {g['first']:.3g} -> {g['last_mean']:.3g} (mean of the last {WINDOW})"
                    + ("" if g["last_mean"] > g["first"] else ": not growing; check the rate and the data"))
    if "rewards/accuracies" in m:
        said.append(f"reward accuracy {m['rewards/accuracies']['last_mean']:.0%} (train)")
    if trainer in ("dpo", "kto") and "rewards/chosen" in m and m["rewards/chosen"]["last_mean"] < -5:
        said.append("rewards/chosen is falling far below 0: the chosen replies lose probability too "
                    "(lower the learning rate or raise beta)")
    if trainer == "grpo" and "reward" in m:
        r = m["reward"]
        verb = "rose" if r["last_mean"] > r["first"] else "did not rise"
        said.append(f"reward {verb}: {r['first']:.3g} -> {r['last_mean']:.3g} (mean of the last {WINDOW})")
        z = m.get("frac_reward_zero_std")
        if z and z["last_mean"] > 0.9:
            said.append("frac_reward_zero_std > 0.9: almost every group scores its completions alike, so the "
                        "advantages are 0 (tasks too hard or too easy, or too few generations)")
        c = m.get("completions/clipped_ratio")
        if c and c["last_mean"] > 0.5:
            said.append("over half the completions hit max_completion_length: raise it or reward brevity")
    for name, f in rewards.items():
        said.append(f"{name}: {f['mean']['first']:.3g} -> {f['mean']['last_mean']:.3g}")
    return said
