"""The settings generate_recipe writes for each method (full, spectrum, lora, qlora), typed, each
field with its reason in `help` as TRL's SFTConfig fields carry theirs, and the "why" line each
setting gets in the result's settings_explained. references/recipes.md explains every value.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

Method = Literal["full", "lora", "qlora", "spectrum"]


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class LoraDefaults:
    """The adapter LoRA and QLoRA train (PEFT LoraConfig through TRL's ModelConfig keys)."""
    lora_r: int = field(default=16, metadata=_help(
        "Rank 16: enough for instruction and style tuning of 1-70B models (QLoRA paper: the rank "
        "matters less than covering every linear layer)."))
    lora_alpha: int = field(default=16, metadata=_help(
        "alpha = r, so the update's scale alpha/r is 1 and the learning rate means the same at any rank."))
    lora_dropout: float = field(default=0.05, metadata=_help(
        "A little dropout on the adapter input (the QLoRA paper used 0.05 for its 33B/65B models, 0.1 for "
        "smaller ones)."))
    lora_target_modules: str = field(default="all-linear", metadata=_help(
        "Every linear layer of the decoder (attention and MLP), as the QLoRA paper found best; never "
        "lm_head (TRL rejects LoRA on it)."))

    def keys(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def why(self) -> dict[str, str]:
        every = "every linear layer of the decoder" if self.lora_target_modules == "all-linear" \
            else str(self.lora_target_modules)
        return {"lora_r": f"r {self.lora_r}, alpha {self.lora_alpha} (scale {self.lora_alpha / self.lora_r:g}), "
                          f"dropout {self.lora_dropout:g} on {every}."}


@dataclass(frozen=True)
class QuantizationDefaults:
    """QLoRA's 4-bit base (bitsandbytes through TRL's ModelConfig keys)."""
    load_in_4bit: bool = field(default=True, metadata=_help("The frozen base in 4 bits: a quarter of bf16's memory."))
    bnb_4bit_quant_type: str = field(default="nf4", metadata=_help(
        "NormalFloat4: the QLoRA paper's type for normally distributed weights (better than fp4)."))
    use_bnb_nested_quant: bool = field(default=True, metadata=_help(
        "Double quantization: the quantization constants quantized too (~0.4 bits per parameter saved)."))

    def keys(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def why(self) -> dict[str, str]:
        double = " with double quantization" if self.use_bnb_nested_quant else ""
        return {"load_in_4bit": f"QLoRA: {self.bnb_4bit_quant_type.upper()} 4-bit base{double}; compute in dtype."}


@dataclass(frozen=True)
class MethodDefaults:
    """One method's optimizer settings, and for LoRA/QLoRA the adapter and the 4-bit base."""
    method: Method
    learning_rate: float = field(metadata=_help(
        "Peak learning rate: 2e-4 for LoRA/QLoRA (the QLoRA paper's for 7-13B; a low-rank update needs a "
        "large step), "
        "1e-5 for full fine-tuning and 2e-5 for Spectrum's subset of layers (full weights move with "
        "small steps)."))
    lr_scheduler_type: str = field(metadata=_help(
        "constant_with_warmup for adapters (QLoRA paper), cosine for full weights; never 'constant' "
        "with warm-up, which transformers ignores."))
    warmup_steps: float = field(metadata=_help(
        "A share of the steps when below 1: 3% for adapters, 10% for full weights."))
    max_grad_norm: float = field(metadata=_help(
        "Gradient clipping: 0.3 for QLoRA (its paper), 1.0 elsewhere (the Trainer's default)."))
    lora: Optional[LoraDefaults] = None
    quantization: Optional[QuantizationDefaults] = None

    def optimizer_keys(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("learning_rate", "lr_scheduler_type", "warmup_steps", "max_grad_norm")}

    def optimizer_why(self) -> dict[str, str]:
        return {
            "learning_rate": f"{self.method} default {self.learning_rate:g}, {self.lr_scheduler_type}, warm-up "
                             f"{self.warmup_steps:g} of the steps (a float warmup_steps < 1 is a ratio; "
                             "'constant' would ignore warm-up).",
            "max_grad_norm": f"clip gradients at {self.max_grad_norm:g}.",
        }

    @staticmethod
    def help(name: str) -> str:
        """The reason behind one setting, as its field documents it."""
        for cls in (MethodDefaults, LoraDefaults, QuantizationDefaults):
            f = {x.name: x for x in dataclasses.fields(cls)}.get(name)
            if f is not None and "help" in f.metadata:
                return f.metadata["help"]
        raise KeyError(name)


DEFAULTS: dict[str, MethodDefaults] = {
    "qlora": MethodDefaults("qlora", learning_rate=2.0e-4, lr_scheduler_type="constant_with_warmup",
                            warmup_steps=0.03, max_grad_norm=0.3, lora=LoraDefaults(),
                            quantization=QuantizationDefaults()),
    "lora": MethodDefaults("lora", learning_rate=2.0e-4, lr_scheduler_type="constant_with_warmup",
                           warmup_steps=0.03, max_grad_norm=1.0, lora=LoraDefaults()),
    "spectrum": MethodDefaults("spectrum", learning_rate=2.0e-5, lr_scheduler_type="cosine", warmup_steps=0.1,
                               max_grad_norm=1.0),
    "full": MethodDefaults("full", learning_rate=1.0e-5, lr_scheduler_type="cosine", warmup_steps=0.1,
                           max_grad_norm=1.0),
}
