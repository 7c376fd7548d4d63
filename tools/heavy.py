"""First imports of the heavy libraries, one thread at a time.

The MCP SDK runs sync tools in worker threads. transformers and trl resolve most names lazily
(`_LazyModule.__getattr__` imports a submodule on first use); two threads doing that first
import at once can see a half-initialised module and fail with "cannot import name
'AutoTokenizer'" or "'DatasetMixtureConfig'". `warm()` does those first imports under one lock,
before a tool that needs them runs; after that, calls run in parallel.
"""
from __future__ import annotations

import importlib
import threading

# library -> the names the tools take from it (resolving them loads the submodules they need).
GROUPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "transformers": ("transformers", ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM",
                                      "PreTrainedTokenizerBase", "TrainingArguments", "Trainer")),
    "datasets": ("datasets", ("Dataset", "load_dataset", "load_from_disk")),
    "peft": ("peft", ("LoraConfig", "PeftModel", "get_peft_model")),
    "trl": ("trl", ("SFTConfig", "SFTTrainer", "ModelConfig", "ScriptArguments", "TrlParser",
                    "DatasetMixtureConfig", "DPOConfig", "DPOTrainer")),
}
# What each kind of tool needs, in import order (trl imports transformers, datasets, peft).
TRAINING_STACK = ("transformers", "datasets", "peft", "trl")

LOCK = threading.RLock()
_done: set[str] = set()


def warm(*groups: str) -> None:
    """Import each group's library and resolve its names once, serialised across threads. A
    library that is not installed is skipped: the tool itself then says what to install."""
    if all(g in _done for g in groups):
        return
    with LOCK:
        for g in groups:
            if g in _done:
                continue
            module, names = GROUPS[g]
            try:
                mod = importlib.import_module(module)
                for n in names:
                    getattr(mod, n, None)
            except Exception:  # noqa: BLE001 - the tool reports a missing/broken library itself
                pass
            _done.add(g)
