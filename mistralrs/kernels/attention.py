"""Triton paged attention: store_kv, and causal flash attention of ragged new queries over a paged KV cache.

Memory layout (as kernels/reference.py):
    q, out:            [T, H, D], the new tokens of B sequences back to back; cu_seqlens_q [B+1] int32 marks them
    k_cache, v_cache:  [NB, BS, KVH, D]; a sequence's token i is in page block_tables[b, i // BS], row i % BS
    context_lens:      [B] int32, tokens in the cache per sequence, the new ones last (so query i of sequence b sits
                       at position context_lens[b] - L_b + i)
Prefill (paged_attention): one program handles BLOCK_M queries of one sequence and one query head and walks the
sequence's keys in tiles of BLOCK_N (32-64 keys, several pages: each key's page id is gathered from the block table)
with an online softmax in fp32 (FlashAttention-2, logits in log2 units for exp2), rescaling once per tile. The key
tiles split three ways: the window's lower edge and the causal diagonal are masked, the tiles between them, which
every query of the program sees whole, are not. GQA: query head h reads KV head h // (H // KVH), nothing is copied.
The same kernel serves prefill (L_b > 1, also chunked prefill over earlier context) and decode (L_b = 1).

Decode (paged_decode_attention, flash-decoding): one program per (sequence, KV head, split) attends the KV head's
GROUP query heads together (the rows of one tl.dot, padded to 16), so each K/V tile is read once per group, over one
split of the context; it writes fp32 partials (acc, max, sum) for the GROUP real heads only. One reduce program per
(sequence, KV head) then combines its splits for the whole group. The K/V tile loads are software-pipelined by
Triton (num_stages = 3: cp.async, LDGSTS in the SASS, on sm_80 and sm_90a alike; gathered rows rule out TMA).

No shape that changes from step to step is a constexpr or a specialized int: the block-table width (stride_bt_b),
the decode split size and split count are runtime ints marked do_not_specialize, so a context growing token by token
or a batch changing size reuses one compiled kernel (tests/test_kernels_compile.py counts them).
"""
import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = 2^(x log2 e)


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     stride_k_t, stride_k_h, stride_v_t, stride_v_h, stride_c_slot, stride_c_h,
                     D: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + t)
    d = tl.arange(0, BLOCK_D)
    mask = d < D
    k = tl.load(k_ptr + t * stride_k_t + h * stride_k_h + d, mask=mask)
    v = tl.load(v_ptr + t * stride_v_t + h * stride_v_h + d, mask=mask)
    dst = slot * stride_c_slot + h * stride_c_h + d
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    T, KVH, D = k.shape
    assert v.shape == k.shape and k_cache.shape == v_cache.shape and k_cache.shape[2:] == (KVH, D)
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert slot_mapping.shape == (T,) and slot_mapping.dtype in (torch.int32, torch.int64)
    if T == 0:
        return
    _store_kv_kernel[(T, KVH)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0),
                               v.stride(1), k_cache.stride(1), k_cache.stride(2), D=D,
                               BLOCK_D=triton.next_power_of_2(D))


@triton.jit
def _kv_rows(block_tables_ptr, k_pos, n, kvh, stride_c_b, stride_c_s, stride_c_h, BS: tl.constexpr,
             OFFSET_64: tl.constexpr):
    """Cache offsets of the keys at positions k_pos [BLOCK_N] of one sequence (block_tables_ptr: its row): each key's
    page is gathered from the block table, so a tile may span several pages in any order. int32 offsets unless the
    cache has 2^31 elements or more (OFFSET_64): 64-bit ones cost 6-8% more instructions per tile."""
    page = tl.load(block_tables_ptr + k_pos // BS, mask=k_pos < n, other=0)
    if OFFSET_64:
        page = page.to(tl.int64)
    return page * stride_c_b + (k_pos % BS) * stride_c_s + kvh * stride_c_h  # [BLOCK_N]


@triton.jit
def _attend_tile(q, k_cache_ptr, v_cache_ptr, kv_row, offs_d, kv_mask, visible, m_i, l_i, acc, scale, softcap,
                 MASKED: tl.constexpr, USE_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """One FlashAttention-2 step over a K/V tile: logits in the log2 domain (exp2 is one MUFU op), the running max
    m_i, sum l_i and output acc rescaled once per tile. MASKED=False skips the mask for tiles every query sees whole."""
    kv_off = kv_row[:, None] + offs_d[None, :]
    k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [M, BLOCK_N]
    if USE_SOFTCAP:  # softcap * tanh(s * scale / softcap), tanh(x) = 2 sigmoid(2x) - 1
        s = (softcap * LOG2E) * (2 * tl.sigmoid(s * (2 * scale / softcap)) - 1)
    else:
        s = s * (scale * LOG2E)
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["stride_bt_b"])
def _paged_attention_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, context_lens_ptr, cu_q_ptr,
                            scale, softcap, window,
                            stride_q_t, stride_q_h, stride_c_b, stride_c_s, stride_c_h, stride_bt_b,
                            stride_o_t, stride_o_h,
                            GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BS: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, USE_WINDOW: tl.constexpr,
                            USE_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, OFFSET_64: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    tile = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + b)
    L = tl.load(cu_q_ptr + b + 1) - q_start
    if tile * BLOCK_M >= L:
        return
    n = tl.load(context_lens_ptr + b)
    kvh = h // GROUP
    table = block_tables_ptr + b * stride_bt_b

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = tl.arange(0, BLOCK_N)
    m_valid = offs_m < L
    d_valid = offs_d < D
    q = tl.load(q_ptr + (q_start + offs_m)[:, None] * stride_q_t + h * stride_q_h + offs_d[None, :],
                mask=m_valid[:, None] & d_valid[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    q_pos = n - L + offs_m
    q_first = n - L + tile * BLOCK_M  # the tile's first and last real query
    q_last = n - L + tl.minimum(L, (tile + 1) * BLOCK_M) - 1

    # Keys some query of the tile sees: [lo, q_last], in tiles of BLOCK_N from a multiple of BLOCK_N. The tiles in
    # [mid_lo, mid_hi) are seen whole by every query (causal and in the window), so they skip the mask.
    lo = 0
    mid_lo = 0
    if USE_WINDOW:
        lo = tl.maximum(q_first - window + 1, 0)
        mid_lo = tl.cdiv(tl.maximum(q_last - window + 1, 0), BLOCK_N) * BLOCK_N
    first = lo // BLOCK_N * BLOCK_N
    end = q_last + 1
    mid_lo = tl.minimum(tl.maximum(mid_lo, first), end)
    mid_hi = tl.maximum(mid_lo, (q_first + 1) // BLOCK_N * BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if USE_WINDOW:
        for start in range(first, mid_lo, BLOCK_N):  # the window's lower edge
            k_pos = start + rows
            visible = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] > q_pos[:, None] - window)
            kv_row = _kv_rows(table, k_pos, n, kvh, stride_c_b, stride_c_s, stride_c_h, BS, OFFSET_64)
            m_i, l_i, acc = _attend_tile(q, k_cache_ptr, v_cache_ptr, kv_row, offs_d, d_valid[None, :], visible,
                                         m_i, l_i, acc, scale, softcap, True, USE_SOFTCAP, PRECISION)
    for start in range(mid_lo, mid_hi, BLOCK_N):  # seen whole
        kv_row = _kv_rows(table, start + rows, n, kvh, stride_c_b, stride_c_s, stride_c_h, BS, OFFSET_64)
        m_i, l_i, acc = _attend_tile(q, k_cache_ptr, v_cache_ptr, kv_row, offs_d, d_valid[None, :], None, m_i, l_i,
                                     acc, scale, softcap, False, USE_SOFTCAP, PRECISION)
    for start in range(mid_hi, end, BLOCK_N):  # the causal diagonal
        k_pos = start + rows
        visible = k_pos[None, :] <= q_pos[:, None]
        if USE_WINDOW:
            visible = visible & (k_pos[None, :] > q_pos[:, None] - window)
        kv_row = _kv_rows(table, k_pos, n, kvh, stride_c_b, stride_c_s, stride_c_h, BS, OFFSET_64)
        kv_mask = (k_pos < n)[:, None] & d_valid[None, :]  # the last tile's keys past n may be NaN garbage
        m_i, l_i, acc = _attend_tile(q, k_cache_ptr, v_cache_ptr, kv_row, offs_d, kv_mask, visible, m_i, l_i, acc,
                                     scale, softcap, True, USE_SOFTCAP, PRECISION)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # padding rows past L saw no key
    tl.store(out_ptr + (q_start + offs_m)[:, None] * stride_o_t + h * stride_o_h + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else (8, 0)


def prefill_tiles(max_seqlen_q: int, BLOCK_D: int, capability: tuple[int, int]) -> tuple[int, int, int]:
    """(BLOCK_M queries, BLOCK_N keys, warps) per program. A key tile may span pages (their ids are gathered per
    key), so the softmax is rescaled once per tile, not once per page: 64 keys at head dim <= 64, and at 128 on
    sm_90 (198 registers) or for 16 queries; 32 otherwise, where on sm_80 a [64, 64] logit tile beside the [64, 128]
    accumulator and q needs 255 registers and spills (32 keys: 186, about what one 16-key page took).
    16 queries when every sequence has at most 16 new tokens (a short chunk); 8 warps at head dim 256, where 4 spill
    a [64, 256] fp32 accumulator on sm_80."""
    BLOCK_M = 16 if max_seqlen_q <= 16 else 64
    wide = BLOCK_D <= 64 or (BLOCK_D <= 128 and (BLOCK_M == 16 or capability >= (9, 0)))
    return BLOCK_M, 64 if wide else 32, 8 if BLOCK_D >= 256 else 4


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, scale: float,
                    sliding_window: int | None = None, softcap: float | None = None,
                    max_seqlen_q: int | None = None) -> torch.Tensor:
    T, H, D = q.shape
    NB, BS, KVH, Dk = k_cache.shape
    B = context_lens.shape[0]
    assert Dk == D and H % KVH == 0 and v_cache.shape == k_cache.shape and q.dtype == k_cache.dtype
    assert q.stride(-1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert block_tables.dtype == torch.int32 and block_tables.stride(-1) == 1 and block_tables.shape[0] == B
    assert context_lens.dtype == torch.int32 and cu_seqlens_q.dtype == torch.int32 and cu_seqlens_q.shape == (B + 1,)
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    out = torch.empty_like(q)
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_M, BLOCK_N, num_warps = prefill_tiles(max_seqlen_q, BLOCK_D, _capability(q.device))
    grid = (B, H, triton.cdiv(max_seqlen_q, BLOCK_M))
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, block_tables, context_lens, cu_seqlens_q,
        scale, softcap or 1.0, sliding_window or 0,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=H // KVH, D=D, BLOCK_D=BLOCK_D, BS=BS,
        BLOCK_N=BLOCK_N, BLOCK_M=BLOCK_M, USE_WINDOW=sliding_window is not None,
        USE_SOFTCAP=softcap is not None, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        OFFSET_64=k_cache.numel() >= 2 ** 31, num_warps=num_warps)
    return out


@triton.jit(do_not_specialize=["stride_bt_b", "tiles_per_split"])
def _decode_split_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
                         part_acc_ptr, part_ml_ptr, scale, softcap, window, tiles_per_split,
                         stride_q_t, stride_q_h, stride_c_b, stride_c_s, stride_c_h, stride_bt_b,
                         GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                         BS: tl.constexpr, BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr,
                         PRECISION: tl.constexpr, OFFSET_64: tl.constexpr):
    """Partial attention of the GROUP query heads of KV head `kvh` over one split of sequence b's keys."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    n_kv = tl.num_programs(1)
    n_split = tl.num_programs(2)
    n = tl.load(context_lens_ptr + b)
    q_pos = n - 1
    table = block_tables_ptr + b * stride_bt_b

    g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    rows = tl.arange(0, BLOCK_N)
    g_valid = g < GROUP
    d_valid = offs_d < D
    q = tl.load(q_ptr + b * stride_q_t + (kvh * GROUP + g)[:, None] * stride_q_h + offs_d[None, :],
                mask=g_valid[:, None] & d_valid[None, :], other=0.0)  # [G_PAD, BLOCK_D]

    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(q_pos - window + 1, 0)
    first = (lo // BLOCK_N + split * tiles_per_split) * BLOCK_N
    last = tl.minimum(first + tiles_per_split * BLOCK_N, n)

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    for start in range(first, last, BLOCK_N):
        k_pos = start + rows
        visible = k_pos < n
        if USE_WINDOW:
            visible = visible & (k_pos > q_pos - window)
        kv_row = _kv_rows(table, k_pos, n, kvh, stride_c_b, stride_c_s, stride_c_h, BS, OFFSET_64)
        m_i, l_i, acc = _attend_tile(q, k_cache_ptr, v_cache_ptr, kv_row, offs_d, visible[:, None] & d_valid[None, :],
                                     visible[None, :], m_i, l_i, acc, scale, softcap, True, USE_SOFTCAP, PRECISION)

    # Partials of the real heads only: acc [B, KVH, S, GROUP, D], (m, l) [B, KVH, S, 2, GROUP]; m in log2 units.
    part = (b * n_kv + kvh) * n_split + split
    tl.store(part_acc_ptr + part * GROUP * D + g[:, None] * D + offs_d[None, :], acc,
             mask=g_valid[:, None] & d_valid[None, :])
    tl.store(part_ml_ptr + part * 2 * GROUP + g, m_i, mask=g_valid)
    tl.store(part_ml_ptr + part * 2 * GROUP + GROUP + g, l_i, mask=g_valid)


@triton.jit(do_not_specialize=["n_split"])
def _decode_reduce_kernel(part_acc_ptr, part_ml_ptr, out_ptr, n_split, stride_o_t, stride_o_h,
                          S_BLOCK: tl.constexpr, GROUP: tl.constexpr, G_POW2: tl.constexpr, D: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    """out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s for the GROUP query heads of one sequence and KV head
    (their partials are one contiguous block), S_BLOCK splits at a time with an online max: n_split is a runtime
    int."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    n_kv = tl.num_programs(1)
    g = tl.arange(0, G_POW2)
    offs_d = tl.arange(0, BLOCK_D)
    gd_mask = (g < GROUP)[:, None] & (offs_d < D)[None, :]  # [G_POW2, BLOCK_D]
    first = (b * n_kv + kvh) * n_split
    m_run = tl.full([G_POW2], float("-inf"), tl.float32)
    l_run = tl.zeros([G_POW2], tl.float32)
    acc_run = tl.zeros([G_POW2, BLOCK_D], tl.float32)
    for s0 in range(0, n_split, S_BLOCK):
        s = s0 + tl.arange(0, S_BLOCK)
        part = first + s  # [S_BLOCK]
        sg_mask = (s < n_split)[:, None] & (g < GROUP)[None, :]  # [S_BLOCK, G_POW2]
        ml = part_ml_ptr + part[:, None] * 2 * GROUP + g[None, :]
        m = tl.load(ml, mask=sg_mask, other=float("-inf"))
        l = tl.load(ml + GROUP, mask=sg_mask, other=0.0)
        acc = tl.load(part_acc_ptr + part[:, None, None] * GROUP * D + (g[:, None] * D + offs_d[None, :])[None, :, :],
                      mask=(s < n_split)[:, None, None] & gd_mask[None, :, :], other=0.0)  # [S_BLOCK, G_POW2, BLOCK_D]
        m_new = tl.maximum(m_run, tl.max(m, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_safe[None, :]))  # splits that saw no key weigh nothing
        alpha = tl.exp2(m_run - m_safe)  # 0 while no split has seen a key
        l_run = l_run * alpha + tl.sum(l * w, axis=0)
        acc_run = acc_run * alpha[:, None] + tl.sum(acc * w[:, :, None], axis=0)
        m_run = m_new
    out = acc_run / tl.where(l_run == 0.0, 1.0, l_run)[:, None]  # the padding heads past GROUP
    tl.store(out_ptr + b * stride_o_t + (kvh * GROUP + g)[:, None] * stride_o_h + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=gd_mask)


MAX_SPLITS = 64
REDUCE_TILE = 4096  # partial elements (splits x heads x head dim) the reduce combines per step: 32 registers at 4 warps


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def decode_splits(B: int, KVH: int, max_tiles: int, sms: int) -> tuple[int, int]:
    """(splits S, key tiles per split): enough (sequence, KV head, split) programs to fill the GPU twice over, at
    least one tile each, and no empty split. Both are runtime ints of the kernels, so they may follow the context
    freely."""
    S = max(1, min(max_tiles, triton.cdiv(2 * sms, B * KVH), MAX_SPLITS))
    tiles_per_split = triton.cdiv(max_tiles, S)
    return triton.cdiv(max_tiles, tiles_per_split), tiles_per_split


def decode_block_n(BLOCK_D: int) -> int:
    """Keys per K/V tile: 64 (a [64, 128] bf16 tile is 16 KB; three stages of K and V are 96 KB of shared memory),
    32 at head dim 256."""
    return 64 if BLOCK_D <= 128 else 32


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           scale: float, sliding_window: int | None = None, softcap: float | None = None,
                           num_splits: int | None = None) -> torch.Tensor:
    """Flash-decoding: one query token per sequence (q [B, H, D]); the context is split across programs so a batch
    of one with a long context still fills the GPU, then the splits are reduced."""
    B, H, D = q.shape
    NB, BS, KVH, Dk = k_cache.shape
    assert Dk == D and H % KVH == 0 and v_cache.shape == k_cache.shape and q.dtype == k_cache.dtype
    assert q.stride(-1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert block_tables.dtype == torch.int32 and block_tables.stride(-1) == 1 and block_tables.shape[0] == B
    assert context_lens.dtype == torch.int32 and cu_seqlens_q.shape == (B + 1,)
    GROUP = H // KVH
    G_PAD, BLOCK_D = max(16, triton.next_power_of_2(GROUP)), max(16, triton.next_power_of_2(D))  # tl.dot's M >= 16
    BLOCK_N = decode_block_n(BLOCK_D)
    max_keys = block_tables.shape[1] * BS
    if sliding_window is not None:  # only the window's tiles are walked
        max_keys = min(max_keys, sliding_window + BLOCK_N)
    max_tiles = triton.cdiv(max_keys, BLOCK_N)
    if num_splits:
        tiles_per_split = triton.cdiv(max_tiles, num_splits)
        S = triton.cdiv(max_tiles, tiles_per_split)
    else:
        S, tiles_per_split = decode_splits(B, KVH, max_tiles, _sm_count(q.device))
    part_acc = torch.empty(B, KVH, S, GROUP, D, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(B, KVH, S, 2, GROUP, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(B, KVH, S)](
        q, k_cache, v_cache, block_tables, context_lens, part_acc, part_ml, scale, softcap or 1.0,
        sliding_window or 0, tiles_per_split, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), block_tables.stride(0), GROUP=GROUP, G_PAD=G_PAD, D=D, BLOCK_D=BLOCK_D, BS=BS,
        BLOCK_N=BLOCK_N, USE_WINDOW=sliding_window is not None, USE_SOFTCAP=softcap is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", OFFSET_64=k_cache.numel() >= 2 ** 31)
    out = torch.empty_like(q)
    G_POW2 = triton.next_power_of_2(GROUP)
    _decode_reduce_kernel[(B, KVH)](part_acc, part_ml, out, S, out.stride(0), out.stride(1),
                                    S_BLOCK=max(1, min(16, REDUCE_TILE // (G_POW2 * BLOCK_D))), GROUP=GROUP,
                                    G_POW2=G_POW2, D=D, BLOCK_D=BLOCK_D)
    return out
