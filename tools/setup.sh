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
"$PY" -m pip install -e ".[dev]"
# Build the CPU kernels now (about a minute on 2 cores; cached in the torch extensions directory), not at the
# first CPU forward. Where the CPU lacks AVX2 this only warns: the CPU ops then use their torch paths.
"$PY" -c "import mistralrs.kernels.cpu_ext as k; print('cpu kernels:', k.UNAVAILABLE or 'built')"
