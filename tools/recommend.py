"""Choose the fine-tuning method, batch layout and training schedule for a model on given
hardware, with evidence.

The skill's decision tree names the usual answer; the memory estimator decides: the first method
in the goal's order (GOALS) that fits, preferring a plan that fits with the margin the estimator's
error calls for (ESTIMATE_ERROR); then the micro-batch and checkpointing with the highest estimated
throughput, the micro-batch capped so that the written global batch is the target. The schedule
(epochs, global batch, optimizer steps) comes from one rule (`schedule_target`, `schedule_from`)
that generate_recipe uses too. Throughput model: tools/throughput.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Literal, NamedTuple, Optional

from pydantic import BaseModel, Field

from .errors import UserError
from .memory import FITS_FRACTION, GIB, LOAD_PHASE, GPUSpec, MemoryEstimate, estimate_for, find_gpu, require_gpu
from .models import ModelFacts, catalog_facts, catalog_lookup, get_model_facts, smaller_siblings
from .params import Gpu, GpuMemoryGib, NumGpus, SeqLen
from .results import ToolResult
from .throughput import DEFAULT_ROW_TOKENS, estimate_tokens_per_s

MICRO_BATCHES = [1, 2, 4, 8, 16, 32]
# A GPU known only by its memory size: a mid-range card's peak rate and bandwidth (A40 / RTX A6000 class).
UNKNOWN_GPU = GPUSpec(name="unknown GPU", memory_gib=0, bf16=True, tflops_bf16=150.0, bandwidth_tbs=0.8)
Method = Literal["full", "lora", "qlora", "spectrum"]

# ----------------------------------------------------------------------------- defaults
# The estimator's error band: estimate_memory's peak held within 9% of the measured H100 runs
# (bench/estimator_accuracy.py: worst |error| 6.4% over the 15 runs of ../shared/calibration,
# 4.9% over the 7 in tests/fixtures/calibration; sharded layouts are not measured yet).
ESTIMATE_ERROR = 0.09
# A plan "fits with margin" when it would still be within the fits line (FITS_FRACTION: the room
# kept for what no estimate sees, such as other processes, NCCL buffers, fragmentation) if the
# estimate were ESTIMATE_ERROR too low: total <= FITS_FRACTION / (1 + ESTIMATE_ERROR) of the GPU's memory.
MARGIN_FRACTION = FITS_FRACTION / (1 + ESTIMATE_ERROR)


@dataclass(frozen=True)
class ScheduleRules:
    """How many sequences per optimizer step and how many passes, and the limits of adjusting
    them for small data. One place: recommend_method and generate_recipe both read it."""
    # Sequences per optimizer step when the data is large enough: the skill's default, a gradient
    # averaged over enough rows to be steady at LoRA's learning rate 2e-4.
    global_batch: int = 16
    # Fewer optimizer steps barely move a LoRA adapter: its B matrix starts at zero and Adam moves
    # each weight by about lr per step, so after k steps at lr 2e-4 its entries are at most
    # ~k x 2e-4; reaching the scale of the base weights (~1/sqrt(hidden), 0.016 at hidden 4096)
    # takes ~80 steps, and the warm-up (3-10% of the steps) spends the first ones at a lower lr.
    min_optimizer_steps: int = 100
    # The smallest global batch small data may shrink it to: below ~4 sequences per step one odd
    # row dominates an update (noisy loss, clipped gradients).
    min_global_batch: int = 4
    # Passes over the same rows before a small set is memorised (training loss near zero while the
    # held-out loss rises). Full fine-tuning updates every weight and gets there sooner.
    max_epochs: float = 5.0
    max_epochs_full: float = 3.0


@dataclass(frozen=True)
class ModelSizeRule:
    """When the data is too small for the model's size, recommend_method names a smaller model
    of the same family and variant that fits with margin (it never swaps the model itself)."""
    # Under ~1M tokens per epoch (about 2,000 rows of 512 tokens) a dataset teaches tone, format and
    # a domain's phrasing: within reach of a model of ~8-14B parameters. A larger model then costs
    # GPUs, memory margin, time and serving hardware for capability the data does not train; it
    # is still the right choice when the smaller base model cannot do the task (compare both
    # base models on held-out rows with evaluate).
    small_data_tokens: int = 1_000_000
    max_params_for_small_data: float = 15e9


RULES = ScheduleRules()
SIZE_RULE = ModelSizeRule()


def default_epochs(rows: Optional[int], method: str) -> float:
    """num_train_epochs before any small-data adjustment: 3 under 1k rows, 2 under 10k, else 1;
    full fine-tuning at most 2 (it forgets most per pass)."""
    e = 1.0 if rows is None else 3.0 if rows < 1000 else 2.0 if rows < 10000 else 1.0
    return min(e, 2.0) if method == "full" else e


# ----------------------------------------------------------------------------- method order
QUALITY = ["full", "spectrum", "lora", "qlora"]   # best expected quality first (references/methods.md)
CHEAPEST = ["qlora", "lora", "spectrum", "full"]  # least memory per parameter first
# The skill's decision tree by hardware (SKILL.md): (branch, when, methods it puts first, test).
TREE = [
    ("Multi-GPU -> full fine-tuning or Spectrum with DeepSpeed ZeRO-3 (FSDP + QLoRA when the GPUs are "
     "too small)", "several GPUs", ["full", "spectrum"], lambda vram, n: n > 1),
    ("Single high-end GPU (48 GB+) -> Spectrum", "one GPU of 44 GiB or more", ["spectrum"],
     lambda vram, n: vram >= 44),
    ("Consumer GPU (~24 GB) -> QLoRA", "one smaller GPU", ["qlora"], lambda vram, n: True),
]
COST_BRANCH = "Limited compute budget -> QLoRA first, benchmark against the base model"
# What each goal means: the `goal` parameter's description and every printed order come from here.
GOALS = {
    "quality": "best quality first: " + " > ".join(QUALITY),
    "balanced": ("the decision tree's methods for the hardware first ("
                 + "; ".join(f"{when}: {' > '.join(first)}" for _, when, first, _ in TREE)
                 + "), then the others best quality first"),
    "cost": "cheapest first: " + " > ".join(CHEAPEST),
}
GOAL_HELP = ("The order methods are tried in; the first that fits with margin wins. "
             + "; ".join(f"{g}: {text}" for g, text in GOALS.items()) + ".")


def method_order(goal: str, vram: float, num_gpus: int) -> tuple[str, list[str]]:
    """(decision-tree branch, methods in the order `goal` tries them), as GOALS describes."""
    if goal == "cost":
        return COST_BRANCH, list(CHEAPEST)
    branch, _, first, _ = next(t for t in TREE if t[3](vram, num_gpus))
    if goal == "quality":
        return branch, list(QUALITY)
    return branch, first + [m for m in QUALITY if m not in first]


# ----------------------------------------------------------------------------- schedule
class DataSize(BaseModel):
    """How much one epoch holds."""
    rows: Optional[int] = Field(None, description="training rows (estimated from tokens when only "
                                                  "tokens were given).")
    tokens: Optional[int] = Field(None, description="training tokens per epoch, each row cut at seq_len.")


def data_size(rows: Optional[int], tokens: Optional[int], avg_tokens_per_row: int, seq_len: int) -> DataSize:
    """Rows and tokens per epoch: given tokens win; else rows x tokens per row (cut at seq_len)."""
    per_row = min(avg_tokens_per_row, seq_len)
    if tokens:
        return DataSize(rows=rows or math.ceil(tokens / per_row), tokens=tokens)
    return DataSize(rows=rows, tokens=rows * per_row if rows else None)


def sequences_per_epoch(data: DataSize, seq_len: int, packing: bool) -> Optional[int]:
    """What the dataloader batches: packed blocks of seq_len tokens, or one row each."""
    if packing and data.tokens:
        return max(1, math.ceil(data.tokens / seq_len))
    return data.rows


class Schedule(BaseModel):
    """The optimizer steps the run will take, from the data to the batch layout, and what was
    adjusted to give small data enough of them."""
    rows: Optional[int] = None
    tokens_per_epoch: Optional[int] = None
    packing: bool
    seq_len: int
    sequences_per_epoch: Optional[int] = Field(None, description="packed blocks of seq_len (packing) "
                                                                 "or rows: what the dataloader batches.")
    epochs: float
    micro_batch: int
    gradient_accumulation_steps: int
    num_processes: int
    global_batch: int = Field(description="sequences per optimizer step: micro_batch x "
                                          "gradient_accumulation_steps x num_processes (what is written).")
    steps_per_epoch: Optional[int] = None
    optimizer_steps: Optional[int] = Field(None, description="total optimizer steps (Trainer's count).")
    max_steps: Optional[int] = Field(None, description="set by the recipe: it replaces the epochs.")
    adjustments: list[str] = Field([], description="what was changed for small data, and why.")
    warnings: list[str] = []


class ScheduleTarget(NamedTuple):
    global_batch: int
    epochs: float
    adjustments: list[str]


def _steps(sequences: int, per_step: int, epochs: float) -> int:
    return math.ceil(epochs * math.ceil(sequences / per_step))


def _achievable(global_batch: int, world: int) -> int:
    """The global batch a layout can write for a target: a whole number of sequences per process."""
    return world * math.ceil(global_batch / world)


def schedule_target(data: DataSize, seq_len: int, packing: bool, method: str, world: int,
                    global_batch: Optional[int] = None, epochs: Optional[float] = None) -> ScheduleTarget:
    """Global batch and epochs for this data: the defaults, then for small data a smaller global
    batch (down to RULES.min_global_batch, and at least one sequence per process) and more epochs
    (up to RULES.max_epochs) until the run has RULES.min_optimizer_steps. What the caller gave is
    kept."""
    e = epochs if epochs else default_epochs(data.rows, method)
    g = global_batch or RULES.global_batch
    seqs = sequences_per_epoch(data, seq_len, packing)
    notes: list[str] = []
    if seqs is None:
        return ScheduleTarget(g, e, notes)
    need = RULES.min_optimizer_steps
    before = _steps(seqs, _achievable(g, world), e)
    if global_batch is None and before < need:
        floor = _achievable(RULES.min_global_batch, world)
        sizes = range(_achievable(g, world), floor - 1, -world)
        smaller = next((s for s in sizes if _steps(seqs, s, e) >= need), floor)
        if smaller < g:
            notes.append(f"global batch {g} -> {smaller}: {seqs} sequences per epoch at {g} per step give "
                         f"{before} optimizer steps over {e:g} epochs; {smaller} per step gives "
                         f"{_steps(seqs, smaller, e)} (smallest allowed: {floor}).")
            g = smaller
    if epochs is None and _steps(seqs, _achievable(g, world), e) < need:
        cap = RULES.max_epochs_full if method == "full" else RULES.max_epochs
        more = max(e, min(cap, float(math.ceil(need / math.ceil(seqs / _achievable(g, world))))))
        if more > e:
            notes.append(f"epochs {e:g} -> {more:g}: {_steps(seqs, _achievable(g, world), e)} optimizer steps "
                         f"are too few; {more:g} passes give {_steps(seqs, _achievable(g, world), more)} "
                         f"(at most {cap:g} for {method}: more passes memorise a small set).")
            e = more
    return ScheduleTarget(g, e, notes)


def schedule_from(data: DataSize, seq_len: int, packing: bool, micro_batch: int, grad_accum: int,
                  world: int, epochs: float, max_steps: Optional[int] = None,
                  adjustments: Optional[list[str]] = None) -> Schedule:
    """The optimizer steps a written layout takes (the Trainer's count: batches per process per
    epoch, over the accumulation, rounded up, times the epochs), and a warning when too few."""
    seqs = sequences_per_epoch(data, seq_len, packing)
    per_epoch = max(1, math.ceil(math.ceil(seqs / (micro_batch * world)) / grad_accum)) if seqs else None
    total = max_steps if max_steps and max_steps > 0 else (math.ceil(epochs * per_epoch) if per_epoch else None)
    s = Schedule(rows=data.rows, tokens_per_epoch=data.tokens, packing=packing, seq_len=seq_len,
                 sequences_per_epoch=seqs, epochs=epochs, micro_batch=micro_batch,
                 gradient_accumulation_steps=grad_accum, num_processes=world,
                 global_batch=micro_batch * grad_accum * world, steps_per_epoch=per_epoch,
                 optimizer_steps=total, max_steps=max_steps if max_steps and max_steps > 0 else None,
                 adjustments=list(adjustments or []))
    if total is not None and total < RULES.min_optimizer_steps:
        s.warnings.append(_few_steps(s))
    return s


def plan_schedule(data: DataSize, seq_len: int, packing: bool, method: str, micro_batch: int, world: int,
                  global_batch: Optional[int] = None, epochs: Optional[float] = None) -> Schedule:
    """schedule_target, then the layout at this micro-batch (schedule_for)."""
    t = schedule_target(data, seq_len, packing, method, world, global_batch, epochs)
    return schedule_for(t, data, seq_len, packing, micro_batch, world)


def schedule_for(t: ScheduleTarget, data: DataSize, seq_len: int, packing: bool, micro_batch: int,
                 world: int) -> Schedule:
    """The accumulation that reaches the target's global batch at this micro-batch, and its steps."""
    ga = max(1, math.ceil(t.global_batch / (micro_batch * world)))
    s = schedule_from(data, seq_len, packing, micro_batch, ga, world, t.epochs, adjustments=t.adjustments)
    if s.global_batch > t.global_batch:
        s.adjustments.append(f"global batch {s.global_batch}, not {t.global_batch}: micro-batch {micro_batch} x "
                             f"{world} process(es) is already more.")
    return s


def _few_steps(s: Schedule) -> str:
    what = "packed blocks" if s.packing else "rows"
    text = (f"only {s.optimizer_steps} optimizer steps ({s.sequences_per_epoch} {what} per epoch, "
            f"{s.global_batch} per step, " + (f"max_steps {s.max_steps}" if s.max_steps else f"{s.epochs:g} epochs")
            + f"): under ~{RULES.min_optimizer_steps} steps the weights barely move (each step moves a weight by "
            "about the learning rate, and a LoRA adapter starts from zero). Options: ")
    options = []
    if s.rows and s.sequences_per_epoch and not s.max_steps:
        per_seq = s.rows / s.sequences_per_epoch
        options.append(f"more data (about {math.ceil(RULES.min_optimizer_steps * s.global_batch * per_seq / s.epochs):,} "
                       "rows for that many steps)")
    if s.num_processes > 1:
        options.append(f"fewer GPUs (the global batch cannot go below one sequence per GPU: {s.num_processes})")
    if s.packing and s.rows and s.sequences_per_epoch and s.rows > s.sequences_per_epoch:
        options.append(f"packing off (every row its own sequence: {s.rows} per epoch instead of "
                       f"{s.sequences_per_epoch}; verify_masking again with packing=false)")
    if s.max_steps:
        options.append("a larger max_steps")
    return text + "; ".join(options or ["a smaller global batch or more epochs"]) + "."


# ----------------------------------------------------------------------------- results
class Candidate(BaseModel):
    method: str
    sharding: str
    cpu_offload: bool
    optimizer: str
    micro_batch: int
    gradient_checkpointing: bool
    total_gib: float
    fits: Optional[bool]
    why_not: Optional[str] = None


class ModelSuggestion(BaseModel):
    """A smaller model of the same family and variant, suggested when the data is small for the
    model asked about (recommend_method plans the model asked; it never swaps it)."""
    model: str
    hub_id: Optional[str]
    total_params: int
    method: str
    sharding: str
    total_gib: float = Field(description="its estimated total per GPU on the same hardware.")
    why: str


class Recommendation(ToolResult):
    """The plan: method, parallelism, batch layout, schedule, memory evidence, time estimate,
    alternatives."""
    model: str
    total_params: int
    method: Method
    decision_tree_branch: str
    method_order: list[str] = Field(description="the methods in the order the goal tries them.")
    device: str
    num_gpus: int
    gpu_memory_gib: Optional[float]
    sharding: str
    cpu_offload: bool
    dtype: str
    optimizer: str
    seq_len: int
    packing: bool
    liger: bool
    micro_batch: int
    gradient_accumulation_steps: int
    global_batch_sequences: int = Field(description="micro_batch x gradient_accumulation_steps x num_gpus.")
    gradient_checkpointing: bool
    lora_r: Optional[int] = None
    spectrum_fraction: Optional[float] = None
    memory: MemoryEstimate
    fits_with_margin: Optional[bool] = Field(None, description=(
        f"the total stays within {FITS_FRACTION:.0%} of VRAM even if the estimate is {ESTIMATE_ERROR:.0%} "
        f"low (<= {MARGIN_FRACTION:.1%} of VRAM); false: it fits only within the estimate's error."))
    schedule: Schedule
    total_tokens: Optional[int] = Field(None, description="tokens trained: tokens per epoch x epochs.")
    tokens_per_second: Optional[float] = Field(None, description="estimated, all GPUs together.")
    training_hours: Optional[float] = Field(None, description="for the schedule's epochs.")
    smaller_model: Optional[ModelSuggestion] = None
    reasons: list[str]
    alternatives: list[Candidate]
    warnings: list[str] = []


def _throughput(f: ModelFacts, hw: "_Hardware", ask: "_Ask", method: str, mb: int, gc: bool, sh: str, off: bool,
                est: MemoryEstimate) -> float:
    """Tokens/s of a candidate plan, all GPUs (tools.throughput: FLOPs, attention kernel, padding,
    checkpointing, CPU dispatch; the plan packs with SDPA, as estimate_memory assumes)."""
    return estimate_tokens_per_s(f, hw.gpu, method=method, seq_len=ask.seq_len, micro_batch=mb,
                                 gradient_checkpointing=gc, packing=True, attn_implementation="sdpa",
                                 trainable_params=est.trainable_params, avg_tokens_per_row=ask.avg_tokens_per_row,
                                 num_gpus=hw.num_gpus, sharding=sh, cpu_offload=off)


def offload_ram_gib(method: str, est: MemoryEstimate) -> float:
    """CPU RAM an offloaded run holds: QLoRA's 4-bit weights (~0.6 byte per parameter); ZeRO-3
    full/Spectrum: fp32 master weights and Adam moments of what is trained (12 bytes each) plus the
    16-bit parameters (2 bytes each), over all nodes' GPUs of one machine together."""
    if method == "qlora":
        return est.total_params * 0.6 / GIB
    return (est.trainable_params * 12 + est.total_params * 2) / GIB


def fits_with_margin(est: MemoryEstimate, vram: float) -> bool:
    """The total stays within the fits line even if the estimate is ESTIMATE_ERROR too low."""
    return est.total_gib <= MARGIN_FRACTION * vram


# ----------------------------------------------------------------------------- the search
@dataclass
class _Hardware:
    device: str
    num_gpus: int
    vram: float
    gpu: GPUSpec                 # peak TFLOPs and bandwidth for the throughput model
    bf16: bool
    liger: bool
    ram: Optional[float]
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Ask:
    """What the caller asked for, as the search reads it."""
    seq_len: int
    micro_batch: Optional[int]
    modules_to_save: Optional[list[str]]
    data: DataSize
    epochs: Optional[float]
    global_batch: Optional[int]
    max_hours: Optional[float]
    goal: str
    avg_tokens_per_row: int = DEFAULT_ROW_TOKENS


@dataclass
class _Pick:
    method: str
    sharding: str
    offload: bool
    optimizer: str
    tps: float
    micro_batch: int
    gc: bool
    est: MemoryEstimate
    schedule: Schedule
    hours: Optional[float]
    margin: bool

    def candidate(self, why: str) -> Candidate:
        return Candidate(method=self.method, sharding=self.sharding, cpu_offload=self.offload,
                         optimizer=self.optimizer, micro_batch=self.micro_batch, gradient_checkpointing=self.gc,
                         total_gib=self.est.total_gib, fits=True, why_not=why)


@dataclass
class _Search:
    chosen: Optional[_Pick] = None
    alternatives: list[Candidate] = field(default_factory=list)
    too_slow: list[tuple[float, str]] = field(default_factory=list)  # (hours, method) that fit
    # (total GiB per GPU while loading, method, sharding) of layouts that cannot even load
    cannot_load: list[tuple[float, str, str]] = field(default_factory=list)


def _layouts(method: str, num_gpus: int):
    """(sharding, CPU offload, optimizer) to try for a method, in order."""
    if num_gpus == 1:
        shard = [("none", False)]
    elif method in ("full", "spectrum"):
        # last resort: optimizer states and parameters in CPU RAM (slow, but a 70B full run fits)
        shard = [("zero3", False), ("fsdp", False), ("zero3", True)]
    else:  # CPU offload only for QLoRA: 4-bit weights make the PCIe traffic and RAM affordable
        shard = [("none", False), ("fsdp", False)] + ([("fsdp", True)] if method == "qlora" else [])
    for sh, off in shard:
        yield sh, off, "adamw_torch_fused"
        if sh == "none" and method in ("full", "spectrum"):
            yield sh, off, "adamw_8bit"  # bitsandbytes optimizers: single GPU / DDP only


def _estimate(f, hw: _Hardware, ask: _Ask, method, sh, off, opt, mb, gc) -> MemoryEstimate:
    return estimate_for(f, method=method, seq_len=ask.seq_len, micro_batch=mb, gradient_checkpointing=gc,
                        packing=True, optimizer=opt, dtype="bf16" if hw.bf16 else "fp16", liger=hw.liger,
                        num_gpus=hw.num_gpus, sharding=sh, cpu_offload=off, gpu_memory_gib=hw.vram,
                        modules_to_save=ask.modules_to_save if method in ("lora", "qlora") else None)


def _fastest(f, hw: _Hardware, ask: _Ask, method, sh, off, opt, micro_batches):
    """(tokens/s, micro-batch, checkpointing, estimate) of the fastest setting of one layout among
    those that fit with margin, else among those that only fit; None when none fits."""
    best: dict[bool, tuple] = {}
    for gc in (False, True):
        for mb in micro_batches:
            est = _estimate(f, hw, ask, method, sh, off, opt, mb, gc)
            if not est.fits:
                continue
            tps = _throughput(f, hw, ask, method, mb, gc, sh, off, est)
            for margin in {False, fits_with_margin(est, hw.vram)}:
                if margin not in best or tps > best[margin][0] * 1.02:
                    best[margin] = (tps, mb, gc, est)
    return best.get(True) or best.get(False)


def _layout_pick(f, hw: _Hardware, ask: _Ask, method, sh, off, opt, target: ScheduleTarget,
                 res: _Search) -> Optional[_Pick]:
    """One layout's plan, or None (and why, in the alternatives)."""
    cap = max(1, target.global_batch // hw.num_gpus)  # micro-batch x GPUs stays within the global batch
    mbs = [ask.micro_batch] if ask.micro_batch else [m for m in MICRO_BATCHES if m <= cap]
    best = _fastest(f, hw, ask, method, sh, off, opt, mbs)
    if best is None:
        small = _estimate(f, hw, ask, method, sh, off, opt, ask.micro_batch or 1, True)
        when = f"at micro-batch {ask.micro_batch or 1} with checkpointing"
        if small.peak_phase == LOAD_PHASE:
            res.cannot_load.append((small.total_gib, method, sh))
            when = "while the model loads (before sharding: no micro-batch or offload lowers it)"
        res.alternatives.append(Candidate(
            method=method, sharding=sh, cpu_offload=off, optimizer=opt, micro_batch=ask.micro_batch or 1,
            gradient_checkpointing=True, total_gib=small.total_gib, fits=False,
            why_not=f"needs {small.total_gib:.1f} GiB per GPU {when}; limit {FITS_FRACTION:.0%} of "
                    f"{hw.vram:.1f} = {FITS_FRACTION * hw.vram:.1f} GiB"))
        return None
    tps, mb, gc, est = best
    sched = schedule_for(target, ask.data, ask.seq_len, True, mb, hw.num_gpus)
    hours = ask.data.tokens * sched.epochs / tps / 3600 if ask.data.tokens else None
    pick = _Pick(method, sh, off, opt, tps, mb, gc, est, sched, hours, fits_with_margin(est, hw.vram))
    if ask.max_hours and hours and hours > ask.max_hours:
        res.too_slow.append((hours, method))
        res.alternatives.append(pick.candidate(f"estimated {hours:.1f} h > max_hours {ask.max_hours}"))
        return None
    need_ram = offload_ram_gib(method, est) if off else 0.0
    if off and hw.ram is not None and need_ram > hw.ram:
        res.alternatives.append(pick.candidate(f"CPU offload needs ~{need_ram:.0f} GiB of RAM, "
                                               f"{hw.ram:.0f} GiB available"))
        return None
    return pick


def _method_pick(f, hw: _Hardware, ask: _Ask, method: str, offload: bool, res: _Search) -> Optional[_Pick]:
    """The first layout of `method` that fits with margin, else the first that fits."""
    target = schedule_target(ask.data, ask.seq_len, True, method, hw.num_gpus, ask.global_batch, ask.epochs)
    tight = None
    for sh, off, opt in _layouts(method, hw.num_gpus):
        if off != offload:
            continue
        pick = _layout_pick(f, hw, ask, method, sh, off, opt, target, res)
        if pick and pick.margin:
            if tight:
                res.alternatives.append(tight.candidate(_tight_why(tight, hw)))
            return pick
        tight = tight or pick
    return tight


def _tight_why(p: _Pick, hw: _Hardware) -> str:
    return (f"fits ({p.est.total_gib:.1f} GiB) only within the estimate's {ESTIMATE_ERROR:.0%} error of the "
            f"{FITS_FRACTION:.0%} line (margin: {MARGIN_FRACTION * hw.vram:.1f} GiB)")


def _search(f: ModelFacts, hw: _Hardware, order: list[str], ask: _Ask) -> _Search:
    """The first method in `order` with a plan that fits with margin, else the first that fits.
    CPU offload is a last resort across methods: a slower method that fits without it (Spectrum
    with ZeRO-3) beats an offloaded one (full with ZeRO-3 offload); offloading tries the smallest
    RAM footprint first (QLoRA's 4-bit weights ~0.6 B/param, full ZeRO-3 ~14 B/param)."""
    res = _Search()
    for offload in (False, True):
        methods = [m for m in CHEAPEST if m in order] if offload else order
        picks = [p for p in (_method_pick(f, hw, ask, m, offload, res) for m in methods) if p]
        if not picks:
            continue
        res.chosen = next((p for p in picks if p.margin), picks[0])
        for p in picks:
            if p is not res.chosen:
                why = (_tight_why(p, hw) if not p.margin and res.chosen.margin else
                       f"fits ({p.est.total_gib:.1f} GiB), but the '{ask.goal}' order ranks {res.chosen.method} first")
                res.alternatives.append(p.candidate(why))
        break
    return res


# ----------------------------------------------------------------------------- the tool
def recommend_method(
    model: Annotated[str, Field(description="Workspace dir, hub id or catalog name.")],
    gpu: Gpu = None,
    gpu_memory_gib: GpuMemoryGib = None,
    num_gpus: NumGpus = None,
    dataset_rows: Annotated[Optional[int], Field(ge=1)] = None,
    dataset_tokens: Annotated[Optional[int], Field(ge=1)] = None,
    avg_tokens_per_row: Annotated[int, Field(ge=1)] = DEFAULT_ROW_TOKENS,
    epochs: Annotated[Optional[float], Field(gt=0)] = None,
    seq_len: SeqLen = 1024,
    micro_batch: Annotated[Optional[int], Field(ge=1)] = None,
    goal: Literal["quality", "balanced", "cost"] = "balanced",
    allow_methods: Optional[list[Method]] = None,
    max_hours: Annotated[Optional[float], Field(gt=0)] = None,
    global_batch: Annotated[Optional[int], Field(ge=1)] = None,
    modules_to_save: Optional[list[str]] = None,
) -> Recommendation:
    # the docstring is _RECOMMEND_DOC, formatted with the rules it describes (below)
    seq_len = seq_len or 1024
    f = get_model_facts(model)
    _check_inputs(f, seq_len=seq_len, micro_batch=micro_batch, num_gpus=num_gpus,
                  dataset_rows=dataset_rows, dataset_tokens=dataset_tokens)
    ask = _Ask(seq_len=seq_len, micro_batch=micro_batch, modules_to_save=modules_to_save,
               data=data_size(dataset_rows, dataset_tokens, avg_tokens_per_row, seq_len), epochs=epochs,
               global_batch=global_batch, max_hours=max_hours, goal=goal, avg_tokens_per_row=avg_tokens_per_row)
    hw = _hardware(gpu, gpu_memory_gib, num_gpus)
    if not isinstance(hw, _Hardware):  # no GPU on this machine: its HardwareReport
        return _described(_cpu_plan(f, hw, ask, allow_methods), model.strip(), gpu, gpu_memory_gib)
    branch, order = method_order(goal, hw.vram, hw.num_gpus)
    order = [m for m in order if not allow_methods or m in allow_methods]
    if not order:
        raise UserError("no method left.", field="allow_methods", fix="Allow at least one of full, spectrum, lora, qlora.")
    res = _search(f, hw, order, ask)
    if res.chosen is None:
        _refuse(f, hw, ask, res)
    rec = _recommendation(f, hw, ask, branch, order, res, _smaller_model(f, hw, ask, order, res.chosen))
    return _described(rec, model.strip(), gpu, gpu_memory_gib)


_RECOMMEND_DOC = """Plan a fine-tune on this machine or described GPUs: method, layout, batch, schedule and
time, with memory evidence and alternatives.

The method (full, Spectrum, LoRA, QLoRA) is the first in the goal's order that fits: estimate_memory
(load-time and reserved memory included) within {fits:.0%} of VRAM (FITS_FRACTION), preferring plans
that still fit if the estimate is {err:.0%} low (ESTIMATE_ERROR); then multi-GPU sharding and CPU
offload, micro-batch, gradient accumulation and checkpointing ranked by estimated throughput; the
schedule (epochs, global batch, optimizer steps; adjusted for small data) that generate_recipe
writes, the training time, a smaller model of the same family when the data is small for this one,
the alternatives with their memory and why they were not chosen, and warnings.

Parameters:
- gpu / gpu_memory_gib / num_gpus: the target; omitted: this machine's (detected).
- dataset_rows, or dataset_tokens (tokens per epoch, overrides rows x avg_tokens_per_row).
- epochs: num_train_epochs (default: 3 under 1k rows, 2 under 10k, else 1, full at most 2; raised
  for small data up to {max_epochs:g}, full {max_epochs_full:g}, to reach {min_steps} optimizer steps).
- seq_len: max_length; micro_batch: fix it instead of searching.
- goal: {goal_help}
- allow_methods: restrict the methods considered; max_hours: reject slower plans.
- global_batch: target sequences per optimizer step (default {global_batch}, lowered for small data
  down to {min_global_batch} to reach {min_steps} optimizer steps).
- modules_to_save: LoRA/QLoRA also fully train these, e.g. ['lm_head', 'embed_tokens'] when training
  a base model with a new chat template (their copies, gradients and states count)."""
recommend_method.__doc__ = _RECOMMEND_DOC.format(
    fits=FITS_FRACTION, err=ESTIMATE_ERROR, max_epochs=RULES.max_epochs, max_epochs_full=RULES.max_epochs_full,
    min_steps=RULES.min_optimizer_steps, goal_help=GOAL_HELP, global_batch=RULES.global_batch,
    min_global_batch=RULES.min_global_batch)


def _described(rec: Recommendation, model: str, gpu: Optional[str], gpu_memory_gib: Optional[float]) -> Recommendation:
    """The plan with the summary an agent relays and the call that writes it."""
    per_step = (f"micro-batch {rec.micro_batch} x {rec.gradient_accumulation_steps} accumulation"
                + (f" x {rec.num_gpus} GPUs" if rec.num_gpus > 1 else "") + f" = {rec.global_batch_sequences} per step")
    where = rec.device if len(rec.device) <= 60 else rec.device[:57] + "..."
    mem = (f"{rec.memory.total_gib:.1f} of {rec.gpu_memory_gib:.1f} GiB per GPU" if rec.gpu_memory_gib
           else f"{rec.memory.total_gib:.1f} GiB of RAM")
    layout = f", {rec.sharding}" + (" + CPU offload" if rec.cpu_offload else "") if rec.sharding != "none" else ""
    speed = f"; ~{rec.tokens_per_second:,.0f} tokens/s" if rec.tokens_per_second else ""
    hours = f", ~{rec.training_hours:.1f} h" if rec.training_hours is not None else ""
    rec.summary = f"{rec.method}{layout} for {rec.model} on {where}: {mem}, {per_step}{speed}{hours}."
    target = (f", gpu='{gpu}'" if gpu else "") + (f", gpu_memory_gib={gpu_memory_gib:g}" if gpu_memory_gib else "") \
        + (f", num_gpus={rec.num_gpus}" if (gpu or gpu_memory_gib) and rec.num_gpus > 1 else "")
    rec.next_steps = [f"generate_recipe(model='{model}', dataset='<converted dataset dir>', method='{rec.method}'"
                      f"{target})"]
    if rec.smaller_model:
        rec.next_steps.append(f"recommend_method(model='{rec.smaller_model.model}'{target})")
    return rec


def _check_inputs(f: ModelFacts, seq_len: int, **positive) -> None:
    for name, v in {"seq_len": seq_len, **positive}.items():
        if v is not None and (not isinstance(v, int) or v < 1):
            raise UserError(f"must be a positive integer (got {v!r}).", field=name, fix="Use 1 or more.")
    if f.max_position_embeddings and seq_len > f.max_position_embeddings:
        raise UserError(f"{seq_len} exceeds {f.name}'s max_position_embeddings ({f.max_position_embeddings}).",
                        field="seq_len", fix=f"Use seq_len <= {f.max_position_embeddings}.")


def _hardware(gpu: Optional[str], gpu_memory_gib: Optional[float], num_gpus: Optional[int]):
    """The described GPUs, or this machine's (its HardwareReport when it has none)."""
    spec: Optional[GPUSpec] = require_gpu(gpu) if gpu else None
    warnings: list[str] = []
    liger, ram = False, None
    if spec is None and gpu_memory_gib is None:
        from .hardware import detect_hardware
        report = detect_hardware()
        if not report.gpus:
            return report
        g0 = report.gpus[0]
        spec, gpu_memory_gib, ram = find_gpu(g0.name), g0.total_memory_gib, report.ram_available_gib
        num_gpus = num_gpus or report.gpu_count
        bf16, liger = report.bf16_supported, report.packages.get("liger-kernel") is not None
        if report.packages.get("flash-attn") is None:
            warnings.append("flash-attn is not installed: attention uses PyTorch SDPA (estimates assume it).")
        if not liger:
            warnings.append("liger-kernel is not installed: estimates assume unfused RMSNorm/SwiGLU.")
        device = f"{report.gpu_count}x {g0.name} (detected)"
    else:
        bf16 = spec.bf16 if spec else True
        device = f"{num_gpus or 1}x {spec.name if spec else f'{gpu_memory_gib} GiB GPU'} (described)"
    if spec is None:
        warnings.append(f"GPU model unknown: throughput assumes {UNKNOWN_GPU.tflops_bf16:g} dense TFLOPs and "
                        f"{UNKNOWN_GPU.bandwidth_tbs:g} TB/s.")
    if not bf16:
        warnings.append("No bf16 on this GPU: train in fp16 (fp16: true, bf16: false); "
                        "watch for loss spikes and overflow.")
    return _Hardware(device=device, num_gpus=num_gpus or 1, vram=gpu_memory_gib or spec.memory_gib,
                     gpu=spec or UNKNOWN_GPU, bf16=bf16, liger=liger, ram=ram, warnings=warnings)


def _refuse(f: ModelFacts, hw: _Hardware, ask: _Ask, res: _Search) -> None:
    if res.too_slow:
        hours, fastest = min(res.too_slow)
        raise UserError(f"every method that fits {f.name} on {hw.device} is slower than max_hours={ask.max_hours:g}: "
                        f"the fastest, {fastest}, is estimated {hours:.1f} h.", field="max_hours",
                        fix="Raise max_hours, train on fewer tokens (dataset_tokens / epochs), or use "
                            "more or faster GPUs.")
    why, fix = "", "Use a smaller model, shorter seq_len, more or larger GPUs."
    if res.cannot_load:
        need, method, sh = min(res.cannot_load)
        why = (f" {method} with {sh.upper()} cannot even load: {need:.1f} GiB per GPU while from_pretrained runs, "
               "because bitsandbytes puts the whole 4-bit model on every GPU before the model is sharded.")
        fix = (f"Use GPUs with at least {need / FITS_FRACTION:.0f} GiB each (more GPUs of this size do not "
               "lower the load-time peak), or a smaller model.")
    raise UserError(f"no method fits {f.name} on {hw.device} ({hw.vram:.1f} GiB per GPU) with seq_len "
                    f"{ask.seq_len}.{why}", field="model", fix=fix)


def _reasons(p: _Pick, hw: _Hardware, ask: _Ask, order: list[str]) -> list[str]:
    s = p.schedule
    first = (f"{p.method} is the first method in the '{ask.goal}' order ({GOALS[ask.goal]}; here "
             f"{' > '.join(order)}) that fits" + (" with margin" if p.margin else "")
             + f": its estimated total, {p.est.total_gib:.1f} GiB per GPU, stays within {FITS_FRACTION:.0%} of "
             f"{hw.vram:.1f} GiB")
    first += (f" even if {ESTIMATE_ERROR:.0%} higher (the estimator's measured error)." if p.margin
              else f", but only within the estimator's {ESTIMATE_ERROR:.0%} error: no method fits with margin.")
    reasons = [first,
               f"micro-batch {p.micro_batch} with gradient checkpointing {'on' if p.gc else 'off'} has the highest "
               f"estimated throughput among the layouts that fit" + (" with margin" if p.margin else "")
               + (" (micro-batch fixed)" if ask.micro_batch else " and keep micro-batch x GPUs within the global batch")
               + f"; gradient accumulation "
               f"{s.gradient_accumulation_steps} gives {p.micro_batch} x {s.gradient_accumulation_steps} x "
               f"{hw.num_gpus} GPU(s) = {s.global_batch} sequences per optimizer step."]
    if s.optimizer_steps is not None:
        reasons.append(f"{s.optimizer_steps} optimizer steps: {s.sequences_per_epoch} sequences per epoch (packed "
                       f"blocks of {ask.seq_len} tokens from ~{s.tokens_per_epoch:,} tokens) over {s.global_batch} per "
                       f"step, {s.epochs:g} epoch(s)." + "".join(f" Changed: {a}" for a in s.adjustments))
    if p.sharding != "none":
        reasons.append(f"{hw.num_gpus} GPUs: {p.sharding.upper()} shards parameters, gradients and optimizer states"
                       + (" and offloads them to CPU RAM" if p.offload else "") + ".")
    if ask.goal == "cost" or p.method == "qlora":
        reasons.append("QLoRA trades some quality for memory: evaluate the result against the base model.")
    return reasons


def _recommendation(f, hw: _Hardware, ask: _Ask, branch: str, order: list[str], res: _Search,
                    smaller: Optional[ModelSuggestion]) -> Recommendation:
    p = res.chosen
    warnings = list(hw.warnings)
    if smaller:
        warnings.insert(0, smaller.why)
    if p.offload:
        warnings.append(f"CPU offload: nothing fits without it; the host needs ~{offload_ram_gib(p.method, p.est):.0f} "
                        "GiB of CPU RAM for the offloaded states, and steps are several times slower.")
    if not p.margin:
        warnings.append(f"{p.est.total_gib:.1f} GiB per GPU is within the estimator's {ESTIMATE_ERROR:.0%} error of "
                        f"the {FITS_FRACTION:.0%} line: it may run out of memory. Lower seq_len, or use more or "
                        "larger GPUs.")
    s = p.schedule
    return Recommendation(
        model=f.name, total_params=f.total_params, method=p.method, decision_tree_branch=branch,
        method_order=order, device=hw.device, num_gpus=hw.num_gpus, gpu_memory_gib=hw.vram,
        sharding=p.sharding, cpu_offload=p.offload, dtype="bf16" if hw.bf16 else "fp16", optimizer=p.optimizer,
        seq_len=ask.seq_len, packing=True, liger=hw.liger, micro_batch=p.micro_batch,
        gradient_accumulation_steps=s.gradient_accumulation_steps, global_batch_sequences=s.global_batch,
        gradient_checkpointing=p.gc, lora_r=16 if p.method in ("lora", "qlora") else None,
        spectrum_fraction=0.3 if p.method == "spectrum" else None, memory=p.est, fits_with_margin=p.margin,
        schedule=s, total_tokens=int(ask.data.tokens * s.epochs) if ask.data.tokens else None,
        tokens_per_second=round(p.tps, 1), training_hours=None if p.hours is None else round(p.hours, 2),
        smaller_model=smaller, reasons=_reasons(p, hw, ask, order), alternatives=res.alternatives,
        warnings=warnings + s.warnings + p.est.notes)


def _smaller_model(f: ModelFacts, hw: _Hardware, ask: _Ask, order: list[str], chosen: _Pick
                   ) -> Optional[ModelSuggestion]:
    """The largest smaller model of the same family and variant that fits with margin, when the
    data is small for this model (SIZE_RULE); None otherwise."""
    tokens = ask.data.tokens
    if tokens is None or tokens >= SIZE_RULE.small_data_tokens or f.total_params <= SIZE_RULE.max_params_for_small_data:
        return None
    name = catalog_lookup(f.hub_id or f.name)
    for sib in smaller_siblings(name) if name else []:
        sf = catalog_facts(sib)
        if sf.total_params > SIZE_RULE.max_params_for_small_data:
            continue
        p = _search(sf, hw, order, ask).chosen
        if p is None or not p.margin:
            continue
        data = f"{ask.data.rows:,} rows" if ask.data.rows else f"{tokens:,} tokens"
        return ModelSuggestion(
            model=sib, hub_id=sf.hub_id, total_params=sf.total_params, method=p.method, sharding=p.sharding,
            total_gib=p.est.total_gib,
            why=(f"{data} (~{tokens:,} tokens per epoch, under {SIZE_RULE.small_data_tokens:,}) is small data for a "
                 f"{f.total_params / 1e9:.1f}B model: what it can teach (tone, format, a domain's phrasing) is within "
                 f"reach of {sib} ({sf.total_params / 1e9:.1f}B, {sf.hub_id}), which fits with margin here "
                 f"({p.method}, {p.est.total_gib:.1f} GiB per GPU, {p.est.total_gib / hw.vram:.0%} of VRAM) and trains "
                 f"and serves on less hardware than {f.name} ({chosen.method}, {chosen.est.total_gib / hw.vram:.0%} of "
                 f"VRAM). Recommended: {sib}; keep {f.name} only if the smaller base model cannot do the task "
                 "(compare both on held-out rows with evaluate)."))
    return None


def _cpu_plan(f: ModelFacts, report, ask: _Ask, allow) -> Recommendation:
    """No GPU: fp32 training in RAM; only tiny models are practical."""
    ram = report.ram_available_gib or report.ram_total_gib or 8.0
    warnings = ["No CUDA GPU: training runs on CPU in fp32 (use_cpu: true, bf16: false); only tiny "
                "models (well under 1B parameters) train in reasonable time."]
    if f.total_params > 1e9:
        warnings.append(f"{f.name} has {f.total_params / 1e9:.1f}B parameters: impractical on CPU.")
    alts: list[Candidate] = []
    mb = ask.micro_batch or 1
    for method in [m for m in ("full", "lora") if not allow or m in allow]:
        est = estimate_for(f, method=method, seq_len=ask.seq_len, micro_batch=mb, gradient_checkpointing=False,
                           packing=True, optimizer="adamw_torch", dtype="fp32", gpu_memory_gib=ram)
        if not est.fits:
            alts.append(Candidate(method=method, sharding="none", cpu_offload=False, optimizer="adamw_torch",
                                  micro_batch=mb, gradient_checkpointing=False, total_gib=est.total_gib,
                                  fits=False, why_not=f"needs {est.total_gib:.1f} GiB of {ram:.1f} GiB RAM"))
            continue
        for a in alts:
            a.why_not = a.why_not or f"'{method}' fits"
        s = plan_schedule(ask.data, ask.seq_len, True, method, mb, 1, ask.global_batch, ask.epochs)
        return Recommendation(
            model=f.name, total_params=f.total_params, method=method,
            decision_tree_branch="CPU only -> tiny models, full fine-tuning or LoRA in fp32",
            method_order=["full", "lora"], device=f"CPU ({report.cpu_cores} cores, {ram:.1f} GiB RAM available)",
            num_gpus=0, gpu_memory_gib=None, sharding="none", cpu_offload=False, dtype="fp32", optimizer="adamw_torch",
            seq_len=ask.seq_len, packing=True, liger=False, micro_batch=mb,
            gradient_accumulation_steps=s.gradient_accumulation_steps, global_batch_sequences=s.global_batch,
            gradient_checkpointing=False, lora_r=16 if method == "lora" else None, memory=est, schedule=s,
            total_tokens=int(ask.data.tokens * s.epochs) if ask.data.tokens else None,
            reasons=[f"{method} fits in {FITS_FRACTION:.0%} of available RAM ({est.total_gib:.2f} GiB "
                     "estimated); QLoRA and liger need a GPU to be worthwhile."]
                    + [f"Changed: {a}" for a in s.adjustments],
            alternatives=alts, warnings=warnings + s.warnings)
    raise UserError(f"{f.name} does not fit in this machine's RAM for CPU training.", field="model",
                    fix="Use a tiny model on CPU, or describe a GPU (gpu=..., num_gpus=...).")
