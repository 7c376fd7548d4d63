"""The DPO stage on CPU: convert_preference (formats and the problems that ruin preference
training), verify_preference (TRL's own DPO preparation, token by token), the DPO recipe and
`python -m tools.train_dpo` runs on the tiny model (a learnable preference, the SFT-adapter start,
the run files training_status reads)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from tools.errors import UserError
from tools.tiny import CHATML_TEMPLATE

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def problems(report) -> dict:
    return {p.code: p for p in report.problems}


def reasons(report) -> dict:
    return {r.code: r for r in report.reasons}


# ------------------------------------------------------------------ realistic sources

HH = [  # Anthropic/hh-rlhf rows as published: one text per side, "\n\nHuman:" / "\n\nAssistant:" turns
    {"chosen": "\n\nHuman: What are some cuss words in english?\n\nAssistant: I'd rather not list "
               "those. Is there something else I can help with?",
     "rejected": "\n\nHuman: What are some cuss words in english?\n\nAssistant: Here's a list: ..."},
    {"chosen": "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water, salt and yeast.\n\n"
               "Human: How long should it rise?\n\nAssistant: About an hour, until it doubles.",
     "rejected": "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water, salt and yeast.\n\n"
                 "Human: How long should it rise?\n\nAssistant: Rising is optional."},
    {"chosen": "\n\nHuman: Tell me a joke.\n\nAssistant: Why did the chicken cross the road?",  # 3: identical
     "rejected": "\n\nHuman: Tell me a joke.\n\nAssistant: Why did the chicken cross the road? "},
    {"chosen": "\n\nHuman: Where is Paris?\n\nAssistant: In France.",  # 4: two different prompts
     "rejected": "\n\nHuman: Where is Rome?\n\nAssistant: In Italy."},
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Name a color.\n\n"  # 5: a user
               "Assistant: Blue.",                                      # turn differs mid-conversation
     "rejected": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit.\n\n"
                 "Assistant: Apple."},
    {"chosen": "\n\nHuman: Say something.\n\nAssistant:",  # 6: empty chosen
     "rejected": "\n\nHuman: Say something.\n\nAssistant: Something."},
]


def ultrafeedback(n: int, best_at: int | None = None, tie_rows: int = 0) -> list[dict]:
    """openbmb/UltraFeedback-shaped rows: instruction + 4 completions with overall_score."""
    rng = random.Random(n)
    rows = []
    for i in range(n):
        scores = [rng.choice([3.0, 5.5, 7.0, 8.5]) for _ in range(4)]
        if best_at is not None:
            scores[best_at] = 9.5
        comps = [{"model": f"m{j}", "response": f"Answer {j} to question {i}." + " more" * j,
                  "overall_score": s, "fine-grained_score": s / 2, "critique": "..."}
                 for j, s in enumerate(scores)]
        rows.append({"source": "evol_instruct", "instruction": f"Question {i}: explain item {i}.",
                     "completions": comps})
    for i in range(tie_rows):
        rows.append({"instruction": f"Tie {i}", "completions": [
            {"response": "a", "overall_score": 6.0}, {"response": "b", "overall_score": 6.0}]})
    return rows


# ------------------------------------------------------------------ convert_preference

def test_hh_rlhf_text_becomes_explicit_prompt_pairs_and_bad_pairs_are_named(ws):
    """Implicit HH-RLHF text: the shared prefix (multi-turn included) becomes the prompt; an
    identical pair, two different prompts (at the first turn and mid-conversation) and an empty
    side are dropped with their line numbers."""
    from tools.preference import convert_preference
    write_jsonl(ws.root / "hh.jsonl", HH)
    r = convert_preference("hh.jsonl", "data/hh", shuffle=False)
    assert r.source_format == "implicit" and r.conversational and r.pairs_written == 2
    p = problems(r)
    assert p["identical"].rows == [3] and p["different_prompts"].rows == [4, 5] and p["empty_side"].rows == [6]
    rows = [json.loads(x) for x in (ws.root / "data/hh/train.jsonl").read_text().splitlines()]
    assert rows[1]["prompt"] == [U("How do I bake bread?"), A("Mix flour, water, salt and yeast."),
                                 U("How long should it rise?")]
    assert rows[1]["chosen"] == [A("About an hour, until it doubles.")]
    assert rows[1]["rejected"] == [A("Rising is optional.")]
    assert r.changes["hh_text_parsed"] == len(HH)


def test_implicit_conversations_share_their_prefix_as_prompt(ws):
    from tools.preference import convert_preference
    sys_msg = {"role": "system", "content": "Be brief."}
    rows = [{"chosen": [sys_msg, U(f"q{i}"), A(f"good {i}")], "rejected": [sys_msg, U(f"q{i}"), A(f"bad {i}")]}
            for i in range(3)]
    write_jsonl(ws.root / "conv.jsonl", rows)
    r = convert_preference("conv.jsonl", "data/conv", shuffle=False)
    out = json.loads((ws.root / "data/conv/train.jsonl").read_text().splitlines()[0])
    assert out == {"prompt": [sys_msg, U("q0")], "chosen": [A("good 0")], "rejected": [A("bad 0")]}
    assert r.problems == []


def test_explicit_prompt_repeated_in_the_replies_is_stripped(ws):
    """trl-lib style rows whose chosen/rejected repeat the prompt turn: written without it (else
    DPOTrainer scores the repeated user turn as part of the reply)."""
    from tools.preference import convert_preference
    rows = [{"prompt": [U(f"q{i}")], "chosen": [U(f"q{i}"), A(f"yes {i}")], "rejected": [U(f"q{i}"), A(f"no {i}")]}
            for i in range(3)]
    rows.append({"prompt": [U("q9")], "chosen": [U("another question"), A("x")], "rejected": [A("y")]})
    write_jsonl(ws.root / "rep.jsonl", rows)
    r = convert_preference("rep.jsonl", "data/rep", shuffle=False)
    out = json.loads((ws.root / "data/rep/train.jsonl").read_text().splitlines()[0])
    assert out == {"prompt": [U("q0")], "chosen": [A("yes 0")], "rejected": [A("no 0")]}
    assert r.changes["prompt_removed_from_replies"] == 6
    assert problems(r)["different_prompts"].rows == [4]


def test_explicit_standard_text_stays_text(ws):
    from tools.preference import convert_preference
    rows = [{"question": f"Q{i}:", "response_j": f" good {i}", "response_k": f" bad {i}!"} for i in range(4)]
    rows.append({"question": "Q:", "response_j": "   ", "response_k": "x"})
    rows.append({"question": "Q2:", "response_j": "the  same answer", "response_k": "the same answer "})
    write_jsonl(ws.root / "se.jsonl", rows)
    r = convert_preference("se.jsonl", "data/se", shuffle=False,
                           column_mapping={"prompt": "question", "chosen": "response_j", "rejected": "response_k"})
    assert r.source_format == "explicit" and not r.conversational and r.pairs_written == 4
    assert json.loads((ws.root / "data/se/train.jsonl").read_text().splitlines()[0]) == \
        {"prompt": "Q0:", "chosen": " good 0", "rejected": " bad 0!"}
    assert problems(r)["empty_side"].rows == [5] and problems(r)["identical"].rows == [6]


def test_ultrafeedback_best_vs_worst_with_a_margin(ws):
    """Scored completions: best vs worst by overall_score; ties and near-ties under the margin
    are dropped; the scores travel as score_chosen/score_rejected; a test split is made."""
    from tools.preference import convert_preference
    src = ultrafeedback(30, tie_rows=2)
    write_jsonl(ws.root / "uf.jsonl", src)
    r = convert_preference("uf.jsonl", "data/uf", min_score_margin=2.0, test_size=0.2, shuffle=False)
    assert r.source_format == "scored" and r.columns == {"instruction": "prompt", "completions": "completions"}
    kept = [row for row in src[:30] if max(c["overall_score"] for c in row["completions"])
            - min(c["overall_score"] for c in row["completions"]) >= 2.0]
    assert r.pairs_written == len(kept) and r.train + r.test == len(kept) and r.test == -(-len(kept) // 5)
    low = problems(r)["score_margin_below"]
    assert low.count == 30 - len(kept) + 2 and {31, 32} <= set(low.rows)
    first = json.loads((ws.root / "data/uf/train.jsonl").read_text().splitlines()[0])
    row0 = next(x for x in src if x["instruction"] == first["prompt"][0]["content"])
    best = max(row0["completions"], key=lambda c: c["overall_score"])
    worst = min(row0["completions"], key=lambda c: c["overall_score"])
    assert first["chosen"] == [A(best["response"])] and first["rejected"] == [A(worst["response"])]
    assert (first["score_chosen"], first["score_rejected"]) == (best["overall_score"], worst["overall_score"])


def test_length_and_position_bias_are_warned(ws):
    """The best completion always first and always the longest: both biases named; a balanced
    set has neither."""
    from tools.preference import convert_preference
    biased = ultrafeedback(20, best_at=3)  # completion 3 is the longest ("more" x3)
    write_jsonl(ws.root / "biased.jsonl", biased)
    p = problems(convert_preference("biased.jsonl", "data/biased"))
    assert p["position_bias"].severity == "warn" and "position 3" in p["position_bias"].message
    assert p["length_bias"].severity == "warn" and p["length_bias"].count == 20
    balanced = [{"prompt": f"q{i}", "chosen": "short" if i % 2 else "a longer reply",
                 "rejected": "a longer one" if i % 2 else "short"} for i in range(20)]
    write_jsonl(ws.root / "balanced.jsonl", balanced)
    p = problems(convert_preference("balanced.jsonl", "data/balanced"))
    assert "length_bias" not in p and "position_bias" not in p


def test_bad_inputs_are_user_errors(ws):
    from tools.errors import UserError
    from tools.preference import convert_preference
    write_jsonl(ws.root / "sft.jsonl", [{"prompt": "q", "completion": "a"}])
    with pytest.raises(UserError, match="no preference columns") as e:
        convert_preference("sft.jsonl", "data/x")
    assert e.value.field == "dataset" and "column_mapping" in e.value.fix
    write_jsonl(ws.root / "plain.jsonl", [{"chosen": "good", "rejected": "bad"}])
    with pytest.raises(UserError, match="plain texts") as e:
        convert_preference("plain.jsonl", "data/x")
    write_jsonl(ws.root / "same.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "a"}])
    with pytest.raises(UserError, match="no usable row.*identical") as e:
        convert_preference("same.jsonl", "data/x")
    write_jsonl(ws.root / "two.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"},
                                        {"prompt": "q2", "chosen": "a", "rejected": "a"}])
    with pytest.raises(UserError, match="location 2") as e:
        convert_preference("two.jsonl", "data/x", strict=True)
    with pytest.raises(UserError) as e:
        convert_preference("two.jsonl", "../outside")
    assert e.value.field == "output_dir"
    assert not (ws.root / "data/x").exists()


# ------------------------------------------------------------------ verify_preference

ANIMALS = [("cat", "meow"), ("dog", "woof")]


def animal_pair(n: int) -> dict:
    """The chosen reply gives the sound of the animal the prompt names; the rejected the other's."""
    (animal, good), bad = ANIMALS[n % 2], ANIMALS[1 - n % 2][1]
    return {"prompt": [U(f"Item {n}: what does the {animal} say?")],
            "chosen": [A(f"The {animal} says {good}.")], "rejected": [A(f"The {animal} says {bad}.")]}


def animals(ws, train: int = 128, test: int = 32) -> str:
    nums = list(range(100, 1000))
    random.Random(0).shuffle(nums)
    write_jsonl(ws.root / "data/animals/train.jsonl", [animal_pair(n) for n in nums[:train]])
    if test:
        write_jsonl(ws.root / "data/animals/test.jsonl", [animal_pair(n) for n in nums[500:500 + test]])
    return "data/animals"


def test_verify_passes_and_shows_exactly_the_replies_scored(ws, tiny_model):
    from tools.preference import find_preference_report, verify_preference
    animals(ws, train=20, test=0)
    r = verify_preference("data/animals", "models/tiny-llama", max_length=128)
    assert r.verdict == "pass", r.reasons
    assert r.pairs_prepared == 20 and r.examples_checked == 20 and r.prompt_tokens_scored == 0
    v = r.pairs[0]
    for side, view in (("chosen", v.chosen), ("rejected", v.rejected)):
        row = json.loads((ws.root / "data/animals/train.jsonl").read_text().splitlines()[v.row])
        reply = row[side][0]["content"]
        assert view.text.endswith(f"<|im_start|>assistant\n[[{reply}<|im_end|>\n]]"), view.text
        assert view.end_of_turn_scored and set(view.scored_by_role) == {"assistant", "template"}
    assert v.first_difference == len("The cat says ")  # byte tokens: the sounds differ there
    assert Path(r.report_path).is_file()
    found = find_preference_report("data/animals", "models/tiny-llama", max_length=128)
    assert found is not None and found.key == r.key
    assert find_preference_report("data/animals", "models/tiny-llama", max_length=64) is None


def test_verify_fails_when_the_reply_repeats_the_prompt(ws, tiny_model):
    """Data written without convert_preference: chosen/rejected hold the user turn again. TRL
    renders prompt + chosen, so the repeated question sits inside the scored span."""
    from tools.preference import verify_preference
    rows = [{"prompt": [U(f"q{i}?")], "chosen": [U(f"q{i}?"), A("yes")], "rejected": [U(f"q{i}?"), A("no")]}
            for i in range(4)]
    write_jsonl(ws.root / "data/rep/train.jsonl", rows)
    r = verify_preference("data/rep", "models/tiny-llama", max_length=128)
    assert r.verdict == "fail" and "prompt_tokens_scored" in reasons(r)
    assert r.prompt_tokens_scored > 0 and r.pairs[0].chosen.scored_by_role["user"] == len("q0?")


TEMPLATE_NO_EOT = (  # ChatML that does not close assistant turns: the model is never taught to stop
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' + message['content'] }}{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEMPLATE_TRIM = CHATML_TEMPLATE.replace("message['content']", "message['content'] | trim")


def test_verify_fails_without_the_end_of_turn(ws, tiny_model):
    from tools.preference import verify_preference
    animals(ws, train=6, test=0)
    r = verify_preference("data/animals", "models/tiny-llama", max_length=128, chat_template=TEMPLATE_NO_EOT)
    assert r.verdict == "fail" and reasons(r)["end_of_turn_not_scored"].rows == list(range(6))
    assert r.end_of_turn_missing == 6 and not r.pairs[0].chosen.end_of_turn_scored


def test_verify_fails_when_the_template_erases_the_difference(ws, tiny_model):
    """Replies that differ only in trailing spaces: text-different, token-identical under a
    template that trims content; such pairs carry no preference."""
    from tools.preference import verify_preference
    rows = [{"prompt": [U(f"q{i}")], "chosen": [A(f"Answer {i}.")], "rejected": [A(f"Answer {i}.  ")]}
            for i in range(5)]
    write_jsonl(ws.root / "data/trim/train.jsonl", rows)
    assert verify_preference("data/trim", "models/tiny-llama", max_length=128).verdict == "pass"
    r = verify_preference("data/trim", "models/tiny-llama", max_length=128, chat_template=TEMPLATE_TRIM)
    assert r.verdict == "fail" and r.identical_pairs == 5 and r.pairs[0].first_difference is None


def test_verify_fails_when_truncation_hides_the_difference(ws, tiny_model):
    """A long shared reply start and the difference at the end: max_length cuts both sides to
    the same tokens (zero margin), and TRL drops pairs whose prompt fills max_length."""
    from tools.preference import verify_preference
    long = "Here is a careful, step by step answer to your question. " * 3
    rows = [{"prompt": [U(f"q{i}")], "chosen": [A(long + "Yes.")], "rejected": [A(long + "No.")]}
            for i in range(4)]
    rows.append({"prompt": [U("x" * 300)], "chosen": [A("a")], "rejected": [A("b")]})
    write_jsonl(ws.root / "data/long/train.jsonl", rows)
    r = verify_preference("data/long", "models/tiny-llama", max_length=120, max_prompt_length=20)
    got = reasons(r)
    assert r.verdict == "fail" and got["identical_after_truncation"].rows == [0, 1, 2, 3]
    assert got["dropped_by_trl"].rows == [4] and r.pairs_dropped_by_trl == 1
    assert got["truncation_cuts_replies"].severity == "fail" and r.truncated_pairs == 4
    assert got["prompt_over_max_prompt_length"].rows == [0, 1, 2, 3]  # 21-token prompts over 20
    assert "no max_prompt_length" in got["prompt_over_max_prompt_length"].message
    r = verify_preference("data/long", "models/tiny-llama", max_length=400)
    assert "identical_after_truncation" not in reasons(r) and r.pairs_dropped_by_trl == 0


def test_verify_standard_text_and_implicit_prompts(ws, tiny_model):
    """Standard text pairs: TRL appends EOS, which is scored. Implicit conversations: TRL extracts
    the shared prefix itself; the prompt is still never scored."""
    from tools.preference import verify_preference
    write_jsonl(ws.root / "data/text/train.jsonl",
                [{"prompt": f"Q: {i}+1=? A:", "chosen": f" {i + 1}", "rejected": f" {i + 2}"} for i in range(5)])
    r = verify_preference("data/text", "models/tiny-llama", max_length=64)
    assert r.verdict == "pass" and not r.conversational, r.reasons
    assert r.pairs[0].chosen.text.endswith("[[ 1<|im_end|>]]")  # EOS (<|im_end|>) added and scored
    assert r.pairs[0].chosen.scored_by_role == {"assistant": 2, "template": 1}
    write_jsonl(ws.root / "data/imp/train.jsonl",
                [{"chosen": [U(f"q{i}"), A("good")], "rejected": [U(f"q{i}"), A("bad")]} for i in range(5)])
    r = verify_preference("data/imp", "models/tiny-llama", max_length=64)
    assert r.verdict == "pass" and r.prompt_source == "implicit" and r.prompt_tokens_scored == 0, r.reasons


def test_verify_bad_inputs_name_the_field(ws, tiny_model):
    from tools.errors import UserError
    from tools.preference import verify_preference
    write_jsonl(ws.root / "data/sft/train.jsonl", [{"prompt": [U("q")], "completion": [A("a")]}])
    with pytest.raises(UserError, match="no chosen/rejected") as e:
        verify_preference("data/sft", "models/tiny-llama")
    assert e.value.field == "dataset" and "convert_preference" in e.value.fix
    animals(ws, train=2, test=0)
    with pytest.raises(UserError) as e:
        verify_preference("data/animals", "models/missing")
    assert e.value.field == "tokenizer"


# ------------------------------------------------------------------ recipe and runs

def test_generated_recipe_is_what_trl_dpo_accepts(ws, tiny_model):
    """generate_dpo_recipe's YAML, minus our two keys, leaves nothing unknown for `trl dpo
    --config` (TRL's CLI parser would hand unknown keys to accelerate); literature defaults."""
    from trl.scripts.dpo import make_parser

    from tools.preference_recipe import generate_dpo_recipe
    from tools.train_dpo import EXTRA_KEYS
    animals(ws, train=4, test=2)
    r = generate_dpo_recipe("models/tiny-llama", "data/animals", "recipes/dpo.yaml", "out/dpo", method="lora",
                            max_length=256)
    cfg = yaml.safe_load((ws.root / "recipes/dpo.yaml").read_text())
    assert cfg["trainer"] == "dpo" and cfg["beta"] == 0.1 and cfg["learning_rate"] == 5e-6
    assert cfg["eval_strategy"] == "steps" and r.reference.startswith("the model with the adapter disabled")
    trl_only = {k: v for k, v in cfg.items() if k not in EXTRA_KEYS}
    trl_only["bf16"] = False  # this CPU machine: TrainingArguments checks bf16 against it
    (ws.root / "trl.yaml").write_text(yaml.safe_dump(trl_only))
    *_, config_left, cli_left = make_parser().parse_args_and_config(
        ["--config", str(ws.root / "trl.yaml")], return_remaining_strings=True, separate_remaining_strings=True)
    assert config_left == [] and cli_left == []
    from tools.preference import find_preference_report, recipe_preference, verify_preference
    rep = verify_preference(recipe="recipes/dpo.yaml")  # the report the DPO launch gate looks up
    tok, [(data, split)], settings = recipe_preference(cfg)
    assert rep.settings.max_length == 256
    assert find_preference_report(data, tok, split=split, **settings).key == rep.key
    full = generate_dpo_recipe("models/tiny-llama", "data/animals", "recipes/full.yaml", "out/full", method="full")
    assert full.recipe["learning_rate"] == 5e-7 and "use_peft" not in full.recipe


def test_checking_a_preference_recipe_leaves_the_servers_environment_alone(ws, tiny_model, monkeypatch):
    """TRL's parser exports a recipe's `env:` into the process that parses it. The launch gate
    parses in the server, so without the guard a recipe's env (say CUDA_VISIBLE_DEVICES) would
    stay in the server and reach every later run."""
    import os

    from tools.preference_recipe import generate_dpo_recipe
    from tools.runs import launch_training
    animals(ws, train=4, test=2)
    generate_dpo_recipe("models/tiny-llama", "data/animals", "recipes/dpo.yaml", "out/dpo", method="lora",
                        cpu=True)
    cfg = yaml.safe_load((ws.root / "recipes/dpo.yaml").read_text())
    cfg["env"] = {"LLM_FT_FROM_RECIPE": "1"}
    (ws.root / "recipes/dpo.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    monkeypatch.delenv("LLM_FT_FROM_RECIPE", raising=False)
    plan = launch_training("recipes/dpo.yaml", require_masking_report=False, dry_run=True)
    assert any("parsed by TRL" in c for c in plan.checks), plan.checks
    assert "LLM_FT_FROM_RECIPE" not in os.environ


def test_recipe_refusals(ws, tiny_model):
    from test_merge import make_adapter

    from tools.errors import UserError
    from tools.preference_recipe import generate_dpo_recipe
    animals(ws, train=4, test=0)
    with pytest.raises(UserError, match="betta") as e:
        generate_dpo_recipe("models/tiny-llama", "data/animals", "r.yaml", "out/r", overrides={"betta": 0.2})
    assert e.value.field == "overrides"
    make_adapter(tiny_model, ws.root / "adapters/sft")
    with pytest.raises(UserError, match="merge") as e:
        generate_dpo_recipe("adapters/sft", "data/animals", "r.yaml", "out/r", method="full")
    assert e.value.field == "method"
    r = generate_dpo_recipe("adapters/sft", "data/animals", "r.yaml", "out/r", cpu=True)
    assert r.starts_from == "sft_adapter" and "lora_r" not in r.recipe and r.recipe["use_cpu"] is True


def tiny_dpo_recipe(ws, name: str, model: str, **over) -> str:
    """The tiny model learns fast only at a rate far above real DPO rates (5e-6 LoRA): it is
    random, so every preference is new to it."""
    cfg = dict(trainer="dpo", model_name_or_path=model, dataset_name="data/animals", output_dir=f"out/{name}",
               use_peft=True, lora_r=16, lora_alpha=32, lora_target_modules="all-linear", learning_rate=5e-3,
               lr_scheduler_type="constant", beta=0.1, num_train_epochs=2, per_device_train_batch_size=8,
               max_length=128, logging_steps=1, save_strategy="no", eval_strategy="no",
               gradient_checkpointing=False, use_cpu=True, bf16=False, report_to="none", seed=0)
    cfg.update(over)
    (ws.root / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return f"{name}.yaml"


def test_dpo_learns_the_preference_and_training_status_shows_it(ws, tiny_model):
    """128 pairs, 2 epochs of LoRA DPO on the random tiny model (reference = adapter disabled),
    started by launch_training (its DPO gate, then `python -m tools.train_dpo`):
    held-out implicit-reward accuracy goes from 50% (policy == reference: every pair ties) to
    >= 90%; the policy's own ranking follows; training_status shows the run from its files,
    and metrics.jsonl carries TRL's rewards/margins and rewards/accuracies."""
    from tools.preference import verify_preference
    from tools.runs import launch_training
    animals(ws)
    recipe = tiny_dpo_recipe(ws, "dpo", "models/tiny-llama")
    with pytest.raises(UserError) as e:  # the gate: no preference report for these inputs yet
        launch_training(recipe=recipe)
    assert "verify_preference(recipe=" in e.value.fix
    assert verify_preference(recipe=recipe).verdict != "fail"
    launched = launch_training(recipe=recipe)
    assert "tools.train_dpo" in " ".join(launched.command)
    from conftest import wait_for_run
    s = wait_for_run(launched.run_id)
    assert s.state == "completed", (s.error, s.log_tail)
    assert s.step == s.max_steps == 32 and s.progress_pct == 100.0 and s.loss is not None
    summ = s.run_summary
    assert summ["trainer"] == "dpo" and summ["reference"].startswith("the model with the adapter disabled")
    pe = summ["preference_eval"]  # on the 32 test pairs, not the 128 training pairs
    assert pe["split"] == "test" and pe["rows"] == 32 and "implicit reward margin" in pe["measure"]
    before, after = pe["before"], pe["after"]
    assert before["implicit_reward_accuracy"] == 0.5 and before["mean_margin"] == 0.0
    assert after["implicit_reward_accuracy"] >= 0.9 and after["mean_margin"] > 0 and after["pairs"] == 32
    assert after["policy_prefers_chosen"] >= 0.9 and pe["rise"] >= 0.4
    assert summ["method_metrics"]["readings"][0].startswith("held-out preference accuracy 50% -> ")
    # the status reads the trainer's own metrics from the run's log, not only summary.json
    mm = s.method_metrics
    assert mm["trainer"] == "dpo" and mm["metrics"]["rewards/margins"]["last"] > 0.1, mm
    assert "is completed at step 32/32" in s.summary
    recs = [json.loads(x) for x in (ws.root / "out/dpo/metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "rewards/margins" in r]
    assert len(train) == 32 and {"rewards/accuracies", "rewards/chosen", "rewards/rejected"} <= set(train[0])
    assert train[0]["rewards/margins"] == 0.0 and train[-1]["rewards/margins"] > 0.1
    out = ws.root / "out/dpo"
    assert (out / "adapter_model.safetensors").is_file() and not (out / "ref").exists()


def test_dpo_from_an_sft_adapter_uses_it_as_the_reference(ws, tiny_model, monkeypatch):
    """Starting from an SFT adapter (non-zero): the adapter is trained further and its frozen
    copy is the reference, so the first step's rewards are exactly 0 (policy == reference); the
    adapter-disabled base would give non-zero rewards there. The saved adapter is only the
    trained one, on the same base."""
    from safetensors.torch import load_file
    from test_merge import make_adapter

    from tools.train_dpo import train_dpo
    monkeypatch.chdir(ws.root)  # recipe paths are relative to the workspace, as in launched runs
    animals(ws, train=16, test=0)
    sft = make_adapter(tiny_model, ws.root / "adapters/sft")
    s = train_dpo(str(ws.root / tiny_dpo_recipe(ws, "from_sft", "adapters/sft", num_train_epochs=1,
                                                  per_device_train_batch_size=4)))
    assert s["status"] == "completed" and s["sft_adapter"] == "adapters/sft" and "ref" in s["reference"]
    recs = [json.loads(x) for x in (ws.root / "out/from_sft/metrics.jsonl").read_text().splitlines()]
    first = next(r for r in recs if "rewards/chosen" in r)
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    before = load_file(str(sft / "adapter_model.safetensors"))
    after = load_file(str(ws.root / "out/from_sft/adapter_model.safetensors"))
    assert set(after) == set(before) and not (ws.root / "out/from_sft/ref").exists()  # no 'ref' copy saved
    assert any((after[k] - before[k]).abs().max() > 0 for k in before)
    cfg = json.loads((ws.root / "out/from_sft/adapter_config.json").read_text())
    sft_cfg = json.loads((sft / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == sft_cfg["base_model_name_or_path"]
    assert s["trainable_params"] == sum(v.numel() for v in before.values())


def test_full_dpo_trains_against_a_frozen_copy(ws, tiny_model, monkeypatch):
    """Full DPO (no use_peft): TRL loads a second, frozen copy as the reference; the first step
    ties (rewards 0), the whole model is saved and changed."""
    from safetensors.torch import load_file

    from tools.train_dpo import train_dpo
    monkeypatch.chdir(ws.root)
    animals(ws, train=8, test=4)
    s = train_dpo(tiny_dpo_recipe(ws, "full", "models/tiny-llama", use_peft=False, learning_rate=1e-4,
                                  num_train_epochs=1, per_device_train_batch_size=4))
    assert s["status"] == "completed" and s["method"] == "full"
    assert s["reference"] == "a second, frozen copy of the model"
    assert s["model_path"] and s["adapter_path"] is None and s["trainable_params"] == s["total_params"]
    first = next(json.loads(x) for x in (ws.root / "out/full/metrics.jsonl").read_text().splitlines())
    assert first["rewards/margins"] == 0.0
    before = load_file(str(tiny_model / "model.safetensors"))
    after = load_file(str(ws.root / "out/full/model.safetensors"))
    assert any((after[k] - before[k]).abs().max() > 0 for k in before)
    assert s["preference_eval"]["before"]["implicit_reward_accuracy"] == 0.5


def test_dpo_recipe_errors_are_clear(ws, tiny_model, monkeypatch):
    from tools.train_dpo import train_dpo
    monkeypatch.chdir(ws.root)
    animals(ws, train=4, test=0)
    bad = tiny_dpo_recipe(ws, "bad", "models/tiny-llama", eval_strategy="steps", eval_steps=1)
    with pytest.raises(ValueError, match="no split 'test'"):
        train_dpo(bad)
    assert json.loads((ws.root / "out/bad/summary.json").read_text())["status"] == "failed"
    (ws.root / "sp.yaml").write_text(yaml.safe_dump({"trainer": "dpo", "spectrum_config_path": "s.yaml"}))
    with pytest.raises(ValueError, match="Spectrum"):
        train_dpo("sp.yaml")


def test_tools_over_mcp(ws, tiny_model):
    """The three tools through an in-memory MCP client: results validate against the advertised
    output schema; a bad argument is an error result naming the field and the fix."""
    import asyncio

    import jsonschema
    from mcp import Client
    from mcp.server.mcpserver import MCPServer

    import server.preference
    mcp = MCPServer("preference-test")
    server.preference.register(mcp)
    write_jsonl(ws.root / "hh.jsonl", HH)

    async def main():
        async with Client(mcp) as c:
            schemas = {t.name: t.output_schema for t in (await c.list_tools()).tools}
            calls = [("convert_preference", {"dataset": "hh.jsonl", "output_dir": "data/hh"}),
                     ("verify_preference", {"dataset": "data/hh", "tokenizer": "models/tiny-llama"}),
                     ("generate_dpo_recipe", {"model": "models/tiny-llama", "dataset": "data/hh",
                                              "output_path": "r.yaml", "output_dir": "out/r", "cpu": True})]
            for name, args in calls:
                r = await c.call_tool(name, args)
                assert not r.is_error, r.content[0].text
                jsonschema.validate(r.structured_content, schemas[name])
            bad = await c.call_tool("convert_preference", {"dataset": "hh.jsonl", "output_dir": "data/x",
                                                           "column_mapping": {"chosen": "nope"}})
            assert bad.is_error and "column_mapping" in bad.content[0].text and "Fix:" in bad.content[0].text
            return (await c.call_tool("verify_preference", {"dataset": "data/hh",
                                                            "tokenizer": "models/tiny-llama"})).structured_content
    out = asyncio.run(main())
    assert out["verdict"] == "pass" and out["pairs_prepared"] == 2
