"""The mutation bench's mutants can all be planted (issue 15): each one's old text occurs exactly
once in its file, so a refactor that moves the guarded code fails here instead of leaving a mutant
that is silently never run. Only the check; no mutant is applied and no test is run under one."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

from conftest import REPO


def _bench():
    spec = importlib.util.spec_from_file_location("mutation_check", REPO / "bench" / "mutation_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclass looks its module up while it is defined
    spec.loader.exec_module(mod)
    return mod


def test_every_mutant_can_be_planted():
    bench = _bench()
    assert bench.MUTANTS
    stale = bench.stale_mutants()
    assert not stale, "stale mutants in bench/mutation_check.py (point them at the code doing that job now):\n" \
        + "\n".join(stale)


def test_a_moved_pattern_is_named(tmp_path):
    """The check itself can fail: a mutant whose text is gone, or there twice, is reported by name."""
    bench = _bench()
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "x.py").write_text("if a:\n    pass\nif a:\n    pass\n")
    for area, tests in bench.TESTS.items():
        for t in tests:
            (tmp_path / t).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / t).write_text("")
    ms = [bench.Mutant("merge", "tools/x.py", "if a:", "if False:", "twice"),
          bench.Mutant("merge", "tools/x.py", "if b:", "if False:", "gone"),
          bench.Mutant("merge", "tools/x.py", "if a:\n    pass\nif a:", "x", "once")]
    stale = bench.stale_mutants(ms, repo=tmp_path)
    assert len(stale) == 2 and "twice" in stale[0] and "2x" in stale[0] and "gone" in stale[1] and "0x" in stale[1]


def test_the_bench_refuses_to_run_stale_mutants():
    """The command line runs the same check first (exit 0 here: nothing stale, nothing mutated)."""
    p = subprocess.run([sys.executable, str(REPO / "bench" / "mutation_check.py"), "--check-patterns"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "can be planted" in p.stdout
