"""`python -m server` as a subprocess: a real stdio MCP client, and a raw check that stdout
carries nothing but JSON-RPC."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EXPECTED_TOOLS, REPO



def _env(ws: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


def _params(ws: Path):
    from mcp import StdioServerParameters
    return StdioServerParameters(command=sys.executable, args=["-m", "server", "--workspace", str(ws)],
                                 cwd=str(REPO), env=_env(ws))


def test_stdio_client_lists_and_calls_every_tool(tmp_path, fixtures_dir):
    from mcp import Client
    ws = tmp_path / "ws"
    (ws / "data").mkdir(parents=True)
    shutil.copy(fixtures_dir / "datasets" / "gsm8k" / "test_first200.jsonl", ws / "data" / "gsm8k.jsonl")

    async def main():
        async with Client(_params(ws)) as c:
            tools = {t.name: t for t in (await c.list_tools()).tools}
            assert set(EXPECTED_TOOLS) == set(tools), set(EXPECTED_TOOLS) ^ set(tools)
            for t in tools.values():
                assert t.description and len(t.description) > 40, t.name
                assert t.input_schema["type"] == "object"
                assert t.output_schema is not None, f"{t.name} has no structured output"
                assert t.annotations is not None and t.annotations.read_only_hint is not None, t.name
            # Every tool answers: those with required arguments get none and must fail cleanly
            # (argument validation), the rest run for real. The server keeps answering throughout.
            for name, t in sorted(tools.items()):
                required = t.input_schema.get("required", [])
                r = await c.call_tool(name, {})
                if required:
                    assert r.is_error, f"{name} accepted a call without its required {required}"
                elif r.is_error:  # all-optional tools may still need one of several inputs
                    assert "failed unexpectedly" not in r.content[0].text, (name, r.content)
                else:
                    assert r.structured_content is not None, name
            # Real calls with arguments, and a workspace-policy error that names the field.
            r = await c.call_tool("inspect_dataset", {"dataset": "data/gsm8k.jsonl"})
            assert not r.is_error, r.content
            r = await c.call_tool("inspect_dataset", {"dataset": "/etc/passwd"})
            assert r.is_error and "outside the workspace" in r.content[0].text
            r = await c.call_tool("estimate_memory", {"model": "Llama-3.1-8B", "method": "qlora",
                                                      "gpu_memory_gib": 24})
            assert not r.is_error, r.content
            assert r.structured_content["total_gib"] > 5
            assert (await c.list_tools()).tools
    asyncio.run(main())


def test_stdout_carries_only_protocol(tmp_path):
    """Raw JSON-RPC over pipes: every byte on stdout must be a JSON-RPC message, including
    while a tool that imports torch and friends runs."""
    ws = tmp_path / "ws"
    ws.mkdir()
    msgs = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize",
         "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                    "clientInfo": {"name": "raw-test", "version": "0"}}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
        {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
         "params": {"name": "detect_hardware", "arguments": {}}},
        {"jsonrpc": "2.0", "id": 4, "method": "tools/call",
         "params": {"name": "estimate_memory", "arguments": {"model": "no-such-model-xyz"}}},
        {"jsonrpc": "2.0", "id": 5, "method": "resources/list"},
        {"jsonrpc": "2.0", "id": 6, "method": "resources/read",
         "params": {"uri": "chat-templates://trl"}},
    ]
    proc = subprocess.Popen([sys.executable, "-m", "server", "--workspace", str(ws)], cwd=REPO,
                            env=_env(ws), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    replies: dict[int, dict] = {}
    lines: list[bytes] = []
    try:
        for m in msgs:
            proc.stdin.write((json.dumps(m) + "\n").encode())
            proc.stdin.flush()
            if "id" in m:
                while m["id"] not in replies:
                    line = proc.stdout.readline()
                    assert line, f"server closed stdout; stderr: {proc.stderr.read()[-2000:]!r}"
                    lines.append(line)
                    obj = json.loads(line)
                    if "id" in obj:
                        replies[obj["id"]] = obj
        # communicate() closes stdin (EOF ends the server) and drains what is left on stdout.
        rest, _ = proc.communicate(timeout=60)
        lines += rest.splitlines(keepends=True)
    finally:
        if proc.poll() is None:
            proc.kill()
    for line in lines:
        if line.strip():
            assert json.loads(line)["jsonrpc"] == "2.0", line[:200]
    assert {t["name"] for t in replies[2]["result"]["tools"]} == set(EXPECTED_TOOLS)
    assert replies[3]["result"].get("isError") is not True
    assert replies[4]["result"]["isError"] is True
    assert "model" in replies[4]["result"]["content"][0]["text"]
    uris = {r["uri"] for r in replies[5]["result"]["resources"]}
    assert any(u.startswith("references://") for u in uris)
    assert "skill://SKILL.md" in uris
    listing = replies[6]["result"]["contents"][0]["text"]  # TRL's shipped templates, by name
    assert "`qwen3.jinja` (training variant: `qwen3_training.jinja`)" in listing


def test_server_import_does_not_import_torch():
    code = ("import sys, server.app; server.app.create_server(); "
            "heavy = [m for m in ('torch', 'transformers', 'trl', 'datasets', 'peft', 'lm_eval') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"heavy modules imported at server start: {out.stdout}"
