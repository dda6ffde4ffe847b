"""Phi-2: parallel attention and MLP on one LayerNorm, partial rotary, biases everywhere, GELU MLP, lm_head bias."""
from dataclasses import dataclass

import torch.nn as nn

from ..layers import Attention, CausalLM, ParallelBlock, Rotary, activation
from ..model_args import GGUF_BASE_NAMES, ModelArgs, common_gguf_fields, common_hf_fields, gguf_get

MODEL_TYPES = ("phi",)
HF_RENAMES = [(".self_attn.dense.", ".self_attn.o_proj."), ("model.final_layernorm.", "model.norm.")]

GGUF_ARCHITECTURES = ("phi2",)
GGUF_NAMES = {
    **GGUF_BASE_NAMES,
    # q, k and v are separate in files converted from Hugging Face checkpoints, fused (rows q | k | v) in files
    # converted from Microsoft's original ones
    "blk.{i}.attn_qkv": ("model.layers.{i}.self_attn.q_proj", "model.layers.{i}.self_attn.k_proj",
                         "model.layers.{i}.self_attn.v_proj"),
    "blk.{i}.ffn_up": "model.layers.{i}.mlp.fc1",
    "blk.{i}.ffn_down": "model.layers.{i}.mlp.fc2",
}
GGUF_PERMUTED_QK = False
GGUF_NORM_PLUS_ONE = False


@dataclass
class Phi2Args(ModelArgs):
    partial_rotary_factor: float = 0.5

    @classmethod
    def from_hf(cls, cfg: dict) -> "Phi2Args":
        if cfg.get("qk_layernorm"):
            raise ValueError("Phi config has qk_layernorm=true, which Phi-2 does not use and mistralrs does not support")
        return cls(**common_hf_fields(cfg, norm_eps_key="layer_norm_eps"),
                   partial_rotary_factor=cfg.get("partial_rotary_factor")
                   or (cfg.get("rope_parameters") or {}).get("partial_rotary_factor", 0.5))

    @classmethod
    def from_gguf(cls, md: dict, tensor_names: set[str]) -> "Phi2Args":
        fields = common_gguf_fields(md, norm_eps_key="attention.layer_norm_epsilon")
        rotary_dim = gguf_get(md, "rope.dimension_count", fields["head_dim"] // 2)
        return cls(**fields, hidden_act="gelu_new", partial_rotary_factor=rotary_dim / fields["head_dim"])


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(hidden, intermediate)
        self.fc2 = nn.Linear(intermediate, hidden)
        self.act = activation(act)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


Args = Phi2Args


def build(a: Phi2Args) -> CausalLM:
    blocks = [
        ParallelBlock(
            Attention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim,
                      qkv_bias=True, o_bias=True),
            MLP(a.hidden_size, a.intermediate_size, a.hidden_act),
            nn.LayerNorm(a.hidden_size, eps=a.norm_eps),
        )
        for _ in range(a.num_hidden_layers)
    ]
    rotary_dim = int(a.head_dim * a.partial_rotary_factor)
    return CausalLM(a.vocab_size, a.hidden_size, blocks, nn.LayerNorm(a.hidden_size, eps=a.norm_eps),
                    Rotary(rotary_dim, a.rope_theta, a.rope_scaling), lm_head_bias=True,
                    tie_word_embeddings=a.tie_word_embeddings)
