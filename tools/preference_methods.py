"""The preference and RL methods this project runs, in one typed place: which TRL classes each
uses, what data it reads, and its recipe defaults with the reason for each.

Light on purpose (no TRL import): launch_training and validate_recipe ask `is_preference_recipe`
on every recipe.

Sources for the defaults (the reasons below name them):
- DPO: Rafailov et al. 2023 (beta 0.1); TRL 1.16 DPOConfig and trl/scripts/dpo.py (full 5e-7,
  LoRA 5e-6); the alignment handbook's Zephyr DPO (5e-7, cosine, warm-up 0.1, 1 epoch).
- KTO: Ethayarajh et al. 2024 (beta 0.1; desirable/undesirable weights so that
  w_d * n_d / (w_u * n_u) is in [1, 4/3], Eq. 8); trl/scripts/kto.py (5e-7, cosine, warm-up 0.1).
- ORPO: Hong et al. 2024 (lambda = TRL's beta 0.1; lr 8e-6 full on Mistral-7B, no SFT stage and
  no reference model); TRL's experimental ORPOConfig.
- GRPO: Shao et al. 2024 (DeepSeekMath: G = 64 there; KL beta 0.04), DAPO (Yu et al. 2025: no
  KL, loss_type dapo, which TRL 1.16 defaults to, beta 0.0), TRL's GRPOConfig (lr 1e-6,
  num_generations 8, max_completion_length 512, temperature 1.0).
The rates are 10-100x below SFT's (2e-4 LoRA / 2e-5 full): the preference losses are steep and
overshooting the reference collapses the chosen log-probs too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

PreferenceTrainer = Literal["dpo", "kto", "orpo", "grpo"]
TRAINERS: tuple[str, ...] = ("dpo", "kto", "orpo", "grpo")
DataKind = Literal["pairs", "unpaired", "prompts"]


@dataclass(frozen=True)
class Default:
    value: Any
    why: str


@dataclass(frozen=True)
class Method:
    """One trainer: its TRL classes (module, config, trainer), data, reference and defaults."""
    name: str
    module: str                  # where TRL defines the classes
    config: str
    trainer: str
    data: DataKind
    reference: bool              # the loss compares with a frozen reference model
    cli: bool                    # `trl <name> --config` exists
    defaults: dict[str, Default] = field(default_factory=dict)
    lora_lr: Default = Default(5e-6, "")
    full_lr: Default = Default(5e-7, "")

    def load(self):
        """(ConfigClass, TrainerClass), imported on demand (TRL is heavy)."""
        import importlib
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # trl.experimental warns on import; ORPO is said to be experimental
            mod = importlib.import_module(self.module)
        return getattr(mod, self.config), getattr(mod, self.trainer)


_SCHEDULE = {
    "lr_scheduler_type": Default("cosine", "cosine with 10% warm-up, as the alignment handbook's recipes."),
    "warmup_steps": Default(0.1, "10% of the steps (a float below 1 is a share in TRL 1.x)."),
    "num_train_epochs": Default(1, "1 (1-3): preference data overfits fast; watch the eval metrics."),
}

METHODS: dict[str, Method] = {
    "dpo": Method(
        "dpo", "trl", "DPOConfig", "DPOTrainer", "pairs", reference=True, cli=True,
        defaults={"beta": Default(0.1, "the DPO paper's and TRL's default; higher keeps the policy closer to the "
                                       "reference."),
                  "loss_type": Default(["sigmoid"], "the DPO loss (TRL default)."),
                  "max_length": Default(1024, "TRL's 1024, prompt + reply (keep_start): verify_preference counts "
                                              "the pairs it cuts."),
                  "per_device_train_batch_size": Default(2, "2 pairs x 8 accumulation = 16 pairs a step "
                                                            "(trl/scripts/dpo.py)."),
                  "gradient_accumulation_steps": Default(8, "see per_device_train_batch_size."),
                  **_SCHEDULE},
        lora_lr=Default(5e-6, "LoRA 5e-6 (trl/scripts/dpo.py): ~40x below LoRA SFT's 2e-4; raise toward 5e-5 if "
                              "rewards/margins stay flat."),
        full_lr=Default(5e-7, "full 5e-7 (Zephyr DPO, trl/scripts/dpo.py): ~40x below full SFT's 2e-5.")),
    "kto": Method(
        "kto", "trl", "KTOConfig", "KTOTrainer", "unpaired", reference=True, cli=True,
        defaults={"beta": Default(0.1, "the KTO paper's and TRL's default."),
                  "loss_type": Default("kto", "the KTO loss (TRL default); apo_zero_unpaired needs no KL batch."),
                  "desirable_weight": Default(1.0, "1.0 for balanced labels; convert_preference says the range of "
                                                   "Eq. 8 of the paper when they are not."),
                  "undesirable_weight": Default(1.0, "see desirable_weight."),
                  "max_length": Default(1024, "TRL's default (prompt + completion, cut from the right)."),
                  "per_device_train_batch_size": Default(8, "KTO estimates its KL term from the other "
                                                            "completions of the micro-batch: it must be > 1, and "
                                                            "larger is a better estimate (the paper uses 32)."),
                  "gradient_accumulation_steps": Default(2, "8 x 2 = 16 examples a step."),
                  **_SCHEDULE},
        lora_lr=Default(5e-6, "LoRA 5e-6, as DPO (trl/scripts/kto.py: 'the optimal configuration for KTO will be "
                              "similar to that of DPO')."),
        full_lr=Default(5e-7, "full 5e-7 (trl/scripts/kto.py)."),),
    "orpo": Method(
        "orpo", "trl.experimental.orpo", "ORPOConfig", "ORPOTrainer", "pairs", reference=False, cli=False,
        defaults={"beta": Default(0.1, "ORPO's lambda (the odds-ratio weight): 0.1 in the paper and TRL."),
                  "max_length": Default(1024, "TRL's default (prompt + reply)."),
                  "per_device_train_batch_size": Default(2, "2 pairs x 8 accumulation = 16 pairs a step."),
                  "gradient_accumulation_steps": Default(8, "see per_device_train_batch_size."),
                  **_SCHEDULE},
        lora_lr=Default(8e-5, "LoRA 8e-5: ORPO also trains the SFT loss (it replaces the SFT stage), so it runs "
                              "near SFT rates; the paper's full rate is 8e-6, LoRA about 10x higher."),
        full_lr=Default(8e-6, "full 8e-6 (the ORPO paper, Mistral-ORPO)."),),
    "grpo": Method(
        "grpo", "trl", "GRPOConfig", "GRPOTrainer", "prompts", reference=False, cli=True,
        defaults={"beta": Default(0.0, "0.0 (TRL 1.16 and DAPO): no KL term, so no reference model is loaded; "
                                       "0.04 (DeepSeekMath) keeps the policy near the start at the cost of a "
                                       "reference forward."),
                  "loss_type": Default("dapo", "TRL's default: token-level normalisation (DAPO), no length bias."),
                  "num_generations": Default(8, "G completions per prompt (TRL's default): the advantage is each "
                                                "reward minus its group's mean, so G >= 4; more is a better "
                                                "baseline at G x the generation cost."),
                  "max_completion_length": Default(512, "TRL's default; the KV cache and the training activations "
                                                        "grow with it. Watch completions/clipped_ratio."),
                  "temperature": Default(1.0, "sampling temperature (TRL default): exploration needs diversity "
                                              "within a group (frac_reward_zero_std near 0)."),
                  "per_device_train_batch_size": Default(8, "completions per device per step: a multiple of "
                                                            "num_generations' divisor; 8 = one prompt's group."),
                  "gradient_accumulation_steps": Default(4, "generation_batch_size = 8 x 4 = 32 completions = 4 "
                                                            "prompts a generation round."),
                  "log_completions": Default(False, "True prints a sample of completions with their rewards."),
                  "lr_scheduler_type": Default("constant_with_warmup", "RL rewards drift; a constant rate with a "
                                                                       "short warm-up (TRL's GRPO examples)."),
                  "warmup_steps": Default(0.05, "5% warm-up."),
                  "num_train_epochs": Default(1, "1 pass over the prompts; set max_steps for a budget.")},
        lora_lr=Default(1e-5, "LoRA 1e-5 (about 10x TRL's full rate, as LoRA needs): ~20x below LoRA SFT."),
        full_lr=Default(1e-6, "full 1e-6 (TRL's GRPOConfig default, DeepSeekMath 1e-6).")),
}

COMMON = {"bf16": True, "gradient_checkpointing": True, "logging_steps": 10, "save_strategy": "steps",
          "save_steps": 200, "save_total_limit": 2, "report_to": "none", "seed": 42}
LORA = {"use_peft": True, "lora_r": 16, "lora_alpha": 16, "lora_dropout": 0.05, "lora_target_modules": "all-linear"}
QLORA = {**LORA, "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "use_bnb_nested_quant": True,
         "dtype": "bfloat16"}


def method_of(cfg: dict) -> Method:
    """The Method of a recipe's `trainer:` key (ValueError when it is none of ours)."""
    name = str(cfg.get("trainer", "")).lower()
    if name not in METHODS:
        raise ValueError(f"trainer: '{cfg.get('trainer')}' - expected one of {', '.join(TRAINERS)}.")
    return METHODS[name]


def is_preference_recipe(cfg: dict) -> bool:
    """A recipe tools.train_dpo runs: `trainer:` one of dpo, kto, orpo, grpo."""
    return str(cfg.get("trainer", "")).lower() in METHODS


def defaults_for(trainer: str, method: str) -> tuple[dict[str, Any], dict[str, str]]:
    """(recipe keys, reason per key) for one trainer and lora/qlora/full."""
    m = METHODS[trainer]
    lr = m.full_lr if method == "full" else m.lora_lr
    cfg = {k: d.value for k, d in m.defaults.items()}
    cfg["learning_rate"] = lr.value
    cfg.update({"lora": LORA, "qlora": QLORA}.get(method, {}))
    why = {k: d.why for k, d in m.defaults.items()}
    why["learning_rate"] = lr.why
    return cfg, why
