"""X-LoRA adapter mixing: the torch reference against a PEFT-style per-adapter loop, and the Triton kernel
(interpreted on CPU) against the reference."""
import pytest
import torch
import torch.nn.functional as F

from mistralrs.kernels import reference
from mistralrs.kernels.xlora import xlora_mix

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}  # relative to the output's largest value


def adapters(A: int, R: int, K: int, N: int, dtype=torch.float32, device="cpu"):
    """lora_a [A, R, K], lora_b [A, N, R] scaled so that delta is O(1), and a non-uniform adapter_scale [A]."""
    lora_a = (torch.randn(A, R, K, device=device) / K ** 0.5).to(dtype)
    lora_b = (torch.randn(A, N, R, device=device) / R ** 0.5).to(dtype)
    adapter_scale = torch.linspace(0.5, 2.0, A, device=device) * 0.9  # alpha_a / r_a * global_scaling_weight
    return lora_a, lora_b, adapter_scale


def make_scalings(T: int, A: int, kind: str, device="cpu") -> torch.Tensor:
    logits = torch.randn(T, A, device=device)
    return torch.softmax(logits, dim=-1) if kind == "softmax" else 3 * logits  # arbitrary: signed, unnormalized


def check(x, lora_a, lora_b, scalings, adapter_scale, **kw):
    out = xlora_mix(x, lora_a, lora_b, scalings, adapter_scale, **kw)
    ref = reference.xlora_mix(x, lora_a, lora_b, scalings, adapter_scale)
    assert out.dtype == x.dtype and out.shape == (x.shape[0], lora_b.shape[1])
    tol = TOL[x.dtype]
    torch.testing.assert_close(out, ref, atol=tol * ref.abs().max().item(), rtol=tol)
    return out


def peft_loop(x, As, Bs, scalings, alphas, global_weight):
    """What the original and PEFT do, per adapter at its own rank r_a: B_a(A_a(x * s_a)) * alpha_a / r_a * g."""
    out = torch.zeros(x.shape[0], Bs[0].shape[0], dtype=x.dtype)
    for a, (A_a, B_a) in enumerate(zip(As, Bs)):
        out += F.linear(F.linear(x * scalings[:, a:a + 1], A_a), B_a) * (alphas[a] / A_a.shape[0] * global_weight)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_reference_matches_peft_loop(dtype):
    """Adapters of ranks 4, 16, 8 zero-padded to R = 16, scaled after A: the same as the loop's unpadded adapters
    scaling x before A, computed independently in float64."""
    T, K, N, R, ranks, alphas, g = 5, 48, 40, 16, [4, 16, 8], [8.0, 32.0, 4.0], 0.7
    x = torch.randn(T, K, dtype=torch.float64)
    As = [torch.randn(r, K, dtype=torch.float64) / K ** 0.5 for r in ranks]
    Bs = [torch.randn(N, r, dtype=torch.float64) / r ** 0.5 for r in ranks]
    s = make_scalings(T, len(ranks), "softmax").double()
    lora_a = torch.zeros(len(ranks), R, K, dtype=torch.float64)
    lora_b = torch.zeros(len(ranks), N, R, dtype=torch.float64)
    for a, r in enumerate(ranks):
        lora_a[a, :r], lora_b[a, :, :r] = As[a], Bs[a]
    adapter_scale = torch.tensor([alpha / r * g for alpha, r in zip(alphas, ranks)])
    ref = reference.xlora_mix(x.to(dtype), lora_a.to(dtype), lora_b.to(dtype), s.float(), adapter_scale)
    expected = peft_loop(x, As, Bs, s, alphas, g)
    assert ref.dtype == dtype
    tol = TOL[dtype]
    torch.testing.assert_close(ref.double(), expected, atol=tol * expected.abs().max().item(), rtol=tol)


def test_reference_one_hot_scalings_pick_one_adapter():
    T, K, N, A, R = 4, 32, 24, 3, 8
    x = torch.randn(T, K)
    lora_a, lora_b, adapter_scale = adapters(A, R, K, N)
    s = torch.zeros(T, A)
    s[:, 1] = 1.0
    expected = (x @ lora_a[1].T @ lora_b[1].T) * adapter_scale[1]
    torch.testing.assert_close(reference.xlora_mix(x, lora_a, lora_b, s, adapter_scale), expected)


@pytest.mark.parametrize("kind", ["softmax", "arbitrary"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("R", [8, 16], ids=lambda r: f"R{r}")
@pytest.mark.parametrize("A", [1, 3, 9], ids=lambda a: f"A{a}")
@pytest.mark.parametrize("K,N", [(80, 200), (200, 80)], ids=["K80-N200", "K200-N80"])
@pytest.mark.parametrize("T", [1, 7, 37], ids=lambda t: f"T{t}")
def test_matches_reference(T, K, N, A, R, dtype, kind):
    """T = 1, 7: one decode tile; 37: two ragged prefill tiles. R = 8: a 16-column chunk of h spans two adapters;
    A = 1, R = 8: A*R = 8 is under one chunk. K, N are not multiples of any tile."""
    x = torch.randn(T, K).to(dtype)
    lora_a, lora_b, adapter_scale = adapters(A, R, K, N, dtype)
    check(x, lora_a, lora_b, make_scalings(T, A, kind), adapter_scale)


@pytest.mark.parametrize("T", [2, 40], ids=["decode", "prefill"])
def test_split_k_matches_one_split(T):
    """K = 600 is 5 decode tiles (of 128) or 10 prefill tiles (of 64): 3 splits leave a short last one."""
    K, N, A, R = 600, 48, 3, 16
    x = torch.randn(T, K)
    lora_a, lora_b, adapter_scale = adapters(A, R, K, N)
    s = make_scalings(T, A, "softmax")
    check(x, lora_a, lora_b, s, adapter_scale)  # decode: the heuristic splits 5 ways
    one = check(x, lora_a, lora_b, s, adapter_scale, split_k=1)
    three = check(x, lora_a, lora_b, s, adapter_scale, split_k=3)
    torch.testing.assert_close(one, three, atol=1e-5, rtol=1e-5)


def test_many_splits_take_several_reduce_steps():
    """20 K splits: the reduce sums them 16 per load, so twice; T = 3 * A*R = 48 values of h is one reduce program."""
    T, K, N, A, R = 3, 20 * 128, 40, 3, 16
    x = torch.randn(T, K)
    lora_a, lora_b, adapter_scale = adapters(A, R, K, N)
    s = make_scalings(T, A, "arbitrary")
    many = check(x, lora_a, lora_b, s, adapter_scale, split_k=20)
    torch.testing.assert_close(many, check(x, lora_a, lora_b, s, adapter_scale, split_k=1), atol=1e-5, rtol=1e-5)


def test_strided_inputs():
    """x as a slice of a wider buffer; scalings as one layer's slice of the classifier's [T, n_layers, A] output;
    fp16 scalings and adapter_scale with fp32 x."""
    T, K, N, A, R, n_layers = 9, 64, 40, 4, 8, 5
    x = torch.randn(T, 2 * K)[:, K:]
    lora_a, lora_b, adapter_scale = adapters(A, R, K, N)
    all_scalings = torch.softmax(torch.randn(T, n_layers, A), dim=-1)
    check(x, lora_a, lora_b, all_scalings[:, 3], adapter_scale)
    check(x, lora_a, lora_b, all_scalings[:, 1].half(), adapter_scale.half())


def test_zero_scalings_give_zero_and_empty_batches_work():
    K, N, A, R = 32, 24, 2, 8
    lora_a, lora_b, adapter_scale = adapters(A, R, K, N)
    out = xlora_mix(torch.randn(3, K), lora_a, lora_b, torch.zeros(3, A), adapter_scale)
    assert torch.equal(out, torch.zeros(3, N))
    assert xlora_mix(torch.randn(0, K), lora_a, lora_b, torch.zeros(0, A), adapter_scale).shape == (0, N)


def test_rejects_what_it_cannot_do():
    K, N, A, R = 32, 24, 2, 8
    x = torch.randn(3, K)
    lora_a, lora_b, adapter_scale = adapters(A, R, K, N)
    s = make_scalings(3, A, "softmax")
    with pytest.raises(AssertionError):
        xlora_mix(x.double(), lora_a, lora_b, s, adapter_scale)
    with pytest.raises(AssertionError):
        xlora_mix(x.half(), lora_a, lora_b, s, adapter_scale)  # adapters in another dtype than x
    with pytest.raises(AssertionError):
        xlora_mix(x, lora_a, lora_b.transpose(1, 2).contiguous(), s, adapter_scale)  # [A, R, N] is not [A, N, R]
    with pytest.raises(AssertionError):
        xlora_mix(x, lora_a, lora_b.transpose(0, 1).contiguous().transpose(0, 1), s, adapter_scale)  # not contiguous
    with pytest.raises(AssertionError):
        xlora_mix(x, lora_a, lora_b, s[:, :1], adapter_scale)
    with pytest.raises(AssertionError):
        xlora_mix(x, lora_a, lora_b, s, adapter_scale[:1])


GPU_SHAPES = [(1, 4096, 4096), (8, 4096, 4096), (512, 4096, 4096), (1, 4096, 14336), (300, 14336, 4096)]


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["softmax", "arbitrary"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "f16", "f32"])
@pytest.mark.parametrize("T,K,N", GPU_SHAPES, ids=[f"T{t}-K{k}-N{n}" for t, k, n in GPU_SHAPES])
def test_real_sizes_on_gpu(T, K, N, dtype, kind):
    A, R = 9, 16
    x = torch.randn(T, K, device="cuda").to(dtype)
    lora_a, lora_b, adapter_scale = adapters(A, R, K, N, dtype, "cuda")
    check(x, lora_a, lora_b, make_scalings(T, A, kind, "cuda"), adapter_scale)
