"""Evaluate a model with EleutherAI's lm-evaluation-harness (lm_eval.simple_evaluate).

Backends: `hf` for a local model dir (+ an optional PEFT adapter; sharded over several GPUs),
`vllm` for the same with engine='vllm' (tensor parallel, the adapter as a LoRA; a background job),
`local-chat-completions` for a served OpenAI-compatible endpoint (vLLM, TGI, llama.cpp server...).
Tasks: lm-eval registry tasks (gsm8k_cot, mmlu, ...: datasets come from the hub) and/or a local
JSONL turned into a task by tools.eval_tasks. Greedy decoding. With compare_with, the base is
evaluated the same way and the results are put side by side with the delta and its uncertainty.

CLI for background runs: `python -m tools.evaluate --spec spec.json`.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import difflib
import gc
import inspect
import json
import logging
import math
import os
import re
import statistics
import sys
import time
import typing
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from .endpoints import auth_header, check_url
from .errors import UserError
from .eval_tasks import FREE_TEXT_METRICS, LocalTask
from .naming import label_slug
from .params import Dtype, GpuIds, OutputDir
from .results import KEY_FIGURES_MAX, SUMMARY_MAX_CHARS, ToolResult
from .workspace import get_workspace, set_workspace

log = logging.getLogger(__name__)


class TaskMetric(BaseModel):
    """One metric of one task (lm-eval keys it `metric,filter`)."""
    task: str
    metric: str
    filter: str | None = None
    value: float | None
    stderr: float | None = Field(None, description="standard error of the mean (bootstrap or "
                                                    "analytic), None when lm-eval gives none.")
    higher_is_better: bool | None = None
    n: int | None = Field(None, description="samples evaluated.")


class ModelRun(BaseModel):
    """One model evaluated on all tasks."""
    label: str
    backend: Literal["hf", "vllm", "local-chat-completions"]
    model: str | None = None
    adapter: str | None = None
    base_url: str | None = None
    served_model: str | None = None
    apply_chat_template: bool
    metrics: list[TaskMetric]
    samples_files: dict[str, str] = Field(description="task -> JSONL of per-sample prompt, target, "
                                                      "response, extracted, correct.")
    raw_results_file: str
    elapsed_s: float


class ComparisonRow(BaseModel):
    """Base vs fine-tuned on one metric."""
    task: str
    metric: str
    filter: str | None = None
    base: float | None
    base_stderr: float | None
    fine_tuned: float | None
    fine_tuned_stderr: float | None
    delta: float | None
    delta_stderr: float | None = Field(description="sqrt(se_base^2 + se_tuned^2): conservative, "
                                                   "the samples are paired.")
    significant: bool | None = Field(description="|delta| > 1.96 * delta_stderr.")


class EvalResult(ToolResult):
    """lm-eval results: per model metrics with stderr, files, and the side-by-side comparison."""
    status: Literal["completed", "started"]
    run_id: str | None = None
    output_dir: str
    results_file: str | None = None
    tasks: list[str]
    local_task: dict[str, Any] | None = Field(None, description="the generated task (yaml, data, "
                                                                "detected format) when local_task was given.")
    runs: list[ModelRun] = []
    comparison: list[ComparisonRow] = []
    table: str = ""
    settings: dict[str, Any] = {}
    notes: list[str] = []
    elapsed_s: float = 0.0

    def key_figures(self) -> dict[str, Any]:
        """The files, then each metric (with the delta when compared), as far as room allows."""
        out: dict[str, Any] = {k: v for k, v in (("status", self.status), ("run_id", self.run_id),
                                                 ("results_file", self.results_file)) if v}
        for r in self.comparison:
            out[f"{r.task} {r.metric} delta"] = None if r.delta is None else round(r.delta, 4)
        for run in self.runs:
            for m in run.metrics:
                out[f"{run.label} {m.task} {m.metric}"] = None if m.value is None else round(m.value, 4)
        return dict(list(out.items())[:KEY_FIGURES_MAX])


# ----------------------------------------------------------------------------- task manager
_TM_CACHE: dict[tuple, Any] = {}


def _task_manager(include_path: str | None, include_defaults: bool):
    """TaskManager, cached per process: indexing lm-eval's ~15k task YAMLs takes seconds."""
    key = (include_path, include_defaults)
    if key not in _TM_CACHE:
        from lm_eval.tasks import TaskManager
        _TM_CACHE[key] = TaskManager(include_path=include_path, include_defaults=include_defaults)
    return _TM_CACHE[key]


def _redact(obj):
    """`obj` with every Authorization header value replaced (results are written to disk)."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if str(k).lower() == "authorization" else _redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_redact(v) for v in obj]
    return obj


def _with_metadata(tm, meta: dict):
    """A shallow copy of tm whose tasks carry the model args as metadata (what simple_evaluate
    does when it builds its own TaskManager; some tasks read e.g. `pretrained`)."""
    try:
        from lm_eval.tasks._factory import TaskFactory
        tm2 = copy.copy(tm)
        tm2._factory = TaskFactory(meta=meta)
        tm2.metadata = meta
        return tm2
    except Exception:  # noqa: BLE001 - private API moved: tasks simply get no metadata
        return tm


_SCAN: set[str] | None = None
_KEY = re.compile(r"^(task|group|tag):\s*(.*)$")


def _scanned_task_names() -> set[str]:
    """Names written literally in lm-eval's task YAMLs: a fast check for known names (tags that
    come from included templates are missing; the TaskManager index is the truth)."""
    global _SCAN
    if _SCAN is None:
        import lm_eval.tasks as lt
        names: set[str] = set()
        for p in Path(lt.__file__).parent.rglob("*.yaml"):
            try:
                lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
            except OSError:
                continue
            for i, line in enumerate(lines):
                m = _KEY.match(line)
                if not m:
                    continue
                k, v = m.group(1), m.group(2).split(" #")[0].strip().strip("'\"")
                if v.startswith("["):
                    names.update(x.strip().strip("'\"") for x in v.strip("[]").split(",") if x.strip())
                elif v and not v.startswith("!"):
                    names.add(v)
                elif k == "tag":
                    j = i + 1
                    while j < len(lines) and re.match(r"^\s*-\s*\S", lines[j]):
                        names.add(lines[j].split("-", 1)[1].strip().strip("'\""))
                        j += 1
        _SCAN = names
    return _SCAN


def _known_task_names() -> set[str]:
    """Every task, group and tag of lm-eval's registry (TaskManager index, cached on disk in the
    workspace per lm-eval version because indexing takes tens of seconds)."""
    ws = get_workspace()
    cache = ws.owned_dir("eval_tasks") / f".lm_eval_task_names-{_lm_eval_version()}.json"
    try:
        return set(json.loads(cache.read_text()))
    except (OSError, ValueError):
        pass
    names = set(_task_manager(None, True).all_tasks)
    with contextlib.suppress(OSError, UserError):
        ws.write_text(cache, json.dumps(sorted(names)))
    return names


def _check_task_names(names: list[str]) -> None:
    todo = [n for n in names if not (n.endswith((".yaml", ".yml")) and Path(n).is_file())]
    if not todo or all(n in _scanned_task_names() for n in todo):
        return
    known = _known_task_names()
    for n in todo:
        if n in known:
            continue
        close = difflib.get_close_matches(n, sorted(known), n=6, cutoff=0.6)
        if not close:
            close = sorted(t for t in known if n.lower() in t.lower())[:6]
        raise UserError(
            f"lm-eval {_lm_eval_version()} has no task, group or tag named '{n}'."
            + (f" Close names: {', '.join(close)}." if close else ""),
            field="tasks",
            fix="Use an lm-eval task name (e.g. gsm8k_cot, gsm8k, mmlu, hellaswag, arc_easy, "
                "ifeval; `lm_eval ls tasks` lists them) or evaluate your own JSONL with local_task.")


def _lm_eval_version() -> str:
    try:
        from importlib.metadata import version
        return version("lm_eval")
    except Exception:  # noqa: BLE001
        return "?"


# ----------------------------------------------------------------------------- endpoint
def _chat_url(base_url: str, field: str = "base_url") -> tuple[str, str]:
    """(chat completions URL, API root ending in /v1 or what was given), after the endpoint
    policy (tools/endpoints.py) allowed the URL."""
    u = check_url(base_url, field=field).rstrip("/")
    if u.endswith("/chat/completions"):
        return u, u[: -len("/chat/completions")]
    if u.endswith("/completions"):
        root = u[: -len("/completions")]
        return root + "/chat/completions", root
    if not re.search(r"/v\d+$", u):
        u += "/v1"
    return u + "/chat/completions", u


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect could lead the probe (and the key) to another host: never follow one."""
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102
        return None


def check_endpoint(base_url: str, timeout: float = 5.0, api_key_env: str | None = None, *,
                   field: str = "base_url", key_field: str = "api_key_env") -> tuple[str, list[str]]:
    """Reach `<root>/models` with a short request. Returns (chat URL, served model ids)."""
    chat, root = _chat_url(base_url, field)
    req = urllib.request.Request(root + "/models", headers=auth_header(api_key_env, field=key_field))
    try:
        with urllib.request.build_opener(_NoRedirect).open(req, timeout=timeout) as resp:  # noqa: S310
            data = json.loads(resp.read().decode() or "{}")
        ids = [m.get("id") for m in data.get("data", []) if isinstance(m, dict) and m.get("id")]
        return chat, ids
    except urllib.error.HTTPError:
        return chat, []  # the server answered: reachable, just no /models listing
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(
            f"cannot reach {root}/models ({reason}).", field=field,
            fix="Start the server first (vLLM: `vllm serve <model-dir> --port 8000`; TGI: "
                "`docker run -p 8080:80 ghcr.io/huggingface/text-generation-inference --model-id "
                "<model>`), check host and port, then pass "
                f"{field}=http://HOST:PORT/v1.") from None


# ----------------------------------------------------------------------------- LLM judge
JUDGE_SYSTEM = ("You grade a candidate answer against the reference answer to the same question. "
                "Judge meaning and correctness, not wording or length. Reply with one line: "
                "'score: N', N from 1 (wrong or unrelated) to 5 (same meaning as the reference, "
                "fully correct).")
_SCORE = re.compile(r"score\W{0,4}([1-5])\b", re.I)


def _judge_setup(judge_url: str, judge_model: str | None, judge_api_key_env: str | None,
                 notes: list[str]) -> dict:
    """The judge endpoint after the endpoint policy and a reachability check."""
    chat, ids = check_endpoint(judge_url, api_key_env=judge_api_key_env, field="judge_url",
                               key_field="judge_api_key_env")
    if not judge_model:
        judge_model = ids[0] if ids else "default"
        notes.append(f"judge_model not given: using '{judge_model}'"
                     + (" (first of /v1/models)." if ids else " (the server listed none)."))
    return {"url": chat, "model": judge_model,
            "headers": {**auth_header(judge_api_key_env, field="judge_api_key_env"),
                        "Content-Type": "application/json"}}


def _judge_one(judge: dict, question: str, reference: str, reply: str) -> tuple[int | None, str]:
    """(score 1..5 or None, the judge's reply or the error) for one sample."""
    body = {"model": judge["model"], "temperature": 0, "max_tokens": 64, "messages": [
        {"role": "system", "content": JUDGE_SYSTEM},
        {"role": "user", "content": f"Question:\n{question}\n\nReference answer:\n{reference}"
                                    f"\n\nCandidate answer:\n{reply}"}]}
    req = urllib.request.Request(judge["url"], data=json.dumps(body).encode(), headers=judge["headers"])
    err = ""
    for _attempt in range(3):
        try:
            with urllib.request.build_opener(_NoRedirect).open(req, timeout=60) as resp:  # noqa: S310
                text = str(json.loads(resp.read().decode())["choices"][0]["message"]["content"] or "")
            m = _SCORE.search(text) or re.search(r"\b([1-5])\b", text)
            return (int(m.group(1)) if m else None), text[:500]
        except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            err = f"{type(exc).__name__}: {str(getattr(exc, 'reason', exc))[:200]}"
    return None, err


def _judge_task(judge: dict, task: str, samples: list[dict], rows: list[dict], notes: list[str],
                label: str) -> TaskMetric:
    """Score every reply of a local generation task with the judge; adds judge_score and
    judge_reply to the sample rows and returns the mean score, mapped 1..5 -> 0..1."""
    from concurrent.futures import ThreadPoolExecutor
    jobs = [((s.get("doc") or {}).get("prompt", r["prompt"]),
             (s.get("doc") or {}).get("fewshot_target", r["target"]), r["response"] or "")
            for s, r in zip(samples, rows)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda j: _judge_one(judge, *j), jobs))
    for r, (score, text) in zip(rows, got):
        r["judge_score"], r["judge_reply"] = score, text
    vals = [(sc - 1) / 4 for sc, _ in got if sc is not None]
    if not vals:
        raise UserError(f"the judge gave no score for any of {len(got)} replies (e.g. "
                        f"'{got[0][1][:200] if got else ''}').", field="judge_url",
                        fix="Check judge_model and the server log; the judge must answer "
                            "'score: N' with N from 1 to 5.")
    if len(vals) < len(got):
        notes.append(f"{label}: the judge gave no score for {len(got) - len(vals)} of {len(got)} "
                     "replies (judge_reply in the samples file says why); they are left out.")
    sd = statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else None
    return TaskMetric(task=task, metric="judge", value=statistics.fmean(vals), stderr=sd,
                      higher_is_better=True, n=len(vals))


# ----------------------------------------------------------------------------- models
def _has_tokenizer(d: Path) -> bool:
    return (d / "tokenizer_config.json").exists() or (d / "tokenizer.json").exists()


def _device_dtype(dtype: str) -> tuple[str, str]:
    import torch
    if torch.cuda.is_available():
        auto = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        device = "cuda"
    else:
        auto, device = "float32", "cpu"
    names = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "auto": auto}
    return device, names[dtype]


def _resolve_adapter(adapter: str) -> tuple[Path, dict]:
    ws = get_workspace()
    adir = ws.resolve(adapter, field="adapter", must_exist=True, kind="dir")
    cfg = adir / "adapter_config.json"
    if not cfg.is_file():
        raise UserError(f"'{adapter}' has no adapter_config.json.", field="adapter",
                        fix="Give a PEFT adapter dir (a LoRA/QLoRA run's output_dir), or pass a full "
                            "model dir as model=.")
    return adir, json.loads(cfg.read_text())


def _resolve_model(model: str, field: str) -> str:
    from .merge import resolve_model_ref
    ref, _local = resolve_model_ref(model, field=field)
    return ref


def _build_hf_lm(pretrained: str, adapter: str | None, *, placement: dict[str, Any], dtype: str,
                 batch_size: int | str, notes: list[str]):
    import lm_eval.api.registry as registry
    args: dict[str, Any] = {"pretrained": pretrained, "dtype": dtype,
                            **{k: v for k, v in placement.items() if k != "device"}}
    if adapter:
        args["peft"] = adapter
        if _has_tokenizer(Path(adapter)):
            args["tokenizer"] = adapter  # carries the training chat template
    try:
        lm = registry.get_model("hf").create_from_arg_obj(
            args, {"batch_size": batch_size, "max_batch_size": None, "device": placement["device"]})
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"lm-eval could not load the model ({type(exc).__name__}: {str(exc)[:300]}).",
                        field="adapter" if adapter else "model",
                        fix="Check that the directory holds a complete model (and that the adapter "
                            "matches its base); if an adapter with resized embeddings fails, merge it "
                            "with merge_adapter and evaluate the merged model.") from None
    gen = getattr(lm.model, "generation_config", None)
    if gen is not None and getattr(gen, "max_new_tokens", None) is not None:
        # transformers lets generation_config.max_new_tokens override lm-eval's max_length.
        notes.append(f"{Path(pretrained).name}: generation_config.max_new_tokens="
                     f"{gen.max_new_tokens} cleared so that max_gen_toks applies.")
        gen.max_new_tokens = None
    return lm, args


# ----------------------------------------------------------------------------- placement
# vLLM pre-allocates this share of each GPU's memory for weights + KV cache. It is vLLM's own
# default, given explicitly so that results.json records it.
VLLM_GPU_MEMORY_UTILIZATION = 0.9
# The LoRA slot sizes vLLM accepts for max_lora_rank (vllm LoRAConfig; default 16).
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
_VLLM_JOB = ("vLLM starts worker processes (unsafe to fork from this server, and spawn re-imports "
             "its main module) and takes minutes to start; its job process frees the GPUs on exit")


@dataclass(frozen=True)
class _Layout:
    """Where the local models run: the GPUs (as this process numbers them) and how."""
    engine: Literal["hf", "vllm"]
    device: str                       # hf: "cpu", "cuda:N", or "cuda" when sharded
    gpus: tuple[int, ...] = ()
    shard: bool = False               # hf: HFLM parallelize=True (accelerate device_map="auto")
    own_process: str | None = None    # why only a job that sees just `gpus` can run it

    def describe(self) -> str:
        ids = ",".join(map(str, self.gpus))
        if self.engine == "vllm":
            return f"cuda (vLLM, tensor parallel over {len(self.gpus)} GPU(s): {ids})"
        return f"cuda (sharded over {len(self.gpus)} GPUs: {ids})" if self.shard else self.device


def _visible_gpus() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _vllm_installed() -> bool:
    from importlib.util import find_spec
    return find_spec("vllm") is not None


def _check_engine(engine: str, *, local: bool, cuda: bool, vllm_installed: bool) -> None:
    """engine='vllm' needs a local model, a CUDA GPU and the vllm package."""
    if engine != "vllm":
        return
    if not local:
        raise UserError("engine applies to models loaded here; base_url is already served.",
                        field="engine", fix="Drop engine, or pass compare_with=<base dir> to run "
                                            "the base with vLLM.")
    if not cuda:
        raise UserError("vLLM needs a CUDA GPU and this host has none.", field="engine",
                        fix="Use engine='hf' (the default; on CPU keep limit small or use "
                            "background=True).")
    if not vllm_installed:
        raise UserError("engine='vllm' needs the vllm package, which is not installed.",
                        field="engine",
                        fix="pip install vllm (it pins its own torch: check training still works, "
                            "or install it elsewhere and evaluate `vllm serve` with base_url), "
                            "or use engine='hf'.")


def _layout(engine: Literal["hf", "vllm"], gpu_ids: list[int] | None, visible: int,
            in_job: bool) -> _Layout:
    """The GPUs of the request (gpu_ids, else every GPU this process sees) and how they are used.

    hf on several GPUs: lm-eval's parallelize=True loads with device_map="auto" over
    accelerate's get_max_memory(), i.e. every GPU the process sees, and overwrites any max_memory
    given (HFLM._get_accelerate_args). torch reads CUDA_VISIBLE_DEVICES once, when CUDA
    initialises (other tools of this server may have done so), and setting it here would narrow
    every tool of the server: so a subset of this server's GPUs runs as a job that sees only them
    (renumbered 0..n-1: there, all of them). One GPU needs no job: HFLM takes device='cuda:N'.
    vLLM runs tensor parallel over GPUs 0..n-1 of its process and ignores `device`: always a job.
    """
    if visible == 0:
        return _Layout(engine, "cpu")
    ids = tuple(dict.fromkeys(gpu_ids)) if gpu_ids else tuple(range(visible))
    if any(i < 0 or i >= visible for i in ids):
        raise UserError(f"gpu_ids {list(ids)}: this process sees {visible} GPU(s) "
                        f"(0..{visible - 1}).", field="gpu_ids",
                        fix=f"Use indices from 0 to {visible - 1}, or drop gpu_ids.")
    if engine == "vllm":
        return _Layout("vllm", "cuda", ids, own_process=None if in_job else _VLLM_JOB)
    if len(ids) == 1:
        return _Layout("hf", f"cuda:{ids[0]}", ids)
    subset = ids != tuple(range(visible))
    return _Layout("hf", "cuda", ids, shard=True,
                   own_process=f"sharding over GPUs {','.join(map(str, ids))} of {visible} needs a "
                               "process that sees only them" if subset and not in_job else None)


def _hf_placement(layout: _Layout, offload_dir: Path | None) -> dict[str, Any]:
    """HFLM's placement arguments for `layout` (all visible GPUs when sharded: see _layout)."""
    if not layout.shard:
        return {"device": layout.device}
    # Layers that fit no GPU go to disk: in the output dir, not lm-eval's default ./offload.
    return {"device": "cuda", "parallelize": True,
            **({"offload_folder": str(offload_dir)} if offload_dir else {})}


def _vllm_lora_rank(acfg: dict, adapter: str) -> int:
    """The max_lora_rank vLLM needs for this adapter; the adapter features vLLM cannot apply
    are refused (vllm/lora/peft_helper.py): DoRA, modules_to_save, bias, rank above 512."""
    r = max([int(acfg.get("r") or 8), *map(int, (acfg.get("rank_pattern") or {}).values())])
    why = [w for w, bad in (("DoRA", acfg.get("use_dora")),
                            (f"modules_to_save {acfg.get('modules_to_save')}", acfg.get("modules_to_save")),
                            (f"bias='{acfg.get('bias')}'", acfg.get("bias") not in (None, "none")),
                            (f"rank {r}", r > VLLM_LORA_RANKS[-1])) if bad]
    if why:
        raise UserError(f"vLLM cannot apply this adapter ({', '.join(why)}).", field="adapter",
                        fix=f"merge_adapter(adapter_dir='{adapter}', output_dir=...) and evaluate "
                            "the merged model with engine='vllm', or use engine='hf'.")
    return next(k for k in VLLM_LORA_RANKS if k >= r)


def _check_tensor_parallel(model_ref: str | None, tp: int) -> None:
    """vLLM splits the attention heads over the GPUs: their number must divide them."""
    cfg = Path(model_ref or "") / "config.json"
    if tp <= 1 or not cfg.is_file():
        return  # a hub id: vLLM itself says so
    heads = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        heads = json.loads(cfg.read_text()).get("num_attention_heads")
    if isinstance(heads, int) and heads % tp:
        fits = [k for k in range(1, tp) if heads % k == 0]
        raise UserError(f"vLLM splits the model's {heads} attention heads over the GPUs: "
                        f"{tp} GPUs cannot take an equal share.", field="gpu_ids",
                        fix=f"Use {max(fits)} GPU(s) (gpu_ids), or engine='hf'.")


def _vllm_model_args(pretrained: str, *, adapter: str | None, lora_rank: int | None,
                     tokenizer: str | None, n_gpus: int, dtype: str,
                     max_gen_toks: int) -> dict[str, Any]:
    """lm-eval's `vllm` model_args (lm_eval/models/vllm_causallms.py VLLM). lm-eval sets
    enable_lora from lora_local_path itself; `device` is ignored there (the GPUs are those the
    process sees)."""
    args: dict[str, Any] = {"pretrained": pretrained, "dtype": dtype, "tensor_parallel_size": n_gpus,
                            "gpu_memory_utilization": VLLM_GPU_MEMORY_UTILIZATION,
                            "max_gen_toks": max_gen_toks}
    if tokenizer:
        args["tokenizer"] = tokenizer  # an adapter's tokenizer carries the training chat template
    if adapter:
        args["lora_local_path"] = adapter
        args["max_lora_rank"] = lora_rank or VLLM_LORA_RANKS[1]
    return args


def _has_chat_template(d: str) -> bool | None:
    """Whether a local tokenizer dir has a chat template; None for a hub id (not checked)."""
    from .recipe_templates import template_text
    if not Path(d).is_dir():
        return None
    return template_text(d, get_workspace().root)[0] is not None


# ----------------------------------------------------------------------------- results
def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _metrics(res: dict) -> list[TaskMetric]:
    out: list[TaskMetric] = []
    hib = res.get("higher_is_better", {})
    nsamp = res.get("n-samples", {})
    seen = set()
    for section in ("results", "groups"):
        for task, d in (res.get(section) or {}).items():
            for k, v in d.items():
                if "," not in k:
                    continue
                metric, filt = k.split(",", 1)
                if metric.endswith("_stderr") or (task, metric, filt) in seen:
                    continue
                seen.add((task, metric, filt))
                n = nsamp.get(task, {})
                out.append(TaskMetric(
                    task=task, metric=metric, filter=None if filt == "none" else filt,
                    value=_num(v), stderr=_num(d.get(f"{metric}_stderr,{filt}")),
                    higher_is_better=(hib.get(task) or {}).get(metric),
                    n=n.get("effective") if isinstance(n, dict) else None))
    return out


def _sample_rows(task: str, samples: list[dict], config: dict) -> list[dict]:
    rows = []
    mc = config.get("output_type") == "multiple_choice"
    for s in samples:
        args = s.get("arguments") or [[""]]
        prompt = args[0][0] if args and args[0] else ""
        while isinstance(prompt, (list, tuple)) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            prompt = json.dumps(prompt, ensure_ascii=False, default=str)
        names = s.get("metrics") or []
        metric = names[0] if names else None
        score = s.get(metric) if metric else None
        target = s.get("target")
        if mc:
            lls = [r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in (s.get("resps") or [])]
            choices = (s.get("doc") or {}).get("letters") or list(range(len(lls)))
            best = max(range(len(lls)), key=lambda i: lls[i]) if lls else None
            response = extracted = choices[best] if best is not None else None
            if isinstance(target, int) and target < len(choices):
                target = choices[target]
        else:
            resps = s.get("resps") or [[""]]
            response = resps[0][0] if resps and resps[0] else ""
            fr = s.get("filtered_resps") or [""]
            extracted = fr[0] if isinstance(fr, list) and fr else fr
        filt = s.get("filter")
        # 0/1 scores say right or wrong; a ROUGE-L of 0.4 (or even 1.0) is a similarity.
        binary = (isinstance(score, (int, float)) and score in (0, 1)
                  and metric not in FREE_TEXT_METRICS)
        rows.append({"task": task, "doc_id": s.get("doc_id"), "filter": None if filt == "none" else filt,
                     "prompt": prompt, "target": target, "response": response,
                     "extracted": extracted, "correct": bool(score) if binary else None,
                     **({m: s.get(m) for m in names} if names else {"score": None})})
    return rows


def _fmt(v: float | None, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}"


def _table(runs: list[ModelRun], comparison: list[ComparisonRow]) -> str:
    if comparison:
        lines = ["| task | metric | filter | base | fine-tuned | delta | 95% CI of delta |",
                 "|---|---|---|---|---|---|---|"]
        for r in comparison:
            ci = (f"±{1.96 * r.delta_stderr:.4f}" + (" *" if r.significant else "")
                  if r.delta_stderr is not None else "-")
            lines.append(f"| {r.task} | {r.metric} | {r.filter or '-'} | {_fmt(r.base)} ± "
                         f"{_fmt(r.base_stderr)} | {_fmt(r.fine_tuned)} ± {_fmt(r.fine_tuned_stderr)}"
                         f" | {'-' if r.delta is None else f'{r.delta:+.4f}'} | {ci} |")
        lines.append("(value ± stderr; * = |delta| > 1.96 stderr)")
        return "\n".join(lines)
    lines = ["| model | task | metric | filter | value | stderr | n |", "|---|---|---|---|---|---|---|"]
    for run in runs:
        for m in run.metrics:
            lines.append(f"| {run.label} | {m.task} | {m.metric} | {m.filter or '-'} | {_fmt(m.value)}"
                         f" | {_fmt(m.stderr)} | {m.n if m.n is not None else '-'} |")
    return "\n".join(lines)


def _compare(base: ModelRun, tuned: ModelRun) -> list[ComparisonRow]:
    b = {(m.task, m.metric, m.filter): m for m in base.metrics}
    rows = []
    for m in tuned.metrics:
        bm = b.get((m.task, m.metric, m.filter))
        if bm is None:
            continue
        delta = None if m.value is None or bm.value is None else m.value - bm.value
        dse = (math.sqrt(m.stderr ** 2 + bm.stderr ** 2)
               if m.stderr is not None and bm.stderr is not None else None)
        sig = (abs(delta) > 1.96 * dse) if (delta is not None and dse) else None
        rows.append(ComparisonRow(task=m.task, metric=m.metric, filter=m.filter, base=bm.value,
                                  base_stderr=bm.stderr, fine_tuned=m.value,
                                  fine_tuned_stderr=m.stderr, delta=delta, delta_stderr=dse,
                                  significant=sig))
    return rows


def _extraction_notes(label: str, lt, rows: list[dict]) -> list[str]:
    """What the sample rows say about the extraction: replies it found no answer in."""
    if lt.answer_mode not in ("numeric", "text") or not rows:
        return []
    invalid = sum(r.get("extracted") == "[invalid]" for r in rows)
    if 2 * invalid <= len(rows):
        return []
    return [f"{label}: the answer extraction found nothing in {invalid} of {len(rows)} replies "
            "('[invalid]' in the samples file): read the responses; if they answer in another "
            "form, pass answer_regex or answer_mode='free_text'."]


def _zero_notes(runs: list[ModelRun]) -> list[str]:
    """Exact match at zero for every model measures nothing: say so rather than report 0 vs 0."""
    zero: dict[tuple, int] = {}
    for run in runs:
        for m in run.metrics:
            if m.metric == "exact_match" and m.value == 0:
                zero[(m.task, m.metric, m.filter)] = zero.get((m.task, m.metric, m.filter), 0) + 1
    return [f"{t} {mt}{f' ({f})' if f else ''} is 0 for every model: nothing was matched, so the "
            "number says nothing about the difference. Read the samples files; if the replies "
            "look reasonable, the answers are free text (answer_mode='free_text', or judge_url) or "
            "need another answer_regex." for (t, mt, f), k in zero.items() if k == len(runs)]


# ----------------------------------------------------------------------------- the steps
@dataclass
class _Eval:
    """What the steps of one evaluation share: the request (resolved step by step: the served
    model, the system prompt and output_dir filled in) and what the steps found."""
    req: "EvalRequest"
    tasks: list[str]                 # registry tasks; task YAMLs of one's own as absolute paths
    t0: float = field(default_factory=time.time)
    notes: list[str] = field(default_factory=list)
    adapter_path: Path | None = None
    adapter_cfg: dict = field(default_factory=dict)
    model_ref: str | None = None     # what lm-eval loads as the main model (hf backend)
    base_ref: str | None = None      # compare_with, resolved
    lt: LocalTask | None = None
    chat_style: bool = False
    chat_url: str | None = None
    judge: dict | None = None
    out: Path | None = None
    device: str | None = None
    torch_dtype: str | None = None
    layout: _Layout | None = None    # None: no model is loaded here (a served endpoint only)
    vllm_installed: bool = False
    lora_rank: int | None = None     # vLLM's max_lora_rank for the adapter

    @property
    def all_tasks(self) -> list[str]:
        return self.tasks + ([self.lt.name] if self.lt else [])

    def update(self, **changes) -> None:
        """Fill in part of the request (what the background job then re-reads)."""
        self.req = self.req.model_copy(update=changes)


def _check_request(req: "EvalRequest") -> _Eval:
    ws = get_workspace()
    tasks = [t.strip() for t in (req.tasks or []) if t and t.strip()]
    # A task YAML of one's own is a path: it must be inside the workspace like any other.
    tasks = [str(ws.resolve(t, field="tasks", must_exist=True, kind="file"))
             if t.endswith((".yaml", ".yml")) else t for t in tasks]
    if not tasks and not req.local_task:
        raise UserError("nothing to evaluate on.", field="tasks",
                        fix="Pass tasks=['gsm8k_cot'] (lm-eval tasks) and/or local_task=<JSONL>.")
    for name, given in (("answer_mode", req.answer_mode != "auto"), ("judge_url", req.judge_url)):
        if given and not req.local_task:
            raise UserError("applies to local_task only (registry tasks bring their own metrics).",
                            field=name, fix=f"Pass local_task=<JSONL>, or drop {name}.")
    return _Eval(req=req, tasks=tasks)


def _resolve_models(job: _Eval) -> None:
    """The main model (a dir, an adapter on its base, or nothing for an endpoint) and the base."""
    req = job.req
    if req.base_url:
        if req.model or req.adapter:
            raise UserError("give either base_url (a served model) or model/adapter, not both.",
                            field="base_url", fix="Drop model/adapter, or drop base_url.")
    else:
        model, acfg = req.model, {}
        if req.adapter:
            job.adapter_path, acfg = _resolve_adapter(req.adapter)
        elif model:
            mp = get_workspace().resolve(model, field="model", must_exist=True, kind="dir")
            if (mp / "adapter_config.json").exists() and not (mp / "config.json").exists():
                job.adapter_path, acfg = _resolve_adapter(model)
                model = None
                job.notes.append("model is a PEFT adapter dir: evaluated as adapter on its base.")
        else:
            raise UserError("no model given.", field="model",
                            fix="Pass model=<model dir>, adapter=<adapter dir> or base_url=<endpoint>.")
        if job.adapter_path is not None and not model:
            model = acfg.get("base_model_name_or_path")
            if not model:
                raise UserError("the adapter names no base model.", field="model",
                                fix="Pass model=<base model dir>.")
        job.update(model=model)
        job.adapter_cfg = acfg
        job.model_ref = _resolve_model(str(model), "model")
    job.base_ref = _resolve_model(req.compare_with, "compare_with") if req.compare_with else None


def _place(job: _Eval, in_job: bool) -> None:
    """The engine's checks and the GPU layout of the models loaded here (none for an endpoint
    alone): fail before anything starts, and say whether only a job of its own can run it."""
    req = job.req
    local = not req.base_url or bool(job.base_ref)
    visible = _visible_gpus() if local else 0
    job.vllm_installed = local and _vllm_installed()
    _check_engine(req.engine, local=local, cuda=visible > 0, vllm_installed=job.vllm_installed)
    if not local:
        return
    job.layout = _layout(req.engine, req.gpu_ids, visible, in_job)
    if req.gpu_ids and job.layout.gpus:
        job.update(gpu_ids=list(job.layout.gpus))  # checked, each once: the job's CUDA_VISIBLE_DEVICES
    if req.engine == "vllm":
        if job.adapter_path:
            job.lora_rank = _vllm_lora_rank(job.adapter_cfg, get_workspace().rel(job.adapter_path))
        for ref in (job.model_ref, job.base_ref):
            _check_tensor_parallel(ref, len(job.layout.gpus))


def _build_tasks(job: _Eval) -> None:
    """The local task (built from its JSONL) and a check of the registry task names."""
    from .eval_tasks import build_local_task
    req = job.req
    job.chat_style = req.apply_chat_template or bool(req.base_url)
    if req.local_task:
        lt = build_local_task(req.local_task, prompt_field=req.prompt_field,
                              answer_field=req.answer_field, answer_regex=req.answer_regex,
                              chat_style=job.chat_style, answer_mode=req.answer_mode)
        job.notes.append(f"Scoring of {lt.name}: {lt.scoring}")
        job.notes.extend(lt.notes)
        if req.judge_url and lt.kind == "multiple_choice":
            raise UserError("the judge grades generated replies; multiple choice generates none.",
                            field="judge_url", fix="Drop judge_url: acc already says right or wrong.")
        if req.base_url and lt.kind == "multiple_choice":
            raise UserError("multiple-choice scoring needs log-likelihoods, which chat-completion "
                            "endpoints do not return.", field="local_task",
                            fix="Evaluate the model dir (model=...) or make it a generation task "
                                "(rows with question/answer).")
        if req.system_prompt is None and lt.system_prompt:
            job.update(system_prompt=lt.system_prompt)
            job.notes.append("System prompt taken from the local_task rows.")
        job.lt = lt
    _check_task_names(job.tasks)


def _setup_endpoints(job: _Eval) -> None:
    """The served model's endpoint (policy, reachability, served model id) and the judge's."""
    req = job.req
    if req.base_url:
        from importlib.util import find_spec
        missing = [p for p in ("aiohttp", "tenacity", "requests", "tqdm") if find_spec(p) is None]
        if missing:
            raise UserError(f"lm-eval's API models need {', '.join(missing)}, which is not installed.",
                            field="base_url", fix='pip install "lm-eval[api]"')
        job.chat_url, ids = check_endpoint(req.base_url, api_key_env=req.api_key_env)
        if not req.served_model:
            job.update(served_model=ids[0] if ids else "default")
            job.notes.append(f"served_model not given: using '{job.req.served_model}'"
                             + (" (first of /v1/models)." if ids else " (the server listed none)."))
        if not req.apply_chat_template:
            job.notes.append("apply_chat_template forced on: chat-completion endpoints take messages.")
    if req.judge_url:
        job.judge = _judge_setup(req.judge_url, req.judge_model, req.judge_api_key_env, job.notes)


def _output_dir(job: _Eval) -> None:
    req, ws = job.req, get_workspace()
    label = (Path(job.adapter_path).name if job.adapter_path else None) or req.served_model \
        or Path(str(req.model)).name
    output_dir = req.output_dir or f"evals/{time.strftime('%Y%m%d-%H%M%S')}-{label_slug(label)}"
    out = ws.resolve(output_dir, field="output_dir")
    if out.exists() and not out.is_dir():
        raise UserError(f"'{output_dir}' is a file.", field="output_dir", fix="Give a directory path.")
    job.out = out


def _spec_params(job: _Eval) -> dict[str, Any]:
    """The resolved request as the background job re-reads it (spec.json's params). Without
    gpu_ids: the job sees only its GPUs, renumbered from 0."""
    ws = get_workspace()
    req = job.req.model_copy(update={
        "model": job.req.model if not job.req.base_url else None,
        "adapter": ws.rel(job.adapter_path) if job.adapter_path else None,
        "tasks": job.tasks or None, "output_dir": ws.rel(job.out)})
    return req.model_dump(mode="json", exclude={"gpu_ids", "background"})


def _load_registry_tasks(job: _Eval):
    """The TaskManager, after loading the registry tasks' hub datasets: fail before any model loads."""
    include = str(get_workspace().root / job.lt.task_dir) if job.lt else None
    tm = _task_manager(include, include_defaults=bool(job.tasks))
    if not job.tasks:
        return tm
    try:
        loaded = tm.load(job.tasks)
    except KeyError as exc:
        raise UserError(f"lm-eval could not find a task: {exc}.", field="tasks",
                        fix="Check the names with `lm_eval ls tasks`.") from None
    except Exception as exc:  # noqa: BLE001 - datasets raise many types when offline
        raise UserError(
            f"could not load the dataset of task(s) {', '.join(job.tasks)} "
            f"({type(exc).__name__}: {str(exc)[:300]}).", field="tasks",
            fix="lm-eval tasks download their datasets from the Hugging Face hub: connect the "
                "machine (and unset HF_DATASETS_OFFLINE/HF_HUB_OFFLINE) or pre-download them "
                "into the HF cache; offline, evaluate a JSONL in the workspace with "
                "local_task.") from None
    if job.req.base_url:
        bad = [n for n, t in loaded["tasks"].items() if t.get_config("output_type") != "generate_until"]
        if bad:
            raise UserError(f"task(s) {', '.join(bad[:5])} score log-likelihoods, which chat "
                            "endpoints do not return.", field="tasks",
                            fix="Use generation tasks (gsm8k_cot, ifeval, ...) with base_url, or "
                                "evaluate the model dir with model=.")
    return tm


def _settings(job: _Eval) -> dict[str, Any]:
    """Device and precision of the local models, and the settings reported with the results."""
    req, lay = job.req, job.layout
    job.device, job.torch_dtype = (lay.device, _device_dtype(req.dtype)[1]) if lay else (None, None)
    device = lay.describe() if lay else "remote"
    if lay and lay.gpus and os.environ.get("CUDA_VISIBLE_DEVICES"):  # the ids are relative to it
        device += f", CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']}"
    vllm = lay is not None and lay.engine == "vllm"
    judge = job.judge
    return {"lm_eval_version": _lm_eval_version(), "device": device,
            "engine": lay.engine if lay else None,
            **({"tensor_parallel_size": len(lay.gpus), "max_lora_rank": job.lora_rank,
                "gpu_memory_utilization": VLLM_GPU_MEMORY_UTILIZATION} if vllm else {}),
            "judge": {"url": judge["url"], "model": judge["model"]} if judge else None,
            "dtype": job.torch_dtype,
            "apply_chat_template": job.chat_style, "system_prompt": req.system_prompt,
            "num_fewshot": req.num_fewshot, "limit": req.limit, "batch_size": req.batch_size,
            "max_gen_toks": req.max_gen_toks, "decoding": "greedy (do_sample=False, temperature=0)"}


@dataclass
class _Model:
    """One model of the plan, ready for lm-eval: an hf model object or a served endpoint's args."""
    label: str
    which: Literal["main", "base"]
    backend: Literal["hf", "local-chat-completions"]
    lm: Any                       # lm-eval HFLM (hf) or None (endpoint: lm-eval builds it)
    model_args: dict[str, Any]
    use_chat: bool
    pretrained: str | None = None
    notes: list[str] = field(default_factory=list)


def _prepare_model(job: _Eval, label: str, which: Literal["main", "base"]) -> _Model:
    req = job.req
    if which == "main" and req.base_url:
        margs = {"model": req.served_model, "base_url": job.chat_url,
                 "num_concurrent": req.batch_size if isinstance(req.batch_size, int) else 8,
                 "max_retries": 3, "tokenized_requests": False,
                 # lm-eval sends $OPENAI_API_KEY to any base_url unless a header is given
                 "header": auth_header(req.api_key_env)}
        return _Model(label=label, which=which, backend="local-chat-completions", lm=None,
                      model_args=margs, use_chat=job.chat_style)
    pretrained = job.base_ref if which == "base" else job.model_ref
    peft = str(job.adapter_path) if (which == "main" and job.adapter_path) else None
    if req.engine == "vllm":
        return _vllm_model(job, label, which, pretrained, peft)
    m = _Model(label=label, which=which, backend="hf", lm=None, model_args={},
               use_chat=job.chat_style, pretrained=pretrained)
    with contextlib.redirect_stdout(sys.stderr):
        m.lm, m.model_args = _build_hf_lm(pretrained, peft, dtype=job.torch_dtype,
                                          placement=_hf_placement(job.layout, job.out / "offload"),
                                          batch_size=req.batch_size, notes=m.notes)
    if m.use_chat and not getattr(m.lm.tokenizer, "chat_template", None):
        _plain_prompts(m)
    return m


def _vllm_model(job: _Eval, label: str, which: Literal["main", "base"], pretrained: str,
                peft: str | None) -> _Model:
    """lm-eval's vllm model as args (simple_evaluate builds it): the adapter as a LoRA."""
    tok = peft if peft and _has_tokenizer(Path(peft)) else None
    args = _vllm_model_args(pretrained, adapter=peft, lora_rank=job.lora_rank, tokenizer=tok,
                            n_gpus=len(job.layout.gpus), dtype=job.torch_dtype,
                            max_gen_toks=job.req.max_gen_toks)
    m = _Model(label=label, which=which, backend="vllm", lm=None, model_args=args,
               use_chat=job.chat_style, pretrained=pretrained)
    if m.use_chat and _has_chat_template(tok or pretrained) is False:
        _plain_prompts(m)
    return m


def _plain_prompts(m: _Model) -> None:
    m.use_chat = False
    m.notes.append(f"{m.label}: the tokenizer has no chat template: prompts are sent "
                   "as plain text (results are not comparable with chat-formatted ones).")


def _release_memory() -> None:
    gc.collect()
    with contextlib.suppress(Exception):
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _simple_evaluate(job: _Eval, m: _Model, tm) -> dict:
    """lm-eval's simple_evaluate on one model; its results with the auth header redacted."""
    import lm_eval
    req, hf = job.req, m.lm is not None  # hf: the model object we built; else lm-eval builds it
    gen_kwargs = {"max_gen_toks": req.max_gen_toks, "do_sample": False, "temperature": 0.0}
    try:
        with contextlib.redirect_stdout(sys.stderr):  # never write to an MCP stdio stream
            res = lm_eval.simple_evaluate(
                model=m.lm if hf else m.backend, model_args=None if hf else m.model_args,
                tasks=job.all_tasks, num_fewshot=req.num_fewshot, batch_size=req.batch_size,
                device=job.device if hf else None, limit=req.limit, log_samples=True,
                apply_chat_template=m.use_chat, fewshot_as_multiturn=m.use_chat,
                system_instruction=req.system_prompt, gen_kwargs=gen_kwargs,
                task_manager=_with_metadata(tm, {k: v for k, v in m.model_args.items() if k != "header"}),
                bootstrap_iters=1000)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001
        if req.base_url and m.which == "main":
            raise UserError(f"the endpoint failed during evaluation ({type(exc).__name__}: "
                            f"{str(exc)[:300]}).", field="base_url",
                            fix="Check the server log, served_model and the context length.") from None
        if m.backend == "vllm":
            raise UserError(f"vLLM failed ({type(exc).__name__}: {str(exc)[:300]}).", field="engine",
                            fix="Read the run log. A KV cache too small for max_model_len: more GPUs "
                                "(gpu_ids) or a free GPU; an unsupported model or adapter: "
                                "engine='hf'.") from None
        raise
    finally:
        if m.backend != "local-chat-completions":
            m.lm = None  # the model's memory is freed before the next one loads
            _release_memory()
    if res is None:
        raise RuntimeError("lm-eval returned no results (non-zero rank?)")
    return _redact(res)  # lm-eval copies model_args (our auth header) into its results


def _save_samples(job: _Eval, m: _Model, res: dict) -> tuple[dict[str, str], list[TaskMetric]]:
    """Per-sample JSONL per task (judged when a judge is set); the judge's metrics."""
    ws = get_workspace()
    samples = res.pop("samples", {}) or {}
    files: dict[str, str] = {}
    extra: list[TaskMetric] = []
    for task, ss in samples.items():
        rows = _sample_rows(task, ss, (res.get("configs") or {}).get(task, {}))
        if job.lt is not None and task == job.lt.name:
            m.notes.extend(_extraction_notes(m.label, job.lt, rows))
            if job.judge:
                extra.append(_judge_task(job.judge, task, ss, rows, m.notes, m.label))
        path = job.out / f"samples_{label_slug(m.label)}_{label_slug(task)}.jsonl"
        ws.write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))
        files[task] = ws.rel(path)
    return files, extra


def _run_model(job: _Eval, label: str, which: Literal["main", "base"], tm) -> ModelRun:
    ws, req = get_workspace(), job.req
    t1 = time.time()
    m = _prepare_model(job, label, which)
    res = _simple_evaluate(job, m, tm)
    sample_files, extra = _save_samples(job, m, res)
    raw = job.out / f"lm_eval_{label_slug(label)}.json"
    ws.write_text(raw, json.dumps(res, indent=1, default=str) + "\n")
    job.notes.extend(m.notes)
    local = m.backend != "local-chat-completions"
    return ModelRun(
        label=label, backend=m.backend,
        model=None if not local else (ws.rel(Path(m.pretrained)) if Path(m.pretrained).exists()
                                      else m.pretrained),
        adapter=ws.rel(job.adapter_path) if (which == "main" and job.adapter_path) else None,
        base_url=job.chat_url if not local else None,
        served_model=req.served_model if not local else None,
        apply_chat_template=m.use_chat, metrics=_metrics(res) + extra, samples_files=sample_files,
        raw_results_file=ws.rel(raw), elapsed_s=round(time.time() - t1, 2))


def _run_models(job: _Eval, tm) -> list[ModelRun]:
    """The main model, then the base (compare_with), each on every task."""
    from . import progress
    plan: list[tuple[str, Literal["main", "base"]]] = [
        ("fine-tuned" if (job.req.compare_with or job.adapter_path) else "model", "main")]
    if job.base_ref:
        plan.append(("base", "base"))
    job.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for i, (label, which) in enumerate(plan):
        progress.report(i, len(plan), f"evaluating {label} on {', '.join(job.all_tasks)[:120]}")
        runs.append(_run_model(job, label, which, tm))
    progress.report(len(plan), len(plan), "scored")
    return runs


def _finish(job: _Eval, runs: list[ModelRun], settings: dict[str, Any]) -> EvalResult:
    """The comparison, the notes the results call for, and results.json."""
    ws, req, notes = get_workspace(), job.req, job.notes
    comparison = _compare(runs[1], runs[0]) if len(runs) == 2 else []
    notes.extend(_zero_notes(runs))
    if len(runs) == 2 and runs[0].apply_chat_template != runs[1].apply_chat_template:
        notes.append("The two models were prompted differently (chat template vs plain): compare "
                     "with care.")
    if req.limit:
        notes.append(f"limit={req.limit}: a subset; stderr shows how uncertain the numbers are.")
    if job.adapter_path and not req.compare_with:
        notes.append("Pass compare_with=<base dir> to see the change against the base model.")
    if _offers_vllm(job):
        notes.append("vllm is installed: engine='vllm' runs generation benchmarks (gsm8k_cot, "
                     "ifeval, ...) several times faster, as a background job.")
    result = EvalResult(status="completed", output_dir=ws.rel(job.out), tasks=job.all_tasks,
                        local_task=job.lt.model_dump() if job.lt else None, runs=runs,
                        comparison=comparison, table=_table(runs, comparison), settings=settings,
                        notes=list(dict.fromkeys(notes)))
    result.results_file = ws.rel(job.out / "results.json")
    result.elapsed_s = round(time.time() - job.t0, 2)
    result.summary, result.next_steps = _summary(job, result), _next_steps(job, result)
    # summary first, next_steps last: training_status shows this file for an eval run
    ws.write_text(job.out / "results.json", json.dumps(result.wire(), indent=1, default=str) + "\n")
    return result


def _offers_vllm(job: _Eval) -> bool:
    """hf on a GPU while vllm is importable, on tasks that generate: vLLM would be faster."""
    lay = job.layout
    generates = bool(job.tasks) or (job.lt is not None and job.lt.kind != "multiple_choice")
    return bool(lay and lay.engine == "hf" and lay.device != "cpu" and job.vllm_installed and generates)


def _start_background(job: _Eval, params: dict[str, Any]) -> EvalResult:
    from . import runs as runs_mod  # lazy: the run registry
    ws, out = get_workspace(), job.out
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "spec.json"
    ws.write_text(spec, json.dumps({"workspace": str(ws.root), "params": params}, indent=1) + "\n")
    argv = [sys.executable, "-m", "tools.evaluate", "--spec", str(spec)]
    # The job sees only gpu_ids (CUDA_VISIBLE_DEVICES), renumbered from 0: it runs on its "cuda".
    run_id = runs_mod.start_job("eval", argv, name=out.name, gpu_ids=job.req.gpu_ids,
                                meta={"output_dir": ws.rel(out), "tasks": job.all_tasks})
    job.notes.append(f"Started in the background as run {run_id}: poll its status; results appear "
                     f"in {ws.rel(out)}/results.json when it completes.")
    return EvalResult(
        summary=f"Evaluation of {_what(job)} on {_clip(', '.join(job.all_tasks), 80)} started in the "
                f"background as run {run_id}; results will be in {ws.rel(out)}/results.json.",
        status="started", run_id=run_id, output_dir=ws.rel(out), tasks=job.all_tasks,
        local_task=job.lt.model_dump() if job.lt else None, notes=job.notes,
        settings={**params, "device": job.layout.describe() if job.layout else "remote"},
        elapsed_s=round(time.time() - job.t0, 2),
        next_steps=[f"training_status(run_id='{run_id}') until it completes (poll every 30-60 s)"])


# ----------------------------------------------------------------------------- summary
def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 3] + "..."


def _what(job: _Eval) -> str:
    """The evaluated model as the user named it."""
    ws, req = get_workspace(), job.req
    if req.base_url:
        return f"{req.served_model} at {req.base_url}"
    return ws.rel(job.adapter_path) if job.adapter_path else str(req.model)


def _figure(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _summary(job: _Eval, r: EvalResult) -> str:
    """Each metric (fine-tuned vs base with the delta, or value ± stderr), as many as fit."""
    if r.comparison:
        head = f"Evaluated {_what(job)} against the base {job.req.compare_with}"
        items = [f"{c.task} {c.metric} {_figure(c.fine_tuned)} vs {_figure(c.base)} ("
                 + ("-" if c.delta is None else f"{c.delta:+.3f}")
                 + (", significant" if c.significant else ", within noise" if c.significant is False else "")
                 + ")" for c in r.comparison]
    else:
        head = f"Evaluated {_what(job)}"
        items = [f"{m.task} {m.metric} {_figure(m.value)}"
                 + (f" ± {m.stderr:.3f}" if m.stderr is not None else "")
                 + (f" (n={m.n})" if m.n is not None else "") for run in r.runs for m in run.metrics]
    if job.req.limit:
        head += f" (limit={job.req.limit})"
    text = _fit(head, items)
    warn = " Exact match is 0 for every model: it measures nothing here; read the samples files."
    return text + warn if _zero_notes(r.runs) and len(text + warn) <= SUMMARY_MAX_CHARS else text


def _fit(head: str, items: list[str]) -> str:
    """`head: item; item...` with as many items as fit in a summary; the rest are counted."""
    for shown in range(len(items), 0, -1):
        left = len(items) - shown
        text = f"{head}: {'; '.join(items[:shown])}" + (f"; +{left} more in the table." if left else ".")
        if len(text) <= SUMMARY_MAX_CHARS:
            return text
    tail = f": {len(items)} metrics in the table." if items else ": no metric came back."
    return _clip(head, SUMMARY_MAX_CHARS - len(tail)) + tail


def _call(tool: str, **args) -> str:
    """A next call with real arguments, as the agent writes it."""
    shown = ", ".join(f"{k}={json.dumps(v) if isinstance(v, bool) else repr(v)}"
                      for k, v in args.items() if v is not None)
    return f"{tool}({shown})"


def _next_steps(job: _Eval, r: EvalResult) -> list[str]:
    ws, req = get_workspace(), job.req
    tasks = [ws.rel(t) if t.endswith((".yaml", ".yml")) else t for t in job.tasks] or None
    on = {"tasks": tasks, "local_task": req.local_task, "limit": req.limit}
    adapter = ws.rel(job.adapter_path) if job.adapter_path else None
    base = req.compare_with or (str(req.model) if adapter else None)
    steps = []
    if adapter and not req.compare_with:
        steps.append(_call("evaluate", adapter=adapter, compare_with=base, **on))
    if _offers_vllm(job):
        steps.append(_call("evaluate", model=req.model if not adapter else None, adapter=adapter,
                           base_url=req.base_url, compare_with=req.compare_with, **on, engine="vllm"))
    if any("answer_mode='free_text'" in n for n in r.notes) and req.answer_mode != "free_text":
        steps.append(_call("evaluate", model=req.model if not adapter else None, adapter=adapter,
                           base_url=req.base_url, compare_with=req.compare_with, **on,
                           answer_mode="free_text"))
    if not req.base_url:  # generate loads local models only
        steps.append(_call("generate", model=adapter or req.model, compare_with=base,
                           dataset=req.local_task, rows=5 if req.local_task else None,
                           prompts=None if req.local_task else ["<a prompt from your task>"]))
    if adapter:
        p = Path(adapter)  # a run's adapter is runs/<run>/output: name the merge after the run
        name = p.parent.name if p.name == "output" and p.parent.name else p.name
        steps.append(_call("merge_adapter", adapter_dir=adapter,
                           output_dir=f"models/{label_slug(name)}-merged"))
    elif not req.base_url:
        steps.append(_call("export_model", model=req.model,
                           output_dir=f"exports/{label_slug(Path(str(req.model)).name)}"))
    return steps


def run_request(req: "EvalRequest", in_job: bool = False) -> EvalResult:
    """Evaluate as `req` asks: check and resolve everything first (paths, engine and GPUs,
    endpoints, task names, datasets), then run the models; or hand the resolved request to a
    background job: when asked, or when only a process of its own can run it (_layout says why).
    in_job: this is that job (python -m tools.evaluate)."""
    job = _check_request(req)
    _resolve_models(job)
    _place(job, in_job)
    _build_tasks(job)
    _setup_endpoints(job)
    _output_dir(job)
    why = job.layout.own_process if job.layout else None
    if req.background or why:
        if why and not req.background:
            job.notes.append(f"Runs as a background job: {why}.")
        return _start_background(job, _spec_params(job))
    tm = _load_registry_tasks(job)
    settings = _settings(job)
    return _finish(job, _run_models(job, tm), settings)


# ----------------------------------------------------------------------------- the tool
def evaluate(
    model: str | None = None,
    adapter: str | None = None,
    base_url: Annotated[str | None, Field(description="Served OpenAI-compatible endpoint.")] = None,
    served_model: str | None = None,
    api_key_env: Annotated[str | None, Field(description="NAME of the env var with the key.")] = None,
    tasks: Annotated[list[str] | None, Field(description="lm-eval tasks, e.g. ['gsm8k_cot'].")] = None,
    local_task: Annotated[str | None, Field(description="JSONL or dataset dir to score.")] = None,
    prompt_field: str | None = None,
    answer_field: str | None = None,
    answer_regex: str | None = None,
    answer_mode: Literal["auto", "numeric", "text", "free_text"] = "auto",
    judge_url: Annotated[str | None, Field(description="LLM judge endpoint (scores 1-5).")] = None,
    judge_model: str | None = None,
    judge_api_key_env: str | None = None,
    compare_with: Annotated[str | None, Field(description="Base model, run the same way.")] = None,
    apply_chat_template: bool = True,
    system_prompt: str | None = None,
    limit: Annotated[int | None, Field(ge=1)] = None,
    num_fewshot: Annotated[int | None, Field(ge=0, le=32)] = None,
    batch_size: Annotated[int, Field(ge=1, le=512)] | Literal["auto"] = 8,
    max_gen_toks: Annotated[int, Field(ge=1, le=32768)] = 256,
    dtype: Dtype = "auto",
    engine: Literal["hf", "vllm"] = "hf",
    gpu_ids: GpuIds = None,
    background: Annotated[bool, Field(description="Return a run id now.")] = False,
    output_dir: OutputDir = None,
) -> EvalResult:
    """Score a model, adapter or endpoint with lm-evaluation-harness on lm-eval tasks or a local
    JSONL; compare_with runs the base alongside.

    A local model dir (optionally + a PEFT adapter) or a served OpenAI-compatible endpoint, on
    lm-eval tasks (e.g. gsm8k_cot to check general capability before/after fine-tuning) and/or a
    local JSONL, scored as its answers call for: exact match on the extracted number or short
    answer, ROUGE-L and chrF on free-text replies, log-likelihood accuracy on multiple choice;
    optionally an LLM judge (judge_url). Greedy decoding.

    With compare_with=<base dir> both models run the same way and a side-by-side table with the
    delta and its 95% interval is returned. Returns metrics with their standard error per task,
    and writes results.json, lm-eval's raw results and per-sample JSONL (prompt, target, response,
    extracted, correct) to output_dir. On CPU or for full benchmarks use background=True (returns a
    run id; poll the run and read <output_dir>/results.json) or a small limit: hosts cut tool calls
    after about a minute.

    Parameters:
    - model: local model dir in the workspace (full or merged model). With adapter: its base
      (default: the adapter's base_model_name_or_path).
    - adapter: PEFT adapter dir, evaluated on its base without merging.
    - base_url: served OpenAI-compatible endpoint (vLLM, TGI), e.g. http://localhost:8000/v1.
    - served_model / judge_model: the model the endpoint / judge serves (default: the first of
      GET /v1/models). api_key_env / judge_api_key_env: NAME of the environment variable holding
      its API key (no key is sent otherwise; never the key itself).
    - tasks: lm-eval task/group names, e.g. ['gsm8k_cot'] (hub datasets), or task YAML files.
    - local_task: JSONL (or a convert_dataset dir: its test.jsonl) to build a task from.
    - prompt_field: prompt column of local_task (auto: question/prompt/input/..., or messages).
    - answer_field: answer column (auto: answer/completion/output/...; with choices: answer
      index/letter).
    - answer_regex: regex with one group extracting the final answer for exact match (default:
      '#### N', else the last number; short answers: first line).
    - answer_mode: local_task scoring. auto: from the answers: numbers -> exact match on the
      number, short answers -> exact match, free text -> ROUGE-L + chrF.
    - judge_url: OpenAI-compatible endpoint of an LLM judge scoring each local_task reply 1-5
      against the reference (metric 'judge', 0..1).
    - compare_with: base model dir (or hub id), evaluated the same way, side by side.
    - apply_chat_template: wrap prompts in the model's chat template (fine-tuned chat models:
      yes; served endpoints always take messages).
    - system_prompt: system message for every prompt (default: the one in local_task rows).
    - limit: max samples per task (quick checks). num_fewshot: few-shot examples; None = the
      task's default (8 for gsm8k_cot, 0 local).
    - batch_size: prompts per batch; 'auto': hf finds the largest that fits the GPU, vLLM takes
      all prompts at once (best there), endpoints get 8 concurrent requests.
    - max_gen_toks: max new tokens per answer. dtype: auto = bf16/fp16 on GPU, fp32 on CPU.
    - engine: local models through transformers (hf) or vLLM (needs vllm and a GPU; much faster
      on generation benchmarks; always a background job; an adapter loads as its LoRA).
    - gpu_ids: GPUs of local models (default: all visible). Several: hf shards the model over
      them, vLLM runs tensor parallel; a subset of this server's GPUs runs as a background job.
    - background: a job in the run registry; returns its run id at once (poll training_status).
    - output_dir: where results go (default: evals/<time>-<model>).
    """
    return run_request(EvalRequest.model_validate(locals()))  # what the steps and a job re-read


def _request_model(tool) -> type[BaseModel]:
    """A pydantic model of `tool`'s keyword parameters, with their types, constraints and defaults:
    the signature stays the one place they are written (it is also the MCP schema)."""
    hints = typing.get_type_hints(tool, include_extras=True)
    fields = {name: (hints[name], p.default) for name, p in inspect.signature(tool).parameters.items()}
    return create_model("EvalRequest", __config__=ConfigDict(extra="forbid"),
                        __doc__="evaluate's arguments: what the steps read, and what spec.json holds "
                                "for a background job.", **fields)


EvalRequest = _request_model(evaluate)


def main(argv: list[str] | None = None) -> int:
    """`python -m tools.evaluate --spec spec.json`: run the request saved in the spec."""
    ap = argparse.ArgumentParser(prog="python -m tools.evaluate", description=__doc__.splitlines()[0])
    ap.add_argument("--spec", required=True, help="JSON with {'workspace': dir, 'params': {...}}")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    spec_path = Path(a.spec).resolve()
    spec = json.loads(spec_path.read_text())
    if spec.get("workspace"):
        set_workspace(spec["workspace"])
    params = dict(spec.get("params") or spec)
    params.pop("workspace", None)
    try:
        r = run_request(EvalRequest.model_validate({**params, "background": False}), in_job=True)
    except UserError as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        with contextlib.suppress(Exception):
            (spec_path.parent / "error.json").write_text(json.dumps({"error": str(exc)}) + "\n")
        return 2
    print(r.table)
    for n in r.notes:
        print(f"note: {n}")
    print(f"results: {r.results_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
