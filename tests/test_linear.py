"""kernels.linear on CPU (linear_cpu.cpp: rows of W split over the kernels' thread team) against the torch reference;
its batch invariance (a row's result has the same bits whatever the other rows, M and the thread count); the
CpuLinear modules the loader swaps in for CPU float32 nn.Linears."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mistralrs import kernels
from mistralrs.kernels import cpu_ext, reference
from mistralrs.linears import CpuLinear, cpu_matvec_layout

pytestmark = pytest.mark.skipif(cpu_ext.UNAVAILABLE is not None, reason=f"{cpu_ext.UNAVAILABLE}")


def with_threads(n: int, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("M,K,N", [(1, 576, 1536), (3, 64, 45), (7, 100, 7), (40, 100, 70), (1, 13, 2000)])
@pytest.mark.parametrize("layout", ["NK", "KN"], ids=["rows", "transposed-view"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_linear_matches_the_reference(M, K, N, layout, bias):
    w = torch.randn(N, K) if layout == "NK" else torch.randn(K, N).t()  # a view: copied to rows, the same kernel
    b = torch.randn(N) if bias else None
    x = torch.randn(M, K)
    ref = reference.linear(x, w, b)
    for threads in (1, 2, 3):
        out = with_threads(threads, lambda: kernels.linear(x, w, b))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


# (start, rows) of x[512, K]: single rows, small batches, tiles' tails, unaligned starts, the whole prompt.
SLICES = [(0, 1), (1, 1), (511, 1), (3, 2), (7, 3), (1, 5), (9, 8), (5, 9), (13, 17), (100, 64), (3, 100), (0, 512)]


@pytest.mark.parametrize("K", [100, 576, 1536])
@pytest.mark.parametrize("N", [45, 70])  # tails of every tiling's rows of W (3, 4, 6, 8)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_each_row_has_the_same_bits_whatever_the_batch_and_the_threads(K, N, bias):
    """A token's output row is the same alone (decode), in a batch or in a prompt, at any thread count: the row of
    linear(x) equals the row of linear(x[a:b]) bit for bit."""
    x, w = torch.randn(512, K), torch.randn(N, K)
    b = torch.randn(N) if bias else None
    full = with_threads(1, lambda: kernels.linear(x, w, b))
    ref = reference.linear(x.double(), w.double(), None if b is None else b.double()).float()
    torch.testing.assert_close(full, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    for threads in (1, 2, 3):
        assert torch.equal(with_threads(threads, lambda: kernels.linear(x, w, b)), full)
        for start, rows in SLICES:
            part = with_threads(threads, lambda: kernels.linear(x[start:start + rows], w, b))
            assert torch.equal(part, full[start:start + rows]), (threads, start, rows)


AVX2_ONLY = """
import sys, torch
from mistralrs import kernels
x, w, b = torch.load(sys.argv[1])
torch.save([kernels.linear(x[:m], w, b) for m in (1, 3, 8, 9, 512)], sys.argv[2])
"""


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512", reason="one tiling on this CPU")
def test_avx512_tiles_give_the_avx2_tiles_bits(tmp_path):
    """With AVX-512VL the tiles are larger (32 registers) but their instructions are AVX2's: the same bits, so the
    result does not depend on the CPU's extensions either. The AVX2 tiling runs in a subprocess
    (MISTRALRS_LINEAR_AVX2=1, read once)."""
    x, w, b = torch.randn(512, 100), torch.randn(70, 100), torch.randn(70)
    torch.save((x, w, b), tmp_path / "in.pt")
    env = {**os.environ, "MISTRALRS_LINEAR_AVX2": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", AVX2_ONLY, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")], env=env,
                   check=True, timeout=600)
    for avx2, m in zip(torch.load(tmp_path / "out.pt"), (1, 3, 8, 9, 512)):
        assert torch.equal(kernels.linear(x[:m], w, b), avx2), m


def test_linear_keeps_leading_dims_and_other_dtypes_use_the_reference():
    w, x = torch.randn(33, 20), torch.randn(2, 3, 20)
    assert kernels.linear(x, w).shape == (2, 3, 33)
    torch.testing.assert_close(kernels.linear(x, w), reference.linear(x, w), rtol=1e-5, atol=1e-5)
    xb, wb = x.bfloat16(), w.bfloat16()
    assert torch.equal(kernels.linear(xb, wb), reference.linear(xb, wb))


def test_linear_runs_under_the_callers_inference_mode():
    """The chunks' torch ops run on the team's threads with the caller's thread-local state: under inference mode
    the output is an inference tensor (a chunk writing into it from a thread without that mode would fail)."""
    w, x = torch.randn(4096, 64), torch.randn(2, 64)
    with torch.inference_mode():
        out = with_threads(2, lambda: kernels.linear(x, w))
    assert out.is_inference()
    torch.testing.assert_close(out, x @ w.T, rtol=1e-5, atol=1e-4)


def test_bad_shapes_raise_and_the_team_keeps_working():
    with pytest.raises(RuntimeError, match="linear_cpu"):
        cpu_ext.ext.linear(torch.randn(2, 5), torch.randn(3, 4), None)
    w, x = torch.randn(300, 8), torch.randn(1, 8)
    torch.testing.assert_close(with_threads(2, lambda: kernels.linear(x, w)), x @ w.T)


def test_cpu_layout_swaps_float_linears_for_cpu_linears_with_the_same_parameters():
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4, bias=False))
    model[1].weight = model[0].weight.__class__(torch.randn(4, 16))
    x = torch.randn(3, 8)
    expect = model(x)
    cpu_matvec_layout(model)
    assert all(type(m) is CpuLinear for m in model)
    torch.testing.assert_close(model(x), expect, rtol=1e-5, atol=1e-6)
    assert set(dict(model.state_dict())) == {"0.weight", "0.bias", "1.weight"}
