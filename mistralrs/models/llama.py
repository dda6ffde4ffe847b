"""Llama: pre-norm blocks, RMSNorm, rotary (optionally llama3-scaled), GQA attention, SwiGLU MLP."""
from dataclasses import dataclass

from ..config import ModelArgs, common_gguf_fields, common_hf_fields, gguf_no_experts
from ..layers import Attention, CausalLM, GatedMLP, PreNormBlock, RMSNorm, Rotary

MODEL_TYPES = ("llama",)
HF_RENAMES: list[tuple[str, str]] = []  # the checkpoint names are ours

GGUF_ARCHITECTURES = ("llama",)
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
class LlamaArgs(ModelArgs):
    attention_bias: bool = False

    @classmethod
    def from_hf(cls, cfg: dict) -> "LlamaArgs":
        return cls(**common_hf_fields(cfg), attention_bias=cfg.get("attention_bias", False))

    @classmethod
    def from_gguf(cls, md: dict) -> "LlamaArgs":
        gguf_no_experts(md)
        return cls(**common_gguf_fields(md))


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
