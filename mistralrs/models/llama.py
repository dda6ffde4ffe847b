"""Llama: pre-norm blocks, RMSNorm, rotary (optionally llama3-scaled), GQA attention, SwiGLU MLP."""
from dataclasses import dataclass

from ..layers import Attention, CausalLM, GatedMLP, PreNormBlock, RMSNorm, Rotary
from ..model_args import (
    GGUF_BASE_NAMES,
    GGUF_GATED_MLP_NAMES,
    ModelArgs,
    common_gguf_fields,
    common_hf_fields,
    gguf_no_experts,
)

MODEL_TYPES = ("llama",)
HF_RENAMES: list[tuple[str, str]] = []  # the checkpoint names are ours

GGUF_ARCHITECTURES = ("llama",)
GGUF_NAMES = {**GGUF_BASE_NAMES, **GGUF_GATED_MLP_NAMES}
# llama.cpp's converter permutes the Q and K rows of "llama" models for its interleaved rotary: undone at load.
GGUF_PERMUTED_QK = True
GGUF_NORM_PLUS_ONE = False


@dataclass
class LlamaArgs(ModelArgs):
    attention_bias: bool = False

    @classmethod
    def from_hf(cls, cfg: dict) -> "LlamaArgs":
        return cls(**common_hf_fields(cfg), attention_bias=cfg.get("attention_bias", False))

    @classmethod
    def from_gguf(cls, md: dict, tensor_names: set[str]) -> "LlamaArgs":
        gguf_no_experts(md)
        return cls(**common_gguf_fields(md), attention_bias="blk.0.attn_q.bias" in tensor_names)


Args = LlamaArgs


def build(a: LlamaArgs) -> CausalLM:
    blocks = [
        PreNormBlock(
            Attention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim,
                      qkv_bias=a.attention_bias, o_bias=a.attention_bias),
            GatedMLP(a.hidden_size, a.intermediate_size, a.hidden_act),
            RMSNorm(a.hidden_size, a.norm_eps),
            RMSNorm(a.hidden_size, a.norm_eps),
        )
        for _ in range(a.num_hidden_layers)
    ]
    return CausalLM(a.vocab_size, a.hidden_size, blocks, RMSNorm(a.hidden_size, a.norm_eps),
                    Rotary(a.head_dim, a.rope_theta, a.rope_scaling), tie_word_embeddings=a.tie_word_embeddings)
