"""The building blocks the five architectures share: norms, rotary, attention over the paged KV cache, MLPs, MoE.

Shapes: T tokens of a step packed back to back (ragged batch), H query heads, KVH KV heads, D head dim.
Module names follow the Hugging Face checkpoints, so most weights load under their own names.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels


@dataclass
class AttentionMetadata:
    """Where this step's tokens go in the paged KV cache and what each one attends to."""
    slot_mapping: torch.Tensor   # [T] int64: cache slot of each new token
    block_tables: torch.Tensor   # [B, max_blocks] int32: each sequence's blocks, in order
    context_lens: torch.Tensor   # [B] int32: tokens in the cache after this step (earlier + new)
    cu_seqlens_q: torch.Tensor   # [B+1] int32: offsets of each sequence's new tokens in T
    max_seqlen_q: int

    @property
    def is_decode(self) -> bool:
        return self.max_seqlen_q == 1


def summed(x: torch.Tensor, tp) -> torch.Tensor:
    """x summed over the ranks of tensor-parallel model `tp` (tensor_parallel/group.py; None: one rank), where
    each rank's x is a partial sum: the output of a row-parallel projection."""
    return x if tp is None else tp.all_reduce(x)


ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class RMSNorm(nn.Module):
    """x / rms(x) * w, in fp32. Gemma stores w - 1 and scales by (1 + w) before the cast back."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps
        self.unit_offset = unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps, self.unit_offset)


def rope_inv_freq(rotary_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d), rescaled as the config's rope_scaling says."""
    # Explicitly on the CPU: models are built under torch.device("meta"), and this is data, not a weight.
    steps = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").float()
    inv_freq = 1.0 / theta ** (steps / rotary_dim)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between.
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: default, linear, llama3")


class Rotary:
    """Rotary position embedding on the first `rotary_dim` dims of each head (Hugging Face's rotate-half layout).

    cos and sin of positions 0..P-1 are tabled once per device and dtype, P the next power of two past the largest
    position seen, so a step only looks its positions up."""

    def __init__(self, rotary_dim: int, theta: float, scaling: dict | None = None):
        self.rotary_dim = rotary_dim
        self.inv_freq = rope_inv_freq(rotary_dim, theta, scaling)

    @property
    def inv_freq(self) -> torch.Tensor:
        return self._inv_freq

    @inv_freq.setter
    def inv_freq(self, value: torch.Tensor) -> None:  # GGUF rope factors rescale it after the build
        self._inv_freq, self._tables = value, {}

    def _table(self, n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """[n, 2, rotary_dim]: cos, and sin signed for rotate-half (-sin on the first half; reference.apply_rotary)."""
        positions = torch.arange(n, dtype=torch.int64, device=device).float()
        freqs = positions[:, None] * self.inv_freq.to(device)[None, :]  # [n, rotary_dim / 2], as Hugging Face's
        cos, sin = torch.cat((freqs, freqs), dim=-1).cos(), freqs.sin()
        return torch.stack((cos, torch.cat((-sin, sin), dim=-1)), dim=1).to(dtype)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin: [T, 1, rotary_dim] each, at `positions` [T]."""
        table = self._tables.get((positions.device, dtype))
        need = int(positions.max()) + 1
        if table is None or table.shape[0] < need:
            table = self._tables[positions.device, dtype] = self._table(1 << (need - 1).bit_length(),
                                                                        positions.device, dtype)
        cs = table[positions]  # [T, 2, rotary_dim]
        return cs[:, None, 0], cs[:, None, 1]


@dataclass(frozen=True, eq=False)
class Fused:
    """Projections of one input run as one matrix product: proj's output columns are theirs, in order (sizes).

    Set at load (linears.fuse_projections) when the projections' weights can be stacked; each projection's weight
    is then a view of proj's, so the modules, their names and the state_dict are unchanged. A plain attribute, not
    a submodule: proj's tensors are views, not weights of their own (and the model is not moved after load)."""
    proj: nn.Module
    sizes: tuple[int, ...]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.proj(x).split_with_sizes(self.sizes, dim=-1)  # (Tensor.split is a Python wrapper around it)


class Attention(nn.Module):
    def __init__(self, hidden: int, n_heads: int, n_kv_heads: int, head_dim: int, *, qkv_bias: bool = False,
                 o_bias: bool = False, sliding_window: int | None = None, softcap: float | None = None,
                 scale: float | None = None, q_norm: nn.Module | None = None, k_norm: nn.Module | None = None):
        """scale defaults to head_dim^-0.5; q_norm / k_norm (Gemma 3) normalize each head of q and k before the
        rotary."""
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"num_attention_heads ({n_heads}) must be a multiple of num_key_value_heads ({n_kv_heads})")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_proj = nn.Linear(hidden, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden, bias=o_bias)
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.q_norm, self.k_norm = q_norm, k_norm
        self.sliding_window = sliding_window
        self.softcap = softcap
        self.qkv: Fused | None = None  # q, k, v as one product, set at load (linears.fuse_projections)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
                kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        T = x.shape[0]
        if self.qkv is not None:
            q, k, v = self.qkv(x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k = q.view(T, self.n_heads, self.head_dim), k.view(T, self.n_kv_heads, self.head_dim)  # [T, H|KVH, D]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = kernels.rotary_embedding(q, k, cos, sin)
        v = v.view(T, self.n_kv_heads, self.head_dim)
        k_cache, v_cache = kv_cache
        kernels.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        attend = kernels.paged_decode_attention if meta.is_decode else kernels.paged_attention
        o = attend(q, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.cu_seqlens_q,
                   self.scale, self.sliding_window, self.softcap)
        return self.o_proj(o.reshape(T, self.n_heads * self.head_dim))


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU (silu) or GeGLU (gelu)."""

    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act = activation(act)
        self.gate_up: Fused | None = None  # gate and up as one product, set at load (linears.fuse_projections)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x) if self.gate_up is not None else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(self.act(gate) * up)


class Expert(nn.Module):
    """One Mixtral expert, with its checkpoint names: w2(silu(w1 x) * w3 x)."""

    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.w1 = nn.Linear(hidden, intermediate, bias=False)
        self.w2 = nn.Linear(intermediate, hidden, bias=False)
        self.w3 = nn.Linear(hidden, intermediate, bias=False)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class SparseMoE(nn.Module):
    """Top-k routed experts: softmax over all experts in fp32, keep the k largest, renormalise."""

    def __init__(self, hidden: int, intermediate: int, n_experts: int, top_k: int, act: str):
        super().__init__()
        self.gate = nn.Linear(hidden, n_experts, bias=False)
        self.experts = nn.ModuleList(Expert(hidden, intermediate, act) for _ in range(n_experts))
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.gate(x).float(), dim=-1)  # [T, E]
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # [T, K]
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in chosen.unique().tolist():
            token, slot = torch.where(chosen == e)
            y = self.experts[e](x[token]) * weights[token, slot, None].to(x.dtype)
            out.index_add_(0, token, y)
        return out


class PreNormBlock(nn.Module):
    """x + attn(norm(x)), then h + mlp(norm(h)): Llama, Mistral, Gemma, Mixtral."""
    tp = None  # tensor parallel: attn and mlp give partial sums, added up over the ranks (tensor_parallel/)

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, input_layernorm: nn.Module,
                 post_attention_layernorm: nn.Module):
        super().__init__()
        self.self_attn, self.mlp = self_attn, mlp
        self.input_layernorm, self.post_attention_layernorm = input_layernorm, post_attention_layernorm

    def forward(self, x, cos, sin, meta, kv_cache):
        h = x + summed(self.self_attn(self.input_layernorm(x), cos, sin, meta, kv_cache), self.tp)
        return h + summed(self.mlp(self.post_attention_layernorm(h)), self.tp)


class ParallelBlock(nn.Module):
    """x + attn(norm(x)) + mlp(norm(x)): Phi-2's attention and MLP read the same normed input."""
    tp = None  # tensor parallel: one sum over the ranks for both partial sums

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, input_layernorm: nn.Module):
        super().__init__()
        self.self_attn, self.mlp, self.input_layernorm = self_attn, mlp, input_layernorm

    def forward(self, x, cos, sin, meta, kv_cache):
        h = self.input_layernorm(x)
        return x + summed(self.self_attn(h, cos, sin, meta, kv_cache) + self.mlp(h), self.tp)


class CausalLM(nn.Module):
    """Embedding -> blocks -> final norm -> lm_head, with Hugging Face's module names (model.*, lm_head).

    Every layer uses `rotary` unless `layer_rotaries` gives each its own (Gemma 3: local and global layers differ);
    `final_softcap` c bounds the logits to c * tanh(logits / c) (Gemma 2). Tensor parallel (`tp` set), each rank
    holds a slice of the vocabulary rows of embed_tokens and lm_head (tensor_parallel/shard.py), and `vocab_size` is the
    whole vocabulary's."""
    tp = None
    decode_layers = None  # CPU: per block, its decode step as one C++ call or None (cpu_decode.add_decode_layers)

    def __init__(self, vocab: int, hidden: int, blocks: list[nn.Module], norm: nn.Module, rotary: Rotary, *,
                 embed_scale: float | None = None, lm_head_bias: bool = False, tie_word_embeddings: bool = False,
                 layer_rotaries: list[Rotary] | None = None, final_softcap: float | None = None):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, hidden)
        self.model.layers = nn.ModuleList(blocks)
        self.model.norm = norm
        self.lm_head = nn.Linear(hidden, vocab, bias=lm_head_bias)
        self.rotary = rotary
        self.layer_rotaries = layer_rotaries or [rotary] * len(blocks)
        if len(self.layer_rotaries) != len(blocks):
            raise ValueError(f"{len(self.layer_rotaries)} layer rotaries for {len(blocks)} blocks")
        self.final_softcap = final_softcap
        self.embed_scale = embed_scale
        self.tie_word_embeddings = tie_word_embeddings
        self.vocab_size = vocab

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden] after the final norm."""
        x = self.embed(input_ids)
        if self.embed_scale is not None:
            # Gemma rounds the scale to the activation dtype before multiplying, so we do too.
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        tables = {}  # cos, sin of each distinct rotary, once per step
        # CPU decode: a block as one C++ call where cpu_decode.py made one for it (the same ops, bit for bit, as the
        # "auto" kernels; another kernels.BACKEND runs the modules)
        fused = (self.decode_layers if self.decode_layers is not None and meta.is_decode and kernels.BACKEND == "auto"
                 else None)
        for i, (layer, rotary, kv) in enumerate(zip(self.model.layers, self.layer_rotaries, kv_caches)):
            if rotary not in tables:
                tables[rotary] = rotary.cos_sin(positions, x.dtype)
            step = fused[i] if fused is not None and fused[i] is not None else layer
            x = step(x, *tables[rotary], meta, kv)
        return self.model.norm(x)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return self.model.embed_tokens(ids)
        rows = self.model.embed_tokens.num_embeddings  # this rank's: ids rank * rows .. (rank + 1) * rows - 1
        local = ids - self.tp.rank * rows
        outside = (local < 0) | (local >= rows)
        x = self.model.embed_tokens(local.masked_fill(outside, 0)).masked_fill(outside[:, None], 0)
        return summed(x, self.tp)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[B, vocab] fp32 logits of hidden [B, hidden]; tensor parallel, on rank 0 only (None on the others)."""
        logits = self.lm_head(hidden).float()
        if self.tp is not None and (logits := self.tp.gather_vocab(logits, self.vocab_size)) is None:
            return None
        if self.final_softcap is not None:  # in fp32, whatever the activation dtype
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits
