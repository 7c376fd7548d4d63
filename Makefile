# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CI passes a pinned CPU build (torch==2.13.0); a plain `torch` may resolve to a CUDA build.
TORCH_SPEC ?= torch
# deepspeed is installed for the multi-process ZeRO-3 CPU test; liger-kernel and flash-attn
# (GPU only, ~1 GB of triton) are not installed here: use `pip install -e .[gpu]` on a GPU box.
EXTRAS ?= train,eval,dev

.PHONY: venv test demo bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]" "$(TORCH_SPEC)"
	$(PY) -m pip install -q "deepspeed>=0.17" "$(TORCH_SPEC)" || echo "deepspeed not installed: its test will be skipped"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q tests

demo: venv
	$(PY) -m demo

bench: venv
	$(PY) bench/tool_latency.py

clean:
	rm -rf $(VENV) .pytest_cache
