"""GGUF dequant-matmul: out[M, N] = x[M, K] @ W[N, K].T with W kept quantized, fp32 accumulation.

qweight is the GGUF tensor as stored: uint8 [N, row_bytes], row n = K / QK blocks end to end, read as WORD words
(bytes for Q8_0). The block layouts of the types with a kernel (Q4_0 18 B / 32 w, Q8_0 34 B / 32 w, Q4_K 144 B /
256 w, Q5_K 176 B / 256 w, Q6_K 210 B / 256 w) and their decoders into fp32 tiles are in gguf_blocks.py.

One kernel for both regimes computes out.T = W x.T, so W's dequantized [BLOCK_N, BLOCK_K] tile is the tall A
operand of tl.dot (wgmma on sm_90a for BLOCK_N >= 64) and x's rows the narrow B operand. Decode (M <= 8): one tile
of 16 rows covers all of x, K is split until the programs fill the GPU (fp32 partials [S, M, N], summed in split
order by a second small kernel: deterministic, unlike atomics). Prefill: [BLOCK_M, BLOCK_N] output tiles, no split.
W is rounded to x's dtype before the dot (as for a bf16 checkpoint); accumulation is fp32.
"""
import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType

from .dequant import row_bytes
from .gguf_blocks import UNIT, UNIT_BYTES, WORD, dequant_tile

Q = GGMLQuantizationType
SUPPORTED = frozenset({Q.Q4_0, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K})
GEMV_MAX_M = 8
# Decode tiles (BLOCK_N, BLOCK_K) per type, the largest without spills: more weights per thread amortize the
# dot's operand staging (tools/roofline.py; benchmarks/results/static-sm90).
DECODE_TILES = {"Q4_0": (256, 64), "Q8_0": (128, 64), "Q4_K": (256, 64), "Q5_K": (256, 64), "Q6_K": (64, 256)}
# Prefill tiles BLOCK_M -> (BLOCK_N, BLOCK_K, warps), BLOCK_M = 32 (M <= 64), 64 (M <= 256) or 128, capped at the
# type's largest: a word-path unit per thread at least (a smaller W tile repeats work across threads), no spills on
# sm_80 (tools/aot.py --sweep). Q6_K's unit is 128 weights: 128 rows of x beside it spill, and its (128, 128) tile
# goes to shared memory a weight at a time, so BLOCK_M = 32 takes (64, 256).
PREFILL_TILES = {"Q4_0": {32: (64, 64, 4), 64: (64, 64, 4), 128: (128, 64, 8)},
                 "Q8_0": {32: (64, 32, 4), 64: (64, 32, 4), 128: (128, 64, 8)},
                 "Q4_K": {32: (64, 128, 4), 64: (64, 128, 4), 128: (64, 128, 4)},
                 "Q5_K": {32: (64, 128, 4), 64: (64, 128, 4), 128: (64, 128, 4)},
                 "Q6_K": {32: (64, 256, 4), 64: (128, 128, 4)}}


@triton.jit
def _split_k_reduce_kernel(part_ptr, out_ptr, MN, splits, BLOCK: tl.constexpr):
    """out.flat[i] = sum_s part[s].flat[i] for the fp32 partials [splits, M, N], in split order."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), tl.float32)
    for s in range(splits):
        acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gguf_matmul_kernel(x_ptr, w_ptr, out_ptr, M, N, K, row_stride, tiles_per_split,
                        stride_x_m, stride_o_split, stride_o_m,
                        QTYPE: tl.constexpr, UNIT: tl.constexpr, UNIT_BYTES: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, ASM: tl.constexpr):
    pid_m = tl.program_id(0)  # fastest: the programs that share a W tile run together, its bytes stay in L2
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)  # out.T: W is the dot's A operand, its tall side
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(K, BLOCK_K))
    for tile in range(first, last):
        k0 = tile * BLOCK_K
        w = dequant_tile(w_ptr, offs_n, n_mask, k0, N, K, row_stride, QTYPE, UNIT, UNIT_BYTES, BLOCK_N, BLOCK_K,
                         ASM)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_x_m + offs_k[None, :],
                    mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        acc = tl.dot(w.to(x.dtype), tl.trans(x), acc, input_precision=PRECISION)
    out = out_ptr + split * stride_o_split + offs_m[None, :] * stride_o_m + offs_n[:, None]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[None, :] & n_mask[:, None])


def _num_splits(n_programs: int, k_tiles: int, device: torch.device) -> int:
    """Split K until there are ~4 programs per SM (enough loads in flight to saturate memory), >= 1 tile each."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(k_tiles, triton.cdiv(4 * sms, n_programs)))


def gguf_matmul(x: torch.Tensor, qweight: torch.Tensor, qtype: GGMLQuantizationType, N: int, K: int, *,
                block_k: int | None = None, split_k: int | None = None) -> torch.Tensor:
    """x [M, K] (fp16/bf16/fp32) @ dequant(qweight [N, row_bytes]).T -> [M, N] in x's dtype.

    block_k (a multiple of UNIT[qtype]: 32, 64 for Q4_K/Q5_K, 128 for Q6_K) and split_k override the tiles."""
    qtype = GGMLQuantizationType(qtype)
    assert qtype in SUPPORTED, f"no Triton gguf_matmul kernel for {qtype.name}"
    assert x.ndim == 2 and x.shape[1] == K and x.stride(1) == 1, (x.shape, x.stride(), K)
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32), x.dtype
    assert qweight.dtype == torch.uint8 and qweight.is_contiguous() and qweight.device == x.device
    assert qweight.shape == (N, row_bytes(qtype, K)), (tuple(qweight.shape), N, row_bytes(qtype, K))
    M = x.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if out.numel() == 0 or K == 0:
        return out.zero_()
    num_warps = 4
    if M <= GEMV_MAX_M:  # decode: one M tile (the dot's smallest), K split until the programs fill the GPU
        BLOCK_M = 16
        BLOCK_N, BLOCK_K = DECODE_TILES[qtype.name]
        BLOCK_K = block_k or BLOCK_K
    else:  # a W tile is dequantized once per M tile: tall M tiles amortize that work over more rows of x
        tiles = PREFILL_TILES[qtype.name]
        BLOCK_M = min(32 if M <= 64 else 64 if M <= 256 else 128, max(tiles))
        BLOCK_N, BLOCK_K, num_warps = tiles[BLOCK_M]
        BLOCK_K = block_k or BLOCK_K
    unit = UNIT[qtype.name]
    BLOCK_K = max(BLOCK_K, unit)
    assert BLOCK_K % unit == 0, f"block_k must be a multiple of {unit} for {qtype.name}"
    grid_m, grid_n, k_tiles = triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N), triton.cdiv(K, BLOCK_K)
    S = split_k or (_num_splits(grid_m * grid_n, k_tiles, x.device) if M <= GEMV_MAX_M else 1)
    tiles_per_split = triton.cdiv(k_tiles, S)
    S = triton.cdiv(k_tiles, tiles_per_split)  # no empty split
    part = out if S == 1 else torch.empty(S, M, N, dtype=torch.float32, device=x.device)
    words = qweight.view(WORD.get(qtype.name, torch.uint8))  # [N, row_bytes / word size]
    _gguf_matmul_kernel[(grid_m, grid_n, S)](
        x, words, part, M, N, K, words.shape[1], tiles_per_split, x.stride(0), 0 if S == 1 else part.stride(0), N,
        QTYPE=qtype.name, UNIT=unit, UNIT_BYTES=UNIT_BYTES[qtype.name], BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        ASM=not triton.knobs.runtime.interpret,
        num_warps=num_warps)
    if S > 1:
        BLOCK = 1024
        _split_k_reduce_kernel[(triton.cdiv(M * N, BLOCK),)](part, out, M * N, S, BLOCK=BLOCK)
    return out
