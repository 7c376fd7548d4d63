"""What every client pays for tools/list (issue 10, item 9), and the result contract every tool
follows (item 8): checked over a real MCP client on the in-memory server."""
from __future__ import annotations

import asyncio
import copy
import json

import pytest

# The targets: input schemas + descriptions <= 20 KB, the whole tools/list <= 45 KB.
INPUT_AND_DESCRIPTIONS_MAX = 20_000
TOOLS_LIST_MAX = 45_000
# Per tool, the words (tool description + parameter descriptions) may take this many characters.
TEXT_PER_TOOL = 200
TEXT_PER_PARAMETER = 16
DESCRIPTION_MAX = 300


def _size(obj) -> int:
    return len(json.dumps(obj, ensure_ascii=False, separators=(",", ":")))


def _without_descriptions(schema):
    schema = copy.deepcopy(schema)

    def strip(s):
        if isinstance(s, dict):
            if isinstance(s.get("description"), str):
                del s["description"]
            for key, value in s.items():
                for sub in (value.values() if key == "properties" else [value]):
                    strip(sub)
        elif isinstance(s, list):
            for item in s:
                strip(item)
    strip(schema)
    return schema


@pytest.fixture(scope="module")
def listed() -> list[dict]:
    from mcp import Client

    from server.app import create_server

    async def go():
        async with Client(create_server()) as c:
            return [t.model_dump(mode="json", by_alias=True, exclude_none=True)
                    for t in (await c.list_tools()).tools]
    return asyncio.run(go())


def test_every_result_starts_with_summary_and_ends_with_next_steps(listed):
    for tool in listed:
        props = list(tool["outputSchema"]["properties"])
        assert props[0] == "summary" and props[-1] == "next_steps", (tool["name"], props)


def test_tool_text_within_its_budget(listed):
    over = []
    for tool in listed:
        n = len(tool["inputSchema"].get("properties", {}))
        words = _size(tool["inputSchema"]) - _size(_without_descriptions(tool["inputSchema"]))
        text = words + len(tool["description"])
        if text > TEXT_PER_TOOL + TEXT_PER_PARAMETER * n or len(tool["description"]) > DESCRIPTION_MAX:
            over.append(f"{tool['name']}: {text} chars of text for {n} parameters "
                        f"(budget {TEXT_PER_TOOL + TEXT_PER_PARAMETER * n}), description "
                        f"{len(tool['description'])}")
    assert not over, "\n".join(over)


def test_tools_list_size(listed):
    inputs = sum(_size(t["inputSchema"]) + len(t["description"]) for t in listed)
    assert inputs <= INPUT_AND_DESCRIPTIONS_MAX, inputs
    assert _size({"tools": listed}) <= TOOLS_LIST_MAX, _size({"tools": listed})


def test_help_resource_keeps_the_details(listed):
    """The long documentation moved out of tools/list is served per tool."""
    from mcp import Client

    from server.app import create_server

    async def go():
        async with Client(create_server()) as c:
            uris = {str(r.uri) for r in (await c.list_resources()).resources}
            page = await c.read_resource("tool-help://evaluate")
            return uris, page.contents[0].text
    uris, page = asyncio.run(go())
    assert {f"tool-help://{t['name']}" for t in listed} <= uris
    assert "## Parameters" in page and "`local_task`" in page and "## Result" in page
