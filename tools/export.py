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
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from . import export_gguf as gg
from . import export_parity as par
from .errors import UserError
from .export_templates import OllamaTemplate, modelfile, serving_commands, translate
from .progress import report
from .workspace import get_workspace, short

Format = Literal["f32", "f16", "bf16", "q8_0", "Q2_K", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_S",
                 "Q5_K_M", "Q6_K"]
_WEIGHTS = ("*.safetensors", "pytorch_model*.bin")


class ExportedFile(BaseModel):
    format: str
    file: str
    size_mib: float
    made_by: str = Field(description="the llama.cpp tool and options that wrote it.")
    seconds: float


class ExportResult(BaseModel):
    """GGUF files, Modelfile and serving commands, with the parity evidence."""
    output_dir: str
    hf_model: str = Field(description="the Hugging Face folder exported (output_dir/hf when merged here).")
    merged_from_adapter: str | None = None
    merge_verified: bool | None = None
    architecture: str
    parameters: int | None
    converter: str = Field(description="convert_hf_to_gguf.py used, and its llama-cpp-python version.")
    files: list[ExportedFile]
    chat_template_file: str
    modelfile: str
    ollama: OllamaTemplate
    serving: dict[str, str] = Field(description="commands: vllm, sglang, tgi, llama_cpp, ollama, lm_eval.")
    parity: par.ParityReport | None
    verdict: str = Field(description="one line: the parity verdict, or what was not checked.")
    notes: list[str] = []
    next_steps: list[str] = []
    timings: dict[str, float] = {}
    elapsed_s: float


@dataclass
class _Source:
    field: str              # the argument naming the model (for errors)
    config_dir: Path        # where config.json (architecture, weights) is read
    tokenizer_dir: Path     # where the training chat template is
    hf_dir: Path | None     # the folder to convert (None until an adapter is merged)
    adapter: Path | None = None


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
    return _Source("adapter", Path(base_id), tok_dir, None, adapter=a)


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


# ----------------------------------------------------------------------------- steps
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


def _modelfile_for(tok, hf_dir: Path, paths: dict[str, Path], tmp: Path,
                   gguf_adds_bos: bool) -> tuple[OllamaTemplate, str]:
    """Modelfile FROM the smallest requested quantization (Ollama's usual pick), TEMPLATE from
    the training template, stop = the trained end-of-turn."""
    tmpl = translate(tok, gguf_adds_bos=gguf_adds_bos)
    eot, _ = par.stop_ids(tok, hf_dir)
    stop = list(dict.fromkeys([s for s in [eot, *tmpl.stop] if s]))
    if not stop and tok.eos_token:
        stop = [tok.eos_token]
    gen, cfg = {}, {}
    with contextlib.suppress(OSError, ValueError):
        gen = json.loads((hf_dir / "generation_config.json").read_text())
    with contextlib.suppress(OSError, ValueError):
        cfg = json.loads((hf_dir / "config.json").read_text())
    num_ctx = min(int(cfg.get("max_position_embeddings") or 4096), 8192)
    text = modelfile(paths[_serve_first(paths)].name, tmpl, stop=stop, gen=gen, num_ctx=num_ctx)
    (tmp / "Modelfile").write_text(text)
    return tmpl, text


def _parity(hf_dir: Path, tok, paths: dict[str, Path], script: Path, prompts: list[str],
            max_new_tokens: int, out: Path) -> par.ParityReport:
    ws = get_workspace()
    t0 = time.time()
    eot, eos_ids = par.stop_ids(tok, hf_dir)
    report(0, len(paths) + 1, "parity: greedy reference with transformers (fp32, CPU)")
    refs = par.hf_reference(hf_dir, tok, prompts, max_new_tokens, eos_ids)
    eot_id = tok.convert_tokens_to_ids(eot) if eot else None
    gguf_py = script.parent / "gguf-py"
    formats = []
    for i, (f, path) in enumerate(paths.items()):
        report(i + 1, len(paths) + 1, f"parity: {f} with llama.cpp")
        got = gg.run_llama("probe", par.probe_request(path, refs, eos_ids, max_new_tokens,
                                                      gguf_py if gguf_py.is_dir() else None))
        rows = [par.compare_prompt(r, g, tok, eos_ids) for r, g in zip(refs, got["prompts"])]
        formats.append(par.judge(f, ws.rel(out / path.name), got, rows, tok.chat_template, eot_id))
    return par.ParityReport(
        hf_model=ws.rel(hf_dir), hf_dtype="fp32", prompts=len(prompts), max_new_tokens=max_new_tokens,
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
    output_dir: Annotated[str, Field(description="New or empty directory for the GGUF files, "
                                                 "Modelfile, chat_template.jinja and export_report.json.")],
    model: Annotated[str | None, Field(description="Merged or full model directory (config.json, "
                                                   "safetensors, tokenizer with the training chat template).")] = None,
    adapter: Annotated[str | None, Field(description="A LoRA/QLoRA adapter directory instead of model: "
                                                     "merged first (merge_adapter) into output_dir/hf.")] = None,
    base_model: Annotated[str | None, Field(description="With adapter: the base model directory "
                                                        "(default: adapter_config.json's).")] = None,
    formats: Annotated[list[Format], Field(min_length=1, max_length=11, description=(
        "GGUF types. f32/f16/bf16/q8_0: llama.cpp's convert_hf_to_gguf.py; k-quants (Q4_K_M, "
        "Q5_K_M, Q6_K...): llama.cpp's quantizer on the 16-bit GGUF."))] = ["f16", "q8_0", "Q4_K_M"],  # noqa: B006
    name: Annotated[str | None, Field(max_length=64, description="Model name for the files and "
                                                                 "Ollama (default: the model folder's).")] = None,
    parity: Annotated[bool, Field(description="Prove each GGUF against the HF model with llama.cpp "
                                              "on CPU (tokens, embedded template, greedy, stop).")] = True,
    parity_prompts: Annotated[list[str] | None, Field(max_length=16, description=(
        "User prompts for the parity proof (default: four generic ones)."))] = None,
    max_new_tokens: Annotated[int, Field(ge=1, le=256, description="Greedy tokens compared per prompt.")] = 24,
    overwrite: Annotated[bool, Field(description="Replace a non-empty output_dir.")] = False,
) -> ExportResult:
    """Export a fine-tuned model for llama.cpp / Ollama / LM Studio (GGUF) and for vLLM, SGLang
    and TGI (serving commands with the training chat template), and prove the GGUF right.

    Call after merge_adapter (or pass adapter= to merge here). GGUF at f16/bf16/q8_0 comes from
    llama.cpp's convert_hf_to_gguf.py, k-quants from llama.cpp's quantizer. Writes a Modelfile
    (FROM the smallest quant, TEMPLATE translated from the training template when it is ChatML,
    Llama 3 or Phi-3 shaped and proven equal on probe chats, stop = the trained end-of-turn).
    The parity proof loads each GGUF with llama-cpp-python on CPU and compares with transformers
    on sample prompts: identical tokens of the rendered chat, the embedded template renders the
    same prompt, greedy continuations identical (16-bit) or top-1 agreement (quantized), stop
    at the end-of-turn. On CPU a 1B model takes minutes; a 7B one, tens of minutes.
    """
    t0 = time.time()
    ws = get_workspace()
    notes: list[str] = []
    timings: dict[str, float] = {}
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
    tok = _tokenizer(src)
    _needs_llama(formats, parity)
    params = gg.parameter_count(src.config_dir)
    if params:
        gg.check_disk(out, gg.bytes_needed(params, formats, hf_copy_bytes=4 * params if src.adapter else 0))
        if parity:
            gg.check_parity_ram(params)
    name_ = _name(name, src)
    merged_ok = None
    with ws.atomic_dir(output_dir, overwrite=overwrite) as tmp:
        if src.adapter is not None:
            t = time.time()
            hf_dir, merged_ok = _merge(src, tmp, base_model, notes)
            timings["merge_s"] = round(time.time() - t, 2)
            tok = _tokenizer(_Source("adapter", hf_dir, hf_dir, hf_dir))
        else:
            hf_dir = src.hf_dir
        t = time.time()
        files, paths = _write_ggufs(script, hf_dir, tmp, name_, formats, arch, src.field)
        timings["gguf_s"] = round(time.time() - t, 2)
        (tmp / "chat_template.jinja").write_text(tok.chat_template)
        tmpl, _ = _modelfile_for(tok, hf_dir, paths, tmp, _adds_bos(script, next(iter(paths.values()))))
        final_hf = out / "hf" if src.adapter is not None else hf_dir
        serving = serving_commands(name=name_, hf_dir=ws.rel(final_hf),
                                   gguf=f"{ws.rel(out)}/{paths[_serve_first(paths)].name}",
                                   template_file=ws.rel(out) + "/chat_template.jinja",
                                   output_dir=ws.rel(out))
        report_ = None
        if parity:
            t = time.time()
            report_ = _parity(hf_dir, tok, paths, script, prompts, max_new_tokens, out)
            timings["parity_s"] = round(time.time() - t, 2)
        result = _result(out, final_hf, src, merged_ok, arch, params, script, files, tmpl,
                         serving, report_, notes, timings, t0)
        (tmp / "export_report.json").write_text(json.dumps(result.model_dump(), indent=2) + "\n")
        (tmp / "SERVING.md").write_text(_serving_md(result))
    return result


def _result(out, final_hf, src, merged_ok, arch, params, script, files, tmpl, serving, report_,
            notes, timings, t0) -> ExportResult:
    ws = get_workspace()
    if not tmpl.exact:
        notes.append(tmpl.reason or "chat template not translated for Ollama")
    if report_ is None:
        verdict = "parity not checked (parity=false): run export_model again with parity=true before shipping"
    else:
        verdict = report_.verdict
    rel = ws.rel(out)
    nxt = [f"ollama: {serving['ollama']}" if "ollama" in serving else "",
           f"evaluate the served GGUF: {serving.get('llama_cpp', '')}, then evaluate(base_url="
           "'http://localhost:8080/v1', ...) and compare with the merged model's scores."]
    if report_ is not None and not report_.passed:
        nxt.insert(0, "Do not ship: parity failed (see parity.formats[].why).")
    return ExportResult(
        output_dir=rel, hf_model=ws.rel(final_hf),
        merged_from_adapter=ws.rel(src.adapter) if src.adapter else None, merge_verified=merged_ok,
        architecture=arch, parameters=params,
        converter=f"{ws.rel(script) if script.is_relative_to(ws.root) else script} "
                  f"(llama-cpp-python {gg.converter_version(script) or 'unknown version'})",
        files=[f.model_copy(update={"file": f"{rel}/{f.file}"}) for f in files],
        chat_template_file=f"{rel}/chat_template.jinja", modelfile=f"{rel}/Modelfile", ollama=tmpl,
        serving=serving, parity=report_, verdict=verdict, notes=notes,
        next_steps=[n for n in nxt if n], timings=timings, elapsed_s=round(time.time() - t0, 2))


def _serving_md(r: ExportResult) -> str:
    lines = [f"# Serving {r.output_dir}", "", f"Parity: {r.verdict}", ""]
    for k, v in r.serving.items():
        lines += [f"## {k}", "", "```bash", v, "```", ""]
    return "\n".join(lines)
