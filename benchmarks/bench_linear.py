"""CPU float32 linear (kernels.linear: linear_cpu.cpp, batch invariant) against torch's F.linear (MKL), on
SmolLM2-135M's projection shapes (hidden 576, intermediate 1536) at M = 1 and 4 (decode: memory-bound, GB/s of
weights read), 16 and 512 (a prompt: compute-bound, GFLOP/s and the fraction of the FMA peak at /proc/cpuinfo's
clock, 2 FMA x 8 lanes a cycle a core), at 1 and 2 threads. Both run on CPU tensors in either mode (this kernel is
the CPU path; on CUDA kernels.linear is F.linear itself). For M <= 16 each call reads the next of several copies of
W (more than a large L3 in all), as a decode step streams the model's weights from memory."""
import itertools
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import best_peer, measure, timed

from mistralrs import kernels
from mistralrs.kernels import cpu_ext

SHAPES = [(1536, 576), (576, 1536), (576, 576)]  # (N, K): gate / up, down, attention output
CASES = [(m, n, k, t) for t in (1, 2) for m in (1, 4, 16, 512) for n, k in SHAPES]
COLD_BYTES = 128 << 20  # copies of W a memory-bound case cycles through
ROUNDS = 20

pytestmark = pytest.mark.skipif(cpu_ext.UNAVAILABLE is not None, reason=f"{cpu_ext.UNAVAILABLE}")


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", CASES, ids=[f"M{m}-N{n}-K{k}-T{t}" for m, n, k, t in CASES])


def nominal_ghz() -> float | None:
    """The clock /proc/cpuinfo reports (its first core; boost clocks run above it), or None where it says none."""
    try:
        found = re.search(r"^cpu MHz\s*:\s*([\d.]+)", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        return None
    return float(found.group(1)) / 1e3 if found else None


@pytest.fixture
def threads(case):
    before = torch.get_num_threads()
    torch.set_num_threads(case[3])  # the team follows the calling thread's torch count, as F.linear does
    yield case[3]
    torch.set_num_threads(before)


def test_linear(benchmark, record, limits, case, threads):
    M, N, K, _ = case
    x = torch.randn(M, K)
    memory_bound = M <= 16
    copies = max(1, COLD_BYTES // (N * K * 4)) if memory_bound else 1
    weights = itertools.cycle([torch.randn(N, K) for _ in range(copies)])
    ours = measure(benchmark, lambda: kernels.linear(x, next(weights)), ROUNDS)
    torch_s = timed(lambda: F.linear(x, next(weights)), reps=ROUNDS)
    flops, weight_bytes = 2 * M * N * K, N * K * 4
    gbps, gflops = weight_bytes / ours / 1e9, flops / ours / 1e9
    if memory_bound:
        headline = dict(gbps=gbps, frac_of_copy_bw=gbps / limits["copy_gbps"])
    else:
        headline = dict(tflops=gflops / 1e3, frac_of_matmul=gflops / 1e3 / limits["matmul_tflops"])
    ghz = nominal_ghz()
    peak = dict(nominal_ghz=ghz, frac_of_fma_peak=gflops / (threads * 32 * ghz)) if ghz else {}
    record(op="linear f32", M=M, N=N, K=K, threads=threads, dtype="float32", weight_bytes=weight_bytes, flops=flops,
           weight_copies=copies, gflops=gflops, weight_gbps=gbps, **headline, **peak,
           **best_peer(ours, torch_f_linear=torch_s), torch_f_linear_us=torch_s * 1e6,
           torch_f_linear_gflops=flops / torch_s / 1e9, torch_f_linear_gbps=weight_bytes / torch_s / 1e9)
