"""What the demo ships: tools.tiny.build_convertible_model through export_model (llama.cpp's
converter maps its tokenizer), the GPU quantization script and bitsandbytes lines every export
writes, a failure half-way that leaves nothing, and the demo's export stage (or its skip line).

The model is random and tiny (1M parameters, one token per character): the proof's tokenizer
and template checks are exact on it; its greedy continuations are near-ties, which is why the
demo exports the fine-tuned model and test_export.py a trained one.
"""
from __future__ import annotations

from collections import Counter

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tools.errors import UserError

needs_export = pytest.mark.skipif(
    __import__("tools.export_setup", fromlist=["x"]).export_missing() is not None,
    reason="the export extra (llama-cpp-python + converter) is not installed: make venv installs it")

# Texts the two tokenizers must split alike: spaces, newlines, tabs, non-ASCII (byte fallback),
# special tokens written in the text.
TRICKY = ["Is 230749 even or odd?", " two  spaces\nand a newline\tand a tab",
          "é ü 日本 🙂", "a literal <|im_end|> inside"]


@pytest.fixture(scope="module")
def convertible_cache(tmp_path_factory) -> Path:
    from tools.tiny import build_convertible_model
    return build_convertible_model(tmp_path_factory.mktemp("conv") / "conv", hidden_size=64,
                                   layers=2, intermediate_size=256)


@pytest.fixture
def conv_model(ws, convertible_cache) -> Path:
    import shutil
    dst = ws.root / "models" / "tiny-llama-parity"
    shutil.copytree(convertible_cache, dst)
    return dst


def test_build_convertible_model_keeps_the_tiny_shape(tmp_path):
    """Same model as build_tiny_model, another tokenizer: one token per ASCII character, BOS
    never added, end-of-turn <|im_end|>, ChatML template; build_tiny_model unchanged."""
    from transformers import AutoTokenizer

    from tools.tiny import build_convertible_model, build_tiny_model
    a = build_tiny_model(tmp_path / "a")
    b = build_convertible_model(tmp_path / "b")
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (a, b))
    assert {k: v for k, v in ca.items() if not k.endswith(("_id", "vocab_size"))} == \
        {k: v for k, v in cb.items() if not k.endswith(("_id", "vocab_size"))}
    assert json.loads((a / "README.md").read_text())["built_by"] == "tools.tiny.build_tiny_model"
    tok = AutoTokenizer.from_pretrained(str(b))
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    ids = tok("Is 12 odd?", add_special_tokens=True)["input_ids"]
    assert len(ids) == len("Is 12 odd?") and tok.decode(ids) == "Is 12 odd?"
    cfg = json.loads((b / "tokenizer_config.json").read_text())
    assert cfg["add_bos_token"] is False and cfg["add_prefix_space"] is False
    tj = json.loads((b / "tokenizer.json").read_text())
    # what llama.cpp's converter needs to map it without a pre-tokenizer hash (LlamaHfVocab)
    assert tj["model"]["type"] == "BPE" and tj["model"]["byte_fallback"] and tj["decoder"]["type"] == "Sequence"


@needs_export
def test_convertible_model_exports_with_identical_tokens(ws, conv_model):
    """The GGUF of the demo's model family: llama.cpp splits every rendered chat (spaces, newlines,
    non-ASCII bytes, special tokens) into HF's ids, and its embedded template renders HF's text.
    The export also writes the GPU quantization script."""
    from tools.export import export_model
    r = export_model(model="models/tiny-llama-parity", output_dir="exports/t", formats=["f16"],
                     parity_prompts=TRICKY, max_new_tokens=2)
    f16 = r.parity.formats[0]
    assert f16.chat_template_identical and f16.end_of_turn_is_eog
    for row in f16.prompts:
        assert row.tokens_identical and row.template_identical, row
    assert r.ollama.format == "chatml" and r.ollama.exact
    out = ws.root / "exports" / "t"
    assert (out / "quantize_gpu.py").is_file() and r.gpu_quantization.script == "exports/t/quantize_gpu.py"
    assert r.gpu_quantization.model_dir == "models/tiny-llama-parity"
    assert r.summary.startswith("Exported models/tiny-llama-parity to 1 GGUF file(s) in exports/t (f16 ")
    assert len(r.summary) <= 300
    # The header reader the export uses (arrays skipped: gguf-py's reader takes ~10 s on a 150k
    # vocabulary) reads what gguf-py reads: every scalar key and every tensor's type.
    from tools.export_gguf import find_converter
    from tools.export_llama import _header
    gguf_py = str(find_converter().parent / "gguf-py")
    sys.path.insert(0, gguf_py)
    from gguf import GGUFReader, GGUFValueType
    (path,) = out.glob("*.gguf")
    meta, types = _header(str(path), gguf_py)
    reader = GGUFReader(str(path))
    scalars = {k: f.contents() for k, f in reader.fields.items()
               if not k.startswith("GGUF.") and f.types[0] != GGUFValueType.ARRAY}
    assert meta.keys() == scalars.keys() and len(meta) > 10
    assert all(meta[k] == pytest.approx(v) if isinstance(v, float) else meta[k] == v for k, v in scalars.items())
    assert dict(types) == dict(Counter(t.tensor_type.name for t in reader.tensors)) and types["F16"] > 0


@needs_export
def test_failure_half_way_leaves_no_partial_gguf(ws, conv_model, monkeypatch):
    """The f16 GGUF is written, then the quantizer fails: the whole temp folder goes."""
    from tools import export_gguf
    from tools.export import export_model

    def broken(src, dst, qtype):
        assert src.is_file() and src.suffix == ".gguf"  # the 16-bit source was really written
        dst.write_bytes(b"GGUF partial")
        raise UserError("llama_model_quantize to Q4_K_M returned 1.", field="formats", fix="-")
    monkeypatch.setattr(export_gguf, "quantize", broken)
    with pytest.raises(UserError, match="returned 1"):
        export_model(model="models/tiny-llama-parity", output_dir="exports/t", formats=["f16", "Q4_K_M"])
    assert not (ws.root / "exports" / "t").exists()
    assert [p for p in ws.root.rglob("*") if p.suffix == ".gguf" or ".tmp" in p.name] == []


# ----------------------------------------------------------------------------- GPU quantization
def _calibration_run(ws, model: Path) -> None:
    """A run that made `model`: merge_report.json -> adapter folder -> summary.json -> dataset."""
    (model / "merge_report.json").write_text(json.dumps({"adapter_dir": "runs/r1/output"}))
    (ws.root / "runs" / "r1" / "output").mkdir(parents=True)
    (ws.root / "runs" / "r1" / "output" / "summary.json").write_text(json.dumps({"dataset": "data/qa"}))
    (ws.root / "data" / "qa").mkdir(parents=True)
    rows = [{"prompt": [{"role": "user", "content": f"Is {i} even or odd?"}],
             "completion": [{"role": "assistant", "content": "odd" if i % 2 else "even"}]} for i in range(40)]
    (ws.root / "data" / "qa" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_gpu_quantization_script(ws, conv_model):
    """quantize_gpu.py names the model, the training data and one output folder per scheme; it is
    valid Python and --check runs it on this CPU up to the llm-compressor call: the training rows
    rendered with the training chat template, tokenized."""
    from tools.export_gpu import SCHEMES, plan
    _calibration_run(ws, conv_model)
    out = ws.root / "exports" / "t"
    g, text = plan(out, conv_model, "tiny", data=None, template_file="exports/t/chat_template.jinja")
    assert g.calibration is None  # data=None: the caller decides
    from tools.export_gpu import training_data
    data = training_data(conv_model, None)
    assert data == ws.root / "data" / "qa"
    g, text = plan(out, conv_model, "tiny", data=data, template_file="exports/t/chat_template.jinja")
    compile(text, "quantize_gpu.py", "exec")
    assert g.calibration == "data/qa" and g.model_dir == "models/tiny-llama-parity"
    assert g.commands["gptq"] == "python exports/t/quantize_gpu.py --scheme gptq"
    assert g.output_dirs == {"gptq": "exports/t/tiny-W4A16", "awq": "exports/t/tiny-W4A16_ASYM",
                             "fp8": "exports/t/tiny-FP8_DYNAMIC"}
    assert g.serve["gptq"].startswith("vllm serve exports/t/tiny-W4A16 --chat-template")
    assert "--quantization bitsandbytes" in g.bitsandbytes["vllm"] and "bitsandbytes-nf4" in g.bitsandbytes["tgi"]
    out.mkdir(parents=True)
    (out / "quantize_gpu.py").write_text(text)

    def check(*args):
        p = subprocess.run([sys.executable, str(out / "quantize_gpu.py"), "--check", *args],
                           capture_output=True, text=True, timeout=300)
        return p.returncode, p.stdout, p.stderr
    rc, stdout, err = check()
    assert rc == 0, err
    got = json.loads(stdout)
    assert got["scheme"] == "gptq" and got["modifier"] == "GPTQModifier" and got["llmcompressor_scheme"] == "W4A16"
    assert Path(got["model_dir"]) == conv_model.resolve()
    assert Path(got["calibration"]) == (ws.root / "data" / "qa").resolve()
    # every row, prompt + completion, rendered with the training template (specials included)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(conv_model))
    rows = [json.loads(x) for x in (ws.root / "data" / "qa" / "train.jsonl").read_text().splitlines()]
    want = sum(len(tok(tok.apply_chat_template(r["prompt"] + r["completion"], tokenize=False),
                       add_special_tokens=False)["input_ids"]) for r in rows)
    assert got["calibration_rows"] == 40 and got["calibration_tokens"] == want
    assert want > 40 * len("<|im_start|>user\nIs 10 even or odd?<|im_end|>") // 2  # chats, not bare answers
    assert Path(got["output_dir"]) == (out / "tiny-W4A16").resolve()
    rc, stdout, _ = check("--scheme", "awq", "--rows", "8")
    assert rc == 0 and json.loads(stdout)["modifier"] == "AWQModifier" and json.loads(stdout)["calibration_rows"] == 8
    rc, stdout, _ = check("--scheme", "fp8")
    assert rc == 0 and json.loads(stdout)["calibration_rows"] == 0  # FP8 dynamic: no calibration
    assert set(SCHEMES) == {"gptq", "awq", "fp8"}
    # Without training data the calibrated schemes ask for --dataset.
    _, text = plan(out, conv_model, "tiny", data=None, template_file="x")
    (out / "quantize_gpu.py").write_text(text)
    rc, _, err = check()
    assert rc != 0 and "pass --dataset" in err


def test_bitsandbytes_lines_load_the_model(ws, conv_model):
    """The bitsandbytes loading lines export_model writes run as written (bitsandbytes' CPU
    backend here; a GPU in use): 4-bit NF4 and 8-bit layers, and the model still generates."""
    pytest.importorskip("bitsandbytes")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from tools.export_gpu import plan
    g, _ = plan(ws.root / "exports" / "t", conv_model, "tiny", data=None, template_file="x")
    tok = AutoTokenizer.from_pretrained(str(conv_model))
    ids = tok("Is 12 even or odd?", return_tensors="pt")
    import os
    cwd = os.getcwd()
    os.chdir(ws.root)  # the lines name workspace-relative folders
    try:
        for key, layer in (("python_4bit", "Linear4bit"), ("python_8bit", "Linear8bitLt")):
            try:
                model = eval(g.bitsandbytes[key], {"AutoModelForCausalLM": AutoModelForCausalLM,  # noqa: S307
                                                   "BitsAndBytesConfig": BitsAndBytesConfig, "torch": torch})
            except (RuntimeError, ImportError, ValueError) as exc:  # no CPU backend in this build
                pytest.skip(f"bitsandbytes cannot load on this machine: {exc}")
            assert type(model.model.layers[0].self_attn.q_proj).__name__ == layer
            out = model.generate(**ids, max_new_tokens=3, do_sample=False)
            assert out.shape[1] == ids["input_ids"].shape[1] + 3
    finally:
        os.chdir(cwd)


# ----------------------------------------------------------------------------- the demo's stage
def test_export_missing_names_the_install_command(monkeypatch, tmp_path):
    import importlib.util

    from tools import export_setup
    monkeypatch.setenv("LLAMA_CPP_CONVERTER", str(tmp_path / "none" / "convert_hf_to_gguf.py"))
    if importlib.util.find_spec("llama_cpp") is not None:
        assert "python -m tools.export_setup" in export_setup.export_missing()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llama_cpp" else real(n, *a))
    why = export_setup.export_missing()
    assert "llama-cpp-python" in why and "pip install -e '.[export]' && python -m tools.export_setup" in why


def test_demo_skips_export_with_the_install_command(tmp_path, monkeypatch):
    """EXPORT=0: the demo's export stage says why and how to install, instead of failing."""
    from demo.__main__ import _export

    from tools import export_setup
    monkeypatch.setattr(export_setup, "export_missing", lambda: "the export extra is not installed; "
                                                                "install it with `pip install ...`")
    said: list[str] = []
    out = asyncio.run(_export(None, tmp_path, said.append))
    assert out == {"skipped": "the export extra is not installed; install it with `pip install ...`"}
    assert said == ["[export_model] skipped: the export extra is not installed; install it with `pip install ...`"]


@needs_export
def test_demo_export_stage_over_mcp(ws, conv_model, monkeypatch):
    """The demo's last stage through an MCP client (strict result contract): the merged model to
    f16 + Q4_K_M, proven on held-out questions; the text content leads with the summary (file
    sizes) and the next steps name push_to_hub on the export folder."""
    from mcp import Client

    from demo.__main__ import _export
    from server.app import create_server
    monkeypatch.setenv("LLM_FT_STRICT_RESULTS", "1")
    (ws.root / "data" / "parity").mkdir(parents=True)
    rows = [{"prompt": [{"role": "user", "content": f"Is {n} even or odd?"}],
             "completion": [{"role": "assistant", "content": "odd"}]} for n in (308085, 51, 77, 9)]
    (ws.root / "data" / "parity" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    said: list[str] = []

    async def main():
        async with Client(create_server()) as c:
            out = await _export(c, ws.root, said.append)
            res = await c.call_tool("export_model", {"model": "models/tiny-llama-parity",
                                                     "output_dir": "exports/again", "formats": ["q8_0"],
                                                     "parity": False})
            return out, res
    out, res = asyncio.run(main())
    assert out["gguf"] == "exports/tiny-llama-parity/tiny-llama-parity-Q4_K_M.gguf"
    assert (ws.root / out["gguf"]).is_file() and out["verdict"].startswith("PARITY")
    assert said[0].startswith("[export_model] Exported models/tiny-llama-parity to 2 GGUF file(s)")
    assert any("tiny-llama-parity-f16.gguf" in s and "MiB" in s for s in said)
    rep = json.loads((ws.root / "exports" / "tiny-llama-parity" / "export_report.json").read_text())
    assert [p["prompt"] for p in rep["parity"]["formats"][0]["prompts"]] == [
        f"Is {n} even or odd?" for n in (308085, 51, 77, 9)]  # the held-out questions
    # Over MCP: text = summary + key figures + next steps; structured = every field.
    assert not res.is_error, res.content[0].text
    text = res.content[0].text
    size = res.structured_content["files"][0]["size_mib"]
    assert text.startswith(f"Exported models/tiny-llama-parity to 1 GGUF file(s) in exports/again (q8_0 {size:g} MiB)")
    assert "parity not checked" in text
    steps = res.structured_content["next_steps"]
    assert steps[0].startswith("export_model(model='models/tiny-llama-parity', output_dir='exports/again'")
    assert "push_to_hub(folder='exports/again', repo_id='<you>/tiny-llama-parity')" in steps[-1]
