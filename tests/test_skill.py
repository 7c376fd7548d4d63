"""The agent skill: valid Agent Skills format, and in step with the server's tools."""
from __future__ import annotations

import asyncio
import json
import re

from conftest import REPO  # noqa: E402 - one definition of the repo root


def test_skill_validates_with_skills_ref():
    from skills_ref.validator import validate
    problems = validate(REPO / "skills" / "llm-fine-tuning")
    assert problems == [], problems


def test_skill_documents_every_tool_and_reference():
    from mcp import Client
    from server.app import create_server
    text = (REPO / "SKILL.md").read_text()

    async def names():
        async with Client(create_server()) as c:
            return {t.name for t in (await c.list_tools()).tools}
    for name in asyncio.run(names()):
        assert f"`{name}`" in text, f"SKILL.md does not mention the tool {name}"
    for ref in re.findall(r"references/([a-z_]+\.md)", text):
        assert (REPO / "references" / ref).exists(), ref
    assert len(text.splitlines()) < 500


def test_plugin_files():
    plugin = json.loads((REPO / ".claude-plugin" / "plugin.json").read_text())
    assert plugin["name"] == "llm-fine-tuning"
    # The checkout's project config and the plugin's own entry start the same launcher.
    mcp = json.loads((REPO / ".mcp.json").read_text())
    assert mcp["mcpServers"]["llm-fine-tuning"]["args"] == ["server/launcher.py"]
    assert plugin["mcpServers"]["llm-fine-tuning"]["args"] == ["${CLAUDE_PLUGIN_ROOT}/server/launcher.py"]
    assert (REPO / "server" / "launcher.py").is_file()
    assert not (REPO / "skills" / "llm-fine-tuning" / "SKILL.md").is_symlink()  # validate reads no links
    assert (REPO / "skills" / "llm-fine-tuning" / "SKILL.md").resolve() == (REPO / "SKILL.md").resolve()
