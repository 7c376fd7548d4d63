"""Build a tiny Llama-architecture model and a byte-level tokenizer locally (no hub access).

Tests and the demo train this model on CPU in seconds. It is saved exactly as a hub model is
(config.json, model.safetensors, tokenizer.json, tokenizer_config.json with a ChatML chat
template, generation_config.json), so every loading path is the one real models take.
"""
from __future__ import annotations

import json
from pathlib import Path

# ChatML, as Qwen2.5 / SmolLM2 / Hermes use it, without a default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(path: str | Path, chat_template: str = CHATML_TEMPLATE):
    """A byte-level BPE tokenizer with no merges (one token per byte) plus ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"], model_max_length=512)
    tok.chat_template = chat_template
    tok.save_pretrained(str(path))
    return tok


def build_tiny_model(path: str | Path, *, hidden_size: int = 64, layers: int = 2,
                     heads: int = 4, kv_heads: int = 2, intermediate_size: int = 256,
                     max_position_embeddings: int = 512, seed: int = 0,
                     tie_word_embeddings: bool = False) -> Path:
    """Write a random-initialised tiny Llama (float32) and its tokenizer to `path`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path)
    vocab_size = len(tok)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        rms_norm_eps=1e-6)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
        do_sample=False, max_new_tokens=64)
    model.save_pretrained(str(path))
    (path / "README.md").write_text(json.dumps({"built_by": "tools.tiny.build_tiny_model",
                                                "seed": seed}) + "\n")
    return path


if __name__ == "__main__":
    import sys
    print(build_tiny_model(sys.argv[1] if len(sys.argv) > 1 else "tiny-llama"))
