"""Tool latency through a real stdio MCP client: process start -> tools/list, then p50/p95 of
tools/list and light tool calls on a warm server.

Run: .venv/bin/python bench/tool_latency.py [--n 30]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def main(n: int, starts: int) -> None:
    from mcp import Client, StdioServerParameters
    ws = tempfile.mkdtemp(prefix="bench_ws_")
    params = StdioServerParameters(command=sys.executable, args=["-m", "server", "--workspace", ws],
                                   cwd=str(REPO), env={**os.environ, "HF_HUB_OFFLINE": "1"})
    cold = []
    for _ in range(starts):
        t = time.perf_counter()
        async with Client(params) as c:
            await c.list_tools()
            cold.append(time.perf_counter() - t)
    print(f"start -> tools/list (cold process, {starts} starts): "
          f"p50 {statistics.median(cold)*1000:.0f} ms, max {max(cold)*1000:.0f} ms")
    calls = {
        "tools/list": None,
        "estimate_memory(Llama-3.1-8B qlora)": ("estimate_memory", {"model": "Llama-3.1-8B", "method": "qlora",
                                                                     "gpu_memory_gib": 24}),
        "get_model_facts(Qwen2.5-7B)": ("get_model_facts", {"model": "Qwen2.5-7B"}),
        "recommend_method(8B, 1x24GB)": ("recommend_method", {"model": "Llama-3.1-8B", "gpu": "RTX 4090"}),
        "list_runs": ("list_runs", {}),
    }
    async with Client(params) as c:
        await c.list_tools()
        for label, call in calls.items():
            xs = []
            for _ in range(n):
                t = time.perf_counter()
                if call is None:
                    await c.list_tools()
                else:
                    r = await c.call_tool(*call)
                    if r.is_error:
                        raise SystemExit(f"{label} failed: {r.content[0].text}")
                xs.append(time.perf_counter() - t)
            print(f"{label:40s} p50 {pct(xs, 50)*1000:7.1f} ms   p95 {pct(xs, 95)*1000:7.1f} ms   (n={n})")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--starts", type=int, default=5)
    a = ap.parse_args()
    asyncio.run(main(a.n, a.starts))
