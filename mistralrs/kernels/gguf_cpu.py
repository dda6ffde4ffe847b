"""CPU GGUF matmul y[M, N] = x[M, K] @ W[N, K].T, W read from its GGUF blocks by the C++ kernels of gguf_cpu.cpp
(AVX2, FMA, F16C; its header describes the layouts and the two paths; cpu_ext.py builds it).

    every M (default)   int8: x rounded to int8 per 32 values (llama.cpp's Q8_0 activations), integer dot products
                        block by block; relative error ~ 1e-2 of the output's scale (see the tests). A row of y is
                        computed the same way whatever M, the other rows and the thread count: a token gets the same
                        product in a prefill, a chunk of one, a decode step alone or in a batch.
    gemm=True           exact: W dequantized to f32 GEMM_TILE_BYTES at a time (exactly the reference's weights),
                        at::mm; the reference's result up to float summation order (tests, benchmarks)

Why int8 for prefill too: measured on a 512-token prompt, 2-core EPYC, 2 threads, time to first token of SmolLM2
Q4_1 1.27-1.39 s with either path and Gemma 3 270M Q4_K_M 1.25-1.41 s (at M = 512 the int8 kernel runs at about
the speed of MKL's sgemm on dequantized tiles); with one arithmetic for every M, greedy output does not depend on
the batch, the prefix cache or the chunking.

Threads: the kernels' thread team over the rows of W (kernels/threads_cpu.cpp).
"""
import torch
from gguf import GGMLQuantizationType

from .cpu_ext import UNAVAILABLE, ext

Q = GGMLQuantizationType
SUPPORTED = frozenset({Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K})
FLOATS = (torch.float32, torch.bfloat16, torch.float16)
# f32 scratch per W tile: half of a 512 KiB L2, so that the tile stays there while at::mm reads it.
GEMM_TILE_BYTES = 256 << 10


def gguf_matmul(x: torch.Tensor, qweight: torch.Tensor, qtype: GGMLQuantizationType, N: int, K: int, *,
                gemm: bool = False, tile_rows: int | None = None) -> torch.Tensor:
    """x [M, K] (f32, bf16 or f16; computed in f32) @ dequant(qweight uint8 [N, row_bytes]).T -> [M, N] in x's dtype.

    gemm=True takes the exact path, tile_rows (default: GEMM_TILE_BYTES of f32 rows) its tile height.
    The C++ side checks shapes, dtypes, devices and row bytes (RuntimeError): decode calls this ~200 times a token,
    so the Python side does only what it must."""
    assert ext is not None, f"gguf_cpu is unavailable: {UNAVAILABLE}"
    assert qtype in SUPPORTED, f"no gguf_cpu kernel for {GGMLQuantizationType(qtype).name}"
    assert x.dtype in FLOATS, f"x must be float32, bfloat16 or float16, got {x.dtype}"
    tile = (tile_rows or max(16, GEMM_TILE_BYTES // (4 * max(K, 1)))) if gemm else 0
    x32 = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()
    y = ext.gguf_matmul(x32, qweight, int(qtype), N, K, tile)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def gguf_rows(qweight: torch.Tensor, qtype: GGMLQuantizationType, K: int, ids: torch.Tensor) -> torch.Tensor:
    """Rows ids [T] of W (qweight uint8 [N, row_bytes]) as float32 [T, K]: the reference's values exactly."""
    assert ext is not None, f"gguf_cpu is unavailable: {UNAVAILABLE}"
    return ext.gguf_rows(qweight, int(qtype), K, ids.contiguous())
