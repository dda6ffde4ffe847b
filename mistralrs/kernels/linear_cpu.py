"""linear for CPU float32 tensors: linear_cpu.cpp (cpu_ext.py builds it), register-tiled FMA dot products with the
rows of W split over the kernels' thread team. Batch invariant: each output row has the same bits whatever the other
rows of x, their number (decode, a batch, a prefill) and the thread count, since every element is summed in one
fixed order. Other dtypes, or a CPU without the extension, use torch's F.linear (the reference)."""
import torch

from . import reference
from .cpu_ext import ext


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight [N, K].T (+ bias [N]) -> [..., N]. A weight that is not [N, K] rows (a transposed view) is
    copied to rows on each call."""
    if ext is None or x.dtype != torch.float32 or weight.dtype != torch.float32 or (
            bias is not None and bias.dtype != torch.float32):
        return reference.linear(x, weight, bias)
    if x.dim() == 2:  # the engine's [T, K] activations
        return ext.linear(x, weight, bias)
    return ext.linear(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])
