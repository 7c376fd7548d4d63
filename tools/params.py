"""Parameters several tools take, defined once so they read (and validate) the same everywhere.

Use them as annotations: `gpu: Gpu = None`. Descriptions are short on purpose: every MCP client
pays for tools/list in context; the tool's help resource (tool-help://<name>) has the details.
"""
from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import Field

# Hardware
Gpu = Annotated[Optional[str], Field(description="GPU model, e.g. 'RTX 4090', 'H100', 'A100 40GB'; "
                                                 "omit for this machine's.")]
GpuMemoryGib = Annotated[Optional[float], Field(gt=0, description="VRAM per GPU in GiB (overrides gpu).")]
NumGpus = Annotated[Optional[int], Field(ge=1, description="GPUs the run uses.")]
GpuIds = Annotated[Optional[list[int]], Field(description="GPU indices to use (CUDA_VISIBLE_DEVICES).")]

# Sequence and masking settings (SFTConfig names)
SeqLen = Annotated[Optional[int], Field(ge=16, description="max_length: tokens per sequence or packed block.")]
MaxLength = Annotated[Optional[int], Field(ge=1, description="SFTConfig.max_length; rows beyond it are cut.")]
Tokenizer = Annotated[Optional[str], Field(description="Model or tokenizer dir (or hub id).")]
ChatTemplate = Annotated[Optional[str], Field(
    description="Template file, 'trl:<name>' (TRL's shipped ones), or omit for the tokenizer's.")]
Packing = Annotated[bool, Field(description="SFTConfig.packing (BFD, padding-free).")]
AssistantOnlyLoss = Annotated[bool, Field(description="SFTConfig.assistant_only_loss.")]
CompletionOnlyLoss = Annotated[Optional[bool], Field(description="SFTConfig.completion_only_loss; "
                                                                 "omit to let TRL decide.")]

# Paths (all inside the workspace)
OutputDir = Annotated[Optional[str], Field(description="Where to write (default: a new dir under "
                                                       "the workspace).")]
Dtype = Literal["auto", "bf16", "fp16", "fp32"]
