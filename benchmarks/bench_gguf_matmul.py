"""GGUF dequant-matmul: GEMV (M=1 and 8, decode) in GB/s of quantized weight read, GEMM (M=512, prefill) in TFLOP/s, each
against the same shape as a dense bf16 torch matmul (cuBLAS) and against the torch path (dequantize, then matmul).
Full mode uses Llama/Mistral-7B projection shapes (N, K) in bf16; quick mode (CPU, Triton interpreted) uses tiny
shapes just to prove the suite runs."""
import torch
from conftest import is_quick, measure, timed
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from mistralrs.kernels.dequant import dequantize
from mistralrs.kernels.gguf import gguf_matmul

QTYPES = [Q.Q4_0, Q.Q8_0, Q.Q4_K]
FULL = dict(dtype=torch.bfloat16, rounds=20,
            cases=[(t, m, n, k) for t in QTYPES for m in (1, 8, 512) for n, k in [(4096, 4096), (14336, 4096),
                                                                                (4096, 14336)]])
QUICK = dict(dtype=torch.float32, rounds=3, cases=[(t, m, 48, 512) for t in QTYPES for m in (1, 16)])
FP16_FIELDS = {Q.Q4_0: [0], Q.Q8_0: [0], Q.Q4_K: [0, 2]}  # byte offsets of d (and dmin) in a block


def pytest_generate_tests(metafunc):
    cases = (QUICK if is_quick(metafunc.config) else FULL)["cases"]
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", cases, ids=[f"{t.name}-M{m}-N{n}-K{k}" for t, m, n, k in cases])


def random_qweight(qtype, N: int, K: int, device) -> torch.Tensor:
    """Random quant bytes [N, row_bytes] with small finite fp16 scales; the timing does not depend on the values."""
    block, size = GGML_QUANT_SIZES[qtype]
    w = torch.randint(0, 256, (N, K // block, size), dtype=torch.uint8, device=device)
    d = torch.full((N, K // block), 1e-3, dtype=torch.float16, device=device).view(torch.uint8)
    for offset in FP16_FIELDS[qtype]:
        w[:, :, offset:offset + 2] = d.view(N, K // block, 2)
    return w.view(N, -1)



def test_gguf_matmul(benchmark, record, quick, device, limits, case):
    cfg = QUICK if quick else FULL
    qtype, M, N, K = case
    dtype = cfg["dtype"]
    w = random_qweight(qtype, N, K, device)
    x = torch.randn(M, K, dtype=dtype, device=device)
    ours = measure(benchmark, lambda: gguf_matmul(x, w, qtype, N, K), cfg["rounds"])
    dense_w = torch.randn(N, K, dtype=dtype, device=device)
    dense = timed(lambda: x @ dense_w.T)
    torch_path = timed(lambda: x @ dequantize(w, qtype, (N, K), dtype).T, reps=3)
    flops = 2 * M * N * K
    record(op="gguf_matmul " + ("GEMV" if M <= 8 else "GEMM"), qtype=qtype.name, M=M, N=N, K=K, dtype=str(dtype),
           weight_bytes=w.nbytes, gbps=w.nbytes / ours / 1e9,
           frac_of_copy_bw=w.nbytes / ours / 1e9 / limits["copy_gbps"],
           tflops=flops / ours / 1e12, frac_of_matmul=flops / ours / 1e12 / limits["matmul_tflops"],
           dense_us=dense * 1e6, time_ratio_vs_dense=ours / dense,
           dense_bytes=dense_w.nbytes, dense_gbps=dense_w.nbytes / dense / 1e9,
           dequant_then_matmul_us=torch_path * 1e6, speedup_vs_dequant_then_matmul=torch_path / ours)
