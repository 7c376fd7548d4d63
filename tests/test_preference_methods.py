"""KTO, ORPO and GRPO on CPU: the data kinds of convert_preference, their proofs in
verify_preference (KTOTrainer's own preparation; GRPO prompts and rewards), the recipes of
generate_dpo_recipe(trainer=...), and real KTOTrainer / ORPOTrainer / GRPOTrainer runs of the tiny
model through `python -m tools.train_dpo` (KTO through launch_training's background run)."""
from __future__ import annotations

import json
import random

import pytest
import yaml

from tools.errors import UserError

from test_preference import U, A, animal_pair, problems, reasons, write_jsonl


def rows_of(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def kto_rows(n: int) -> list[dict]:
    """Unpaired animal replies: the right sound is thumbs-up, the other thumbs-down."""
    out = []
    for i in range(n):
        p = animal_pair(100 + i)
        good = i % 2 == 0
        out.append({"prompt": p["prompt"], "completion": p["chosen" if good else "rejected"],
                    "label": "up" if good else "down"})
    return out


# ------------------------------------------------------------------ data

def test_kto_label_rows_are_read_and_contradictions_dropped(ws):
    from tools.preference import convert_preference
    rows = kto_rows(12)
    rows.append({**rows[0], "label": "down"})                       # line 13: contradicts line 1
    rows.append({**rows[1]})                                        # line 14: duplicate of line 2
    rows.append({"prompt": [U("q")], "completion": [A("")], "label": True})   # 15: empty completion
    rows.append({"prompt": [U("q2")], "completion": [A("x")], "label": "maybe"})  # 16: no label
    write_jsonl(ws.root / "kto.jsonl", rows)
    r = convert_preference("kto.jsonl", "data/kto", shuffle=False)
    assert r.source_format == "unpaired" and r.written == "unpaired" and r.pairs_written == 11
    p = problems(r)
    assert p["conflicting_labels"].rows == [1, 13] and p["duplicate"].rows == [14]
    assert p["empty_side"].rows == [15] and p["bad_label"].rows == [16]
    out = rows_of(ws.root / "data/kto/train.jsonl")
    assert out[0] == {"prompt": rows[1]["prompt"], "completion": rows[1]["completion"], "label": False}
    assert r.labels == {"desirable": 5, "undesirable": 6}
    assert "desirable_weight between 1.20 and 1.60" in p["label_imbalance"].fix  # as TRL warns too
    assert "11 label rows (5 up / 6 down)" in r.summary and "trainer='kto'" in r.next_steps[1]


def test_kto_imbalance_names_the_weight(ws):
    from tools.preference import convert_preference
    rows = [{"prompt": f"q{i}", "completion": f" a{i}", "label": i % 4 != 0} for i in range(40)]  # 30 up, 10 down
    write_jsonl(ws.root / "kto.jsonl", rows)
    p = problems(convert_preference("kto.jsonl", "data/kto"))
    assert p["label_imbalance"].severity == "warn"
    assert "undesirable_weight between 2.25 and 3.00" in p["label_imbalance"].fix


def test_grpo_prompts_keep_the_final_answer(ws):
    """GSM8K-shaped rows: the answer after '####' becomes `solution`; no-answer rows, prompts given
    two answers and prompts ending with an assistant turn are dropped."""
    from tools.preference import convert_preference
    rows = [{"question": f"What is {i} + {i}?", "answer": f"Add them. #### {2 * i}"} for i in range(6)]
    rows.append({"question": "What is 1 + 1?", "answer": "#### 3"})           # line 7: contradicts line 2
    rows.append({"question": "Empty?", "answer": ""})                          # line 8
    rows.append({"question": [U("hi"), A("hello")], "answer": "1"})            # line 9
    write_jsonl(ws.root / "gsm.jsonl", rows)
    r = convert_preference("gsm.jsonl", "data/gsm", shuffle=False)
    assert r.source_format == "prompt_answer" and r.written == "prompts" and r.pairs_written == 5
    p = problems(r)
    assert p["conflicting_answers"].rows == [2, 7] and p["no_answer"].rows == [8]
    assert p["prompt_ends_with_assistant"].rows == [9]
    assert rows_of(ws.root / "data/gsm/train.jsonl")[0] == {"prompt": "What is 0 + 0?", "solution": "0"}
    assert r.changes["answer_after_####"] == 7 and "rewards=['answer']" in r.next_steps[1]


# ------------------------------------------------------------------ rewards

def test_builtin_rewards():
    from tools.rewards import AnswerReward, FormatReward, LengthPenalty, answer_matches
    assert answer_matches("so the total is 1,234.", "1234") and answer_matches(r"\boxed{0.5}", "0.50")
    assert not answer_matches("it is 12 or 13", "12") and answer_matches("#### 72", "The answer: 72")
    assert answer_matches("Answer: Paris.", "paris") and not answer_matches("Lyon", "Paris")
    ans = AnswerReward()
    conv = [[{"role": "assistant", "content": "I think 7"}], [{"role": "assistant", "content": "8"}]]
    assert ans(conv, solution=["7", "7"]) == [1.0, 0.0] and ans(["7"], solution=[""]) == [None]
    fmt = FormatReward(r"<answer>\d+</answer>$")
    assert fmt(["<answer>4</answer>", "4"]) == [1.0, 0.0]
    pen = LengthPenalty(max_tokens=4)
    assert pen(["", ""], completion_ids=[[1, 2, 3], [1] * 6]) == [-0.0, -0.5]


def test_user_reward_file_is_checked_without_running_it(ws):
    """The file is parsed (ast), never imported: a file whose import would fail still passes when
    its function is right; a missing function, a missing **kwargs and a syntax error are named."""
    from tools.rewards import check_user_reward
    (ws.root / "rewards").mkdir()
    (ws.root / "rewards/ok.py").write_text("import module_that_does_not_exist\n"
                                           "def score(completions, solution, **kwargs):\n    return [0.0]\n")
    u = check_user_reward("rewards/ok.py", "score")
    assert u.keywords == ["solution"] and not u.is_async
    (ws.root / "rewards/bad.py").write_text("def score(completions):\n    return []\nx = (\n")
    with pytest.raises(UserError, match="does not parse") as e:
        check_user_reward("rewards/bad.py", "score")
    assert e.value.field == "rewards"
    (ws.root / "rewards/nokw.py").write_text("def score(completions):\n    return []\n")
    with pytest.raises(UserError, match=r"\*\*kwargs"):
        check_user_reward("rewards/nokw.py", "score")
    with pytest.raises(UserError, match="no top-level function 'other'.*score"):
        check_user_reward("rewards/nokw.py", "other")
    with pytest.raises(UserError) as e:
        check_user_reward("../outside.py", "score")
    assert e.value.field == "rewards"


# ------------------------------------------------------------------ proofs

def test_verify_kto_with_trls_preparation(ws, tiny_model):
    from tools.preference import verify_preference
    write_jsonl(ws.root / "data/kto/train.jsonl",
                [{"prompt": r["prompt"], "completion": r["completion"], "label": r["label"] == "up"}
                 for r in kto_rows(10)])
    r = verify_preference("data/kto", "models/tiny-llama", max_length=128)
    assert r.trainer == "kto" and r.verdict == "pass", r.reasons
    assert r.pairs_prepared == 10 and r.labels == {"desirable": 5, "undesirable": 5} and r.prompt_tokens_scored == 0
    v = r.completions[0]
    reply = rows_of(ws.root / "data/kto/train.jsonl")[v.row]["completion"][0]["content"]
    assert v.text.endswith(f"<|im_start|>assistant\n[[{reply}<|im_end|>\n]]") and v.end_of_turn_scored
    assert r.summary.startswith("PASS: 10 of 10 rows prepared by KTOTrainer")
    # A completion that repeats the user turn is scored as the reply: the proof fails.
    bad = [{"prompt": [U(f"q{i}")], "completion": [U(f"q{i}"), A("yes")], "label": bool(i % 2)} for i in range(4)]
    write_jsonl(ws.root / "data/kbad/train.jsonl", bad)
    r = verify_preference("data/kbad", "models/tiny-llama", max_length=128)
    assert r.verdict == "fail" and "prompt_tokens_scored" in reasons(r) and r.next_steps


def grpo_data(ws, n: int = 16) -> str:
    rows = [{"prompt": [U(f"Say seven ({i}).")], "solution": "7"} for i in range(n)]
    write_jsonl(ws.root / "data/seven/train.jsonl", rows)
    return "data/seven"


def test_verify_grpo_prompts_and_rewards(ws, tiny_model):
    """Prompts render with the generation prompt; from the recipe the rewards are checked: the
    reference earns the answer reward, a user file is checked by ast only."""
    from tools.preference import find_preference_report, recipe_preference, verify_preference
    from tools.preference_recipe import generate_dpo_recipe
    grpo_data(ws)
    r = verify_preference("data/seven", "models/tiny-llama")
    assert r.trainer == "grpo" and r.verdict == "pass" and r.pairs_prepared == 16
    assert r.prompts_shown[0].endswith("<|im_start|>assistant\n")
    (ws.root / "rewards").mkdir()
    (ws.root / "rewards/mine.py").write_text("def brevity(completions, **kwargs):\n"
                                             "    return [-len(str(c)) / 100 for c in completions]\n")
    generate_dpo_recipe("models/tiny-llama", "data/seven", "grpo.yaml", "out/grpo", trainer="grpo", cpu=True,
                        rewards=["answer", "format=\\d", "rewards/mine.py:brevity"])
    r = verify_preference(recipe="grpo.yaml")
    assert r.verdict == "pass", r.reasons
    checks = {c.name: c for c in r.rewards_checked}
    assert checks["answer"].reference_scores_1 == 1.0 and checks["answer"].empty_scores_0 == 1.0
    assert checks["brevity"].kind == "file" and "ast" in checks["brevity"].note
    assert "answer (reference earns 1 on 100%)" in r.summary
    tok, [(data, split)], st = recipe_preference(yaml.safe_load((ws.root / "grpo.yaml").read_text()))
    assert find_preference_report(data, tok, split=split, **st).key == r.key
    # A row without a reference: the answer reward cannot score it.
    write_jsonl(ws.root / "data/seven/train.jsonl", [{"prompt": "Say it.", "solution": "7"},
                                                     {"prompt": "Say it again.", "solution": ""}])
    r = verify_preference(recipe="grpo.yaml")
    assert r.verdict == "fail" and reasons(r)["no_answer"].rows == [1]


# ------------------------------------------------------------------ recipes

def test_recipes_per_method_are_what_trl_accepts(ws, tiny_model):
    """Each trainer's recipe, minus our keys, is what `trl kto|grpo --config` parses (ORPO has no
    CLI); defaults and reasons from the one table; KTO weights from the labels; the memory plan."""
    from trl.scripts.grpo import make_parser as grpo_parser
    from trl.scripts.kto import make_parser as kto_parser

    from tools.preference_recipe import generate_dpo_recipe
    from tools.train_dpo import EXTRA_KEYS
    rows = kto_rows(12)[:9]  # 5 up, 4 down
    write_jsonl(ws.root / "data/kto/train.jsonl",
                [{"prompt": r["prompt"], "completion": r["completion"], "label": r["label"] == "up"} for r in rows])
    grpo_data(ws)
    kto = generate_dpo_recipe("models/tiny-llama", "data/kto", "kto.yaml", "out/kto", trainer="kto")
    grpo = generate_dpo_recipe("models/tiny-llama", "data/seven", "grpo.yaml", "out/grpo", trainer="grpo",
                               gpu_memory_gib=24, overrides={"max_completion_length": 64})  # tiny: 512 positions
    assert kto.recipe["learning_rate"] == 5e-6 and kto.recipe["beta"] == 0.1
    assert grpo.recipe["beta"] == 0.0 and grpo.reference.startswith("none") and grpo.rewards == ["answer"]
    assert grpo.recipe["rewards"] == [{"name": "answer"}] and "num_generations" in grpo.why
    for r, parser in ((kto, kto_parser), (grpo, grpo_parser)):
        trl_only = {k: v for k, v in r.recipe.items() if k not in EXTRA_KEYS}
        trl_only["bf16"] = False  # this CPU machine: TrainingArguments checks bf16 against it
        (ws.root / "trl.yaml").write_text(yaml.safe_dump(trl_only))
        *_, config_left, cli_left = parser().parse_args_and_config(
            ["--config", str(ws.root / "trl.yaml")], return_remaining_strings=True, separate_remaining_strings=True)
        assert config_left == [] and cli_left == [], r.trainer
    m = grpo.memory
    assert m.generation_gib > 0 and m.reference_gib == 0 and m.fits is True and "KV cache" in m.notes[0]
    dpo = generate_dpo_recipe("models/tiny-llama", "data/kto", "d.yaml", "out/d", trainer="kto", method="full",
                              max_length=256)
    assert "frozen copy" in dpo.memory.reference and dpo.recipe["learning_rate"] == 5e-7
    with pytest.raises(UserError) as e:
        generate_dpo_recipe("models/tiny-llama", "data/seven", "x.yaml", "out/x", trainer="dpo")
    assert e.value.field == "trainer"
    write_jsonl(ws.root / "data/nosol/train.jsonl", [{"prompt": "Say seven."}])
    with pytest.raises(UserError, match="'solution'") as e:
        generate_dpo_recipe("models/tiny-llama", "data/nosol", "x.yaml", "out/x", trainer="grpo")
    assert e.value.field == "rewards"


def test_dpo_memory_plan_counts_both_sides_and_the_reference(ws, tiny_model):
    """DPO: chosen + rejected in one forward (2x the sequences of the same micro-batch); LoRA's
    reference is the disabled adapter (0 GiB), full's a frozen copy, precompute releases it."""
    from tools.memory import estimate_memory
    from tools.preference_memory import plan_memory
    cfg = {"per_device_train_batch_size": 2, "max_length": 512, "use_peft": True}
    lora = plan_memory("dpo", "Qwen2.5-7B", cfg, method="lora", gpu_memory_gib=80)
    two = estimate_memory("Qwen2.5-7B", method="lora", seq_len=512, micro_batch=4)
    assert lora.policy_sequences == 4 and lora.policy_gib == round(two.total_gib, 3) and lora.reference_gib == 0
    full = plan_memory("dpo", "Qwen2.5-7B", {**cfg, "use_peft": False}, method="full", gpu_memory_gib=80)
    assert 13 < full.reference_gib < 16 and "frozen copy" in full.reference
    pre = plan_memory("dpo", "Qwen2.5-7B", {**cfg, "use_peft": False, "precompute_ref_log_probs": True},
                      method="full")
    assert pre.reference_gib == 0 and "precomputed" in pre.reference
    orpo = plan_memory("orpo", "Qwen2.5-7B", {**cfg, "use_peft": False}, method="full")
    assert orpo.reference_gib == 0 and orpo.policy_sequences == 4


# ------------------------------------------------------------------ runs

def _wait(rid: str):
    from conftest import wait_for_run
    return wait_for_run(rid)


def test_kto_runs_through_launch_training(ws, tiny_model):
    """KTO: the launch gate wants the KTO proof for exactly the recipe's inputs, then the
    background run trains with KTOTrainer; status shows the run, summary.json the method metrics."""
    from tools.preference import verify_preference
    from tools.preference_recipe import generate_dpo_recipe
    from tools.runs import launch_training
    write_jsonl(ws.root / "data/kto/train.jsonl",
                [{"prompt": r["prompt"], "completion": r["completion"], "label": r["label"] == "up"}
                 for r in kto_rows(16)])
    generate_dpo_recipe("models/tiny-llama", "data/kto", "kto.yaml", "out/kto", trainer="kto", cpu=True,
                        max_length=128, overrides={"learning_rate": 5e-3, "per_device_train_batch_size": 4,
                                                   "gradient_accumulation_steps": 1, "logging_steps": 1,
                                                   "save_strategy": "no", "lr_scheduler_type": "constant"})
    with pytest.raises(UserError) as e:
        launch_training(recipe="kto.yaml")
    assert "verify_preference(recipe=" in e.value.fix
    assert verify_preference(recipe="kto.yaml").verdict == "pass"
    launched = launch_training(recipe="kto.yaml")
    assert "tools.train_dpo" in " ".join(launched.command)
    s = _wait(launched.run_id)
    assert s.state == "completed", (s.error, s.log_tail)
    summ = s.run_summary
    assert summ["trainer"] == "kto" and summ["steps"] == 4 and "adapter disabled" in summ["reference"]
    mm = summ["method_metrics"]
    assert {"rewards/margins", "kl"} <= set(mm["metrics"]) and mm["readings"][0].startswith("reward margin")
    assert (ws.root / "out/kto/adapter_model.safetensors").is_file()


def test_grpo_trains_with_builtin_and_user_rewards(ws, tiny_model, monkeypatch):
    """A real GRPOTrainer run (4 generations of 8 tokens a step, CPU): the built-in answer reward
    and a user's reward file (imported in the training process only) are both logged per function."""
    from tools.preference_recipe import generate_dpo_recipe
    from tools.train_dpo import train_dpo
    monkeypatch.chdir(ws.root)
    grpo_data(ws, 8)
    (ws.root / "rewards").mkdir()
    (ws.root / "rewards/sevens.py").write_text(
        "def sevens(completions, **kwargs):\n"
        "    texts = [c[0]['content'] if isinstance(c, list) else c for c in completions]\n"
        "    return [t.count('7') / max(len(t), 1) for t in texts]\n")
    generate_dpo_recipe("models/tiny-llama", "data/seven", "grpo.yaml", "out/grpo", trainer="grpo", cpu=True,
                        rewards=["answer", "rewards/sevens.py:sevens"],
                        overrides={"max_completion_length": 8, "max_steps": 3, "logging_steps": 1,
                                   "save_strategy": "no", "learning_rate": 1e-3})
    s = train_dpo("grpo.yaml")
    assert s["status"] == "completed" and s["trainer"] == "grpo" and s["steps"] == 3
    assert s["reference"].startswith("none: beta 0")
    mm = s["method_metrics"]
    assert set(mm["rewards"]) == {"answer", "sevens"} and "reward" in mm["metrics"]
    assert mm["metrics"]["completions/mean_length"]["last"] <= 8
    assert any(x.startswith("reward ") for x in mm["readings"])


def test_orpo_trains_without_a_reference(ws, tiny_model, monkeypatch):
    """ORPO (no reference): its held-out accuracy is the policy's own length-normalised ranking
    (beta * mean token log-prob), measured on the test split before and after: the start model's
    own preference before (not necessarily 50%), >= 90% after. ORPO's odds-ratio term is weighted
    by beta beside the SFT loss: on the random tiny model it needs beta 1 and 4 epochs."""
    from tools.preference_recipe import generate_dpo_recipe
    from tools.train_dpo import train_dpo
    monkeypatch.chdir(ws.root)
    from test_preference import animals
    animals(ws, train=64, test=16)
    r = generate_dpo_recipe("models/tiny-llama", "data/animals", "orpo.yaml", "out/orpo", trainer="orpo", cpu=True,
                            max_length=128, overrides={"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
                                                       "logging_steps": 1, "save_strategy": "no", "beta": 1.0,
                                                       "learning_rate": 1e-2, "lr_scheduler_type": "constant",
                                                       "warmup_steps": 0, "num_train_epochs": 4, "eval_strategy": "no"})
    assert r.reference.startswith("none") and r.recipe["trainer"] == "orpo"
    s = train_dpo("orpo.yaml")
    assert s["status"] == "completed" and s["trainer"] == "orpo" and s["steps"] == 32
    assert {"rewards/margins", "log_odds_ratio"} <= set(s["method_metrics"]["metrics"])
    assert (ws.root / "out/orpo/adapter_model.safetensors").is_file()
    pe = s["preference_eval"]
    assert pe["split"] == "test" and pe["rows"] == 16 and "ORPO reward" in pe["measure"]
    assert pe["before"]["pairs"] == 16 and "policy_prefers_chosen" not in pe["before"]  # it is the same figure
    assert pe["after"]["implicit_reward_accuracy"] >= 0.9 and pe["after"]["mean_margin"] > 0
    assert pe["rise"] == round(pe["after"]["implicit_reward_accuracy"] - pe["before"]["implicit_reward_accuracy"], 4)


def test_kto_heldout_accuracy_is_the_sign_of_the_reward(ws, tiny_model, monkeypatch):
    """KTO on labelled rows with a test split: the held-out accuracy is the share of test rows whose
    implicit reward beta*(log pi - log ref) has the label's sign; before training the policy is the
    reference (every reward 0: 50%), after it both labels are ranked right. The test rows are not
    the training rows (16 of them, not 64); the reading leads summary.json's method_metrics."""
    from tools.preference_recipe import generate_dpo_recipe
    from tools.train_dpo import train_dpo
    monkeypatch.chdir(ws.root)
    rows = [{"prompt": r["prompt"], "completion": r["completion"], "label": r["label"] == "up"} for r in kto_rows(80)]
    write_jsonl(ws.root / "data/kto/train.jsonl", rows[:64])
    write_jsonl(ws.root / "data/kto/test.jsonl", rows[64:])
    generate_dpo_recipe("models/tiny-llama", "data/kto", "kto.yaml", "out/kto", trainer="kto", cpu=True,
                        max_length=128, overrides={"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
                                                   "logging_steps": 1, "save_strategy": "no", "learning_rate": 5e-3,
                                                   "lr_scheduler_type": "constant", "warmup_steps": 0,
                                                   "num_train_epochs": 2, "eval_strategy": "no"})
    s = train_dpo("kto.yaml")
    pe = s["preference_eval"]
    assert pe["split"] == "test" and pe["rows"] == 16 and "label's sign" in pe["measure"]
    before, after = pe["before"], pe["after"]
    assert before["implicit_reward_accuracy"] == 0.5 and before["mean_signed_reward"] == 0.0
    assert (after["desirable"], after["undesirable"]) == (8, 8)
    assert after["desirable_accuracy"] >= 0.9 and after["undesirable_accuracy"] >= 0.9, after
    assert after["mean_signed_reward"] > 0 and pe["rise"] >= 0.4
    assert s["method_metrics"]["readings"][0] == (f"held-out preference accuracy 50% -> "
                                                  f"{after['implicit_reward_accuracy']:.0%} (16 test rows)")


def test_method_metrics_read_trl_logs():
    from tools.preference_status import method_metrics
    logs = [{"loss": 0.69, "rewards/margins": 0.0, "rewards/accuracies": 0.0, "step": 1},
            {"loss": 0.5, "rewards/margins": 0.8, "rewards/accuracies": 1.0, "step": 2},
            {"eval_rewards/accuracies": 0.9, "step": 2}]
    m = method_metrics("dpo", logs)
    assert m["metrics"]["rewards/margins"] == {"first": 0.0, "last": 0.8, "last_mean": 0.4, "points": 2}
    assert m["metrics"]["eval_rewards/accuracies"]["last"] == 0.9 and "reward accuracy 50%" in m["readings"][1]
    g = method_metrics("grpo", [{"reward": 0.1, "rewards/answer/mean": 0.1, "rewards/answer/std": 0.3,
                                 "frac_reward_zero_std": 1.0}, {"reward": 0.6, "rewards/answer/mean": 0.6,
                                                                "rewards/answer/std": 0.4, "frac_reward_zero_std": 1.0}])
    assert g["rewards"]["answer"]["std_last"] == 0.4 and g["readings"][0].startswith("reward rose: 0.1")
    assert any("frac_reward_zero_std" in x for x in g["readings"])


def test_tools_over_mcp_summaries(ws, tiny_model):
    """Through an in-memory MCP client: the summary carries the result's figures and the next step
    names the right tool and path."""
    import asyncio

    from mcp import Client

    from server.app import create_server
    write_jsonl(ws.root / "kto.jsonl", kto_rows(10))

    async def main():
        async with Client(create_server()) as c:
            conv = await c.call_tool("convert_preference", {"dataset": "kto.jsonl", "output_dir": "data/kto"})
            ver = await c.call_tool("verify_preference", {"dataset": "data/kto", "tokenizer": "models/tiny-llama"})
            rec = await c.call_tool("generate_dpo_recipe", {"model": "models/tiny-llama", "dataset": "data/kto",
                                                            "output_path": "kto.yaml", "output_dir": "out/kto",
                                                            "trainer": "kto", "cpu": True})
            return conv, ver, rec
    conv, ver, rec = asyncio.run(main())
    for r in (conv, ver, rec):
        assert not r.is_error, r.content[0].text
    assert "10 label rows (5 up / 5 down)" in conv.structured_content["summary"]
    assert "verify_preference(dataset='data/kto'" in conv.structured_content["next_steps"][0]
    assert ver.structured_content["summary"].startswith("PASS: 10 of 10 rows prepared by KTOTrainer")
    assert "generate_dpo_recipe(model='models/tiny-llama', dataset='data/kto', trainer='kto'" in \
        ver.structured_content["next_steps"][0]
    assert "KTO lora recipe to kto.yaml" in rec.structured_content["summary"]
    assert rec.structured_content["next_steps"][0] == "verify_preference(recipe='kto.yaml')"
    assert rec.content[0].text.startswith(rec.structured_content["summary"])


@pytest.mark.slow
def test_grpo_mean_reward_rises(ws, tiny_model, monkeypatch):
    """GRPO on a verifiable toy task: the reward is the share of '7' characters in the completion
    (a user's reward file). From a random tiny model (reward ~0) to a policy that says 7: the mean
    reward of the last 5 steps is far above the first 5 (20 steps of 8 completions, full training
    at a toy rate: the model is random, every gain is new to it)."""
    from tools.preference_recipe import generate_dpo_recipe
    from tools.train_dpo import train_dpo
    monkeypatch.chdir(ws.root)
    write_jsonl(ws.root / "data/seven/train.jsonl", [{"prompt": f"Say seven ({i}):", "solution": "7"} for i in range(64)])
    (ws.root / "rewards").mkdir()
    (ws.root / "rewards/sevens.py").write_text(
        "def sevens(completions, **kwargs):\n"
        "    texts = [c[0]['content'] if isinstance(c, list) else c for c in completions]\n"
        "    return [t.count('7') / max(len(t), 1) for t in texts]\n")
    generate_dpo_recipe("models/tiny-llama", "data/seven", "grpo.yaml", "out/grpo", trainer="grpo", cpu=True,
                        method="full", rewards=["rewards/sevens.py:sevens"],
                        overrides={"num_generations": 8, "per_device_train_batch_size": 8, "max_completion_length": 8,
                                   "max_steps": 20, "logging_steps": 1, "save_strategy": "no", "learning_rate": 1e-2,
                                   "lr_scheduler_type": "constant", "warmup_steps": 0, "seed": 0})
    s = train_dpo("grpo.yaml")
    rewards = [json.loads(x).get("reward") for x in (ws.root / "out/grpo/metrics.jsonl").read_text().splitlines()]
    rewards = [float(r) for r in rewards if r is not None]
    assert len(rewards) == 20
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert first < 0.1 and last > first + 0.3, rewards
    assert s["method_metrics"]["readings"][0].startswith("reward rose")


def test_launch_refuses_a_grpo_recipe_whose_reward_file_broke(ws, tiny_model):
    """The reward file is checked again at launch (ast, before anything starts): a function that
    lost its **kwargs since the recipe was written is refused, naming the file and the fix."""
    from tools.preference_recipe import generate_dpo_recipe
    from tools.runs import launch_training
    grpo_data(ws, 4)
    (ws.root / "rewards").mkdir()
    (ws.root / "rewards/r.py").write_text("def r(completions, **kwargs):\n    return [0.0] * len(completions)\n")
    generate_dpo_recipe("models/tiny-llama", "data/seven", "grpo.yaml", "out/grpo", trainer="grpo", cpu=True,
                        rewards=["rewards/r.py:r"])
    (ws.root / "rewards/r.py").write_text("def r(completions):\n    return [0.0] * len(completions)\n")
    with pytest.raises(UserError, match=r"rewards/r.py:r\(completions\) must accept") as e:
        launch_training(recipe="grpo.yaml")
    assert e.value.field == "recipe" and not (ws.root / "out/grpo").exists()


def test_sft_adapter_that_does_not_match_its_base_is_refused_before_anything_starts(ws, tiny_model):
    """The adapter's own base (adapter_config.json) is checked from file headers: a base of other
    sizes names the first modules that differ, a base that is gone is named; the recipe tool refuses
    (field model) and so does launch_training's gate (field recipe) for a recipe written earlier."""
    import json as _json

    from test_merge import make_adapter
    from test_preference import animals

    from tools.preference_recipe import generate_dpo_recipe
    from tools.runs import launch_training
    from tools.tiny import build_tiny_model
    animals(ws, train=4, test=0)
    make_adapter(tiny_model, ws.root / "adapters/sft")
    build_tiny_model(ws.root / "models/wide", hidden_size=128)
    cfg_file = ws.root / "adapters/sft/adapter_config.json"
    good = _json.loads(cfg_file.read_text())
    generate_dpo_recipe("adapters/sft", "data/animals", "dpo.yaml", "out/dpo", cpu=True)  # matching: accepted

    def rebase(base: str) -> None:
        cfg_file.write_text(_json.dumps({**good, "base_model_name_or_path": base}))
    rebase("models/wide")
    with pytest.raises(UserError, match=r"does not match its base 'models/wide': 14 of 14 LoRA modules differ "
                                         r"\(model.layers.0.mlp.down_proj: 256 -> 64 in the adapter, 256 -> 128") as e:
        generate_dpo_recipe("adapters/sft", "data/animals", "x.yaml", "out/x", cpu=True)
    assert e.value.field == "model" and "base_model_name_or_path" in e.value.fix
    with pytest.raises(UserError, match="does not match its base") as e:
        launch_training(recipe="dpo.yaml", require_masking_report=False)
    assert e.value.field == "recipe" and not (ws.root / "out/dpo").exists()
    rebase("models/gone")
    with pytest.raises(UserError, match="base 'models/gone'.*is not a model directory") as e:
        generate_dpo_recipe("adapters/sft", "data/animals", "x.yaml", "out/x", cpu=True)
    assert e.value.field == "model" and not (ws.root / "x.yaml").exists()


def test_grpo_data_without_a_prompt_is_refused_naming_the_column(ws, tiny_model):
    from tools.preference import convert_preference, verify_preference
    from tools.preference_recipe import generate_dpo_recipe
    write_jsonl(ws.root / "np.jsonl", [{"text": "say 7", "solution": "7"}])
    with pytest.raises(UserError, match="no preference columns") as e:
        convert_preference("np.jsonl", "data/np")
    assert e.value.field == "dataset" and "column_mapping" in e.value.fix
    write_jsonl(ws.root / "data/np/train.jsonl", [{"text": "say 7", "solution": "7"}])
    with pytest.raises(UserError, match=r"row 1 has no `prompt`.*\['solution', 'text'\]; trainer grpo") as e:
        generate_dpo_recipe("models/tiny-llama", "data/np", "g.yaml", "out/g", trainer="grpo", cpu=True)
    assert e.value.field == "dataset" and "convert_preference" in e.value.fix and not (ws.root / "g.yaml").exists()
    with pytest.raises(UserError, match="nor a prompt alone") as e:
        verify_preference("data/np", "models/tiny-llama")
    assert e.value.field == "dataset"


def _trl(argv: list[str], cwd, timeout: int = 300):
    """TRL's own CLI in a subprocess, from the workspace root, the repository and '.' importable."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": f"{repo}:.", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([str(Path(sys.executable).parent / "trl"), *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_recipes_run_with_trls_own_cli(ws, tiny_model, monkeypatch, capsys):
    """Done-when of issue 12: a DPO and a GRPO recipe written by generate_dpo_recipe run with
    `trl dpo --config` / `trl grpo --config` after `python -m tools.train_dpo --to-trl` (our keys
    removed; GRPO's rewards as reward_funcs import paths: the built-in answer reward and a user's
    reward file). What TRL's CLI cannot say (a reward with parameters, an SFT-adapter start, ORPO)
    is refused with the reason."""
    from test_merge import make_adapter
    from test_preference import animals

    from tools.preference_recipe import generate_dpo_recipe
    from tools.train_dpo import main, trl_cli_form
    monkeypatch.chdir(ws.root)
    animals(ws, train=8, test=0)
    grpo_data(ws, 8)
    (ws.root / "rewards").mkdir()
    (ws.root / "rewards/sevens.py").write_text("def sevens(completions, **kwargs):\n"
                                               "    return [float('7' in str(c)) for c in completions]\n")
    steps = {"max_steps": 1, "save_strategy": "no", "logging_steps": 1}
    generate_dpo_recipe("models/tiny-llama", "data/animals", "dpo.yaml", "out/dpo", cpu=True, max_length=128,
                        overrides={**steps, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1})
    generate_dpo_recipe("models/tiny-llama", "data/seven", "grpo.yaml", "out/grpo", trainer="grpo", cpu=True,
                        rewards=["answer", "rewards/sevens.py:sevens"], overrides={**steps, "max_completion_length": 8})
    for trainer in ("dpo", "grpo"):
        assert main(["--config", f"{trainer}.yaml", "--to-trl", f"{trainer}.trl.yaml"]) == 0
        assert f"trl {trainer} --config {trainer}.trl.yaml" in capsys.readouterr().out
        cfg = yaml.safe_load((ws.root / f"{trainer}.trl.yaml").read_text())
        assert "trainer" not in cfg and "rewards" not in cfg
        run = _trl([trainer, "--config", f"{trainer}.trl.yaml"], ws.root)
        assert run.returncode == 0, run.stderr[-3000:]
        assert (ws.root / f"out/{trainer}/adapter_model.safetensors").is_file()
    assert cfg["reward_funcs"] == ["tools.rewards.answer", "rewards.sevens.sevens"]
    assert "rewards/answer/mean" in run.stdout + run.stderr and "rewards/sevens/mean" in run.stdout + run.stderr
    generate_dpo_recipe("models/tiny-llama", "data/seven", "len.yaml", "out/len", trainer="grpo", cpu=True,
                        rewards=["length=16"])
    with pytest.raises(ValueError, match="has parameters"):
        trl_cli_form("len.yaml")
    generate_dpo_recipe("models/tiny-llama", "data/animals", "orpo.yaml", "out/orpo", trainer="orpo", cpu=True)
    with pytest.raises(ValueError, match="no `trl orpo` command"):
        trl_cli_form("orpo.yaml")
    make_adapter(tiny_model, ws.root / "adapters/sft")
    generate_dpo_recipe("adapters/sft", "data/animals", "sft.yaml", "out/sft", cpu=True)
    with pytest.raises(ValueError, match="SFT adapter directory.*merge_adapter"):
        trl_cli_form("sft.yaml")
