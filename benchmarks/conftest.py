"""Shared benchmark plumbing: quick (CPU, tiny shapes) vs full (GPU) mode, device limits, derived figures.

    python -m pytest benchmarks/ --benchmark-json=benchmarks/results/<device>/run.json    (full sizes on a GPU)
    python -m pytest benchmarks/ --quick                                                  (tiny sizes, anywhere)
    python -m pytest benchmarks/ --runslow            (also the slow real-model benchmark, bench_cpu_real.py)

Every case records in extra_info: shape, dtype, device, torch/triton versions, git commit, and the derived figures
(GB/s or TFLOP/s, fraction of the device limit measured in the same run, ratio to the best peer measured alongside).
On CUDA every kernel and peer is timed by triton.testing.do_bench (timed, measure): CUDA events, the L2 flushed before
each call, a warm-up, the median; on CPU by wall clock.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

# The tools (converters, real-model fetcher) import as plain modules here too.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="tiny shapes (the default without a GPU)")
    try:
        parser.addoption("--runslow", action="store_true", help="also run benchmarks marked slow (real models)")
    except ValueError:  # `pytest tests benchmarks`: tests/conftest.py has registered it already
        pass


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--runslow"):
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="slow: run with --runslow"))


def is_quick(config) -> bool:
    return config.getoption("--quick") or not torch.cuda.is_available()


@pytest.fixture(scope="session")
def quick(request) -> bool:
    return is_quick(request.config)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{os.cpu_count()}cores"


# do_bench's warm-up and timed window (ms): thousands of calls of a µs kernel, a few of a slow baseline; small enough
# that tools/gpu_check.sh's kernel benchmarks fit its LIMIT_BENCH.
WARMUP_MS, REP_MS = 10, 40


def timed(fn, reps: int = 10) -> float:
    """Median seconds of fn(). On CUDA: triton.testing.do_bench, CUDA events around each call with the L2 flushed
    before it, after a warm-up (reps is ignored). Elsewhere: wall time of reps calls after one warm-up."""
    if torch.cuda.is_available():
        return triton.testing.do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median") * 1e-3
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def measure(benchmark, fn, rounds: int = 20) -> float:
    """Median seconds of fn, as timed() on CUDA (pytest-benchmark then runs fn once, so the case has its row in the
    JSON; its own stats are one call's wall time, not the figure) or pytest-benchmark's median elsewhere. The figure
    goes into extra_info as median_us, with how it was timed."""
    if torch.cuda.is_available():
        seconds = timed(fn)
        benchmark.pedantic(fn, rounds=1, iterations=1)
        torch.cuda.synchronize()
        timing = "triton.testing.do_bench median (CUDA events, L2 flushed)"
    else:
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=2)
        seconds = benchmark.stats.stats.median
        timing = "pytest-benchmark wall-clock median"
    benchmark.extra_info.update(median_us=seconds * 1e6, timing=timing)
    return seconds


def best_peer(ours: float, **peers: float | None) -> dict:
    """The ratio of the fastest peer's time to ours (> 1: we are faster) and its name; None marks a peer not run."""
    ran = {name: t for name, t in peers.items() if t is not None}
    name = min(ran, key=ran.get)
    return dict(speedup_vs_best_peer=ran[name] / ours, best_peer=name)


@pytest.fixture(scope="session")
def limits(device, quick) -> dict:
    """The device's measured copy bandwidth (GB/s: read + write of a large buffer) and bf16 matmul TFLOP/s."""
    n = (1 << 28) if device.type == "cuda" else (1 << 24)  # 1 GiB / 64 MiB of fp32
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src), reps=5)
    m = 8192 if device.type == "cuda" else 512
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(m, m, dtype=dt, device=device)
    mm_s = timed(lambda: a @ a, reps=5)
    return {"copy_gbps": 2 * src.nbytes / copy_s / 1e9, "matmul_tflops": 2 * m ** 3 / mm_s / 1e12}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        return "unknown"


@pytest.fixture
def record(benchmark, device, limits):
    """record(**figures): attach the case's facts and derived figures to the benchmark's JSON row."""
    def _record(**figures):
        benchmark.extra_info.update(device=device_name(device), torch=torch.__version__, triton=triton.__version__,
                                    commit=git_commit(), copy_gbps=float(f"{limits['copy_gbps']:.3g}"),
                                    matmul_tflops=float(f"{limits['matmul_tflops']:.3g}"), **figures)
    return _record
