"""Plant defects in the safety-critical modules and count how many the test suite catches.

Each mutant is one small edit that breaks a promise the product makes (a masking verdict, a
recipe check, a launch gate, the merge proof, the workspace policy, the evaluation comparison).
For each: apply it in place, run the tests of that area (stop at the first failure), restore the
file. A mutant is *killed* when the tests fail, *survives* when they pass.

    .venv/bin/python bench/mutation_check.py            # all mutants (~15-25 min on 2 cores)
    .venv/bin/python bench/mutation_check.py --only merge workspace
    .venv/bin/python bench/mutation_check.py --list
    .venv/bin/python bench/mutation_check.py --check-patterns   # can every mutant be planted? (<1 s)

Before anything runs, every mutant's old text must occur exactly once in its file (and every
area's test files must exist); otherwise the bench stops naming the stale mutants, so a refactor
that moves the code cannot quietly turn a mutant into one that is never planted
(tests/test_mutation_patterns.py runs only this check).

The source files must be committed (the tool refuses to run on uncommitted changes to them, so a
crash can never leave a mutant behind: `git checkout` restores). In a working tree other people
edit, run it in a clone, so no one else's tests see a mutant (it mutates the tree it lives in):

    git clone -q . /tmp/mut && cd /tmp/mut && /path/to/.venv/bin/python bench/mutation_check.py

Not part of `make test`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


@dataclass(frozen=True)
class Mutant:
    area: str
    file: str
    old: str
    new: str
    what: str


TESTS = {
    "masking": ["tests/test_masking.py", "tests/test_refusals.py"],
    "recipes": ["tests/test_recipes.py", "tests/test_migrations.py", "tests/test_security.py"],
    "launch": ["tests/test_refusals.py", "tests/test_security.py", "tests/test_runs.py"],
    "merge": ["tests/test_merge.py"],
    "workspace": ["tests/test_workspace.py", "tests/test_security.py"],
    "evaluate": ["tests/test_evaluate.py"],
    "planning": ["tests/test_recommend.py", "tests/test_memory.py", "tests/test_throughput.py"],
}

M = Mutant
MUTANTS = [
    # ---- masking verdicts
    M("masking", "tools/masking.py", 'verdict = "fail" if "fail" in sev else', 'verdict = "warn" if "fail" in sev else',
      "a failing report is only a warning"),
    # the checks themselves live in masking_analysis (_length_reasons, _eos_reasons, ...; afa5484)
    M("masking", "tools/masking_analysis.py",
      'severity="fail" if bad > TRUNCATION_FAIL_SHARE * lens.rows else "warn"', 'severity="warn"',
      "truncation never fails"),
    M("masking", "tools/masking_analysis.py", "    if lens.zero:\n", "    if False:\n",
      "rows with no trained token pass"),
    M("masking", "tools/masking_analysis.py", '    if r["eot_masked"] or r["eot_missing"]:\n', "    if False:\n",
      "a masked end-of-turn passes"),
    M("masking", "tools/masking_analysis.py", '    if r["mismatch"]:\n', "    if False:\n",
      "template mismatch not reported"),
    M("masking", "tools/masking_analysis.py", '    if r["prompt"]:\n', "    if False:\n",
      "trained prompt tokens not reported"),
    M("masking", "tools/masking_analysis.py", 'no_prompt_tokens_trained=(not r["prompt"]) if aligned else None',
      'no_prompt_tokens_trained=not r["prompt"]', "flags claim evidence they do not have"),
    # ---- recipe validation
    M("recipes", "tools/recipes.py", '        if k not in fields and k not in NON_FIELD_KEYS:', '        if False:',
      "unknown keys accepted"),
    M("recipes", "tools/recipes.py", "    if r.bf16 and r.fp16:", "    if False:", "fp16 + bf16 accepted"),
    M("recipes", "tools/recipes.py", "    if (q4 or q8) and not peft:", "    if False:", "4-bit without PEFT accepted"),
    M("recipes", "tools/recipes.py", "    if m.gpu_memory_gib and m.total_gib > m.gpu_memory_gib:", "    if False:",
      "a plan over the GPU is valid"),
    M("recipes", "tools/recipes.py", "_check_accelerate, _check_boundary, ", "_check_accelerate, ", "recipe paths outside accepted"),
    M("recipes", "tools/recipes.py", "    elif not has_generation_markers(text):", "    elif False:",
      "assistant_only_loss without markers accepted"),
    M("recipes", "tools/recipe_migrate.py", '    "evaluation_strategy": ("eval_strategy",', '    "evaluation_strategy_x": ("eval_strategy",',
      "evaluation_strategy migration removed"),
    M("recipes", "tools/recipe_migrate.py", '    if "warmup_ratio" in cfg:', '    if False:', "warmup_ratio migration removed"),
    M("recipes", "tools/recipe_migrate.py", '        if new in cfg and cfg[new] != val:', '        if False:',
      "old+new key conflict silently overwrites"),
    # ---- launch gates
    M("launch", "tools/runs.py", '        if verdict == "fail":', '        if False:', "a failing masking report launches"),
    M("launch", "tools/runs.py", "split=split, **settings)\n        if rep is None:",  # _check_masking, not DPO's
      "split=split, **settings)\n        if False:", "no masking report launches"),
    M("launch", "tools/runs.py", "    if errors or (not v.valid and not v.errors):", "    if False:", "an invalid recipe launches"),
    M("launch", "tools/runs.py", "        if output_dir_of(st) == output_dir:", "        if False:",
      "two runs into one output_dir"),
    M("launch", "tools/runs.py", '    if cfg.get("trust_remote_code") and not allow_remote_code:', "    if False:",
      "remote code without consent"),
    M("launch", "tools/runs.py", "            signal_run(st, signal.SIGKILL)\n", "            pass\n",
      "stop_training never sends SIGKILL"),
    M("launch", "tools/runs.py", 'if any(isinstance(x, float) and not math.isfinite(x) for x in losses):', 'if False:',
      "NaN loss not warned"),
    M("launch", "tools/run_registry.py", "    if run_id is not None and _cmdline_names(pid, run_id) is False:",
      "    if False:", "a reused pid is taken for the run"),
    # ---- merge proof
    M("merge", "tools/merge.py", "equivalent=max_abs <= tol,", "equivalent=True,", "merge always equivalent"),
    M("merge", "tools/merge.py", "    if lcheck.adapter_effect_max_abs <= lcheck.tolerance:", "    if False:",
      "untrained adapter not flagged"),
    M("merge", "tools/merge.py", "verified=lcheck.equivalent and tcheck.identical_ids,",
      "verified=tcheck.identical_ids,", "verified ignores the logits"),
    M("merge", "tools/merge.py", "        if ids2 != ids:", "        if False:", "tokenizer drift not seen"),
    # ---- workspace policy
    M("workspace", "tools/workspace.py", "        if not is_inside(resolved, self.root):",
      "        if False:", "paths outside the workspace accepted"),
    M("workspace", "tools/workspace.py", "    if not (resolved.is_file() or resolved.is_dir()):", "    if False:",
      "FIFOs accepted"),
    M("workspace", "tools/workspace.py", "            if part.is_symlink() or (part.exists() and not part.is_dir()):",
      "            if False:", "owned folders may be symlinks"),
    M("workspace", "tools/workspace.py", '    if "\\x00" in text:', "    if False:", "NUL bytes reach the OS"),
    M("workspace", "tools/workspace.py", "            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)", "            pass",
      "no output lock"),
    M("workspace", "tools/data_io.py", "    for p in picked:  # a link inside", "    for p in []:  # a link inside",
      "dataset folder links out followed"),
    # ---- evaluate comparison and endpoints
    M("evaluate", "tools/evaluate.py", "dse = (math.sqrt(m.stderr ** 2 + bm.stderr ** 2)", "dse = (max(m.stderr, bm.stderr)",
      "delta stderr wrong"),
    M("evaluate", "tools/evaluate.py", "sig = (abs(delta) > 1.96 * dse) if (delta is not None and dse) else None",
      "sig = True", "everything significant"),
    M("evaluate", "tools/evaluate.py", "delta = None if m.value is None or bm.value is None else m.value - bm.value",
      "delta = None if m.value is None or bm.value is None else bm.value - m.value", "delta sign flipped"),
    M("evaluate", "tools/endpoints.py", "    bad = [a for a in addrs if _forbidden(a)]", "    bad = []",
      "metadata addresses allowed"),
    M("evaluate", "tools/evaluate.py", '             "header": auth_header(req.api_key_env)}', "             }",
      "OPENAI_API_KEY forwarded to any endpoint"),
    # ---- planning (the time estimate and the memory fit behind every plan)
    # the throughput model behind recommend_method and estimate_memory moved here (905b280)
    M("planning", "tools/throughput.py",
      "    return tokens_per_second(w, gpu.tflops_bf16, gpu.bandwidth_tbs)"
      " * layout_scale(num_gpus, sharding, cpu_offload)\n",
      "    return 5000.0\n", "throughput is a constant"),
    M("planning", "tools/memory.py", "        weights += p.trainable * (4 - a)\n", "        pass\n",
      "fp32 master weights not counted"),
]


def stale_mutants(mutants: list[Mutant] = MUTANTS, repo: Path = REPO) -> list[str]:
    """Every mutant whose edit cannot be planted as written, with why: its file is gone, its
    old text is not there exactly once (the code moved: point it at the code doing that job now),
    the edit is a no-op, or its area names no tests / tests that do not exist. Checked before any
    mutant runs, so a refactor cannot silently turn a mutant into a skipped one."""
    out = []
    for area, tests in TESTS.items():
        out += [f"area {area}: test file {t} does not exist" for t in tests if not (repo / t).is_file()]
    for m in mutants:
        path = repo / m.file
        if m.area not in TESTS:
            out.append(f"{m.what} ({m.file}): area {m.area!r} has no tests in TESTS")
        if not path.is_file():
            out.append(f"{m.what}: {m.file} does not exist")
            continue
        n = path.read_text(encoding="utf-8").count(m.old)
        if n != 1:
            out.append(f"{m.what} ({m.file}): old text found {n}x, not once: {m.old!r}")
        if m.old == m.new:
            out.append(f"{m.what} ({m.file}): old and new text are the same")
    return out


def _dirty(files: set[str]) -> list[str]:
    out = subprocess.run(["git", "status", "--porcelain", "--", *sorted(files)], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    return [line for line in out.splitlines() if line.strip()]


def run_one(m: Mutant, timeout: int) -> dict:
    path = REPO / m.file
    original = path.read_text(encoding="utf-8")
    if original.count(m.old) != 1:
        return {"area": m.area, "what": m.what, "result": "stale", "why": f"pattern found {original.count(m.old)}x"}
    t0 = time.time()
    try:
        path.write_text(original.replace(m.old, m.new, 1), encoding="utf-8")
        # PYTHONPATH: processes the tests start (training, servers) import this tree's mutant too,
        # not whatever the editable install points at (the bench may run in a clone).
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        p = subprocess.run([PY, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *TESTS[m.area]], cwd=REPO,
                           capture_output=True, text=True, timeout=timeout, env=env)
        killed = p.returncode != 0
        tail = [ln for ln in p.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))][:1]
    except subprocess.TimeoutExpired:
        killed, tail = True, ["timeout (a hang counts as caught)"]
    finally:
        path.write_text(original, encoding="utf-8")
    return {"area": m.area, "what": m.what, "result": "killed" if killed else "survived",
            "by": tail[0] if tail else None, "seconds": round(time.time() - t0, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=sorted(TESTS), help="areas to check")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--check-patterns", action="store_true",
                    help="only check that every mutant can be planted (old text once in its file), then exit")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per mutant")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    todo = [m for m in MUTANTS if not a.only or m.area in a.only]
    stale = stale_mutants()  # all of them, whatever --only says: a stale one is a bench bug
    if stale:
        print(f"STALE MUTANTS: {len(stale)} cannot be planted; the code moved, point each at the code "
              "that does that job now (bench/mutation_check.py):", *stale, sep="\n  ", file=sys.stderr)
        return 2
    if a.check_patterns:
        print(f"all {len(MUTANTS)} mutants can be planted (old text once in its file)")
        return 0
    if a.list:
        for m in todo:
            print(f"{m.area:10} {m.file:26} {m.what}")
        return 0
    dirty = _dirty({m.file for m in todo})
    if dirty:
        print("refusing: commit these first so a mutant can never be left behind:\n" + "\n".join(dirty))
        return 2
    results = []
    for i, m in enumerate(todo, 1):
        r = run_one(m, a.timeout)
        results.append(r)
        print(f"[{i}/{len(todo)}] {r['result']:8} {m.area:10} {m.what}  ({r.get('seconds', 0)} s)", flush=True)
    by_area: dict[str, list[int]] = {}
    for r in results:
        k = by_area.setdefault(r["area"], [0, 0])
        k[0] += r["result"] == "killed"
        k[1] += r["result"] in ("killed", "survived")
    killed = sum(v[0] for v in by_area.values())
    total = sum(v[1] for v in by_area.values())
    for area, (k, n) in by_area.items():
        print(f"{area:10} {k}/{n} killed")
    print(f"kill rate: {killed}/{total} = {killed / max(total, 1):.0%}")
    survived = [r["what"] for r in results if r["result"] == "survived"]
    if survived:
        print("survived (a promise no test guards):", *survived, sep="\n  ")
    stale = [r for r in results if r["result"] == "stale"]
    if stale:
        print("stale mutants (the code changed; update them):", *[r["what"] for r in stale], sep="\n  ")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0 if total and killed / total >= 0.9 and not stale else 1


if __name__ == "__main__":
    sys.exit(main())
