"""llama.cpp work run in a child process: quantize a GGUF, and probe one for the parity proof.

    python -m tools.export_llama quantize|probe   < request.json   (answer: one JSON line)

llama.cpp aborts the process on a failed GGML_ASSERT; run here, that costs one call, not the MCP
server. Its logs go to stderr; the answer is the last line of stdout (C-level prints are moved
to stderr first, so nothing else reaches it).
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter


def _quantize(req: dict) -> dict:
    import ctypes

    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{req['type']}")
    params.nthread = int(req.get("threads") or 0)
    t0 = time.time()
    rc = llama_cpp.llama_model_quantize(req["src"].encode(), req["dst"].encode(), ctypes.byref(params))
    return {"rc": int(rc), "seconds": round(time.time() - t0, 3)}


def _gguf(gguf_py: str | None):
    # The gguf-py shipped with the converter: its type codes are the ones the converter wrote.
    if gguf_py and gguf_py not in sys.path:
        sys.path.insert(0, gguf_py)
    import gguf
    return gguf


def _header(path: str, gguf_py: str | None) -> tuple[dict, Counter]:
    """(scalar metadata, tensor type counts) of a GGUF, read from its header only.

    gguf-py's GGUFReader builds a Python object for every element of every array, which takes
    ~10 s on a 150k-token vocabulary (tokens + merges); the arrays are skipped here instead,
    with gguf-py's own type codes. Layout (GGUF v2/v3): magic, version, n_tensors, n_kv, the
    key/values, then per tensor: name, n_dims, dims, ggml type, offset."""
    import mmap
    import struct
    g = _gguf(gguf_py)
    vt = g.GGUFValueType
    fmt = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    sizes = {t: struct.calcsize(f) for t, f in fmt.items()}
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        n_tensors, n_kv = struct.unpack_from("<QQ", m, 8)
        pos = 24

        def string() -> str:
            nonlocal pos
            (n,) = struct.unpack_from("<Q", m, pos)
            pos += 8 + n
            return m[pos - n:pos].decode("utf-8", "replace")

        meta: dict = {}
        for _ in range(n_kv):
            key = string()
            (t,) = struct.unpack_from("<I", m, pos)
            pos += 4
            if t == vt.STRING:
                meta[key] = string()
            elif t == vt.ARRAY:
                et, count = struct.unpack_from("<IQ", m, pos)
                pos += 12
                if et == vt.STRING:
                    for _ in range(count):
                        string()
                else:
                    pos += sizes[et] * count
            else:
                (meta[key],) = struct.unpack_from(fmt[t], m, pos)
                pos += sizes[t]
        types: Counter = Counter()
        for _ in range(n_tensors):
            string()
            (n_dims,) = struct.unpack_from("<I", m, pos)
            pos += 4 + 8 * n_dims
            (tt,) = struct.unpack_from("<I", m, pos)
            pos += 12  # type + offset
            types[g.GGMLQuantizationType(tt).name] += 1
    return meta, types


def _tensor_types(path: str, gguf_py: str | None) -> dict[str, int]:
    try:
        return dict(_header(path, gguf_py)[1])
    except ImportError:
        return {}


def _meta(req: dict) -> dict:
    """A few metadata keys of a GGUF, without loading the model."""
    meta, _ = _header(req["gguf"], req.get("gguf_py"))
    return {k: v for k, v in meta.items()
            if k.startswith("tokenizer.ggml.") and k.endswith(("_token", "_token_id", ".pre", ".model"))
            or k in ("general.architecture", "general.file_type", "general.name")}


def _greedy(llm, vocab, prompt: list[int], n: int) -> dict:
    """Greedy decoding on llama.cpp's logits, stopping on an end-of-generation token (what
    llama.cpp, llama-server and Ollama stop on)."""
    import llama_cpp
    import numpy as np
    llm.reset()
    llm.eval(prompt)
    out, margins, stopped = [], [], False
    for _ in range(n):
        logits = np.asarray(llm.scores[llm.n_tokens - 1])
        top2 = np.argpartition(-logits, 2)[:2]
        tok = int(top2[0] if logits[top2[0]] >= logits[top2[1]] else top2[1])
        margins.append(float(abs(logits[top2[0]] - logits[top2[1]])))
        out.append(tok)
        if llama_cpp.llama_vocab_is_eog(vocab, tok):
            stopped = True
            break
        llm.eval([tok])
    return {"tokens": out, "margins": margins, "stopped": stopped}


def _teacher_forced(llm, prompt: list[int], reference: list[int]) -> list[int]:
    """llama.cpp's argmax at each position of the reference continuation, given the reference
    prefix (so one early difference does not hide the agreement after it)."""
    import numpy as np
    if not reference:
        return []
    llm.reset()
    llm.eval(prompt + reference[:-1])
    start = len(prompt) - 1
    return [int(np.argmax(llm.scores[start + k])) for k in range(len(reference))]


def _probe(req: dict) -> dict:
    import llama_cpp
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    # lora: a GGUF LoRA adapter applied on top at load time (scale 1.0, as llama-server --lora).
    llm = Llama(model_path=req["gguf"], n_ctx=int(req["n_ctx"]), n_batch=int(req["n_ctx"]),
                n_threads=int(req.get("threads") or 1), logits_all=True, verbose=False, seed=0,
                lora_path=req.get("lora"))
    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    meta = dict(llm.metadata)
    template = meta.get("tokenizer.chat_template")
    eos_id, bos_id = llm.token_eos(), llm.token_bos()
    eos = llm._model.token_get_text(eos_id) if eos_id >= 0 else ""
    bos = llm._model.token_get_text(bos_id) if bos_id >= 0 else ""
    fmt = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos) if template else None
    prompts = []
    for chat, text, ref in zip(req["chats"], req["texts"], req["references"]):
        # Tokenization of the HF-rendered text is checked on its own; generation starts from
        # the HF prompt ids, so a tokenizer difference does not hide a weights difference.
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        prompt_ids = list(ref["prompt_ids"])
        row = {"ids": ids, "template_text": fmt(messages=chat).prompt if fmt else None,
               "greedy": _greedy(llm, vocab, prompt_ids, int(req["max_new_tokens"])),
               "teacher_forced": _teacher_forced(llm, prompt_ids, list(ref["continuation"]))}
        # The served path: llama-cpp-python's chat completion (the GGUF's template, its
        # tokenization, its stop rule), greedy.
        llm.reset()
        served = llm.create_chat_completion(messages=chat, temperature=0.0, top_k=1,
                                            max_tokens=int(req["max_new_tokens"]), seed=0)
        row["served"] = {"text": served["choices"][0]["message"]["content"] or "",
                         "finish_reason": served["choices"][0]["finish_reason"]}
        prompts.append(row)
    return {
        "metadata": {k: meta.get(k) for k in ("general.architecture", "general.file_type",
                                              "tokenizer.ggml.model", "tokenizer.ggml.pre",
                                              "tokenizer.ggml.add_bos_token")},
        "chat_template": template, "eos_id": eos_id, "bos_id": bos_id,
        "chat_format": llm.chat_format,
        "is_eog": {str(t): bool(llama_cpp.llama_vocab_is_eog(vocab, int(t))) for t in req["eot_ids"]},
        "tensor_types": _tensor_types(req["gguf"], req.get("gguf_py")),
        "prompts": prompts,
    }


def main() -> None:
    # Keep fd 1 for the answer; everything llama.cpp (or a library) prints goes to stderr.
    answer = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    op = sys.argv[1]
    req = json.loads(sys.stdin.read())
    result = {"quantize": _quantize, "probe": _probe, "meta": _meta}[op](req)
    answer.write(json.dumps(result) + "\n")
    answer.flush()


if __name__ == "__main__":
    main()
