"""Paged attention for CPU tensors. Same signatures and results as reference.paged_attention / paged_decode_attention.

    float32 cache   store_kv, paged_attention and paged_decode_attention: the C++ kernels of attention_cpu.cpp (pages
                    read in place; all sequences, KV heads and query chunks in one parallel loop). One kernel for
                    prefill and decode: a query's result depends on its keys alone, not on the batch or on how its
                    context was computed (prefill, chunk, prefix-cache hit).
    other dtypes    torch's fused attention (scaled_dot_product_attention, GQA without expanding the KV heads) on
                    each sequence's context; store_kv as the reference

Paged KV cache layout as in reference.py: [NB, BS, KVH, D]. A sequence whose blocks are consecutive ids (a sequence
alone on the cache gets blocks 0, 1, 2, ... from the block manager's free list) is read in place as a strided view of
the cache; any other is gathered by its blocks.
"""
import torch
import torch.nn.functional as F

from . import reference
from .cpu_ext import ext

F32 = torch.float32


def _compiled(x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the C++ kernels take these: float32, a contiguous cache and x's last dim, and the extension built."""
    return (ext is not None and x.dtype == k_cache.dtype == v_cache.dtype == F32 and x.stride(-1) == 1
            and k_cache.is_contiguous() and v_cache.is_contiguous())


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    if _compiled(k, k_cache, v_cache) and v.dtype == F32 and v.stride(-1) == 1:
        ext.store_kv(k, v, k_cache, v_cache, slot_mapping.contiguous())
    else:
        reference.store_kv(k, v, k_cache, v_cache, slot_mapping)


def _context(k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: list[int],
             n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v [n, KVH, D]: a sequence's first n cached tokens, views when its blocks are consecutive, else copies."""
    NB, BS, KVH, D = k_cache.shape
    if blocks == list(range(blocks[0], blocks[0] + len(blocks))):
        start = blocks[0] * BS
        return (k_cache.view(NB * BS, KVH, D)[start:start + n], v_cache.view(NB * BS, KVH, D)[start:start + n])
    index = torch.tensor(blocks, device=k_cache.device)
    return k_cache[index].view(-1, KVH, D)[:n], v_cache[index].view(-1, KVH, D)[:n]


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    return x.permute(1, 0, 2)[None]  # [L, H, D] -> [1, H, L, D], a view


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None,
            causal: bool, softcap: float | None) -> torch.Tensor:
    """q [L, H, D], k/v [N, KVH, D], mask [L, N] bool (True = visible) or None -> [L, H, D]."""
    if softcap is None:
        o = F.scaled_dot_product_attention(_heads_first(q), _heads_first(k), _heads_first(v), attn_mask=mask,
                                           is_causal=causal, scale=scale, enable_gqa=True)
        return o[0].permute(1, 0, 2)
    # SDPA cannot cap the logits: grouped heads by hand, in fp32 as the reference.
    L, H, D = q.shape
    N, KVH, _ = k.shape
    G = H // KVH
    qg = q.float().view(L, KVH, G, D).permute(1, 2, 0, 3)  # [KVH, G, L, D]
    s = qg @ k.float().permute(1, 2, 0)[:, None] * scale  # [KVH, G, L, N]
    s = softcap * torch.tanh(s / softcap)
    if causal:
        mask = torch.ones(L, N, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    o = torch.softmax(s, dim=-1) @ v.float().permute(1, 0, 2)[:, None]  # [KVH, G, L, D]
    return o.permute(2, 0, 1, 3).reshape(L, H, D).to(q.dtype)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, context_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      scale: float, sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Causal attention of a ragged batch of new queries (q [T, H, D]) against each sequence's paged context."""
    if _compiled(q, k_cache, v_cache):
        return ext.paged_attention(q, k_cache, v_cache, block_tables.contiguous(), context_lens.contiguous(),
                                   cu_seqlens_q.contiguous(), scale, sliding_window or 0, softcap or 0.0)
    BS = k_cache.shape[1]
    out = torch.empty_like(q)
    cu, tables = cu_seqlens_q.tolist(), block_tables.tolist()
    for b, n in enumerate(context_lens.tolist()):
        start, end = cu[b], cu[b + 1]
        L = end - start
        blocks = tables[b][: -(-n // BS)]
        k, v = _context(k_cache, v_cache, blocks, n)
        mask, causal = None, L == n and sliding_window is None
        if not causal:  # query i sits at position n - L + i and sees keys j with p - window < j <= p
            q_pos = torch.arange(n - L, n, device=q.device)[:, None]
            k_pos = torch.arange(n, device=q.device)[None, :]
            mask = k_pos <= q_pos
            if sliding_window is not None:
                mask &= k_pos > q_pos - sliding_window
        out[start:end] = _attend(q[start:end], k, v, scale, mask, causal, softcap)
    return out


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     scale: float, sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """One new query per sequence (q [B, H, D]): it sees the last min(n, window) tokens, so no mask is needed, and
    a window only narrows the view."""
    if _compiled(q, k_cache, v_cache):
        return ext.paged_attention(q, k_cache, v_cache, block_tables.contiguous(), context_lens.contiguous(), None,
                                   scale, sliding_window or 0, softcap or 0.0)
    BS = k_cache.shape[1]
    outs = []
    for b, (blocks, n) in enumerate(zip(block_tables.tolist(), context_lens.tolist())):
        first = 0 if sliding_window is None else max(0, n - sliding_window)
        blocks = blocks[first // BS: -(-n // BS)]
        skip = first % BS  # tokens of the first block before the window
        k, v = _context(k_cache, v_cache, blocks, n - first + skip)
        outs.append(_attend(q[b: b + 1], k[skip:], v[skip:], scale, None, False, softcap))
    return outs[0] if len(outs) == 1 else torch.cat(outs)
