"""Triton X-LoRA adapter mixing for one LoRA-wrapped linear: the delta the caller adds to the base layer's output.

    delta[t] = sum_a scalings[t, a] * adapter_scale[a] * (lora_b[a] @ (lora_a[a] @ x[t]))           # [T, N]

Memory layout (as kernels/reference.py):
    x              [T, K], rows may be strided (unit stride along K)
    lora_a         [A, R, K] contiguous, x's dtype; read as Acat = lora_a.view(A * R, K), row j = a * R + r
    lora_b         [A, N, R] contiguous, x's dtype; read in place as Bcat [N, A * R]:
                   Bcat[n, j] = lora_b[j // R, n, j % R]
    scalings       [T, A], any float dtype: the classifier's per-token adapter weights
    adapter_scale  [A], any float dtype: alpha_a / r_a * global_scaling_weight
Every adapter has rank R (the caller zero-pads smaller ranks). A * R is small (9 adapters x rank 16 = 144), so
    h = x @ Acat.T                                          [T, A*R] fp32
    h[t, j] *= scalings[t, j // R] * adapter_scale[j // R]
    delta = h @ Bcat.T                                      [T, N]
The original scales x by s before A_a; scaling h after it is the same (A_a is linear: A_a (s x) = s (A_a x)) and
costs A*R multiplies per token instead of A*K.

Three kernels, the "shrink" and "expand" of multi-LoRA serving (Punica, S-LoRA, vLLM) and a split reduction:
    _xlora_shrink_kernel  program per (A*R tile, T tile, K split) -> fp32 partials of the scaled h, [S, T, A*R].
                          Decode has one T tile, so K is split until the programs fill the GPU (up to two per SM;
                          128 at A*R = 128, K = 4096, one 128-wide K tile each).
    _xlora_reduce_kernel  h = the sum of the S partials, in a fixed order (deterministic); skipped when S = 1.
    _xlora_mix_kernel     program per (T tile, N tile): h [BLOCK_T, A*R] times Bcat, in chunks of BLOCK_J columns
                          read straight from lora_b; each chunk's h and Bcat loads are pipelined with the dot.
Not one kernel that recomputes h in every N tile: each program would then read all of Acat (1.2 MB at K = 4096,
bf16) and redo T*K*A*R multiply-adds, N / BLOCK_N times over. In prefill that is A*R / BLOCK_N times the base
layer's own T*K*N (2.25x at BLOCK_N = 64); in decode every program streams 1.2 MB through its one SM (some
100-200 GB/s, so 6-12 us) where the whole op moves 2.4 MB. h is 576 B per token in fp32: writing and rereading it
is nothing next to that. Nor a mix that sums the S partials itself: all N / BLOCK_N of its programs would reread
S * T * A*R * 4 bytes (16 KB at T = 1, S = 32: twice its 8 KB tile of Bcat), so the split count had to stay small
and the shrink could not fill the GPU; the reduce reads them once. It costs decode a third launch (prefill does
not split), which only a GPU can weigh against the rereads it saves.

Shapes that change step to step (T, and with it the split size and the partials' stride) are runtime ints marked
do_not_specialize; the rank R is a constexpr (fixed per model: j // R and j % R become shifts).

Precision: fp32 accumulation throughout. The expand multiplies fp32 h by Bcat in tf32 for fp16/bf16 inputs (exact
for Bcat, 10 mantissa bits for h where a cast to bf16 would keep 7), in ieee fp32 for fp32 inputs.
"""
import torch
import triton
import triton.language as tl

REDUCE_BLOCK, REDUCE_S_BLOCK = 256, 16  # values of h per reduce program, partials per load
MIX_BLOCK_J = 32  # columns of h (rows of Bcat.T) per mix step
DECODE_MAX_T = 16  # up to here one T tile of 16 rows (tl.dot's minimum) covers every token
PARTIAL_ROWS = 512  # S * T at most: the partials (2 * S * T * A*R * 4 bytes through L2) stay small beside Acat


@triton.jit(do_not_specialize=["T", "tiles_per_split", "stride_p_s"])
def _xlora_shrink_kernel(x_ptr, a_ptr, scal_ptr, ascale_ptr, part_ptr, T, K, AR, tiles_per_split,
                         stride_x_t, stride_s_t, stride_s_a, stride_p_s,
                         R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_AR: tl.constexpr, BLOCK_K: tl.constexpr,
                         PRECISION: tl.constexpr):
    pid_j = tl.program_id(0)  # fastest: the programs sharing an x tile run together
    pid_t = tl.program_id(1)
    split = tl.program_id(2)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_j = pid_j * BLOCK_AR + tl.arange(0, BLOCK_AR)
    t_mask = offs_t < T
    j_mask = offs_j < AR
    x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * stride_x_t  # [BLOCK_T, 1]
    a_rows = a_ptr + offs_j.to(tl.int64)[:, None] * K  # [BLOCK_AR, 1], rows of Acat
    acc = tl.zeros((BLOCK_T, BLOCK_AR), tl.float32)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(K, BLOCK_K))
    for tile in range(first, last):
        offs_k = tile * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_rows + offs_k[None, :], mask=t_mask[:, None] & k_mask[None, :],
                    other=0.0)  # [BLOCK_T, BLOCK_K]
        a = tl.load(a_rows + offs_k[None, :], mask=j_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_AR, BLOCK_K]
        acc = tl.dot(x, tl.trans(a), acc, input_precision=PRECISION)
    # h[t, j] *= scalings[t, a] * adapter_scale[a], a = j // R: linear, so each split's partial may take it
    tj_mask = t_mask[:, None] & j_mask[None, :]
    adapter = offs_j // R
    s_ta = tl.load(scal_ptr + offs_t[:, None] * stride_s_t + adapter[None, :] * stride_s_a, mask=tj_mask,
                   other=0.0).to(tl.float32)  # [BLOCK_T, BLOCK_AR]
    c_a = tl.load(ascale_ptr + adapter, mask=j_mask, other=0.0).to(tl.float32)  # [BLOCK_AR]
    part = part_ptr + split * stride_p_s + offs_t[:, None] * AR + offs_j[None, :]
    tl.store(part, acc * s_ta * c_a[None, :], mask=tj_mask)


@triton.jit(do_not_specialize=["n", "S"])
def _xlora_reduce_kernel(part_ptr, h_ptr, n, S, BLOCK: tl.constexpr, S_BLOCK: tl.constexpr):
    """h[i] = sum_s part[s, i] over the n = T * A*R values of h, S_BLOCK splits per load."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    h = tl.zeros((BLOCK,), tl.float32)
    for s0 in range(0, S, S_BLOCK):
        s = s0 + tl.arange(0, S_BLOCK)
        p = tl.load(part_ptr + s.to(tl.int64)[:, None] * n + offs[None, :], mask=(s < S)[:, None] & mask[None, :],
                    other=0.0)  # [S_BLOCK, BLOCK]
        h += tl.sum(p, axis=0)
    tl.store(h_ptr + offs, h, mask=mask)


@triton.jit(do_not_specialize=["T"])
def _xlora_mix_kernel(h_ptr, b_ptr, out_ptr, T, N, AR, stride_b_a, stride_b_n, stride_o_t,
                      R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
                      PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)  # fastest: the programs sharing a T tile of h run together
    pid_t = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    t_mask = offs_t < T
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_T, BLOCK_N), tl.float32)
    for j0 in range(0, AR, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)  # columns of h = rows of Bcat.T
        j_mask = offs_j < AR
        h = tl.load(h_ptr + offs_t[:, None] * AR + offs_j[None, :], mask=t_mask[:, None] & j_mask[None, :],
                    other=0.0)  # [BLOCK_T, BLOCK_J]
        # a chunk may span adapters (R = 8) or part of one
        b = tl.load(b_ptr + (offs_j // R)[:, None] * stride_b_a + offs_n[None, :] * stride_b_n + (offs_j % R)[:, None],
                    mask=j_mask[:, None] & n_mask[None, :], other=0.0)  # Bcat.T chunk [BLOCK_J, BLOCK_N]
        acc = tl.dot(h, b.to(tl.float32), acc, input_precision=PRECISION)
    out = out_ptr + offs_t.to(tl.int64)[:, None] * stride_o_t + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=t_mask[:, None] & n_mask[None, :])


def _num_splits(programs: int, k_tiles: int, T: int, device: torch.device) -> int:
    """K splits for the shrink: about two programs per SM, at least one K tile each, and S * T <= PARTIAL_ROWS
    (decode: T = 1..16 splits 32 ways at K = 4096; prefill at T = 512 does not split)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(k_tiles, triton.cdiv(2 * sms, programs), PARTIAL_ROWS // T))


def xlora_mix(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scalings: torch.Tensor,
              adapter_scale: torch.Tensor, *, split_k: int | None = None) -> torch.Tensor:
    """x [T, K] (fp16/bf16/fp32), lora_a [A, R, K], lora_b [A, N, R], scalings [T, A], adapter_scale [A]
    -> delta [T, N] in x's dtype. split_k overrides the shrink's K-split heuristic."""
    assert x.ndim == 2 and x.stride(1) == 1, (x.shape, x.stride())
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32), x.dtype
    T, K = x.shape
    assert lora_a.ndim == 3 and lora_a.shape[2] == K and lora_a.is_contiguous(), (lora_a.shape, K)
    A, R, _ = lora_a.shape
    assert A >= 1 and R >= 1, lora_a.shape
    assert lora_b.ndim == 3 and lora_b.shape[0] == A and lora_b.shape[2] == R and lora_b.is_contiguous(), \
        (lora_b.shape, A, R)
    N = lora_b.shape[1]
    assert lora_a.dtype == x.dtype and lora_b.dtype == x.dtype, (x.dtype, lora_a.dtype, lora_b.dtype)
    assert scalings.shape == (T, A) and scalings.is_floating_point(), (scalings.shape, scalings.dtype, T, A)
    assert adapter_scale.shape == (A,) and adapter_scale.is_floating_point(), (adapter_scale.shape, A)
    assert lora_a.device == lora_b.device == scalings.device == adapter_scale.device == x.device
    out = torch.empty(T, N, dtype=x.dtype, device=x.device)
    if out.numel() == 0 or K == 0:
        return out.zero_()
    AR = A * R
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    decode = T <= DECODE_MAX_T

    # Shrink: decode is a read of Acat (memory-bound), split over K; prefill tiles of 32 x 32 give T / 32 * 5
    # programs at A*R = 144, each reading its x tile and Acat tile once.
    BLOCK_T, BLOCK_AR, BLOCK_K = (16, 32, 128) if decode else (32, 32, 64)
    grid_j, grid_t, k_tiles = triton.cdiv(AR, BLOCK_AR), triton.cdiv(T, BLOCK_T), triton.cdiv(K, BLOCK_K)
    S = split_k or _num_splits(grid_j * grid_t, k_tiles, T, x.device)
    tiles_per_split = triton.cdiv(k_tiles, S)
    S = triton.cdiv(k_tiles, tiles_per_split)  # no empty split
    part = torch.empty(S, T, AR, dtype=torch.float32, device=x.device)
    _xlora_shrink_kernel[(grid_j, grid_t, S)](
        x, lora_a, scalings, adapter_scale, part, T, K, AR, tiles_per_split, x.stride(0), scalings.stride(0),
        scalings.stride(1), part.stride(0), R=R, BLOCK_T=BLOCK_T, BLOCK_AR=BLOCK_AR, BLOCK_K=BLOCK_K,
        PRECISION=precision)
    h = part[0]  # [T, AR]
    if S > 1:
        h = torch.empty(T, AR, dtype=torch.float32, device=x.device)
        _xlora_reduce_kernel[(triton.cdiv(T * AR, REDUCE_BLOCK),)](part, h, T * AR, S, BLOCK=REDUCE_BLOCK,
                                                                    S_BLOCK=REDUCE_S_BLOCK)

    # Mix: reads Bcat once per T tile; decode uses narrow N tiles so that N / 32 programs share the read.
    mix_t = 16 if decode else 32 if T <= 64 else 64
    BLOCK_N = 32 if decode else 64 if T <= 64 else 128
    _xlora_mix_kernel[(triton.cdiv(N, BLOCK_N), triton.cdiv(T, mix_t))](
        h, lora_b, out, T, N, AR, lora_b.stride(0), lora_b.stride(1), out.stride(0),
        R=R, BLOCK_T=mix_t, BLOCK_N=BLOCK_N, BLOCK_J=MIX_BLOCK_J, PRECISION=precision,
        num_warps=8 if mix_t * BLOCK_N >= 64 * 128 else 4)
    return out
