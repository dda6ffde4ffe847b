"""The compiled CPU kernels: one torch C++ extension made of threads_cpu.cpp (their thread team), gguf_cpu.cpp (GGUF
matmul), linear_cpu.cpp (float32 linear), attention_cpu.cpp (decode attention, KV writes) and rowwise_cpu.cpp
(RMSNorm, rotary), decoder_cpu.cpp (a decoder layer's decode step in one call), with their bindings in
cpu_ext.cpp. AVX2, FMA, F16C.

Build: torch.utils.cpp_extension.load compiles it on first import (about a minute on 2 cores) into the torch
extensions directory ($TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions) and reuses it after; tools/setup.sh
builds it at install. On a CPU without AVX2, FMA and F16C nothing is built (and where the build fails, nothing is
loaded): `ext` is None and UNAVAILABLE says why; the dispatch then warns once and uses the torch paths.

Threads: the kernels split their work over threads_cpu.cpp's team (its header says why not OpenMP): one per process,
of which a call uses kernels.set_cpu_threads(n) threads as set on the calling thread (the Runner sets load's
`threads` on its engine thread), else the calling thread's torch.get_num_threads(). Its workers spin up to
MISTRALRS_SPIN_US microseconds (default 1000) after a job, then sleep.
"""
import logging
import os
import shutil
import threading
import warnings
from pathlib import Path

import torch

log = logging.getLogger("mistralrs")
HERE = Path(__file__).parent
SOURCES = [HERE / name for name in ("cpu_ext.cpp", "threads_cpu.cpp", "gguf_cpu.cpp", "linear_cpu.cpp",
                                    "attention_cpu.cpp", "rowwise_cpu.cpp", "decoder_cpu.cpp")]
# -ffp-contract=off: no FMA where the source writes a product and a sum (the rotary equals the reference bit for bit)
LDFLAGS = ["-fopenmp"]  # libgomp (torch's, already loaded), for omp_set_num_threads
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off"]


def _load():
    """The compiled extension (built now unless cached), or the reason it cannot run on this CPU."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None, f"this CPU lacks AVX2/FMA/F16C (torch reports {torch.backends.cpu.get_cpu_capability()})"
    from torch.utils.cpp_extension import load
    if shutil.which("ninja") is None:  # pip's ninja outside an activated venv: its binary is not on PATH
        import ninja
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    # A cached build loads in well under a second; only a real build (about a minute) says so, while it runs.
    note = threading.Timer(5.0, log.warning, ["mistralrs: building (or checking) the CPU kernels (kernels/*_cpu.cpp): "
                                              "a first build takes about a minute, then it is cached..."])
    note.start()
    try:
        ext = load("mistralrs_cpu", [str(s) for s in SOURCES], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS)
    except Exception as e:  # no compiler, a broken toolchain: the torch paths still work, so say why and go on
        return None, f"the C++ build failed ({type(e).__name__}: {str(e).strip().splitlines()[-1][:300]})"
    finally:
        note.cancel()
    if not ext.cpu_has_avx2():
        return None, "this CPU lacks AVX2/FMA/F16C (__builtin_cpu_supports)"
    return ext, None


ext, UNAVAILABLE = _load()
if UNAVAILABLE is not None:
    warnings.warn(f"mistralrs: the CPU kernels are unavailable ({UNAVAILABLE}); GGUF matmuls dequantize every weight "
                  f"on every call (kernels/reference.py) and attention and norms run as plain torch")
