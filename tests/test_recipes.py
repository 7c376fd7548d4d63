"""generate_recipe / validate_recipe against the installed TRL; curated recipes and accelerate configs."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from tools.errors import UserError
from tools.recipes import generate_recipe, validate_recipe

REPO = Path(__file__).resolve().parent.parent
GUIDE = Path(__file__).resolve().parent / "fixtures" / "recipes" / "guide_qlora_trl012.yaml"
TEMPLATES = Path(__file__).resolve().parent / "fixtures" / "templates"


@pytest.fixture
def gpu_like(monkeypatch):
    """TrainingArguments checks bf16/tf32 against the local device; make this CPU box look like an
    Ampere GPU so GPU recipes parse unchanged (nothing else in the parse depends on the device)."""
    import transformers.training_args as ta
    monkeypatch.setattr(ta, "is_torch_bf16_gpu_available", lambda *a, **k: True)
    monkeypatch.setattr(ta, "is_torch_tf32_available", lambda *a, **k: True)
    monkeypatch.setattr(ta, "enable_tf32", lambda *a, **k: None)


def trl_parse(path: Path):
    """Exactly what `trl sft --config` runs (trl/scripts/sft.py make_parser), unknown keys rejected."""
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig, TrlParser
    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig))
    return parser.parse_args_and_config(args=["--config", str(path)])


def _dataset(ws, name="data/chat", rows=24, test=True) -> str:
    d = ws.root / name
    d.mkdir(parents=True)
    lines = [json.dumps({"prompt": [{"role": "user", "content": f"What is {i}+{i}?"}],
                         "completion": [{"role": "assistant", "content": str(2 * i)}]}) for i in range(rows)]
    (d / "train.jsonl").write_text("\n".join(lines[: rows - 4]) + "\n")
    if test:
        (d / "test.jsonl").write_text("\n".join(lines[rows - 4:]) + "\n")
    return name


# ----------------------------------------------------------------------------- the guide's recipe
def test_guide_recipe_migrates_and_validates(ws, gpu_like):
    shutil.copy(GUIDE, ws.root / "guide.yaml")
    (ws.root / "train_dataset.json").write_text(json.dumps({"messages": [
        {"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]}) + "\n")
    r = validate_recipe("guide.yaml", write_migrated="recipes/guide_migrated.yaml", gpu="L4")
    assert r.valid, r.errors
    assert r.trl_parse_ok and r.method == "qlora" and not r.unknown_keys
    changed = {c.key: c for c in r.changes}
    for old in ("max_seq_length", "torch_dtype", "use_liger", "warmup_ratio", "tokenizer_name_or_path",
                "dataset_id_or_path", "gradient_checkpointing", "gradient_checkpointing_kwargs", "lr_scheduler_type"):
        assert old in changed and changed[old].reason
    assert changed["warmup_ratio"].new == {"warmup_steps": 0.1}
    assert changed["tokenizer_name_or_path"].new == {"chat_template_path": "Meta-Llama/Meta-Llama-3.1-8B-Instruct"}
    assert changed["lr_scheduler_type"].new == "constant_with_warmup"
    # memory: the guide's 24 GB L4 run fits
    assert r.memory is not None and r.fits is True and r.memory.total_gib < 0.9 * 22.49
    assert any("push_to_hub" in w for w in r.warnings)
    # the written file is the migrated YAML, and `trl sft`'s own parser takes it
    out = ws.root / "recipes/guide_migrated.yaml"
    assert out.read_text() == r.migrated_yaml and r.migrated_path == "recipes/guide_migrated.yaml"
    script, sft, model, mix = trl_parse(out)
    assert sft.max_length == 1024 and sft.warmup_steps == 0.1 and sft.use_liger_kernel and sft.activation_checkpointing
    assert sft.chat_template_path == "Meta-Llama/Meta-Llama-3.1-8B-Instruct"
    assert model.dtype == "bfloat16" and model.load_in_4bit and model.use_peft
    assert model.lora_modules_to_save == ["lm_head", "embed_tokens"]
    assert mix.datasets[0].path == "json" and mix.datasets[0].data_files == "train_dataset.json"

    # the curated recipe is this migration plus the documented edits only
    migrated = yaml.safe_load(r.migrated_yaml)
    curated = yaml.safe_load((REPO / "recipes/llama-3.1-8b-qlora.yaml").read_text())
    edits = {"model_name_or_path": "meta-llama/Llama-3.1-8B", "chat_template_path": "meta-llama/Llama-3.1-8B-Instruct",
             "report_to": "none", "push_to_hub": False}
    expected = {**{k: v for k, v in migrated.items() if k != "hub_strategy"}, **edits}
    assert curated == expected


def test_guide_recipe_on_this_cpu_machine_is_valid_with_warnings(ws):
    shutil.copy(GUIDE, ws.root / "guide.yaml")
    (ws.root / "train_dataset.json").write_text("{}\n")
    r = validate_recipe("guide.yaml")
    assert r.valid and r.trl_parse_ok, r.errors
    joined = " ".join(r.warnings)
    assert "flash_attn" in joined and "liger_kernel" in joined
    assert r.fits is None  # no GPU size known here


def test_gpu_recipe_without_precision_keys_parses_on_cpu(ws):
    # TRL turns bf16 on by default; on this CPU box that must not fail the schema check
    r = validate_recipe("model_name_or_path: Qwen/Qwen2.5-0.5B\ndataset_name: org/ds\noutput_dir: o\n")
    assert r.valid and r.trl_parse_ok, r.errors
    assert any("no CUDA GPU" in w for w in r.warnings) and any("hub" in w for w in r.warnings)


def test_yaml_text_unknown_keys_and_missing_files(ws):
    text = "model_name_or_path: Qwen/Qwen2.5-0.5B\nlearning_rat: 1.0e-4\nlora_rank: 8\ndataset_name: data/none/x\n"
    r = validate_recipe(text)
    assert not r.valid and r.recipe_path is None
    sugg = {u.key: u.suggestions for u in r.unknown_keys}
    assert "learning_rate" in sugg["learning_rat"]
    assert "lora_r" in sugg["lora_rank"]
    assert any("data/none/x" in e for e in r.errors)


def test_bad_yaml_names_the_line(ws):
    with pytest.raises(UserError, match="line 2"):
        validate_recipe("a: 1\nb: c: d\n")
    with pytest.raises(UserError, match="mapping"):
        validate_recipe("- just\n- a list\n")
    with pytest.raises(UserError, match="does not exist"):
        validate_recipe("recipes/missing.yaml")


BASE = "model_name_or_path: models/tiny-llama\ndataset_name: data/chat\noutput_dir: out\n"


@pytest.mark.parametrize("extra, needle", [
    ("use_cpu: true\nbf16: false\nuse_liger_kernel: true\n", "falls back to no liger"),
    ("use_cpu: true\nbf16: false\nattn_implementation: flash_attention_2\n", "falls back to sdpa attention"),
])
def test_gpu_kernels_on_a_cpu_recipe_fall_back_with_a_warning(ws, tiny_model, extra, needle):
    _dataset(ws)
    text = f"model_name_or_path: models/tiny-llama\ndataset_name: data/chat\noutput_dir: o\n{extra}"
    r = validate_recipe(text)
    assert r.valid, r.errors
    assert any(needle in w for w in r.warnings), r.warnings


@pytest.mark.parametrize("extra, gpu, needle", [
    ("fp16: true\nbf16: true\n", "H100", "fp16 and bf16 are both true"),
    ("load_in_4bit: true\n", "H100", "without use_peft"),
    ("use_cpu: true\n", None, "bf16: false"),
    ("bf16: true\n", "T4", "no bf16"),
    ("bf16: false\nfp16: true\ntf32: true\n", "T4", "tf32"),
    ("use_peft: true\nlora_target_modules: [q_proj, lm_head]\n", "H100", "lm_head"),
    ("dtype: bfloat17\n", "H100", "bfloat17"),
    ("lr_scheduler_type: cosinee\n", "H100", "rejects"),
    ("packing: true\nmax_length: null\n", "H100", "packing with max_length null"),
    ("eval_strategy: steps\ndataset_test_split: validation\n", "H100", "no 'validation' split"),
    ("spectrum_config_path: spectrum/none.yaml\n", "H100", "run spectrum_scan first"),
    ("spectrum_config_path: spectrum/none.yaml\nuse_peft: true\n", "H100", "Spectrum trains"),
])
def test_contradictions_are_errors(ws, tiny_model, extra, gpu, needle):
    _dataset(ws)
    r = validate_recipe(BASE + extra, gpu=gpu)
    assert not r.valid
    assert any(needle in e for e in r.errors), r.errors


def test_assistant_only_loss_needs_generation_markers(ws, tiny_model):
    _dataset(ws)
    # the tiny model's ChatML template has no {% generation %} and TRL has no training variant for it
    r = validate_recipe(BASE + "use_cpu: true\nbf16: false\nassistant_only_loss: true\n")
    assert not r.valid and any("generation" in e for e in r.errors)
    # a template with the markers (TRL's qwen2_5 training template) is fine
    shutil.copy(TEMPLATES / "trl" / "qwen2_5_training.jinja", ws.root / "t.jinja")
    r = validate_recipe(BASE + "use_cpu: true\nbf16: false\nassistant_only_loss: true\nchat_template_path: t.jinja\n")
    assert r.valid, r.errors
    assert any("eos_token" in w for w in r.warnings)  # .jinja keeps the tokenizer's EOS
    # a template TRL knows (Qwen2.5's) gets swapped for its training variant: a note, not an error
    shutil.copy(TEMPLATES / "llama.cpp" / "Qwen-Qwen2.5-7B-Instruct.jinja", ws.root / "q.jinja")
    r = validate_recipe(BASE + "use_cpu: true\nbf16: false\nassistant_only_loss: true\n"
                               "chat_template_path: q.jinja\neos_token: <|im_end|>\n")
    assert r.valid, r.errors
    assert any("qwen2_5_training" in n for n in r.notes)


def test_memory_fit_is_an_error_when_over_the_gpu(ws):
    text = ("model_name_or_path: meta-llama/Llama-3.1-8B\ndataset_name: org/some-dataset\noutput_dir: o\n"
            "dtype: bfloat16\nbf16: true\nper_device_train_batch_size: 8\nmax_length: 4096\n"
            "activation_checkpointing: false\n")
    r = validate_recipe(text, gpu="RTX 4090")
    assert not r.valid and r.fits is False and any("exceeds" in e for e in r.errors)
    assert r.memory.method == "full" and r.memory.gpu_memory_gib == pytest.approx(23.99)


def test_accelerate_config_is_checked_with_the_recipe(ws, gpu_like):
    (ws.root / "acc.yaml").write_text((REPO / "recipes/accelerate/fsdp_qlora.yaml").read_text())
    text = ("model_name_or_path: Llama-3.1-70B\ndataset_name: org/ds\noutput_dir: o\ndtype: bfloat16\nbf16: true\n"
            "use_peft: true\nload_in_4bit: true\nlora_target_modules: all-linear\nper_device_train_batch_size: 1\n")
    r = validate_recipe(text, gpu="RTX A6000", accelerate_config="acc.yaml")
    assert not r.valid and any("bnb_4bit_quant_storage" in e for e in r.errors)
    assert r.accelerate.sharding == "fsdp" and r.accelerate.num_processes == 2
    r = validate_recipe(text + "bnb_4bit_quant_storage: bfloat16\n", gpu="RTX A6000", accelerate_config="acc.yaml")
    assert r.valid, r.errors
    assert r.memory.total_gib < 0.9 * 47.54 and r.fits
    # on 40 GB GPUs the whole 4-bit 70B model is loaded on each before FSDP shards it: the error
    # says so instead of suggesting a smaller batch or more GPUs, which cannot help
    r = validate_recipe(text + "bnb_4bit_quant_storage: bfloat16\n", gpu="A100 40GB", accelerate_config="acc.yaml")
    err = next(e for e in r.errors if e.startswith("memory:"))
    assert not r.valid and "while the model loads" in err and "whole 4-bit model" in err, r.errors
    assert "more GPUs" not in err


# ----------------------------------------------------------------------------- generate_recipe
def test_generate_on_this_cpu_machine(ws, tiny_model):
    ds = _dataset(ws)
    r = generate_recipe(str(tiny_model.relative_to(ws.root)), ds)
    path = ws.root / r.recipe_path
    assert path.is_file() and r.recipe_path == "recipes/tiny-llama-full.yaml"
    script, sft, model, _ = trl_parse(path)  # unmodified: a CPU recipe parses on this CPU machine
    assert sft.use_cpu and not sft.bf16 and not sft.fp16 and not sft.use_liger_kernel
    assert model.attn_implementation == "sdpa" and model.dtype == "float32" and not model.use_peft
    assert script.dataset_name == ds and script.dataset_test_split == "test" and str(sft.eval_strategy) != "no"
    assert sft.max_length == 512  # capped at the tiny model's context
    assert r.method == "full" and r.plan is not None and r.memory is not None
    assert r.launch_commands["train"] == f"python -m tools.train --config {r.recipe_path}"
    assert r.launch_commands["accelerate"].startswith(f"accelerate launch --config_file {r.accelerate_config_path}")
    assert "trl sft --config" in r.launch_commands["trl"]
    from accelerate.commands.config.config_args import load_config_from_file
    acc = load_config_from_file(str(ws.root / r.accelerate_config_path))
    assert acc.use_cpu and acc.num_processes == 1
    assert validate_recipe(r.recipe_path).valid


def test_generate_lora_with_chat_template_and_overrides(ws, tiny_model):
    ds = _dataset(ws, test=False)
    from tools.tiny import CHATML_TEMPLATE
    (ws.root / "chatml.jinja").write_text(CHATML_TEMPLATE)
    r = generate_recipe("models/tiny-llama", ds, method="lora", chat_template="chatml.jinja", epochs=1,
                        output_path="recipes/my.yaml", output_dir="runs-out/my",
                        overrides={"max_seq_length": 128, "lora_r": 8, "seed": None})
    cfg = yaml.safe_load((ws.root / "recipes/my.yaml").read_text())
    assert cfg["use_peft"] and cfg["lora_r"] == 8 and cfg["lora_alpha"] == 16
    assert cfg["lora_modules_to_save"] == ["lm_head", "embed_tokens"]
    assert cfg["chat_template_path"] == "chatml.jinja" and cfg["eos_token"] == "<|im_end|>"
    assert cfg["max_length"] == 128 and "seed" not in cfg and cfg["output_dir"] == "runs-out/my"
    assert cfg["lr_scheduler_type"] == "constant_with_warmup" and cfg["learning_rate"] == 2e-4
    assert "eval_strategy" not in cfg and "dataset_test_split" not in cfg
    assert any("max_seq_length" in n for n in r.notes)
    trl_parse(ws.root / "recipes/my.yaml")
    with pytest.raises(UserError, match="lora_rank"):
        generate_recipe("models/tiny-llama", ds, method="lora", overrides={"lora_rank": 8})
    with pytest.raises(UserError, match="would not train.*fp16 mixed precision needs a GPU"):
        generate_recipe("models/tiny-llama", ds, method="lora", overrides={"fp16": True})
    # liger on a CPU recipe: tools.train falls back to no liger, so a warning, not a refusal
    w = generate_recipe("models/tiny-llama", ds, method="lora", overrides={"use_liger_kernel": True},
                        output_path="recipes/liger.yaml")
    assert any("falls back to no liger" in x for x in w.warnings), w.warnings


def test_generated_recipe_trains_with_trl_sft(ws, tiny_model):
    """End to end: `trl sft --config <generated recipe>` trains the tiny model on CPU (2 steps)."""
    import os
    import subprocess
    import sys
    from tools.tiny import CHATML_TEMPLATE
    ds = _dataset(ws)
    (ws.root / "chatml.jinja").write_text(CHATML_TEMPLATE)
    r = generate_recipe("models/tiny-llama", ds, method="lora", chat_template="chatml.jinja")
    trl = Path(sys.executable).parent / "trl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    p = subprocess.run([str(trl), "sft", "--config", r.recipe_path, "--max_steps", "2", "--eval_strategy", "no",
                        "--save_strategy", "no"], cwd=ws.root, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = ws.root / "runs-out" / "tiny-llama-lora"
    assert (out / "adapter_model.safetensors").is_file()
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert set(adapter["modules_to_save"]) == {"lm_head", "embed_tokens"} and adapter["r"] == 16


def test_generate_spectrum_scans_automatically(ws, tiny_model):
    ds = _dataset(ws)
    r = generate_recipe("models/tiny-llama", ds, method="spectrum")
    assert r.method == "spectrum" and "trl" not in r.launch_commands
    assert any("Spectrum needs tools.train" in n for n in r.notes), r.notes
    assert r.spectrum_config_path and (ws.root / r.spectrum_config_path).is_file()
    cfg = yaml.safe_load((ws.root / r.recipe_path).read_text())
    assert cfg["spectrum_config_path"] == r.spectrum_config_path and cfg["learning_rate"] == 2e-5
    v = validate_recipe(r.recipe_path)
    assert v.valid and v.method == "spectrum", v.errors
    # trl sft itself rejects the Spectrum key; without it the recipe is a plain TRL recipe
    cfg.pop("spectrum_config_path")
    (ws.root / "plain.yaml").write_text(yaml.safe_dump(cfg))
    trl_parse(ws.root / "plain.yaml")


@pytest.mark.parametrize("method", ["qlora", "lora", "full", "spectrum"])
def test_each_method_writes_its_typed_defaults_with_their_reasons(ws, gpu_like, method):
    """One typed defaults object per method (tools.recipe_defaults): the recipe's values and the
    settings_explained lines both come from it, and every field documents its reason."""
    import dataclasses

    from tools.recipe_defaults import DEFAULTS, MethodDefaults
    d = DEFAULTS[method]
    for part in (d, d.lora, d.quantization):
        for f in dataclasses.fields(part) if part else []:
            if f.name not in ("method", "lora", "quantization"):
                assert len(MethodDefaults.help(f.name)) > 30, f.name
    if method == "spectrum":  # no weights to scan for a catalog model: a Spectrum YAML of our own
        (ws.root / "spectrum").mkdir()
        (ws.root / "spectrum" / "s.yaml").write_text("unfrozen_parameters:\n- ^lm_head.weight$\n")
    r = generate_recipe("Qwen2.5-0.5B", _dataset(ws), method=method, gpu="A100 80GB", dataset_rows=1000,
                        spectrum_config="spectrum/s.yaml" if method == "spectrum" else None)
    cfg = yaml.safe_load((ws.root / r.recipe_path).read_text())
    expected = {**d.optimizer_keys(), **(d.lora.keys() if d.lora else {}),
                **(d.quantization.keys() if d.quantization else {})}
    assert {k: cfg.get(k) for k in expected} == expected
    why = {**d.optimizer_why(), **(d.lora.why() if d.lora else {}), **(d.quantization.why() if d.quantization else {})}
    assert {k: r.settings_explained.get(k) for k in why} == why
    assert ("lora_r" in cfg) is (method in ("lora", "qlora")) and ("load_in_4bit" in cfg) is (method == "qlora")


@pytest.mark.parametrize("model, gpu, n, method, expect", [
    ("meta-llama/Llama-3.1-8B", "L4", None, "auto", dict(method="qlora", acc="single_gpu", bf16=True)),
    ("meta-llama/Llama-3.1-8B", "H100", 8, "auto", dict(method="full", acc="deepspeed_zero3", bf16=True)),
    ("Llama-3.1-70B", "RTX A6000", 2, "qlora", dict(method="qlora", acc="fsdp_qlora", bf16=True)),
    ("Qwen2.5-0.5B", "T4", None, "lora", dict(method="lora", acc="single_gpu", bf16=False)),
])
def test_generate_for_described_gpus(ws, gpu_like, model, gpu, n, method, expect):
    ds = _dataset(ws)
    r = generate_recipe(model, ds, method=method, gpu=gpu, num_gpus=n, dataset_rows=10_000)
    assert r.method == expect["method"] and r.fits is True
    cfg = yaml.safe_load((ws.root / r.recipe_path).read_text())
    acc_text = (ws.root / r.accelerate_config_path).read_text()
    assert f"from {expect['acc']}.yaml" in acc_text
    script, sft, mc, _ = trl_parse(ws.root / r.recipe_path)
    assert sft.bf16 is expect["bf16"] and sft.fp16 is (not expect["bf16"])
    assert not sft.use_cpu
    # flash-attention on every Ampere+ target, even though this machine has neither GPU nor package
    assert mc.attn_implementation == ("flash_attention_2" if expect["bf16"] else "sdpa")
    assert r.settings_explained["attn_implementation"]
    assert sft.dataloader_num_workers == 2 and sft.dataloader_pin_memory is True
    assert "/" in mc.model_name_or_path  # catalog names become hub ids
    if r.method == "qlora":
        assert mc.load_in_4bit and mc.use_peft and mc.bnb_4bit_quant_type == "nf4" and mc.use_bnb_nested_quant
        assert cfg["lr_scheduler_type"] == "constant_with_warmup" and cfg["max_grad_norm"] == 0.3
        assert mc.dtype == "bfloat16"
    if expect["acc"] == "fsdp_qlora":
        assert mc.bnb_4bit_quant_storage == "bfloat16"
    if r.method == "full":
        assert cfg["learning_rate"] == 1e-5 and cfg["lr_scheduler_type"] == "cosine"
    if not expect["bf16"]:
        assert mc.dtype == "float16"
    acc = validate_recipe(r.recipe_path, gpu=gpu, num_gpus=n, accelerate_config=r.accelerate_config_path)
    assert acc.valid, acc.errors
    assert acc.accelerate.num_processes == (n or 1)


# ----------------------------------------------------------------------------- curated files
CURATED = sorted((REPO / "recipes").glob("*.yaml"))


def test_curated_recipes_exist():
    names = {p.name for p in CURATED}
    assert {"llama-3.1-8b-qlora.yaml", "llama-3.1-8b-spectrum-30.yaml", "llama-3.1-8b-full-zero3.yaml",
            "qwen2.5-0.5b-lora.yaml"} <= names


@pytest.mark.parametrize("path", CURATED, ids=lambda p: p.name)
def test_curated_recipe_parses_with_trl(path, tmp_path, gpu_like):
    cfg = yaml.safe_load(path.read_text())
    if "spectrum_config_path" in cfg:  # only tools.train reads it; the file ships with the repo
        assert (REPO / cfg.pop("spectrum_config_path")).is_file()
        path = tmp_path / path.name
        path.write_text(yaml.safe_dump(cfg))
    script, sft, model, mix = trl_parse(path)
    assert model.model_name_or_path and sft.output_dir
    assert script.dataset_name or mix.datasets


ACCEL = sorted((REPO / "recipes" / "accelerate").glob("*.yaml"))
SHARDING = {"deepspeed_zero2": "zero2", "deepspeed_zero3": "zero3", "deepspeed_zero3_offload": "zero3",
            "fsdp2": "fsdp", "fsdp_qlora": "fsdp", "multi_node": "zero3"}


@pytest.mark.parametrize("path", ACCEL, ids=lambda p: p.name)
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file
    from tools.accelerate_config import read_accelerate_config
    raw = yaml.safe_load(path.read_text())
    for key in ("compute_environment", "distributed_type", "mixed_precision", "num_processes", "num_machines",
                "machine_rank", "use_cpu"):
        assert key in raw, key
    cfg = load_config_from_file(str(path))  # accelerate's own loader: rejects unknown top-level keys
    assert cfg.num_processes >= 1
    s = read_accelerate_config(path, path.name)
    if path.stem == "multi_node":  # a template: its node-0 address must be filled in first
        assert s.problems == ["main_process_ip is still the placeholder 'MAIN_NODE_IP': replace it "
                              "(references/distributed.md, multi-node) before launching."]
    else:
        assert s.problems == []  # nested deepspeed/fsdp keys are real `accelerate launch` options
    assert s.sharding == SHARDING.get(path.stem, "none")
    assert s.cpu_offload is (path.stem == "deepspeed_zero3_offload")
    if path.stem == "multi_node":
        assert raw["num_machines"] == 2 and raw["main_process_ip"] and raw["main_process_port"]


def test_a_multi_node_config_with_its_placeholder_is_invalid(ws, tmp_path):
    (ws.root / "mn.yaml").write_text((REPO / "recipes/accelerate/multi_node.yaml").read_text())
    text = "model_name_or_path: Llama-3.1-8B\ndataset_name: org/ds\noutput_dir: o\n"
    v = validate_recipe(text, accelerate_config="mn.yaml")
    assert not v.valid and any("MAIN_NODE_IP" in e for e in v.errors), v.errors
    filled = (ws.root / "mn.yaml").read_text().replace("MAIN_NODE_IP", "10.0.0.1")
    (ws.root / "mn.yaml").write_text(filled)
    assert not any("placeholder" in e for e in validate_recipe(text, accelerate_config="mn.yaml").errors)


def test_curated_accelerate_set_is_complete():
    assert {p.stem for p in ACCEL} >= {"single_gpu", "multi_gpu_ddp", "deepspeed_zero2", "deepspeed_zero3",
                                       "deepspeed_zero3_offload", "fsdp2", "fsdp_qlora", "multi_node"}


def test_server_registers_the_three_tools():
    import asyncio

    from mcp import Client
    from mcp.server.mcpserver import MCPServer

    from server import recipes as srv
    mcp = MCPServer("recipes-test")
    srv.register(mcp)

    async def listed():
        async with Client(mcp) as c:
            return {t.name: t.annotations for t in (await c.list_tools()).tools}
    seen = asyncio.run(listed())
    assert set(seen) == {"generate_recipe", "validate_recipe", "spectrum_scan"}
    assert all(a.read_only_hint is False for a in seen.values())


def test_8b_qlora_with_a_chat_template_fits_a_24gb_gpu(ws):
    """A new chat template makes QLoRA train lm_head and embed_tokens in full: the plan must count
    them when it picks the layout (it ignored them and the recipe was refused at 24.6 GiB)."""
    from tools.tiny import CHATML_TEMPLATE
    ds = _dataset(ws, rows=300, test=False)
    (ws.root / "chatml.jinja").write_text(CHATML_TEMPLATE)
    r = generate_recipe("Llama-3.1-8B", ds, method="qlora", gpu="RTX 4090", chat_template="chatml.jinja")
    cfg = yaml.safe_load((ws.root / r.recipe_path).read_text())
    assert cfg["lora_modules_to_save"] == ["lm_head", "embed_tokens"]
    assert r.fits is True and r.memory.total_gib <= 0.9 * 23.99
    assert r.memory.breakdown_gib["trainable_copies"] > 1.5  # two V x h copies in bf16
    assert r.plan is not None and r.plan.memory.total_gib == pytest.approx(r.memory.total_gib, rel=0.05)


def test_peft_under_ddp_skips_the_unused_parameter_search(ws, gpu_like):
    ds = _dataset(ws)
    r = generate_recipe("Llama-3.1-8B", ds, method="lora", gpu="A100 80GB", num_gpus=4, dataset_rows=10_000)
    cfg = yaml.safe_load((ws.root / r.recipe_path).read_text())
    assert "from multi_gpu_ddp.yaml" in (ws.root / r.accelerate_config_path).read_text()
    assert cfg["ddp_find_unused_parameters"] is False
    _, sft, _, _ = trl_parse(ws.root / r.recipe_path)
    assert sft.ddp_find_unused_parameters is False


def test_a_template_trl_ships_is_copied_and_set_as_chat_template_path(ws):
    from tools.chat_templates import shipped
    ds = _dataset(ws, rows=300, test=False)
    r = generate_recipe("Llama-3.1-8B", ds, method="qlora", gpu="RTX 4090",
                        chat_template="trl:llama3_training.jinja")
    cfg = yaml.safe_load((ws.root / r.recipe_path).read_text())
    assert cfg["chat_template_path"] == "chat_templates/llama3_training.jinja"
    assert (ws.root / cfg["chat_template_path"]).read_text() == \
        shipped()["llama3_training.jinja"].read_text()
    assert cfg["eos_token"] == "<|eot_id|>"  # read from the copied template


# ----------------------------------------------------------------------------- issue 10 (support tickets)
def _tickets(ws, rows=215) -> str:
    """Support-ticket chats of ~950 characters (~240 tokens at ~4 characters a token) each."""
    d = ws.root / "data" / "tickets"
    d.mkdir(parents=True)
    ask = "My order #{i} has not arrived and the tracking page shows no update since Monday. " * 4
    reply = ("Thanks for reaching out about order #{i}. I checked with the carrier and the parcel is at the "
             "regional depot; it will be delivered within two working days. ") * 4
    with (d / "train.jsonl").open("w") as fh:
        for i in range(rows):
            fh.write(json.dumps({"messages": [{"role": "user", "content": ask.format(i=i)},
                                              {"role": "assistant", "content": reply.format(i=i)}]}) + "\n")
    return "data/tickets"


@pytest.mark.parametrize("given, written", [
    ("Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct"), ("Qwen2.5-7B", "Qwen/Qwen2.5-7B"),
    ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct"), ("gemma-2-9b-it", "google/gemma-2-9b-it"),
    ("unsloth/Qwen2.5-7B-Instruct", "unsloth/Qwen2.5-7B-Instruct"),  # a full hub id is kept as given
])
def test_the_recipe_trains_the_variant_asked_for(ws, gpu_like, given, written):
    """'Qwen2.5-7B-Instruct' was written as Qwen/Qwen2.5-7B (the base model), and the full id came
    back with a false note that the hub had renamed it."""
    ds = _dataset(ws, rows=300, test=False)
    r = generate_recipe(given, ds, method="qlora", gpu="RTX 4090")
    assert yaml.safe_load((ws.root / r.recipe_path).read_text())["model_name_or_path"] == written
    assert not any("renamed" in n or "redirect" in n for n in r.notes + r.warnings)
    v = validate_recipe(r.recipe_path, gpu="RTX 4090")
    assert v.valid and not any("renamed" in n or "redirect" in n for n in v.notes), v.notes


def test_a_renamed_repository_is_said_by_validate_recipe(ws):
    v = validate_recipe("model_name_or_path: meta-llama/Meta-Llama-3.1-8B-Instruct\ndataset_name: org/ds\n"
                        "output_dir: o\n")
    assert any("renamed it 'meta-llama/Llama-3.1-8B-Instruct'" in n for n in v.notes), v.notes


def test_the_written_schedule_is_the_plans_and_counts_packed_blocks(ws, gpu_like):
    """215 rows, packed, at a global batch of 16 gave ~6 optimizer steps; recommend_method timed 1
    epoch while the recipe wrote 3. One rule now: rows -> tokens -> packed blocks -> global batch
    -> steps x epochs, adjusted for small data, the same in the plan and in the recipe."""
    ds = _tickets(ws)
    r = generate_recipe("Qwen2.5-7B-Instruct", ds, gpu="RTX 4090")
    cfg = yaml.safe_load((ws.root / r.recipe_path).read_text())
    s, plan = r.schedule, r.plan
    mb, ga = cfg["per_device_train_batch_size"], cfg["gradient_accumulation_steps"]
    assert cfg["num_train_epochs"] == s.epochs == plan.schedule.epochs
    assert mb * ga == s.global_batch == plan.global_batch_sequences
    text = sum(len(m["content"]) for line in (ws.root / ds / "train.jsonl").read_text().splitlines()
               for m in json.loads(line)["messages"])
    assert s.tokens_per_epoch == pytest.approx(text / 4 + 215 * 2 * 5, rel=0.02)  # ~4 characters a token
    blocks = math.ceil(s.tokens_per_epoch / cfg["max_length"])
    assert s.sequences_per_epoch == blocks
    assert s.optimizer_steps == math.ceil(s.epochs * math.ceil(math.ceil(blocks / mb) / ga))
    assert s.global_batch < 16 and s.epochs > 3 and s.optimizer_steps > 3 * math.ceil(blocks / 16)
    assert "Changed: global batch 16 ->" in r.settings_explained["gradient_accumulation_steps"]
    assert plan.total_tokens == s.tokens_per_epoch * s.epochs  # the time estimate is for this run
    # what an override leaves is counted and said
    o = generate_recipe("Qwen2.5-7B-Instruct", ds, gpu="RTX 4090", output_path="recipes/o.yaml",
                        overrides={"gradient_accumulation_steps": 16, "num_train_epochs": 1})
    assert o.schedule.global_batch == 16 * mb and o.schedule.optimizer_steps == math.ceil(math.ceil(blocks / mb) / 16)
    assert any(f"only {o.schedule.optimizer_steps} optimizer steps" in w for w in o.warnings), o.warnings
    # a measured token count replaces the estimate
    t = generate_recipe("Qwen2.5-7B-Instruct", ds, gpu="RTX 4090", output_path="recipes/t.yaml",
                        dataset_tokens=215 * 1024)
    assert t.schedule.sequences_per_epoch == 215


def test_tokens_per_epoch_are_counted_with_the_models_own_tokenizer(ws, tiny_model):
    """Characters per token depend on the vocabulary: the tiny model's byte-level tokenizer makes
    ~1 token a character, not the ~4 of Llama/Qwen BPE. With a local model its tokenizer measures
    the ratio on the rows, so the packed blocks and steps are the ones the run will take."""
    from transformers import AutoTokenizer
    d = ws.root / "data" / "short"
    d.mkdir(parents=True)
    rows = [{"messages": [{"role": "user", "content": f"Where is order #{i}? It was due on Monday."},
                          {"role": "assistant", "content": f"Order #{i} is at the depot: delivery in two days."}]}
            for i in range(300)]  # ~100 characters a row: far under the tiny model's 512 tokens
    (d / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    r = generate_recipe(str(tiny_model.relative_to(ws.root)), "data/short", output_path="recipes/bytes.yaml")
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    tokens = sum(len(tok(m["content"], add_special_tokens=False)["input_ids"]) for x in rows for m in x["messages"])
    assert r.schedule.tokens_per_epoch == pytest.approx(tokens + 300 * 2 * 5, rel=0.05)
    assert any("characters per token (measured with" in n for n in r.notes), r.notes


def test_spectrum_without_local_weights_names_a_method_that_needs_none(ws, gpu_like):
    """A 70B on 8x H100 plans Spectrum, which reads the weights first (spectrum_scan); without them
    the error said nothing of LoRA, which would not need them."""
    import re
    ds = _tickets(ws, rows=280)
    with pytest.raises(UserError) as e:
        generate_recipe("Llama-3.3-70B-Instruct", ds, gpu="H100", num_gpus=8)
    msg = str(e.value)
    assert e.value.field == "model" and "Spectrum reads the model's weights" in msg and "hf download" in msg
    other = re.search(r"method='(\w+)' \(fits", msg)
    assert other and other.group(1) != "spectrum", msg
    r = generate_recipe("Llama-3.3-70B-Instruct", ds, gpu="H100", num_gpus=8, method=other.group(1))
    assert r.fits is True and r.method == other.group(1)
    assert r.plan.smaller_model and r.plan.smaller_model.model == "Llama-3.1-8B-Instruct"
    assert r.warnings[0] == r.plan.smaller_model.why


# ----------------------------------------------------------------------------- over MCP, and plan=
def test_recipe_tools_say_what_happened_and_what_to_call_next(ws, tiny_model, monkeypatch):
    """Through an MCP client: each summary carries the result's figures, each next step names the
    right tool with the real path (issue 10 items 8-9)."""
    import asyncio

    from mcp import Client

    from server.app import create_server
    monkeypatch.setenv("LLM_FT_STRICT_RESULTS", "1")  # a missing or long summary fails the call
    ds = _dataset(ws)

    async def go():
        async with Client(create_server()) as c:
            g = await c.call_tool("generate_recipe", {"model": "models/tiny-llama", "dataset": ds, "method": "lora",
                                                      "output_path": "recipes/t.yaml", "seq_len": 64})
            assert not g.is_error, g.content[0].text
            got = g.structured_content
            steps = got["schedule"]["optimizer_steps"]
            assert got["summary"].startswith("Wrote recipes/t.yaml: lora on CPU") and f"{steps:,} optimizer steps" \
                in got["summary"] and got["summary"] in g.content[0].text
            assert got["next_steps"] == ["verify_masking(recipe='recipes/t.yaml')",
                                         "launch_training(recipe='recipes/t.yaml')"]
            v = await c.call_tool("validate_recipe", {"recipe": "recipes/t.yaml"})
            val = v.structured_content
            assert val["valid"] and val["summary"].startswith("Valid lora recipe for trl ")
            assert f"{val['memory']['total_gib']:.1f} GiB per GPU" in val["summary"]
            assert val["next_steps"][-1] == "launch_training(recipe='recipes/t.yaml')"
            bad = await c.call_tool("validate_recipe", {"recipe": "model_name_or_path: m\nfp16: true\nbf16: true\n"})
            assert bad.structured_content["summary"].startswith("Not valid: ")
            s = await c.call_tool("spectrum_scan", {"model": "models/tiny-llama", "top_percent": 50})
            sp = s.structured_content
            assert sp["output_path"] in sp["summary"] and f"{sp['trainable_fraction']:.1%}" in sp["summary"]
            assert sp["next_steps"] == [f"generate_recipe(model='models/tiny-llama', dataset='<converted dataset "
                                        f"dir>', method='spectrum', spectrum_config='{sp['output_path']}')"]
    asyncio.run(go())


def test_generate_from_the_plan_recommend_method_gave(ws, gpu_like):
    """generate_recipe(plan=...) writes the plan's layout: one source for each setting, and an
    argument that contradicts the plan is refused."""
    from tools.recommend import recommend_method
    ds = _dataset(ws, rows=1000)
    plan = recommend_method("Qwen2.5-0.5B", gpu="A100 80GB", num_gpus=2, dataset_rows=996, seq_len=512).wire()
    r = generate_recipe("Qwen2.5-0.5B", ds, plan=plan)
    cfg = yaml.safe_load((ws.root / r.recipe_path).read_text())
    assert r.method == plan["method"] and r.target.startswith("2x A100 80GB")
    assert cfg["max_length"] == 512 and cfg["per_device_train_batch_size"] == plan["micro_batch"]
    assert cfg["gradient_accumulation_steps"] == plan["gradient_accumulation_steps"]
    assert cfg["num_train_epochs"] == plan["schedule"]["epochs"]
    assert r.plan.model_dump(mode="json") == {k: v for k, v in plan.items()}
    for bad, needle in (({"seq_len": 1024}, "seq_len=1024"), ({"method": "qlora"}, "method='qlora'"),
                        ({"num_gpus": 4}, "num_gpus=4"), ({"epochs": 7.0}, "epochs=7.0")):
        with pytest.raises(UserError, match=needle) as ei:
            generate_recipe("Qwen2.5-0.5B", ds, plan=plan, **bad)
        assert ei.value.field == "plan"
    with pytest.raises(UserError, match="is for Qwen2.5-0.5B, not Llama-3.1-8B"):
        generate_recipe("Llama-3.1-8B", ds, plan=plan)
    with pytest.raises(UserError, match="not a recommend_method result: micro_batch"):
        generate_recipe("Qwen2.5-0.5B", ds, plan={**plan, "micro_batch": "many"})
