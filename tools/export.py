"""Ship the model: GGUF files (llama.cpp's converter and quantizer), an Ollama Modelfile, serving
commands for vLLM / SGLang / TGI / llama.cpp, and the parity proof that the GGUF behaves like the
Hugging Face model it came from.

Everything is written into a temporary sibling of output_dir and renamed at the end: a failed or
interrupted export leaves no partial GGUF behind.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from . import export_gguf as gg
from . import export_parity as par
from .errors import UserError
from .export_gpu import SCRIPT_NAME, GpuQuantization
from .export_templates import OllamaTemplate, modelfile, serving_commands, translate
from .progress import report
from .results import ToolResult
from .workspace import get_workspace, short

Format = Literal["f32", "f16", "bf16", "q8_0", "Q2_K", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_S",
                 "Q5_K_M", "Q6_K"]


class ExportedFile(BaseModel):
    format: str
    file: str
    size_mib: float
    made_by: str = Field(description="the llama.cpp tool and options that wrote it.")
    seconds: float


class ExportResult(ToolResult):
    """GGUF files, Modelfile and serving commands, with the parity evidence."""
    output_dir: str
    hf_model: str = Field(description="the Hugging Face folder exported (output_dir/hf when merged "
                                      "here; the base with merge=false).")
    merged_from_adapter: str | None = None
    merge_verified: bool | None = None
    lora_adapter: str | None = Field(default=None, description=(
        "merge=false: the adapter as a GGUF LoRA (convert_lora_to_gguf.py), applied on the base "
        "GGUF at load time (llama-server --lora, Ollama ADAPTER, Llama(lora_path=))."))
    architecture: str
    parameters: int | None
    converter: str = Field(description="convert_hf_to_gguf.py used, and its llama-cpp-python version.")
    files: list[ExportedFile]
    chat_template_file: str
    modelfile: str
    ollama: OllamaTemplate
    serving: dict[str, str] = Field(description="commands: vllm, sglang, tgi, llama_cpp, ollama, lm_eval.")
    gpu_quantization: GpuQuantization
    parity: par.ParityReport | None
    verdict: str = Field(description="one line: the parity verdict, or what was not checked.")
    notes: list[str] = []
    timings: dict[str, float] = {}
    elapsed_s: float

    def key_figures(self) -> dict:
        figs = {"output_dir": self.output_dir, "architecture": self.architecture,
                "parameters": self.parameters,
                "files": ", ".join(f"{f.file} ({f.size_mib} MiB)" for f in self.files)}
        if self.parity is not None:
            figs["parity_passed"] = self.parity.passed
        figs.update(ollama_template=self.ollama.format, gpu_script=self.gpu_quantization.script,
                    elapsed_s=self.elapsed_s)
        return {k: v for k, v in figs.items() if v is not None}


@dataclass
class _Source:
    field: str              # the argument naming the model (for errors)
    config_dir: Path        # where config.json (architecture, weights) is read
    tokenizer_dir: Path     # where the training chat template is
    hf_dir: Path | None     # the folder to convert (None until an adapter is merged)
    adapter: Path | None = None
    adapter_config: dict | None = None


# ----------------------------------------------------------------------------- checks
def _source(model: str | None, adapter: str | None, base_model: str | None) -> _Source:
    ws = get_workspace()
    if (model is None) == (adapter is None):
        raise UserError("give exactly one of model (a merged or full model) and adapter (a LoRA "
                        "adapter, merged first).", field="model",
                        fix="Pass model='models/<name>-merged', or adapter='runs/<id>/output'.")
    if model is not None:
        d = ws.resolve(model, field="model", must_exist=True, kind="dir")
        if not (d / "config.json").is_file():
            hint = " It is an adapter: pass it as adapter=." if (d / "adapter_config.json").is_file() else ""
            raise UserError(f"'{short(model)}' has no config.json.{hint}", field="model",
                            fix="Give the merged model folder (merge_adapter's output_dir) or a full model.")
        return _Source("model", d, d, d)
    a = ws.resolve(adapter, field="adapter", must_exist=True, kind="dir")
    cfg = a / "adapter_config.json"
    if not cfg.is_file():
        raise UserError(f"'{short(adapter)}' has no adapter_config.json.", field="adapter",
                        fix="Point adapter at the LoRA run's output_dir, or pass a merged model as model=.")
    from .merge import resolve_model_ref
    base = base_model or json.loads(cfg.read_text()).get("base_model_name_or_path") or ""
    base_id, local = resolve_model_ref(str(base), field="base_model")
    if not local:
        raise UserError(f"base model '{short(base)}' is a hub id; the export reads its config and "
                        "weights from a folder.", field="base_model",
                        fix="Download it into the workspace (hf download ORG/NAME --local-dir "
                            "models/NAME) and pass base_model='models/NAME'.")
    tok_dir = a if (a / "tokenizer_config.json").is_file() else Path(base_id)
    return _Source("adapter", Path(base_id), tok_dir, None, adapter=a,
                   adapter_config=json.loads(cfg.read_text()))


def _architecture(src: _Source, script: Path) -> str:
    try:
        cfg = json.loads((src.config_dir / "config.json").read_text())
    except ValueError as exc:
        raise UserError(f"config.json is not valid JSON ({exc}).", field=src.field,
                        fix="Re-save the model with save_pretrained.") from None
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else None
    table = gg.supported_architectures(script)
    if not arch or (table is not None and arch not in table):
        some = ", ".join(a for a in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                                     "MistralForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM")
                         if table is None or a in table)
        raise UserError(
            f"llama.cpp's converter does not support architecture {arch or '(none in config.json)'}"
            f" ({len(table or ())} are supported, e.g. {some}).", field=src.field,
            fix="Serve the Hugging Face folder with vLLM, SGLang or TGI instead (see "
                "references/export.md), or update llama-cpp-python and re-run "
                "`python -m tools.export_setup` if a newer llama.cpp supports it.")
    return arch


def _tokenizer(src: _Source):
    from transformers import AutoTokenizer
    try:
        with contextlib.redirect_stdout(sys.stderr):
            tok = AutoTokenizer.from_pretrained(str(src.tokenizer_dir))
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"the tokenizer in {get_workspace().rel(src.tokenizer_dir)} does not load "
                        f"({type(exc).__name__}: {short(exc)}).", field=src.field,
                        fix="Save the training tokenizer next to the model (tokenizer.save_pretrained).") from None
    _same_template_files(src)
    if not getattr(tok, "chat_template", None):
        raise UserError(f"the tokenizer in {get_workspace().rel(src.tokenizer_dir)} has no chat "
                        "template, so the GGUF, Ollama and the servers would not prompt the model "
                        "the way it was trained.", field=src.field,
                        fix="Save the template training used: tok.chat_template = <template>; "
                            "tok.save_pretrained(<model dir>) (merge_adapter copies it from the "
                            "adapter folder), then export again.")
    return tok


def _same_template_files(src: _Source) -> None:
    """transformers reads chat_template.jinja before tokenizer_config.json's chat_template;
    llama.cpp's converter embeds tokenizer_config.json's first. Both present and different: the
    GGUF would carry another template than training used."""
    jinja = src.tokenizer_dir / "chat_template.jinja"
    try:
        cfg = json.loads((src.tokenizer_dir / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return
    inline = cfg.get("chat_template")
    if jinja.is_file() and isinstance(inline, str) and inline != jinja.read_text(encoding="utf-8"):
        rel = get_workspace().rel(src.tokenizer_dir)
        raise UserError(f"{rel} has two different chat templates: chat_template.jinja (what "
                        "transformers, and so training, used) and chat_template in "
                        "tokenizer_config.json (what llama.cpp's converter would embed in the GGUF).",
                        field=src.field,
                        fix="Keep one: load the tokenizer and save it again (tokenizer.save_pretrained "
                            "writes chat_template.jinja only), or delete the stale copy.")


def _formats(formats: list[str]) -> list[str]:
    out = list(dict.fromkeys(formats))
    if not out:
        raise UserError("is empty.", field="formats", fix='Ask for at least one, e.g. ["f16", "Q4_K_M"].')
    return out


def _name(name: str | None, src: _Source) -> str:
    base = name or (src.adapter.parent.name if src.adapter and src.adapter.name == "output"
                    else (src.adapter or src.config_dir).name)
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.").lower()[:64]
    if not clean:
        raise UserError(f"'{short(name)}' has no letter or digit to name files with.", field="name",
                        fix="Use letters, digits, '-', '_' or '.'.")
    return clean


def _needs_llama(formats: list[str], parity: bool) -> None:
    if (parity or any(f in gg.QUANT_TYPES for f in formats)) and importlib.util.find_spec("llama_cpp") is None:
        raise UserError("llama-cpp-python is not installed (k-quants and the parity proof run on it).",
                        field="formats", fix=gg._FIX_INSTALL + " Or pass parity=false with 16-bit/q8_0 formats only.")


def _lora_checks(src: _Source, merge: bool, script: Path) -> Path | None:
    """merge=false: the adapter must be one llama.cpp can apply as a GGUF LoRA; returns
    convert_lora_to_gguf.py."""
    if merge:
        return None
    if src.adapter is None:
        raise UserError("merge=false keeps a LoRA adapter separate from its base, but model= is "
                        "already a full model.", field="merge",
                        fix="Pass adapter='runs/<id>/output' (with base_model) or drop merge=false.")
    why = gg.lora_refusals(src.adapter_config or {})
    if why:
        raise UserError(f"'{get_workspace().rel(src.adapter)}' cannot become a GGUF LoRA: "
                        + "; ".join(why) + ".", field="merge",
                        fix="Pass merge=true (the default): the merged model carries all of it.")
    return gg.find_lora_converter(script)


# ----------------------------------------------------------------------------- steps
@dataclass
class _Job:
    """What the checks settled, for the steps that write the export."""
    src: _Source
    out: Path
    name: str
    formats: list[str]
    arch: str
    script: Path
    tok: object
    params: int | None
    lora_script: Path | None        # set: merge=false (base GGUF + GGUF LoRA)
    base_model: str | None
    parity: bool
    prompts: list[str]
    max_new_tokens: int
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class _Built:
    """What the steps wrote (paths inside the temp folder until it is renamed)."""
    hf_dir: Path                    # the folder converted (for parity and the Modelfile)
    final_hf: Path                  # where it is for the user (output_dir/hf, the base, the model)
    merged_ok: bool | None
    files: list[ExportedFile]
    paths: dict[str, Path]
    lora: Path | None = None


def _merge(src: _Source, tmp: Path, base_model: str | None, notes: list[str]) -> tuple[Path, bool]:
    from .merge import merge_adapter
    ws = get_workspace()
    report(0, None, "merging the adapter into its base (merge_adapter)")
    r = merge_adapter(adapter_dir=ws.rel(src.adapter), output_dir=ws.rel(tmp / "hf"),
                      base_model=base_model or None)
    if not r.verified:
        notes.append("merge_adapter could not verify the merge (see hf/merge_report.json); the "
                     "GGUF is exported from it anyway: do not ship before checking it.")
    return tmp / "hf", r.verified


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt",
                    "added_tokens.json")


def _base_view(src: _Source, tmp: Path) -> Path:
    """merge=false: the base's weights and config (symlinks) with the training tokenizer (the
    adapter's copy, which carries the chat template training used): what the base GGUF is
    converted from. Removed before the export is renamed into place."""
    view = tmp / ".base-view"
    view.mkdir()
    own_tok = src.tokenizer_dir != src.config_dir
    for p in src.config_dir.iterdir():
        if p.is_file() and not (own_tok and p.name in _TOKENIZER_FILES):
            (view / p.name).symlink_to(p.resolve())
    if own_tok:
        for n in _TOKENIZER_FILES:
            if (src.tokenizer_dir / n).is_file():
                shutil.copy2(src.tokenizer_dir / n, view / n)
    return view


def _quant_source(formats: list[str], hf_dir: Path) -> tuple[str, bool]:
    """The 16-bit GGUF k-quants are made from: a requested one, else a temporary one in the
    model's own 16-bit type."""
    for f in ("bf16", "f16", "f32"):
        if f in formats:
            return f, False
    with contextlib.suppress(OSError, ValueError):
        cfg = json.loads((hf_dir / "config.json").read_text())
        if (cfg.get("torch_dtype") or cfg.get("dtype")) == "bfloat16":
            return "bf16", True
    return "f16", True


def _write_ggufs(script: Path, hf_dir: Path, tmp: Path, name: str, formats: list[str],
                 arch: str, field: str) -> tuple[list[ExportedFile], dict[str, Path]]:
    """Convert (f32/f16/bf16/q8_0) and quantize (k-quants); return the files in request order."""
    ws = get_workspace()
    done: dict[str, tuple[Path, str, float]] = {}
    quants = [f for f in formats if f in gg.QUANT_TYPES]
    src_type, temporary = _quant_source(formats, hf_dir) if quants else (None, False)
    to_convert = [f for f in formats if f in gg.CONVERTER_TYPES]
    if temporary:
        to_convert.append(src_type)
    steps = len(to_convert) + len(quants)
    for i, f in enumerate(to_convert):
        report(i, steps, f"convert_hf_to_gguf.py --outtype {f}")
        path = tmp / (f".quant-source-{f}.gguf" if temporary and f == src_type and f not in formats
                      else f"{name}-{f}.gguf")
        secs = gg.convert(script, hf_dir, path, f, model_field=field, arch=arch, name=name)
        done[f] = (path, f"convert_hf_to_gguf.py --outtype {f}", secs)
    for j, q in enumerate(quants):
        report(len(to_convert) + j, steps, f"llama_model_quantize {q}")
        path = tmp / f"{name}-{q}.gguf"
        secs = gg.quantize(done[src_type][0], path, q)
        done[q] = (path, f"llama_model_quantize {q} from {src_type}", secs)
    if temporary:
        done.pop(src_type)[0].unlink()
    files, paths = [], {}
    for f in formats:
        path, how, secs = done[f]
        paths[f] = path
        files.append(ExportedFile(format=f, file=path.name, size_mib=round(path.stat().st_size / 2**20, 2),
                                  made_by=how, seconds=round(secs, 2)))
    return files, paths


def _serve_first(paths: dict[str, Path]) -> str:
    """The format Ollama and llama-server get: the first k-quant asked for, else q8_0, else the
    first format (the usual size/quality pick for local serving)."""
    order = [f for f in paths if f in gg.QUANT_TYPES] + [f for f in paths if f == "q8_0"] + list(paths)
    return order[0]


def _write_lora(job: _Job, view: Path, tmp: Path) -> tuple[ExportedFile, Path]:
    """The adapter as a GGUF LoRA (f16: llama.cpp applies it on any base type)."""
    report(0, None, "convert_lora_to_gguf.py --outtype f16")
    path = tmp / f"{job.name}-lora-f16.gguf"
    secs = gg.convert_lora(job.lora_script, job.src.adapter, view, path, "f16", arch=job.arch)
    return ExportedFile(format="lora-f16", file=path.name, size_mib=round(path.stat().st_size / 2**20, 2),
                        made_by="convert_lora_to_gguf.py --outtype f16 --base <base>",
                        seconds=round(secs, 2)), path


def _modelfile_for(tok, b: _Built, tmp: Path, gguf_adds_bos: bool) -> OllamaTemplate:
    """Modelfile FROM the smallest requested quantization (Ollama's usual pick), ADAPTER (the
    GGUF LoRA, merge=false), TEMPLATE from the training template, stop = the trained
    end-of-turn."""
    tmpl = translate(tok, gguf_adds_bos=gguf_adds_bos)
    eot, _ = par.stop_ids(tok, b.hf_dir)
    stop = list(dict.fromkeys([s for s in [eot, *tmpl.stop] if s]))
    if not stop and tok.eos_token:
        stop = [tok.eos_token]
    gen, cfg = {}, {}
    with contextlib.suppress(OSError, ValueError):
        gen = json.loads((b.hf_dir / "generation_config.json").read_text())
    with contextlib.suppress(OSError, ValueError):
        cfg = json.loads((b.hf_dir / "config.json").read_text())
    num_ctx = min(int(cfg.get("max_position_embeddings") or 4096), 8192)
    text = modelfile(b.paths[_serve_first(b.paths)].name, tmpl, stop=stop, gen=gen, num_ctx=num_ctx,
                     adapter=b.lora.name if b.lora else None)
    (tmp / "Modelfile").write_text(text)
    return tmpl


def _parity(hf_dir: Path, tok, paths: dict[str, Path], script: Path, prompts: list[str],
            max_new_tokens: int, out: Path, *, adapter: Path | None = None,
            lora: Path | None = None, hf_label: str | None = None) -> par.ParityReport:
    """Each GGUF (with the GGUF LoRA `lora` applied, if given) against transformers (with the
    PEFT `adapter` applied, if given). hf_label: how to name hf_dir (a temp view's base)."""
    ws = get_workspace()
    t0 = time.time()
    eot, eos_ids = par.stop_ids(tok, hf_dir)
    report(0, len(paths) + 1, "parity: greedy reference with transformers (fp32, CPU)")
    refs = par.hf_reference(hf_dir, tok, prompts, max_new_tokens, eos_ids, adapter=adapter)
    eot_id = tok.convert_tokens_to_ids(eot) if eot else None
    gguf_py = script.parent / "gguf-py"
    formats = []
    for i, (f, path) in enumerate(paths.items()):
        report(i + 1, len(paths) + 1, f"parity: {f}{' + LoRA' if lora else ''} with llama.cpp")
        got = gg.run_llama("probe", par.probe_request(path, refs, eos_ids, max_new_tokens,
                                                      gguf_py if gguf_py.is_dir() else None, lora=lora))
        rows = [par.compare_prompt(r, g, tok, eos_ids) for r, g in zip(refs, got["prompts"])]
        label = f"{ws.rel(out / path.name)}" + (f" + {ws.rel(out / lora.name)}" if lora else "")
        formats.append(par.judge(f, label, got, rows, tok.chat_template, eot_id))
    return par.ParityReport(
        hf_model=(hf_label or ws.rel(hf_dir)) + (f" + {ws.rel(adapter)}" if adapter else ""), hf_dtype="fp32",
        prompts=len(prompts), max_new_tokens=max_new_tokens,
        end_of_turn=eot, end_of_turn_ids=eos_ids, formats=formats,
        passed=all(f.passed for f in formats), verdict=par.verdict_line(formats, len(prompts), eot),
        elapsed_s=round(time.time() - t0, 2))


def _adds_bos(script: Path, path: Path) -> bool:
    """tokenizer.ggml.add_bos_token of a written GGUF (read in the llama.cpp child, with the
    converter's own gguf-py)."""
    gguf_py = script.parent / "gguf-py"
    meta = gg.run_llama("meta", {"gguf": str(path), "gguf_py": str(gguf_py) if gguf_py.is_dir() else None})
    return bool(meta.get("tokenizer.ggml.add_bos_token"))


# ----------------------------------------------------------------------------- the tool
def export_model(
    output_dir: str,
    model: Annotated[str | None, Field(description="Merged or full model dir.")] = None,
    adapter: Annotated[str | None, Field(description="LoRA adapter dir, instead of model.")] = None,
    base_model: str | None = None,
    formats: Annotated[list[Format], Field(min_length=1, max_length=11)] = ["f16", "q8_0", "Q4_K_M"],  # noqa: B006
    merge: Annotated[bool, Field(description="With adapter: false = base GGUF + GGUF LoRA.")] = True,
    name: Annotated[str | None, Field(max_length=64)] = None,
    parity: Annotated[bool, Field(description="Prove each GGUF against HF (CPU).")] = True,
    parity_prompts: Annotated[list[str] | None, Field(max_length=16)] = None,
    max_new_tokens: Annotated[int, Field(ge=1, le=256)] = 24,
    overwrite: bool = False,
) -> ExportResult:
    """Export a fine-tuned model: GGUF for llama.cpp/Ollama with a parity proof, vLLM/SGLang/TGI
    commands, a GPU quantization script. After merge_adapter, or pass adapter.

    GGUF at f16/bf16/q8_0 comes from llama.cpp's convert_hf_to_gguf.py, k-quants (Q4_K_M...) from
    llama.cpp's quantizer on the 16-bit GGUF. Writes a Modelfile (FROM the smallest quant,
    TEMPLATE translated from the training template when it is ChatML, Llama 3 or Phi-3 shaped and
    proven equal on probe chats, stop = the trained end-of-turn), chat_template.jinja,
    SERVING.md, export_report.json and quantize_gpu.py (GPTQ/AWQ/FP8 with llm-compressor,
    calibrated on the training data; bitsandbytes loading lines in gpu_quantization).
    The parity proof loads each GGUF with llama-cpp-python on CPU and compares with transformers
    on sample prompts: identical tokens of the rendered chat, the embedded template renders the
    same prompt, greedy continuations identical (16-bit) or top-1 agreement (quantized), stop
    at the end-of-turn. On CPU a 1B model takes minutes; a 7B one, tens of minutes.

    Parameters:
    - output_dir: new or empty; everything is written to a temp sibling and renamed at the end
      (overwrite=true replaces a non-empty one).
    - model: a merged or full model folder (config.json, safetensors, tokenizer with the
      training chat template).
    - adapter: a LoRA/QLoRA adapter folder instead of model: merged first (merge_adapter) into
      output_dir/hf. base_model: the base model dir (default: adapter_config.json's).
    - formats: f32/f16/bf16/q8_0 (convert_hf_to_gguf.py); Q2_K..Q6_K (llama_model_quantize).
    - merge: with adapter, false converts the base to `formats` and the adapter to
      <name>-lora-f16.gguf (convert_lora_to_gguf.py), to apply at load time (llama-server
      --lora, Ollama ADAPTER); parity then runs base GGUF + LoRA against base + PEFT adapter.
      Refused for adapters llama.cpp cannot apply (modules_to_save, DoRA, rsLoRA, alpha_pattern).
    - name: file and Ollama model name (default: the model folder's).
    - parity: load each GGUF with llama-cpp-python on CPU and compare with transformers (fp32;
      needs ~4 bytes/parameter of RAM; false skips it, and the result says not to ship yet).
    - parity_prompts: user prompts for the proof (default: four generic ones; give a few from
      your task); max_new_tokens: greedy tokens compared per prompt.
    """
    t0 = time.time()
    job = _prepare(output_dir, model, adapter, base_model, formats, merge, name, parity,
                   parity_prompts, max_new_tokens, overwrite)
    with get_workspace().atomic_dir(output_dir, overwrite=overwrite) as tmp:
        result = _build(job, tmp, t0)
    return result


def _prepare(output_dir, model, adapter, base_model, formats, merge, name, parity, parity_prompts,
             max_new_tokens, overwrite) -> _Job:
    """Every check that can refuse the call, before anything is written."""
    ws = get_workspace()
    formats = _formats(list(formats))
    prompts = [p for p in (parity_prompts or par.DEFAULT_PROMPTS) if p.strip()] or par.DEFAULT_PROMPTS
    script = gg.find_converter()
    src = _source(model, adapter, base_model)
    out = ws.resolve(output_dir, field="output_dir")
    for p in {src.config_dir, src.tokenizer_dir, *(x for x in [src.adapter] if x)}:
        if out == p or out in p.parents:
            raise UserError(f"output_dir is or contains {ws.rel(p)}; writing there would replace it.",
                            field="output_dir", fix="Choose a new directory, e.g. exports/<name>.")
    ws.check_empty(out, output_dir, field="output_dir", overwrite=overwrite)
    arch = _architecture(src, script)
    lora_script = _lora_checks(src, merge, script)
    tok = _tokenizer(src)
    _needs_llama(formats, parity)
    params = gg.parameter_count(src.config_dir)
    if params:
        merged_copy = 4 * params if src.adapter and merge else 0
        gg.check_disk(out, gg.bytes_needed(params, formats, hf_copy_bytes=merged_copy))
        if parity:
            gg.check_parity_ram(params)
    return _Job(src=src, out=out, name=_name(name, src), formats=formats, arch=arch, script=script,
                tok=tok, params=params, lora_script=lora_script, base_model=base_model,
                parity=parity, prompts=prompts, max_new_tokens=max_new_tokens)


def _convert(job: _Job, tmp: Path) -> _Built:
    """The HF folder to convert (merged here, the base view, or the model), then the GGUFs."""
    src, view = job.src, None
    merged_ok = None
    if src.adapter is not None and job.lora_script is None:
        t = time.time()
        hf_dir, merged_ok = _merge(src, tmp, job.base_model, job.notes)
        job.timings["merge_s"] = round(time.time() - t, 2)
        job.tok = _tokenizer(_Source("adapter", hf_dir, hf_dir, hf_dir))
        final_hf = job.out / "hf"
    elif src.adapter is not None:
        hf_dir = view = _base_view(src, tmp)
        final_hf = src.config_dir
    else:
        hf_dir = final_hf = src.hf_dir
    t = time.time()
    files, paths = _write_ggufs(job.script, hf_dir, tmp, job.name, job.formats, job.arch, src.field)
    built = _Built(hf_dir=hf_dir, final_hf=final_hf, merged_ok=merged_ok, files=files, paths=paths)
    if view is not None:
        lora_file, built.lora = _write_lora(job, view, tmp)
        built.files.append(lora_file)
    job.timings["gguf_s"] = round(time.time() - t, 2)
    return built


def _build(job: _Job, tmp: Path, t0: float) -> ExportResult:
    """Write the export into tmp (renamed to output_dir by the caller's atomic_dir)."""
    from . import export_gpu
    ws = get_workspace()
    b = _convert(job, tmp)
    (tmp / "chat_template.jinja").write_text(job.tok.chat_template)
    tmpl = _modelfile_for(job.tok, b, tmp, _adds_bos(job.script, next(iter(b.paths.values()))))
    rel, keep_adapter = ws.rel(job.out), b.lora is not None
    adapter_rel = ws.rel(job.src.adapter) if keep_adapter else None
    serving = serving_commands(
        name=job.name, hf_dir=ws.rel(b.final_hf), gguf=f"{rel}/{b.paths[_serve_first(b.paths)].name}",
        template_file=f"{rel}/chat_template.jinja", output_dir=rel, adapter_dir=adapter_rel,
        lora_rank=int((job.src.adapter_config or {}).get("r") or 16),
        lora_gguf=f"{rel}/{b.lora.name}" if b.lora else None)
    gpu, script_text = export_gpu.plan(
        job.out, b.final_hf, job.name, template_file=f"{rel}/chat_template.jinja",
        data=export_gpu.training_data(b.hf_dir, job.src.adapter),
        adapter=job.src.adapter if keep_adapter else None)
    (tmp / SCRIPT_NAME).write_text(script_text)
    report_ = None
    if job.parity:
        t = time.time()
        report_ = _parity(b.hf_dir, job.tok, b.paths, job.script, job.prompts, job.max_new_tokens,
                          job.out, adapter=job.src.adapter if keep_adapter else None, lora=b.lora,
                          hf_label=ws.rel(b.final_hf))
        job.timings["parity_s"] = round(time.time() - t, 2)
    if keep_adapter:
        shutil.rmtree(b.hf_dir)  # the base view: symlinks, not part of the export
    result = _result(job, b, tmpl, serving, gpu, report_, t0)
    (tmp / "export_report.json").write_text(json.dumps(result.model_dump(), indent=2) + "\n")
    (tmp / "SERVING.md").write_text(_serving_md(result))
    return result


def _result(job: _Job, b: _Built, tmpl: OllamaTemplate, serving: dict[str, str],
            gpu: GpuQuantization, report_: par.ParityReport | None, t0: float) -> ExportResult:
    ws = get_workspace()
    if not tmpl.exact:
        job.notes.append(tmpl.reason or "chat template not translated for Ollama")
    if report_ is None:
        verdict = "parity not checked (parity=false): run export_model again with parity=true before shipping"
    else:
        verdict = report_.verdict
    rel = ws.rel(job.out)
    script = job.script
    r = ExportResult(
        output_dir=rel, hf_model=ws.rel(b.final_hf),
        merged_from_adapter=ws.rel(job.src.adapter) if job.src.adapter and not b.lora else None,
        merge_verified=b.merged_ok, lora_adapter=f"{rel}/{b.lora.name}" if b.lora else None,
        architecture=job.arch, parameters=job.params,
        converter=f"{ws.rel(script) if script.is_relative_to(ws.root) else script} "
                  f"(llama-cpp-python {gg.converter_version(script) or 'unknown version'})",
        files=[f.model_copy(update={"file": f"{rel}/{f.file}"}) for f in b.files],
        chat_template_file=f"{rel}/chat_template.jinja", modelfile=f"{rel}/Modelfile", ollama=tmpl,
        serving=serving, gpu_quantization=gpu, parity=report_, verdict=verdict, notes=job.notes,
        timings=job.timings, elapsed_s=round(time.time() - t0, 2))
    return r.model_copy(update={"summary": _summary(r), "next_steps": _next_steps(r, job)})


def _summary(r: ExportResult) -> str:
    """One or two sentences: what was written, and whether the proof holds."""
    what = ", ".join(f"{f.format} {f.size_mib:g} MiB" for f in r.files)
    head = f"Exported {r.hf_model} to {len(r.files)} GGUF file(s) in {r.output_dir} ({what})"
    if r.parity is None:
        tail = "parity not checked (parity=false): do not ship before proving it."
    else:
        per = "; ".join(f"{f.format} greedy identical {f.greedy_identical}/{len(f.prompts)}"
                        if f.format in par.EXACT_TYPES else f"{f.format} top-1 agreement {f.agreement:.0%}"
                        for f in r.parity.formats)
        tail = (f"parity OK on {r.parity.prompts} prompts ({per})." if r.parity.passed
                else f"PARITY FAILED ({per}): do not ship; see parity.formats[].why.")
    text = f"{head}; {tail}"
    if len(text) > 300:  # many formats or long paths: the counts, not the sizes
        text = f"Exported {len(r.files)} GGUF file(s) to {r.output_dir}; {tail}"
    return text[:300]


def _next_steps(r: ExportResult, job: _Job) -> list[str]:
    steps = []
    if r.parity is not None and not r.parity.passed:
        steps.append("Do not ship: read parity.formats[].why, then export the model you evaluated.")
    elif r.parity is None:
        steps.append(f"export_model({'model' if not job.src.adapter else 'adapter'}="
                     f"'{get_workspace().rel(job.src.adapter or job.src.config_dir)}', output_dir="
                     f"'{r.output_dir}', overwrite=true) to prove parity before shipping")
    if "ollama" in r.serving:
        steps.append(f"run locally: {r.serving['ollama']}")
    steps.append(f"evaluate(base_url='http://localhost:8080/v1', served_model='{job.name}', ...) "
                 f"after `{r.serving.get('llama_cpp', '')}`, and compare with the HF model's scores")
    steps.append(f"push_to_hub(folder='{r.output_dir}', repo_id='<you>/{job.name}') "
                 "(a dry run: shows the model card)")
    return steps


def _serving_md(r: ExportResult) -> str:
    lines = [f"# Serving {r.output_dir}", "", f"Parity: {r.verdict}", ""]
    for k, v in r.serving.items():
        lines += [f"## {k}", "", "```bash", v, "```", ""]
    g = r.gpu_quantization
    lines += ["## GPU quantization (llm-compressor; needs a CUDA GPU)", "", "```bash",
              *g.commands.values(), "```", "", "Then serve the quantized folder:", "", "```bash",
              *g.serve.values(), "```", "", "bitsandbytes at load time (no calibration):", "",
              "```python", "import torch",
              "from transformers import AutoModelForCausalLM, BitsAndBytesConfig",
              f"model = {g.bitsandbytes['python_4bit']}", "```", ""]
    return "\n".join(lines)
