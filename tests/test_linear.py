"""kernels.linear on CPU (linear_cpu.cpp: columns split over the kernels' thread team) against the torch reference;
the CpuLinear modules the loader swaps in for CPU float32 nn.Linears."""
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
    w = torch.randn(N, K) if layout == "NK" else torch.randn(K, N).t()  # rows: the gemv; a view: at::mm chunks
    b = torch.randn(N) if bias else None
    x = torch.randn(M, K)
    ref = reference.linear(x, w, b)
    for threads in (1, 2, 3):
        out = with_threads(threads, lambda: kernels.linear(x, w, b))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


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
