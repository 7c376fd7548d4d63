"""Build a tiny Llama-architecture model and a byte-level tokenizer locally (no hub access).

build_convertible_model is the same model with a tokenizer llama.cpp's GGUF converter maps
(build_convertible_tokenizer); build_tiny_model's byte-level one it refuses.

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


def build_convertible_tokenizer(path: str | Path, chat_template: str = CHATML_TEMPLATE):
    """One token per character too, but in the Llama/SentencePiece layout that llama.cpp's
    converter maps without a pre-tokenizer hash (`LlamaHfVocab`: a BPE tokenizer.json with byte
    fallback): <unk>, <s>, the 256 byte tokens <0x00>..<0xFF>, '▁' and printable ASCII, then the
    ChatML specials. Any other character falls back to its UTF-8 bytes, in transformers and in
    llama.cpp alike, so both split every text into the same ids (the export parity proof checks
    it). build_tokenizer's byte-level vocabulary is the one the converter refuses."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1}  # llama.cpp's SentencePiece defaults: unk 0, bos 1
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in ["\u2581", *map(chr, range(0x21, 0x7F))]:
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    # No dummy prefix: llama.cpp adds one unless tokenizer_config says add_prefix_space=false.
    tk.normalizer = normalizers.Replace(" ", "\u2581")
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                    decoders.Fuse()])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", unk_token="<unk>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"],
        model_max_length=512, add_prefix_space=False)
    tok.chat_template = chat_template
    tok.save_pretrained(str(path))
    # llama.cpp adds BOS to a SentencePiece vocabulary unless told not to; training added none.
    cfg_path = Path(path) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(add_bos_token=False, add_eos_token=False)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    return tok


def build_tiny_model(path: str | Path, *, hidden_size: int = 64, layers: int = 2,
                     heads: int = 4, kv_heads: int = 2, intermediate_size: int = 256,
                     max_position_embeddings: int = 512, seed: int = 0,
                     tie_word_embeddings: bool = False) -> Path:
    """Write a random-initialised tiny Llama (float32) and its tokenizer to `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path)
    return _write_model(path, tok, "build_tiny_model", hidden_size=hidden_size, layers=layers,
                        heads=heads, kv_heads=kv_heads, intermediate_size=intermediate_size,
                        max_position_embeddings=max_position_embeddings, seed=seed,
                        tie_word_embeddings=tie_word_embeddings)


def build_convertible_model(path: str | Path, *, hidden_size: int = 64, layers: int = 2,
                            heads: int = 4, kv_heads: int = 2, intermediate_size: int = 256,
                            max_position_embeddings: int = 512, seed: int = 0,
                            tie_word_embeddings: bool = False) -> Path:
    """build_tiny_model with build_convertible_tokenizer: the same tiny Llama, which
    llama.cpp's convert_hf_to_gguf.py turns into a GGUF (the demo exports it)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_convertible_tokenizer(path)
    return _write_model(path, tok, "build_convertible_model", hidden_size=hidden_size,
                        layers=layers, heads=heads, kv_heads=kv_heads,
                        intermediate_size=intermediate_size,
                        max_position_embeddings=max_position_embeddings, seed=seed,
                        tie_word_embeddings=tie_word_embeddings)


def _write_model(path: Path, tok, built_by: str, *, hidden_size: int, layers: int, heads: int,
                 kv_heads: int, intermediate_size: int, max_position_embeddings: int, seed: int,
                 tie_word_embeddings: bool) -> Path:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

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
    (path / "README.md").write_text(json.dumps({"built_by": f"tools.tiny.{built_by}",
                                                "seed": seed}) + "\n")
    return path


if __name__ == "__main__":
    import sys
    print(build_tiny_model(sys.argv[1] if len(sys.argv) > 1 else "tiny-llama"))
