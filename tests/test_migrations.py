"""Every migration of recipe_migrate, one case each: the renamed keys, the removed keys, the
specially migrated ones, and the "old and new key both set" conflict.

The expected results are written out here, not read from the product's tables, so a migration
removed or changed in tools/recipe_migrate.py fails its own case."""
from __future__ import annotations

import pytest

from tools.recipe_migrate import REMOVED, RENAMED, migrate

# old key -> (new key, value given, value expected)
RENAMES = {
    "max_seq_length": ("max_length", 2048, 2048),
    "max_seq_len": ("max_length", 512, 512),
    "use_liger": ("use_liger_kernel", True, True),
    "torch_dtype": ("dtype", "torch.bfloat16", "bfloat16"),
    "evaluation_strategy": ("eval_strategy", "steps", "steps"),
    "no_cuda": ("use_cpu", True, True),
    "per_gpu_train_batch_size": ("per_device_train_batch_size", 4, 4),
    "per_gpu_eval_batch_size": ("per_device_eval_batch_size", 2, 2),
    "push_to_hub_token": ("hub_token", "hf_x", "hf_x"),
    "push_to_hub_model_id": ("hub_model_id", "me/model", "me/model"),
    "bnb_4bit_use_double_quant": ("use_bnb_nested_quant", True, True),
    "use_nested_quant": ("use_bnb_nested_quant", True, True),
    "gradient_checkpointing": ("activation_checkpointing", True, True),
    "gradient_checkpointing_kwargs": ("activation_checkpointing_kwargs", {"use_reentrant": False},
                                      {"use_reentrant": False}),
}
REMOVALS = ["overwrite_output_dir", "save_safetensors", "include_tokens_per_second", "fp16_backend",
            "half_precision_backend", "use_mps_device", "dataset_batch_size", "num_of_sequences",
            "chars_per_token", "push_to_hub_organization", "tpu_num_cores", "past_index", "ray_scope",
            "mp_parameters"]


def test_the_lists_here_cover_the_product_tables():
    assert set(RENAMES) == set(RENAMED) and set(REMOVALS) == set(REMOVED)


@pytest.mark.parametrize("old", sorted(RENAMES))
def test_renamed_key(old):
    new, given, expected = RENAMES[old]
    cfg, changes, _ = migrate({"learning_rate": 1e-4, old: given, "seed": 1})
    assert old not in cfg and cfg[new] == expected
    assert list(cfg) == ["learning_rate", new, "seed"]  # same position
    (c,) = [c for c in changes if c.key == old]
    assert c.old == given and c.new == {new: expected} and c.reason


@pytest.mark.parametrize("old", sorted(RENAMES))
def test_renamed_key_conflict_keeps_the_new_one(old):
    new, given, _ = RENAMES[old]
    other = "other-value"
    cfg, changes, _ = migrate({old: given, new: other})
    assert old not in cfg and cfg[new] == other
    (c,) = [c for c in changes if c.key == old]
    assert c.new is None and f"Both {old} and {new} were set" in c.reason


def test_renamed_key_same_value_on_both_is_no_conflict():
    cfg, changes, _ = migrate({"max_seq_length": 1024, "max_length": 1024})
    assert cfg == {"max_length": 1024}
    assert changes[0].new == {"max_length": 1024}


@pytest.mark.parametrize("key", REMOVALS)
def test_removed_key(key):
    cfg, changes, _ = migrate({key: True, "seed": 3})
    assert cfg == {"seed": 3}
    (c,) = changes
    assert c.key == key and c.old is True and c.new is None and len(c.reason) > 10


# ---------------------------------------------------------------------------- special migrations
def test_warmup_ratio_becomes_a_float_warmup_steps():
    cfg, ch, _ = migrate({"warmup_ratio": 0.1})
    assert cfg == {"warmup_steps": 0.1} and ch[0].new == {"warmup_steps": 0.1}


def test_warmup_ratio_with_warmup_steps_is_dropped():
    cfg, ch, _ = migrate({"warmup_ratio": 0.1, "warmup_steps": 50})
    assert cfg == {"warmup_steps": 50} and ch[0].new is None and "already set" in ch[0].reason


def test_warmup_ratio_out_of_range_is_dropped_with_a_warning():
    cfg, ch, warns = migrate({"warmup_ratio": 3})
    assert cfg == {} and ch[0].new is None and "not a ratio" in warns[0]


def test_constant_schedule_with_warmup_becomes_constant_with_warmup():
    cfg, ch, _ = migrate({"lr_scheduler_type": "constant", "warmup_steps": 10})
    assert cfg["lr_scheduler_type"] == "constant_with_warmup"
    assert [c.key for c in ch] == ["lr_scheduler_type"]
    cfg, ch, _ = migrate({"lr_scheduler_type": "constant"})  # no warm-up: unchanged
    assert cfg == {"lr_scheduler_type": "constant"} and ch == []


def test_tokenizer_name_or_path_other_than_model_becomes_chat_template_path():
    cfg, ch, _ = migrate({"model_name_or_path": "m/base", "tokenizer_name_or_path": "m/instruct"})
    assert cfg == {"model_name_or_path": "m/base", "chat_template_path": "m/instruct"}
    assert ch[0].new == {"chat_template_path": "m/instruct"}


def test_tokenizer_name_or_path_equal_to_model_is_dropped():
    cfg, ch, _ = migrate({"model_name_or_path": "m/base", "tokenizer_name_or_path": "m/base"})
    assert cfg == {"model_name_or_path": "m/base"} and ch[0].new is None


def test_use_flash_attention_2():
    cfg, ch, _ = migrate({"use_flash_attention_2": True})
    assert cfg == {"attn_implementation": "flash_attention_2"}
    cfg, ch, _ = migrate({"use_flash_attention_2": True, "attn_implementation": "sdpa"})
    assert cfg == {"attn_implementation": "sdpa"}  # an explicit choice wins
    cfg, ch, _ = migrate({"use_flash_attention_2": False})
    assert cfg == {} and ch[0].new is None


def test_bnb_4bit_compute_dtype_becomes_dtype():
    cfg, ch, _ = migrate({"bnb_4bit_compute_dtype": "torch.bfloat16"})
    assert cfg == {"dtype": "bfloat16"} and ch[0].new == {"dtype": "bfloat16"}
    cfg, _, _ = migrate({"bnb_4bit_compute_dtype": "float16", "dtype": "bfloat16"})
    assert cfg == {"dtype": "bfloat16"}


def test_dataset_id_or_path_file_becomes_a_mixture():
    cfg, ch, _ = migrate({"dataset_id_or_path": "data/train.jsonl"})
    assert cfg == {"datasets": [{"path": "json", "data_files": "data/train.jsonl", "split": "train"}]}
    cfg, _, _ = migrate({"dataset_id_or_path": "notes.txt"})
    assert cfg["datasets"][0]["path"] == "text"


def test_dataset_id_or_path_hub_id_becomes_dataset_name():
    cfg, ch, _ = migrate({"dataset_id_or_path": "org/ds"})
    assert cfg == {"dataset_name": "org/ds"} and ch[0].new == {"dataset_name": "org/ds"}


def test_dataset_mixer_and_dataset_splits():
    cfg, _, _ = migrate({"dataset_mixer": {"a/b": 0.5, "c/d": 1}, "dataset_splits": ["train_sft", "test_sft"]})
    assert cfg == {"datasets": [{"path": "a/b", "fraction": 0.5}, {"path": "c/d", "fraction": 1.0}],
                   "dataset_train_split": "train_sft", "dataset_test_split": "test_sft"}


def test_logging_dir_moves_to_env():
    cfg, ch, _ = migrate({"logging_dir": "tb", "env": {"A": "1"}})
    assert cfg == {"env": {"A": "1", "TENSORBOARD_LOGGING_DIR": "tb"}}
    assert ch[0].new == {"env": {"TENSORBOARD_LOGGING_DIR": "tb"}}


def test_model_init_kwargs_torch_dtype():
    cfg, ch, _ = migrate({"model_init_kwargs": {"torch_dtype": "bfloat16", "x": 1}})
    assert cfg == {"model_init_kwargs": {"x": 1, "dtype": "bfloat16"}}
    assert ch[0].key == "model_init_kwargs.torch_dtype"


def test_dataset_kwargs_keep_only_skip_prepare_dataset():
    cfg, ch, _ = migrate({"dataset_kwargs": {"add_special_tokens": False, "skip_prepare_dataset": True}})
    assert cfg == {"dataset_kwargs": {"skip_prepare_dataset": True}}
    cfg, ch, _ = migrate({"dataset_kwargs": {"append_concat_token": False}})
    assert cfg == {} and ch[0].new is None
    cfg, ch, _ = migrate({"dataset_kwargs": {"skip_prepare_dataset": True}})
    assert ch == []


def test_deprecated_values():
    cfg, ch, _ = migrate({"packing_strategy": "bfd-requeue", "loss_type": "chunked_nll",
                          "lora_target_modules": ["all-linear"]})
    assert cfg == {"packing_strategy": "bfd_split", "loss_type": "nll", "lora_target_modules": "all-linear"}
    assert {c.key for c in ch} == {"packing_strategy", "loss_type"}


def test_migrate_does_not_touch_its_input():
    raw = {"max_seq_length": 10, "model_init_kwargs": {"torch_dtype": "bfloat16"}}
    migrate(raw)
    assert raw == {"max_seq_length": 10, "model_init_kwargs": {"torch_dtype": "bfloat16"}}


def test_names_from_before_the_split_still_import():
    """recipe_migrate was split by what it held (issue 14); code importing the old names from it
    gets the one definition in the new home."""
    import tools.recipe_migrate as old
    from tools import accelerate_config, recipe_schema, recipe_templates, recipe_yaml
    homes = {m.__name__.rsplit(".", 1)[1]: m for m in (recipe_schema, recipe_yaml, recipe_templates,
                                                        accelerate_config)}
    for name, home in old._MOVED.items():
        module, _, new = home.partition(":")
        assert getattr(old, name) is getattr(homes[module], new or name), name
    assert old.EXTRA_KEYS == {"spectrum_config_path", "env"}  # its meaning then: accepted besides the fields
    from tools.recipe_migrate import (dump_yaml, end_of_turn_token, infer_method,  # noqa: F401
                                      read_accelerate_config, template_text, trl_fields)
    with pytest.raises(AttributeError):
        old.no_such_name
