"""A third-party MCP client: the MCP Inspector CLI (npm) drives `python -m server` over stdio."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO  # noqa: E402 - one definition of the repo root
INSPECTOR = "@modelcontextprotocol/inspector@0.15.0"
NPX = shutil.which("npx")
pytestmark = pytest.mark.skipif(NPX is None, reason="npx (Node.js) is not installed: the MCP "
                                "Inspector CLI cannot run here")


def _inspector(ws: Path, *args: str) -> dict:
    cmd = [NPX, "-y", INSPECTOR, "--cli", sys.executable, "-m", "server", "--workspace", str(ws),
           *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0 and any(s in proc.stderr for s in ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED")):
        pytest.skip(f"npm registry unreachable, {INSPECTOR} cannot be fetched: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def test_inspector_lists_tools_and_calls_them(tmp_path):
    listed = _inspector(tmp_path, "--method", "tools/list")
    names = {t["name"] for t in listed["tools"]}
    assert {"detect_hardware", "estimate_memory", "inspect_dataset", "launch_training"} <= names
    assert all(t.get("outputSchema") for t in listed["tools"]), "every tool returns structured output"

    hw = _inspector(tmp_path, "--method", "tools/call", "--tool-name", "detect_hardware")
    assert hw.get("isError") is not True
    assert hw["structuredContent"]["cpu_cores"] >= 1

    mem = _inspector(tmp_path, "--method", "tools/call", "--tool-name", "estimate_memory",
                     "--tool-arg", "model=Llama-3.1-8B", "--tool-arg", "method=qlora",
                     "--tool-arg", "gpu=RTX 4090")
    assert mem["structuredContent"]["total_params"] == 8_030_261_248
    assert mem["structuredContent"]["fits"] is True

    bad = _inspector(tmp_path, "--method", "tools/call", "--tool-name", "estimate_memory",
                     "--tool-arg", "model=no-such-model-xyz")
    assert bad["isError"] is True
    assert "Fix:" in bad["content"][0]["text"]
