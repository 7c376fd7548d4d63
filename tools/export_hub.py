"""Publish an export (or a merged model) to the Hugging Face Hub, with a model card built from the
project's own reports: the training recipe, the data, the loss masking verdict, the evaluation,
and the GGUF parity verdict. dry_run (the default) shows the card and the file list and uploads
nothing; a real push is private unless told otherwise.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, Field

from .errors import UserError
from .results import ToolResult
from .workspace import get_workspace, short

_SKIP = {".DS_Store"}
_RECIPE_KEYS = ("model_name_or_path", "use_peft", "lora_r", "lora_alpha", "lora_dropout",
                "lora_target_modules", "load_in_4bit", "learning_rate", "num_train_epochs",
                "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                "max_length", "packing", "lr_scheduler_type", "warmup_ratio", "bf16")
_MASK_KEYS = ("assistant_only_loss", "completion_only_loss", "chat_template_path")


class HubFile(BaseModel):
    path: str = Field(description="path in the repository.")
    size_mib: float


class HubPushResult(ToolResult):
    """What would be (or was) uploaded, and the model card."""
    repo_id: str
    private: bool
    dry_run: bool
    files: list[HubFile]
    total_gib: float
    model_card: str = Field(description="README.md: YAML header + recipe, data, masking, eval, export.")
    card_sources: list[str] = Field(description="the reports the card was written from.")
    uploaded: bool = False
    url: str | None = None
    notes: list[str] = []


def _read(p: Path) -> dict:
    try:
        d = json.loads(p.read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def _sources(folder: Path) -> dict[str, Any]:
    """export_report.json -> merge_report.json -> the run's summary.json / recipe.yaml."""
    from .merge import _find_training_info
    ws = get_workspace()
    found: dict[str, Any] = {}
    exp = _read(folder / "export_report.json")
    if exp:
        found["export"] = (ws.rel(folder / "export_report.json"), exp)
    hf = ws.root / exp["hf_model"] if exp.get("hf_model") else folder
    merge = _read(hf / "merge_report.json")
    if merge:
        found["merge"] = (ws.rel(hf / "merge_report.json"), merge)
    adapter = merge.get("adapter_dir") or exp.get("merged_from_adapter")
    if adapter and (ws.root / adapter).is_dir():
        info = _find_training_info(ws.root / adapter)
        for key in ("summary", "recipe"):
            if key in info:
                found[key] = (ws.rel(Path(info[f"{key}_path"])), info[key])
    return found


def _masking_line(recipe: dict) -> str:
    """The newest verify_masking report for the recipe's inputs, or the recipe's settings."""
    settings = ", ".join(f"{k}={recipe[k]}" for k in _MASK_KEYS if k in recipe) or "TRL defaults"
    try:
        from .masking import find_masking_report, recipe_masking
        rm = recipe_masking(recipe)
        if rm.tokenizer and rm.inputs:
            rep = find_masking_report(rm.inputs[0][0], rm.tokenizer, split=rm.inputs[0][1], **rm.settings)
            if rep is not None:
                return f"verify_masking verdict **{rep.verdict}** ({settings})"
    except Exception:  # noqa: BLE001 - the card then says what it knows
        pass
    return f"{settings}; no verify_masking report found for these inputs"


def _eval_lines(path: Path | None) -> list[str]:
    if path is None:
        return ["Not evaluated here: run `evaluate` and pass its results.json as eval_results."]
    r = _read(path)
    if r.get("table"):
        return [r["table"]]
    rows = [f"| {m['task']} | {m['metric']} | {m['value']} | {m.get('stderr')} |"
            for run in r.get("runs", []) for m in run.get("metrics", [])]
    return ["| task | metric | value | stderr |", "|---|---|---|---|", *rows] if rows else ["(no metrics)"]


def model_card(repo_id: str, folder: Path, files: list[HubFile], src: dict[str, Any],
               eval_path: Path | None) -> str:
    exp = src.get("export", (None, {}))[1]
    merge = src.get("merge", (None, {}))[1]
    recipe = src.get("recipe", (None, {}))[1]
    summary = src.get("summary", (None, {}))[1]
    base = merge.get("base_model") or recipe.get("model_name_or_path") or summary.get("base_model")
    gguf = any(f.path.endswith(".gguf") for f in files)
    tags = ["llm-fine-tuning", "trl"] + (["gguf"] if gguf else []) + (
        ["lora"] if merge.get("peft_type") == "LORA" else [])
    head = ["---", f"base_model: {base}" if base else "# base_model: <add the base model id>",
            "library_name: " + ("gguf" if gguf else "transformers"), "pipeline_tag: text-generation",
            "tags:", *[f"- {t}" for t in tags], "# license: <the base model's license>", "---"]
    data = recipe.get("dataset_name") or [d.get("path") for d in (recipe.get("datasets") or [])
                                          if isinstance(d, dict)] or "(not recorded)"
    body = [f"# {repo_id.split('/')[-1]}", "",
            f"Fine-tuned from `{base or 'unknown'}` with TRL"
            + (f" ({merge.get('peft_type')} r={merge.get('lora_r')}, merged)" if merge else "") + ".", "",
            "## Training recipe", "",
            *([f"- `{k}`: {recipe[k]}" for k in _RECIPE_KEYS if k in recipe] or ["(no recipe found)"]),
            *([f"- final train loss: {summary['train_loss']}"] if "train_loss" in summary else []), "",
            "## Data", "", f"- {data}", "", "## Loss masking", "", f"- {_masking_line(recipe)}", "",
            "## Evaluation", "", *_eval_lines(eval_path), ""]
    if exp:
        body += ["## Export", "", f"- Parity (llama.cpp vs transformers): {exp.get('verdict')}",
                 f"- Ollama template: {(exp.get('ollama') or {}).get('format') or 'not translated'}", ""]
        for k, v in (exp.get("serving") or {}).items():
            body.append(f"- {k}: `{v}`")
        body.append("")
    body += ["## Files", "", "| file | MiB |", "|---|---|", *[f"| {f.path} | {f.size_mib} |" for f in files]]
    return "\n".join(head + [""] + body) + "\n"


def _files(folder: Path) -> list[HubFile]:
    out = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name not in _SKIP and not any(part.startswith(".") for part in p.relative_to(folder).parts):
            out.append(HubFile(path=str(p.relative_to(folder)), size_mib=round(p.stat().st_size / 2**20, 2)))
    return out


def _ready_to_push() -> str:
    """The token, or a UserError saying why a real push cannot happen from here."""
    from .hub import hub_offline, hub_unreachable
    if hub_offline():
        raise UserError("the hub is switched off here (HF_HUB_OFFLINE or similar is set).", field="dry_run",
                        fix="Unset HF_HUB_OFFLINE on a machine with network, or keep dry_run=true.")
    from huggingface_hub import get_token
    token = get_token()
    if not token:
        raise UserError("no Hugging Face token.", field="dry_run",
                        fix="Run `hf auth login` or set HF_TOKEN (a write token), or keep dry_run=true.")
    why = hub_unreachable()
    if why:
        raise UserError(f"the hub is not reachable ({why}).", field="dry_run",
                        fix="Connect to the network (or set HTTPS_PROXY), or keep dry_run=true.")
    return token


def push_to_hub(
    folder: Annotated[str, Field(description="An export or merged model dir.")],
    repo_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")],
    private: bool = True,
    dry_run: bool = True,
    eval_results: Annotated[str | None, Field(description="evaluate's results.json, for the card.")] = None,
) -> HubPushResult:
    """Publish an export or merged model to the Hugging Face Hub with a model card from the run's
    reports. Dry run by default: shows the card and the files.

    The card is written from the run's own reports: the recipe, the data, the masking verdict,
    the evaluation (eval_results) and the GGUF parity verdict (export_report.json). A real push
    (dry_run=false) needs a token (`hf auth login` or HF_TOKEN) and the network, and creates the
    repository private unless private=false.

    Parameters:
    - folder: an export_model output_dir (GGUF, Modelfile, hf/) or a merged model folder.
    - repo_id: the Hub repository, org/name.
    - eval_results: an evaluate results.json for the card's evaluation table.
    """
    ws = get_workspace()
    d = ws.resolve(folder, field="folder", must_exist=True, kind="dir")
    ev = ws.resolve(eval_results, field="eval_results", must_exist=True, kind="file") if eval_results else None
    files = _files(d)
    if not files:
        raise UserError(f"'{short(folder)}' is empty.", field="folder", fix="Give an export or model folder.")
    src = _sources(d)
    card = model_card(repo_id, d, files, src, ev)
    all_files = ([HubFile(path="README.md", size_mib=round(len(card.encode()) / 2**20, 4))]
                 + [f for f in files if f.path != "README.md"])
    notes = [] if src.get("export") else ["No export_report.json: the card has no parity verdict."]
    result = HubPushResult(repo_id=repo_id, private=private, dry_run=dry_run, files=all_files,
                           total_gib=round(sum(f.size_mib for f in all_files) / 1024, 4), model_card=card,
                           card_sources=[v[0] for v in src.values()] + ([ws.rel(ev)] if ev else []), notes=notes)
    if dry_run:
        return _told(result, folder)
    token = _ready_to_push()
    from huggingface_hub import HfApi
    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(d), ignore_patterns=[".*", "README.md"],
                      commit_message="Upload with llm-fine-tuning push_to_hub")
    api.upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=repo_id,
                    commit_message="Model card")
    return _told(result.model_copy(update={"uploaded": True, "url": str(url)}), folder)


def _told(r: HubPushResult, folder: str) -> HubPushResult:
    """The summary and the next calls, for the dry run or the upload."""
    vis = "private" if r.private else "public"
    size = f"{len(r.files)} files ({r.total_gib * 1024:.1f} MiB)"
    parity = "with" if not r.notes else "without"
    if r.uploaded:
        summary = f"Uploaded {size} to {r.repo_id} ({vis}): {r.url}."
        steps = [f"Check the card at {r.url}; load it with AutoModelForCausalLM.from_pretrained('{r.repo_id}')"
                 + (" or `ollama run hf.co/" + r.repo_id + "`" if any(f.path.endswith(".gguf") for f in r.files) else "")]
    else:
        summary = (f"Dry run: would upload {size} to {r.repo_id} ({vis}) with a model card {parity} a "
                   "parity verdict; nothing was uploaded.")
        steps = [f"push_to_hub(folder='{folder}', repo_id='{r.repo_id}', dry_run=false) to upload "
                 "(needs `hf auth login` or HF_TOKEN)"]
        if r.notes:
            steps.insert(0, f"export_model(model='{folder}', output_dir='exports/<name>') first: "
                            "the card then carries the GGUF parity verdict")
    return r.model_copy(update={"summary": summary, "next_steps": steps})


__all__ = ["push_to_hub", "HubPushResult", "model_card"]
