"""Paged attention: split-K decode (GB/s of K/V read) and varlen prefill (TFLOP/s), against torch SDPA on the same
K/V stored contiguously and against our torch reference. Full mode uses Mistral-7B's head layout (32 query heads,
8 KV heads, head dim 128, bf16); quick mode (CPU, Triton interpreted) uses tiny shapes just to prove the suite runs."""
import pytest
import torch
import torch.nn.functional as F
from conftest import is_quick, measure, timed

from mistralrs.kernels import attention as triton_ops
from mistralrs.kernels import reference

BS = 16
FULL = dict(heads=(32, 8, 128), dtype=torch.bfloat16, decode=[(b, n) for b in (1, 8, 64, 256) for n in (512, 4096, 32768)],
            prefill=[512, 2048, 8192])
QUICK = dict(heads=(4, 2, 64), dtype=torch.float32, decode=[(1, 64), (2, 48)], prefill=[32])
MAX_KV_BYTES = 30e9  # the paged cache and SDPA's contiguous copy of it must both fit an 80 GB card


def pytest_generate_tests(metafunc):
    cfg = QUICK if is_quick(metafunc.config) else FULL
    if "decode_shape" in metafunc.fixturenames:
        metafunc.parametrize("decode_shape", cfg["decode"], ids=[f"B{b}-N{n}" for b, n in cfg["decode"]])
    if "prefill_len" in metafunc.fixturenames:
        metafunc.parametrize("prefill_len", cfg["prefill"], ids=[f"L{n}" for n in cfg["prefill"]])


def paged_cache(B, N, kvh, d, dtype, device):
    """Random K/V for B sequences of N tokens in shuffled pages, plus the same K/V contiguous [B, KVH, N, D]."""
    pages = B * -(-N // BS)
    k_cache = torch.randn(pages, BS, kvh, d, dtype=dtype, device=device)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(pages, device=device).to(torch.int32).view(B, -1)  # [B, pages per sequence]
    k = k_cache[tables.long()].reshape(B, -1, kvh, d)[:, :N].transpose(1, 2).contiguous()
    v = v_cache[tables.long()].reshape(B, -1, kvh, d)[:, :N].transpose(1, 2).contiguous()
    lens = torch.full((B,), N, dtype=torch.int32, device=device)
    return k_cache, v_cache, tables, lens, k, v



def test_decode(benchmark, record, quick, device, limits, decode_shape):
    (h, kvh, d), dtype = (QUICK if quick else FULL)["heads"], (QUICK if quick else FULL)["dtype"]
    B, N = decode_shape
    kv_bytes = 2 * B * N * kvh * d * dtype.itemsize
    if 2 * kv_bytes > MAX_KV_BYTES:
        pytest.skip(f"{2 * kv_bytes / 1e9:.0f} GB of K/V (paged + contiguous) does not fit")
    k_cache, v_cache, tables, lens, k, v = paged_cache(B, N, kvh, d, dtype, device)
    q = torch.randn(B, h, d, dtype=dtype, device=device)
    cu = torch.arange(B + 1, dtype=torch.int32, device=device)
    args = (q, k_cache, v_cache, tables, lens, cu, d ** -0.5)
    ours = measure(benchmark, lambda: triton_ops.paged_decode_attention(*args))
    sdpa = timed(lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True))
    ref = timed(lambda: reference.paged_attention(*args), reps=3)
    record(op="paged_decode_attention", batch=B, context=N, heads=h, kv_heads=kvh, head_dim=d, dtype=str(dtype),
           kv_bytes=kv_bytes, gbps=kv_bytes / ours / 1e9, frac_of_copy_bw=kv_bytes / ours / 1e9 / limits["copy_gbps"],
           sdpa_us=sdpa * 1e6, speedup_vs_sdpa=sdpa / ours, reference_us=ref * 1e6, speedup_vs_reference=ref / ours)


def test_prefill(benchmark, record, quick, device, limits, prefill_len):
    (h, kvh, d), dtype = (QUICK if quick else FULL)["heads"], (QUICK if quick else FULL)["dtype"]
    L = prefill_len
    k_cache, v_cache, tables, lens, k, v = paged_cache(1, L, kvh, d, dtype, device)
    q = torch.randn(L, h, d, dtype=dtype, device=device)
    cu = torch.tensor([0, L], dtype=torch.int32, device=device)
    ours = measure(benchmark, lambda: triton_ops.paged_attention(q, k_cache, v_cache, tables, lens, cu, d ** -0.5))
    qs = q.transpose(0, 1)[None]  # [1, H, L, D]
    ks, vs = k.repeat_interleave(h // kvh, 1), v.repeat_interleave(h // kvh, 1)  # flash SDPA wants equal heads
    sdpa = timed(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True))
    flops = 2 * L * L * h * d  # causal: half of QK^T and PV's 4 L^2 H D
    record(op="paged_attention (prefill)", seq=L, heads=h, kv_heads=kvh, head_dim=d, dtype=str(dtype), flops=flops,
           tflops=flops / ours / 1e12, frac_of_matmul=flops / ours / 1e12 / limits["matmul_tflops"],
           sdpa_us=sdpa * 1e6, speedup_vs_sdpa=sdpa / ours)
