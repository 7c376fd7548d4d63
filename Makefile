# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CI passes a pinned CPU build (torch==2.13.0); a plain `torch` may resolve to a CUDA build.
TORCH_SPEC ?= torch
# deepspeed is installed for the multi-process ZeRO-3 CPU test; liger-kernel and flash-attn
# (GPU only, ~1 GB of triton) are not installed here: use `pip install -e .[gpu]` on a GPU box.
# export builds llama-cpp-python (llama.cpp) from source: the longest install step (~11 min on
# 2 cores, see references/export.md), in its own step: a machine without a C++ toolchain still
# installs everything else, and only the GGUF tests skip.
EXTRAS ?= train,eval,dev
# EXPORT=0 skips the GGUF export extra (its tests then skip themselves with the reason).
EXPORT ?= 1
# llama-cpp-python compiles llama.cpp on install. -march=native would bake in this CPU's
# extensions: on the Sapphire Rapids VMs here its AMX matmul dies with SIGILL on k-quants, and a
# cached wheel would not run on an older CPU. So x86-64 gets an AVX2 baseline; other CPUs native.
# The multimodal library (mtmd) is not built: export does not use it.
ifeq ($(shell uname -m),x86_64)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAVA_BUILD=OFF
else
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF
endif

.PHONY: venv test demo bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]" "$(TORCH_SPEC)"
	$(PY) -m pip install -q "deepspeed>=0.17" "$(TORCH_SPEC)" || echo "deepspeed not installed: its test will be skipped"
	if [ "$(EXPORT)" = 1 ]; then \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q -e ".[export]" "$(TORCH_SPEC)" && \
	  $(PY) -m tools.export_setup || echo "export extra not installed: the GGUF tests will be skipped"; fi
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q tests

demo: venv
	$(PY) -m demo

# The preference stage (DPO) on CPU through the MCP server: about 45 s on 2 cores (demo/preference.py).
.PHONY: demo-dpo
demo-dpo: venv
	$(PY) -m demo.preference

bench: venv
	$(PY) bench/tool_latency.py

clean:
	rm -rf $(VENV) .pytest_cache
