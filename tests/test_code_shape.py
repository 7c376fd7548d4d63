"""Code shape (issue 14): no function in tools/ or server/ over 80 lines of code; a long function
is a short one calling named steps. bench/function_lengths.py counts them (blank lines, comments
and docstrings do not count) and lists every offender."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("function_lengths", REPO / "bench" / "function_lengths.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclass looks its module up while being defined
    spec.loader.exec_module(mod)
    return mod


def test_no_function_over_80_lines_of_code_in_tools_and_server():
    bench = _bench()
    long_ = bench.over(80)
    assert not long_, "functions over 80 lines of code (split them into named steps):\n" + \
        "\n".join(map(str, long_))


def test_the_count_skips_docstrings_comments_and_blank_lines(tmp_path):
    """The counter itself: 3 lines of code, however much prose surrounds them."""
    f = tmp_path / "m.py"
    f.write_text('def f(x):\n    """Doc\n\n    more doc."""\n    # a comment\n\n    y = (x +\n         1)\n'
                 '    return y\n\n\nclass C:\n    def g(self):\n        return 1\n')
    got = {x.name: x.code_lines for x in _bench().file_lengths(f, "m.py")}
    assert got == {"f": 4, "C.g": 2}
