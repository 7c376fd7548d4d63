"""Background jobs on disk: `<workspace>/runs/<run_id>/` with status.json, command.json, log.txt.

`start_job(kind, argv)` starts `python -m tools.run_registry supervise <run_dir> -- <argv...>`
in a new session (its own process group) and returns the run id at once. The supervisor runs
the command with stdout/stderr in log.txt, waits, and records the exit code and end time in
status.json, so the outcome is on disk even when the MCP server is gone. Every state is derived
from disk: a restarted server (a new process) sees every run.

States: queued (created, no process yet) -> running -> completed | failed | stopped.
A run whose process is gone without a recorded exit (supervisor killed, machine rebooted) is
failed, with the log tail as its reason.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import UserError
from .workspace import get_workspace, short, write_json_atomic

REPO_ROOT = Path(__file__).resolve().parent.parent
RUNS_DIRNAME = "runs"
CACHE_DIR = ".cache"  # library caches of runs, inside the workspace
STATUS, COMMAND, LOG = "status.json", "command.json", "log.txt"
ACTIVE = ("queued", "running")
QUEUED_GRACE_S = 60  # a run without a pid for longer than this never started
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def now_iso(ts: float | None = None) -> str:
    return datetime.fromtimestamp(ts if ts is not None else time.time(), timezone.utc).isoformat(
        timespec="seconds")


# ---------------------------------------------------------------- files

def runs_root() -> Path:
    """<workspace>/runs, a real directory (a symlink out of the workspace is refused)."""
    return get_workspace().owned_dir(RUNS_DIRNAME)


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    """An exclusive lock on the run (server and supervisor both update status.json)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(run_dir / ".lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class StatusFile(BaseModel):
    """The typed fields of status.json that the registry computes with; others pass through.
    A file that breaks these types (hand-edited, copied from elsewhere) is reported for that run
    alone instead of failing every call that lists runs."""
    model_config = ConfigDict(extra="allow")
    run_id: Optional[str] = None
    kind: Optional[str] = None
    name: Optional[str] = None
    state: Optional[str] = None
    reason: Optional[str] = None
    created: Optional[str] = None
    created_ts: Optional[float] = None
    ended_ts: Optional[float] = None
    pid: Optional[int] = None
    pgid: Optional[int] = None
    pid_start_ticks: Optional[int] = None
    exit_code: Optional[int] = None
    gpu_ids: Optional[list[int]] = None
    meta: Optional[dict[str, Any]] = None
    stop_requested: Optional[bool] = None


def status_problem(run_dir: Path) -> Optional[str]:
    """Why run_dir/status.json cannot be used (bad JSON, wrong field types), or None."""
    path = run_dir / STATUS
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"{run_dir.name}/{STATUS} is not readable JSON ({type(exc).__name__})"
    if not isinstance(data, dict):
        return f"{run_dir.name}/{STATUS} is not a JSON object"
    try:
        st = StatusFile.model_validate(data)
    except ValidationError as exc:
        e = exc.errors()[0]
        loc = ".".join(str(x) for x in e["loc"])
        return f"{run_dir.name}/{STATUS}: field {loc}: {e['msg']} (got {short(e.get('input'), 60)})"
    out = (st.meta or {}).get("output_dir")
    if out is not None and not isinstance(out, str):
        return f"{run_dir.name}/{STATUS}: field meta.output_dir must be a string"
    return None


def read_status(run_dir: Path) -> dict:
    """status.json of a run, checked: UserError naming the file and field when it is malformed."""
    problem = status_problem(run_dir)
    if problem:
        raise UserError(f"{problem}.", field="run_id",
                        fix="Fix or delete that status.json (the other runs are unaffected); list_runs "
                            "shows which runs are skipped.")
    return read_json(run_dir / STATUS)


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (FileNotFoundError, json.JSONDecodeError, OSError):
        return {}


def update_status(run_dir: Path, **fields: Any) -> dict:
    """Merge `fields` into run_dir/status.json atomically, under the run's lock."""
    with _locked(run_dir):
        st = read_json(run_dir / STATUS)
        st.update(fields)
        write_json_atomic(run_dir / STATUS, st)
        return st


def run_dir_for(run_id: str, *, must_exist: bool = True) -> Path:
    """The run's directory; UserError for a malformed or unknown id."""
    if not isinstance(run_id, str) or not _RUN_ID_RE.match(run_id):
        raise UserError(f"'{short(run_id)}' is not a run id.", field="run_id",
                        fix="Use an id returned by launch_training (list_runs shows them all).")
    d = runs_root() / run_id
    if must_exist and not (d / STATUS).is_file():
        known = [p.name for p in list_run_dirs()][-5:]
        raise UserError(f"no run '{run_id}' in {runs_root()}.", field="run_id",
                        fix=f"Call list_runs to see the runs; recent ids: {known or 'none'}.")
    return d


def list_run_dirs(skipped: list[str] | None = None) -> list[Path]:
    """Run directories with a usable status.json, oldest first; the others' problems are appended
    to `skipped` (when given)."""
    root = runs_root()
    good: list[tuple[float, str, Path]] = []
    for d in root.iterdir():
        if not (d.is_dir() and not d.is_symlink() and (d / STATUS).is_file()):
            continue
        problem = status_problem(d)
        if problem:
            if skipped is not None:
                skipped.append(problem)
            continue
        good.append((float(read_json(d / STATUS).get("created_ts") or 0), d.name, d))
    return [d for _, _, d in sorted(good)]


def log_tail(run_dir: Path, n: int = 20, *, max_bytes: int = 256_000) -> list[str]:
    """The last n lines of the run's log (carriage-return progress bars collapsed)."""
    p = run_dir / LOG
    try:
        with open(p, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            text = fh.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    lines = [ln.rsplit("\r", 1)[-1].rstrip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln.strip()]
    return lines[-n:] if n > 0 else []


# ---------------------------------------------------------------- processes

def _proc_start_ticks(pid: int) -> int | None:
    """Process start time in clock ticks (Linux /proc), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _cmdline(pid: int) -> bytes:
    """The process's command line (NUL-separated), b"" when it is gone or unreadable."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _cmdline_names(pid: int, run_id: str) -> bool | None:
    """Whether process `pid` is this run's supervisor (its command line names the registry and
    the run id); None where /proc is absent."""
    if not Path("/proc/self/cmdline").exists():
        return None
    cmd = _cmdline(pid)
    return b"tools.run_registry" in cmd and run_id.encode() in cmd


def pid_alive(pid: int | None, start_ticks: int | None = None, run_id: str | None = None) -> bool:
    """True when `pid` runs (not a zombie), started at `start_ticks` if known, and is the run's own
    supervisor if `run_id` is given: a pid reused after a reboot, or one named in a status.json
    copied from another machine, is not the run."""
    if not pid or not isinstance(pid, int) or pid <= 0:
        return False
    if run_id is not None and _cmdline_names(pid, run_id) is False:
        return False
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our own exited child
    stat_path = Path(f"/proc/{pid}/stat")
    if Path("/proc/self/stat").exists():
        try:
            fields = stat_path.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return False
        if fields[0] in ("Z", "X"):
            return False
        if start_ticks is not None and int(fields[19]) != int(start_ticks):
            return False
        return True
    try:  # no /proc (macOS): signal 0 probes existence
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def descendants(pid: int) -> list[int]:
    """All descendant pids of `pid` (Linux /proc), children first. torchrun puts its workers in
    sessions of their own, so a process-group signal does not reach them."""
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def signal_run(status: dict, sig: int) -> list[int]:
    """Send `sig` to the run; returns the pids hit. SIGTERM goes to the training workers
    themselves (each saves a checkpoint at the end of its step and exits 0), so the launcher sees
    them finish instead of stopping them under its shutdown timeout; other jobs (and SIGKILL) get
    the process group and every descendant."""
    hit: list[int] = []
    pid = status.get("pid")
    if not pid or not pid_alive(pid, status.get("pid_start_ticks"), status.get("run_id")):
        return hit
    targets = descendants(pid)
    if sig == signal.SIGTERM:
        workers = [p for p in targets if b"tools.train" in _cmdline(p)]
        if workers:
            for p in workers:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(p, sig)
                    hit.append(p)
            return hit
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(status.get("pgid") or pid, sig)
        hit.append(pid)
    if sig == signal.SIGKILL:  # workers outside the group (torchrun sessions) die too
        for p in targets:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, sig)
                hit.append(p)
    return hit


# ---------------------------------------------------------------- state

def output_dir_of(status: dict) -> Path | None:
    """meta.output_dir as an absolute path (relative ones are taken from the workspace root)."""
    out = (status.get("meta") or {}).get("output_dir")
    if not out or not isinstance(out, str):
        return None
    p = Path(out)
    return p if p.is_absolute() else get_workspace().root / p


def _summary_of(status: dict) -> dict:
    out = output_dir_of(status)
    return read_json(out / "summary.json") if out else {}


def derive_state(run_dir: Path, status: dict | None = None) -> tuple[str, str | None]:
    """(state, reason) from what is on disk and whether the process still lives."""
    st = status if status is not None else read_json(run_dir / STATUS)
    if st.get("exit_code") is not None:
        rc = st["exit_code"]
        if st.get("stop_requested"):
            return "stopped", f"stopped on request (exit code {rc})"
        if rc == 0:
            if _summary_of(st).get("status") == "stopped":
                return "stopped", "stopped by a signal; a checkpoint was saved"
            return "completed", None
        return "failed", f"exit code {rc}" + (f" (killed by signal {-rc})" if rc < 0 else "")
    if st.get("state") == "stopped":  # stop_training had to kill it; it wrote this itself
        return "stopped", st.get("reason") or "stopped on request"
    if st.get("state") == "failed":  # failed to start
        return "failed", st.get("reason")
    pid = st.get("pid")
    if not pid:
        if time.time() - float(st.get("created_ts", 0)) < QUEUED_GRACE_S:
            return "queued", None
        return "failed", "the job never started (no process was recorded)"
    if pid_alive(pid, st.get("pid_start_ticks"), st.get("run_id") or run_dir.name):
        return "running", ("stop requested" if st.get("stop_requested") else None)
    # The supervisor writes exit_code before it exits: re-read once in case it just did.
    st2 = read_json(run_dir / STATUS)
    if st2.get("exit_code") is not None:
        return derive_state(run_dir, st2)
    if st.get("stop_requested"):
        return "stopped", "stopped on request (process gone before recording an exit code)"
    return "failed", ("the process ended without recording an exit code (its supervisor was killed, "
                      "or the machine restarted)")


def active_runs() -> list[dict]:
    out = []
    for d in list_run_dirs():
        st = read_json(d / STATUS)
        if st.get("run_id") is None:
            st["run_id"] = d.name
        state, _ = derive_state(d, st)
        if state in ACTIVE:
            out.append({**st, "state": state})
    return out


def _devices(gpu_ids: list[int] | None) -> set[int] | None:
    return None if gpu_ids is None else {int(g) for g in gpu_ids}


def check_devices_free(gpu_ids: list[int] | None = None, *, force: bool = False,
                       kinds: tuple[str, ...] | None = None) -> None:
    """UserError when an active run uses any of these devices (None = all / the CPU)."""
    if force:
        return
    want = _devices(gpu_ids)
    for st in active_runs():
        if kinds is not None and st.get("kind") not in kinds:
            continue
        have = _devices(st.get("gpu_ids"))
        if want is None or have is None or (want & have):
            where = ("all devices (GPUs or the CPU)" if want is None or have is None
                     else f"GPUs {sorted(want & have)}")
            raise UserError(
                f"run '{st['run_id']}' ({st.get('kind')}, {st['state']}) is already using {where}.",
                field="force",
                fix=f"Wait for it (training_status run_id='{st['run_id']}'), stop it with "
                    f"stop_training run_id='{st['run_id']}', or pass force=true to run both at once "
                    "(they will compete for memory and compute).")


def new_run_id(kind: str, name: str | None = None) -> str:
    """A fresh id `<kind>-<name>-<UTC time>-<hex>`, its directory created."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name or "").strip("-._")[:40]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    kind_slug = re.sub(r"[^A-Za-z0-9]+", "-", kind).strip("-")[:20] or "job"
    root = runs_root()
    root.mkdir(parents=True, exist_ok=True)
    while True:
        rid = "-".join(x for x in (kind_slug, slug, stamp, secrets.token_hex(2)) if x)
        try:
            (root / rid).mkdir()
            return rid
        except FileExistsError:
            continue


def cuda_visible(gpu_ids: list[int]) -> str:
    """CUDA_VISIBLE_DEVICES for a job on `gpu_ids`, the indices this server sees. When the server
    itself runs under CUDA_VISIBLE_DEVICES, its GPU i is the i-th entry there (an index or a
    UUID), not physical GPU i: the job gets those entries."""
    parent = os.environ.get("CUDA_VISIBLE_DEVICES")
    if parent is None:
        return ",".join(str(g) for g in gpu_ids)
    seen = [d.strip() for d in parent.split(",") if d.strip()]
    bad = [g for g in gpu_ids if not 0 <= g < len(seen)]
    if bad:
        raise UserError(f"GPU(s) {bad} are not among the {len(seen)} this server sees "
                        f"(CUDA_VISIBLE_DEVICES={parent}).", field="gpu_ids",
                        fix=f"Use indices 0-{len(seen) - 1}: they count the server's GPUs in that order.")
    return ",".join(seen[g] for g in gpu_ids)


def _child_env(gpu_ids: list[int] | None, env: dict[str, str] | None) -> dict[str, str]:
    e = dict(os.environ)
    pp = [str(REPO_ROOT)] + [p for p in e.get("PYTHONPATH", "").split(os.pathsep) if p]
    e["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(pp))
    e["PYTHONUNBUFFERED"] = "1"
    ws = get_workspace()
    e["LLM_FT_WORKSPACE"] = str(ws.root)
    # The datasets cache holds Arrow copies of the workspace's own data: it stays in the workspace
    # (an explicit HF_DATASETS_CACHE wins). The hub cache (model downloads, shared by every
    # project and many GB) stays where the user keeps it: references/security.md says why.
    if "HF_DATASETS_CACHE" not in e:
        e["HF_DATASETS_CACHE"] = str(ws.owned_dir(CACHE_DIR) / "datasets")
    e.setdefault("MPLCONFIGDIR", str(ws.owned_dir(CACHE_DIR) / "matplotlib"))
    # How long the launcher waits for the other ranks after one died before it kills them. They
    # are stuck in a collective waiting for the dead one, so a long wait only delays the failure.
    # A graceful stop does not go through the launcher (signal_run signals the workers), so it is
    # not cut by this.
    e.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30")
    if gpu_ids is not None:
        e["CUDA_VISIBLE_DEVICES"] = cuda_visible(gpu_ids)
    for k in [k for k in e if k.startswith("PYTEST_")]:
        e.pop(k)
    if env:
        e.update({k: str(v) for k, v in env.items()})
    return e


def start_job(kind: str, argv: list[str], *, name: str | None = None, meta: dict | None = None,
              gpu_ids: list[int] | None = None, force: bool = False, run_id: str | None = None,
              env: dict[str, str] | None = None) -> str:
    """Start `argv` detached (cwd = workspace root) under a supervisor; return the run id at once.

    kind: "train", "evaluate", ...; name: a label; meta: stored in status.json (e.g. output_dir);
    gpu_ids: devices it uses (None = all, or the CPU) - one active run per device set unless
    force; run_id: a directory made by new_run_id (to copy inputs into it first); env: extra
    environment variables."""
    if not argv or not all(isinstance(a, str) for a in argv):
        raise UserError("argv must be a non-empty list of strings.", field="argv")
    check_devices_free(gpu_ids, force=force)
    ws = get_workspace()
    rid = run_id or new_run_id(kind, name)
    rdir = run_dir_for(rid, must_exist=False)
    rdir.mkdir(parents=True, exist_ok=True)
    created = time.time()
    cmd = [sys.executable, "-m", "tools.run_registry", "supervise", str(rdir), "--", *argv]
    write_json_atomic(rdir / COMMAND, {"argv": list(argv), "supervisor_argv": cmd, "cwd": str(ws.root),
                                  "env": dict(env or {}), "gpu_ids": gpu_ids, "kind": kind})
    update_status(rdir, run_id=rid, kind=kind, name=name, state="queued", created=now_iso(created),
                  created_ts=created, gpu_ids=gpu_ids, meta=meta or {}, log_path=str(rdir / LOG),
                  force=force)
    try:
        with open(rdir / LOG, "ab") as log:
            proc = subprocess.Popen(cmd, cwd=str(ws.root), env=_child_env(gpu_ids, env),
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, close_fds=True)
    except OSError as exc:
        update_status(rdir, state="failed", reason=f"could not start: {exc}", ended=now_iso())
        raise
    update_status(rdir, pid=proc.pid, pgid=proc.pid, pid_start_ticks=_proc_start_ticks(proc.pid),
                  started=now_iso(), state="running")
    return rid


def describe(run_dir: Path) -> dict:
    """status.json (checked) plus the derived state and reason."""
    st = read_status(run_dir)
    state, reason = derive_state(run_dir, st)
    return {**st, "state": state, "reason": reason}


# ---------------------------------------------------------------- supervisor

def supervise(run_dir: str, argv: list[str]) -> int:
    """Run argv, wait, record exit_code/ended in status.json. Signals: SIGTERM/SIGINT/SIGHUP are
    forwarded to the child unless stop_training already signalled the whole process group."""
    rdir = Path(run_dir)
    child: subprocess.Popen | None = None

    def forward(signum, _frame):
        st = read_json(rdir / STATUS)
        if child is not None and child.poll() is None and not st.get("stop_requested"):
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, forward)  # a Python handler, reset to default in the exec'd child
    print(f"[supervisor] {now_iso()} start: {' '.join(argv)}", flush=True)
    try:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    except OSError as exc:
        print(f"[supervisor] could not start: {exc}", flush=True)
        update_status(rdir, exit_code=127, ended=now_iso(), ended_ts=time.time(),
                      reason=f"could not start {argv[0]}: {exc}")
        return 127
    update_status(rdir, child_pid=child.pid, supervisor_pid=os.getpid())
    rc = child.wait()
    if rc != 0:
        _summary_for_a_dead_run(rdir, rc)
    update_status(rdir, exit_code=rc, ended=now_iso(), ended_ts=time.time())
    print(f"[supervisor] {now_iso()} exit code {rc}", flush=True)
    return 0


def _summary_for_a_dead_run(rdir: Path, rc: int) -> None:
    """A run that failed without writing its summary (rank 0 killed, e.g. by the OOM killer, or a
    worker dying before the trainer existed) still gets one, with the error from its log."""
    st = read_json(rdir / STATUS)
    out = output_dir_of(st)
    if st.get("kind") != "train" or out is None:
        return
    summ = read_json(out / "summary.json")
    if summ.get("status") in ("failed", "completed", "stopped") and float(summ.get("started") or 0) >= \
            float(st.get("created_ts") or 0) - 1:
        return
    from .runs import error_from_log
    error = error_from_log(log_tail(rdir, 200)) or (f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}")
    with contextlib.suppress(OSError):
        write_json_atomic(out / "summary.json", {**summ, "status": "failed", "error": error, "exit_code": rc,
                                                 "written_by": "supervisor", "started": st.get("created_ts"),
                                                 "ended": time.time()})


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) >= 3 and args[0] == "supervise" and "--" in args:
        i = args.index("--")
        return supervise(args[1], args[i + 1:])
    print("usage: python -m tools.run_registry supervise <run_dir> -- <command...>", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
