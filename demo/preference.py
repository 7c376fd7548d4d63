"""`make demo-dpo`: the preference stage (DPO) on CPU, through the real MCP server over stdio, as
`make demo` does for SFT.

A tiny random-initialised Llama learns a preference it cannot know before: for "what does the
<animal> say?" the chosen reply gives that animal's sound, the rejected one another animal's.
Through the MCP tools only: convert_preference reads the raw pairs (whole conversations, HH-RLHF
style: the shared prefix becomes the prompt; an identical pair and an empty reply are dropped with
their lines) and writes a held-out test split; verify_preference proves with DPOTrainer's own
preparation which tokens enter the loss; generate_dpo_recipe writes the TRL-parsed recipe (LoRA,
the reference is the adapter disabled); launch_training runs `python -m tools.train_dpo` in the
background while training_status is polled; the run's summary gives the held-out preference
accuracy before and after (does the implicit reward rank chosen above rejected on the test pairs?).

In a real job this stage follows SFT: generate_dpo_recipe(model=<the SFT adapter or merged model>);
here it starts from the random model so that it runs alone and fast.

Run: python -m demo.preference [--workspace DIR] [--pairs N] [--epochs N]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from demo.__main__ import REPO, ToolFailed, _call, _num, _pct, wait_for_run

ANIMALS = [("cat", "meow"), ("dog", "woof"), ("cow", "moo")]
MAX_LENGTH = 128       # prompt + reply tokens: the tiny model's byte tokens, far above the ~40 a pair needs
TARGET = 0.9           # the held-out accuracy the demo must reach
# A toy rate, ~1000x a real LoRA DPO rate (5e-6): the model is random, every preference is new to it.
TRAINING = {"learning_rate": 5e-3, "lr_scheduler_type": "constant", "warmup_steps": 0, "lora_r": 16,
            "lora_alpha": 32, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
            "per_device_eval_batch_size": 8, "logging_steps": 2, "save_strategy": "no", "seed": 0}


def _conversation(n: int, animal: str, sound: str) -> list[dict]:
    return [{"role": "user", "content": f"Item {n}: what does the {animal} say?"},
            {"role": "assistant", "content": f"The {animal} says {sound}."}]


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    """n raw pairs as whole conversations (chosen/rejected share the user turn), plus two faults
    convert_preference must drop: an identical pair and an empty chosen reply."""
    rng = random.Random(seed)
    items = rng.sample(range(100, 10_000), n)
    rows = []
    for i, item in enumerate(items):
        animal, sound = ANIMALS[i % len(ANIMALS)]
        wrong = rng.choice([s for a, s in ANIMALS if a != animal])
        rows.append({"chosen": _conversation(item, animal, sound), "rejected": _conversation(item, animal, wrong)})
    rows.insert(10, {"chosen": rows[3]["chosen"], "rejected": rows[3]["chosen"]})
    empty = _conversation(7, "cat", "")
    empty[1]["content"] = ""
    rows.insert(20, {"chosen": empty, "rejected": _conversation(7, "cat", "woof")})
    return rows


async def _data(c, pairs: int, test_share: float, say) -> dict:
    conv = await _call(c, "convert_preference", {"dataset": "data/animal_pairs.jsonl", "output_dir": "data/prefs",
                                                 "test_size": test_share, "seed": 0, "overwrite": True})
    dropped = ", ".join(f"{p['count']} {p['code']} (line {p['rows'][0]})" for p in conv["problems"]
                        if p.get("severity") == "dropped" and p.get("rows")) or "none"
    say(f"[convert_preference] {conv['rows_read']} rows ({conv['source_format']}, the shared prefix split into the "
        f"prompt): train {conv['train']}, test {conv['test']}; dropped: {dropped}")
    return conv


async def _prove(c, recipe: str, say) -> dict:
    ver = await _call(c, "verify_preference", {"recipe": recipe, "show_examples": 1})
    say(f"[verify_preference] {ver['summary']}")
    for pair in ver.get("pairs", [])[:1]:
        for side in ("chosen", "rejected"):
            say(f"    {side:<8} " + pair[side]["text"].replace("\n", "\\n"))
    if ver["verdict"] == "fail":
        raise ToolFailed(f"verify_preference failed: {ver['reasons']}")
    return ver


async def _recipe(c, epochs: int, say) -> dict:
    rec = await _call(c, "generate_dpo_recipe", {
        "model": "models/tiny-llama", "dataset": "data/prefs", "output_path": "recipes/dpo.yaml",
        "output_dir": "outputs/dpo", "trainer": "dpo", "method": "lora", "max_length": MAX_LENGTH, "cpu": True,
        "overrides": {**TRAINING, "num_train_epochs": epochs}})
    say(f"[generate_dpo_recipe] {rec['summary']}")
    say(f"    beta: {rec['why']['beta']}")
    return rec


async def _train(c, recipe: str, say, progress: bool) -> dict:
    launch = await _call(c, "launch_training", {"recipe": recipe})
    say(f"[launch_training] run {launch['run_id']}: {' '.join(launch['command'][-4:])}")

    def margins(st: dict) -> str:
        mm = ((st.get("method_metrics") or {}).get("metrics") or {}).get("rewards/margins") or {}
        return f"rewards/margins {_num(mm.get('last'))}"
    await wait_for_run(c, launch["run_id"], progress, extra=margins, poll_s=1)
    final = await _call(c, "training_status", {"run_id": launch["run_id"], "plot": True})
    say(f"[training_status] {final['summary']}")
    for r in (final.get("run_summary") or {}).get("method_metrics", {}).get("readings", [])[:3]:
        say(f"    {r}")
    return final


def _setup(workspace: Path, pairs: int, say) -> None:
    from tools.tiny import build_tiny_model
    workspace.mkdir(parents=True, exist_ok=True)
    for sub in ("models", "data", "recipes", "outputs", "runs", "reports"):
        shutil.rmtree(workspace / sub, ignore_errors=True)
    build_tiny_model(workspace / "models" / "tiny-llama", hidden_size=64, layers=2, seed=0)
    (workspace / "data").mkdir(parents=True, exist_ok=True)
    with (workspace / "data" / "animal_pairs.jsonl").open("w", encoding="utf-8") as fh:
        for row in make_pairs(pairs):
            fh.write(json.dumps(row) + "\n")
    say(f"workspace: {workspace}\nbuilt a tiny random-initialised Llama (2 layers, hidden 64) in models/tiny-llama; "
        f"{pairs} raw preference pairs in data/animal_pairs.jsonl")


async def run_preference_demo(workspace: Path, *, pairs: int = 200, epochs: int = 4, test_share: float = 0.2,
                              say: Callable[[str], None] = print, progress: bool = True) -> dict:
    """The DPO stage through the MCP server; returns the figures of the summary table."""
    from mcp import Client, StdioServerParameters
    from mcp.client.stdio import stdio_client
    t0 = time.perf_counter()
    _setup(workspace, pairs, say)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO)}
    params = StdioServerParameters(command=sys.executable, args=["-m", "server", "--workspace", str(workspace)],
                                   cwd=str(REPO), env=env)
    with (workspace / "server.log").open("w") as server_log:
        async with Client(stdio_client(params, errlog=server_log)) as c:
            say(f"MCP server up: {len((await c.list_tools()).tools)} tools over stdio ({time.perf_counter() - t0:.1f} s)")
            conv = await _data(c, pairs, test_share, say)
            rec = await _recipe(c, epochs, say)
            ver = await _prove(c, rec["recipe_path"], say)
            t = time.perf_counter()
            final = await _train(c, rec["recipe_path"], say, progress)
            train_s = time.perf_counter() - t
    summ = final.get("run_summary") or {}
    pe = summ.get("preference_eval") or {}
    out = {"train_pairs": conv["train"], "test_pairs": conv["test"], "verdict": ver["verdict"],
           "steps": summ.get("steps"), "reference": summ.get("reference"), "split": pe.get("split"),
           "before": (pe.get("before") or {}).get("implicit_reward_accuracy"),
           "after": (pe.get("after") or {}).get("implicit_reward_accuracy"),
           "policy_before": (pe.get("before") or {}).get("policy_prefers_chosen"),
           "policy_after": (pe.get("after") or {}).get("policy_prefers_chosen"),
           "mean_margin_after": (pe.get("after") or {}).get("mean_margin"),
           "train_s": round(train_s, 1), "total_s": round(time.perf_counter() - t0, 1)}
    _summary(out, say)
    return out


def _summary(o: dict, say: Callable[[str], None]) -> None:
    say("")
    say("| step | result |")
    say("|---|---|")
    say(f"| data | {o['train_pairs']} train / {o['test_pairs']} held-out pairs |")
    say(f"| proof (verify_preference) | {o['verdict']} |")
    say(f"| DPO run | {o['steps']} steps, LoRA; reference: {o['reference']} |")
    say(f"| held-out implicit-reward accuracy ({o['split']} split) | {_pct(o['before'])} -> {_pct(o['after'])} |")
    say(f"| policy prefers chosen (its own summed log-probs, length-biased) | {_pct(o['policy_before'])} -> {_pct(o['policy_after'])} |")
    say(f"| time | {o['total_s']:.0f} s (training run {o['train_s']:.0f} s) |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m demo.preference", description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", default=str(REPO / "workspace" / "demo-dpo"))
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=4)
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    try:
        out = asyncio.run(run_preference_demo(Path(a.workspace).resolve(), pairs=a.pairs, epochs=a.epochs))
    except ToolFailed as e:
        print(f"demo failed: {e}", file=sys.stderr)
        return 1
    (Path(a.workspace) / "demo_summary.json").write_text(json.dumps(out, indent=2) + "\n")
    ok = (out["after"] or 0) >= TARGET
    print(f"\nHeld-out preference accuracy rose from {_pct(out['before'])} to {_pct(out['after'])}"
          + ("" if ok else f" (below the {TARGET:.0%} target)"))
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
