"""rms_norm and rotary_embedding for CPU float32 tensors, by the C++ kernels of rowwise_cpu.cpp (cpu_ext.py builds
them); other dtypes and layouts, or a CPU without the extension, use the torch reference. The rotary equals the
reference bit for bit; rms_norm up to float rounding (its sum runs in another order than torch's). Both compute a
row the same way whatever the number of rows: a token's norm is the same in a decode step and in a prefill."""
import torch

from . import reference
from .cpu_ext import ext


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    if ext is None or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.stride(-1) != 1:
        return reference.rms_norm(x, weight, eps, unit_offset)
    if x.dim() == 2:  # the engine's [T, C] activations
        return ext.rms_norm(x, weight, eps, unit_offset)
    return ext.rms_norm(x.reshape(-1, x.shape[-1]), weight, eps, unit_offset).view_as(x)


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: q [T, H, D] and k [T, KVH, D] are rotated and returned (cos, sin [T, 1, r] from layers.Rotary)."""
    if (ext is None or not q.dtype == k.dtype == cos.dtype == torch.float32 or q.stride(-1) != 1
            or k.stride(-1) != 1):
        return reference.rotary_embedding(q, k, cos, sin)
    c, s = cos[:, 0], sin[:, 0]  # [T, r]
    ext.rotary_(q, c, s)
    ext.rotary_(k, c, s)
    return q, k
