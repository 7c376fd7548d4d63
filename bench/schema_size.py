"""What every MCP client pays in context for tools/list: total, input schemas, output schemas and
descriptions, in bytes of JSON, per tool and in all (issue 10's target: input + descriptions
<= 20 KB, the whole list <= 45 KB).

Run: .venv/bin/python bench/schema_size.py
"""
from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


async def main() -> None:
    from mcp import Client

    from server.app import create_server
    async with Client(create_server()) as c:
        tools = [t.model_dump(mode="json", by_alias=True, exclude_none=True)
                 for t in (await c.list_tools()).tools]
    # compact JSON, as the SDK writes each message on the wire
    size = lambda o: len(json.dumps(o, ensure_ascii=False, separators=(",", ":")))  # noqa: E731
    print("| tool | input | output | description |\n|---|---:|---:|---:|")
    for t in sorted(tools, key=lambda t: -size(t)):
        print(f"| {t['name']} | {size(t.get('inputSchema', {}))} | {size(t.get('outputSchema', {}))} | "
              f"{len(t.get('description', ''))} |")
    ins = sum(size(t.get("inputSchema", {})) for t in tools)
    outs = sum(size(t.get("outputSchema", {})) for t in tools)
    desc = sum(len(t.get("description", "")) for t in tools)
    print(f"\ntools: {len(tools)}; tools/list {size({'tools': tools})} bytes; input schemas {ins}, "
          f"output schemas {outs}, descriptions {desc}")


if __name__ == "__main__":
    asyncio.run(main())
