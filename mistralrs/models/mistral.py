"""Mistral: Llama's graph plus sliding-window attention (each token sees the last `sliding_window` positions)."""
from dataclasses import dataclass

from ..layers import Attention, CausalLM, GatedMLP, PreNormBlock, RMSNorm, Rotary
from ..model_args import (
    GGUF_BASE_NAMES,
    GGUF_GATED_MLP_NAMES,
    ModelArgs,
    common_gguf_fields,
    common_hf_fields,
    gguf_get,
    gguf_no_experts,
)

MODEL_TYPES = ("mistral",)
HF_RENAMES: list[tuple[str, str]] = []

# llama.cpp writes Mistral as a "llama" model, without its sliding window.
GGUF_ARCHITECTURES = ("llama",)
GGUF_NAMES = {**GGUF_BASE_NAMES, **GGUF_GATED_MLP_NAMES}
# llama.cpp's converter permutes the Q and K rows of "llama" models for its interleaved rotary: undone at load.
GGUF_PERMUTED_QK = True
GGUF_NORM_PLUS_ONE = False


@dataclass
class MistralArgs(ModelArgs):
    @classmethod
    def from_hf(cls, cfg: dict) -> "MistralArgs":
        return cls(**common_hf_fields(cfg), sliding_window=cfg.get("sliding_window"))

    @classmethod
    def from_gguf(cls, md: dict, tensor_names: set[str]) -> "MistralArgs":
        gguf_no_experts(md)
        return cls(**common_gguf_fields(md), sliding_window=gguf_get(md, "attention.sliding_window"))


Args = MistralArgs


def build(a: MistralArgs) -> CausalLM:
    blocks = [
        PreNormBlock(
            Attention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim,
                      sliding_window=a.sliding_window),
            GatedMLP(a.hidden_size, a.intermediate_size, a.hidden_act),
            RMSNorm(a.hidden_size, a.norm_eps),
            RMSNorm(a.hidden_size, a.norm_eps),
        )
        for _ in range(a.num_hidden_layers)
    ]
    return CausalLM(a.vocab_size, a.hidden_size, blocks, RMSNorm(a.hidden_size, a.norm_eps),
                    Rotary(a.head_dim, a.rope_theta, a.rope_scaling), tie_word_embeddings=a.tie_word_embeddings)
