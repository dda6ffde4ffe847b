"""Plain-torch reference of every kernel op: the spec, the test oracle, the benchmark baseline, and the CPU path of
the ops that have no faster CPU implementation (attention has one: attention_cpu.py).

Paged KV cache layout (shared with the Triton kernels):
    k_cache, v_cache: [NB, BS, KVH, D]; token slot s lives at block s // BS, row s % BS.
A sequence's block table lists its blocks in order, so its token i sits in slot
block_table[i // BS] * BS + i % BS.
"""
import torch
import torch.nn.functional as F


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write new tokens' K/V ([T, KVH, D]) into their cache slots ([T] int64).
    Cost: bytes 2 x 2 T KVH D e (k and v read, their slots written; e bytes an element); no FLOPs."""
    NB, BS, KVH, D = k_cache.shape
    k_cache.view(NB * BS, KVH, D)[slot_mapping] = k.to(k_cache.dtype)
    v_cache.view(NB * BS, KVH, D)[slot_mapping] = v.to(v_cache.dtype)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, context_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    scale: float, sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Causal attention of a ragged batch of new queries against each sequence's paged context.

    q: [T, H, D], the new tokens of B sequences packed back to back (cu_seqlens_q: [B+1]).
    Sequence b has context_lens[b] tokens in the cache, its new tokens being the last ones,
    so its query i sits at position context_lens[b] - L_b + i. Decode is the case L_b = 1.
    A query at position p sees keys at positions j with p - sliding_window < j <= p.
    Cost: FLOPs 4 H D sum_t keys(t) (q.k and p.v, 2 each; keys(t) = what query t sees, n(n+1)/2 for a whole prompt
    of n); bytes 2 T H D e (q read, out written) + 2 KVH D e sum_b n_b (each sequence's K and V read once).
    """
    T, H, D = q.shape
    NB, BS, KVH, _ = k_cache.shape
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    for b, n in enumerate(context_lens.tolist()):
        start, end = cu[b], cu[b + 1]
        L = end - start
        blocks = block_tables[b, : (n + BS - 1) // BS].long()
        k = k_cache[blocks].reshape(-1, KVH, D)[:n].float()  # [N, KVH, D]
        v = v_cache[blocks].reshape(-1, KVH, D)[:n].float()
        k = k.repeat_interleave(H // KVH, dim=1)  # [N, H, D]: GQA shares one KV head per group
        v = v.repeat_interleave(H // KVH, dim=1)
        s = torch.einsum("lhd,nhd->hln", q[start:end].float(), k) * scale  # [H, L, N]
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        q_pos = torch.arange(n - L, n, device=q.device)[:, None]
        k_pos = torch.arange(n, device=q.device)[None, :]
        visible = k_pos <= q_pos
        if sliding_window is not None:
            visible &= k_pos > q_pos - sliding_window
        p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1)
        out[start:end] = torch.einsum("hln,nhd->lhd", p, v).to(q.dtype)
    return out


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           scale: float, sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """One new query per sequence (q [B, H, D]): paged_attention's case L_b = 1.
    Cost: FLOPs 4 H D sum_b n_b; bytes 2 B H D e + 2 KVH D e sum_b n_b (memory-bound: the K/V bytes dominate)."""
    return paged_attention(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, scale, sliding_window,
                           softcap)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """x / rms(x) * weight over the last dim, in fp32; Gemma's unit_offset stores w - 1 and scales by (1 + w) before
    the cast back. Hugging Face's Llama and Gemma RMSNorm to the bit.
    Cost: FLOPs ~4 T C (square-add, then two products); bytes 2 T C e + C e (x read, out written, the weight)."""
    dim = weight.shape
    # F.rms_norm's x * rsqrt(mean(x^2) + eps) * w is Hugging Face's in fewer ops; its weight goes in only in fp32,
    # where Hugging Face's cast back before multiplying changes nothing.
    if unit_offset:
        return F.rms_norm(x.float(), dim, 1.0 + weight.float(), eps).to(x.dtype)
    if x.dtype == weight.dtype == torch.float32:
        return F.rms_norm(x, dim, weight, eps)
    return weight * F.rms_norm(x.float(), dim, None, eps).to(x.dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]; rotates (x1, x2) halves of the first r = cos.shape[-1] dims: x * cos + (-x2, x1) * sin, written
    as x * cos + (x2, x1) * (-sin, sin) with the sign in layers.Rotary's table (the same numbers, in half the ops).
    cos, sin: [T, 1, r]."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + x.roll(r // 2, -1) * sin
    x_rot = x[..., :r]
    return torch.cat((x_rot * cos + x_rot.roll(r // 2, -1) * sin, x[..., r:]), dim=-1)


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary on q [T, H, D] and k [T, KVH, D] (apply_rotary); a faster implementation may rotate them in place.
    Cost: FLOPs 3 T (H + KVH) r; bytes 2 T (H + KVH) D e (read and written) + 2 T r e (the tables)."""
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight [N, K].T (+ bias).
    Cost: FLOPs 2 M N K; bytes (N K + M K + M N) e (the weight once: decode is bound by it, prefill by the FLOPs)."""
    return F.linear(x, weight, bias)


def gguf_rows(qweight: torch.Tensor, qtype, K: int, ids: torch.Tensor) -> torch.Tensor:
    """Rows ids [T] of W [N, K] stored as GGUF blocks, dequantized to float32 [T, K] (an embedding lookup).
    Cost: bytes T row_bytes + 4 T K; FLOPs ~2 T K (a scale and an offset per weight)."""
    from .dequant import dequantize
    rows = qweight[ids]  # [T, row_bytes]
    return dequantize(rows, qtype, (rows.shape[0], K))


def gguf_matmul(x: torch.Tensor, qweight: torch.Tensor, qtype, N: int, K: int) -> torch.Tensor:
    """x [M, K] @ W.T, W [N, K] stored as GGUF blocks (qweight uint8 [N, row_bytes]): dequantize, then matmul.
    Cost: FLOPs 2 M N K; bytes N row_bytes + (M K + M N) e (row_bytes / K: 0.5625 for Q4_0, 1.0625 for Q8_0)."""
    from .dequant import dequantize
    return x @ dequantize(qweight, qtype, (N, K), dtype=x.dtype).T


def xlora_mix(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scalings: torch.Tensor,
              adapter_scale: torch.Tensor) -> torch.Tensor:
    """X-LoRA delta of one linear, added by the caller to the base output; fp32 inside, x's dtype out.

    x [T, K], lora_a [A, R, K], lora_b [A, N, R] (smaller ranks zero-padded to R), scalings [T, A] per token,
    adapter_scale [A] = alpha_a / r_a * global_scaling_weight:
        delta[t] = sum_a scalings[t, a] * adapter_scale[a] * (lora_b[a] @ (lora_a[a] @ x[t]))
    The original scales x by scalings before A; scaling A's output instead is the same, A being linear.
    Cost: FLOPs 2 T A R (K + N); bytes A R (K + N) e (every adapter once) + T (K + N + A) e.
    """
    h = torch.einsum("tk,ark->tar", x.float(), lora_a.float())  # [T, A, R]
    h = h * (scalings.float() * adapter_scale.float())[:, :, None]
    return torch.einsum("tar,anr->tn", h, lora_b.float()).to(x.dtype)
