"""CPU GGUF matmul y[M, N] = x[M, K] @ W[N, K].T, W read from its GGUF blocks by the C++ kernels of gguf_cpu.cpp
(AVX2, FMA, F16C; its header describes the layouts and the two paths).

    M < GEMM_MIN_M (decode)    gemv: x rounded to int8 per 32 values (llama.cpp's Q8_0 activations), integer dot
                               products block by block; relative error ~ 1e-2 of the output's scale (see the tests)
    M >= GEMM_MIN_M (prefill)  gemm: W dequantized to f32 GEMM_TILE_BYTES at a time (exactly the reference's
                               weights), at::mm; the reference's result up to float summation order

Threads: at::parallel_for over the rows of W, so torch.set_num_threads applies; the gemv result does not depend on
the thread count or on the other rows of x. at::parallel_for is OpenMP inline in the header: without -fopenmp it
compiles to a serial loop (it did until the 2-thread decode was found no faster than 1 thread); with it, the
extension binds to the libgomp.so.1 torch has already loaded, so torch's thread count is the one used. Build: torch.utils.cpp_extension.load compiles the extension on first
import (about a minute) into the torch extensions directory ($TORCH_EXTENSIONS_DIR, default
~/.cache/torch_extensions) and reuses it after; tools/setup.sh builds it at install. On a CPU without AVX2, FMA and
F16C the module loads without building and UNAVAILABLE says why: the dispatch then warns once and uses the
reference.
"""
import logging
import os
import shutil
import threading
import warnings
from pathlib import Path

import torch
from gguf import GGMLQuantizationType

log = logging.getLogger("mistralrs")
Q = GGMLQuantizationType
SUPPORTED = frozenset({Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K})
FLOATS = (torch.float32, torch.bfloat16, torch.float16)
# Measured on SmolLM2's 1536 x 576 and 576 x 1536 (Zen 2, 1 thread): the int8 gemv takes 0.8x the time of
# dequantize-a-tile + at::mm at M = 16, about the same at 32, 1.2x at 64 (at::mm's register blocking reuses each
# weight across rows; the gemv redoes the dot per row).
GEMM_MIN_M = 32
# f32 scratch per W tile: half of a 512 KiB L2, so that the tile stays there while at::mm reads it.
GEMM_TILE_BYTES = 256 << 10
SOURCE = Path(__file__).with_name("gguf_cpu.cpp")
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]


def _load():
    """The compiled extension (built now unless cached), or the reason it cannot run on this CPU."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None, f"this CPU lacks AVX2/FMA/F16C (torch reports {torch.backends.cpu.get_cpu_capability()})"
    from torch.utils.cpp_extension import load
    if shutil.which("ninja") is None:  # pip's ninja outside an activated venv: its binary is not on PATH
        import ninja
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    # A cached build loads in well under a second; only a real build (about a minute) says so, while it runs.
    note = threading.Timer(5.0, log.warning, ["mistralrs: building (or checking) the CPU GGUF kernel, kernels/gguf_cpu.cpp: "
                                              "a first build takes about a minute, then it is cached..."])
    note.start()
    try:
        ext = load("mistralrs_gguf_cpu", [str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"])
    finally:
        note.cancel()
    if not ext.cpu_has_avx2():
        return None, "this CPU lacks AVX2/FMA/F16C (__builtin_cpu_supports)"
    return ext, None


_ext, UNAVAILABLE = _load()
if UNAVAILABLE is not None:
    warnings.warn(f"mistralrs: the CPU GGUF kernel is unavailable ({UNAVAILABLE}); kernels.gguf_matmul uses the "
                  f"torch reference, which dequantizes every weight on every call")


def gguf_matmul(x: torch.Tensor, qweight: torch.Tensor, qtype: GGMLQuantizationType, N: int, K: int, *,
                gemm: bool | None = None, tile_rows: int | None = None) -> torch.Tensor:
    """x [M, K] (f32, bf16 or f16; computed in f32) @ dequant(qweight uint8 [N, row_bytes]).T -> [M, N] in x's dtype.

    gemm (default: M >= GEMM_MIN_M) and tile_rows (default: GEMM_TILE_BYTES of f32 rows) override the heuristics.
    The C++ side checks shapes, dtypes, devices and row bytes (RuntimeError): decode calls this ~200 times a token,
    so the Python side does only what it must."""
    assert _ext is not None, f"gguf_cpu is unavailable: {UNAVAILABLE}"
    assert qtype in SUPPORTED, f"no gguf_cpu kernel for {GGMLQuantizationType(qtype).name}"
    assert x.dtype in FLOATS, f"x must be float32, bfloat16 or float16, got {x.dtype}"
    if gemm is None:
        gemm = x.shape[0] >= GEMM_MIN_M
    tile = (tile_rows or max(16, GEMM_TILE_BYTES // (4 * max(K, 1)))) if gemm else 0
    x32 = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()
    y = _ext.gguf_matmul(x32, qweight, int(qtype), N, K, tile)
    return y if x.dtype == torch.float32 else y.to(x.dtype)
