"""Property-based fuzzing of every tool through the in-memory MCP client.

Hypothesis draws arguments for each tool from its advertised input schema, mixed with hostile
values: paths out of the workspace (.., absolute, symlinks to a sentinel tree beside it, a FIFO,
a directory where a file goes), NUL bytes, over-long names, `~user`, CR/LF, deep nesting, huge
strings, wrong types, metadata URLs. For every call:
- the answer is a result or an error that names a field (or says plainly what is refused),
  never "failed unexpectedly", and it comes within a time limit (no hang);
- an error does not echo a huge argument back;
- the server still answers afterwards;
- the sentinel tree outside the workspace is unchanged (nothing read into it, nothing written).

Profile: LLM_FT_FUZZ_EXAMPLES per tool (default 25, under a minute); set it higher (e.g. 200) for
the long run. LLM_FT_FUZZ_REPORT=<file> writes the counts (recorded in docs/benchmarks.md).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import Counter
from pathlib import Path

import anyio
import pytest

from conftest import EXPECTED_TOOLS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("LLM_FT_FUZZ_EXAMPLES", "25"))
CALL_TIMEOUT_S = 120
STATS: Counter = Counter()

# An error must start with what it is about: a field, a location, or the tool's own refusal.
FIELD_PREFIX = re.compile(r"^(Error executing tool \w+: )?([\w\[\]. -]{1,80}): ")


def _brief(args: dict) -> dict:
    """The arguments with long values shortened, for readable failure messages."""
    return {k: (v[:60] + f"...({len(v)})" if isinstance(v, str) and len(v) > 60 else
                "<nested>" if isinstance(v, (list, dict)) and len(repr(v)) > 200 else v)
            for k, v in args.items()}


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file() and not p.is_symlink():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """A workspace with links and a FIFO leading to a sentinel tree beside it."""
    base = tmp_path_factory.mktemp("fuzz")
    sentinel, ws = base / "sentinel", base / "ws"
    (sentinel / "sub").mkdir(parents=True)
    (sentinel / "secret.jsonl").write_text('{"question": "SENTINEL", "answer": "#### 1"}\n')
    (sentinel / "sub" / "train.jsonl").write_text('{"text": "SENTINEL"}\n')
    (sentinel / "recipe.yaml").write_text("model_name_or_path: x\noutput_dir: /tmp/x\n")
    (ws / "data").mkdir(parents=True)
    rows = [{"question": f"What is {a}+{b}?", "answer": f"#### {a + b}"} for a in range(4) for b in range(4)]
    (ws / "data" / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.symlink(sentinel / "secret.jsonl", ws / "link_file.jsonl")
    os.symlink(sentinel, ws / "link_dir")
    (ws / "ds").mkdir()
    os.symlink(sentinel / "secret.jsonl", ws / "ds" / "train.jsonl")
    os.mkfifo(ws / "fifo.jsonl")
    (ws / "adir").mkdir()
    (ws / "recipes").mkdir()
    (ws / "recipes" / "bad.yaml").write_text("output_dir: ../sentinel/out\ndatasets:\n  - path: /etc\n")
    return ws, sentinel


PATHS = ["../sentinel/secret.jsonl", "/etc/passwd", "link_file.jsonl", "link_dir/secret.jsonl", "link_dir",
         "link_dir/sub", "ds", "fifo.jsonl", "adir", "~root/x", "~", "a\x00b", "x" * 300, "a/" * 2100,
         "data\r\n.jsonl", "data/qa.jsonl", "data", "recipes/bad.yaml", "../sentinel", "link_dir/out",
         "/proc/self/environ", "/dev/zero", "org/name", "", " ", "runs/../../sentinel",
         "Llama-3.1-8B", "Qwen/Qwen2.5-0.5B-Instruct", "data/qa.jsonl", "data"]
URLS = ["http://169.254.169.254/latest/meta-data/", "http://[fe80::1]/v1", "http://10.0.0.1:8000/v1",
        "file:///etc/passwd", "http://localhost:1/v1\r\nX: y", "gopher://127.0.0.1:1/", "http://user:p@127.0.0.1/"]
ODD = ["z" * 200_000, "\u202e\ufeff\u0000", "{{ 7*7 }}", "{% for i in range(99999) %}{% endfor %}",
       "a:\n" + "[" * 5000 + "]" * 5000, "!!python/object/apply:os.system ['true']", "-1", "NaN", "inf"]


def _deep(n: int):
    v: object = 1
    for _ in range(n):
        v = [v]
    return v


def nasty_value() -> st.SearchStrategy:
    return st.one_of(
        st.sampled_from(PATHS + URLS + ODD), st.text(max_size=40), st.integers(-2**70, 2**70),
        st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.none(),
        st.just(_deep(100)), st.dictionaries(st.text(max_size=8), st.sampled_from(PATHS), max_size=3),
        st.lists(st.sampled_from(PATHS + URLS), max_size=3))


def _types(schema: dict) -> set:
    subs = schema.get("anyOf", []) + [schema]
    return {x.get("type") for x in subs if isinstance(x, dict)} - {None, "null"}


def _bounds(schema: dict) -> dict:
    out = {}
    for x in schema.get("anyOf", []) + [schema]:
        for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if k in x:
                out[k] = x[k]
    return out


def typed_value(schema: dict) -> st.SearchStrategy:
    """A value of the advertised type (so it passes the schema and reaches the tool), chosen to
    hurt: hostile paths and URLs in strings, edge numbers inside the allowed range."""
    subs = schema.get("anyOf", []) + [schema]
    enums = [v for x in subs if isinstance(x, dict) for v in x.get("enum", [])]
    if enums:
        return st.sampled_from(enums)
    types, b = _types(schema), _bounds(schema)
    lo = b.get("minimum", b.get("exclusiveMinimum", -10))
    hi = b.get("maximum", b.get("exclusiveMaximum", 10**9))
    pools = []
    if "string" in types:
        pools.append(st.sampled_from(PATHS + URLS + ODD))
    if "integer" in types:
        lo_i, hi_i = int(lo) + ("exclusiveMinimum" in b), int(hi) - ("exclusiveMaximum" in b)
        pools.append(st.sampled_from(sorted({lo_i, hi_i, min(hi_i, lo_i + 1)})))
    if "number" in types:
        pools.append(st.sampled_from([float(lo) + 1e-9, float(min(hi, 1e300)), 1.0 if lo < 1 < hi else float(lo) + 1]))
    if "boolean" in types:
        pools.append(st.booleans())
    if "array" in types:
        pools.append(st.lists(st.sampled_from(PATHS + ODD[:3]), max_size=3))
    if "object" in types:
        pools.append(st.dictionaries(st.sampled_from(["output_dir", "prompt", "a" * 50, "trust_remote_code",
                                                      "datasets", "chat_template_path"]),
                                     st.sampled_from(PATHS + [True, 1e308, _deep(100)]), max_size=3))
    return st.one_of(*pools) if pools else nasty_value()


def args_for(schema: dict) -> st.SearchStrategy:
    """Arguments of the right types (most examples) or anything at all (one in four)."""
    props = schema.get("properties", {})
    required = set(schema.get("required", []))

    def build(wild: bool):
        val = (lambda p: nasty_value()) if wild else typed_value
        parts = {k: val(props[k]) for k in props}
        return st.fixed_dictionaries({k: v for k, v in parts.items() if k in required},
                                     optional={k: v for k, v in parts.items() if k not in required})
    return st.one_of(build(False), build(False), build(False), build(True))


@pytest.fixture(scope="module")
def client(layout):
    from mcp import Client

    from server.app import create_server
    from tools import workspace as wsmod
    ws, _ = layout
    prev = wsmod._current
    wsmod.set_workspace(ws)
    os.environ["LLM_FT_ALLOWED_ENDPOINTS"] = ""
    with anyio.from_thread.start_blocking_portal() as portal:
        c = portal.wrap_async_context_manager(Client(create_server()))
        session = c.__enter__()
        tools = {t.name: t for t in portal.call(session.list_tools).tools}
        yield portal, session, tools
        c.__exit__(None, None, None)
    wsmod._current = prev
    report = os.environ.get("LLM_FT_FUZZ_REPORT")
    if report:
        Path(report).write_text(json.dumps(dict(STATS), indent=1) + "\n")


TOOL_NAMES = list(EXPECTED_TOOLS)  # every tool: each reads or writes paths


@pytest.mark.parametrize("name", TOOL_NAMES)
def test_fuzz_tool(client, layout, name):
    portal, session, tools = client
    ws, sentinel = layout
    assert name in tools
    before = _digest(sentinel)

    async def call(args):
        with anyio.fail_after(CALL_TIMEOUT_S):
            return await session.call_tool(name, args)

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(args=args_for(tools[name].input_schema))
    def run(args):
        STATS["inputs"] += 1
        t0 = time.time()
        r = portal.call(call, args)
        STATS[f"{name}:{'error' if r.is_error else 'ok'}"] += 1
        text = r.content[0].text if r.content else ""
        if r.is_error:
            STATS["errors"] += 1
            if os.environ.get("LLM_FT_FUZZ_REPORT"):
                kind = "schema" if "validation error" in text else (FIELD_PREFIX.match(text) or [None, None, "?"])[2]
                STATS[f"{name}:field:{kind}"] += 1
            assert "failed unexpectedly" not in text, (_brief(args), text[:500])
            assert "Traceback" not in text, text[:500]
            # no huge echo: the SDK lists each invalid field (pydantic cuts long inputs), our errors
            # are capped; a 200,000-character argument never comes back
            assert len(text) < 12_000 and "z" * 300 not in text, (len(text), text[:200])
            assert FIELD_PREFIX.match(text) or "validation error" in text, (_brief(args), text[:300])
        assert "SENTINEL" not in text, (_brief(args), text[:300])  # nothing read from outside
        assert _digest(sentinel) == before, _brief(args)  # nothing written outside
        STATS["seconds"] += round(time.time() - t0, 3)

    run()
    alive = portal.call(session.call_tool, "list_runs", {})
    assert not alive.is_error
