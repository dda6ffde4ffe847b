"""The public kernel ops, and the one place that picks an implementation for them. Each op has one name across this
dispatch, its Triton launcher (kernels/<family>.py), its reference (kernels/reference.py), its CPU kernel where it has
one (kernels/<family>_cpu.py), its test (tests/test_<op>.py) and its benchmark (benchmarks/bench_<op>.py).

Backend, from MISTRALRS_KERNELS (or by setting `mistralrs.kernels.BACKEND`):
    "auto"       Triton for CUDA tensors; for CPU tensors the CPU implementation where the op has one
                 (attention_cpu.py's attention, gguf_cpu's C++ gguf_matmul), else the torch reference (the default)
    "triton"     Triton everywhere: on CPU this needs TRITON_INTERPRET=1 (tests, debugging)
    "reference"  the torch reference everywhere (a baseline to compare against)

Kernel files are named by family (attention.py, gguf.py, xlora.py), never by op: importing a submodule sets it as an
attribute of this package, which would replace a dispatch function of the same name.
"""
import os

from . import attention_cpu, reference

BACKENDS = ("auto", "triton", "reference")
BACKEND = os.environ.get("MISTRALRS_KERNELS", "auto")
if BACKEND not in BACKENDS:
    raise ValueError(f"MISTRALRS_KERNELS={BACKEND!r}; allowed: {', '.join(BACKENDS)}")


def _use_triton(x) -> bool:
    return BACKEND == "triton" or (BACKEND == "auto" and x.is_cuda)


def _attention(x):
    if _use_triton(x):
        from . import attention  # imported on first use: CPU-only users never load triton
        return attention
    return reference if BACKEND == "reference" else attention_cpu


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


def gguf_matmul(x, qweight, qtype, N, K):
    """x [M, K] @ W.T for GGUF-quantized W [N, K] (qweight uint8 [N, row_bytes]). Triton's fused dequant-matmul for
    CUDA tensors, the C++ kernel (int8 activations for M < 32, exact f32 dequant + at::mm above) for CPU tensors, of
    the types each supports; the reference (dequantize, then matmul) otherwise."""
    if _use_triton(x):
        from . import gguf  # imported on first use, like paged_attention
        if qtype in gguf.SUPPORTED:
            return gguf.gguf_matmul(x, qweight, qtype, N, K)
    elif BACKEND == "auto" and x.device.type == "cpu":
        from . import gguf_cpu  # the first import builds the C++ extension (about a minute) unless it is cached
        if gguf_cpu.UNAVAILABLE is None and qtype in gguf_cpu.SUPPORTED:  # else it warned once, at that import
            return gguf_cpu.gguf_matmul(x, qweight, qtype, N, K)
    return reference.gguf_matmul(x, qweight, qtype, N, K)


def xlora_mix(x, lora_a, lora_b, scalings, adapter_scale):
    """X-LoRA delta of one linear, to add to its base output: sum_a scalings[:, a] * adapter_scale[a] *
    (x @ lora_a[a].T @ lora_b[a].T)."""
    if _use_triton(x):
        from . import xlora
        return xlora.xlora_mix(x, lora_a, lora_b, scalings, adapter_scale)
    return reference.xlora_mix(x, lora_a, lora_b, scalings, adapter_scale)


__all__ = ["store_kv", "paged_attention", "paged_decode_attention", "gguf_matmul", "xlora_mix", "BACKEND", "BACKENDS"]
