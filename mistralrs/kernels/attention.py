"""Triton paged attention: store_kv, and causal flash attention of ragged new queries over a paged KV cache.

Memory layout (as kernels/reference.py):
    q, out:            [T, H, D], the new tokens of B sequences back to back; cu_seqlens_q [B+1] int32 marks them
    k_cache, v_cache:  [NB, BS, KVH, D]; a sequence's token i is in page block_tables[b, i // BS], row i % BS
    context_lens:      [B] int32, tokens in the cache per sequence, the new ones last (so query i of sequence b sits
                       at position context_lens[b] - L_b + i)
One program handles BLOCK_M queries of one sequence and one query head, walking the sequence's pages in order with
an online softmax in fp32 (FlashAttention-2). GQA: query head h reads KV head h // (H // KVH), nothing is copied.
The same kernel serves prefill (L_b > 1, also chunked prefill over earlier context) and decode (L_b = 1).

No shape that changes from step to step is a constexpr or a specialized int: the block-table width (stride_bt_b),
the decode split size and split count are runtime ints marked do_not_specialize, so a context growing token by token
or a batch changing size reuses one compiled kernel (tests/test_kernels_compile.py counts them).
"""
import torch
import triton
import triton.language as tl


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


@triton.jit(do_not_specialize=["stride_bt_b"])
def _paged_attention_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, context_lens_ptr, cu_q_ptr,
                            scale, softcap, window,
                            stride_q_t, stride_q_h, stride_c_b, stride_c_s, stride_c_h, stride_bt_b,
                            stride_o_t, stride_o_h,
                            GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BS: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, USE_WINDOW: tl.constexpr,
                            USE_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    tile = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + b)
    L = tl.load(cu_q_ptr + b + 1) - q_start
    if tile * BLOCK_M >= L:
        return
    n = tl.load(context_lens_ptr + b)
    kvh = h // GROUP

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = tl.arange(0, BLOCK_N)
    m_valid = offs_m < L
    d_valid = offs_d < D
    q = tl.load(q_ptr + (q_start + offs_m)[:, None] * stride_q_t + h * stride_q_h + offs_d[None, :],
                mask=m_valid[:, None] & d_valid[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    q_pos = n - L + offs_m

    # Pages that hold any key some query of this tile can see: up to its last query, from its first window.
    hi = n - L + tl.minimum(L, (tile + 1) * BLOCK_M)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(n - L + tile * BLOCK_M - window + 1, 0)
    first_page = lo // BS

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for page_idx in range(first_page, tl.cdiv(hi, BS)):
        page = tl.load(block_tables_ptr + b * stride_bt_b + page_idx).to(tl.int64)
        k_pos = page_idx * BS + rows
        n_valid = (rows < BS) & (k_pos < n)
        kv_off = page * stride_c_b + rows[:, None] * stride_c_s + kvh * stride_c_h + offs_d[None, :]
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_M, BLOCK_N]
        if USE_SOFTCAP:
            s = softcap * (2 * tl.sigmoid(2 * s / softcap) - 1)  # softcap * tanh(s / softcap)
        visible = n_valid[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            visible = visible & (k_pos[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # padding rows past L saw no key
    tl.store(out_ptr + (q_start + offs_m)[:, None] * stride_o_t + h * stride_o_h + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])


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
    BLOCK_M, BLOCK_D = 16 if max_seqlen_q <= 16 else 64, max(16, triton.next_power_of_2(D))
    grid = (B, H, triton.cdiv(max_seqlen_q, BLOCK_M))
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, block_tables, context_lens, cu_seqlens_q,
        scale, softcap or 1.0, sliding_window or 0,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=H // KVH, D=D, BLOCK_D=BLOCK_D, BS=BS,
        BLOCK_N=max(16, triton.next_power_of_2(BS)), BLOCK_M=BLOCK_M, USE_WINDOW=sliding_window is not None,
        USE_SOFTCAP=softcap is not None, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=8 if BLOCK_D >= 256 else 4)  # 4 warps spill a [64, 256] fp32 accumulator on sm_80 (255 regs)
    return out


@triton.jit(do_not_specialize=["stride_bt_b", "pages_per_split"])
def _decode_split_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
                         part_acc_ptr, part_ml_ptr, scale, softcap, window, pages_per_split,
                         stride_q_t, stride_q_h, stride_c_b, stride_c_s, stride_c_h, stride_bt_b,
                         GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                         BS: tl.constexpr, BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """Partial attention of the GROUP query heads of KV head `kvh` over one split of sequence b's pages."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    n_kv = tl.num_programs(1)
    n_split = tl.num_programs(2)
    n = tl.load(context_lens_ptr + b)
    q_pos = n - 1

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
    first = lo // BS + split * pages_per_split
    last = tl.minimum(first + pages_per_split, tl.cdiv(n, BS))

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    for page_idx in range(first, last):
        page = tl.load(block_tables_ptr + b * stride_bt_b + page_idx).to(tl.int64)
        k_pos = page_idx * BS + rows
        visible = (rows < BS) & (k_pos < n)
        if USE_WINDOW:
            visible = visible & (k_pos > q_pos - window)
        kv_off = page * stride_c_b + rows[:, None] * stride_c_s + kvh * stride_c_h + offs_d[None, :]
        kv_mask = visible[:, None] & d_valid[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [G_PAD, BLOCK_N]
        if USE_SOFTCAP:
            s = softcap * (2 * tl.sigmoid(2 * s / softcap) - 1)
        s = tl.where(visible[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    # partials: acc [B, KVH, S, G_PAD, BLOCK_D], (m, l) [B, KVH, S, 2, G_PAD]
    part = (b * n_kv + kvh) * n_split + split
    tl.store(part_acc_ptr + part * G_PAD * BLOCK_D + g[:, None] * BLOCK_D + offs_d[None, :], acc)
    tl.store(part_ml_ptr + part * 2 * G_PAD + g, m_i)
    tl.store(part_ml_ptr + part * 2 * G_PAD + G_PAD + g, l_i)


@triton.jit(do_not_specialize=["n_split"])
def _decode_reduce_kernel(part_acc_ptr, part_ml_ptr, out_ptr, n_split, stride_o_t, stride_o_h,
                          S_BLOCK: tl.constexpr, GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    """out = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s, for one sequence and query head, over the n_split
    partials S_BLOCK at a time (an online max, so n_split is a runtime int)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    g = h % GROUP
    n_kv = tl.num_programs(1) // GROUP
    offs_d = tl.arange(0, BLOCK_D)
    first = (b * n_kv + kvh) * n_split
    m_run = tl.full([1], float("-inf"), tl.float32)
    l_run = tl.zeros([1], tl.float32)
    acc_run = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(0, n_split, S_BLOCK):
        s = s0 + tl.arange(0, S_BLOCK)
        s_valid = s < n_split
        part = first + s  # [S_BLOCK]
        m = tl.load(part_ml_ptr + part * 2 * G_PAD + g, mask=s_valid, other=float("-inf"))
        l = tl.load(part_ml_ptr + part * 2 * G_PAD + G_PAD + g, mask=s_valid, other=0.0)
        acc = tl.load(part_acc_ptr + part[:, None] * G_PAD * BLOCK_D + g * BLOCK_D + offs_d[None, :],
                      mask=s_valid[:, None], other=0.0)  # [S_BLOCK, BLOCK_D]
        m_new = tl.maximum(m_run, tl.max(m, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_safe))  # splits that saw no key weigh nothing
        alpha = tl.exp(m_run - m_safe)  # 0 while no split has seen a key
        l_run = l_run * alpha + tl.sum(l * w, axis=0)
        acc_run = acc_run * alpha + tl.sum(acc * w[:, None], axis=0)
        m_run = m_new
    out = acc_run / l_run
    tl.store(out_ptr + b * stride_o_t + h * stride_o_h + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < D)


MAX_SPLITS = 64
REDUCE_S_BLOCK = 16  # partials the reduce combines per step


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def decode_splits(B: int, KVH: int, max_pages: int, sms: int) -> tuple[int, int]:
    """(splits S, pages per split): enough (sequence, KV head, split) programs to fill the GPU twice over, at least
    one page each, and no empty split. Both are runtime ints of the kernels, so they may follow the context freely."""
    S = max(1, min(max_pages, triton.cdiv(2 * sms, B * KVH), MAX_SPLITS))
    pages_per_split = triton.cdiv(max_pages, S)
    return triton.cdiv(max_pages, pages_per_split), pages_per_split


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
    G_PAD, BLOCK_D = max(16, triton.next_power_of_2(GROUP)), max(16, triton.next_power_of_2(D))
    max_pages = block_tables.shape[1]
    if sliding_window is not None:  # only the window's pages are walked
        max_pages = min(max_pages, triton.cdiv(sliding_window, BS) + 1)
    if num_splits:
        pages_per_split = triton.cdiv(max_pages, num_splits)
        S = triton.cdiv(max_pages, pages_per_split)
    else:
        S, pages_per_split = decode_splits(B, KVH, max_pages, _sm_count(q.device))
    part_acc = torch.empty(B, KVH, S, G_PAD, BLOCK_D, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(B, KVH, S, 2, G_PAD, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(B, KVH, S)](
        q, k_cache, v_cache, block_tables, context_lens, part_acc, part_ml, scale, softcap or 1.0,
        sliding_window or 0, pages_per_split, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), GROUP=GROUP, G_PAD=G_PAD, D=D, BLOCK_D=BLOCK_D, BS=BS,
        BLOCK_N=max(16, triton.next_power_of_2(BS)), USE_WINDOW=sliding_window is not None, USE_SOFTCAP=softcap is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    out = torch.empty_like(q)
    _decode_reduce_kernel[(B, H)](part_acc, part_ml, out, S, out.stride(0), out.stride(1),
                                  S_BLOCK=REDUCE_S_BLOCK, GROUP=GROUP, G_PAD=G_PAD, D=D, BLOCK_D=BLOCK_D)
    return out
