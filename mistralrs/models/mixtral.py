"""Mixtral: Mistral's attention with a sparse mixture of SwiGLU experts (top-k routing) in place of the MLP."""
from dataclasses import dataclass

from ..config import ModelArgs, common_hf_fields, require
from ..layers import Attention, CausalLM, PreNormBlock, RMSNorm, Rotary, SparseMoE

MODEL_TYPES = ("mixtral",)
HF_RENAMES = [(".block_sparse_moe.", ".mlp.")]


@dataclass
class MixtralArgs(ModelArgs):
    num_local_experts: int = 8
    num_experts_per_tok: int = 2

    @classmethod
    def from_hf(cls, cfg: dict) -> "MixtralArgs":
        return cls(**common_hf_fields(cfg), sliding_window=cfg.get("sliding_window"),
                   num_local_experts=require(cfg, "num_local_experts"),
                   num_experts_per_tok=require(cfg, "num_experts_per_tok"))


Args = MixtralArgs


def build(a: MixtralArgs) -> CausalLM:
    blocks = [
        PreNormBlock(
            Attention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim,
                      sliding_window=a.sliding_window),
            SparseMoE(a.hidden_size, a.intermediate_size, a.num_local_experts, a.num_experts_per_tok, a.hidden_act),
            RMSNorm(a.hidden_size, a.norm_eps),
            RMSNorm(a.hidden_size, a.norm_eps),
        )
        for _ in range(a.num_hidden_layers)
    ]
    return CausalLM(a.vocab_size, a.hidden_size, blocks, RMSNorm(a.hidden_size, a.norm_eps),
                    Rotary(a.head_dim, a.rope_theta, a.rope_scaling), tie_word_embeddings=a.tie_word_embeddings)
