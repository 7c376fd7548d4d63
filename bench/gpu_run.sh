#!/usr/bin/env bash
# The GPU acceptance run (issue 8) as ONE command on the GPU machine (../shared/GPU.md): install
# the shipped wheels (.whl/, carried along) into $SITE, set the environment, run
# bench/gpu_acceptance.py under a hard timeout, and leave at most 5 files in $OUT.
#
#   bash bench/gpu_run.sh                           # the run: budget 420 s, hard limit 480 s
#   bash bench/gpu_run.sh --no-install --checks oom_fails_fast stop_resume --budget-s 150   # a rerun
#
# Options of this script (before the acceptance's own, which pass through):
#   --no-install    the wheels are in $SITE already (a warm machine's second call)
#   --install-only  install the wheels and check what imports, run nothing (proves the install line)
# Before the first call, on the session's own machine (the wheels are never committed):
#   grep -qx /.whl/ .git/info/exclude || echo /.whl/ >> .git/info/exclude
#   ../shared/gpu/fetch_wheels.sh .whl            # ~13 MB: trl, datasets, bitsandbytes, liger, pydantic
# then the device call: run(command="bash bench/gpu_run.sh", carry=[".whl"], timeout_s=560).
# Environment: OUT (/tmp/llmft-accept-out), PYTHON (python3), SITE (/tmp/site),
#   ACCEPT_TIMEOUT_S (480), ACCEPT_WS (/tmp/llmft-accept-ws: the workspace, outside $OUT).
# Files in $OUT: acceptance.jsonl (one line per check), acceptance.log (everything printed),
#   env.txt (machine, wheels, where each module imports from), pip.log, run_logs.txt (log tails
#   of runs that did not complete). stdout shows the JSON lines only.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-/tmp/llmft-accept-out}
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
LIMIT=${ACCEPT_TIMEOUT_S:-480}
WS=${ACCEPT_WS:-/tmp/llmft-accept-ws}
install=1
only_install=0
while [ $# -gt 0 ]; do
  case "$1" in
    --no-install) install=0; shift ;;
    --install-only) only_install=1; shift ;;
    *) break ;;
  esac
done
mkdir -p "$OUT"
log="$OUT/acceptance.log"
: > "$log"
{
  echo "# $(date -u +%FT%TZ) $(uname -n) $("$PY" --version 2>&1) repo=$PWD"
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  else
    echo "no nvidia-smi"
  fi
  ls -l .whl 2>&1
} > "$OUT/env.txt"

if [ "$install" = 1 ]; then
  if ! ls .whl/*.whl > /dev/null 2>&1; then
    echo "no .whl/*.whl here: run ../shared/gpu/fetch_wheels.sh .whl and carry .whl" | tee -a "$log"
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    > "$OUT/pip.log" 2>&1 || { echo "wheel install failed: see pip.log" | tee -a "$log"; exit 2; }
fi
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# where each module would import from (find_spec: no import cost), and pydantic imported for real
# (its core is the one compiled wheel: the wrong Python version shows here, not mid-run)
"$PY" - >> "$OUT/env.txt" 2>&1 <<'PY'
import importlib.util
for m in ("torch", "transformers", "accelerate", "peft", "trl", "datasets", "bitsandbytes", "liger_kernel",
          "pydantic", "flash_attn", "deepspeed", "lm_eval"):
    spec = importlib.util.find_spec(m)
    print(f"{m:13s} {spec.origin if spec else 'NOT IMPORTABLE'}")
try:
    import pydantic, pydantic_core
    print("pydantic", pydantic.VERSION, "core", pydantic_core.__version__, "imports")
except Exception as exc:  # shown, not fatal: the acceptance run then says what is missing
    print("pydantic does NOT import:", type(exc).__name__, exc)
PY
if [ "$only_install" = 1 ]; then
  echo "installed into $SITE; see $OUT/env.txt"
  cat "$OUT/env.txt"
  exit 0
fi

timeout -k 20 "$LIMIT" "$PY" bench/gpu_acceptance.py --out "$OUT" --ws "$WS" "$@" 2>&1 \
  | tee -a "$log" | grep --line-buffered '^{'
rc=${PIPESTATUS[0]}
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
  echo "{\"summary\": \"timeout\", \"limit_s\": $LIMIT}" | tee -a "$log"
  # the runs are their own process groups: a run the timeout left behind would hold the GPU
  # during a rerun; stop_training ends it (SIGTERM, then SIGKILL)
  "$PY" - "$WS" >> "$log" 2>&1 <<'PY'
import sys
from pathlib import Path
from tools.workspace import set_workspace
set_workspace(Path(sys.argv[1]))
from tools.run_registry import active_runs
from tools.runs import stop_training
for r in active_runs():
    print("stopped a run the timeout left:", r["run_id"], stop_training(r["run_id"], timeout_s=15).message)
PY
fi
exit "$rc"
