"""linear for CPU float32 tensors: linear_cpu.cpp splits the output columns over the kernels' thread team (cpu_ext.py
builds it); other dtypes, or a CPU without the extension, use torch's F.linear (the reference)."""
import torch

from . import reference
from .cpu_ext import ext


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight [N, K].T (+ bias [N]) -> [..., N]."""
    if ext is None or x.dtype != torch.float32 or weight.dtype != torch.float32 or (
            bias is not None and bias.dtype != torch.float32):
        return reference.linear(x, weight, bias)
    if x.dim() == 2:  # the engine's [T, K] activations
        return ext.linear(x, weight, bias)
    return ext.linear(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])
