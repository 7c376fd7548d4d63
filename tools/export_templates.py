"""The chat template outside transformers: an Ollama Go template, a Modelfile, serving commands.

Ollama does not run Jinja: its TEMPLATE is a Go text/template over `.Messages`. We do not parse
the Jinja source. We render it (with the tokenizer, as training did) on probe chats, recognise a
known turn format in the output (ChatML, Llama 3, Phi-3), read off what the template adds by
itself (a default system prompt, a preamble in front of the system message), and accept the
translation only if that format, with those additions, reproduces every probe rendering exactly.
The Go template is then generated from the same format, so what was checked is what is written.
"""
from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass

from pydantic import BaseModel, Field


@dataclass(frozen=True)
class TurnFormat:
    """One family of chat formats: every message is header(role) + content + footer."""
    name: str
    header: str          # with {role}
    footer: str
    end_of_turn: str     # the token that ends an assistant turn (the stop token)
    bos: str = ""        # text a template may write first (llama.cpp/Ollama add BOS themselves)


FORMATS = (
    TurnFormat("chatml", "<|im_start|>{role}\n", "<|im_end|>\n", "<|im_end|>"),
    TurnFormat("llama3", "<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>",
               "<|eot_id|>", bos="<|begin_of_text|>"),
    TurnFormat("phi3", "<|{role}|>\n", "<|end|>\n", "<|end|>"),
)

# Probe chats: distinct words, so each part of the rendering can be traced to its message.
_S, _U1, _A1, _U2 = "PROBE_SYS", "PROBE_USER_ONE", "PROBE_ASSISTANT_ONE", "PROBE_USER_TWO"
PROBES = {
    "user": [{"role": "user", "content": _U1}],
    "system+user": [{"role": "system", "content": _S}, {"role": "user", "content": _U1}],
    "multi-turn": [{"role": "user", "content": _U1}, {"role": "assistant", "content": _A1},
                   {"role": "user", "content": _U2}],
    "system+multi-turn": [{"role": "system", "content": _S}, {"role": "user", "content": _U1},
                          {"role": "assistant", "content": _A1}, {"role": "user", "content": _U2}],
}


class OllamaTemplate(BaseModel):
    """The training chat template as an Ollama TEMPLATE, or why it could not be translated."""
    format: str | None = Field(description="chatml, llama3, phi3; None: not translated.")
    exact: bool = Field(description="the format reproduces the Jinja template's rendering of every "
                                    "probe chat exactly (system, multi-turn, generation prompt).")
    template: str | None = Field(default=None, description="the Go template written in the Modelfile.")
    default_system: str | None = Field(default=None, description="system text the template adds when "
                                                                 "the chat has none (kept in TEMPLATE).")
    system_prefix: str = Field(default="", description="text the template puts before a given system message.")
    stop: list[str] = []
    probes_checked: list[str] = []
    reason: str | None = Field(default=None, description="why there is no (exact) translation, and what to do.")


@dataclass
class _Shape:
    fmt: TurnFormat
    writes_bos: bool
    default_system: str | None
    system_prefix: str


def _render(tok, messages: list[dict]) -> str | None:
    try:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - e.g. templates that raise on a system message
        return None


def _turns(text: str, fmt: TurnFormat) -> list[tuple[str, str]] | None:
    """Split a rendering into (role, content) turns of `fmt`, ending with the generation prompt;
    None when the text is not exactly that."""
    pre, post = fmt.header.split("{role}")
    turn = re.compile(re.escape(pre) + r"(\w+)" + re.escape(post) + r"(.*?)" + re.escape(fmt.footer),
                      re.S)
    gen = fmt.header.format(role="assistant")
    pos, out = 0, []
    while (m := turn.match(text, pos)) is not None:
        out.append((m.group(1), m.group(2)))
        pos = m.end()
    return out if text[pos:] == gen else None


def _shape(renders: dict[str, str], fmt: TurnFormat) -> _Shape | None:
    """What this template adds around the messages, read from the probe renderings in `fmt`."""
    writes_bos = bool(fmt.bos) and renders["user"].startswith(fmt.bos)
    body = {k: v[len(fmt.bos):] if writes_bos and v.startswith(fmt.bos) else v
            for k, v in renders.items()}
    user = _turns(body["user"], fmt)
    if not user:
        return None
    default = user[0][1] if user[0][0] == "system" and len(user) == 2 else None
    prefix = ""
    if "system+user" in body:
        with_sys = _turns(body["system+user"], fmt)
        if not with_sys or with_sys[0][0] != "system" or not with_sys[0][1].endswith(_S):
            return None
        prefix = with_sys[0][1][:-len(_S)]
    return _Shape(fmt, writes_bos, default, prefix)


def render_shape(shape: _Shape, messages: list[dict], *, with_bos: bool = True) -> str:
    """What the format, with the template's own additions, renders for `messages`."""
    fmt = shape.fmt
    out = fmt.bos if (shape.writes_bos and with_bos) else ""
    if shape.default_system is not None and (not messages or messages[0]["role"] != "system"):
        out += fmt.header.format(role="system") + shape.default_system + fmt.footer
    for m in messages:
        content = (shape.system_prefix if m["role"] == "system" else "") + m["content"]
        out += fmt.header.format(role=m["role"]) + content + fmt.footer
    return out + fmt.header.format(role="assistant")


def _go_literal(text: str) -> str:
    # Go templates take text literally except "{{"; none of our formats has one, but a default
    # system prompt may.
    return text.replace("{{", '{{ "{{" }}')


def go_template(shape: _Shape, *, write_bos: bool) -> str:
    """The Ollama TEMPLATE for `shape`. Every newline in it is content: no `{{-` trimming, which
    would also eat the newlines that end ChatML turns."""
    fmt = shape.fmt
    pre, post = fmt.header.split("{role}")
    out = _go_literal(fmt.bos) if write_bos else ""
    if shape.default_system is not None:
        out += ('{{ if or (not .Messages) (ne (index .Messages 0).Role "system") }}'
                + _go_literal(fmt.header.format(role="system") + shape.default_system + fmt.footer)
                + "{{ end }}")
    prefix = ('{{ if eq .Role "system" }}' + _go_literal(shape.system_prefix) + "{{ end }}"
              if shape.system_prefix else "")
    out += ("{{ range .Messages }}" + _go_literal(pre) + "{{ .Role }}" + _go_literal(post) + prefix
            + "{{ .Content }}" + _go_literal(fmt.footer) + "{{ end }}"
            + _go_literal(fmt.header.format(role="assistant")))
    return out


def translate(tok, *, gguf_adds_bos: bool) -> OllamaTemplate:
    """The tokenizer's chat template as an Ollama Go template, proven on the probe chats."""
    renders = {k: r for k, m in PROBES.items() if (r := _render(tok, m)) is not None}
    if "user" not in renders:
        return OllamaTemplate(format=None, exact=False, reason=(
            "the chat template fails on a plain user message, so it cannot be probed. Write "
            "TEMPLATE by hand, or serve the GGUF with `llama-server --jinja`, which runs the Jinja "
            "template embedded in the GGUF."))
    near: list[str] = []
    for fmt in FORMATS:
        shape = _shape(renders, fmt)
        if shape is None:
            if fmt.end_of_turn in renders["user"]:
                near.append(fmt.name)
            continue
        bad = [k for k, r in renders.items() if render_shape(shape, PROBES[k]) != r]
        if bad:
            near.append(fmt.name)
            continue
        # llama.cpp and Ollama add BOS when the GGUF says so: writing it again would double it.
        write_bos = shape.writes_bos and not gguf_adds_bos
        stop = [fmt.end_of_turn]
        return OllamaTemplate(format=fmt.name, exact=True, template=go_template(shape, write_bos=write_bos),
                              default_system=shape.default_system, system_prefix=shape.system_prefix,
                              stop=stop, probes_checked=sorted(renders))
    what = (f"it looks like {', '.join(near)} but renders differently from that format on the probe "
            "chats (extra text, trimmed content or role names)" if near else
            "its turns match no format we translate (ChatML, Llama 3, Phi-3)")
    return OllamaTemplate(format=None, exact=False, probes_checked=sorted(renders), reason=(
        f"the chat template was not translated: {what}. Without TEMPLATE, Ollama guesses one from "
        "the GGUF's metadata, which may not be the template you trained with. Write TEMPLATE by hand "
        "(Go text/template over .Messages; check it with `ollama show <name> --template` and compare "
        "a rendered prompt), or serve with `llama-server -m <file>.gguf --jinja`, which runs the "
        "exact Jinja template embedded in the GGUF."))


# ----------------------------------------------------------------------------- Modelfile
def _param_lines(gen: dict, num_ctx: int, stop: list[str]) -> list[str]:
    lines = [f"PARAMETER stop {json.dumps(s)}" for s in stop]
    # Sampling defaults come from the model's generation_config.json when it sets them.
    for key, name in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                      ("repetition_penalty", "repeat_penalty")):
        v = gen.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            lines.append(f"PARAMETER {name} {v}")
    lines.append(f"PARAMETER num_ctx {num_ctx}")
    return lines


def modelfile(gguf_name: str, tmpl: OllamaTemplate, *, stop: list[str], gen: dict,
              num_ctx: int, adapter: str | None = None) -> str:
    """An Ollama Modelfile: FROM the GGUF, ADAPTER (a GGUF LoRA kept separate), TEMPLATE (when
    translated), stop tokens, defaults."""
    lines = [f"# Generated by llm-fine-tuning export_model. ollama create <name> -f Modelfile",
             f"FROM ./{gguf_name}"]
    if adapter:
        lines.append(f"ADAPTER ./{adapter}")
    lines.append("")
    if tmpl.template is not None:
        lines += [f"# Chat template: {tmpl.format}, checked against the training template on "
                  f"{len(tmpl.probes_checked)} probe chats.", f'TEMPLATE """{tmpl.template}"""', ""]
    else:
        lines += [f"# TEMPLATE not set: {tmpl.reason}", ""]
    lines += _param_lines(gen, num_ctx, stop)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- serving
def serving_commands(*, name: str, hf_dir: str | None, gguf: str | None, template_file: str,
                     output_dir: str, adapter_dir: str | None = None, lora_rank: int = 16,
                     lora_gguf: str | None = None) -> dict[str, str]:
    """Commands that serve the export with the training chat template, and evaluate it. With
    adapter_dir / lora_gguf the adapter stays separate: hf_dir and gguf are the base, and the
    servers apply the adapter at load time (the model is then called `name`)."""
    q = shlex.quote
    cmds: dict[str, str] = {}
    if hf_dir:
        # vLLM and SGLang take the chat template file explicitly: the one training used, even if
        # a later tokenizer_config.json edit changes the default.
        # vLLM sizes its LoRA slots for --max-lora-rank (default 16, one of its listed sizes).
        rank = next((r for r in (16, 32, 64, 128, 256, 320, 512) if r >= lora_rank), 512)
        lora = (f" --enable-lora --lora-modules {q(name + '=' + adapter_dir)} --max-lora-rank {rank}"
                if adapter_dir else f" --served-model-name {q(name)}")
        cmds["vllm"] = (f"vllm serve {q(hf_dir)}{lora} --chat-template "
                        f"{q(template_file)} --generation-config auto --port 8000")
        lora = (f" --enable-lora --lora-paths {q(name + '=' + adapter_dir)}" if adapter_dir
                else f" --served-model-name {q(name)}")
        cmds["sglang"] = (f"python -m sglang.launch_server --model-path {q(hf_dir)}{lora} "
                          f"--chat-template {q(template_file)} --port 30000")
        # TGI has no chat-template flag: it reads chat_template from the model's tokenizer files.
        lora = f" --lora-adapters {name}=/data/{adapter_dir}" if adapter_dir else ""
        cmds["tgi"] = (f"docker run --gpus all --shm-size 1g -p 8080:80 -v \"$PWD\":/data "
                       f"ghcr.io/huggingface/text-generation-inference --model-id /data/{hf_dir}{lora}")
    if gguf:
        lora = f" --lora {q(lora_gguf)}" if lora_gguf else ""
        cmds["llama_cpp"] = f"llama-server -m {q(gguf)}{lora} --jinja --alias {q(name)} --port 8080"
        cmds["ollama"] = f"cd {q(output_dir)} && ollama create {q(name)} -f Modelfile && ollama run {q(name)}"
    port = "8000" if hf_dir else "8080"
    cmds["lm_eval"] = (
        f"lm_eval --model local-chat-completions --model_args model={name},base_url=http://localhost:"
        f"{port}/v1/chat/completions,num_concurrent=4,max_retries=3,tokenized_requests=False "
        "--apply_chat_template --tasks gsm8k_cot --fewshot_as_multiturn --limit 200")
    return cmds
