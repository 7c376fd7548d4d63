"""GGUF files from a Hugging Face model, with llama.cpp's own tools only.

f32/f16/bf16/q8_0 come from llama.cpp's `convert_hf_to_gguf.py` (installed from the sdist of the
installed llama-cpp-python by tools.export_setup); k-quants come from llama.cpp's quantizer
(`llama_model_quantize`) applied to the 16-bit GGUF. Both run in child processes: a crash or a
GGML_ASSERT abort in llama.cpp costs the call, not the MCP server.
"""
from __future__ import annotations

import ast
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from .errors import UserError

log = logging.getLogger(__name__)

CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
# llama.cpp ftype names for llama_model_quantize (LLAMA_FTYPE_MOSTLY_<name>).
QUANT_TYPES = ("Q2_K", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")
# Bytes per parameter, for the disk check (k-quants from llama.cpp's published sizes, 7B).
BYTES_PER_PARAM = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 1.07, "Q6_K": 0.83,
                   "Q5_K_M": 0.72, "Q5_K_S": 0.70, "Q4_K_M": 0.61, "Q4_K_S": 0.58,
                   "Q3_K_M": 0.49, "Q2_K": 0.42}
CONVERT_TIMEOUT_S = 6 * 3600
# How the Makefile builds llama-cpp-python on x86-64 (AVX2 baseline, no AMX, no multimodal lib).
PORTABLE_CMAKE_ARGS = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
                       "-DGGML_BMI2=ON -DLLAVA_BUILD=OFF")
_FIX_INSTALL = ("Install the export extra and the converter: `make venv` (or "
                "`pip install -e '.[export]' && python -m tools.export_setup`), or set "
                "LLAMA_CPP_CONVERTER to convert_hf_to_gguf.py in a llama.cpp checkout.")


# ----------------------------------------------------------------------------- the converter
def find_converter() -> Path:
    """convert_hf_to_gguf.py: $LLAMA_CPP_CONVERTER, else the copy tools.export_setup installed."""
    from .export_setup import converter_path
    script = converter_path()
    if not script.is_file() or not (script.parent / "conversion").is_dir():
        raise UserError(f"llama.cpp's converter is not installed (looked for {script} with its "
                        "conversion/ package).", field="formats", fix=_FIX_INSTALL)
    return script


def converter_version(script: Path) -> str | None:
    stamp = script.parent / "VERSION"
    return stamp.read_text().strip() if stamp.is_file() else None


def supported_architectures(script: Path) -> set[str] | None:
    """The converter's own table of HF architectures (conversion/__init__.py TEXT_MODEL_MAP),
    read without importing it (that would import torch); None if the table is not found."""
    try:
        tree = ast.parse((script.parent / "conversion" / "__init__.py").read_text())
    except (OSError, SyntaxError):
        return None
    for node in ast.walk(tree):
        target = getattr(node, "target", None) or (getattr(node, "targets", None) or [None])[0]
        if isinstance(target, ast.Name) and target.id == "TEXT_MODEL_MAP" and node.value is not None:
            try:
                return set(ast.literal_eval(node.value))
            except ValueError:
                return None
    return None


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)  # the converter must use the gguf-py it was shipped with
    env.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: nothing to fetch
    env["PYTHONUNBUFFERED"] = "1"
    return env


def explain_converter_failure(stderr: str, *, model_field: str, arch: str) -> UserError:
    """A UserError naming the cause of a failed conversion, from the converter's own messages."""
    tail = "\n".join(stderr.strip().splitlines()[-12:])
    if "BPE pre-tokenizer was not recognized" in stderr:
        h = re.search(r"chkhsh:\s+([0-9a-f]{64})", stderr)
        return UserError(
            "llama.cpp's converter does not recognise this tokenizer's pre-tokenizer (it identifies "
            f"tokenizers by the hash of their output on a test string{': ' + h.group(1) if h else ''}). "
            "A GGUF from it would split text differently from training.", field=model_field,
            fix="Export a model that keeps its base model's tokenizer files unchanged (known families "
                "convert), update llama-cpp-python (`pip install -U llama-cpp-python` then "
                "`python -m tools.export_setup`), or add the tokenizer to llama.cpp's "
                "convert_hf_to_gguf_update.py.")
    if "cannot find tokenizer merges" in stderr:
        return UserError("the tokenizer is a BPE tokenizer without merges; llama.cpp cannot load it.",
                         field=model_field, fix="Export a model with its base model's tokenizer.")
    if re.search(r"No space left on device|Errno 28", stderr):
        return UserError("the disk filled up while writing the GGUF (nothing was kept).",
                         field="output_dir", fix="Free space, or choose an output_dir on a larger "
                                                 "disk inside the workspace, or fewer formats.")
    if re.search(r"is not supported|not supported!", stderr):
        return UserError(f"llama.cpp's converter does not support architecture {arch}.",
                         field=model_field, fix="Serve the Hugging Face folder with vLLM/SGLang/TGI "
                                                "instead, or update llama-cpp-python and re-run "
                                                "`python -m tools.export_setup`.")
    m = re.search(r"ModuleNotFoundError: No module named '([\w.]+)'", stderr)
    if m:
        return UserError(f"the converter needs the Python package '{m.group(1)}'.", field="formats",
                         fix=f"pip install {m.group(1).split('.')[0]} (or reinstall the export extra).")
    return UserError(f"convert_hf_to_gguf.py failed:\n{tail}", field=model_field,
                     fix="Read the converter's message above; check that the model folder loads with "
                         "transformers (AutoModelForCausalLM.from_pretrained).")


def convert(script: Path, model_dir: Path, out: Path, outtype: str, *, model_field: str,
            arch: str, name: str) -> float:
    """Run convert_hf_to_gguf.py; return seconds taken. `out` is inside the export's temp dir."""
    import time
    t0 = time.time()
    cmd = [sys.executable, str(script), str(model_dir), "--outfile", str(out), "--outtype",
           outtype, "--model-name", name]
    try:
        proc = subprocess.run(cmd, cwd=str(out.parent), env=_env(), capture_output=True, text=True,
                              timeout=CONVERT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise UserError(f"the conversion to {outtype} ran over {CONVERT_TIMEOUT_S} s.",
                        field="formats", fix="Convert fewer formats per call.") from None
    if proc.returncode != 0 or not out.is_file():
        raise explain_converter_failure(proc.stderr + proc.stdout, model_field=model_field, arch=arch)
    return time.time() - t0


# ----------------------------------------------------------------------------- LoRA adapter
LORA_TYPES = ("f32", "f16", "bf16", "q8_0")  # convert_lora_to_gguf.py --outtype


def find_lora_converter(script: Path) -> Path:
    """convert_lora_to_gguf.py beside convert_hf_to_gguf.py (same llama.cpp, same conversion/)."""
    lora = script.parent / "convert_lora_to_gguf.py"
    if not lora.is_file():
        raise UserError(f"llama.cpp's LoRA converter is not installed (looked for {lora}).",
                        field="merge", fix="Run `python -m tools.export_setup` (it extracts "
                                           "convert_lora_to_gguf.py too), or pass merge=true.")
    return lora


def lora_refusals(cfg: dict) -> list[str]:
    """What in adapter_config.json llama.cpp's GGUF LoRA cannot carry. llama.cpp applies
    W + (alpha / rank) * B A per tensor with one alpha: no full-module copies, no DoRA magnitude,
    no rsLoRA's alpha / sqrt(rank), no per-module alpha (convert_lora_to_gguf.py and
    llama-adapter.cpp)."""
    out = []
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        out.append(f"it is a {cfg.get('peft_type')} adapter, not LoRA")
    if cfg.get("modules_to_save"):
        out.append(f"modules_to_save {cfg['modules_to_save']} are full copies of those modules, "
                   "not low-rank deltas")
    if cfg.get("trainable_token_indices"):
        out.append("trainable_token_indices change embedding rows directly")
    if cfg.get("use_dora"):
        out.append("DoRA's magnitude vectors are not applied by llama.cpp")
    if cfg.get("use_rslora"):
        out.append("rsLoRA scales by alpha/sqrt(r); llama.cpp scales every adapter by alpha/r")
    if cfg.get("alpha_pattern"):
        out.append("alpha_pattern gives modules their own alpha; a GGUF adapter has one")
    return out


def convert_lora(lora_script: Path, adapter_dir: Path, base_dir: Path, out: Path, outtype: str,
                 *, arch: str) -> float:
    """Run convert_lora_to_gguf.py (base config from base_dir, no hub); return seconds."""
    import time
    t0 = time.time()
    cmd = [sys.executable, str(lora_script), str(adapter_dir), "--base", str(base_dir),
           "--outfile", str(out), "--outtype", outtype]
    try:
        proc = subprocess.run(cmd, cwd=str(out.parent), env=_env(), capture_output=True, text=True,
                              timeout=CONVERT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise UserError(f"the adapter conversion ran over {CONVERT_TIMEOUT_S} s.", field="merge",
                        fix="Pass merge=true.") from None
    if proc.returncode != 0 or not out.is_file():
        err = proc.stderr + proc.stdout
        if "Unexpected name" in err or "is present in adapter" in err:
            tail = "\n".join(ln for ln in err.splitlines() if "ERROR" in ln)[-600:]
            raise UserError(f"convert_lora_to_gguf.py cannot carry this adapter's tensors:\n{tail}",
                            field="merge", fix="Pass merge=true (the default): the merged model "
                                               "exports whatever the adapter trained.")
        raise explain_converter_failure(err, model_field="adapter", arch=arch)
    return time.time() - t0


# ----------------------------------------------------------------------------- llama.cpp child
def run_llama(op: str, request: dict, *, timeout: float = 3600) -> dict:
    """Run tools.export_llama `op` in a child process; return its JSON answer."""
    proc = subprocess.run([sys.executable, "-m", "tools.export_llama", op],
                          input=json.dumps(request), capture_output=True, text=True,
                          timeout=timeout, env={**_env(), "PYTHONPATH": _pythonpath()},
                          cwd=str(Path(__file__).resolve().parent.parent))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-10:])
        if re.search(r"No space left on device|Errno 28", proc.stderr):
            raise UserError("the disk filled up while writing a GGUF (nothing was kept).",
                            field="output_dir", fix="Free space or choose fewer formats.")
        if proc.returncode in (-4, 132):  # SIGILL
            raise UserError(
                f"llama.cpp died with an illegal instruction (SIGILL) during {op}: llama-cpp-python "
                "was compiled for CPU features this machine cannot execute (a -march=native build "
                "from another CPU, or AMX kernels a VM does not run).", field="formats",
                fix="Rebuild it with a portable baseline: `pip cache remove llama_cpp_python && "
                    f"CMAKE_ARGS='{PORTABLE_CMAKE_ARGS}' pip install --force-reinstall --no-deps "
                    "--no-cache-dir llama-cpp-python` (the Makefile does this).")
        if "No module named 'llama_cpp'" in proc.stderr:
            raise UserError("llama-cpp-python is not installed.", field="formats", fix=_FIX_INSTALL)
        raise UserError(f"llama.cpp {op} failed (exit {proc.returncode}):\n{tail}", field="formats",
                        fix="Read llama.cpp's message above; a GGML_ASSERT usually means a tensor "
                            "shape this quantization type cannot take: try q8_0 or Q6_K.")
    return json.loads(lines[-1])


def _pythonpath() -> str:
    root = str(Path(__file__).resolve().parent.parent)
    old = os.environ.get("PYTHONPATH")
    return root + (os.pathsep + old if old else "")


def quantize(src: Path, dst: Path, qtype: str) -> float:
    """A k-quant of the 16-bit GGUF `src`, with llama.cpp's quantizer; return seconds taken."""
    ans = run_llama("quantize", {"src": str(src), "dst": str(dst), "type": qtype,
                                 "threads": os.cpu_count() or 1})
    if ans.get("rc") != 0 or not dst.is_file():
        raise UserError(f"llama_model_quantize to {qtype} returned {ans.get('rc')}.", field="formats",
                        fix="Try another type (q8_0, Q6_K) or check the source GGUF.")
    return float(ans["seconds"])


# ----------------------------------------------------------------------------- disk
def parameter_count(model_dir: Path) -> int | None:
    """Parameters from the safetensors headers (no tensor is read)."""
    from .models import safetensors_shapes
    try:
        shapes = safetensors_shapes(sorted(model_dir.glob("*.safetensors")))
    except (OSError, ValueError):
        return None
    return sum(math.prod(s) for s in shapes.values()) if shapes else None


def bytes_needed(params: int, formats: list[str], *, hf_copy_bytes: int = 0) -> int:
    """Peak bytes the export writes: every format, the 16-bit source of the k-quants (kept only
    if asked for), and a merged copy of an adapter's base."""
    need = sum(BYTES_PER_PARAM[f] * params for f in formats)
    if any(f in QUANT_TYPES for f in formats) and not any(f in ("f16", "bf16", "f32") for f in formats):
        need += 2 * params
    return int(need * 1.05) + hf_copy_bytes + 64 * 2**20


def check_disk(target: Path, need: int) -> None:
    probe = target
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise UserError(f"the export needs about {need / 2**30:.2f} GiB but only "
                        f"{free / 2**30:.2f} GiB are free on the disk holding it.", field="output_dir",
                        fix="Free disk space, choose an output_dir on a larger disk inside the "
                            "workspace, or ask for fewer formats (Q4_K_M alone is ~0.6 byte/param).")


def check_parity_ram(params: int) -> None:
    """The parity reference is the HF model in fp32 (4 bytes/param) next to a memory-mapped GGUF."""
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        with open("/proc/meminfo") as fh:  # MemAvailable counts reclaimable cache too
            for line in fh:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except (OSError, ValueError, AttributeError):
        return
    need = int(params * 4 * 1.2)
    if need > free:
        raise UserError(f"the parity proof loads the HF model in fp32 (~{need / 2**30:.1f} GiB) but "
                        f"only {free / 2**30:.1f} GiB of RAM are available.", field="parity",
                        fix="Pass parity=false (and prove the GGUF on a larger machine), or free memory.")
