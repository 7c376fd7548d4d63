"""export_model: GGUF with llama.cpp's converter and quantizer, the Ollama Modelfile, and the parity
proof against transformers; refusals that leave no partial GGUF behind.

The exported model is a tiny Llama with a real tokenizer (tests/fixtures/tokenizers/qwen2_5:
ChatML, a pre-tokenizer llama.cpp's converter knows), trained here for a few seconds to answer
the parity prompts and end its turn with <|im_end|>, so greedy continuations are decisive and
stop where a fine-tuned model stops. The session's tiny_model (one token per byte, no BPE
merges) is what the converter refuses: see test_converter_refuses_the_byte_tokenizer.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tools.errors import UserError

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REPLIES = {  # the parity prompts (tools.export_parity.DEFAULT_PROMPTS) and what training teaches
    "What is 12 + 7? Answer with the number only.": "19",
    "Write one sentence about the sea.": "The sea is wide and deep.",
    "Name three primary colours.": "Red, yellow and blue.",
    "Translate 'good morning' into French.": "Bonjour.",
}

needs_export = pytest.mark.skipif(
    __import__("importlib").util.find_spec("llama_cpp") is None,
    reason="the export extra (llama-cpp-python) is not installed: make venv installs it")


def _converter_installed() -> bool:
    try:
        from tools.export_gguf import find_converter
        find_converter()
        return True
    except UserError:
        return False


def build_chatml_model(path: Path, *, steps: int = 36, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 256: every matrix takes k-quants) with the Qwen2.5 tokenizer,
    trained on REPLIES with the loss on the assistant reply and its <|im_end|> only.

    The tied 151k x 256 embedding is most of the model and of the cost: it stays frozen, scaled
    x20 so that the layers reach decisive logits (top-2 gaps of several units) in a few steps."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(FIXTURES / "tokenizers" / "qwen2_5"))
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=eot,
                      pad_token_id=tok.pad_token_id, rms_norm_eps=1e-6)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    emb = model.model.embed_tokens.weight
    with torch.no_grad():
        emb.mul_(20.0)
    emb.requires_grad_(False)
    rows = []
    for prompt, reply in REPLIES.items():
        chat = [{"role": "user", "content": prompt}]
        p = tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=False)
        r = tok(reply, add_special_tokens=False)["input_ids"] + [eot]
        rows.append((list(p), r))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = 0.0
        for p, r in rows:
            ids = torch.tensor([p + r])
            # Logits only where the reply is predicted: the 151k-wide head is the cost.
            h = model.model(input_ids=ids).last_hidden_state[0, len(p) - 1:-1]
            loss = loss + torch.nn.functional.cross_entropy(model.lm_head(h), torch.tensor(r))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.generation_config = GenerationConfig(eos_token_id=[eot], pad_token_id=tok.pad_token_id,
                                               bos_token_id=None, do_sample=False)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def chatml_cache(tmp_path_factory) -> Path:
    return build_chatml_model(tmp_path_factory.mktemp("chatml") / "chatml-tiny")


@pytest.fixture
def chatml_model(ws, chatml_cache) -> Path:
    dst = ws.root / "models" / "chatml-tiny"
    shutil.copytree(chatml_cache, dst)
    return dst


def _no_gguf_left(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix == ".gguf"
                  or ".tmp" in p.name)


# ----------------------------------------------------------------------------- the export
@needs_export
@pytest.mark.slow
def test_export_f16_and_q4_k_m_with_parity(ws, chatml_model):
    from tools.export import export_model
    if not _converter_installed():
        pytest.skip("llama.cpp converter not installed (python -m tools.export_setup)")
    r = export_model(model="models/chatml-tiny", output_dir="exports/tiny",
                     formats=["f16", "Q4_K_M"], max_new_tokens=12)
    out = ws.root / "exports" / "tiny"
    assert [f.format for f in r.files] == ["f16", "Q4_K_M"]
    assert {p.name for p in out.iterdir()} == {
        "chatml-tiny-f16.gguf", "chatml-tiny-Q4_K_M.gguf", "Modelfile", "chat_template.jinja",
        "export_report.json", "SERVING.md", "quantize_gpu.py"}
    assert r.architecture == "LlamaForCausalLM"
    p = r.parity
    assert p is not None and p.passed, p.verdict if p else None
    f16, q4 = p.formats
    assert f16.tensor_types.get("F16", 0) >= 9 and "Q4_K" in q4.tensor_types  # a real k-quant
    # f16: every prompt identical (tokens, embedded template, greedy) and stops at <|im_end|>
    assert p.end_of_turn == "<|im_end|>" and f16.end_of_turn_is_eog and f16.chat_template_identical
    for row in f16.prompts:
        assert row.tokens_identical and row.template_identical, row
        assert row.greedy_identical and row.hf_stopped_at_end_of_turn and row.gguf_stopped_at_end_of_turn, row
        assert row.served_text_identical and row.served_finish_reason == "stop", row
        assert row.hf_continuation == REPLIES[row.prompt] + "<|im_end|>"
    assert f16.greedy_identical == 4 and f16.ties == 0
    assert q4.agreement >= 0.85 and all(r_.tokens_identical for r_ in q4.prompts)
    assert r.verdict.startswith("PARITY OK on 4 prompts")
    # the Modelfile serves the k-quant with the training template and its end-of-turn
    mf = (out / "Modelfile").read_text()
    assert "FROM ./chatml-tiny-Q4_K_M.gguf" in mf and 'PARAMETER stop "<|im_end|>"' in mf
    assert 'TEMPLATE """' in mf and r.ollama.format == "chatml" and r.ollama.exact
    assert "You are Qwen" in r.ollama.template  # Qwen2.5's default system prompt is kept
    assert (out / "chat_template.jinja").read_text() == json.loads(
        (chatml_model / "tokenizer_config.json").read_text()).get("chat_template", (
            chatml_model / "chat_template.jinja").read_text())
    assert "--chat-template exports/tiny/chat_template.jinja" in r.serving["vllm"]
    assert "--chat-template" in r.serving["sglang"] and "local-chat-completions" in r.serving["lm_eval"]
    assert "--jinja" in r.serving["llama_cpp"]
    assert json.loads((out / "export_report.json").read_text())["verdict"] == r.verdict
    assert _no_gguf_left(ws.root) == ["exports/tiny/chatml-tiny-Q4_K_M.gguf",
                                      "exports/tiny/chatml-tiny-f16.gguf"]


@needs_export
@pytest.mark.slow
def test_parity_fails_against_other_weights(ws, chatml_model):
    """The proof can fail: a GGUF from a stale copy of the model (weights changed since)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tools.export import _parity, export_model
    from tools.export_gguf import find_converter
    if not _converter_installed():
        pytest.skip("llama.cpp converter not installed")
    export_model(model="models/chatml-tiny", output_dir="exports/stale", formats=["f16"], parity=False)
    m = AutoModelForCausalLM.from_pretrained(str(chatml_model), dtype=torch.float32)
    with torch.no_grad():  # "training continued": the embeddings moved
        m.model.embed_tokens.weight.add_(torch.randn_like(m.model.embed_tokens.weight) * 0.5)
    m.save_pretrained(str(chatml_model))
    tok = AutoTokenizer.from_pretrained(str(chatml_model))
    gguf = ws.root / "exports" / "stale" / "chatml-tiny-f16.gguf"
    rep = _parity(chatml_model, tok, {"f16": gguf}, find_converter(), list(REPLIES), 12,
                  ws.root / "exports" / "stale")
    assert not rep.passed and rep.verdict.startswith("PARITY FAILED")
    f16 = rep.formats[0]
    assert "greedy differs" in f16.why and f16.greedy_identical < 4
    assert all(row.tokens_identical and row.template_identical for row in f16.prompts)


@pytest.mark.slow
def test_export_from_adapter_then_push_to_hub_dry_run(ws, chatml_model, monkeypatch):
    """adapter= runs merge_adapter into output_dir/hf (inside the same atomic write) and exports
    the merged model; push_to_hub's dry run then shows the card (recipe, data, masking,
    evaluation, parity) and the files, and a real push offline or without a token is refused."""
    import yaml
    from test_merge import make_adapter

    from tools.export import export_model
    from tools.export_hub import push_to_hub
    if not _converter_installed():
        pytest.skip("llama.cpp converter not installed")
    run = ws.root / "runs" / "r1"
    make_adapter(chatml_model, run / "output", summary={"method": "lora", "train_loss": 0.42})
    (run / "recipe.yaml").write_text(yaml.safe_dump({
        "model_name_or_path": "models/chatml-tiny", "use_peft": True, "lora_r": 4,
        "learning_rate": 2e-4, "dataset_name": "data/qa", "assistant_only_loss": True}))
    r = export_model(adapter="runs/r1/output", output_dir="exports/a", formats=["q8_0"], parity=False)
    out = ws.root / "exports" / "a"
    assert r.merged_from_adapter == "runs/r1/output" and r.merge_verified is True
    assert r.hf_model == "exports/a/hf" and (out / "hf" / "merge_report.json").is_file()
    assert [f.file for f in r.files] == ["exports/a/r1-q8_0.gguf"] and (out / "r1-q8_0.gguf").is_file()
    assert r.serving["vllm"].startswith("vllm serve exports/a/hf ")
    assert r.parity is None and "not checked" in r.verdict
    assert "FROM ./r1-q8_0.gguf" in (out / "Modelfile").read_text()
    assert _no_gguf_left(ws.root) == ["exports/a/r1-q8_0.gguf"]

    (ws.root / "evals").mkdir()
    (ws.root / "evals" / "results.json").write_text(json.dumps(
        {"table": "| exact match, fine-tuned | 100.0% |"}))
    h = push_to_hub(folder="exports/a", repo_id="me/tiny", eval_results="evals/results.json")
    assert h.dry_run and h.private and not h.uploaded
    card = h.model_card
    assert card.startswith("---\nbase_model: models/chatml-tiny\n") and "- gguf" in card
    for needle in ("`lora_r`: 4", "final train loss: 0.42", "data/qa", "assistant_only_loss=True",
                   "| exact match, fine-tuned | 100.0% |", "Parity (llama.cpp vs transformers): parity not checked",
                   "| r1-q8_0.gguf |", "| hf/model.safetensors |"):
        assert needle in card, needle
    assert {f.path for f in h.files} >= {"README.md", "r1-q8_0.gguf", "Modelfile", "hf/config.json"}
    assert "exports/a/export_report.json" in h.card_sources and "runs/r1/recipe.yaml" in h.card_sources
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="dry_run: the hub is switched off"):
        push_to_hub(folder="exports/a", repo_id="me/tiny", dry_run=False)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN",
                "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_TOKEN_PATH", str(ws.root / "no-token"))  # no stored token either
    with pytest.raises(UserError, match="no Hugging Face token"):
        push_to_hub(folder="exports/a", repo_id="me/tiny", dry_run=False)


OTHER_REPLIES = {  # what the adapter teaches instead of REPLIES
    "What is 12 + 7? Answer with the number only.": "Nineteen.",
    "Write one sentence about the sea.": "Waves roll in.",
    "Name three primary colours.": "Cyan, magenta, yellow.",
    "Translate 'good morning' into French.": "Bonjour, mon ami.",
}


def trained_adapter(chatml_model: Path, out: Path, *, steps: int = 80, lr: float = 3e-3) -> Path:
    """A LoRA (r=8, attention and MLP projections) trained on the chatml model to give
    OTHER_REPLIES, with the loss on the reply and its <|im_end|> only: decisive logits, so a
    GGUF LoRA that is applied wrongly (or not at all) shows."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(chatml_model))
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(chatml_model), dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                      "gate_proj", "up_proj", "down_proj"]))
    rows = []
    for prompt, reply in OTHER_REPLIES.items():
        p = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                    add_generation_prompt=True, return_dict=False)
        rows.append((list(p), tok(reply, add_special_tokens=False)["input_ids"] + [eot]))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    inner = model.base_model.model
    for _ in range(steps):
        loss = 0.0
        for p, r in rows:
            h = inner.model(input_ids=torch.tensor([p + r])).last_hidden_state[0, len(p) - 1:-1]
            loss = loss + torch.nn.functional.cross_entropy(inner.lm_head(h), torch.tensor(r))
        opt.zero_grad()
        loss.backward()
        opt.step()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@needs_export
@pytest.mark.slow
def test_lora_adapter_as_gguf_matches_the_merged_model(ws, chatml_model):
    """merge=false: the base as f16 GGUF + the adapter as a GGUF LoRA (convert_lora_to_gguf.py),
    loaded together by llama-cpp-python (lora_path), reproduce base + PEFT adapter token for
    token, and so the merged model's f16 GGUF; the adapter really changes the replies."""
    from tools.export import export_model
    if not _converter_installed():
        pytest.skip("llama.cpp converter not installed")
    trained_adapter(chatml_model, ws.root / "runs" / "r2" / "output")
    r = export_model(adapter="runs/r2/output", output_dir="exports/lora", formats=["f16"],
                     merge=False, max_new_tokens=10)
    out = ws.root / "exports" / "lora"
    assert {p.name for p in out.iterdir()} == {
        "r2-f16.gguf", "r2-lora-f16.gguf", "Modelfile", "chat_template.jinja", "export_report.json",
        "SERVING.md", "quantize_gpu.py"}  # no merged copy, no base view left
    assert r.lora_adapter == "exports/lora/r2-lora-f16.gguf" and r.merged_from_adapter is None
    assert r.hf_model == "models/chatml-tiny" and [f.format for f in r.files] == ["f16", "lora-f16"]
    p = r.parity
    assert p.passed, p.verdict
    assert p.hf_model == "models/chatml-tiny + runs/r2/output"
    f16 = p.formats[0]
    assert f16.file == "exports/lora/r2-f16.gguf + exports/lora/r2-lora-f16.gguf"
    assert all(row.greedy_identical and row.tokens_identical for row in f16.prompts), f16.why
    # The adapter changes what the model says (the base answers REPLIES), as it was trained to.
    for row in f16.prompts:
        assert row.gguf_continuation == OTHER_REPLIES[row.prompt] + "<|im_end|>", row
        assert row.gguf_stopped_at_end_of_turn and row.served_text_identical, row
    mf = (out / "Modelfile").read_text()
    assert "FROM ./r2-f16.gguf\nADAPTER ./r2-lora-f16.gguf\n" in mf
    assert "--lora exports/lora/r2-lora-f16.gguf" in r.serving["llama_cpp"]
    assert "--enable-lora --lora-modules r2=runs/r2/output" in r.serving["vllm"]
    assert r.serving["vllm"].startswith("vllm serve models/chatml-tiny ")
    # The merged model's f16 GGUF says the same, token for token.
    m = export_model(adapter="runs/r2/output", output_dir="exports/merged", formats=["f16"],
                     max_new_tokens=10)
    assert m.parity.passed and m.merged_from_adapter == "runs/r2/output"
    assert [row.gguf_continuation for row in m.parity.formats[0].prompts] == \
        [row.gguf_continuation for row in f16.prompts]


def test_lora_gguf_refuses_what_llama_cpp_cannot_apply(ws, tiny_model):
    """modules_to_save, DoRA, rsLoRA, alpha_pattern: a GGUF LoRA would not be the adapter
    trained; refused before anything is written, with merge=true as the fix."""
    from test_merge import make_adapter

    from tools.export import export_model
    from tools.export_gguf import lora_refusals
    if not _converter_installed():
        pytest.skip("llama.cpp converter not installed")
    a = make_adapter(tiny_model, ws.root / "runs" / "r3" / "output")
    cfg_path = a / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    assert lora_refusals(cfg) == []
    for key, value, words in (("modules_to_save", ["lm_head"], "full copies"),
                              ("use_dora", True, "DoRA"), ("use_rslora", True, "alpha/sqrt(r)"),
                              ("alpha_pattern", {"q_proj": 32}, "own alpha")):
        cfg_path.write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(UserError) as e:
            export_model(adapter="runs/r3/output", output_dir="exports/l", merge=False)
        msg = str(e.value)
        assert msg.startswith("merge: 'runs/r3/output' cannot become a GGUF LoRA") and words in msg, msg
        assert "Fix: Pass merge=true" in msg
    assert not (ws.root / "exports").exists()
    with pytest.raises(UserError, match="^merge: merge=false keeps a LoRA adapter separate"):
        export_model(model="models/tiny-llama", output_dir="exports/l", merge=False)


# ----------------------------------------------------------------------------- refusals
@needs_export
def test_converter_refuses_the_byte_tokenizer(ws, tiny_model):
    """The session's tiny model (byte-level BPE without merges): llama.cpp's converter does not
    know its pre-tokenizer. A clear error, and no partial GGUF or temp folder left."""
    from tools.export import export_model
    if not _converter_installed():
        pytest.skip("llama.cpp converter not installed")
    with pytest.raises(UserError) as e:
        export_model(model="models/tiny-llama", output_dir="exports/tiny", formats=["f16"])
    msg = str(e.value)
    assert msg.startswith("model:") and "does not recognise this tokenizer's pre-tokenizer" in msg
    assert "Fix: Export a model that keeps its base model's tokenizer" in msg
    assert not (ws.root / "exports" / "tiny").exists()
    assert _no_gguf_left(ws.root) == []


def test_unsupported_architecture(ws, tmp_path):
    """A real transformers architecture llama.cpp cannot convert (OPT): refused before any work."""
    from transformers import OPTConfig, OPTForCausalLM

    from tools.export import export_model
    if not _converter_installed():
        pytest.skip("llama.cpp converter not installed")
    d = ws.root / "models" / "opt"
    OPTForCausalLM(OPTConfig(vocab_size=300, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                             num_attention_heads=2, word_embed_proj_dim=16)).save_pretrained(str(d))
    with pytest.raises(UserError) as e:
        export_model(model="models/opt", output_dir="exports/opt")
    msg = str(e.value)
    assert msg.startswith("model:") and "architecture OPTForCausalLM" in msg and "vLLM" in msg
    assert "are supported, e.g. LlamaForCausalLM" in msg  # the converter's table, read up front
    assert not (ws.root / "exports").exists()


def test_no_chat_template(ws, chatml_model):
    from tools.export import export_model
    if not _converter_installed():
        pytest.skip("llama.cpp converter not installed")
    (chatml_model / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((chatml_model / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (chatml_model / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError) as e:
        export_model(model="models/chatml-tiny", output_dir="exports/x")
    assert "no chat template" in str(e.value) and "save_pretrained" in str(e.value)
    assert not (ws.root / "exports").exists()


def test_two_different_chat_templates(ws, chatml_model):
    """chat_template.jinja (read by transformers) and a stale tokenizer_config.json copy (embedded
    by the converter): the GGUF would carry the wrong one, so it is refused."""
    from tools.export import export_model
    if not _converter_installed():
        pytest.skip("llama.cpp converter not installed")
    cfg = json.loads((chatml_model / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (chatml_model / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert (chatml_model / "chat_template.jinja").is_file()
    with pytest.raises(UserError) as e:
        export_model(model="models/chatml-tiny", output_dir="exports/x")
    assert "two different chat templates" in str(e.value)


@pytest.fixture
def small_disk(ws):
    """A 4 MiB tmpfs mounted inside the workspace (root only)."""
    d = ws.root / "small"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(d)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield d
    subprocess.run(["umount", str(d)], check=False)


def test_disk_too_small(ws, chatml_model, small_disk):
    from tools.export import export_model
    if not _converter_installed():
        pytest.skip("llama.cpp converter not installed")
    with pytest.raises(UserError) as e:
        export_model(model="models/chatml-tiny", output_dir="small/out", formats=["f16", "q8_0"])
    msg = str(e.value)
    assert msg.startswith("output_dir:") and "GiB" in msg and "free" in msg and "fewer formats" in msg
    assert list(small_disk.iterdir()) == []


@needs_export
def test_disk_fills_up_during_conversion(ws, chatml_model, small_disk, monkeypatch):
    """The estimate said it fits (here: the check is skipped), the converter then hits ENOSPC
    half-way through the 80 MB f16 file on the 4 MiB disk: the error says so, and the partial
    GGUF goes with the temp folder."""
    from tools import export_gguf
    from tools.export import export_model
    if not _converter_installed():
        pytest.skip("llama.cpp converter not installed")
    monkeypatch.setattr(export_gguf, "check_disk", lambda target, need: None)
    with pytest.raises(UserError) as e:
        export_model(model="models/chatml-tiny", output_dir="small/out", formats=["f16"], parity=False)
    msg = str(e.value)
    assert msg.startswith("output_dir: the disk filled up while writing the GGUF (nothing was kept)"), msg
    assert list(small_disk.iterdir()) == []


def test_parity_needs_ram_for_the_fp32_reference():
    """A 100B-parameter model cannot be held in fp32 here: refused with parity=false as the fix."""
    from tools.export_gguf import check_parity_ram
    check_parity_ram(10_000_000)  # the test model fits
    with pytest.raises(UserError, match=r"^parity: .* GiB of RAM .* Fix: Pass parity=false"):
        check_parity_ram(100_000_000_000)


def test_missing_converter_names_the_fix(ws, chatml_model, monkeypatch, tmp_path):
    from tools.export import export_model
    monkeypatch.setenv("LLAMA_CPP_CONVERTER", str(tmp_path / "nowhere" / "convert_hf_to_gguf.py"))
    with pytest.raises(UserError) as e:
        export_model(model="models/chatml-tiny", output_dir="exports/x")
    assert "converter is not installed" in str(e.value) and "tools.export_setup" in str(e.value)


def test_model_and_adapter_are_exclusive(ws, chatml_model):
    from tools.export import export_model
    if not _converter_installed():
        pytest.skip("llama.cpp converter not installed")
    with pytest.raises(UserError, match="exactly one of model"):
        export_model(output_dir="exports/x")
    with pytest.raises(UserError, match="output_dir is or contains"):
        export_model(model="models/chatml-tiny", output_dir="models")


# ----------------------------------------------------------------------------- Ollama template
GO_RENDER = r"""package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct{ Role, Content string }

func main() {
	tb, _ := os.ReadFile(os.Args[1])
	mb, _ := os.ReadFile(os.Args[2])
	var msgs []Message
	if err := json.Unmarshal(mb, &msgs); err != nil {
		panic(err)
	}
	t := template.Must(template.New("t").Parse(string(tb)))
	if err := t.Execute(os.Stdout, struct{ Messages []Message }{msgs}); err != nil {
		panic(err)
	}
}
"""


@pytest.mark.parametrize("family,fmt", [("qwen2_5", "chatml"), ("llama3", "llama3"), ("phi3", "phi3")])
def test_ollama_template_renders_like_the_training_template(family, fmt, tmp_path):
    """The generated Go template, executed by Go's text/template (Ollama's engine), gives the
    training template's prompt on every probe chat (BOS left to llama.cpp)."""
    from transformers import AutoTokenizer

    from tools.export_templates import FORMATS, PROBES, translate
    tok = AutoTokenizer.from_pretrained(str(FIXTURES / "tokenizers" / family))
    t = translate(tok, gguf_adds_bos=True)
    assert t.format == fmt and t.exact and t.template and t.stop
    go = shutil.which("go")
    if go is None:
        pytest.skip("Go is not installed: the template is checked in Python only")
    (tmp_path / "r.go").write_text(GO_RENDER)
    env = {"GOCACHE": str(tmp_path / "gocache"), "GOPATH": str(tmp_path / "gopath"),
           "HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "GO111MODULE": "off"}
    subprocess.run([go, "build", "-o", str(tmp_path / "render"), str(tmp_path / "r.go")],
                   check=True, env=env, cwd=tmp_path)
    (tmp_path / "t.tmpl").write_text(t.template)
    bos = next(f.bos for f in FORMATS if f.name == fmt)
    for name, msgs in PROBES.items():
        (tmp_path / "m.json").write_text(json.dumps(msgs))
        got = subprocess.run([str(tmp_path / "render"), str(tmp_path / "t.tmpl"), str(tmp_path / "m.json")],
                             check=True, capture_output=True, text=True).stdout
        want = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert got == (want[len(bos):] if bos and want.startswith(bos) else want), name


def test_untranslatable_template_says_what_to_do(tmp_path):
    """Gemma 2 folds the system message into the user turn: not a format we translate."""
    from tools.export_templates import translate
    from tools.tiny import build_tokenizer
    gemma = (FIXTURES / "templates" / "llama.cpp" / "google-gemma-2-2b-it.jinja").read_text()
    tok = build_tokenizer(tmp_path / "gemma", chat_template=gemma)
    t = translate(tok, gguf_adds_bos=True)
    assert t.format is None and not t.exact and t.template is None
    assert "llama-server" in t.reason and "--jinja" in t.reason and "TEMPLATE" in t.reason
    # ChatML turns, but the assistant role is renamed: it parses as ChatML and is still refused,
    # because the format would not reproduce the rendering.
    bot = ("{% for m in messages %}{{ '<|im_start|>' + ('bot' if m['role'] == 'assistant' "
           "else m['role']) + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    t = translate(build_tokenizer(tmp_path / "bot", chat_template=bot), gguf_adds_bos=False)
    assert t.format is None and "looks like chatml but renders differently" in t.reason


def test_registered_over_mcp(ws, chatml_model, monkeypatch):
    """server.export registers both tools; a real export_model call's structured output validates
    against its advertised outputSchema, and bad arguments come back as errors naming the field
    (the full server's contract test needs server.export in TOOL_MODULES)."""
    import asyncio

    import jsonschema
    from mcp import Client
    from mcp.server.mcpserver import MCPServer

    from server.export import register
    if not _converter_installed():
        pytest.skip("llama.cpp converter not installed")
    monkeypatch.setenv("LLM_FT_STRICT_RESULTS", "1")  # a result without a summary fails the call
    mcp = MCPServer("t")
    register(mcp)

    async def main():
        async with Client(mcp) as c:
            tools = {t.name: t for t in (await c.list_tools()).tools}
            assert set(tools) == {"export_model", "push_to_hub"}
            tool = tools["export_model"]
            props = tool.input_schema["properties"]
            assert {"model", "adapter", "output_dir", "formats", "parity", "max_new_tokens"} <= set(props)
            assert "Q4_K_M" in json.dumps(props["formats"]) and "output_dir" in tool.input_schema["required"]
            assert tool.annotations.destructive_hint is True
            r = await c.call_tool("export_model", {"model": "models/chatml-tiny", "output_dir": "exports/m",
                                                   "formats": ["q8_0"], "parity": False})
            assert not r.is_error, r.content[0].text[:500]
            jsonschema.validate(r.structured_content, tool.output_schema)
            assert r.content[0].text.startswith("Exported models/chatml-tiny to 1 GGUF file(s) in exports/m (q8_0 ")
            r = await c.call_tool("push_to_hub", {"folder": "exports/m", "repo_id": "me/m"})
            assert not r.is_error and r.structured_content["dry_run"] is True
            jsonschema.validate(r.structured_content, tools["push_to_hub"].output_schema)
            n = len(r.structured_content["files"])
            assert r.content[0].text.startswith(f"Dry run: would upload {n} files (")
            assert "to me/m (private) with a model card with a parity verdict" in r.content[0].text
            assert r.structured_content["next_steps"] == [
                "push_to_hub(folder='exports/m', repo_id='me/m', dry_run=false) to upload "
                "(needs `hf auth login` or HF_TOKEN)"]
            r = await c.call_tool("export_model", {"model": "models/none", "output_dir": "exports/x",
                                                   "formats": ["f16"]})
            assert r.is_error and "model: " in r.content[0].text and "does not exist" in r.content[0].text
            r = await c.call_tool("export_model", {"model": "models/none", "output_dir": "exports/x",
                                                   "formats": ["q4"]})
            assert r.is_error and "formats" in r.content[0].text
    asyncio.run(main())
