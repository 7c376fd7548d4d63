"""Every function in tools/ and server/ over 80 lines of code (issue 14: a long function is a short
one calling named steps).

A line of code is a line holding a Python token other than a comment: blank lines, comment
lines and docstrings (of the function and of anything defined inside it) do not count. A nested
function counts in its own row and again inside the function that holds it.

Run: .venv/bin/python bench/function_lengths.py [--limit 80] [--all] [PATH ...]
Exits 1 when a function is over the limit (tests/test_code_shape.py runs the same check).
"""
from __future__ import annotations

import ast
import io
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DIRS = ("tools", "server")
LIMIT = 80
_NOT_CODE = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
             tokenize.ENDMARKER, tokenize.ENCODING}


@dataclass(frozen=True)
class Length:
    path: str
    line: int
    name: str
    code_lines: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line} {self.name}: {self.code_lines} lines of code"


def _code_lines(source: str) -> set[int]:
    """Line numbers that hold a code token (a multi-line string counts on each of its lines)."""
    lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in _NOT_CODE:
            lines.update(range(tok.start[0], tok.end[0] + 1))
    return lines


def _docstring_lines(tree: ast.AST) -> set[int]:
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                out.update(range(body[0].lineno, body[0].end_lineno + 1))
    return out


def file_lengths(path: Path, shown: str) -> list[Length]:
    """Lines of code of every function and method in one file."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=shown)
    code = _code_lines(source) - _docstring_lines(tree)
    out: list[Length] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                n = sum(1 for i in range(first, child.end_lineno + 1) if i in code)
                out.append(Length(shown, child.lineno, name, n))
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)
    visit(tree, "")
    return out


def lengths(paths: list[Path] | None = None) -> list[Length]:
    """Every function under `paths` (default tools/ and server/), longest first."""
    roots = paths or [REPO / d for d in DIRS]
    files = sorted(f for r in roots for f in ([r] if r.is_file() else r.rglob("*.py")))
    out = [x for f in files for x in file_lengths(f, _shown(f))]
    return sorted(out, key=lambda x: (-x.code_lines, x.path, x.line))


def over(limit: int = LIMIT, paths: list[Path] | None = None) -> list[Length]:
    return [x for x in lengths(paths) if x.code_lines > limit]


def _shown(f: Path) -> str:
    try:
        return f.resolve().relative_to(REPO).as_posix()
    except ValueError:
        return str(f)


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="bench/function_lengths.py", description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="*", type=Path, help="files or folders (default: tools/ server/)")
    ap.add_argument("--limit", type=int, default=LIMIT)
    ap.add_argument("--all", action="store_true", help="list every function, not only those over the limit")
    args = ap.parse_args(argv)
    rows = lengths(args.paths or None)
    long_ = [x for x in rows if x.code_lines > args.limit]
    for x in (rows if args.all else long_):
        print(x)
    print(f"{len(long_)} of {len(rows)} functions over {args.limit} lines of code")
    return 1 if long_ else 0


if __name__ == "__main__":
    sys.exit(main())
