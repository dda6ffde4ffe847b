#!/usr/bin/env bash
# Install mistralrs with its dev extras into the current Python. torch comes first: the CPU build where there is
# no NVIDIA GPU (pip's plain `torch` would pull the multi-GB CUDA build), the default build where there is one.
set -euo pipefail
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install torch
  else
    "$PY" -m pip install "torch==2.13.0"
  fi
fi
# llama-cpp-python (the llama.cpp peer of the tests and benchmarks) builds from source for this CPU. Its AMX kernels
# crash (SIGSEGV in ggml_backend_amx_mul_mat) on CPUs that report AMX where the worker threads have no tile permission
# from the kernel (llama.cpp issue 20824, PR 26954; seen here on Q8_0 files): it is built without them.
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
export CMAKE_ARGS="${CMAKE_ARGS:--DCMAKE_C_FLAGS='$NO_AMX' -DCMAKE_CXX_FLAGS='$NO_AMX'}"
"$PY" -m pip install -e ".[dev]"
# Build the CPU kernels now (about a minute on 2 cores; cached in the torch extensions directory), not at the
# first CPU forward. Where the CPU lacks AVX2 this only warns: the CPU ops then use their torch paths.
"$PY" -c "import mistralrs.kernels.cpu_ext as k; print('cpu kernels:', k.UNAVAILABLE or 'built')"
