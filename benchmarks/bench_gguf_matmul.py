"""GGUF dequant-matmul: GEMV (M=1 and 8, decode) in GB/s of quantized weight read, GEMM (M=512, prefill) in TFLOP/s,
each against cuBLAS (torch.matmul on the dequantized weight, x's dtype: bf16 in full mode) and against the torch path
(dequantize, then matmul). Full mode uses Llama/Mistral-7B projection shapes (N, K) in bf16; quick mode (CPU, Triton
interpreted) uses tiny shapes just to prove the suite runs."""
import torch
from conftest import best_peer, is_quick, measure, timed
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from mistralrs.kernels.dequant import dequantize
from mistralrs.kernels.gguf import GEMV_MAX_M, gguf_matmul

QTYPES = [Q.Q4_0, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]
# Q5_K and Q6_K (the K-quant mixes' attention / output tensors) at one shape: the suite must fit gpu_check.sh's budget.
SHAPES = {t: [(4096, 4096), (14336, 4096), (4096, 14336)] if t in (Q.Q4_0, Q.Q8_0, Q.Q4_K) else [(14336, 4096)]
          for t in QTYPES}
FULL = dict(dtype=torch.bfloat16, rounds=20,
            cases=[(t, m, n, k) for t in QTYPES for m in (1, 8, 512) for n, k in SHAPES[t]])
QUICK = dict(dtype=torch.float32, rounds=3, cases=[(t, m, 48, 512) for t in QTYPES for m in (1, 16)])
FP16_FIELDS = {Q.Q4_0: [0], Q.Q8_0: [0], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}  # bytes of d (and dmin)


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
    dense_w = dequantize(w, qtype, (N, K), dtype)
    dense = timed(lambda: x @ dense_w.T)
    torch_path = timed(lambda: x @ dequantize(w, qtype, (N, K), dtype).T, reps=3)
    flops = 2 * M * N * K
    # A few rows of x use each weight a few times: memory-bound. From M ~ 64 on each weight feeds M FMAs: compute-bound.
    if M <= 16:
        gbps = w.nbytes / ours / 1e9
        headline = dict(gbps=gbps, frac_of_copy_bw=gbps / limits["copy_gbps"])
    else:
        tflops = flops / ours / 1e12
        headline = dict(tflops=tflops, frac_of_matmul=tflops / limits["matmul_tflops"])
    record(op="gguf_matmul " + ("GEMV" if M <= GEMV_MAX_M else "GEMM"), qtype=qtype.name, M=M, N=N, K=K,
           dtype=str(dtype), weight_bytes=w.nbytes, flops=flops, **headline,
           **best_peer(ours, **{"cublas" if device.type == "cuda" else "torch_matmul": dense}),
           dense_us=dense * 1e6, speedup_vs_dense=dense / ours, dense_bytes=dense_w.nbytes,
           dequant_then_matmul_us=torch_path * 1e6, speedup_vs_dequant_then_matmul=torch_path / ours)
