"""Mixtral: Mistral's attention with a sparse mixture of SwiGLU experts (top-k routing) in place of the MLP."""
from dataclasses import dataclass

from ..layers import Attention, CausalLM, PreNormBlock, RMSNorm, Rotary, SparseMoE
from ..model_args import (
    GGUF_BASE_NAMES,
    ModelArgs,
    common_gguf_fields,
    common_hf_fields,
    gguf_get,
    gguf_require,
    require,
)

MODEL_TYPES = ("mixtral",)
HF_RENAMES = [(".block_sparse_moe.", ".mlp.")]

# llama.cpp writes Mixtral as a "llama" model with llama.expert_count set.
GGUF_ARCHITECTURES = ("llama",)
# llama.cpp's tensor names -> ours ({i} layer, {e} expert); the .weight / .bias suffix carries over.
GGUF_NAMES = {
    **GGUF_BASE_NAMES,
    "blk.{i}.ffn_norm": "model.layers.{i}.post_attention_layernorm",
    "blk.{i}.ffn_gate_inp": "model.layers.{i}.mlp.gate",
    # the experts stacked in one [E, ...] tensor each ...
    "blk.{i}.ffn_gate_exps": "model.layers.{i}.mlp.experts.{e}.w1",
    "blk.{i}.ffn_down_exps": "model.layers.{i}.mlp.experts.{e}.w2",
    "blk.{i}.ffn_up_exps": "model.layers.{i}.mlp.experts.{e}.w3",
    # ... or, in files from before April 2024, one tensor per expert
    "blk.{i}.ffn_gate.{e}": "model.layers.{i}.mlp.experts.{e}.w1",
    "blk.{i}.ffn_down.{e}": "model.layers.{i}.mlp.experts.{e}.w2",
    "blk.{i}.ffn_up.{e}": "model.layers.{i}.mlp.experts.{e}.w3",
}
# As for Llama, the converter permutes Q and K rows (undone at load).
GGUF_PERMUTED_QK = True
GGUF_NORM_PLUS_ONE = False


@dataclass
class MixtralArgs(ModelArgs):
    num_local_experts: int = 8
    num_experts_per_tok: int = 2

    @classmethod
    def from_hf(cls, cfg: dict) -> "MixtralArgs":
        return cls(**common_hf_fields(cfg), sliding_window=cfg.get("sliding_window"),
                   num_local_experts=require(cfg, "num_local_experts"),
                   num_experts_per_tok=require(cfg, "num_experts_per_tok"))

    @classmethod
    def from_gguf(cls, md: dict, tensor_names: set[str]) -> "MixtralArgs":
        return cls(**common_gguf_fields(md), sliding_window=gguf_get(md, "attention.sliding_window"),
                   num_local_experts=gguf_require(md, "expert_count"),
                   num_experts_per_tok=gguf_require(md, "expert_used_count"))


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
