"""Parameters several tools take, defined once so they read (and validate) the same everywhere.

Use them as annotations: `gpu: Gpu = None`. Descriptions are short on purpose: every MCP client
pays for tools/list in context; the tool's help resource (tool-help://<name>) has the details.
"""
from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import Field

# Hardware
Gpu = Annotated[Optional[str], Field(description="GPU model, e.g. 'RTX 4090', 'H100', 'A100 40GB'.")]
GpuMemoryGib = Annotated[Optional[float], Field(gt=0, description="VRAM per GPU in GiB (overrides gpu).")]
NumGpus = Annotated[Optional[int], Field(ge=1, description="GPUs the run uses.")]
GpuIds = Annotated[Optional[list[int]], Field(description="GPU indices to use (CUDA_VISIBLE_DEVICES).")]

# Sequence and masking settings (SFTConfig names)
SeqLen = Annotated[Optional[int], Field(ge=16, description="max_length: tokens per sequence or packed block.")]
# TRL's own names (SFTConfig fields) need no words; the help resource explains them.
MaxLength = Annotated[Optional[int], Field(ge=1)]
Tokenizer = Annotated[Optional[str], Field(description="Model or tokenizer dir.")]
ChatTemplate = Annotated[Optional[str], Field(
    description="File, 'trl:<name>', or omit: the tokenizer's.")]
Packing = bool
AssistantOnlyLoss = bool
CompletionOnlyLoss = Optional[bool]  # None: TRL decides (on for prompt/completion data)

# Paths (all inside the workspace)
OutputDir = Annotated[Optional[str], Field(description="Where to write (default: a new dir under "
                                                       "the workspace).")]
Dtype = Literal["auto", "bf16", "fp16", "fp32"]
