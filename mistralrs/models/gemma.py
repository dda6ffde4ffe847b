"""Gemma 1, 2 and 3 (text): embeddings scaled by sqrt(hidden), RMSNorm with a (1 + w) weight, GeGLU MLP, explicit
head_dim, tied lm_head.

Gemma 2 adds a norm after attention and one after the MLP, the query scale query_pre_attn_scalar^-0.5, tanh
soft-capped attention scores and final logits, and a sliding window on every other layer. Gemma 3 drops the soft
caps, normalizes each head of q and k (RMSNorm, 1 + w), and has five sliding-window layers for each global one, the
sliding ones with their own rope base."""
from dataclasses import dataclass

from torch import nn

from ..layers import Attention, CausalLM, GatedMLP, PreNormBlock, RMSNorm, Rotary, summed
from ..model_args import (
    GGUF_BASE_NAMES,
    GGUF_GATED_MLP_NAMES,
    ModelArgs,
    common_gguf_fields,
    common_hf_fields,
    gguf_get,
)

# gemma3 is the image-text model: its text model sits under language_model.model (the hub's layout) or
# model.language_model (transformers 5's); load/safetensors.py skips the vision tower.
MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma3")
HF_RENAMES = [("language_model.model.", "model."), ("model.language_model.", "model."),
              ("language_model.lm_head.", "lm_head.")]

# llama.cpp's converter stores every Gemma norm weight (q_norm and k_norm too) as 1 + w and leaves out `output`
# (tied to token_embd).
GGUF_ARCHITECTURES = ("gemma", "gemma2", "gemma3")
GGUF_NAMES = {
    **GGUF_BASE_NAMES,
    **GGUF_GATED_MLP_NAMES,
    # ffn_norm is the norm before the MLP in every Gemma: Hugging Face's post_attention_layernorm in Gemma 1, its
    # pre_feedforward_layernorm in Gemma 2 and 3, where post_attention_layernorm is the norm after attention.
    "blk.{i}.ffn_norm": {"gemma": "model.layers.{i}.post_attention_layernorm",
                         "gemma2": "model.layers.{i}.pre_feedforward_layernorm",
                         "gemma3": "model.layers.{i}.pre_feedforward_layernorm"},
    "blk.{i}.post_attention_norm": "model.layers.{i}.post_attention_layernorm",
    "blk.{i}.post_ffw_norm": "model.layers.{i}.post_feedforward_layernorm",
    "blk.{i}.attn_q_norm": "model.layers.{i}.self_attn.q_norm",
    "blk.{i}.attn_k_norm": "model.layers.{i}.self_attn.k_norm",
}
GGUF_PERMUTED_QK = False
GGUF_NORM_PLUS_ONE = True

SLIDING, FULL = "sliding_attention", "full_attention"
# transformers' Gemma2Config and Gemma3TextConfig defaults: the hub's Gemma 3 image-text configs leave most keys out.
GEMMA2_DEFAULTS = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
                       rms_norm_eps=1e-6, tie_word_embeddings=True, query_pre_attn_scalar=256,
                       sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
GEMMA3_DEFAULTS = {**GEMMA2_DEFAULTS, "vocab_size": 262208, "max_position_embeddings": 131072,
                   "sliding_window_pattern": 6, "attn_logit_softcapping": None, "final_logit_softcapping": None}
GEMMA3_ROPE_THETA, GEMMA3_ROPE_LOCAL_THETA = 1e6, 10000.0


@dataclass
class GemmaArgs(ModelArgs):
    sandwich_norms: bool = False  # Gemma 2 and 3: norms before and after attention and MLP
    qk_norm: bool = False  # Gemma 3
    query_pre_attn_scalar: float | None = None  # queries scaled by its ^-0.5; None: head_dim
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    layer_types: list[str] | None = None  # SLIDING or FULL per layer; None: all FULL
    rope_local_theta: float | None = None  # the sliding layers' rope base (Gemma 3); None: rope_theta

    @classmethod
    def from_hf(cls, cfg: dict) -> "GemmaArgs":
        kind = cfg.get("model_type")
        if kind == "gemma3":
            cfg = {**cfg.get("text_config", {}), "tie_word_embeddings": cfg.get("tie_word_embeddings", True)}
        if kind != "gemma":
            cfg = {**(GEMMA2_DEFAULTS if kind == "gemma2" else GEMMA3_DEFAULTS), **cfg}
        if cfg.get("use_bidirectional_attention"):
            raise ValueError("config.json has use_bidirectional_attention (an embedding model such as "
                             "EmbeddingGemma), which GemmaLoader does not run")
        fields = common_hf_fields(cfg)
        # Gemma's first configs said hidden_act "gelu" but the model was trained with the tanh approximation;
        # `hidden_activation` is the field that says what to run.
        fields["hidden_act"] = cfg.get("hidden_activation") or "gelu_pytorch_tanh"
        fields["tie_word_embeddings"] = cfg.get("tie_word_embeddings", True)
        if kind == "gemma":
            return cls(**fields)
        args = cls(**fields, sandwich_norms=True, query_pre_attn_scalar=cfg["query_pre_attn_scalar"],
                   final_logit_softcapping=cfg["final_logit_softcapping"], sliding_window=cfg["sliding_window"],
                   layer_types=_hf_layer_types(cfg, fields["num_hidden_layers"], 2 if kind == "gemma2" else None))
        if kind == "gemma2":
            args.attn_logit_softcapping = cfg["attn_logit_softcapping"]
        else:  # transformers' and llama.cpp's Gemma 3 ignore attn_logit_softcapping, so we do too
            args.qk_norm = True
            args.rope_theta, args.rope_scaling, args.rope_local_theta = _gemma3_rope(cfg)
        return args

    @classmethod
    def from_gguf(cls, md: dict, tensor_names: set[str]) -> "GemmaArgs":
        arch, fields = md["general.architecture"], common_gguf_fields(md)
        args = cls(**fields, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True)
        if arch == "gemma":
            return args
        # llama.cpp fixes these per architecture: a sliding window on every other layer (gemma2) or on five of
        # six (gemma3), the sliding layers' rope base (gemma3: 10000, unless the file has rope.freq_base_swa), and
        # the query scale 1/sqrt(head_dim), but 1/sqrt(hidden / heads) for the 27B models (46 and 62 layers).
        n, gemma2 = args.num_hidden_layers, arch == "gemma2"
        pattern, big = (2, n == 46) if gemma2 else (6, n == 62)
        args.sandwich_norms, args.qk_norm = True, not gemma2
        args.query_pre_attn_scalar = args.hidden_size // args.num_attention_heads if big else args.head_dim
        args.sliding_window = gguf_get(md, "attention.sliding_window", 4096 if gemma2 else None)
        if args.sliding_window is not None:
            args.layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(n)]
        if gemma2:
            args.attn_logit_softcapping = gguf_get(md, "attn_logit_softcapping", 50.0)
            args.final_logit_softcapping = gguf_get(md, "final_logit_softcapping", 30.0)
        else:
            args.final_logit_softcapping = gguf_get(md, "final_logit_softcapping")
            args.rope_local_theta = gguf_get(md, "rope.freq_base_swa", 10000.0)
        return args


Args = GemmaArgs


def _hf_layer_types(cfg: dict, n: int, pattern: int | None) -> list[str]:
    """SLIDING or FULL per layer: config.json's layer_types, else one FULL layer in each `pattern` (Gemma 3: its
    sliding_window_pattern), the last."""
    pattern = pattern or cfg["sliding_window_pattern"]
    types = cfg.get("layer_types") or [SLIDING if (i + 1) % pattern else FULL for i in range(n)]
    if len(types) != n or not set(types) <= {SLIDING, FULL}:
        raise ValueError(f"config.json layer_types must be {n} of {SLIDING!r} / {FULL!r}, got {types}")
    return types


def _gemma3_rope(cfg: dict) -> tuple[float, dict | None, float]:
    """(global rope base, global rope scaling, local rope base) from transformers 5's per-layer-type
    rope_parameters or the older rope_theta / rope_scaling / rope_local_base_freq."""
    rope = cfg.get("rope_parameters") or {}
    full = rope.get(FULL) or {**(cfg.get("rope_scaling") or {}), "rope_theta": cfg.get("rope_theta", GEMMA3_ROPE_THETA)}
    local = rope.get(SLIDING) or {"rope_theta": cfg.get("rope_local_base_freq", GEMMA3_ROPE_LOCAL_THETA)}
    if local.get("rope_type", "default") != "default":
        raise ValueError(f"config.json: rope scaling on the sliding-window layers ({local}) is not supported")
    scaled = full.get("rope_type", full.get("type", "default")) != "default"
    return (full.get("rope_theta", GEMMA3_ROPE_THETA), full if scaled else None,
            local.get("rope_theta", GEMMA3_ROPE_LOCAL_THETA))


class SandwichBlock(nn.Module):
    """x + post_attention_layernorm(attn(input_layernorm(x))), then
    h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h))): Gemma 2 and 3."""
    tp = None  # tensor parallel: attn and mlp give partial sums, added up before their norms (tensor_parallel/)

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, hidden: int, eps: float):
        super().__init__()
        self.self_attn, self.mlp = self_attn, mlp
        self.input_layernorm = RMSNorm(hidden, eps, unit_offset=True)
        self.post_attention_layernorm = RMSNorm(hidden, eps, unit_offset=True)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps, unit_offset=True)
        self.post_feedforward_layernorm = RMSNorm(hidden, eps, unit_offset=True)

    def forward(self, x, cos, sin, meta, kv_cache):
        a = summed(self.self_attn(self.input_layernorm(x), cos, sin, meta, kv_cache), self.tp)
        h = x + self.post_attention_layernorm(a)
        return h + self.post_feedforward_layernorm(summed(self.mlp(self.pre_feedforward_layernorm(h)), self.tp))


def build(a: GemmaArgs) -> CausalLM:
    def norm(dim: int) -> RMSNorm:
        return RMSNorm(dim, a.norm_eps, unit_offset=True)

    rotary = Rotary(a.head_dim, a.rope_theta, a.rope_scaling)
    local = Rotary(a.head_dim, a.rope_local_theta) if a.rope_local_theta is not None else rotary
    blocks, rotaries = [], []
    for kind in a.layer_types or [FULL] * a.num_hidden_layers:
        sliding = kind == SLIDING
        attn = Attention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim,
                         sliding_window=a.sliding_window if sliding else None, softcap=a.attn_logit_softcapping,
                         scale=(a.query_pre_attn_scalar or a.head_dim) ** -0.5,
                         q_norm=norm(a.head_dim) if a.qk_norm else None, k_norm=norm(a.head_dim) if a.qk_norm else None)
        mlp = GatedMLP(a.hidden_size, a.intermediate_size, a.hidden_act)
        blocks.append(SandwichBlock(attn, mlp, a.hidden_size, a.norm_eps) if a.sandwich_norms
                      else PreNormBlock(attn, mlp, norm(a.hidden_size), norm(a.hidden_size)))
        rotaries.append(local if sliding else rotary)
    return CausalLM(a.vocab_size, a.hidden_size, blocks, norm(a.hidden_size), rotary,
                    embed_scale=a.hidden_size ** 0.5, tie_word_embeddings=a.tie_word_embeddings,
                    layer_rotaries=rotaries, final_softcap=a.final_logit_softcapping)
