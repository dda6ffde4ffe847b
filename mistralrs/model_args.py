"""Model hyperparameters: the fields every architecture shares, read from a Hugging Face config.json or from the
metadata of a GGUF file (llama.cpp's key names)."""
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    hidden_act: str = "silu"


# Sane bounds on the hyperparameters, about ten times the largest published models: a corrupt or hostile file must
# fail here, before a meta-device build of a million layers or an allocation of terabytes.
INT_BOUNDS = {
    "vocab_size": (1, 2**22), "hidden_size": (1, 2**17), "intermediate_size": (1, 2**20),
    "num_hidden_layers": (1, 1024), "num_attention_heads": (1, 2048), "num_key_value_heads": (1, 2048),
    "head_dim": (1, 4096), "max_position_embeddings": (1, 2**24), "sliding_window": (1, 2**24),
    "num_local_experts": (1, 1024), "num_experts_per_tok": (1, 1024),
}
FLOAT_BOUNDS = {"norm_eps": (0.0, 1.0), "rope_theta": (0.0, 1e12), "partial_rotary_factor": (0.0, 1.0)}


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise ValueError(f"{path} nests JSON too deeply") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got a {type(data).__name__}")
    return data


def require(cfg: dict, key: str, where: str = "config.json"):
    if cfg.get(key) is None:
        raise ValueError(f"{where} has no {key!r}, which this architecture needs")
    return cfg[key]


def _int(value, key: str, where: str, bounds: str | None = None) -> int:
    """An int field as a file gives it: a str "4096" or a float is refused, naming the key. bounds: the field
    whose INT_BOUNDS apply (default: key's own)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: {key!r} must be an integer, got {value!r}")
    lo, hi = INT_BOUNDS.get(bounds or key, (1, 2**31 - 1))
    if not lo <= value <= hi:
        raise ValueError(f"{where}: {key!r} must be in [{lo}, {hi}], got {value}")
    return value


def check_args(args: ModelArgs, where: str) -> None:
    """Every hyperparameter of any architecture's Args against its type and bounds (INT_BOUNDS, FLOAT_BOUNDS; other
    ints in [0, 2**31)), and the head layout; `where` names the file in the error."""
    for f in fields(args):
        value = getattr(args, f.name)
        if isinstance(f.default, bool) or f.name == "tie_word_embeddings":
            if not isinstance(value, bool):
                raise ValueError(f"{where}: {f.name!r} must be true or false, got {value!r}")
        elif f.name in INT_BOUNDS or f.type is int:
            if value is not None or f.name not in ("sliding_window",):
                _int(value, f.name, where)
        elif f.name in FLOAT_BOUNDS or f.type is float:
            lo, hi = FLOAT_BOUNDS.get(f.name, (-1e12, 1e12))
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and lo < value <= hi):
                raise ValueError(f"{where}: {f.name!r} must be a finite number in ({lo}, {hi}], got {value!r}")
        elif f.name == "rope_scaling" and value is not None:
            if not isinstance(value, dict):
                raise ValueError(f"{where}: 'rope_scaling' must be an object or null, got {value!r}")
            bad = {k: v for k, v in value.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and not (math.isfinite(v) and v > 0)}
            if bad:
                raise ValueError(f"{where}: rope_scaling values must be finite and positive, got {bad}")
        elif f.name == "hidden_act" and not isinstance(value, str):
            raise ValueError(f"{where}: 'hidden_act' must be a string, got {value!r}")
    if args.num_attention_heads % args.num_key_value_heads:
        raise ValueError(f"{where}: num_key_value_heads ({args.num_key_value_heads}) must divide "
                         f"num_attention_heads ({args.num_attention_heads})")
    if getattr(args, "num_experts_per_tok", 0) > getattr(args, "num_local_experts", 1 << 30):
        raise ValueError(f"{where}: num_experts_per_tok ({args.num_experts_per_tok}) is more than "
                         f"num_local_experts ({args.num_local_experts})")


def parameter_count(args: ModelArgs) -> int:
    """About how many weights the model has (embeddings, attention, MLP per expert; norms and biases left out)."""
    q, kv = args.num_attention_heads * args.head_dim, args.num_key_value_heads * args.head_dim
    attention = args.hidden_size * (2 * q + 2 * kv)
    mlp = 3 * args.hidden_size * args.intermediate_size * getattr(args, "num_local_experts", 1)
    embeddings = args.vocab_size * args.hidden_size * (1 if args.tie_word_embeddings else 2)
    return embeddings + args.num_hidden_layers * (attention + mlp)


def common_hf_fields(cfg: dict, *, norm_eps_key: str = "rms_norm_eps") -> dict:
    """The ModelArgs fields as Hugging Face configs spell them (head_dim defaults to hidden / heads)."""
    hidden = _int(require(cfg, "hidden_size"), "hidden_size", "config.json")
    heads = _int(require(cfg, "num_attention_heads"), "num_attention_heads", "config.json")
    rope = cfg.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"config.json: 'rope_parameters' must be an object, got {rope!r}")
    return dict(
        vocab_size=require(cfg, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=require(cfg, "intermediate_size"),
        num_hidden_layers=require(cfg, "num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or hidden // heads,
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        norm_eps=cfg.get(norm_eps_key, 1e-6),
        rope_theta=cfg.get("rope_theta", rope.get("rope_theta", 10000.0)),
        rope_scaling=cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        hidden_act=cfg.get("hidden_act", "silu"),
    )


# llama.cpp's tensor names -> ours ({i} layer); the .weight / .bias suffix carries over. Every architecture has
# these; each model file's GGUF_NAMES adds the names of its MLP.
GGUF_BASE_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "blk.{i}.attn_norm": "model.layers.{i}.input_layernorm",
    "blk.{i}.attn_q": "model.layers.{i}.self_attn.q_proj",
    "blk.{i}.attn_k": "model.layers.{i}.self_attn.k_proj",
    "blk.{i}.attn_v": "model.layers.{i}.self_attn.v_proj",
    "blk.{i}.attn_output": "model.layers.{i}.self_attn.o_proj",
}
# The pre-norm block's gated MLP (Llama, Mistral, Gemma).
GGUF_GATED_MLP_NAMES = {
    "blk.{i}.ffn_norm": "model.layers.{i}.post_attention_layernorm",
    "blk.{i}.ffn_gate": "model.layers.{i}.mlp.gate_proj",
    "blk.{i}.ffn_up": "model.layers.{i}.mlp.up_proj",
    "blk.{i}.ffn_down": "model.layers.{i}.mlp.down_proj",
}


GGUF = "GGUF metadata"


def gguf_get(md: dict, key: str, default=None):
    """`{general.architecture}.key` of GGUF metadata."""
    return md.get(f"{md.get('general.architecture')}.{key}", default)


def gguf_require(md: dict, key: str):
    return require(md, f"{md.get('general.architecture')}.{key}", GGUF)


def _gguf_rope_scaling(md: dict) -> dict | None:
    kind = gguf_get(md, "rope.scaling.type", "none")
    factor = gguf_get(md, "rope.scaling.factor") or gguf_get(md, "rope.scale_linear")
    if kind == "linear" or (kind == "none" and factor not in (None, 1.0)):
        return {"rope_type": "linear", "factor": factor}
    if kind != "none":
        raise ValueError(f"{GGUF}: rope scaling type {kind!r} is not supported; supported: none, linear "
                         f"(Llama 3 scaling comes as the rope_freqs tensor)")
    return None


def common_gguf_fields(md: dict, *, norm_eps_key: str = "attention.layer_norm_rms_epsilon") -> dict:
    """The ModelArgs fields as llama.cpp's GGUF metadata spells them (`llama.embedding_length`, ...); an integer
    field of the wrong type or out of bounds is a ValueError naming its GGUF key."""
    require(md, "general.architecture", GGUF)
    arch = md.get("general.architecture")

    def integer(key, field, default=None):
        value = gguf_require(md, key) if default is None else gguf_get(md, key, default)
        if isinstance(value, list):
            raise ValueError(f"{GGUF}: per-layer values of {arch}.{key} are not supported")
        return _int(value, f"{arch}.{key}", GGUF, bounds=field)

    hidden, heads = integer("embedding_length", "hidden_size"), integer("attention.head_count", "num_attention_heads")
    return dict(
        vocab_size=integer("vocab_size", "vocab_size"),
        hidden_size=hidden,
        intermediate_size=integer("feed_forward_length", "intermediate_size"),
        num_hidden_layers=integer("block_count", "num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=integer("attention.head_count_kv", "num_key_value_heads", heads),
        head_dim=integer("attention.key_length", "head_dim", hidden // heads),
        max_position_embeddings=integer("context_length", "max_position_embeddings", 4096),
        norm_eps=gguf_get(md, norm_eps_key, 1e-5),
        rope_theta=gguf_get(md, "rope.freq_base", 10000.0),
        rope_scaling=_gguf_rope_scaling(md),
    )


def gguf_no_experts(md: dict) -> None:
    """A llama-architecture GGUF with experts is a Mixtral."""
    if gguf_get(md, "expert_count", 0):
        raise ValueError(f"{GGUF}: this is a mixture-of-experts model ({md['general.architecture']}.expert_count = "
                         f"{gguf_get(md, 'expert_count')}); load it with MixtralLoader")
