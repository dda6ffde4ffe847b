"""Weight representations swapped in for nn.Linear / nn.Embedding at load time: GGUF blocks kept as stored
(QuantLinear, QuantEmbedding) and X-LoRA adapters around a base linear (XLoraLinear). Model files never name them."""
import contextlib
import itertools

import torch
from torch import nn

from . import kernels
from .kernels.dequant import row_bytes
from .layers import Attention, Fused, GatedMLP


class QuantLinear(nn.Module):
    """A Linear whose weight stays in its GGUF block format: qweight uint8 [N, row_bytes] (N = out_features rows of
    K = in_features weights), multiplied by kernels.gguf_matmul. Swapped in for nn.Linear at load time."""

    def __init__(self, in_features: int, out_features: int, qtype, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.qtype = in_features, out_features, qtype
        self.register_buffer("qweight", torch.empty(out_features, row_bytes(qtype, in_features), dtype=torch.uint8))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    @classmethod
    def like(cls, linear: nn.Linear, qtype) -> "QuantLinear":
        with torch.device(linear.weight.device):
            return cls(linear.in_features, linear.out_features, qtype, linear.bias is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.dim() == 2  # the engine's [T, K] activations: no reshapes (each is ~1 us of a ~50 us decode matmul)
        x2 = x if flat else x.reshape(-1, self.in_features)  # [M, K]
        out = kernels.gguf_matmul(x2.contiguous(), self.qweight, self.qtype, self.out_features, self.in_features)
        if self.bias is not None:
            out = out + self.bias
        return out if flat else out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype.name}"


class CpuLinear(nn.Linear):
    """An nn.Linear whose CPU float32 product runs on the CPU kernels' thread team (kernels.linear), with the same
    parameters: swapped in for CPU float32 nn.Linears at load (cpu_matvec_layout)."""

    @classmethod
    def like(cls, linear: nn.Linear) -> "CpuLinear":
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        new.weight, new.bias = linear.weight, linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.bias)


class QuantEmbedding(nn.Module):
    """An Embedding kept in its GGUF block format: the rows of the looked-up tokens are dequantized to `dtype`."""

    def __init__(self, num_embeddings: int, embedding_dim: int, qtype, dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.qtype, self.dtype = num_embeddings, embedding_dim, qtype, dtype
        self.register_buffer("qweight", torch.empty(num_embeddings, row_bytes(qtype, embedding_dim),
                                                    dtype=torch.uint8))

    @classmethod
    def like(cls, embedding: nn.Embedding, qtype, dtype: torch.dtype) -> "QuantEmbedding":
        with torch.device(embedding.weight.device):
            return cls(embedding.num_embeddings, embedding.embedding_dim, qtype, dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = kernels.gguf_rows(self.qweight, self.qtype, self.embedding_dim, ids.reshape(-1))  # [T, K] float32
        return x.to(self.dtype).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype.name}"


class XLoraContext:
    """The scalings [T, n_layers, A] of the X-LoRA pass being run (None: a pass without adapters), shared by one
    model's XLoraLinear layers. Not an argument because an XLoraLinear stands in for an nn.Linear that layers.py's
    Attention and MLPs call as proj(x): passing the scalings explicitly would thread X-LoRA's input through every
    block, attention and MLP signature of every architecture. Instead the X-LoRA model opens the context for exactly
    one base-model pass (`with ctx.run(scalings):`), and an XLoraLinear called outside a pass raises."""

    def __init__(self):
        self._running, self._scalings = False, None

    @contextlib.contextmanager
    def run(self, scalings: torch.Tensor | None):
        if self._running:
            raise RuntimeError("an X-LoRA pass is already running on this model")
        self._running, self._scalings = True, scalings
        try:
            yield
        finally:
            self._running, self._scalings = False, None

    @property
    def scalings(self) -> torch.Tensor | None:
        if not self._running:
            raise RuntimeError("an XLoraLinear ran outside an X-LoRA pass: run the XLoraCausalLM, not its base model")
        return self._scalings


class XLoraLinear(nn.Module):
    """base(x) + kernels.xlora_mix: the adapters of one linear mixed by its column `index` of the scalings."""

    def __init__(self, base: nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor, adapter_scale: torch.Tensor,
                 index: int, ctx: XLoraContext):
        super().__init__()
        self.base, self.index, self.ctx = base, index, ctx
        self.register_buffer("lora_a", lora_a.contiguous())  # [A, R, K]
        self.register_buffer("lora_b", lora_b.contiguous())  # [A, N, R]
        self.register_buffer("adapter_scale", adapter_scale)  # [A]: alpha / r * global_scaling_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, scalings = self.base(x), self.ctx.scalings
        if scalings is None:
            return out
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # [T, K]
        s = scalings[:, self.index, :].contiguous()  # [T, A]
        delta = kernels.xlora_mix(x2, self.lora_a, self.lora_b, s, self.adapter_scale)
        return out + delta.view(out.shape)

    def extra_repr(self) -> str:
        A, R, _ = self.lora_a.shape
        return f"index={self.index}, adapters={A}, rank={R}"


def _cpu_float32(linear: nn.Module) -> bool:
    return type(linear) is nn.Linear and linear.weight.device.type == "cpu" and linear.weight.dtype == torch.float32


def _stack(projs: list[nn.Module]) -> nn.Module | None:
    """One module computing all of projs' outputs side by side, each proj's tensors made views of its tensors; None
    where they cannot be stacked (other kinds, dtypes or quantization types, X-LoRA wrappers, mixed biases).

    - CPU float32 nn.Linears: their weights become the row blocks of one contiguous [N1 + N2 + ..., K] tensor;
    - QuantLinears of one GGML type: their rows of blocks stacked, [N1 + N2 + ..., row_bytes] (rows are independent)."""
    floats = all(_cpu_float32(p) for p in projs)
    quants = all(type(p) is QuantLinear for p in projs) and len({p.qtype for p in projs}) == 1
    if not (floats or quants) or len({p.in_features for p in projs}) != 1 or len({p.bias is None for p in projs}) != 1:
        return None
    K, N = projs[0].in_features, sum(p.out_features for p in projs)
    bias = torch.cat([p.bias.detach() for p in projs]) if projs[0].bias is not None else None
    if floats:
        w = torch.cat([p.weight.detach() for p in projs])  # [N, K]
        with torch.device("meta"):
            fused = CpuLinear(K, N, bias=bias is not None)
        fused.weight = nn.Parameter(w, requires_grad=False)
        parts, attr = w, "weight"
    else:
        with torch.device("meta"):
            fused = QuantLinear(K, N, projs[0].qtype, bias is not None)
        fused.qweight = parts = torch.cat([p.qweight for p in projs])  # [N, row_bytes]
        attr = "qweight"
    if bias is not None:
        fused.bias = nn.Parameter(bias, requires_grad=False)
    start = 0
    for p in projs:  # each projection keeps its name and values, now as rows of the stacked tensors
        n = p.out_features
        view = parts[start:start + n]
        setattr(p, attr, nn.Parameter(view, requires_grad=False) if attr == "weight" else view)
        if bias is not None:
            p.bias = nn.Parameter(bias[start:start + n], requires_grad=False)
        start += n
    return fused


def fuse_projections(model: nn.Module) -> nn.Module:
    """Each Attention's q, k, v and each quantized GatedMLP's gate, up as one matrix product (layers.Fused) where
    their weights stack: a decode step then runs 4 products a layer instead of 7, each wider (better split over
    threads)."""
    for m in model.modules():
        if isinstance(m, Attention):
            projs = [m.q_proj, m.k_proj, m.v_proj]
            attr = "qkv"
        elif isinstance(m, GatedMLP) and type(m.gate_proj) is QuantLinear:
            # float32 gate/up stay two products: MKL reads a [K, 2I] weight no faster than two [K, I] ones
            # (measured on SmolLM2 F32), and a fused product rounds apart from transformers' two (tiny models: 1e-5)
            projs = [m.gate_proj, m.up_proj]
            attr = "gate_up"
        else:
            continue
        fused = _stack(projs)
        if fused is not None:
            setattr(m, attr, Fused(fused, tuple(p.out_features for p in projs)))
    return model


def cpu_matvec_layout(model: nn.Module) -> nn.Module:
    """Lay CPU models out for the matrix-vector products of batch-1 decode, decided once at load:

    - projections of one input run as one product (fuse_projections; CPU only, where the engine's decode is
      bound by per-call overhead and the matmul's thread split);
    - every CPU float32 nn.Linear becomes a CpuLinear: its product runs on the kernels' thread team, decode rows
      by linear_cpu.cpp's tiles over [N, K] rows, which stream several rows of W at once, the same arithmetic for
      every M (MKL's sgemv read a [K, N] copy 1.3-2.6x faster than [N, K], but chunked over threads either layout
      was slower than the former gemv: SmolLM2 F32, 2 threads, 28 and 32 tok/s against 39).
    Values, shapes and ties are unchanged."""
    if not any(t.device.type == "cpu" for t in itertools.chain(model.parameters(), model.buffers())):
        return model
    fuse_projections(model)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if _cpu_float32(child):
                setattr(parent, name, CpuLinear.like(child))
    return model
