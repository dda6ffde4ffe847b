"""X-LoRA adapter mixing: decode (T = 1, 8) in GB/s of the bytes the op must move, prefill (T = 512) in TFLOP/s,
against the two torch formulations: a per-adapter loop of F.linear (as PEFT and the original do) and the stacked
two-matmul form (x @ Acat.T, scale per adapter, @ Bcat.T, with Acat / Bcat stacked ahead of time, as at load).
Full mode uses Mistral-7B projection shapes with 9 adapters of rank 16 in bf16 (the X-LoRA paper's setup); quick
mode (CPU, Triton interpreted) uses tiny shapes just to prove the suite runs."""
import torch
import torch.nn.functional as F
from conftest import best_peer, is_quick, measure, timed

from mistralrs.kernels.xlora import xlora_mix

FULL = dict(dtype=torch.bfloat16, adapters=(9, 16), rounds=20,
            cases=[(t, k, n) for t in (1, 8, 512) for k, n in [(4096, 4096), (4096, 14336)]])
QUICK = dict(dtype=torch.float32, adapters=(3, 8), rounds=3, cases=[(1, 64, 96), (8, 64, 96), (40, 96, 64)])


def pytest_generate_tests(metafunc):
    cases = (QUICK if is_quick(metafunc.config) else FULL)["cases"]
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", cases, ids=[f"T{t}-K{k}-N{n}" for t, k, n in cases])



def per_adapter_loop(x, lora_a, lora_b, scalings, adapter_scale):
    out = torch.zeros(x.shape[0], lora_b.shape[1], dtype=x.dtype, device=x.device)
    for a in range(lora_a.shape[0]):
        out += F.linear(F.linear(x * scalings[:, a:a + 1], lora_a[a]), lora_b[a]) * adapter_scale[a]
    return out


def two_matmuls(x, a_cat, b_cat, scalings, adapter_scale):
    T, (A, R) = x.shape[0], (scalings.shape[1], a_cat.shape[0] // scalings.shape[1])
    h = (x @ a_cat.T).view(T, A, R) * (scalings * adapter_scale)[:, :, None]  # [T, A, R]
    return h.view(T, A * R) @ b_cat.T


def test_xlora_mix(benchmark, record, quick, device, limits, case):
    cfg = QUICK if quick else FULL
    T, K, N = case
    (A, R), dtype = cfg["adapters"], cfg["dtype"]
    x = torch.randn(T, K, dtype=dtype, device=device)
    lora_a = (torch.randn(A, R, K, device=device) / K ** 0.5).to(dtype)
    lora_b = (torch.randn(A, N, R, device=device) / R ** 0.5).to(dtype)
    scalings = torch.softmax(torch.randn(T, A, device=device), dim=-1).to(dtype)
    adapter_scale = torch.full((A,), 2.0, dtype=dtype, device=device)
    a_cat, b_cat = lora_a.view(A * R, K), lora_b.permute(1, 0, 2).reshape(N, A * R)  # [A*R, K], [N, A*R]

    ours = measure(benchmark, lambda: xlora_mix(x, lora_a, lora_b, scalings, adapter_scale), cfg["rounds"])
    loop = timed(lambda: per_adapter_loop(x, lora_a, lora_b, scalings, adapter_scale))
    stacked = timed(lambda: two_matmuls(x, a_cat, b_cat, scalings, adapter_scale))
    moved = sum(t.nbytes for t in (x, lora_a, lora_b, scalings)) + T * N * dtype.itemsize  # + out
    flops = 2 * T * A * R * (K + N)
    # Each adapter weight feeds T FMAs: a few tokens are memory-bound, a prefill compute-bound.
    if T <= 16:
        gbps = moved / ours / 1e9
        headline = dict(gbps=gbps, frac_of_copy_bw=gbps / limits["copy_gbps"])
    else:
        tflops = flops / ours / 1e12
        headline = dict(tflops=tflops, frac_of_matmul=tflops / limits["matmul_tflops"])
    record(op="xlora_mix " + ("decode" if T <= 16 else "prefill"), T=T, K=K, N=N, A=A, R=R, dtype=str(dtype),
           bytes=moved, flops=flops, **headline, us=ours * 1e6,
           **best_peer(ours, per_adapter_loop=loop, two_matmuls=stacked),
           loop_us=loop * 1e6, two_matmul_us=stacked * 1e6,
           speedup_vs_loop=loop / ours, speedup_vs_two_matmul=stacked / ours)
