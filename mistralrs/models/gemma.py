"""Gemma: embeddings scaled by sqrt(hidden), RMSNorm with a (1 + w) weight, GeGLU MLP, explicit head_dim, tied lm_head."""
from dataclasses import dataclass

from ..config import ModelArgs, common_gguf_fields, common_hf_fields
from ..layers import Attention, CausalLM, GatedMLP, PreNormBlock, RMSNorm, Rotary

MODEL_TYPES = ("gemma",)
HF_RENAMES: list[tuple[str, str]] = []

# llama.cpp's converter stores Gemma's norm weights as 1 + w and leaves out `output` (tied to token_embd).
GGUF_ARCHITECTURES = ("gemma",)
# llama.cpp's tensor names -> ours ({i} layer); the .weight / .bias suffix carries over.
GGUF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "blk.{i}.attn_norm": "model.layers.{i}.input_layernorm",
    "blk.{i}.attn_q": "model.layers.{i}.self_attn.q_proj",
    "blk.{i}.attn_k": "model.layers.{i}.self_attn.k_proj",
    "blk.{i}.attn_v": "model.layers.{i}.self_attn.v_proj",
    "blk.{i}.attn_output": "model.layers.{i}.self_attn.o_proj",
    "blk.{i}.ffn_norm": "model.layers.{i}.post_attention_layernorm",
    "blk.{i}.ffn_gate": "model.layers.{i}.mlp.gate_proj",
    "blk.{i}.ffn_up": "model.layers.{i}.mlp.up_proj",
    "blk.{i}.ffn_down": "model.layers.{i}.mlp.down_proj",
}


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
    def from_gguf(cls, md: dict) -> "GemmaArgs":
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
