"""gguf_matmul: the Triton kernel (interpreted on CPU) against the torch dequantizer + a float32 matmul."""
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from mistralrs.kernels.dequant import dequantize
from mistralrs.kernels.gguf import SUPPORTED, gguf_matmul

from test_dequant import gguf_quantized, random_blocks

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}  # relative to the output's largest value
QTYPES = [Q.Q4_0, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]
# Random-byte scales that make weights O(1 / sqrt(K)) for K around 1000: d * sc * q peaks near 63 * 15 (Q4_K).
BYTE_SCALE = {Q.Q4_K: 3e-5, Q.Q5_K: 1.5e-5, Q.Q6_K: 4e-6}


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

