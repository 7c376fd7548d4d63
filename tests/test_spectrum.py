"""spectrum_scan: the selection equals an independent computation of the Spectrum SNR formula."""
from __future__ import annotations

import re

import numpy as np
import pytest
import yaml

from tools.errors import UserError
from tools.spectrum import snr_scores, spectrum_scan


def reference_scores(model_dir) -> dict[str, tuple[str, int, float]]:
    """name -> (type, layer, score), from the weights as transformers loads them, in numpy float64."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    out = {}
    for name, p in model.named_parameters():
        m = re.match(r"model\.layers\.(\d+)\.(.+)\.weight$", name)
        if not m or p.ndim != 2:
            continue
        W = p.detach().double().numpy()
        S = np.linalg.svd(W, compute_uv=False)
        sigma = (np.quantile(S, 0.75) - np.quantile(S, 0.25)) / 1.349
        n, k = W.shape
        thr = sigma * (1 + np.sqrt(min(n, k) / max(n, k)))
        signal, noise = S[S > thr].sum(), S[S <= thr].sum()
        snr = signal / (noise if (S <= thr).any() else 1.0)
        out[name[: -len(".weight")]] = (m.group(2), int(m.group(1)), snr / S[0])
    return out


def reference_selection(scores, top_percent) -> dict[str, list[int]]:
    by_type: dict[str, list[tuple[float, int]]] = {}
    for typ, layer, s in scores.values():
        by_type.setdefault(typ, []).append((s, layer))
    sel = {}
    for typ, items in by_type.items():
        k = max(1, int(len(items) * top_percent / 100))
        sel[typ] = [layer for s, layer in sorted(items, key=lambda x: (-x[0], x[1]))[:k]]
    return sel


@pytest.fixture
def five_layer_model(ws):
    from tools.tiny import build_tiny_model
    return build_tiny_model(ws.root / "models" / "tiny5", layers=5, seed=3)


@pytest.mark.parametrize("which, top", [("tiny", 30), ("five", 40), ("five", 100)])
def test_selection_equals_direct_formula(ws, tiny_model, five_layer_model, which, top):
    path = tiny_model if which == "tiny" else five_layer_model
    rel = str(path.relative_to(ws.root))
    res = spectrum_scan(rel, top_percent=top)
    ref = reference_scores(path)
    assert res.matrices_scanned == len(ref)
    # per-matrix scores agree with the float64 reference
    got = {f"model.layers.{layer}.{t.type}": s for t in res.types for layer, s in
           ((int(k), v) for k, v in t.snr.items())}
    assert set(got) == set(ref)
    for name, (_, _, s) in ref.items():
        assert got[name] == pytest.approx(s, rel=1e-4)
    # the selection per type is the reference selection (same order: best first)
    want = reference_selection(ref, top)
    assert {t.type: t.selected_layers for t in res.types} == want
    # the YAML: anchored regexes, embeddings + head first, one entry per selected matrix
    data = yaml.safe_load((ws.root / res.output_path).read_text())
    pats = data["unfrozen_parameters"]
    assert pats == res.unfrozen_parameters
    assert pats[:2] == ["^lm_head.weight$", "^model.embed_tokens.weight$"]
    expected = {f"^model.layers.{layer}.{typ}" for typ, layers in want.items() for layer in layers}
    assert set(pats[2:]) == expected and len(pats[2:]) == len(expected)
    # applied as tools.train applies it (freeze all, unfreeze re.match): exactly the selected weights
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    trained = {n for n, _ in model.named_parameters() if any(re.match(p, n) for p in pats)}
    assert trained == {f"{e[1:]}.weight" for e in expected} | {"lm_head.weight", "model.embed_tokens.weight"}
    assert res.trainable_params == sum(p.numel() for n, p in model.named_parameters() if n in trained)
    assert 0 < res.trainable_fraction <= 1


def test_deterministic_and_writes_scores(ws, tiny_model):
    a = spectrum_scan("models/tiny-llama", output_path="spec/a.yaml")
    b = spectrum_scan("models/tiny-llama", output_path="spec/b.yaml")
    assert (ws.root / "spec/a.yaml").read_text().replace("a.yaml", "") == (ws.root / "spec/b.yaml").read_text()
    assert a.types == b.types and a.unfrozen_parameters == b.unfrozen_parameters
    scores = yaml.safe_load((ws.root / a.snr_path).read_text())  # JSON is YAML
    assert len(scores["scores"]) == a.matrices_scanned == 14
    assert a.device == "cpu" and a.output_path == "spec/a.yaml"


def test_formula_on_a_known_spectrum():
    """S = [10, 5, 1 x 6] (8x8): IQR 1 -> sigma 0.7413, thr 1.4826; SNR = 15/6; score = 2.5/10."""
    import torch
    rng = np.random.default_rng(0)
    U, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    V, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    W = U @ np.diag([10, 5, 1, 1, 1, 1, 1, 1]) @ V.T
    got = snr_scores(torch.tensor(W[None], dtype=torch.float32))
    assert float(got[0]) == pytest.approx(0.25, rel=1e-4)
    # a flat spectrum has IQR 0, so every value is above the threshold and, with no noise values,
    # the noise sum is 1 (the original's convention): score = 8 x 1 / 1
    flat = snr_scores(torch.tensor((U @ V.T)[None], dtype=torch.float32))
    assert float(flat[0]) == pytest.approx(8.0, rel=1e-5)


def test_batched_scores_equal_one_by_one():
    """The GPU path stacks same-shape matrices: batching must not mix their spectra."""
    import torch
    g = torch.Generator().manual_seed(0)
    mats = torch.randn(3, 48, 96, generator=g) * torch.tensor([0.5, 1.0, 2.0])[:, None, None]
    mats[1, :, :4] += 3.0  # a few strong directions in one of them
    batched = snr_scores(mats)
    for i in range(3):
        assert float(batched[i]) == pytest.approx(float(snr_scores(mats[i:i + 1])[0]), rel=1e-5)
    assert len(set(round(float(x), 6) for x in batched)) == 3


def test_bad_inputs(ws, tiny_model):
    (ws.root / "empty").mkdir()
    with pytest.raises(UserError, match="safetensors"):
        spectrum_scan("empty")
    with pytest.raises(UserError, match="top_percent"):
        spectrum_scan("models/tiny-llama", top_percent=0)
    with pytest.raises(UserError, match="hf download"):
        spectrum_scan("some-org/not-downloaded-model")


def test_one_reader_for_the_spectrum_yaml(ws):
    """validate_recipe and python -m tools.train read a Spectrum YAML with the same function and
    say the same problem (issue 14: one home for each helper)."""
    from tools.recipes import validate_recipe
    from tools.spectrum import read_spectrum_patterns
    (ws.root / "spectrum").mkdir()
    bad = ws.root / "spectrum" / "bad.yaml"
    bad.write_text("unfrozen_parameters:\n- ^model.layers.(0\n")
    with pytest.raises(ValueError, match="not a valid regex") as ei:
        read_spectrum_patterns(bad)
    problem = str(ei.value).split(f"{bad} ", 1)[1]
    r = validate_recipe("model_name_or_path: Qwen2.5-0.5B\ndataset_name: Org/data\n"
                        "spectrum_config_path: spectrum/bad.yaml\n", gpu="H100")
    assert any(problem in e for e in r.errors), r.errors
    good = ws.root / "spectrum" / "good.yaml"
    good.write_text("unfrozen_parameters:\n- ^lm_head.weight$\n")
    assert read_spectrum_patterns(good) == ["^lm_head.weight$"]


def test_model_names_for_paths():
    from tools.naming import label_slug, model_slug
    assert model_slug("Qwen/Qwen2.5-0.5B-Instruct") == "qwen2.5-0.5b-instruct"
    assert model_slug("models/tiny-llama/") == "tiny-llama"
    assert model_slug("///") == "model"
    assert label_slug("my run/gsm8k") == "my-run-gsm8k"
    assert label_slug("x" * 100) == "x" * 60 and label_slug("%%") == "model"
