"""`make demo`: a real MCP client drives `python -m server` over stdio through a whole job on CPU.

Builds a tiny random-initialised Llama locally, then, through the MCP tools only: inspects and
converts a small synthetic dataset shipped in demo/data (is a number even or odd?), proves the loss masking, asks for a plan for this machine,
writes and validates a recipe, trains LoRA in the background while polling its status, merges
the adapter (with its logit proof), evaluates base vs fine-tuned on the held-out split, shows
their replies to a few held-out rows side by side (generate), and ships the model: GGUF f16 and
Q4_K_M with llama.cpp's own converter and quantizer, an Ollama Modelfile, and the parity proof
against transformers (export_model). It ends with the GGUF file and its parity line; without the
export extra (EXPORT=0) it says so and how to install it.

Run: python -m demo [--workspace DIR] [--steps N] [--eval-limit N]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data" / "parity.jsonl"
SEQ_LEN = 64


class ToolFailed(RuntimeError):
    pass


async def _call(client, name: str, args: dict[str, Any]) -> dict:
    res = await client.call_tool(name, args)
    if res.is_error:
        raise ToolFailed(f"{name} failed: {res.content[0].text if res.content else res}")
    return res.structured_content


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


async def wait_for_run(c, run_id: str, progress: bool, steps: Any = "?",
                       extra: Callable[[dict], str] = lambda st: "", poll_s: float = 2) -> dict:
    """Poll training_status until the run ends (a one-line live view when `progress`); the final
    status, or ToolFailed with its error and log tail."""
    while True:
        await asyncio.sleep(poll_s)
        st = await _call(c, "training_status", {"run_id": run_id, "log_lines": 5, "plot": False})
        if progress:
            line = (f"  [training_status] {st['state']:<9} step {st.get('step') or 0}/"
                    f"{st.get('max_steps') or steps}  loss {_num(st.get('loss'))}  {extra(st)}")
            sys.stdout.write("\r" + line.ljust(100))
            sys.stdout.flush()
        if st["state"] in ("completed", "failed", "stopped"):
            break
    if progress:
        sys.stdout.write("\n")
    if st["state"] != "completed":
        raise ToolFailed(f"training {st['state']}: {st.get('error')}\n" + "\n".join(st.get("log_tail", [])))
    return st


async def run_demo(workspace: Path, *, steps: int = 150, eval_limit: int | None = None,
                   say: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Run the whole job through the MCP server; returns the figures of the summary table."""
    from mcp import Client, StdioServerParameters
    from mcp.client.stdio import stdio_client

    from tools.tiny import build_convertible_model

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    workspace.mkdir(parents=True, exist_ok=True)
    for sub in ("models", "data", "recipes", "outputs", "runs", "reports", "evals", "exports"):
        shutil.rmtree(workspace / sub, ignore_errors=True)
    say(f"workspace: {workspace}")
    # One token per character, in a vocabulary llama.cpp's GGUF converter maps (export_model).
    build_convertible_model(workspace / "models" / "tiny-llama", hidden_size=128, layers=4,
                            intermediate_size=512, seed=0)
    (workspace / "data").mkdir(parents=True, exist_ok=True)
    shutil.copy(DATA, workspace / "data" / DATA.name)
    say("built a tiny random-initialised Llama (4 layers, hidden 128) in models/tiny-llama")

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    params = StdioServerParameters(command=sys.executable,
                                   args=["-m", "server", "--workspace", str(workspace)],
                                   cwd=str(REPO), env=env)
    out: dict[str, Any] = {}
    # The server's stderr (its log, library progress bars) goes to a file, not the terminal.
    server_log = (workspace / "server.log").open("w")
    async with Client(stdio_client(params, errlog=server_log)) as c:
        tools = (await c.list_tools()).tools
        say(f"MCP server up: {len(tools)} tools over stdio ({time.perf_counter() - t0:.1f} s)")

        def lap(name: str, since: float) -> None:
            timings[name] = round(time.perf_counter() - since, 1)

        t = time.perf_counter()
        hw = await _call(c, "detect_hardware", {})
        say(f"[detect_hardware] {hw['cpu_cores']} CPU cores, {hw['gpu_count']} GPU(s), "
            f"torch {hw['packages'].get('torch')}, trl {hw['packages'].get('trl')}")

        ins = await _call(c, "inspect_dataset", {"dataset": f"data/{DATA.name}",
                                                 "tokenizer": "models/tiny-llama"})
        say(f"[inspect_dataset] {ins['rows']} rows, format {ins['detected_format']}; "
            f"{_problems(ins)}")
        conv = await _call(c, "convert_dataset", {
            "dataset": f"data/{DATA.name}", "output_dir": "data/parity",
            "target_format": "prompt_completion",
            "test_size": 200, "seed": 0, "dedupe": "normalized", "overwrite": True})
        counts = conv["counts"]
        skipped = ", ".join(f"{s['count']} {s['kind']} (line {s['lines'][0]})" for s in conv["skipped"])
        say(f"[convert_dataset] train {counts['train']}, test {counts['test']}; dropped "
            f"{counts['duplicates']} duplicates; skipped: {skipped or 'none'}")
        lap("data", t)

        t = time.perf_counter()
        mask = await _call(c, "verify_masking", {"dataset": "data/parity",
                                                 "tokenizer": "models/tiny-llama",
                                                 "max_length": SEQ_LEN, "show_examples": 1})
        share = mask.get("trained_share") or {}
        say(f"[verify_masking] verdict {mask['verdict'].upper()}: "
            f"{_pct(share.get('mean'))} of tokens trained per example, end-of-turn trained: "
            f"{mask.get('end_of_turn_trained')}, prompt tokens trained: {mask.get('prompt_tokens_trained')}")
        for ex in (mask.get("examples") or [])[:1]:
            say("    " + str(ex.get("marked", ex)).replace("\n", "\n    "))
        if mask["verdict"] == "fail":
            raise ToolFailed(f"masking failed: {mask['reasons']}")
        lap("masking", t)

        t = time.perf_counter()
        plan = await _call(c, "recommend_method", {"model": "models/tiny-llama",
                                                   "dataset_rows": counts["train"], "seq_len": SEQ_LEN})
        say(f"[recommend_method] {plan['method']} on {plan['device']}: {plan['reasons'][0]}")
        say("    The demo trains LoRA (plus embed_tokens/lm_head, since the base is random) so that "
            "it can show merge_adapter.")
        rec = await _call(c, "generate_recipe", {
            "model": "models/tiny-llama", "dataset": "data/parity", "method": "lora",
            "output_path": "recipes/demo-lora.yaml", "output_dir": "outputs/demo-lora",
            "seq_len": SEQ_LEN,
            "overrides": {"max_steps": steps, "learning_rate": 3e-3, "lr_scheduler_type": "cosine",
                          "warmup_steps": 10, "per_device_train_batch_size": 32,
                          "gradient_accumulation_steps": 1, "lora_r": 32, "lora_alpha": 64,
                          "lora_dropout": 0.0, "lora_modules_to_save": ["embed_tokens", "lm_head"],
                          "logging_steps": 5, "save_steps": max(steps // 2, 1),
                          "packing": False, "eval_strategy": "no", "seed": 0}})
        val = await _call(c, "validate_recipe", {"recipe": rec["recipe_path"]})
        say(f"[generate_recipe] {rec['recipe_path']} ({rec['method']}); [validate_recipe] valid: "
            f"{val['valid']}, fits: {val.get('fits')}")
        if not val["valid"]:
            raise ToolFailed(f"recipe invalid: {val['errors']}")
        say(f"    by hand: {rec['launch_commands'].get('train')}")
        lap("plan+recipe", t)

        t = time.perf_counter()
        launch = await _call(c, "launch_training", {"recipe": rec["recipe_path"]})
        run_id = launch["run_id"]
        say(f"[launch_training] run {run_id} started in the background")
        await wait_for_run(c, run_id, progress, steps, lambda st: (
            f"tokens/s {_num(st.get('tokens_per_second'), 0)}  ETA {st.get('eta') or '-'}"))
        final = await _call(c, "training_status", {"run_id": run_id, "plot": True})
        say(f"[training_status] completed: loss {_num(final.get('first_loss'))} -> "
            f"{_num(final.get('loss'))}, loss curve {final.get('loss_plot_path')}")
        lap("training", t)

        t = time.perf_counter()
        merged = await _call(c, "merge_adapter", {"adapter_dir": "outputs/demo-lora",
                                                  "output_dir": "models/tiny-llama-parity",
                                                  "dtype": "fp32", "overwrite": True})
        lc = merged["logits_check"]
        say(f"[merge_adapter] {merged['output_dir']}: verified {merged['verified']} (max |logit "
            f"diff| {lc['max_abs_diff']:.2e} <= {lc['tolerance']:.0e})")
        lap("merge", t)

        t = time.perf_counter()
        args = {"model": "models/tiny-llama-parity", "compare_with": "models/tiny-llama",
                "local_task": "data/parity/test.jsonl", "max_gen_toks": 8, "batch_size": 50,
                "output_dir": "evals/parity"}
        if eval_limit:
            args["limit"] = eval_limit
        ev = await _call(c, "evaluate", args)
        lap("evaluate", t)
        row = ev["comparison"][0]

        # Read the replies, not only the score: base vs fine-tuned on the first held-out rows.
        t = time.perf_counter()
        gen = await _call(c, "generate", {"model": "models/tiny-llama-parity",
                                          "compare_with": "models/tiny-llama", "dataset": "data/parity",
                                          "split": "test", "rows": 4, "max_new_tokens": 8})
        lap("generate", t)
        say(f"[generate] replies to the first {len(gen['rows'])} held-out rows ({gen['settings']['decoding']}):")
        for line in gen["table"].splitlines():
            say("    " + line)
        t = time.perf_counter()
        shipped = await _export(c, workspace, say)
        if shipped.get("gguf"):
            lap("export", t)
        out = {"base_exact_match": row["base"], "fine_tuned_exact_match": row["fine_tuned"],
               "delta": row["delta"], "delta_stderr": row["delta_stderr"],
               "n": ev["runs"][0]["metrics"][0].get("n"), "masking": mask["verdict"],
               "merge_verified": merged["verified"], "first_loss": final.get("first_loss"),
               "final_loss": final.get("loss"), "steps": final.get("step"),
               "timings_s": timings, "total_s": round(time.perf_counter() - t0, 1),
               "samples": ev["runs"][0]["samples_files"],
               "replies": [{"prompt": r["prompt"], "reference": r["reference"],
                            **{o["label"]: o["text"] for o in r["outputs"]}} for r in gen["rows"]],
               "export": shipped}
    server_log.close()
    say(f"server log: {server_log.name}")
    _summary(out, say)
    return out


EXPORT_FORMATS = ["f16", "Q4_K_M"]
PARITY_ROWS = 4  # held-out questions the GGUF is proven on


async def _export(c, workspace: Path, say: Callable[[str], None]) -> dict:
    """export_model on the merged model, proven on held-out questions; a skip line (with the
    install command) where the export extra is not installed."""
    from tools.export_setup import export_missing
    why = export_missing()
    if why:
        say(f"[export_model] skipped: {why}")
        return {"skipped": why}
    test = (workspace / "data" / "parity" / "test.jsonl").read_text().splitlines()[:PARITY_ROWS]
    prompts = [json.loads(line)["prompt"][0]["content"] for line in test]
    ex = await _call(c, "export_model", {
        "model": "models/tiny-llama-parity", "output_dir": "exports/tiny-llama-parity",
        "formats": EXPORT_FORMATS, "parity_prompts": prompts, "max_new_tokens": 8,
        "overwrite": True})
    say(f"[export_model] {ex['summary']}")
    for f in ex["files"]:
        say(f"    {f['file']}: {f['size_mib']} MiB ({f['made_by']}, {f['seconds']:.1f} s)")
    say(f"    Ollama: {ex['serving'].get('ollama')}")
    # The file Ollama and llama-server get (the Modelfile's FROM): the k-quant.
    gguf = next((f["file"] for f in ex["files"] if f["format"] == "Q4_K_M"), ex["files"][-1]["file"])
    return {"gguf": gguf, "files": [f["file"] for f in ex["files"]], "verdict": ex["verdict"],
            "parity_passed": bool(ex["parity"] and ex["parity"]["passed"]),
            "timings_s": ex["timings"]}


def _num(x: Any, nd: int = 3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _problems(ins: dict) -> str:
    bits = [f"{p['count']} {p['kind']} (lines {p['lines'][:3]})" for p in ins.get("problems", [])]
    if ins.get("duplicate_rows"):
        bits.append(f"{ins['duplicate_rows']} duplicate rows (lines {ins['duplicate_row_lines'][:3]})")
    sug = ins.get("suggested_conversion") or {}
    if sug:
        bits.append(f"suggested: {sug.get('target_format')} with mapping {sug.get('column_mapping')}")
    return "; ".join(bits) or "no problems"


def _summary(o: dict, say: Callable[[str], None]) -> None:
    say("")
    say("| step | result |")
    say("|---|---|")
    say(f"| masking | {o['masking']} |")
    say(f"| training | {o['steps']} steps, loss {_num(o['first_loss'])} -> {_num(o['final_loss'])} |")
    say(f"| merge | verified: {o['merge_verified']} |")
    say(f"| exact match, base (held-out, n={o['n']}) | {_pct(o['base_exact_match'])} |")
    say(f"| exact match, fine-tuned | {_pct(o['fine_tuned_exact_match'])} |")
    say(f"| rise | {_pct(o['delta'])} +- {_pct(o['delta_stderr'])} |")
    ex = o.get("export") or {}
    say(f"| export | {', '.join(ex['files']) if ex.get('files') else 'skipped (export extra not installed)'} |")
    if ex.get("files"):
        say(f"| GGUF parity | {'passed' if ex['parity_passed'] else 'FAILED'} |")
    say(f"| time | {o['total_s']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in o['timings_s'].items())}) |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m demo", description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", default=str(REPO / "workspace" / "demo"))
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--eval-limit", type=int, default=None)
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    try:
        out = asyncio.run(run_demo(Path(a.workspace).resolve(), steps=a.steps,
                                   eval_limit=a.eval_limit))
    except ToolFailed as e:
        print(f"demo failed: {e}", file=sys.stderr)
        return 1
    (Path(a.workspace) / "demo_summary.json").write_text(json.dumps(out, indent=2) + "\n")
    ok = (out["fine_tuned_exact_match"] or 0) >= 0.8
    print(f"\nExact match rose from {_pct(out['base_exact_match'])} to "
          f"{_pct(out['fine_tuned_exact_match'])}" + ("" if ok else " (below the 80% target)"))
    # The last two lines: the shipped file and the proof that it is the model evaluated above.
    ex = out["export"]
    if ex.get("gguf"):
        print(f"GGUF: {Path(a.workspace) / ex['gguf']}")
        print(f"Parity: {ex['verdict']}")
        ok = ok and ex["parity_passed"]
    else:
        print(f"GGUF: not exported. {ex['skipped']}")
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
