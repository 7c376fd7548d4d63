"""Spectrum layer selection (method of cognitivecomputations/spectrum), headless and model-free.

Per weight matrix W (n x m) of the decoder layers, with singular values S (descending):
    sigma = IQR(S) / 1.349                      (robust noise scale; torch.quantile, linear)
    beta  = min(n, m) / max(n, m)
    thr   = sigma * (1 + sqrt(beta))            (Marchenko-Pastur bulk edge)
    SNR   = sum(S[S > thr]) / sum(S[S <= thr])  (noise sum 1 when no value is below thr)
    score = SNR / S[0]
Matrices are grouped by module type (`self_attn.q_proj`, `mlp.down_proj`, ...: the name after the
layer index); the top p% of each type (at least one) is unfrozen, plus the input embedding and the
LM head, as the original writes them. Weights are read one tensor at a time with
safetensors.safe_open (no model is built), in float32, batched per shape on the GPU when present.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

from pydantic import BaseModel, Field

from .errors import UserError
from .results import ToolResult
from .naming import model_slug
from .workspace import check_path_text, get_workspace, short

FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
GPU_BATCH_BYTES = 2 * 2 ** 30


class SpectrumType(BaseModel):
    """One module type: its layers' scores and the ones selected."""
    type: str
    num_layers: int
    num_selected: int
    selected_layers: list[int] = Field(description="layer indices unfrozen, best score first.")
    snr: dict[str, float] = Field(description="layer index -> score (SNR / largest singular value), best first.")


class SpectrumResult(ToolResult):
    """The Spectrum YAML written, with the per-type selection behind it."""
    model: str
    top_percent: float
    output_path: str = Field(description="Spectrum YAML (unfrozen_parameters) for spectrum_config_path.")
    snr_path: str = Field(description="every matrix's score, JSON, to reselect without rescanning.")
    device: str
    matrices_scanned: int
    seconds: float
    unfrozen_parameters: list[str]
    types: list[SpectrumType]
    trainable_params: int = Field(description="parameters the selection unfreezes (incl. embeddings/head).")
    total_params: int
    trainable_fraction: float
    skipped: list[str] = []
    notes: list[str] = []


def spectrum_patterns(path: Path) -> tuple[Optional[list[str]], Optional[str]]:
    """The `unfrozen_parameters` regexes of a Spectrum YAML, or (None, what is wrong with it)."""
    import yaml
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except Exception as exc:  # noqa: BLE001 - said to the caller
        return None, f"cannot be read as YAML: {exc}"
    pats = data.get("unfrozen_parameters") if isinstance(data, dict) else None
    if not isinstance(pats, list) or not pats or not all(isinstance(p, str) for p in pats):
        return None, "has no 'unfrozen_parameters:' list of regexes (write it with spectrum_scan)."
    for p in pats:
        try:
            re.compile(p)
        except re.error as exc:
            return None, f"has pattern {p!r}, which is not a valid regex: {exc}"
    return pats, None


def read_spectrum_patterns(path: str | os.PathLike) -> list[str]:
    """The `unfrozen_parameters` regexes of a Spectrum YAML (tools.train); FileNotFoundError or
    ValueError saying what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"spectrum_config_path: {p} does not exist (paths are taken from the cwd, "
                                "the workspace root for runs started by launch_training).")
    pats, problem = spectrum_patterns(p)
    if problem:
        raise ValueError(f"spectrum_config_path: {p} {problem}")
    return pats


def _weights(model: str) -> tuple[list[Path], str]:
    """The safetensors files of a local model dir (or a hub model already in the local cache)."""
    ws = get_workspace()
    check_path_text(model, "model")
    p = Path(model)
    local = p if p.is_absolute() else ws.root / p
    if local.exists():
        path = ws.resolve(model, field="model", must_exist=True, kind="dir")
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise UserError(f"'{model}' has no *.safetensors weights.", field="model",
                            fix="Point at a model directory saved with save_pretrained (safetensors).")
        return files, ws.rel(path)
    from .models import CATALOG, catalog_lookup
    name = catalog_lookup(model)
    repo = model if "/" in model else (CATALOG[name][0] if name else model)
    try:
        from huggingface_hub import snapshot_download
        d = Path(snapshot_download(repo, allow_patterns=["*.safetensors", "*.json"], local_files_only=True))
        files = sorted(d.glob("*.safetensors"))
        if files:
            return files, repo
    except Exception:  # noqa: BLE001 - not cached
        pass
    raise UserError(f"no local weights for '{model}' (not a workspace directory, not in the hub cache).",
                    field="model",
                    fix=f"Download it first, e.g. `hf download {repo} --include '*.safetensors' '*.json' "
                        f"--local-dir models/{model_slug(repo)}`, then pass models/{model_slug(repo)}.")


def _layer_split(name: str) -> Optional[tuple[str, int, str]]:
    """'model.layers.3.self_attn.q_proj.weight' -> ('model.layers', 3, 'self_attn.q_proj')."""
    if not name.endswith(".weight"):
        return None
    parts = name[: -len(".weight")].split(".")
    idx = next((i for i, part in enumerate(parts) if part.isdigit()), -1)
    if idx <= 0 or idx == len(parts) - 1:
        return None
    return ".".join(parts[:idx]), int(parts[idx]), ".".join(parts[idx + 1:])


def snr_scores(mats, device: str = "cpu"):
    """Spectrum score of each matrix in a (B, n, m) float tensor (see the module docstring)."""
    import torch
    S = torch.linalg.svdvals(mats.to(device=device, dtype=torch.float32))
    q75 = torch.quantile(S, 0.75, dim=-1)
    q25 = torch.quantile(S, 0.25, dim=-1)
    sigma = (q75 - q25) / 1.349
    n, m = mats.shape[-2:]
    beta = min(n, m) / max(n, m)
    thr = sigma * (1 + math.sqrt(beta))
    signal_mask = S > thr[:, None]
    signal = (S * signal_mask).sum(-1)
    noise = torch.where((~signal_mask).any(-1), (S * ~signal_mask).sum(-1), torch.ones_like(signal))
    snr = torch.where(noise != 0, signal / noise, torch.full_like(signal, float("inf")))
    return (snr / S[:, 0]).cpu()


def spectrum_scan(
    model: Annotated[str, Field(description="Model dir with *.safetensors (or a cached hub id).")],
    top_percent: Annotated[float, Field(gt=0, le=100)] = 30,
    output_path: Optional[str] = None,
) -> SpectrumResult:
    """Spectrum layer selection for method spectrum: rank each module type's layers by SNR and
    write the YAML generate_recipe's spectrum_config takes.

    Each decoder weight matrix's signal-to-noise ratio: singular values above the
    Marchenko-Pastur threshold vs below, over the largest. Keeps the top_percent of layers per
    module type (q_proj, k_proj, ..., down_proj) and writes `unfrozen_parameters:` regexes, plus
    embeddings and LM head. Reads the safetensors tensor by tensor (no model load), on the GPU when
    present; a 7-8B model takes seconds on a GPU, minutes on CPU. Returns the per-type scores and
    selection, and the trainable share of parameters.

    Parameters:
    - model: a model directory in the workspace with *.safetensors, or a hub id already in the
      local cache.
    - top_percent: share of each module type's layers to unfreeze, by SNR (the paper: 25-50).
    - output_path: where to write the YAML (default recipes/spectrum/<model>_top<p>.yaml)."""
    import torch

    if not isinstance(top_percent, (int, float)) or not 0 < top_percent <= 100:
        raise UserError(f"must be in (0, 100] (got {top_percent!r}).", field="top_percent",
                        fix="Use e.g. 30 (the Spectrum paper's 25-50% range).")
    ws = get_workspace()
    files, shown = _weights(model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    scan = _scan(files, device)
    if not scan.scores:
        raise UserError(f"no decoder weight matrices found in '{model}'.", field="model",
                        fix="Spectrum needs a transformer checkpoint with per-layer linear weights.")
    types, selected = _select(scan, top_percent)
    lines, unfrozen = _yaml_lines(shown, top_percent, scan.extra, selected)
    notes = []
    if not any("lm_head" in n for n in scan.extra):
        notes.append("no lm_head.weight in the checkpoint (tied embeddings): unfreezing embed_tokens also "
                     "trains the output layer.")
    total = sum(scan.numel.values())
    trainable = sum(scan.numel[n] for n in scan.extra) + \
        sum(scan.numel[n] for _, names in selected for n in names)

    out = ws.resolve(output_path or f"recipes/spectrum/{model_slug(shown)}_top{top_percent:g}.yaml",
                     field="output_path")
    snr_out = out.with_name(out.stem + ".snr.json")
    ws.write_text(out, "\n".join(lines) + "\n", field="output_path")
    ws.write_text(snr_out, json.dumps({"model": shown, "top_percent": top_percent, "scores": scan.scores},
                                      indent=1, sort_keys=True) + "\n", field="output_path")
    res = SpectrumResult(
        model=shown, top_percent=top_percent, output_path=ws.rel(out), snr_path=ws.rel(snr_out), device=device,
        matrices_scanned=len(scan.scores), seconds=round(time.perf_counter() - t0, 3),
        unfrozen_parameters=unfrozen, types=types, trainable_params=trainable, total_params=total,
        trainable_fraction=round(trainable / total, 6) if total else 0.0, skipped=scan.skipped[:50],
        notes=notes)
    chosen = sum(t.num_selected for t in types)
    res.summary = (f"Spectrum kept {chosen} of {len(scan.scores)} matrices (top {top_percent:g}% per type) of "
                   f"{short(shown, 60)}: {res.trainable_fraction:.1%} of the parameters train; wrote "
                   f"{short(res.output_path, 80)}.")
    res.next_steps = [f"generate_recipe(model='{model}', dataset='<converted dataset dir>', method='spectrum', "
                      f"spectrum_config='{res.output_path}')"]
    return res


@dataclass
class _Scan:
    """What one pass over the safetensors found."""
    scores: dict[str, dict] = field(default_factory=dict)  # matrix name -> {"snr": ...}
    numel: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)          # embeddings / head, in checkpoint order
    prefixes: dict[str, int] = field(default_factory=dict)  # layer prefix -> matrices under it


def _scan(files: list, device: str) -> _Scan:
    """SNR of every 2-D float decoder matrix, tensor by tensor (batched by shape on a GPU)."""
    import torch
    from safetensors import safe_open

    from .progress import report
    scan = _Scan()
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            cands = _candidates(st, scan)
            for shape, names in cands.items():
                per = 4 * shape[0] * shape[1]
                step = max(1, GPU_BATCH_BYTES // per) if device == "cuda" else 1
                for i in range(0, len(names), step):
                    chunk = names[i:i + step]
                    mats = torch.stack([st.get_tensor(n).to(torch.float32) for n in chunk])
                    for n, v in zip(chunk, snr_scores(mats, device).tolist()):
                        scan.scores[n] = {"snr": v}
                    del mats
                    report(len(scan.scores), None, f"{len(scan.scores)} matrices scanned ({f.name})")
    return scan


def _candidates(st, scan: _Scan) -> dict[tuple, list[str]]:
    """The scannable matrices of one file, grouped by shape; the rest noted in `scan`."""
    cands: dict[tuple, list[str]] = {}
    for name in st.keys():
        sl = st.get_slice(name)
        shape, dt = tuple(sl.get_shape()), sl.get_dtype()
        scan.numel[name] = math.prod(shape) if shape else 1
        split = _layer_split(name)
        if split is None:
            if len(shape) == 2 and re.search(r"(embed_tokens|lm_head|wte|embed_in|embed_out)\.weight$", name):
                scan.extra.append(name)
            continue
        if len(shape) != 2:
            if len(shape) > 2:
                scan.skipped.append(f"{name}: {len(shape)}-D (fused experts) not scanned")
            continue
        if dt not in FLOAT_DTYPES:
            scan.skipped.append(f"{name}: dtype {dt} (quantized) not scanned")
            continue
        scan.prefixes[split[0]] = scan.prefixes.get(split[0], 0) + 1
        cands.setdefault(shape, []).append(name)
    return cands


def _select(scan: _Scan, top_percent: float):
    """Per module type, the top_percent of layers by SNR (NaN last, ties by layer index)."""
    main_prefix = max(scan.prefixes, key=scan.prefixes.get)
    by_type: dict[str, list[tuple[int, str, float]]] = {}
    for n, d in scan.scores.items():
        prefix, layer, suffix = _layer_split(n)
        typ = suffix if prefix == main_prefix else f"{prefix}:{suffix}"
        d.update(type=typ, layer=layer)
        by_type.setdefault(typ, []).append((layer, n, d["snr"]))

    def key(item):
        s = item[2]
        return (-(s if s == s else -math.inf), item[0])

    types: list[SpectrumType] = []
    selected: list[tuple[str, list[str]]] = []
    for typ in sorted(by_type):
        items = sorted(by_type[typ], key=key)
        k = max(1, int(len(items) * top_percent / 100))
        chosen = items[:k]
        types.append(SpectrumType(type=typ, num_layers=len(items), num_selected=k,
                                  selected_layers=[i[0] for i in chosen],
                                  snr={str(i[0]): round(i[2], 8) for i in items}))
        selected.append((typ, [i[1] for i in chosen]))
        for i in chosen:
            scan.scores[i[1]]["selected"] = True
    return types, selected


def _yaml_lines(shown: str, top_percent: float, extra: list[str],
                selected: list[tuple[str, list[str]]]) -> tuple[list[str], list[str]]:
    """The Spectrum YAML (commented) and its unfrozen_parameters patterns."""
    patterns = [f"^{n}$" for n in extra]
    lines = [f"# Spectrum selection for {shown}: top {top_percent:g}% of the layers of each module type by",
             "# signal-to-noise ratio, written by spectrum_scan (tools/spectrum.py). Score = sum of singular",
             "# values above the Marchenko-Pastur threshold / sum of those below / largest singular value.",
             "# Training freezes every parameter, then unfreezes the names that re.match a pattern.",
             "unfrozen_parameters:"]
    lines += [f"- {p}" for p in patterns]
    unfrozen = list(patterns)
    for typ, names in selected:
        lines.append(f"# {typ} layers")
        for n in names:
            pat = "^" + n[: -len(".weight")]
            lines.append(f"- {pat}")
            unfrozen.append(pat)
    return lines, unfrozen


def main(argv: list[str] | None = None) -> int:
    """`python -m tools.spectrum MODEL [--top-percent P] [--output PATH]` (for long CPU scans)."""
    import argparse
    ap = argparse.ArgumentParser(prog="python -m tools.spectrum", description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--top-percent", type=float, default=30)
    ap.add_argument("--output", default=None)
    args = ap.parse_args(argv)
    res = spectrum_scan(args.model, args.top_percent, args.output)
    print(json.dumps({k: v for k, v in res.model_dump().items() if k != "types"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
