"""The public kernel ops, and the one place that picks an implementation for them. Each op has one name across this
dispatch, its Triton launcher (kernels/<family>.py), its reference with its FLOP and byte counts (kernels/reference.py)
and its CPU kernel where it has one (kernels/<family>_cpu.py). Tests and benchmarks, by op:
    store_kv, paged_attention,       tests/test_paged_attention.py, benchmarks/bench_paged_attention.py
      paged_decode_attention
    rms_norm, rotary_embedding       tests/test_rowwise.py (no benchmark of their own: one pass over T x C floats;
                                     tools/profile_engine.py shows their share of a step)
    linear                           tests/test_linear.py, benchmarks/bench_linear.py
    gguf_matmul                      tests/test_gguf_matmul.py, benchmarks/bench_gguf_matmul.py
    gguf_rows                        tests/test_gguf_matmul.py (no benchmark: one row of the embedding per token)
    xlora_mix                        tests/test_xlora_mix.py, benchmarks/bench_xlora_mix.py
A row of every CPU op is computed the same way whatever the other rows (tests/test_batch_invariance.py).

Backend, from MISTRALRS_KERNELS (or by setting `mistralrs.kernels.BACKEND`):
    "auto"       Triton for CUDA tensors; for CPU tensors the CPU implementation where the op has one
                 (attention_cpu.py, gguf_cpu.py, linear_cpu.py, rowwise_cpu.py: C++ kernels built by cpu_ext.py,
                 and SDPA), else the torch reference (the default). rms_norm and rotary_embedding have no Triton kernel: on CUDA
                 the reference's torch ops (fused by torch there) run.
    "triton"     Triton everywhere: on CPU this needs TRITON_INTERPRET=1 (tests, debugging)
    "reference"  the torch reference everywhere (a baseline to compare against)

Kernel files are named by family (attention.py, gguf.py, xlora.py), never by op: importing a submodule sets it as an
attribute of this package, which would replace a dispatch function of the same name.
"""
import functools
import importlib
import os

import torch

from . import reference

BACKENDS = ("auto", "triton", "reference")
BACKEND = os.environ.get("MISTRALRS_KERNELS", "auto")
if BACKEND not in BACKENDS:
    raise ValueError(f"MISTRALRS_KERNELS={BACKEND!r}; allowed: {', '.join(BACKENDS)}")


@functools.cache
def _module(name: str):
    """A kernel module, imported on first use: CPU-only users never load triton, and GPU users never build the CPU
    kernels' C++ extension (cpu_ext.py). Cached: the decode hot path calls this ~300 times a token."""
    return importlib.import_module(f"{__name__}.{name}")


def _use_triton(x) -> bool:
    return BACKEND == "triton" or (BACKEND == "auto" and x.is_cuda)


def _cpu(x) -> bool:
    return BACKEND == "auto" and x.is_cpu


def _attention(x):
    if _use_triton(x):
        return _module("attention")
    return reference if BACKEND == "reference" else _module("attention_cpu")


def store_kv(k, v, k_cache, v_cache, slot_mapping):
    return _attention(k).store_kv(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, scale, sliding_window=None,
                      softcap=None):
    return _attention(q).paged_attention(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, scale,
                                         sliding_window, softcap)


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, scale, sliding_window=None,
                     softcap=None):
    """One new token per sequence: Triton uses split-K flash-decoding here."""
    return _attention(q).paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, scale,
                                                sliding_window, softcap)


def rms_norm(x, weight, eps, unit_offset=False):
    """x / rms(x) * weight (Gemma: * (1 + weight)) over the last dim, computed in fp32."""
    if _cpu(x):
        return _module("rowwise_cpu").rms_norm(x, weight, eps, unit_offset)
    return reference.rms_norm(x, weight, eps, unit_offset)


def rotary_embedding(q, k, cos, sin):
    """Rotate-half rotary on q [T, H, D] and k [T, KVH, D] with layers.Rotary's cos and signed sin ([T, 1, r]);
    returns (q, k), which may be the inputs rotated in place."""
    if _cpu(q):
        return _module("rowwise_cpu").rotary_embedding(q, k, cos, sin)
    return reference.rotary_embedding(q, k, cos, sin)


def linear(x, weight, bias=None):
    """x [..., K] @ weight [N, K].T (+ bias): for CPU float32 tensors on the kernels' thread team (linear_cpu.py),
    else torch's F.linear (on CUDA, cuBLAS)."""
    if _cpu(x):
        return _module("linear_cpu").linear(x, weight, bias)
    return reference.linear(x, weight, bias)


def set_cpu_threads(threads: int) -> None:
    """Called on the thread that runs CPU forwards (the engine thread): the CPU kernels called from this thread
    use `threads` threads of their team (one team per process), and torch's own ops on this thread run on it alone,
    so that it never starts a libgomp pool of its own (kernels/threads_cpu.cpp says why). Without the compiled
    kernels, torch's ops on this thread use `threads` instead."""
    cpu_ext = _module("cpu_ext")
    if cpu_ext.ext is None:
        torch.set_num_threads(threads)
    else:
        cpu_ext.ext.set_threads(threads)
        cpu_ext.ext.torch_ops_serial()


def cpu_threads() -> int:
    """The threads the CPU kernels use when called from this thread (set_cpu_threads)."""
    cpu_ext = _module("cpu_ext")
    return torch.get_num_threads() if cpu_ext.ext is None else cpu_ext.ext.threads()


def gguf_matmul(x, qweight, qtype, N, K):
    """x [M, K] @ W.T for GGUF-quantized W [N, K] (qweight uint8 [N, row_bytes]). Triton's fused dequant-matmul for
    CUDA tensors, the C++ kernel (int8 activations, one arithmetic for every M) for CPU tensors, of
    the types each supports; the reference (dequantize, then matmul) otherwise."""
    if _use_triton(x):
        gguf = _module("gguf")
        if qtype in gguf.SUPPORTED:
            return gguf.gguf_matmul(x, qweight, qtype, N, K)
    elif _cpu(x):
        gguf_cpu = _module("gguf_cpu")  # the first import builds the C++ extension (about a minute) unless cached
        if gguf_cpu.UNAVAILABLE is None and qtype in gguf_cpu.SUPPORTED:  # else it warned once, at that import
            return gguf_cpu.gguf_matmul(x, qweight, qtype, N, K)
    return reference.gguf_matmul(x, qweight, qtype, N, K)


def gguf_rows(qweight, qtype, K, ids):
    """Rows ids [T] of W [N, K] stored as GGUF blocks (qweight uint8 [N, row_bytes]) as float32 [T, K]: an
    embedding lookup. The C++ kernel for CPU tensors of the types it supports, else the reference."""
    if _cpu(qweight):
        gguf_cpu = _module("gguf_cpu")
        if gguf_cpu.UNAVAILABLE is None and qtype in gguf_cpu.SUPPORTED:
            return gguf_cpu.gguf_rows(qweight, qtype, K, ids)
    return reference.gguf_rows(qweight, qtype, K, ids)


def xlora_mix(x, lora_a, lora_b, scalings, adapter_scale):
    """X-LoRA delta of one linear, to add to its base output: sum_a scalings[:, a] * adapter_scale[a] *
    (x @ lora_a[a].T @ lora_b[a].T)."""
    if _use_triton(x):
        return _module("xlora").xlora_mix(x, lora_a, lora_b, scalings, adapter_scale)
    return reference.xlora_mix(x, lora_a, lora_b, scalings, adapter_scale)


__all__ = ["store_kv", "paged_attention", "paged_decode_attention", "rms_norm", "rotary_embedding", "linear",
           "gguf_matmul", "gguf_rows", "xlora_mix", "set_cpu_threads", "cpu_threads", "BACKEND", "BACKENDS"]
