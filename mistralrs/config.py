"""Model hyperparameters: the fields every architecture shares, read from a Hugging Face config.json."""
import json
from dataclasses import dataclass
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


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def require(cfg: dict, key: str, where: str = "config.json"):
    if cfg.get(key) is None:
        raise ValueError(f"{where} has no {key!r}, which this architecture needs")
    return cfg[key]


def common_hf_fields(cfg: dict, *, norm_eps_key: str = "rms_norm_eps") -> dict:
    """The ModelArgs fields as Hugging Face configs spell them (head_dim defaults to hidden / heads)."""
    hidden, heads = require(cfg, "hidden_size"), require(cfg, "num_attention_heads")
    rope = cfg.get("rope_parameters") or {}
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
