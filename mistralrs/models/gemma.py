"""Gemma: embeddings scaled by sqrt(hidden), RMSNorm with a (1 + w) weight, GeGLU MLP, explicit head_dim, tied lm_head."""
from dataclasses import dataclass

from ..layers import Attention, CausalLM, GatedMLP, PreNormBlock, RMSNorm, Rotary
from ..model_args import GGUF_BASE_NAMES, GGUF_GATED_MLP_NAMES, ModelArgs, common_gguf_fields, common_hf_fields

MODEL_TYPES = ("gemma",)
HF_RENAMES: list[tuple[str, str]] = []

# llama.cpp's converter stores Gemma's norm weights as 1 + w and leaves out `output` (tied to token_embd).
GGUF_ARCHITECTURES = ("gemma",)
GGUF_NAMES = {**GGUF_BASE_NAMES, **GGUF_GATED_MLP_NAMES}
GGUF_PERMUTED_QK = False
GGUF_NORM_PLUS_ONE = True


@dataclass
class GemmaArgs(ModelArgs):
    @classmethod
    def from_hf(cls, cfg: dict) -> "GemmaArgs":
        fields = common_hf_fields(cfg)
        # Gemma's first configs said hidden_act "gelu" but the model was trained with the tanh approximation;
        # `hidden_activation` is the field that says what to run.
        fields["hidden_act"] = cfg.get("hidden_activation") or "gelu_pytorch_tanh"
        fields["tie_word_embeddings"] = cfg.get("tie_word_embeddings", True)
        return cls(**fields)

    @classmethod
    def from_gguf(cls, md: dict, tensor_names: set[str]) -> "GemmaArgs":
        return cls(**common_gguf_fields(md), hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True)


Args = GemmaArgs


def build(a: GemmaArgs) -> CausalLM:
    blocks = [
        PreNormBlock(
            Attention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim),
            GatedMLP(a.hidden_size, a.intermediate_size, a.hidden_act),
            RMSNorm(a.hidden_size, a.norm_eps, unit_offset=True),
            RMSNorm(a.hidden_size, a.norm_eps, unit_offset=True),
        )
        for _ in range(a.num_hidden_layers)
    ]
    return CausalLM(a.vocab_size, a.hidden_size, blocks, RMSNorm(a.hidden_size, a.norm_eps, unit_offset=True),
                    Rotary(a.head_dim, a.rope_theta, a.rope_scaling), embed_scale=a.hidden_size ** 0.5,
                    tie_word_embeddings=a.tie_word_embeddings)
