"""detect_hardware on this machine, without torch, and through MCP."""
from __future__ import annotations

import asyncio
import builtins
import sys

from tools import hardware
from tools.hardware import detect_hardware


def test_this_machine(ws):
    hw = detect_hardware()
    assert hw.cpu_cores >= 1 and hw.disk_free_gib > 0 and hw.workspace == str(ws.root)
    assert hw.ram_total_gib and hw.ram_total_gib > 0.1
    assert hw.packages["trl"] and hw.packages["mcp"] and hw.packages["torch"]
    assert "flash-attn" in hw.packages and "liger-kernel" in hw.packages
    assert hw.torch_installed is True
    assert hw.gpu_count == len(hw.gpus)
    if not hw.cuda_available:
        assert hw.gpus == [] and hw.bf16_supported is False
        assert any("No CUDA GPU" in w for w in hw.warnings)


def test_without_torch(ws, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    hw = detect_hardware()
    assert hw.torch_installed is False and hw.cuda_available is False and hw.gpus == []
    assert any("torch is not installed" in w for w in hw.warnings)


def test_ram_without_psutil(ws, monkeypatch):
    real_import = builtins.__import__

    def no_psutil(name, *a, **k):
        if name == "psutil":
            raise ImportError("no psutil")
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_psutil)
    total, avail = hardware._ram()
    with open("/proc/meminfo") as fh:
        kb = int(fh.readline().split()[1])
    assert abs(total - kb / 2**20) < 0.01 and avail is not None


def test_mcp_detect_hardware(ws):
    from mcp import Client
    from server.app import create_server

    async def go():
        async with Client(create_server()) as c:
            tools = {t.name: t for t in (await c.list_tools()).tools}
            assert tools["detect_hardware"].annotations.read_only_hint is True
            assert tools["detect_hardware"].annotations.open_world_hint is False
            for name in ("get_model_facts", "estimate_memory", "recommend_method"):
                assert tools[name].annotations.read_only_hint and tools[name].annotations.open_world_hint
            r = await c.call_tool("detect_hardware", {})
            assert not r.is_error and r.structured_content["cpu_cores"] >= 1
            assert "transformers" in r.structured_content["packages"]
            got = r.structured_content
            assert f"{got['cpu_cores']} CPU cores" in got["summary"] and got["summary"] in r.content[0].text
            assert got["next_steps"] and all(s.startswith("recommend_method(model=") for s in got["next_steps"])
    asyncio.run(go())


def test_summary_names_the_gpus_and_what_is_missing(ws, monkeypatch):
    gpus = [hardware.GPUInfo(index=i, name="Tesla T4", total_memory_gib=14.58, compute_capability="7.5",
                             bf16_supported=False) for i in range(2)]
    monkeypatch.setattr(hardware, "_gpus", lambda: (True, True, gpus, []))
    monkeypatch.setattr(hardware, "_version", lambda p: None if p in ("flash-attn", "liger-kernel") else "1.0")
    r = hardware.detect_hardware()
    assert r.summary.startswith("2x Tesla T4 (15 GiB each, no bf16: fp16)")
    assert "not installed: flash-attn, liger-kernel" in r.summary
    assert r.next_steps == ["recommend_method(model='<hub id, catalog name or model dir>')"]
