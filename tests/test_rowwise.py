"""kernels.rms_norm and kernels.rotary_embedding on CPU (the C++ kernels of rowwise_cpu.cpp) against the torch
reference (kernels/reference.py, itself checked against transformers in test_layers.py)."""
import pytest
import torch

from mistralrs import kernels
from mistralrs.kernels import cpu_ext, reference
from mistralrs.layers import Rotary

pytestmark = pytest.mark.skipif(cpu_ext.UNAVAILABLE is not None, reason=f"{cpu_ext.UNAVAILABLE}")


@pytest.mark.parametrize("C", [8, 13, 576, 2048])
@pytest.mark.parametrize("unit_offset", [False, True], ids=["w", "1+w"])
def test_rms_norm(C, unit_offset):
    x = torch.randn(7, C) * 3
    w = torch.randn(C)
    out = cpu_ext.ext.rms_norm(x, w, 1e-6, unit_offset)
    torch.testing.assert_close(out, reference.rms_norm(x, w, 1e-6, unit_offset), rtol=1e-6, atol=1e-6)
    strided = torch.randn(7, 2 * C)[:, :C]  # rows of a wider tensor, as the fused projections' outputs
    torch.testing.assert_close(kernels.rms_norm(strided, w, 1e-5), reference.rms_norm(strided, w, 1e-5),
                               rtol=1e-6, atol=1e-6)


def test_rms_norm_other_dtypes_use_the_reference():
    x, w = torch.randn(3, 64).bfloat16(), torch.randn(64).bfloat16()
    assert torch.equal(kernels.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6))


@pytest.mark.parametrize("D,r", [(64, 64), (80, 80), (40, 16), (12, 4)], ids=["64", "80", "partial16", "tail"])
def test_rotary_embedding_in_place(D, r):
    """Views of one fused projection output, as Attention hands them over; rotated in place, bit for bit the
    reference (no FMA contraction), other dims untouched."""
    T, H, KVH = 5, 6, 2
    rot = Rotary(r, 10000.0)
    cos, sin = rot.cos_sin(torch.tensor([0, 3, 17, 100, 4096]), torch.float32)
    qkv = torch.randn(T, (H + 2 * KVH) * D)
    q, k, _ = qkv.split([H * D, KVH * D, KVH * D], dim=-1)
    q, k = q.view(T, H, D), k.view(T, KVH, D)
    want_q, want_k = reference.rotary_embedding(q, k, cos, sin)
    got_q, got_k = kernels.rotary_embedding(q, k, cos, sin)
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr()  # in place
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)


def test_bad_shapes_raise():
    with pytest.raises(RuntimeError, match="weight must be"):
        cpu_ext.ext.rms_norm(torch.randn(2, 8), torch.randn(9), 1e-6, False)
    with pytest.raises(RuntimeError, match="cos and sin"):
        cpu_ext.ext.rotary_(torch.randn(2, 3, 8), torch.randn(2, 5), torch.randn(2, 5))


def test_rms_norm_and_rotary_of_a_row_do_not_depend_on_the_other_rows():
    """A token's norm and rotary are the same bits in a decode step (a few rows) and in a prefill (hundreds)."""
    w, x = torch.randn(100), torch.randn(300, 100)
    whole = kernels.rms_norm(x, w, 1e-6)
    for a, b in ((0, 1), (7, 8), (5, 21), (100, 300)):
        assert torch.equal(kernels.rms_norm(x[a:b], w, 1e-6), whole[a:b])
    q, k, cos, sin = torch.randn(300, 4, 32), torch.randn(300, 2, 32), torch.randn(300, 1, 16), torch.randn(300, 1, 16)
    q_all, k_all = kernels.rotary_embedding(q.clone(), k.clone(), cos, sin)
    q_one, k_one = kernels.rotary_embedding(q[40:41].clone(), k[40:41].clone(), cos[40:41], sin[40:41])
    assert torch.equal(q_one, q_all[40:41]) and torch.equal(k_one, k_all[40:41])
