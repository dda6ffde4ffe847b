"""The CPU decode path: each decoder block of a decode step as one C++ call (kernels/decoder_cpu.cpp, the same ops
as the block's modules, bit for bit), attached at load as the model's `decode_layers`.

A block gets one where every piece of it has a CPU kernel: an Attention and a GatedMLP (silu or gelu) whose
projections are QuantLinear or CpuLinear, float32 RMSNorms, one rank (no tensor parallel). Any other block (X-LoRA
adapters, experts, Phi-2's LayerNorm, bf16 weights) runs module by module, as do prefill steps."""
import torch
import torch.nn.functional as F
from torch import nn

from .layers import ACTIVATIONS, Attention, AttentionMetadata, CausalLM, GatedMLP, RMSNorm
from .linears import CpuLinear, QuantLinear

ACT_CODES = {F.silu: 0, F.gelu: 2, **{ACTIVATIONS[n]: 1 for n in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")}}


class DecodeLayer:
    """A block's decode step: (x [B, C], cos, sin [B, 1, r], meta, (k_cache, v_cache)) -> x after the block."""

    def __init__(self, layer):
        self.layer = layer  # cpu_ext.ext.DecoderLayer

    def __call__(self, x, cos, sin, meta: AttentionMetadata, kv_cache) -> torch.Tensor:
        return self.layer.forward(x, cos, sin, kv_cache[0], kv_cache[1], meta.slot_mapping, meta.block_tables,
                                  meta.context_lens)


def add_decode_layers(model: nn.Module) -> nn.Module:
    """Set model.decode_layers (a DecodeLayer or None per block) on a CPU CausalLM whose blocks allow one."""
    if not isinstance(model, CausalLM) or model.tp is not None or model.model.norm.weight.device.type != "cpu":
        return model
    from .kernels import cpu_ext  # built on first import: CPU models only
    if cpu_ext.ext is not None:
        layers = [decode_layer(block, cpu_ext.ext) for block in model.model.layers]
        model.decode_layers = layers if any(layers) else None
    return model


def _proj(linear: nn.Module, ext):
    if type(linear) is QuantLinear:
        weight, qtype = linear.qweight, int(linear.qtype)
    elif type(linear) is CpuLinear and linear.weight.dtype == torch.float32:
        weight, qtype = linear.weight, -1
    else:
        return None
    bias = None if linear.bias is None else linear.bias.detach()
    return ext.Proj(weight.detach(), qtype, linear.out_features, linear.in_features, bias)


def _projs(fused, separate: list[nn.Module], ext):
    projs = [_proj(fused.proj, ext)] if fused is not None else [_proj(p, ext) for p in separate]
    return projs if all(p is not None for p in projs) else None


def _norm(m: nn.Module | None):
    ok = type(m) is RMSNorm and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"
    return m.weight.detach() if ok else None


def decode_layer(block: nn.Module, ext) -> DecodeLayer | None:
    """block's DecodeLayer (ext: the compiled CPU kernels), or None where it has a piece they do not run."""
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    if type(attn) is not Attention or type(mlp) is not GatedMLP or getattr(block, "tp", None) is not None:
        return None
    sandwich = hasattr(block, "pre_feedforward_layernorm")  # Gemma 2 / 3 (models/gemma.py's SandwichBlock)
    norms = ([block.input_layernorm, block.post_attention_layernorm, block.pre_feedforward_layernorm,
              block.post_feedforward_layernorm] if sandwich
             else [block.input_layernorm, None, block.post_attention_layernorm, None])
    norms += [attn.q_norm, attn.k_norm]  # Gemma 3's, else None
    present = [m for m in norms if m is not None]
    weights = [None if m is None else _norm(m) for m in norms]
    qkv = _projs(attn.qkv, [attn.q_proj, attn.k_proj, attn.v_proj], ext)
    gate_up = _projs(mlp.gate_up, [mlp.gate_proj, mlp.up_proj], ext)
    o, down = _proj(attn.o_proj, ext), _proj(mlp.down_proj, ext)
    if (any(m is not None and w is None for m, w in zip(norms, weights))
            or len({(m.eps, m.unit_offset) for m in present}) != 1
            or None in (qkv, gate_up, o, down) or mlp.act not in ACT_CODES):
        return None
    in_norm, post_attn, pre_ffn, post_ffn, q_norm, k_norm = weights
    return DecodeLayer(ext.DecoderLayer(
        qkv=qkv, o=o, gate_up=gate_up, down=down, in_norm=in_norm, post_attn_norm=post_attn, pre_ffn_norm=pre_ffn,
        post_ffn_norm=post_ffn, q_norm=q_norm, k_norm=k_norm, eps=present[0].eps, unit_offset=present[0].unit_offset,
        H=attn.n_heads, KVH=attn.n_kv_heads, D=attn.head_dim, scale=attn.scale, window=attn.sliding_window or 0,
        softcap=attn.softcap or 0.0, act=ACT_CODES[mlp.act]))
