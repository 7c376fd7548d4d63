"""Post-training quantization for GPU serving: what export_model writes for the user to run there.

Two routes, both from the Hugging Face folder (the merged model, or the base with the adapter):

- bitsandbytes at load time (quick use, no calibration, no new files): 4-bit NF4 or 8-bit, in
  transformers (`BitsAndBytesConfig`), vLLM (`--quantization bitsandbytes`) or TGI
  (`--quantize bitsandbytes-nf4`). Slower kernels than GPTQ/AWQ; fine to try a model.
- GPTQ / AWQ W4A16 (or FP8 dynamic) with llm-compressor, calibrated on the fine-tuning data
  rendered with the training chat template: `quantize_gpu.py` in the export folder, with the
  model folder, the calibration data and the output folder written in. The result is in the
  compressed-tensors format, which vLLM and SGLang load directly. It needs a CUDA GPU and
  `pip install llmcompressor`; `--check` runs every step up to the quantization on a CPU.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, Field

from .workspace import get_workspace

SCRIPT_NAME = "quantize_gpu.py"
# name -> (llm-compressor modifier, its scheme, needs calibration data). W4A16 group 128 is the
# usual GPTQ/AWQ trade-off (~0.55 byte/param, Marlin kernels on Ampere+); FP8 dynamic needs no
# calibration and Ada/Hopper GPUs.
SCHEMES = {"gptq": ("GPTQModifier", "W4A16", True), "awq": ("AWQModifier", "W4A16_ASYM", True),
           "fp8": ("QuantizationModifier", "FP8_DYNAMIC", False)}
DEFAULT_SCHEME = "gptq"
CALIBRATION_ROWS = 256   # llm-compressor's examples start at 256-512
CALIBRATION_MAX_LEN = 2048


class GpuQuantization(BaseModel):
    """GPU serving without GGUF: bitsandbytes at load time, or GPTQ/AWQ/FP8 with llm-compressor."""
    model_dir: str = Field(description="the Hugging Face folder the commands load.")
    script: str | None = Field(description="quantize_gpu.py (llm-compressor) in the export folder.")
    commands: dict[str, str] = Field(description="per scheme (gptq, awq, fp8): the command to run on a GPU.")
    output_dirs: dict[str, str] = Field(description="per scheme: the folder the quantized model is saved to.")
    serve: dict[str, str] = Field(description="per scheme: the vLLM command serving the quantized folder.")
    calibration: str | None = Field(description="the calibration data written into the script "
                                                "(the training data), or None: pass --dataset.")
    bitsandbytes: dict[str, str] = Field(description="4-bit/8-bit loading: python, vllm, tgi.")
    requires: str


def training_data(hf_dir: Path, adapter: Path | None) -> Path | None:
    """The fine-tuning data, from the run that made this model (merge_report.json -> adapter ->
    summary.json / recipe), if it is still in the workspace."""
    from .merge import _find_training_info
    ws = get_workspace()
    if adapter is None:
        try:
            adapter_rel = json.loads((hf_dir / "merge_report.json").read_text()).get("adapter_dir")
        except (OSError, ValueError):
            return None
        adapter = ws.root / adapter_rel if adapter_rel else None
    if adapter is None or not adapter.is_dir():
        return None
    info = _find_training_info(adapter)
    name = (info.get("summary") or {}).get("dataset") or (info.get("recipe") or {}).get("dataset_name")
    if not isinstance(name, str):
        return None
    p = ws.root / name
    return p if p.exists() else None


def plan(out: Path, hf_dir: Path, name: str, *, data: Path | None, template_file: str,
         adapter: Path | None = None) -> tuple[GpuQuantization, str]:
    """The section of the export result and the text of quantize_gpu.py (written by the caller
    into the export's temp folder; `out` is where it will be). `adapter`: a LoRA kept separate
    from hf_dir (the script merges it before quantizing)."""
    ws = get_workspace()
    model_rel, script = ws.rel(hf_dir), f"{ws.rel(out)}/{SCRIPT_NAME}"
    outs = {k: f"{ws.rel(out)}/{name}-{SCHEMES[k][1]}" for k in SCHEMES}
    src = _script(out, hf_dir, adapter, data, outs)
    q = f"'{model_rel}'"
    bnb = {
        "python_4bit": (f"AutoModelForCausalLM.from_pretrained({q}, device_map='auto', "
                        "quantization_config=BitsAndBytesConfig(load_in_4bit=True, "
                        "bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True, "
                        "bnb_4bit_compute_dtype=torch.bfloat16))"),
        "python_8bit": (f"AutoModelForCausalLM.from_pretrained({q}, device_map='auto', "
                        "quantization_config=BitsAndBytesConfig(load_in_8bit=True))"),
        "vllm": f"vllm serve {model_rel} --quantization bitsandbytes --chat-template {template_file}",
        "tgi": (f"docker run --gpus all --shm-size 1g -p 8080:80 -v \"$PWD\":/data "
                f"ghcr.io/huggingface/text-generation-inference --model-id /data/{model_rel} "
                "--quantize bitsandbytes-nf4"),
    }
    if adapter is not None:
        bnb = {k: v for k, v in bnb.items() if k.startswith("python")}  # the servers want one folder
    section = GpuQuantization(
        model_dir=model_rel, script=script,
        commands={k: f"python {script} --scheme {k}" for k in SCHEMES},
        output_dirs=outs,
        serve={k: f"vllm serve {v} --chat-template {template_file} --port 8000" for k, v in outs.items()},
        calibration=ws.rel(data) if data else None, bitsandbytes=bnb,
        requires="a CUDA GPU and `pip install llmcompressor` (run with --check on any machine first)")
    return section, src


def _script(out: Path, hf_dir: Path, adapter: Path | None, data: Path | None,
            outs: dict[str, str]) -> str:
    """quantize_gpu.py with this export's paths, relative to the script's own folder (so the
    export can be moved with the models it points at)."""
    ws = get_workspace()

    def rel(p: Path | None) -> str | None:
        return None if p is None else os.path.relpath(p, out)
    consts = {
        "MODEL_DIR": rel(hf_dir), "ADAPTER_DIR": rel(adapter), "CALIBRATION": rel(data),
        "OUTPUT_DIRS": {k: os.path.relpath(ws.root / v, out) for k, v in outs.items()},
        "SCHEMES": {k: [m, s, c] for k, (m, s, c) in SCHEMES.items()},
        "DEFAULT_SCHEME": DEFAULT_SCHEME, "CALIBRATION_ROWS": CALIBRATION_ROWS,
        "MAX_SEQ_LENGTH": CALIBRATION_MAX_LEN,
    }
    head = "\n".join(f"{k} = {v!r}" for k, v in consts.items())  # Python literals
    return _TEMPLATE.replace("# @CONSTANTS@", head)


_TEMPLATE = '''"""GPU post-training quantization of a fine-tuned model with llm-compressor.

Written by llm-fine-tuning's export_model. On a CUDA machine:

    pip install llmcompressor
    python quantize_gpu.py                  # GPTQ W4A16 (group 128), calibrated on the training data
    python quantize_gpu.py --scheme awq     # AWQ W4A16 (asymmetric)
    python quantize_gpu.py --scheme fp8     # FP8 dynamic (Ada/Hopper; no calibration)
    python quantize_gpu.py --check          # any machine: every step up to the quantization

Calibration rows are the fine-tuning data rendered with the training chat template, so the
quantizer sees the prompts the model will serve. The output (compressed-tensors) is served with
`vllm serve <output dir>`; evaluate it against the unquantized model before shipping it.
"""
import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# @CONSTANTS@


def _path(p):
    return None if p is None else (HERE / p).resolve()


def _rows(path):
    """JSON lines (a file, or a folder's train*.jsonl / *.jsonl) as chats or texts."""
    files = [path] if path.is_file() else (sorted(path.glob("train*.jsonl")) or sorted(path.glob("*.jsonl")))
    for f in files:
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                yield json.loads(line)


def _render(row, tok):
    """One calibration text in the training format: messages, prompt/completion or text."""
    if isinstance(row.get("messages"), list):
        return tok.apply_chat_template(row["messages"], tokenize=False)
    p, c = row.get("prompt"), row.get("completion")
    if isinstance(p, list) and isinstance(c, list):
        return tok.apply_chat_template(p + c, tokenize=False)
    if isinstance(p, str) and isinstance(c, str):
        return p + c
    return row.get("text") if isinstance(row.get("text"), str) else None


def calibration(tok, dataset, n, max_len):
    texts = []
    for row in _rows(dataset):
        t = _render(row, tok)
        if t:
            texts.append(t)
        if len(texts) >= n:
            break
    if not texts:
        raise SystemExit(f"no usable rows in {dataset} (messages, prompt/completion or text)")
    from datasets import Dataset
    enc = tok(texts, max_length=max_len, truncation=True, add_special_tokens=False)
    return Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scheme", choices=sorted(SCHEMES), default=DEFAULT_SCHEME)
    ap.add_argument("--dataset", type=Path, help="calibration JSON lines (default: the training data)")
    ap.add_argument("--rows", type=int, default=CALIBRATION_ROWS)
    ap.add_argument("--max-seq-length", type=int, default=MAX_SEQ_LENGTH)
    ap.add_argument("--output-dir", type=Path)
    ap.add_argument("--check", action="store_true", help="stop before quantizing (no GPU needed)")
    a = ap.parse_args(argv)
    modifier, scheme, calibrated = SCHEMES[a.scheme]
    model_dir, adapter = _path(MODEL_DIR), _path(ADAPTER_DIR)
    out = a.output_dir or _path(OUTPUT_DIRS[a.scheme])
    dataset = a.dataset or _path(CALIBRATION)
    if calibrated and dataset is None:
        raise SystemExit(f"--scheme {a.scheme} calibrates on data: pass --dataset <jsonl or folder>")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(adapter or model_dir))
    ds = calibration(tok, dataset, a.rows, a.max_seq_length) if calibrated else None
    plan = {"model_dir": str(model_dir), "adapter_dir": str(adapter) if adapter else None,
            "scheme": a.scheme, "modifier": modifier, "llmcompressor_scheme": scheme,
            "calibration": str(dataset) if calibrated else None,
            "calibration_rows": len(ds) if ds is not None else 0,
            "calibration_tokens": sum(map(len, ds["input_ids"])) if ds is not None else 0,
            "output_dir": str(out)}
    print(json.dumps(plan, indent=2))
    if a.check:
        return 0
    try:
        from llmcompressor import oneshot
    except ImportError:
        raise SystemExit("llmcompressor is not installed: pip install llmcompressor (on a CUDA machine)")
    import importlib
    mod = {"GPTQModifier": "llmcompressor.modifiers.quantization",
           "QuantizationModifier": "llmcompressor.modifiers.quantization",
           "AWQModifier": "llmcompressor.modifiers.awq"}[modifier]
    recipe = getattr(importlib.import_module(mod), modifier)(targets="Linear", scheme=scheme,
                                                             ignore=["lm_head"])
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto")
    if adapter is not None:  # quantize the merged weights: the adapter cannot ride on GPTQ/AWQ
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    kw = {"dataset": ds, "max_seq_length": a.max_seq_length, "num_calibration_samples": len(ds)} if ds is not None else {}
    oneshot(model=model, recipe=recipe, **kw)
    model.save_pretrained(str(out), save_compressed=True)
    tok.save_pretrained(str(out))
    print(f"saved {out}: serve it with vllm serve {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''
