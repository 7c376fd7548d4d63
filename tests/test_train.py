"""tools.train: recipe parsing, method inference, Spectrum freezing, run-file bookkeeping and
early failures. Real training runs (every method, SIGTERM stop + resume, 2 processes, ZeRO-3)
go through the MCP tools in tests/test_runs.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml


def _dataset(root: Path, rows: int = 40) -> Path:
    d = root / "data" / "arith"
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "train.jsonl", "w") as f:
        for i in range(rows):
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"What is {i}+{i}?"}],
                                "completion": [{"role": "assistant", "content": str(2 * i)}]}) + "\n")
    return d


def _recipe(ws_root: Path, name: str, **over) -> Path:
    cfg = dict(model_name_or_path="models/tiny-llama", dataset_name="data/arith",
               output_dir=f"out/{name}", max_steps=4, per_device_train_batch_size=2, max_length=64,
               use_cpu=True, bf16=False, report_to="none", save_steps=2, logging_steps=1,
               learning_rate=1e-3, seed=0)
    cfg.update(over)
    p = ws_root / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def test_infer_method():
    from tools.train import infer_method
    assert infer_method({}) == "full"
    assert infer_method({"use_peft": True}) == "lora"
    assert infer_method({"use_peft": True, "load_in_4bit": True}) == "qlora"
    assert infer_method({"spectrum_config_path": "s.yaml"}) == "spectrum"


def test_parse_recipe_pops_spectrum_key_and_rejects_unknown(tmp_path):
    from tools.train import parse_recipe
    spec = tmp_path / "spectrum.yaml"
    spec.write_text("unfrozen_parameters:\n- ^lm_head\n")
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(dict(model_name_or_path="m", dataset_name="d", output_dir="o",
                                     use_cpu=True, bf16=False, report_to="none",
                                     spectrum_config_path=str(spec), max_length=77)))
    script, targs, margs, dargs, extras, raw = parse_recipe(str(r), ["--max_steps", "3"])
    assert extras == {"spectrum_config_path": str(spec)}
    assert targs.max_length == 77 and targs.max_steps == 3  # CLI overrides the YAML
    assert margs.model_name_or_path == "m" and script.dataset_name == "d"
    r.write_text(yaml.safe_dump(dict(model_name_or_path="m", output_dir="o", use_cpu=True, bf16=False,
                                     max_seq_length=64)))
    with pytest.raises(ValueError, match="max_seq_length"):
        parse_recipe(str(r))


def test_spectrum_freezes_all_but_matches(tiny_model_cache, tmp_path):
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM

    from tools.train import apply_spectrum, read_spectrum_patterns
    spec = tmp_path / "s.yaml"
    spec.write_text("unfrozen_parameters:\n- ^lm_head.weight$\n- ^model.layers.1.mlp.down_proj\n")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_cache)
    n_train, n_total, names = apply_spectrum(model, read_spectrum_patterns(spec))
    assert sorted(names) == ["lm_head.weight", "model.layers.1.mlp.down_proj.weight"]
    assert n_train == sum(p.numel() for p in model.parameters() if p.requires_grad) < n_total
    spec.write_text("unfrozen_parameters:\n- ^transformer.h.0\n")
    with pytest.raises(ValueError, match="no parameter name matches"):
        apply_spectrum(model, read_spectrum_patterns(spec))
    spec.write_text("something_else: 1\n")
    with pytest.raises(ValueError, match="unfrozen_parameters"):
        read_spectrum_patterns(spec)


def test_reset_run_files_keeps_metrics_up_to_the_checkpoint(tmp_path):
    from tools.train import _reset_run_files
    m = tmp_path / "metrics.jsonl"
    recs = [{"step": s, "loss": 1.0} for s in range(1, 7)] + [{"step": 6, "final": True}]
    m.write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "summary.json").write_text("{}")
    _reset_run_files(tmp_path, str(tmp_path / "checkpoint-4"))
    assert [json.loads(x)["step"] for x in m.read_text().splitlines()] == [1, 2, 3, 4]
    assert not (tmp_path / "summary.json").exists()
    _reset_run_files(tmp_path, None)
    assert not m.exists()


def test_conflicting_methods_fail_clearly(ws, tiny_model, monkeypatch):
    from tools.train import train
    monkeypatch.chdir(ws.root)  # recipe paths are relative to the workspace, as in launched runs
    _dataset(ws.root)
    r = _recipe(ws.root, "bad4bit", load_in_4bit=True)
    with pytest.raises(ValueError, match="needs use_peft"):
        train(str(r))
    assert json.loads((ws.root / "out/bad4bit/summary.json").read_text())["status"] == "failed"


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file
    return {k: v.float() for k, v in load_file(str(path)).items()}


@pytest.mark.slow
def test_bf16_full_fine_tune_keeps_fp32_master_weights(ws, tiny_model, monkeypatch):
    """A full fine-tune that loads bf16 weights at lr 1e-5: without fp32 master weights AdamW's
    updates round away in bf16 and most weights never change. The run must change >= 90% of the
    trained weights, and its update must be within 2x of the same run in fp32."""
    from tools.train import train
    monkeypatch.chdir(ws.root)
    _dataset(ws.root)
    before = _weights(tiny_model / "model.safetensors")
    common = dict(learning_rate=1e-5, max_steps=6, save_steps=100, lr_scheduler_type="constant",
                  warmup_steps=0, max_grad_norm=0.0)
    s16 = train(str(_recipe(ws.root, "bf16", dtype="bfloat16", **common)))
    s32 = train(str(_recipe(ws.root, "fp32", dtype="float32", **common)))
    assert s16["fp32_master_params"] == s16["trainable_params"] > 0
    after16 = _weights(ws.root / "out/bf16/model.safetensors")
    after32 = _weights(ws.root / "out/fp32/model.safetensors")
    start16 = {k: v.to(__import__("torch").bfloat16).float() for k, v in before.items()}
    changed = sum(int((after16[k] != start16[k]).sum()) for k in before)
    total = sum(v.numel() for v in before.values())
    assert changed / total >= 0.9, f"only {changed / total:.1%} of the weights changed"
    norm16 = sum(float(((after16[k] - start16[k]) ** 2).sum()) for k in before) ** 0.5
    norm32 = sum(float(((after32[k] - before[k]) ** 2).sum()) for k in before) ** 0.5
    assert 0.5 <= norm16 / norm32 <= 2.0, (norm16, norm32)


@pytest.mark.slow
def test_flash_attention_and_liger_fall_back_where_they_cannot_run(ws, tiny_model, monkeypatch):
    """A recipe written for a described GPU (flash-attention 2, liger) run on a machine without
    them trains with sdpa and without liger, and says so, instead of crashing at load."""
    from tools.train import train
    monkeypatch.chdir(ws.root)
    _dataset(ws.root)
    s = train(str(_recipe(ws.root, "fa2", attn_implementation="flash_attention_2", use_liger_kernel=True,
                          max_steps=1)))
    assert s["status"] == "completed"
    text = " ".join(s["fallbacks"])
    assert "flash_attention_2" in text and "using sdpa" in text and "without liger" in text
    cfg = json.loads((ws.root / "out/fa2/config.json").read_text())
    assert cfg.get("_attn_implementation", cfg.get("attn_implementation", "sdpa")) != "flash_attention_2"


def test_end_distributed_destroys_the_process_group():
    """tools.train ends a distributed run by destroying its process group (left to interpreter
    teardown, a rank could abort with SIGABRT after a completed run)."""
    import torch.distributed as dist
    from tools.train import end_distributed
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    assert dist.is_initialized()
    end_distributed()
    assert not dist.is_initialized()
    end_distributed()  # and nothing to do without one
