"""GGUF dequant-matmul: out[M, N] = x[M, K] @ W[N, K].T with W kept quantized, fp32 accumulation.

qweight is the GGUF tensor as stored: uint8 [N, row_bytes], row n = K / QK blocks end to end. d and dmin are fp16
at unaligned offsets, so they are read byte by byte. l is a byte inside a field; the full table of every type is in
kernels/dequant.py (the reference). Layouts of the types with a kernel:
    Q4_0   18 B / 32 w   d, qs[16]                    w = d * (q - 8); qs[l]: low nibble w[l], high nibble w[16 + l]
    Q8_0   34 B / 32 w   d, qs[32] int8               w = d * q
    Q4_K  144 B / 256 w  d, dmin, scales[12], qs[128]
          sub-block s (32 w): w = d * sc[s] * q - dmin * m[s]; q = nibble s % 2 of qs[32 (s // 2) + l];
          sc, m are 6-bit, packed in scales (see _k_scale_min)
    Q5_K  176 B / 256 w  d, dmin, scales[12], qh[32], qs[128]
          as Q4_K, with bit s of qh[l] as bit 4 of q
    Q6_K  210 B / 256 w  ql[128], qh[64], scales[16] int8, d
          group j (32 w), in half h = j // 4: w = d * scales[2j + l // 16] * (q - 32);
          q = nibble (j % 4) // 2 of ql[64h + 32 (j % 2) + l] | bits 2 (j % 4) of qh[32h + l] << 4

Every type is read as groups of 32 consecutive weights whose quants sit in 16 or 32 consecutive bytes, with one set
of scales per group (Q6_K: two, one per 16). A K-tile of BLOCK_K weights is BLOCK_K // 32 groups: the dequantizer
loads bytes as [BLOCK_N, groups, 32] (the scales as [BLOCK_N, groups, 1]) and returns W's tile in fp32, in order.

GEMV (M <= 8, decode): a program owns BLOCK_N outputs for all M rows and one split of K; it streams its weights
once, dequantizes a [BLOCK_N, BLOCK_K] tile in registers and reduces it against each of the M rows of x. When
N / BLOCK_N programs cannot fill the GPU, K is split too: fp32 partials [S, M, N], summed by a second small kernel
(deterministic, unlike atomics). GEMM (M > 8, prefill): [BLOCK_M, BLOCK_N] output tiles; each K step dequantizes
a [BLOCK_N, BLOCK_K] W tile to x's dtype and feeds tl.dot.
"""
import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType

from .dequant import row_bytes

Q = GGMLQuantizationType
SUPPORTED = frozenset({Q.Q4_0, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K})
GEMV_MAX_M = 8


@triton.jit
def _f16(ptr, mask):
    """The little-endian fp16 at byte ptr, as fp32."""
    lo = tl.load(ptr, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


# Each _<type> below takes row [BLOCK_N, 1, 1] pointers to the rows' first bytes, g [1, G, 1] the absolute group
# index (weights 32g .. 32g + 31 of the row), l [1, 1, 32] the weight in the group, mask [BLOCK_N, G, 1], and
# returns the weights as fp32 [BLOCK_N, G, 32].

@triton.jit
def _q4_0(row, g, l, mask):
    block = row + g * 18
    d = _f16(block, mask)
    q = tl.load(block + 2 + l % 16, mask=mask, other=0).to(tl.int32)
    q = (q >> (l // 16 * 4)) & 15
    return d * (q - 8).to(tl.float32)


@triton.jit
def _q8_0(row, g, l, mask):
    block = row + g * 34
    d = _f16(block, mask)
    q = tl.load(block + 2 + l, mask=mask, other=0).to(tl.int8, bitcast=True)
    return d * q.to(tl.float32)


@triton.jit
def _k_scale_min(scales, s, mask):
    """Q4_K/Q5_K: 6-bit scale and min of sub-block s from the 12 packed bytes at `scales`."""
    a = tl.load(scales + s % 4, mask=mask, other=0).to(tl.int32)
    b = tl.load(scales + 4 + s % 4, mask=mask, other=0).to(tl.int32)
    c = tl.load(scales + 8 + s % 4, mask=mask, other=0).to(tl.int32)
    sc = tl.where(s < 4, a & 63, (c & 15) | ((a >> 6) << 4))
    m = tl.where(s < 4, b & 63, (c >> 4) | ((b >> 6) << 4))
    return sc.to(tl.float32), m.to(tl.float32)


@triton.jit
def _q4_k(row, g, l, mask):
    block = row + (g // 8) * 144
    s = g % 8  # sub-block
    d = _f16(block, mask)
    dmin = _f16(block + 2, mask)
    sc, m = _k_scale_min(block + 4, s, mask)
    q = tl.load(block + 16 + (s // 2) * 32 + l, mask=mask, other=0).to(tl.int32)
    q = (q >> (s % 2 * 4)) & 15
    return (d * sc) * q.to(tl.float32) - dmin * m


@triton.jit
def _q5_k(row, g, l, mask):
    block = row + (g // 8) * 176
    s = g % 8
    d = _f16(block, mask)
    dmin = _f16(block + 2, mask)
    sc, m = _k_scale_min(block + 4, s, mask)
    q = tl.load(block + 48 + (s // 2) * 32 + l, mask=mask, other=0).to(tl.int32)
    qh = tl.load(block + 16 + l, mask=mask, other=0).to(tl.int32)
    q = ((q >> (s % 2 * 4)) & 15) | (((qh >> s) & 1) << 4)
    return (d * sc) * q.to(tl.float32) - dmin * m


@triton.jit
def _q6_k(row, g, l, mask):
    block = row + (g // 8) * 210
    j = g % 8  # group j: half h = j // 4 (128 weights), quarter j % 4 of it
    h = j // 4
    ql = tl.load(block + h * 64 + (j % 2) * 32 + l, mask=mask, other=0).to(tl.int32)
    qh = tl.load(block + 128 + h * 32 + l, mask=mask, other=0).to(tl.int32)
    q = ((ql >> (j % 4 // 2 * 4)) & 15) | (((qh >> (j % 4 * 2)) & 3) << 4)
    sc_lo = tl.load(block + 192 + 2 * j, mask=mask, other=0).to(tl.int8, bitcast=True)  # weights 0..15
    sc_hi = tl.load(block + 193 + 2 * j, mask=mask, other=0).to(tl.int8, bitcast=True)  # weights 16..31
    sc = tl.where(l < 16, sc_lo, sc_hi).to(tl.float32)
    d = _f16(block + 208, mask)
    return (d * sc) * (q - 32).to(tl.float32)


@triton.jit
def _dequant_tile(w_ptr, offs_n, n_mask, k0, K, row_bytes, QTYPE: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """W[offs_n, k0 : k0 + BLOCK_K] in fp32, [BLOCK_N, BLOCK_K]; zeros past N and K (K is a multiple of 32)."""
    g = (k0 // 32 + tl.arange(0, BLOCK_K // 32))[None, :, None]
    l = tl.arange(0, 32)[None, None, :]
    row = (w_ptr + offs_n.to(tl.int64) * row_bytes)[:, None, None]
    mask = n_mask[:, None, None] & (g * 32 < K)
    if QTYPE == "Q4_0":
        w = _q4_0(row, g, l, mask)
    elif QTYPE == "Q8_0":
        w = _q8_0(row, g, l, mask)
    elif QTYPE == "Q4_K":
        w = _q4_k(row, g, l, mask)
    elif QTYPE == "Q5_K":
        w = _q5_k(row, g, l, mask)
    else:
        tl.static_assert(QTYPE == "Q6_K")
        w = _q6_k(row, g, l, mask)
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def _gguf_gemv_kernel(x_ptr, w_ptr, out_ptr, M, N, K, row_bytes, tiles_per_split,
                       stride_x_m, stride_o_split, stride_o_m,
                       QTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(K, BLOCK_K))
    for tile in range(first, last):
        k0 = tile * BLOCK_K
        w = _dequant_tile(w_ptr, offs_n, n_mask, k0, K, row_bytes, QTYPE, BLOCK_N, BLOCK_K)  # [BLOCK_N, BLOCK_K]
        offs_k = k0 + tl.arange(0, BLOCK_K)
        for m in tl.static_range(BLOCK_M):  # every row of x against the one dequantized tile
            x_row = tl.minimum(m, M - 1)  # padding rows re-read the last one; their results are not stored
            x = tl.load(x_ptr + x_row * stride_x_m + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
            y = tl.sum(w * x[None, :], axis=1)  # [BLOCK_N]
            acc = tl.where(rows[:, None] == m, acc + y[None, :], acc)
    out = out_ptr + split * stride_o_split + rows[:, None] * stride_o_m + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < M) & n_mask[None, :])


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
def _gguf_gemm_kernel(x_ptr, w_ptr, out_ptr, M, N, K, row_bytes, stride_x_m, stride_o_m,
                       QTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)  # fastest: the programs that share a W tile run together, its bytes stay in L2
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_x_m + offs_k[None, :],
                    mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        w = _dequant_tile(w_ptr, offs_n, n_mask, k0, K, row_bytes, QTYPE, BLOCK_N, BLOCK_K)  # [BLOCK_N, BLOCK_K]
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=PRECISION)
    tl.store(out_ptr + offs_m[:, None] * stride_o_m + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def _num_splits(n_programs: int, k_tiles: int, device: torch.device) -> int:
    """Split K until there are ~4 programs per SM (enough loads in flight to saturate memory), >= 1 tile each."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(k_tiles, triton.cdiv(4 * sms, n_programs)))


def gguf_matmul(x: torch.Tensor, qweight: torch.Tensor, qtype: GGMLQuantizationType, N: int, K: int, *,
                block_k: int | None = None, split_k: int | None = None) -> torch.Tensor:
    """x [M, K] (fp16/bf16/fp32) @ dequant(qweight [N, row_bytes]).T -> [M, N] in x's dtype.

    block_k (a multiple of 32) and split_k (GEMV only) override the tile heuristics."""
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
    if M <= GEMV_MAX_M:
        BLOCK_N, BLOCK_K = 16, block_k or 256
        assert BLOCK_K % 32 == 0
        grid_n, k_tiles = triton.cdiv(N, BLOCK_N), triton.cdiv(K, BLOCK_K)
        tiles_per_split = triton.cdiv(k_tiles, split_k or _num_splits(grid_n, k_tiles, x.device))
        S = triton.cdiv(k_tiles, tiles_per_split)  # no empty split
        part = out if S == 1 else torch.empty(S, M, N, dtype=torch.float32, device=x.device)
        _gguf_gemv_kernel[(grid_n, S)](
            x, qweight, part, M, N, K, qweight.shape[1], tiles_per_split,
            x.stride(0), 0 if S == 1 else part.stride(0), N,
            QTYPE=qtype.name, BLOCK_M=triton.next_power_of_2(M), BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
        if S > 1:
            BLOCK = 1024
            _split_k_reduce_kernel[(triton.cdiv(M * N, BLOCK),)](part, out, M * N, S, BLOCK=BLOCK)
    else:
        # A W tile is dequantized once per M tile: tall M tiles amortize that work over more rows of x.
        BLOCK_M = 32 if M <= 64 else 64 if M <= 256 else 128
        BLOCK_N, BLOCK_K = 64, block_k or 64
        assert BLOCK_K % 32 == 0
        _gguf_gemm_kernel[(triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))](
            x, qweight, out, M, N, K, qweight.shape[1], x.stride(0), out.stride(0),
            QTYPE=qtype.name, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
            PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=8 if BLOCK_M == 128 else 4)
    return out
