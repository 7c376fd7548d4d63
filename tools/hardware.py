"""What this machine can train with: GPUs, CPU, RAM, disk, and the training libraries installed.

Works without torch (reports so); never initialises more than torch's own CUDA query.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import shutil
from typing import Optional

from pydantic import BaseModel, Field

from .memory import GIB
from .results import ToolResult
from .workspace import get_workspace

PACKAGES = ["torch", "transformers", "trl", "peft", "datasets", "bitsandbytes", "accelerate",
            "deepspeed", "liger-kernel", "flash-attn", "lm-eval", "mcp"]


class GPUInfo(BaseModel):
    index: int
    name: str
    total_memory_gib: float
    free_memory_gib: Optional[float] = None
    compute_capability: str
    bf16_supported: bool


class HardwareReport(ToolResult):
    """The machine as the planner sees it."""
    cuda_available: bool
    torch_installed: bool
    gpu_count: int
    gpus: list[GPUInfo]
    bf16_supported: bool = Field(description="every GPU supports bf16 (compute capability >= 8.0).")
    cpu_cores: int
    ram_total_gib: Optional[float]
    ram_available_gib: Optional[float]
    disk_free_gib: float = Field(description="free space on the workspace's filesystem.")
    workspace: str
    packages: dict[str, Optional[str]] = Field(description="installed version, or null when absent.")
    warnings: list[str] = []


def _version(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def _ram() -> tuple[float | None, float | None]:
    try:
        import psutil
        vm = psutil.virtual_memory()
        return vm.total / GIB, vm.available / GIB
    except ImportError:
        pass
    try:
        info = {}
        with open("/proc/meminfo") as fh:
            for line in fh:
                k, v = line.split(":", 1)
                info[k] = int(v.split()[0]) * 1024
        return info["MemTotal"] / GIB, info.get("MemAvailable", info.get("MemFree", 0)) / GIB
    except (OSError, KeyError, ValueError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, None
    except (ValueError, OSError, AttributeError):
        return None, None


def _gpus() -> tuple[bool, bool, list[GPUInfo], list[str]]:
    """(torch_installed, cuda_available, gpus, warnings)."""
    try:
        import torch
    except ImportError:
        return False, False, [], ["torch is not installed: install the 'train' extra to train."]
    warnings: list[str] = []
    try:
        if not torch.cuda.is_available():
            return True, False, [], []
        gpus = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            free = None
            try:
                free = torch.cuda.mem_get_info(i)[0] / GIB
            except Exception:  # noqa: BLE001 - busy or restricted device: report total only
                pass
            gpus.append(GPUInfo(index=i, name=p.name, total_memory_gib=round(p.total_memory / GIB, 2),
                                free_memory_gib=None if free is None else round(free, 2),
                                compute_capability=f"{p.major}.{p.minor}", bf16_supported=p.major >= 8))
        return True, True, gpus, warnings
    except Exception as exc:  # noqa: BLE001 - a broken driver must not break planning
        return True, False, [], [f"CUDA query failed: {exc}"]


def detect_hardware() -> HardwareReport:
    """Detect this machine's GPUs (VRAM, bf16), CPU, RAM, free disk and training libraries. Call it
    first; recommend_method uses it when no hardware is described.

    GPUs: name, VRAM total and free, compute capability, bf16 support; CUDA availability; CPU
    cores; RAM total and available; free disk at the workspace; versions of torch, transformers,
    trl, peft, datasets, bitsandbytes, accelerate, deepspeed, liger-kernel, flash-attn, lm-eval
    and mcp (null = not installed)."""
    torch_ok, cuda, gpus, warnings = _gpus()
    ram_total, ram_avail = _ram()
    ws = get_workspace()
    packages = {p: _version(p) for p in PACKAGES}
    bf16 = bool(gpus) and all(g.bf16_supported for g in gpus)
    if torch_ok and not cuda:
        warnings.append("No CUDA GPU: only tiny models train in reasonable time (CPU, fp32).")
    if gpus and not bf16:
        warnings.append("A GPU lacks bf16 (compute capability < 8.0): train in fp16.")
    if gpus and packages["flash-attn"] is None:
        warnings.append("flash-attn is not installed: attention uses PyTorch SDPA.")
    if gpus and packages["liger-kernel"] is None:
        warnings.append("liger-kernel is not installed: install the 'gpu' extra for fused kernels.")
    report = HardwareReport(
        cuda_available=cuda, torch_installed=torch_ok, gpu_count=len(gpus), gpus=gpus,
        bf16_supported=bf16, cpu_cores=os.cpu_count() or 1,
        ram_total_gib=None if ram_total is None else round(ram_total, 2),
        ram_available_gib=None if ram_avail is None else round(ram_avail, 2),
        disk_free_gib=round(shutil.disk_usage(ws.root).free / GIB, 2), workspace=str(ws.root),
        packages=packages, warnings=warnings)
    report.summary = _summary(report)
    model = "<hub id, catalog name or model dir>"
    report.next_steps = [f"recommend_method(model='{model}')"] if gpus else [
        f"recommend_method(model='{model}', gpu='<the GPU you will train on>')",
        "recommend_method(model='<a tiny model dir>')"]
    return report


def _summary(r: HardwareReport) -> str:
    ram = f", {r.ram_available_gib:.0f} GiB RAM free" if r.ram_available_gib is not None else ""
    host = f"{r.cpu_cores} CPU cores{ram}, {r.disk_free_gib:.0f} GiB free disk"
    if not r.gpus:
        why = "Torch is not installed" if not r.torch_installed else "No CUDA GPU"
        return f"{why}: CPU only ({host}); only tiny models train in reasonable time."
    names = sorted({g.name for g in r.gpus})
    gpus = f"{r.gpu_count}x {' / '.join(names)} ({r.gpus[0].total_memory_gib:.0f} GiB each" + \
        (", bf16)" if r.bf16_supported else ", no bf16: fp16)")
    missing = [p for p in ("flash-attn", "liger-kernel") if r.packages.get(p) is None]
    return f"{gpus}; {host}" + (f"; not installed: {', '.join(missing)}." if missing else ".")
