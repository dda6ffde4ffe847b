"""Paged attention: split-K decode (GB/s of K/V read) and varlen prefill (TFLOP/s), against torch SDPA on the same
K/V stored contiguously (prefill: the flash backend on CUDA, K/V heads repeated for it), FlashInfer's paged kernels on
the same cache where FlashInfer runs, and our torch reference. Full mode uses Mistral-7B's head layout (32 query heads,
8 KV heads, head dim 128, bf16); quick mode (CPU, Triton interpreted) uses tiny shapes just to prove the suite runs."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from conftest import best_peer, is_quick, measure, timed
from torch.nn.attention import SDPBackend, sdpa_kernel

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


def flashinfer_missing() -> str | None:
    """Why FlashInfer is not a peer in this run, or None. Its wheel JIT-compiles each kernel with nvcc on first use
    (minutes, and a CUDA toolkit) unless flashinfer-jit-cache holds them prebuilt: without that it is not run."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    for module in ("flashinfer", "flashinfer_jit_cache"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
    return None


def flashinfer_paged(q, k_cache, v_cache, tables, lens, cu=None):
    """FlashInfer's paged attention on our cache ([pages, BS, KVH, D] is its NHD layout): decode when cu is None,
    causal prefill otherwise. Returns (callable, None) or (None, the reason it cannot run)."""
    if reason := flashinfer_missing():
        return None, reason
    try:
        import flashinfer
        pages = -(-lens.long() // BS)
        kv_indptr = torch.cat([pages.new_zeros(1), pages.cumsum(0)]).int()
        kv_indices = torch.cat([tables[b, :pages[b]] for b in range(len(lens))]).int()
        last_len = (lens - (pages.int() - 1) * BS).int()
        workspace = torch.empty(256 << 20, dtype=torch.uint8, device=q.device)
        H, KVH, D = q.shape[1], k_cache.shape[2], q.shape[2]
        if cu is None:
            wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
            wrapper.plan(kv_indptr, kv_indices, last_len, H, KVH, D, BS, q_data_type=q.dtype, kv_data_type=q.dtype)
        else:
            wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
            wrapper.plan(cu, kv_indptr, kv_indices, last_len, H, KVH, D, BS, causal=True, q_data_type=q.dtype,
                         kv_data_type=q.dtype)
        fn = lambda: wrapper.run(q, (k_cache, v_cache))  # noqa: E731
        fn()
        return fn, None
    except Exception as e:  # a version whose API differs is a recorded reason, not a failed benchmark
        return None, f"flashinfer failed: {type(e).__name__}: {e}"[:300]


def peer_figures(ours: float, sdpa: float, flashinfer, flashinfer_reason) -> dict:
    fi = timed(flashinfer) if flashinfer else None
    return dict(sdpa_us=sdpa * 1e6, speedup_vs_sdpa=sdpa / ours,
                **(dict(flashinfer_us=fi * 1e6, speedup_vs_flashinfer=fi / ours) if fi else
                   dict(flashinfer_skipped=flashinfer_reason)),
                **best_peer(ours, sdpa=sdpa, flashinfer=fi))


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
    sdpa = timed(lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True))  # its own backend choice
    flashinfer, reason = flashinfer_paged(q, k_cache, v_cache, tables, lens)
    ref = timed(lambda: reference.paged_attention(*args), reps=3)
    record(op="paged_decode_attention", batch=B, context=N, heads=h, kv_heads=kvh, head_dim=d, dtype=str(dtype),
           kv_bytes=kv_bytes, gbps=kv_bytes / ours / 1e9, frac_of_copy_bw=kv_bytes / ours / 1e9 / limits["copy_gbps"],
           **peer_figures(ours, sdpa, flashinfer, reason), reference_us=ref * 1e6, speedup_vs_reference=ref / ours)


def test_prefill(benchmark, record, quick, device, limits, prefill_len):
    (h, kvh, d), dtype = (QUICK if quick else FULL)["heads"], (QUICK if quick else FULL)["dtype"]
    L = prefill_len
    k_cache, v_cache, tables, lens, k, v = paged_cache(1, L, kvh, d, dtype, device)
    q = torch.randn(L, h, d, dtype=dtype, device=device)
    cu = torch.tensor([0, L], dtype=torch.int32, device=device)
    ours = measure(benchmark, lambda: triton_ops.paged_attention(q, k_cache, v_cache, tables, lens, cu, d ** -0.5))
    qs = q.transpose(0, 1)[None]  # [1, H, L, D]
    ks, vs = k.repeat_interleave(h // kvh, 1), v.repeat_interleave(h // kvh, 1)  # flash SDPA wants equal heads
    backend = SDPBackend.FLASH_ATTENTION if device.type == "cuda" and dtype != torch.float32 else SDPBackend.MATH
    with sdpa_kernel(backend):
        sdpa = timed(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True))
    flashinfer, reason = flashinfer_paged(q, k_cache, v_cache, tables, lens, cu)
    flops = 2 * L * L * h * d  # causal: half of QK^T and PV's 4 L^2 H D
    record(op="paged_attention (prefill)", seq=L, heads=h, kv_heads=kvh, head_dim=d, dtype=str(dtype), flops=flops,
           tflops=flops / ours / 1e12, frac_of_matmul=flops / ours / 1e12 / limits["matmul_tflops"],
           sdpa_backend=backend.name, **peer_figures(ours, sdpa, flashinfer, reason))
