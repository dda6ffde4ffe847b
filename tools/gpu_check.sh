#!/usr/bin/env bash
# Everything a lent GPU must do, in one run of under 8 minutes on an H100/H200:
#   1. the gpu tests (pytest -m gpu): every kernel against the torch reference at real sizes, bf16 included
#   2. the kernel benchmarks at full sizes (tools/bench.py -k "not e2e": results.json, README.md, one PNG each)
#   3. one end-to-end decode of a Mistral-7B-shaped random model in bf16 and Q4_0 (tools/random_model_decode.py)
# written to OUT/<GPU name>/ (OUT defaults to benchmarks/results), with env.txt (GPU, driver, versions, commit),
# steps.txt (each step's status and time) and gpu_check.log. Then commit that folder.
#
#   bash tools/gpu_check.sh [--out DIR] [--wheels DIR]
#   bash tools/gpu_check.sh --dry-run [--out DIR]    the same steps on CPU at tiny sizes (tests/test_gpu_check.py)
#
# Needs the machine's torch and triton, and the Python packages in NEEDS below (import names). A machine without
# internet gets the missing ones from --wheels DIR, wheel files carried into the tree and installed with
# pip --no-index (make them on a machine with internet, for the GPU machine's Python:
#   pip download -d wheels --only-binary=:all: --python-version 3.11 $NEEDS).
# Each step runs under a time limit, so the whole fits a 15-minute lend; a failed or timed-out step is recorded
# and the next one still runs. Exit status: 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
NEEDS="numpy gguf safetensors huggingface_hub tokenizers jinja2 tqdm llguidance xxhash pytest pytest_benchmark matplotlib"
LIMIT_TESTS=150 LIMIT_BENCH=210 LIMIT_E2E=100  # seconds; 7.7 minutes in all

DRY=0 OUT="" WHEELS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT=$2; shift ;;
    --wheels) WHEELS=$2; shift ;;
    *) echo "gpu_check.sh: unknown argument $1 (allowed: --dry-run, --out DIR, --wheels DIR)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$DRY" = 1 ]; then
  export CUDA_VISIBLE_DEVICES=""  # the dry run is the CPU run everywhere
  OUT=${OUT:-$(mktemp -d)}
fi
OUT=${OUT:-benchmarks/results}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

missing=$("$PY" -c "
import importlib.util, sys
print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))" $NEEDS)
if [ -n "$missing" ]; then
  if [ -z "$WHEELS" ]; then
    echo "gpu_check.sh: missing Python packages: $missing; give --wheels DIR with their wheels" >&2
    exit 2
  fi
  "$PY" -m pip install --no-index --find-links "$WHEELS" $missing || exit 2
fi

GPU=$("$PY" -c "
import importlib.util
spec = importlib.util.spec_from_file_location('bench', 'tools/bench.py')
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
print(bench.device_slug())")
DEST="$OUT/$GPU"
mkdir -p "$DEST"
LOG="$DEST/gpu_check.log"
: > "$LOG"
: > "$DEST/steps.txt"

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "dry run: $DRY"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda)"
} > "$DEST/env.txt"

failed=0
step() {  # step NAME LIMIT CMD...: run CMD under LIMIT seconds, log its output, record how it ended
  local name=$1 limit=$2 start rc status
  shift 2
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timed out"; failed=1 ;;
    *) status="failed (exit $rc)"; failed=1 ;;
  esac
  echo "$name: $status, $(( $(date +%s) - start ))s" | tee -a "$LOG" "$DEST/steps.txt"
}

gpu_test_files=$(grep -l "pytest.mark.gpu" tests/test_*.py)
step "gpu tests" "$LIMIT_TESTS" "$PY" -m pytest -q -p no:cacheprovider -m gpu $gpu_test_files \
  --junitxml="$DEST/gpu_tests.xml"
if [ "$DRY" = 1 ]; then  # two of the kernel benchmarks' quick cases, interpreted
  step "kernel benchmarks" "$LIMIT_BENCH" "$PY" tools/bench.py --quick --out "$DEST" -k "B1-N64 or Q4_0-M1"
  step "random model decode" "$LIMIT_E2E" "$PY" tools/random_model_decode.py --tiny --prompt 16 --steps 3 \
    --batches 1 2 --json "$DEST/e2e_random_model.json"
else
  step "kernel benchmarks" "$LIMIT_BENCH" "$PY" tools/bench.py -k "not e2e" --out "$DEST"
  step "random model decode" "$LIMIT_E2E" "$PY" tools/random_model_decode.py --json "$DEST/e2e_random_model.json"
fi

echo "results: $DEST"
[ "$DRY" = 1 ] || echo "commit them: git add '$DEST' && git commit -m 'GPU results: $GPU'"
exit $failed
