"""merge_adapter on the tiny Llama: equivalence proof, tokenizer, generation_config, refusals."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools.errors import UserError


def make_adapter(model_dir: Path, out: Path, *, seed: int = 1, pad_token: str | None = None,
                 summary: dict | None = None, untrained: bool = False) -> Path:
    """A non-zero LoRA adapter on the tiny model, saved with its tokenizer (as training does)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if pad_token is not None:
        tok.pad_token = pad_token
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  lora_dropout=0.0, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name and not untrained:  # lora_B starts at zero: make the adapter do something
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    if summary is not None:
        (out.parent / "summary.json").write_text(json.dumps(summary))
    return out


@pytest.fixture
def adapter(ws, tiny_model) -> Path:
    return make_adapter(tiny_model, ws.root / "runs" / "r1" / "output",
                        summary={"method": "qlora", "load_in_4bit": True,
                                 "base_model": str(tiny_model)})


def test_merge_equivalent_fp32(ws, tiny_model, adapter):
    from safetensors import safe_open

    from tools.merge import merge_adapter
    r = merge_adapter(adapter_dir="runs/r1/output", output_dir="models/merged", dtype="fp32")
    assert r.dtype == "fp32" and r.device in ("cpu", "cuda")
    assert r.base_model == "models/tiny-llama"  # from adapter_config.json, inside the workspace
    lc = r.logits_check
    assert lc.equivalent and lc.max_abs_diff <= lc.tolerance < 1e-3
    assert lc.top1_agreement == 1.0 and lc.tokens > 20
    assert lc.adapter_effect_max_abs > 10 * lc.tolerance  # the adapter really changes the model
    assert r.tokenizer_check.identical_ids and r.tokenizer_check.chat_template_identical
    assert r.tokenizer_check.training_tokenizer == "adapter_dir"
    assert r.verified and r.qlora_adapter
    assert any("QLoRA" in n and "4-bit" in n for n in r.notes)

    out = ws.root / "models" / "merged"
    assert (out / "model.safetensors").exists() and (out / "merge_report.json").exists()
    assert not any((out / f).exists() for f in ("adapter_config.json", "adapter_model.safetensors"))
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        assert not any("lora" in k for k in fh.keys())
    # generation_config: eos has the chat end-of-turn token, pad is distinct from eos
    gen = json.loads((out / "generation_config.json").read_text())
    tok = json.loads((out / "tokenizer_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert 258 in eos  # <|im_end|> in the tiny tokenizer
    assert gen["pad_token_id"] == 256 and gen["pad_token_id"] not in eos
    assert r.generation_config["end_of_turn_token"] == "<|im_end|>"
    assert tok.get("pad_token") == "<|endoftext|>"
    # no temporary directory left next to it
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged", "tiny-llama"]


def test_merge_picks_pad_distinct_from_eos(ws, tiny_model):
    from tools.merge import merge_adapter
    make_adapter(tiny_model, ws.root / "ad", pad_token="<|im_end|>")  # pad == eos, as often
    r = merge_adapter(adapter_dir="ad", output_dir="m2", base_model="models/tiny-llama",
                      sample_prompts=["Hello there"])
    assert r.verified and not r.qlora_adapter
    assert r.generation_config["pad_token"] == "<|endoftext|>"
    assert r.generation_config["pad_token_id"] not in r.generation_config["eos_token_id"]
    assert any("pad token was '<|im_end|>'" in n for n in r.notes)


def test_refuses_non_empty_output(ws, tiny_model, adapter):
    from tools.merge import merge_adapter
    out = ws.root / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not empty") as ei:
        merge_adapter(adapter_dir="runs/r1/output", output_dir="busy")
    assert ei.value.field == "output_dir" and "overwrite" in str(ei.value)
    assert (out / "keep.txt").read_text() == "x"
    with pytest.raises(UserError, match="destroy"):
        merge_adapter(adapter_dir="runs/r1/output", output_dir="runs/r1", overwrite=True)


def test_missing_adapter_config_and_base(ws, tiny_model, adapter):
    from tools.merge import merge_adapter
    with pytest.raises(UserError, match="adapter_config.json") as ei:
        merge_adapter(adapter_dir="models/tiny-llama", output_dir="m")
    assert "full model" in str(ei.value) and ei.value.fix
    with pytest.raises(UserError, match="does not exist"):
        merge_adapter(adapter_dir="nope", output_dir="m")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "models/gone"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="models/gone") as ei:
        merge_adapter(adapter_dir="runs/r1/output", output_dir="m")
    assert ei.value.field.startswith("base_model") and ei.value.fix
    with pytest.raises(UserError, match="hub"):  # offline: a hub id that cannot load
        merge_adapter(adapter_dir="runs/r1/output", output_dir="m",
                      base_model="no-such-org/no-such-model")
    assert not (ws.root / "m").exists()


def test_no_partial_dir_on_failure(ws, tiny_model, adapter, monkeypatch):
    from tools import merge
    boom = RuntimeError("disk full")

    def fail(*a, **k):
        raise boom
    monkeypatch.setattr(merge, "_dir_size", fail)  # fails after the model files are written
    with pytest.raises(RuntimeError, match="disk full"):
        merge.merge_adapter(adapter_dir="runs/r1/output", output_dir="models/m3")
    assert sorted(p.name for p in (ws.root / "models").iterdir()) == ["tiny-llama"]


def test_a_tampered_merge_does_not_verify(ws, tiny_model, adapter, monkeypatch):
    """Fault injection: the merged weights written to disk are corrupted after saving (a bad
    write). The proof reloads what was written, so it must catch it and say not to ship."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import PreTrainedModel

    from tools.merge import merge_adapter
    original = PreTrainedModel.save_pretrained

    def save_then_tamper(self, save_directory, *a, **k):
        out = original(self, save_directory, *a, **k)
        f = next(Path(save_directory).glob("*.safetensors"))
        tensors = load_file(str(f))
        key = next(k for k in tensors if k.endswith("mlp.down_proj.weight"))
        tensors[key] = tensors[key] + 0.5 * torch.ones_like(tensors[key])
        save_file(tensors, str(f), metadata={"format": "pt"})
        return out

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_tamper)
    r = merge_adapter(adapter_dir="runs/r1/output", output_dir="models/tampered", dtype="fp32")
    lc = r.logits_check
    assert not lc.equivalent and lc.max_abs_diff > lc.tolerance
    assert r.verified is False
    assert any("do not ship this merge" in n for n in r.notes), r.notes
    assert f"NOT verified: logits differ by {lc.max_abs_diff:.3g} > tolerance" in r.summary
    assert r.next_steps[0].startswith("merge_adapter(adapter_dir='runs/r1/output', output_dir="
                                      "'models/tampered'") and "dtype='fp32'" in r.next_steps[0]


def test_an_untrained_adapter_is_flagged(ws, tiny_model):
    from tools.merge import merge_adapter
    make_adapter(tiny_model, ws.root / "runs" / "r0" / "output", untrained=True)
    r = merge_adapter(adapter_dir="runs/r0/output", output_dir="models/same", dtype="fp32")
    assert r.logits_check.equivalent and r.logits_check.adapter_effect_max_abs <= r.logits_check.tolerance
    assert any("looks untrained" in n for n in r.notes), r.notes
    assert r.summary.endswith("The adapter changes nothing: it looks untrained.")


def test_tokenizer_drift_in_the_merged_folder_does_not_verify(ws, tiny_model, adapter, monkeypatch):
    """Fault injection: the tokenizer written next to the merged model renders chats differently
    from the training tokenizer (its chat template was changed on save). The merged model would
    be prompted wrongly at inference: the proof must see it."""
    from transformers import PreTrainedTokenizerBase

    from tools.merge import merge_adapter
    original = PreTrainedTokenizerBase.save_pretrained

    def save_other_template(self, save_directory, *a, **k):
        tpl = self.chat_template
        self.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        try:
            return original(self, save_directory, *a, **k)
        finally:
            self.chat_template = tpl

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", save_other_template)
    r = merge_adapter(adapter_dir="runs/r1/output", output_dir="models/drift", dtype="fp32")
    assert r.logits_check.equivalent  # the weights are fine
    assert r.tokenizer_check.identical_ids is False and r.tokenizer_check.mismatches
    assert r.tokenizer_check.chat_template_identical is False
    assert r.verified is False and any("Do not ship it" in n for n in r.notes), r.notes
    tc = r.tokenizer_check
    assert f"renders {len(tc.mismatches)} of {tc.chats} chats to other ids" in r.summary
    assert "Do not ship it." in r.summary and "logits differ" not in r.summary


def test_merge_says_and_checks_the_ram_it_needs(ws, tiny_model, adapter, monkeypatch):
    import psutil

    from tools.merge import merge_adapter
    r = merge_adapter(adapter_dir="runs/r1/output", output_dir="models/m1", dtype="fp32")
    assert any("The merge holds about" in n for n in r.notes), r.notes

    class Tight:  # the host reports less free RAM than one fp32 copy of the base
        available = 1024
    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tight())
    with pytest.raises(UserError, match="merging needs about") as ei:
        merge_adapter(adapter_dir="runs/r1/output", output_dir="models/m2", dtype="fp32")
    assert ei.value.field == "dtype" and "bf16" in ei.value.fix
    assert not (ws.root / "models" / "m2").exists()


def test_merge_keeps_a_working_pad_token(ws, tiny_model):
    """Qwen3: pad <|endoftext|> differs from the end-of-turn <|im_end|> but is also a generation
    eos id. It works; merge_adapter must not swap it (it became an ordinary token)."""
    import shutil

    from transformers import AutoTokenizer

    from tools.merge import merge_adapter
    base = ws.root / "models/qwenlike"
    shutil.copytree(tiny_model, base)
    tok = AutoTokenizer.from_pretrained(str(base))
    ids = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    gc = json.loads((base / "generation_config.json").read_text()) \
        if (base / "generation_config.json").exists() else {}
    (base / "generation_config.json").write_text(json.dumps({**gc, "eos_token_id": ids}))
    make_adapter(base, ws.root / "ad_q", pad_token="<|endoftext|>")
    r = merge_adapter(adapter_dir="ad_q", output_dir="m_q", base_model="models/qwenlike",
                      sample_prompts=["Hello there"])
    assert r.verified
    assert r.generation_config["pad_token"] == "<|endoftext|>"
    assert not any("pad" in n.lower() for n in r.notes), r.notes  # nothing to fix, nothing said
    saved = AutoTokenizer.from_pretrained(str(ws.root / "m_q"))
    assert saved.pad_token == "<|endoftext|>"
