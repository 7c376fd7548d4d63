"""Shared fixtures: a per-test workspace, the tiny Llama model, the real fixture files."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Tests run on 2 cores; keep torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")
os.environ.setdefault("WANDB_DISABLED", "true")
# Every tool call through the server must keep the result contract (summary, next_steps).
os.environ.setdefault("LLM_FT_STRICT_RESULTS", "1")

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# Every MCP tool the server registers, in workflow order: the one list tests check against.
EXPECTED_TOOLS = (
    "detect_hardware", "get_model_facts", "estimate_memory", "recommend_method",
    "inspect_dataset", "convert_dataset", "verify_masking",
    "generate_recipe", "validate_recipe", "spectrum_scan",
    "launch_training", "training_status", "stop_training", "list_runs",
    "merge_adapter", "evaluate", "generate",
    "convert_preference", "verify_preference", "generate_dpo_recipe",
    "export_model", "push_to_hub",
)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """tests/fixtures: real tokenizers, chat templates and datasets (see their PROVENANCE)."""
    return FIXTURES


@pytest.fixture(scope="session")
def tiny_model_cache(tmp_path_factory) -> Path:
    """One tiny Llama (byte-level tokenizer, ChatML template) built per test session."""
    from tools.tiny import build_tiny_model
    return build_tiny_model(tmp_path_factory.mktemp("tiny_cache") / "tiny-llama")


@pytest.fixture
def ws(tmp_path, monkeypatch):
    """A fresh workspace for one test, set as the process-wide workspace."""
    from tools import workspace as wsmod
    root = tmp_path / "ws"
    root.mkdir()
    monkeypatch.setattr(wsmod, "_current", None)
    monkeypatch.setenv("LLM_FT_WORKSPACE", str(root))
    w = wsmod.set_workspace(root)
    yield w
    wsmod._current = None


@pytest.fixture
def tiny_model(ws, tiny_model_cache) -> Path:
    """The tiny model copied into the test's workspace (tools refuse paths outside it)."""
    dst = ws.root / "models" / "tiny-llama"
    shutil.copytree(tiny_model_cache, dst)
    return dst


def wait_for_run(run_id: str, timeout_s: float = 300):
    """Poll training_status until the run ends; kill whatever is still running afterwards, so no
    background process outlives a test."""
    import signal
    import time

    from tools.run_registry import active_runs, signal_run
    from tools.runs import training_status
    t0 = time.time()
    try:
        while (s := training_status(run_id, log_lines=30, plot=False)).state in ("queued", "running"):
            assert time.time() - t0 < timeout_s, s.log_tail
            time.sleep(1)
    finally:
        for st in active_runs():
            signal_run(st, signal.SIGKILL)
    return s
