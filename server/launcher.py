#!/usr/bin/env python3
"""Start the llm-fine-tuning MCP server from any copy of this repository: an installed Claude Code
plugin, a fresh clone without .venv, or a checkout after `make`. Nothing but MCP goes to stdout.

    python3 server/launcher.py [SERVER ARGS]      serve MCP over stdio (what .mcp.json runs)
    python3 server/launcher.py --install [EXTRAS] [--dry-run] [-- PIP ARGS]
                                                  add the training stack (default: train,eval)
    python3 server/launcher.py --where            print the Python the server runs on

The server runs on the first of: $LLM_FT_PYTHON; <root>/.venv (what `make` builds); a light venv
holding only the server's own dependencies (pyproject's [project].dependencies: mcp, pydantic,
pyyaml, jinja2; no torch) in $CLAUDE_PLUGIN_DATA, else $XDG_CACHE_HOME/llm-fine-tuning
(~/.cache/llm-fine-tuning). The light venv is made on first start, by a process of its own that
finishes even if the client stops waiting; meanwhile this script answers MCP itself (initialize,
empty lists) so that no client start-up timeout is hit, then hands the session to the real server
and tells the client that the tool list changed. Later starts run the server at once.

Standard library only, and Python 3.8 syntax (macOS's /usr/bin/python3 is 3.9): this runs before
any venv exists, and it never imports the server package.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = Path(__file__).resolve()
MIN_PYTHON = (3, 10)
MARKER = ".llm-fine-tuning-light.json"
DEFAULT_EXTRAS = "train,eval"
# Protocol versions the bootstrap answer may agree to (the MCP SDK the server uses speaks these).
PROTOCOL_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")
BOOT_ID = "llm-fine-tuning-launcher-initialize"
WINDOWS = os.name == "nt"


def log(message: str) -> None:
    print(f"llm-fine-tuning launcher: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- pyproject.toml

def _toml_string_arrays(text: str) -> dict:
    """{(table, key): [str, ...]} for each `key = [ "...", ... ]` array in a TOML file: the part
    of TOML that pyproject.toml uses for requirements (Python 3.10 has no tomllib)."""
    found: dict = {}
    table = ""
    pos = 0
    header = re.compile(r"^[ \t]*\[([^\[\]\n]+)\][ \t]*(?:#.*)?$", re.M)
    assign = re.compile(r"^[ \t]*([A-Za-z0-9_-]+|\"[^\"\n]+\")[ \t]*=[ \t]*\[", re.M)
    while True:
        h, a = header.search(text, pos), assign.search(text, pos)
        if a is None:
            return found
        if h is not None and h.start() < a.start():
            table, pos = h.group(1).strip(), h.end()
            continue
        items, i, depth = [], a.end(), 1
        while i < len(text) and depth:
            c = text[i]
            if c == "#":
                i = text.find("\n", i)
                i = len(text) if i < 0 else i
            elif c in "\"'":
                j = i + 1
                while j < len(text) and text[j] != c:
                    j += 2 if (c == '"' and text[j] == "\\") else 1
                raw = text[i + 1:j]
                items.append(raw.encode().decode("unicode_escape") if c == '"' else raw)
                i = j + 1
            else:
                depth += {"[": 1, "]": -1}.get(c, 0)
                i += 1
        found[(table, a.group(1).strip('"'))] = items
        pos = i


def requirements(pyproject: Path = ROOT / "pyproject.toml") -> tuple:
    """(light requirements, {extra: requirements}) from pyproject.toml."""
    text = pyproject.read_text(encoding="utf-8")
    try:
        import tomllib  # Python 3.11+
    except ImportError:
        arrays = _toml_string_arrays(text)
        light = arrays.get(("project", "dependencies"), [])
        extras = {k: v for (t, k), v in arrays.items() if t == "project.optional-dependencies"}
        return list(light), extras
    project = tomllib.loads(text)["project"]
    return list(project.get("dependencies", [])), dict(project.get("optional-dependencies", {}))


# ------------------------------------------------------------------------------- interpreters

def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if WINDOWS else "bin/python")


def user_cache() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or (os.environ.get("LOCALAPPDATA") if WINDOWS else None)
    return Path(cache or Path.home() / ".cache") / "llm-fine-tuning"


def _pointer() -> Path:
    """Where the venv this root's server last used is noted, so that `--install` run from a
    terminal (no $CLAUDE_PLUGIN_DATA there) finds the plugin's venv."""
    return user_cache() / "roots" / (hashlib.sha256(str(ROOT).encode()).hexdigest()[:16] + ".json")


def remember(venv: Path) -> None:
    try:
        _pointer().parent.mkdir(parents=True, exist_ok=True)
        _pointer().write_text(json.dumps({"root": str(ROOT), "venv": str(venv)}), encoding="utf-8")
    except OSError:
        pass


def light_venv() -> Path:
    """The light venv: in the plugin's data folder when Claude Code gives one, else the one this
    root's server last used, else in the user's cache."""
    if os.environ.get("CLAUDE_PLUGIN_DATA"):
        return Path(os.environ["CLAUDE_PLUGIN_DATA"]) / "venv"
    try:
        noted = Path(json.loads(_pointer().read_text(encoding="utf-8"))["venv"])
        if venv_python(noted).exists():
            return noted
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return user_cache() / "venv"


def light_ready(venv: Path, reqs: list) -> bool:
    try:
        marker = json.loads((venv / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return venv_python(venv).exists() and marker.get("requirements") == sorted(reqs)


def server_python(reqs: list):
    """The interpreter that runs the server, or None while the light venv is not built yet."""
    if os.environ.get("LLM_FT_PYTHON"):
        return Path(os.environ["LLM_FT_PYTHON"])
    checkout = venv_python(ROOT / ".venv")
    if checkout.exists():
        return checkout
    venv = light_venv()
    return venv_python(venv) if light_ready(venv, reqs) else None


def base_python():
    """A Python >= 3.10 with venv to make the light venv with: this one, else one on PATH
    (each is asked, since a pyenv shim may exist for a version that is not installed)."""
    if sys.version_info >= MIN_PYTHON:
        return sys.executable
    check = "import sys, venv; sys.exit(sys.version_info < (%d, %d))" % MIN_PYTHON
    for minor in range(14, MIN_PYTHON[1] - 1, -1):
        found = shutil.which(f"python3.{minor}")
        if found and subprocess.call([found, "-c", check], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL) == 0:
            return found
    return None


def has_training_stack(python: Path) -> bool:
    """torch in that interpreter's venv (a cheap look at site-packages, no import)."""
    prefix = python.parent.parent
    pattern = "Lib/site-packages/torch" if WINDOWS else "lib/python3*/site-packages/torch"
    return any(prefix.glob(pattern)) or not (prefix / "pyvenv.cfg").exists()


def install_command() -> str:
    """The one command that adds the training stack to the server's venv (found again from a
    terminal: see light_venv)."""
    if WINDOWS:
        return subprocess.list2cmdline([sys.executable, str(LAUNCHER), "--install"])
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(LAUNCHER))} --install"


# ------------------------------------------------------------------------- building the venv

def _lock(path: Path):
    """An exclusive lock held until the returned file is closed (no-op where fcntl is missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        import fcntl
        fcntl.flock(f, fcntl.LOCK_EX)
    except ImportError:  # pragma: no cover - Windows
        pass
    return f


def build_light_venv(venv: Path, reqs: list) -> int:
    """Make `venv` with only the light requirements; output goes to this process's stdout/stderr
    (a log file when started by the launcher). Safe to run twice at once: the second waits."""
    with _lock(venv.parent / ".install.lock"):
        if light_ready(venv, reqs):
            print("light venv already built", flush=True)
            return 0
        base = base_python()
        if base is None:
            print(f"no Python >= {MIN_PYTHON[0]}.{MIN_PYTHON[1]} found (this one is "
                  f"{sys.version.split()[0]}, and none of python3.10 ... python3.14 is on PATH). "
                  "Fix: install Python 3.10 or newer.", flush=True)
            return 2
        py = venv_python(venv)
        t0 = time.monotonic()
        if not py.exists() or subprocess.call([str(py), "-c", "pass"]) != 0:
            print(f"[1/2] creating a venv at {venv} with {base}", flush=True)
            rc = subprocess.call([base, "-m", "venv", "--clear", str(venv)])
            if rc != 0:
                print("could not create the venv. Fix: on Debian/Ubuntu install python3-venv "
                      "(apt install python3-venv), or set LLM_FT_PYTHON to a Python that has "
                      f"{', '.join(reqs)}.", flush=True)
                return rc
        print(f"[2/2] installing the server's dependencies: {' '.join(reqs)}", flush=True)
        rc = subprocess.call([str(py), "-m", "pip", "install", "--disable-pip-version-check",
                              "--progress-bar", "off", *reqs])
        if rc != 0:
            print("pip could not install them (no network? set PIP_INDEX_URL or PIP_FIND_LINKS "
                  "for a mirror).", flush=True)
            return rc
        tmp = venv / (MARKER + ".tmp")
        tmp.write_text(json.dumps({"requirements": sorted(reqs), "python": sys.version.split()[0],
                                   "built_s": round(time.monotonic() - t0, 1)}), encoding="utf-8")
        os.replace(tmp, venv / MARKER)
        print(f"light venv ready in {time.monotonic() - t0:.0f} s", flush=True)
        return 0


def start_builder(venv: Path):
    """The build in a process of its own (own session: a client that kills the launcher does
    not stop it), its output in a log file. Returns (process, log path)."""
    logs = venv.parent
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"install-{os.getpid()}.log"
    out = open(log_path, "wb")
    kw: dict = {"start_new_session": True} if not WINDOWS else {
        "creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)}
    proc = subprocess.Popen([sys.executable, str(LAUNCHER), "--build-light-venv", str(venv)],
                            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                            cwd=str(ROOT), **kw)
    out.close()
    return proc, log_path


def _follow(proc, log_path: Path) -> int:
    """Copy the builder's log to stderr as it grows (the progress) until it exits."""
    with open(log_path, "rb") as f:
        while True:
            done = proc.poll() is not None
            chunk = f.read()
            if chunk:
                for line in chunk.decode(errors="replace").splitlines():
                    log(f"first start: {line}")
            if done:
                return proc.returncode
            time.sleep(0.2)


# ------------------------------------------------------------------------------ the server

def server_command(python: Path, args: list) -> list:
    """`python -m server`, with this root ahead of the cwd on sys.path (a `server` or `tools`
    package in the user's project must not shadow ours)."""
    code = ("import runpy, sys; sys.path.insert(0, %r); "
            "runpy.run_module('server', run_name='__main__', alter_sys=True)" % str(ROOT))
    return [str(python), "-c", code, *args]


def server_env(python: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["LLM_FT_INSTALL_COMMAND"] = install_command()
    return env


def run_server(python: Path, args: list):
    if not has_training_stack(python):
        log("light install (no torch): hardware, planning and dataset tools work; masking, "
            "recipes, training, merging and evaluation need the training stack. Add it with: "
            f"{install_command()}")
    cmd, env = server_command(python, args), server_env(python)
    sys.stderr.flush()
    if WINDOWS:  # pragma: no cover - exec does not keep stdio on Windows
        sys.exit(subprocess.call(cmd, env=env))
    os.execve(str(python), cmd, env)


def _literal(path: Path, name: str):
    """A module-level string constant, read without importing the module."""
    try:
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if (isinstance(node, ast.Assign) and len(node.targets) == 1
                    and getattr(node.targets[0], "id", None) == name):
                return ast.literal_eval(node.value)
    except (OSError, SyntaxError, ValueError):
        pass
    return None


class Bootstrap:
    """MCP over stdio while the light venv is built, then a pipe to the real server."""

    def __init__(self, args: list, venv: Path, reqs: list):
        self.args, self.venv, self.reqs = args, venv, reqs
        self.out_lock = threading.Lock()   # one writer at a time on stdout
        self.state = threading.Lock()      # bootstrap answers vs. hand-over
        self.child = None
        self.init_params = None
        self.client_initialized = False
        self.failure = None

    def write(self, data: bytes) -> None:
        with self.out_lock:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()

    def send(self, obj: dict) -> None:
        self.write((json.dumps(obj) + "\n").encode())

    def reply(self, mid, result=None, error=None) -> None:
        msg = {"jsonrpc": "2.0", "id": mid}
        msg.update({"error": error} if error else {"result": result})
        self.send(msg)

    def initialize_result(self, params: dict) -> dict:
        asked = params.get("protocolVersion")
        version = asked if asked in PROTOCOL_VERSIONS else PROTOCOL_VERSIONS[0]
        params["protocolVersion"] = version
        text = _literal(ROOT / "server" / "app.py", "INSTRUCTIONS") or "Fine-tune open LLMs with TRL/PEFT."
        return {"protocolVersion": version,
                "capabilities": {"tools": {"listChanged": True}, "prompts": {"listChanged": True},
                                 "resources": {"listChanged": True, "subscribe": False}},
                "serverInfo": {"name": "llm-fine-tuning",
                               "version": _literal(ROOT / "tools" / "__init__.py", "__version__") or "0"},
                "instructions": text + "\n(First start: if no llm-fine-tuning tools are listed yet, "
                                       "the server is installing its dependencies; they appear when "
                                       "it is done.)"}

    def handle(self, line: bytes) -> None:
        try:
            msg = json.loads(line)
        except ValueError:
            if line.strip():
                self.reply(None, error={"code": -32700, "message": "Parse error"})
            return
        if not isinstance(msg, dict) or "method" not in msg:
            return  # a response or a batch: nothing to answer while bootstrapping
        method, mid, is_request = msg["method"], msg.get("id"), "id" in msg
        empty = {"tools/list": "tools", "resources/list": "resources", "prompts/list": "prompts",
                 "resources/templates/list": "resourceTemplates"}
        if method == "initialize" and is_request:
            self.init_params = dict(msg.get("params") or {})
            self.reply(mid, self.initialize_result(self.init_params))
        elif method == "notifications/initialized":
            self.client_initialized = True
        elif not is_request:
            return
        elif method == "ping":
            self.reply(mid, {})
        elif method in empty:
            self.reply(mid, {empty[method]: []})
        else:
            text = self.failure or ("llm-fine-tuning is installing its dependencies (first start); "
                                    "its tools appear in a moment. Try again then.")
            self.reply(mid, error={"code": -32603, "message": text})

    def hand_over(self, python: Path) -> None:
        """Start the real server, replay the client's initialize, then pipe both ways."""
        child = subprocess.Popen(server_command(python, self.args), stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, env=server_env(python), bufsize=0)
        if self.init_params is not None:
            child.stdin.write((json.dumps({"jsonrpc": "2.0", "id": BOOT_ID, "method": "initialize",
                                           "params": self.init_params}) + "\n").encode())
            child.stdin.flush()
            while True:
                line = child.stdout.readline()
                if not line:
                    raise RuntimeError(f"the server exited during start-up (code {child.wait()}); "
                                       "its stderr above says why")
                try:
                    if json.loads(line).get("id") == BOOT_ID:
                        break
                except (ValueError, AttributeError):
                    pass
                self.write(line)
            if self.client_initialized:
                child.stdin.write(b'{"jsonrpc": "2.0", "method": "notifications/initialized"}\n')
                child.stdin.flush()
        self.child = child
        threading.Thread(target=self.pump, args=(child,), daemon=True).start()
        if self.init_params is not None:
            for kind in ("tools", "resources", "prompts"):
                self.send({"jsonrpc": "2.0", "method": f"notifications/{kind}/list_changed"})

    def pump(self, child) -> None:
        for line in iter(child.stdout.readline, b""):
            self.write(line)
        # The server is gone: so is this session (the client sees the pipe close).
        rc = child.wait()
        sys.stdout.flush()
        os._exit(rc)

    def watch(self, proc, log_path: Path) -> None:
        rc = _follow(proc, log_path)
        if rc != 0 or not light_ready(self.venv, self.reqs):
            self.failure = (f"llm-fine-tuning could not install its dependencies (exit {rc}); the "
                            f"log is {log_path}. Fix what it says, then restart the server.")
            log(self.failure)
            return
        try:
            log_path.unlink()
        except OSError:
            pass
        with self.state:
            try:
                self.hand_over(venv_python(self.venv))
                log("dependencies installed; the server is running")
            except (OSError, RuntimeError) as exc:
                self.failure = f"llm-fine-tuning could not start its server: {exc}"
                log(self.failure)

    def run(self) -> int:
        log(f"first start: building a light venv (the server's own dependencies only) at {self.venv}; "
            "answering MCP meanwhile")
        proc, log_path = start_builder(self.venv)
        threading.Thread(target=self.watch, args=(proc, log_path), daemon=True).start()
        stdin = sys.stdin.buffer
        for line in iter(stdin.readline, b""):
            with self.state:
                if self.child is None:
                    self.handle(line)
                    continue
                try:
                    self.child.stdin.write(line)
                    self.child.stdin.flush()
                except OSError:
                    break
        with self.state:  # EOF: the client is done; an unfinished build goes on by itself
            child = self.child
            if child is None:
                return 0
            try:
                child.stdin.close()
            except OSError:
                pass
        return child.wait()


# ------------------------------------------------------------------------------ --install

def install_extras(argv: list) -> int:
    """pip install the named extras (pyproject's lists) into the server's venv, with pip's
    progress on the terminal."""
    pip_args: list = []
    if "--" in argv:
        cut = argv.index("--")
        argv, pip_args = argv[:cut], argv[cut + 1:]
    dry = "--dry-run" in argv
    names = [a for a in argv if a != "--dry-run"]
    light, extras = requirements()
    wanted = [n.strip() for n in (names[0] if names else DEFAULT_EXTRAS).split(",") if n.strip()]
    unknown = [n for n in wanted if n not in extras]
    if unknown:
        log(f"unknown extra {', '.join(unknown)}; pyproject.toml has: {', '.join(sorted(extras))}")
        return 2
    reqs = [r for n in wanted for r in extras[n]]
    if os.environ.get("TORCH_SPEC"):  # as in the Makefile, e.g. torch==2.13.0 for a CPU build
        reqs.append(os.environ["TORCH_SPEC"])
    python = server_python(light)
    if python is None:
        venv = light_venv()
        if not dry:
            rc = build_light_venv(venv, light)
            if rc != 0:
                return rc
        python = venv_python(venv)
    cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", *reqs, *pip_args]
    if dry:
        print(" ".join(shlex.quote(c) for c in cmd))
        return 0
    log(f"installing {', '.join(wanted)} ({len(reqs)} requirements; torch alone is ~1-3 GB) into "
        f"{python.parent.parent}")
    rc = subprocess.call(cmd)
    if rc == 0:
        log("done. Reconnect the server (Claude Code: /mcp, llm-fine-tuning, Reconnect) so every "
            "tool sees the new packages.")
    return rc


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--install"]:
        return install_extras(argv[1:])
    if argv[:1] == ["--build-light-venv"]:
        light, _ = requirements()
        return build_light_venv(Path(argv[1]) if len(argv) > 1 else light_venv(), light)
    light, _ = requirements()
    python = server_python(light)
    if argv[:1] == ["--where"]:
        print(python or f"{venv_python(light_venv())} (not built yet)")
        return 0
    venv = light_venv()
    if python is None or python == venv_python(venv):
        remember(venv)
    if python is None:
        return Bootstrap(argv, venv, light).run()
    if python == venv_python(venv):
        for old in venv.parent.glob("install-*.log"):  # a first start whose client left early
            try:
                old.unlink()
            except OSError:
                pass
    run_server(python, argv)  # does not return on POSIX
    return 0


if __name__ == "__main__":
    sys.exit(main())
