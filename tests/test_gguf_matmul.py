"""gguf_matmul: the Triton kernel (interpreted on CPU) and the C++ CPU kernel against the torch dequantizer + a
float matmul; the dispatch between them."""
import importlib

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

import mistralrs.kernels as kernels
from mistralrs.kernels import gguf_cpu, reference
from mistralrs.kernels.dequant import dequantize
from mistralrs.kernels.gguf import SUPPORTED, gguf_matmul

from helpers import gguf_quantized, random_blocks

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}  # relative to the output's largest value
QTYPES = [Q.Q4_0, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]
# Random-byte scales that make weights O(1 / sqrt(K)) for K around 1000: d * sc * q peaks near 63 * 15 (Q4_K).
BYTE_SCALE = {Q.Q4_K: 3e-5, Q.Q5_K: 1.5e-5, Q.Q6_K: 4e-6}
CPU_QTYPES = sorted(gguf_cpu.SUPPORTED)


def make_weight(qtype, N: int, K: int, seed: int = 0) -> torch.Tensor:
    """uint8 [N, row_bytes]: gguf's own quantization where it has one, random valid blocks for the K-quants."""
    rng = np.random.default_rng(seed)
    if qtype in BYTE_SCALE:
        return torch.from_numpy(random_blocks(qtype, N, K, rng, scale=BYTE_SCALE[qtype]))
    return torch.from_numpy(gguf_quantized(qtype, N, K, rng))


def check(x, qweight, qtype, N, K, **tiles):
    out = gguf_matmul(x, qweight, qtype, N, K, **tiles)
    ref = x.float() @ dequantize(qweight, qtype, (N, K)).T
    assert out.dtype == x.dtype and out.shape == (x.shape[0], N)
    tol = TOL[x.dtype]
    torch.testing.assert_close(out, ref.to(x.dtype), atol=tol * ref.abs().max().item(), rtol=tol)
    return out


def blocks_k(qtype, n_blocks: int) -> int:
    return n_blocks * GGML_QUANT_SIZES[qtype][0]


SHAPES = [(1, 200), (7, 96), (33, 200)]  # (M, N): GEMV one token, GEMV a batch, GEMM


@pytest.mark.parametrize("block_k", [None, 512], ids=["default_tiles", "block_k512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("M,N", SHAPES, ids=[f"M{m}-N{n}" for m, n in SHAPES])
@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: t.name)
def test_matches_reference(qtype, M, N, dtype, block_k):
    """K is 3 blocks (96 or 768): never a multiple of the K tile (256/64 for Q4_0/Q8_0, 512 for block_k512)."""
    K = blocks_k(qtype, 3)
    x = torch.randn(M, K).to(dtype)
    check(x, make_weight(qtype, N, K), qtype, N, K, block_k=block_k)


@pytest.mark.parametrize("qtype,K,block_k", [(Q.Q4_0, 320, 32), (Q.Q6_K, 1024, 128)], ids=["Q4_0", "Q6_K"])
def test_uneven_split_k_matches_one_split(qtype, K, block_k):
    """10 or 8 K tiles over 3 splits: the last split is short; split_k=1 writes the output directly."""
    x = torch.randn(3, K)
    w = make_weight(qtype, 40, K)
    one = check(x, w, qtype, 40, K, block_k=block_k, split_k=1)
    three = check(x, w, qtype, 40, K, block_k=block_k, split_k=3)
    torch.testing.assert_close(one, three, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("M", [2, 40], ids=["gemv", "gemm"])
def test_strided_rows_of_x(M):
    K = 96
    x = torch.randn(M, 2 * K)[:, :K]  # rows K apart in a wider buffer, as a slice of a fused projection
    check(x, make_weight(Q.Q8_0, 24, K), Q.Q8_0, 24, K)


def test_triton_rejects_what_it_cannot_do():
    w = make_weight(Q.Q4_0, 16, 64)
    with pytest.raises(AssertionError, match="Q4_1"):
        gguf_matmul(torch.randn(1, 64), w, Q.Q4_1, 16, 64)
    with pytest.raises(AssertionError):
        gguf_matmul(torch.randn(1, 64), w, Q.Q4_0, 17, 64)  # qweight has 16 rows
    with pytest.raises(AssertionError):
        gguf_matmul(torch.randn(1, 64, dtype=torch.float64), w, Q.Q4_0, 16, 64)
    assert {Q.Q4_0, Q.Q8_0, Q.Q4_K, Q.Q6_K} <= SUPPORTED


GPU_SHAPES = [(1, 4096, 4096), (8, 4096, 4096), (512, 4096, 4096), (1, 4096, 14336), (300, 14336, 4096)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "f16", "f32"])
@pytest.mark.parametrize("M,N,K", GPU_SHAPES, ids=[f"M{m}-N{n}-K{k}" for m, n, k in GPU_SHAPES])
@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: t.name)
def test_real_sizes_on_gpu(qtype, M, N, K, dtype):
    w = make_weight(qtype, N, K).cuda()
    x = torch.randn(M, K, device="cuda").to(dtype)
    check(x, w, qtype, N, K)


# ---- the C++ CPU kernel (kernels/gguf_cpu.py) ----

needs_cpu_kernel = pytest.mark.skipif(gguf_cpu.UNAVAILABLE is not None, reason=f"{gguf_cpu.UNAVAILABLE}")

# (type, tolerance of the gemv path relative to the output's largest value). The gemv rounds x to int8 per 32 values
# (amax / 127): an error of up to amax / 254 per element, ~0.5% of the output's scale whatever the weight type (measured
# 4-8e-3 over these shapes), so 2e-2 leaves a 2.5x margin. The gemm path dequantizes W exactly and multiplies in f32:
# 1e-5 (float summation order over K <= 512). The tight check of the gemv is test_gemv_is_int8_rounded_x_exactly.
CPU_CASES = [(Q.Q4_0, 2e-2), (Q.Q4_1, 2e-2), (Q.Q5_0, 2e-2), (Q.Q5_1, 2e-2), (Q.Q8_0, 2e-2), (Q.Q4_K, 2e-2),
             (Q.Q5_K, 2e-2), (Q.Q6_K, 2e-2)]
GEMM_TOL = 1e-5
BF16_TOL = 8e-3  # the output rounded to bf16 (8 bits): the two sides may land one bf16 step apart


def cpu_weight(qtype, N, K, seed=0):
    """gguf's own quantizer where it has one, random valid blocks (every bit pattern, Q8_0's -128 too) for the rest."""
    rng = np.random.default_rng(seed)
    if qtype in BYTE_SCALE:
        return torch.from_numpy(random_blocks(qtype, N, K, rng, scale=BYTE_SCALE[qtype]))
    return torch.from_numpy(gguf_quantized(qtype, N, K, rng))


def exact(x, qweight, qtype, N, K):
    return (x.double() @ dequantize(qweight, qtype, (N, K)).double().T)


def int8_rounded(x):
    """x as the gemv sees it: per 32 values, d = amax / 127 and q = round(x / d) to nearest even (as the kernel's
    x * (1 / d) and _mm256_round_ps); returns d * q in float64."""
    b = x.float().reshape(x.shape[0], -1, 32)
    d = b.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return (torch.round(b * inv).double() * d.double()).reshape(x.shape)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("M", [1, 3, 17, 33, 130])
@pytest.mark.parametrize("qtype,tol", CPU_CASES, ids=[t.name for t, _ in CPU_CASES])
def test_cpu_matches_reference(qtype, tol, M, dtype):
    """N odd, K two blocks; the int8 path at every M (tiles of 8, 4, 2 and 1 rows; slabs of 64 rows at M = 130),
    and the exact gemm path on request."""
    N, K = 37, blocks_k(qtype, 2 if GGML_QUANT_SIZES[qtype][0] == 256 else 5)
    w = cpu_weight(qtype, N, K)
    x = torch.randn(M, K).to(dtype)
    out = gguf_cpu.gguf_matmul(x, w, qtype, N, K)
    ref = exact(x, w, qtype, N, K)
    assert out.dtype == dtype and out.shape == (M, N)
    bf16 = BF16_TOL if dtype == torch.bfloat16 else 0
    torch.testing.assert_close(out.double(), ref, atol=(tol + bf16) * ref.abs().max().item(), rtol=0)
    exact_path = gguf_cpu.gguf_matmul(x, w, qtype, N, K, gemm=True)
    torch.testing.assert_close(exact_path.double(), ref, atol=(GEMM_TOL + bf16) * ref.abs().max().item(), rtol=0)


@needs_cpu_kernel
@pytest.mark.parametrize("M", [1, 3, 17, 70])
@pytest.mark.parametrize("qtype", CPU_QTYPES, ids=lambda t: t.name)
def test_gemv_is_int8_rounded_x_exactly(qtype, M):
    """The gemv equals the exact product of W with x rounded to int8 blocks, up to float rounding (1e-5): every
    weight, scale and offset counts, not only what a 2e-2 tolerance would notice."""
    N, K = 37, blocks_k(qtype, 2 if GGML_QUANT_SIZES[qtype][0] == 256 else 5)
    w = cpu_weight(qtype, N, K, seed=M)
    x = torch.randn(M, K)
    ref = int8_rounded(x) @ dequantize(w, qtype, (N, K)).double().T
    out = gguf_cpu.gguf_matmul(x, w, qtype, N, K).double()
    torch.testing.assert_close(out, ref, atol=1e-5 * ref.abs().max().item(), rtol=0)


@needs_cpu_kernel
@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q6_K], ids=lambda t: t.name)
def test_gemv_rows_and_threads_do_not_change_a_row(qtype):
    """A row of the int8 path's output does not depend on the other rows of x (tiles of 8/4/2/1, slabs of 64) nor
    on the thread count (each output is one thread's): bit for bit, so a token's product is the same alone, in a
    decode batch or in a prompt's prefill."""
    N, K = 45, blocks_k(qtype, 2 if GGML_QUANT_SIZES[qtype][0] == 256 else 5)
    w, x = cpu_weight(qtype, N, K), torch.randn(150, K)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = gguf_cpu.gguf_matmul(x, w, qtype, N, K)
        torch.set_num_threads(2)
        two = gguf_cpu.gguf_matmul(x, w, qtype, N, K)
        gemm1 = gguf_cpu.gguf_matmul(x, w, qtype, N, K, gemm=True)
        torch.set_num_threads(1)
        gemm2 = gguf_cpu.gguf_matmul(x, w, qtype, N, K, gemm=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    for m in (0, 7, 14, 64, 149):
        assert torch.equal(gguf_cpu.gguf_matmul(x[m:m + 1], w, qtype, N, K), one[m:m + 1])
    assert torch.equal(gguf_cpu.gguf_matmul(x[60:75], w, qtype, N, K), one[60:75])
    torch.testing.assert_close(gemm1, gemm2, atol=1e-6 * gemm1.abs().max().item(), rtol=0)  # at::mm's blocking


@needs_cpu_kernel
def test_gemm_tiles_of_w():
    """W dequantized 16 rows at a time (3 tiles, the last short) gives the one-tile result."""
    N, K = 37, 256
    w, x = cpu_weight(Q.Q4_K, N, K), torch.randn(40, K)
    tiled = gguf_cpu.gguf_matmul(x, w, Q.Q4_K, N, K, tile_rows=16)
    whole = gguf_cpu.gguf_matmul(x, w, Q.Q4_K, N, K, tile_rows=N)
    torch.testing.assert_close(tiled, whole, atol=1e-6 * whole.abs().max().item(), rtol=0)


@needs_cpu_kernel
def test_cpu_edge_shapes_and_errors():
    w = cpu_weight(Q.Q8_0, 16, 64)
    assert gguf_cpu.gguf_matmul(torch.randn(0, 64), w, Q.Q8_0, 16, 64).shape == (0, 16)
    x = torch.zeros(2, 64)  # all-zero blocks: scale 0, no division by it
    assert torch.equal(gguf_cpu.gguf_matmul(x, w, Q.Q8_0, 16, 64), torch.zeros(2, 16))
    with pytest.raises(AssertionError, match="Q2_K"):
        gguf_cpu.gguf_matmul(torch.randn(1, 256), w, Q.Q2_K, 16, 256)
    with pytest.raises(AssertionError, match="float64"):
        gguf_cpu.gguf_matmul(torch.randn(1, 64, dtype=torch.float64), w, Q.Q8_0, 16, 64)
    # the C++ side checks everything it reads
    with pytest.raises(RuntimeError, match=r"qweight must be a contiguous CPU uint8 \[17, row_bytes\]"):
        gguf_cpu.gguf_matmul(torch.randn(1, 64), w, Q.Q8_0, 17, 64)  # qweight has 16 rows
    with pytest.raises(RuntimeError, match=r"x must be a contiguous CPU float32 \[M, 64\]"):
        gguf_cpu.gguf_matmul(torch.randn(1, 32), w, Q.Q8_0, 16, 64)
    with pytest.raises(RuntimeError, match="need K % 32 == 0"):
        gguf_cpu.gguf_matmul(torch.randn(1, 48), w, Q.Q8_0, 16, 48)
    with pytest.raises(RuntimeError, match="got K = 64 and 34 bytes"):
        gguf_cpu.gguf_matmul(torch.randn(1, 64), w[:, :34].contiguous(), Q.Q8_0, 16, 64)


@needs_cpu_kernel
def test_dispatch(monkeypatch):
    """CPU tensors of the kernel's types go to gguf_cpu, other types and MISTRALRS_KERNELS=reference to the
    reference (the gemv's int8 rounding tells the two apart)."""
    x = torch.randn(1, 96)
    w = cpu_weight(Q.Q4_0, 8, 96)
    ours = kernels.gguf_matmul(x, w, Q.Q4_0, 8, 96)
    assert torch.equal(ours, gguf_cpu.gguf_matmul(x, w, Q.Q4_0, 8, 96))
    assert not torch.equal(ours, reference.gguf_matmul(x, w, Q.Q4_0, 8, 96))
    monkeypatch.setattr(kernels, "BACKEND", "reference")
    assert torch.equal(kernels.gguf_matmul(x, w, Q.Q4_0, 8, 96), reference.gguf_matmul(x, w, Q.Q4_0, 8, 96))
    monkeypatch.setattr(kernels, "BACKEND", "auto")
    x2 = torch.randn(1, 256)
    w2 = torch.from_numpy(random_blocks(Q.Q2_K, 8, 256, np.random.default_rng(0)))  # no CPU kernel
    assert torch.equal(kernels.gguf_matmul(x2, w2, Q.Q2_K, 8, 256), reference.gguf_matmul(x2, w2, Q.Q2_K, 8, 256))


def test_cpu_without_avx2_falls_back_to_the_reference(monkeypatch):
    """On a CPU torch does not rate AVX2 the extension loads without building and warns once; every CPU op then
    runs its torch path: gguf_matmul the reference, rms_norm the reference, decode attention SDPA."""
    from mistralrs.kernels import attention_cpu, cpu_ext, rowwise_cpu
    dependents = (gguf_cpu, attention_cpu, rowwise_cpu)  # each took `ext` from cpu_ext at its import
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    try:
        with pytest.warns(UserWarning, match="unavailable .*lacks AVX2"):
            importlib.reload(cpu_ext)
        for m in dependents:
            importlib.reload(m)
        assert cpu_ext.UNAVAILABLE is not None and gguf_cpu.UNAVAILABLE is not None
        x, w = torch.randn(1, 64), cpu_weight(Q.Q8_0, 8, 64)
        assert torch.equal(kernels.gguf_matmul(x, w, Q.Q8_0, 8, 64), reference.gguf_matmul(x, w, Q.Q8_0, 8, 64))
        norm_w = torch.randn(64)
        assert torch.equal(kernels.rms_norm(x, norm_w, 1e-6), reference.rms_norm(x, norm_w, 1e-6))
        cache = torch.randn(2, 16, 2, 32)
        q, tables, lens = torch.randn(1, 4, 32), torch.tensor([[1, 0]], dtype=torch.int32), torch.tensor(
            [20], dtype=torch.int32)
        cu = torch.tensor([0, 1], dtype=torch.int32)
        torch.testing.assert_close(kernels.paged_decode_attention(q, cache, cache, tables, lens, cu, 0.2),
                                   reference.paged_decode_attention(q, cache, cache, tables, lens, cu, 0.2))
    finally:
        monkeypatch.undo()
        importlib.reload(cpu_ext)  # the cached build: no compile
        for m in dependents:
            importlib.reload(m)


def test_tied_head_is_the_embedding_bytes(tiny_models, tmp_path):
    """A file without `output` (Gemma here; SmolLM2 too) multiplies by token_embd's bytes: lm_head's QuantLinear and
    the QuantEmbedding hold one tensor, not two copies."""
    from mistralrs.linears import QuantEmbedding, QuantLinear
    from mistralrs.load.gguf import read_gguf
    from mistralrs.load.gguf_model import load_gguf_model
    from mistralrs.models import gemma

    import convert_to_gguf as convert

    path = convert.convert(tiny_models["gemma"], tmp_path / "gemma-q8_0.gguf", "q8_0")
    assert "output.weight" not in read_gguf(path).tensors
    model, _ = load_gguf_model(gemma, read_gguf(path), torch.float32, torch.device("cpu"))
    head, embed = model.lm_head, model.model.embed_tokens
    assert isinstance(head, QuantLinear) and isinstance(embed, QuantEmbedding) and head.qtype == Q.Q8_0
    assert head.qweight.data_ptr() == embed.qweight.data_ptr()


@needs_cpu_kernel
@pytest.mark.parametrize("qtype", CPU_QTYPES, ids=lambda t: t.name)
def test_gguf_rows_equal_the_dequantizer(qtype):
    """The embedding lookup: rows of W dequantized by the C++ kernel equal gguf's own dequantizer's bit for bit
    (through kernels/dequant.py, itself checked against gguf in test_dequant.py)."""
    N, K = 37, blocks_k(qtype, 2 if GGML_QUANT_SIZES[qtype][0] == 256 else 3)
    w = cpu_weight(qtype, N, K)
    ids = torch.tensor([0, 36, 5, 5, 17])
    out = kernels.gguf_rows(w, qtype, K, ids)
    assert torch.equal(out, dequantize(w, qtype, (N, K))[ids])
    assert torch.equal(out, reference.gguf_rows(w, qtype, K, ids))
    with pytest.raises(RuntimeError, match="outside"):
        kernels.gguf_rows(w, qtype, K, torch.tensor([N]))
