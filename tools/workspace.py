"""Workspace path policy: every path a tool reads or writes resolves inside the workspace.

The server is started with one workspace directory (default: the current directory). Relative
paths are taken from it; absolute paths are accepted only when they resolve inside it; `..` or
symlinks that lead out are refused. Writes go to a temporary sibling first, then are renamed,
so a failure never leaves a partial file behind; the temporary folder of a writer that was killed
is removed by the next write of the same output.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import UserError

_ENV = "LLM_FT_WORKSPACE"
TMP_DIR = ".tmp"  # scratch files of the tools (never the system /tmp: nothing outside the workspace)


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


def is_inside(path: Path, root: Path) -> bool:
    """Whether the already-resolved `path` is `root` or lies below it."""
    return path == root or root in path.parents


ECHO_CHARS = 200        # echoed input is cut to this: a 10 MB argument must not come back whole
NAME_MAX, PATH_MAX = 255, 4096   # Linux limits; checked up front so the error names the field

# The paths each tool call resolved, with their fields: lets the server name the field of an
# OSError (PermissionError, IsADirectoryError...) raised later while writing or reading them.
_FIELDS: contextvars.ContextVar[dict[Path, str] | None] = contextvars.ContextVar("ws_fields",
                                                                                default=None)


def short(value: object, n: int = ECHO_CHARS) -> str:
    """`value` as text, cut to n characters (with the full length said) for error messages."""
    text = str(value)
    return text if len(text) <= n else f"{text[:n]}... ({len(text):,} characters)"


def check_path_text(text: str, field: str) -> str:
    """Refuse path strings the OS cannot take, with the field named (not an OSError later)."""
    if "\x00" in text:
        raise UserError("contains a NUL byte.", field=field, fix="Remove the \\x00 from the path.")
    if any(c in text for c in "\r\n"):
        raise UserError(f"'{short(text)!r}' contains a line break.", field=field,
                        fix="Give the path on one line, without CR/LF characters.")
    if text.startswith("~"):
        raise UserError(f"'{short(text)}': '~' is not expanded (home directories are outside the "
                        "workspace).", field=field,
                        fix="Give a path relative to the workspace root, or an absolute path inside it.")
    if len(text.encode("utf-8", "surrogateescape")) > PATH_MAX:
        raise UserError(f"is {len(text):,} characters long; paths are limited to {PATH_MAX} bytes.",
                        field=field, fix="Give a shorter path.")
    long_part = next((part for part in text.split("/")
                      if len(part.encode("utf-8", "surrogateescape")) > NAME_MAX), None)
    if long_part is not None:
        raise UserError(f"has a path component of {len(long_part):,} characters ('{short(long_part, 40)}'); "
                        f"file names are limited to {NAME_MAX} bytes.", field=field,
                        fix="Use shorter file and folder names.")
    return text


def _check_kind(resolved: Path, given: object, field: str, kind: str | None) -> None:
    if not (resolved.is_file() or resolved.is_dir()):
        raise UserError(f"'{short(given)}' is not a regular file or directory (a FIFO, socket or "
                        "device).", field=field, fix="Give a regular file (or a directory of them).")
    if kind == "file" and not resolved.is_file():
        raise UserError(f"'{short(given)}' is not a file.", field=field, fix="Give a file path.")
    if kind == "dir" and not resolved.is_dir():
        raise UserError(f"'{short(given)}' is not a directory.", field=field, fix="Give a directory path.")


def _note_field(resolved: Path, field: str) -> None:
    seen = _FIELDS.get()
    if seen is not None:
        seen.setdefault(resolved, field)


@contextlib.contextmanager
def tracking_fields() -> Iterator[dict[Path, str]]:
    """Record, for one tool call, which field each resolved path came from."""
    token = _FIELDS.set({})
    try:
        yield _FIELDS.get()
    finally:
        _FIELDS.reset(token)


def field_of(filename: str | None, seen: dict[Path, str]) -> str | None:
    """The field whose path is `filename` or contains it (the longest match)."""
    if not filename:
        return None
    try:
        f = Path(os.fsdecode(filename)).absolute()
    except (TypeError, ValueError):
        return None
    best = None
    for p, fld in seen.items():
        if f == p or p in f.parents or f.parent == p.parent and f.name.startswith(f".{p.name}."):
            if best is None or len(str(p)) > len(str(best[0])):
                best = (p, fld)
    return best[1] if best else None


def _umask() -> int:
    """The process umask. Read from /proc where it can be: setting it to read it back would
    briefly give files that other threads create at that moment no umask at all."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


TMP_TAG = ".llmft.tmp"  # ends the name of every temporary output folder (atomic_dir)


def _temp_dir_locked(target: Path) -> tuple[Path, int]:
    """A new temporary sibling of `target` and an fd holding an exclusive flock on it for the
    writer's lifetime: the kernel drops the lock when the writer dies (SIGKILL, a timeout), which
    is how a later call tells a leftover from a live writer's folder. A cleaner may take the lock
    between mkdtemp and our flock and delete the folder: then the inode check fails; retry."""
    import fcntl
    for _ in range(10):
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=TMP_TAG, dir=target.parent))
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                return tmp, fd
        except FileNotFoundError:
            pass
        os.close(fd)
    raise OSError(f"could not create a temporary folder next to {target}")


def _stale_candidates(target: Path) -> Iterator[Path]:
    """Sibling folders that may be leftovers: any temporary output folder of ours (tagged), and,
    for `target` itself (its lock is held), untagged ones of earlier versions and the .old folder
    of an interrupted overwrite."""
    own = re.compile(rf"\.{re.escape(target.name)}\.(?:[a-z0-9_]{{8}}\.tmp|old)")
    tagged = re.compile(rf"\..+\.[a-z0-9_]{{8}}{re.escape(TMP_TAG)}")
    for p in sorted(target.parent.iterdir()):
        if (tagged.fullmatch(p.name) or own.fullmatch(p.name)) and p.is_dir() and not p.is_symlink():
            yield p


def _tree_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def remove_stale_temps(target: Path) -> list[tuple[Path, int]]:
    """Remove the temporary folders next to `target` that dead writers left behind; return them
    with their sizes. Call it holding the lock on `target` (exclusive). A folder whose flock is
    held belongs to a live writer and is left alone."""
    import fcntl
    removed = []
    for p in _stale_candidates(target):
        try:
            fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue  # gone already (another cleaner) or unreadable: not ours to force
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_NB | fcntl.LOCK_EX)
            except BlockingIOError:
                continue  # its writer is alive
            size = _tree_bytes(p)
            shutil.rmtree(p, ignore_errors=True)
            removed.append((p, size))
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def exclusive(target: Path, *, field: str, what: str = "writing") -> Iterator[bool]:
    """A non-blocking exclusive lock on the directory `target` (created empty when missing; yields
    whether it was created): two calls that write the same output at once get a clear refusal
    instead of one silently losing its result. flock on the directory itself leaves no lock file
    behind; a directory renamed onto `target` later is a new inode, seen as non-empty by the next
    caller."""
    import fcntl
    created = False
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            target.mkdir()
            created = True
    if not target.is_dir():
        yield False  # a file: the caller refuses it
        return
    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another call is {what} '{short(target)}' right now.", field=field,
                            fix="Wait for it to finish, or choose another output path.") from None
        yield created
    finally:
        os.close(fd)  # releases the lock


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

        kind: None, "file" or "dir" (checked only when the path exists or must exist). An existing
        path must be a regular file or a directory: FIFOs, sockets and devices are refused (a
        FIFO would block the reader forever).
        """
        if path is None or str(path).strip() == "":
            raise UserError("is empty.", field=field, fix="Give a path inside the workspace.")
        text = check_path_text(str(path), field)
        p = Path(text)
        if not p.is_absolute():
            p = self.root / p
        try:
            # resolve() follows symlinks, so a link pointing out of the workspace is caught here.
            resolved = p.resolve()
            exists = resolved.exists()
        except (OSError, RuntimeError) as exc:  # ELOOP, ENAMETOOLONG, EACCES on a parent
            raise UserError(f"'{short(path)}' cannot be resolved: {type(exc).__name__}: "
                            f"{short(exc)}.", field=field,
                            fix="Give a plain path inside the workspace (no symlink loops).") from None
        self.contain(resolved, field=field, given=path)
        if must_exist and not exists:
            raise UserError(f"'{short(path)}' does not exist (looked at {short(resolved)}).", field=field,
                            fix="Check the path; relative paths are taken from the workspace root.")
        if exists:
            _check_kind(resolved, path, field, kind)
            if kind == "dir":  # a folder a library opens by itself: check what is in it too
                self.contain_tree(resolved, field=field)
        _note_field(resolved, field)
        return resolved

    def contain(self, path: str | os.PathLike, *, field: str = "path", given: object = None) -> Path:
        """Check that `path` (after following every symlink) lies inside the workspace; return it.
        Used for every file a tool opens that the caller did not name itself (the files of a
        dataset directory, a tokenizer folder), so a link inside an allowed folder cannot lead out."""
        resolved = Path(path).resolve()
        if not is_inside(resolved, self.root):
            shown = short(given if given is not None else path)
            raise UserError(
                f"'{shown}' resolves to {short(resolved)}, outside the workspace {self.root}.",
                field=field,
                fix="Use a path inside the workspace (copy the file into it rather than linking it, "
                    "or restart the server with --workspace pointing at a directory that contains it).")
        return resolved

    def contain_tree(self, folder: Path, *, field: str = "path", limit: int = 10_000) -> None:
        """contain() for every file and link under `folder` (a model or tokenizer directory that a
        library will open by itself), and refuse non-regular files in it."""
        for n, f in enumerate(Path(folder).rglob("*")):
            if n >= limit:
                break
            if f.is_symlink() or not f.is_dir():
                r = self.contain(f, field=field, given=f"{self.rel(folder)}/{f.relative_to(folder)}")
                if r.exists() and not (r.is_file() or r.is_dir()):
                    raise UserError(f"'{self.rel(f)}' is not a regular file.", field=field,
                                    fix="Remove the FIFO/socket/device from that folder.")

    def owned_dir(self, name: str) -> Path:
        """A folder the server owns (runs, reports, eval_tasks...): created when missing, and
        refused when it is a symlink or not a directory, so its writes stay in the workspace."""
        p = self.root / name
        for part in [self.root / Path(*Path(name).parts[:i + 1]) for i in range(len(Path(name).parts))]:
            if part.is_symlink() or (part.exists() and not part.is_dir()):
                raise UserError(f"'{self.rel(part)}' must be a real directory inside the workspace "
                                "(it is a symlink or a file).", field="workspace",
                                fix=f"Remove or rename {part} so the server can create the folder itself.")
        p.mkdir(parents=True, exist_ok=True)
        return p

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
        if target.is_dir():
            raise UserError(f"'{short(path)}' is a directory.", field=field,
                            fix="Give a file path (e.g. <dir>/name.ext).")
        target.parent.mkdir(parents=True, exist_ok=True)
        self.contain(target.parent, field=field, given=path)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the user's umask decides
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
                   overwrite: bool = False, removed: list[str] | None = None) -> Iterator[Path]:
        """Yield a temporary directory; on success it replaces `path` (refused if non-empty
        unless overwrite). On failure nothing is left behind; temporary folders that killed
        earlier writers of `path` left are removed first, and listed in `removed` (with sizes)."""
        target = self.resolve(path, field=field)
        if target == self.root:
            raise UserError("is the workspace root itself.", field=field,
                            fix="Give a sub-directory, e.g. data/converted.")
        self.check_empty(target, path, field=field, overwrite=overwrite)
        with exclusive(target, field=field) as created:
            self.check_empty(target, path, field=field, overwrite=overwrite)  # again, under the lock
            for p, size in remove_stale_temps(target):
                if removed is not None:
                    removed.append(f"'{self.rel(p)}' ({size / 2**20:.1f} MiB)")
            tmp, lock_fd = _temp_dir_locked(target)
            try:
                os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the user's umask decides
                _note_field(tmp, field)
                yield from self._fill_dir(tmp, target)
            except BaseException:
                if created:
                    with contextlib.suppress(OSError):
                        target.rmdir()  # only the empty folder this call made
                raise
            finally:
                os.close(lock_fd)  # releases the writer's flock

    def check_empty(self, target: Path, given: object, *, field: str, overwrite: bool) -> None:
        """UserError when `target` exists and is a file or a non-empty directory (unless overwrite)."""
        if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
            raise UserError(f"'{short(given)}' exists and is not empty.", field=field,
                            fix="Choose a new output directory, or pass overwrite=true.")

    @staticmethod
    def _fill_dir(tmp: Path, target: Path) -> Iterator[Path]:
        try:
            yield tmp
            if target.is_dir() and not any(target.iterdir()):
                os.replace(tmp, target)  # rename onto an empty directory is atomic
            elif target.exists():
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
