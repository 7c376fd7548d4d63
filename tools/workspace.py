"""Workspace path policy: every path a tool reads or writes resolves inside the workspace.

The server is started with one workspace directory (default: the current directory). Relative
paths are taken from it; absolute paths are accepted only when they resolve inside it; `..` or
symlinks that lead out are refused. Writes go to a temporary sibling first, then are renamed,
so a failure never leaves a partial file behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import UserError

_ENV = "LLM_FT_WORKSPACE"


def write_json_atomic(path: str | os.PathLike, data: dict) -> None:
    """Write JSON to `path` through a temporary sibling and a rename, with no path policy: for
    processes that own their files (the training entrypoint, the run supervisor)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, default=str)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class Workspace:
    """A directory that bounds every read and write of the tools."""

    def __init__(self, root: str | os.PathLike):
        root = Path(root).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()

    def __repr__(self) -> str:
        return f"Workspace({str(self.root)!r})"

    def resolve(self, path: str | os.PathLike, *, field: str = "path", must_exist: bool = False,
                kind: str | None = None) -> Path:
        """Return the absolute path of `path` inside the workspace, or raise UserError.

        kind: None, "file" or "dir" (checked only when the path exists or must exist).
        """
        if path is None or str(path).strip() == "":
            raise UserError("is empty.", field=field, fix="Give a path inside the workspace.")
        p = Path(str(path)).expanduser()
        if not p.is_absolute():
            p = self.root / p
        # resolve() follows symlinks, so a link pointing out of the workspace is caught here.
        resolved = p.resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise UserError(
                f"'{path}' resolves to {resolved}, outside the workspace {self.root}.",
                field=field,
                fix="Use a path inside the workspace (copy or link the file into it, or restart "
                    "the server with --workspace pointing at a directory that contains it).")
        if must_exist and not resolved.exists():
            raise UserError(f"'{path}' does not exist (looked at {resolved}).", field=field,
                            fix="Check the path; relative paths are taken from the workspace root.")
        if resolved.exists() and kind == "file" and not resolved.is_file():
            raise UserError(f"'{path}' is not a file.", field=field, fix="Give a file path.")
        if resolved.exists() and kind == "dir" and not resolved.is_dir():
            raise UserError(f"'{path}' is not a directory.", field=field, fix="Give a directory path.")
        return resolved

    def rel(self, path: Path) -> str:
        """The path relative to the workspace root, for reports."""
        try:
            return str(Path(path).resolve().relative_to(self.root))
        except ValueError:
            return str(path)

    @contextlib.contextmanager
    def atomic_file(self, path: str | os.PathLike, *, field: str = "output_path",
                    mode: str = "w", encoding: str | None = "utf-8") -> Iterator:
        """Open a temporary file next to `path`; rename it onto `path` only on success."""
        target = self.resolve(path, field=field)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None) as fh:
                yield fh
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def write_text(self, path: str | os.PathLike, text: str, *, field: str = "output_path") -> Path:
        """Write a text file atomically inside the workspace; return its absolute path."""
        with self.atomic_file(path, field=field) as fh:
            fh.write(text)
        return self.resolve(path, field=field)

    @contextlib.contextmanager
    def atomic_dir(self, path: str | os.PathLike, *, field: str = "output_dir",
                   overwrite: bool = False) -> Iterator[Path]:
        """Yield a temporary directory; on success it replaces `path` (refused if non-empty
        unless overwrite). On failure nothing is left behind."""
        target = self.resolve(path, field=field)
        if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
            raise UserError(f"'{path}' exists and is not empty.", field=field,
                            fix="Choose a new output directory, or pass overwrite=true.")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            yield tmp
            if target.exists():
                old = target.with_name(f".{target.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(target, old)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


_current: Workspace | None = None


def set_workspace(root: str | os.PathLike) -> Workspace:
    """Set the process-wide workspace (the server calls this once at start)."""
    global _current
    _current = Workspace(root)
    os.environ[_ENV] = str(_current.root)
    return _current


def get_workspace() -> Workspace:
    """The process-wide workspace: set by the server, else $LLM_FT_WORKSPACE, else the cwd."""
    global _current
    if _current is None:
        _current = Workspace(os.environ.get(_ENV) or os.getcwd())
    return _current
