"""Write tiny random-weight Hugging Face checkpoints laid out exactly like real hub repos.

No transformers here on purpose: the tests load these files with transformers, and that only checks
something if transformers played no part in writing them.

    python tools/make_tiny_models.py OUT_DIR [--arch llama ...] [--sharded]
"""

import argparse
import json
import math
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ARCHS = ("llama", "mistral", "gemma", "gemma2", "gemma3", "mixtral", "phi2")
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
VOCAB_SIZE = 1024
MAX_POSITIONS = 512

# Zephyr-style turns; it opens with bos_token as Llama-2 and Mistral templates do, so a runner must
# not add a second BOS when it tokenizes the rendered prompt.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['user', 'assistant', 'system'] %}"
    "{{ raise_exception('Conversation roles must be user, assistant or system, got ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def _corpus() -> list[str]:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return [topics[key] for key in sorted(topics)]


def _train_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # Same BOS handling as Llama's tokenizer.json.
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0",
        pair="<s>:0 $A:0 <s>:1 $B:1",
        special_tokens=[("<s>", BOS_ID)],
    )
    return tok


def _tokenizer_config() -> dict:
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    added = {str(i): {"content": t, **flags} for i, t in enumerate(SPECIAL_TOKENS)}
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITIONS,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def build_tokenizer(out_dir: Path) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer()
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [UNK_ID, BOS_ID, EOS_ID]
    tok.save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config())
    _write_json(out_dir / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _common_config(arch_class: str, model_type: str, vocab_size: int) -> dict:
    return {
        "architectures": [arch_class],
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": MAX_POSITIONS,
        "initializer_range": 0.02,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def make_config(arch: str, vocab_size: int) -> dict:
    if arch == "llama":
        cfg = _common_config("LlamaForCausalLM", "llama", vocab_size)
        # Llama-3.x style: factor 8 over an original 64-token context; with head_dim 16 and theta 1e4 the
        # wavelengths straddle both thresholds (16 and 64), so all three branches of llama3 scaling run.
        rope_scaling = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        cfg.update(
            num_key_value_heads=2, head_dim=16, hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10000.0,
            rope_scaling=rope_scaling, attention_bias=False, attention_dropout=0.0, mlp_bias=False, pretraining_tp=1,
        )
    elif arch == "mistral":
        cfg = _common_config("MistralForCausalLM", "mistral", vocab_size)
        cfg.update(
            num_key_value_heads=2, head_dim=16, hidden_act="silu", rms_norm_eps=1e-5, rope_theta=1e6,
            sliding_window=8, attention_dropout=0.0,
        )
    elif arch == "gemma":
        cfg = _common_config("GemmaForCausalLM", "gemma", vocab_size)
        # Real Gemma configs carry both keys; transformers 5 reads hidden_act, older code hidden_activation.
        cfg.update(
            num_key_value_heads=1, head_dim=32, hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
            rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=True, pad_token_id=0,
            attention_bias=False, attention_dropout=0.0,
        )
    elif arch == "gemma2":
        # Layers alternate sliding (window 8, shorter than the tests' prompts) and global; the attention soft cap low
        # enough to bend these tiny models' scores. query_pre_attn_scalar = head_dim, as llama.cpp assumes.
        cfg = _common_config("Gemma2ForCausalLM", "gemma2", vocab_size)
        cfg.update(
            num_hidden_layers=3, num_key_value_heads=2, head_dim=32, hidden_activation="gelu_pytorch_tanh",
            rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True, pad_token_id=0, attention_bias=False,
            attention_dropout=0.0, query_pre_attn_scalar=32, sliding_window=8, attn_logit_softcapping=10.0,
            final_logit_softcapping=30.0,
        )
    elif arch == "gemma3":
        # The hub's Gemma 3 text config keys (gemma-3-1b): five sliding layers (window 8) per global one, local rope
        # base 10000, global base 1e6 with linear scaling (as the 4B and larger have), QK-norm, no soft caps.
        cfg = _common_config("Gemma3ForCausalLM", "gemma3_text", vocab_size)
        cfg.update(
            num_hidden_layers=7, num_key_value_heads=2, head_dim=32, hidden_activation="gelu_pytorch_tanh",
            rms_norm_eps=1e-6, rope_theta=1e6, rope_local_base_freq=10000.0,
            rope_scaling={"rope_type": "linear", "factor": 2.0}, tie_word_embeddings=True, pad_token_id=0,
            attention_bias=False, attention_dropout=0.0, query_pre_attn_scalar=32, sliding_window=8,
            sliding_window_pattern=6, attn_logit_softcapping=None, final_logit_softcapping=None,
        )
    elif arch == "mixtral":
        cfg = _common_config("MixtralForCausalLM", "mixtral", vocab_size)
        cfg.update(
            num_key_value_heads=2, hidden_act="silu", rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None,
            num_local_experts=4, num_experts_per_tok=2, output_router_logits=False, router_aux_loss_coef=0.02,
            attention_dropout=0.0,
        )
    elif arch == "phi2":
        cfg = _common_config("PhiForCausalLM", "phi", vocab_size)
        cfg.update(
            num_key_value_heads=4, intermediate_size=256, hidden_act="gelu_new", layer_norm_eps=1e-5,
            rope_theta=10000.0, rope_scaling=None, partial_rotary_factor=0.5, qk_layernorm=False,
            resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
        )
    else:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    return cfg


def _shapes(arch: str, cfg: dict) -> dict[str, tuple[int, ...]]:
    """Hub tensor name -> shape; Linear weights are [out, in] as in torch."""
    V, C, F, L = cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    H, KVH = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = cfg.get("head_dim", C // H)
    shapes = {"model.embed_tokens.weight": (V, C)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (H * D, C),
            p + "self_attn.k_proj.weight": (KVH * D, C),
            p + "self_attn.v_proj.weight": (KVH * D, C),
            p + "input_layernorm.weight": (C,),
        }
        if arch == "phi2":
            shapes |= {
                p + "self_attn.q_proj.bias": (H * D,),
                p + "self_attn.k_proj.bias": (KVH * D,),
                p + "self_attn.v_proj.bias": (KVH * D,),
                p + "self_attn.dense.weight": (C, H * D),
                p + "self_attn.dense.bias": (C,),
                p + "input_layernorm.bias": (C,),
                p + "mlp.fc1.weight": (F, C),
                p + "mlp.fc1.bias": (F,),
                p + "mlp.fc2.weight": (C, F),
                p + "mlp.fc2.bias": (C,),
            }
            continue
        shapes |= {p + "self_attn.o_proj.weight": (C, H * D), p + "post_attention_layernorm.weight": (C,)}
        if arch in ("gemma2", "gemma3"):
            shapes |= {p + "pre_feedforward_layernorm.weight": (C,), p + "post_feedforward_layernorm.weight": (C,)}
        if arch == "gemma3":
            shapes |= {p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,)}
        if arch == "mixtral":
            E = cfg["num_local_experts"]
            shapes[p + "block_sparse_moe.gate.weight"] = (E, C)
            for e in range(E):
                q = f"{p}block_sparse_moe.experts.{e}."
                shapes |= {q + "w1.weight": (F, C), q + "w2.weight": (C, F), q + "w3.weight": (F, C)}
        else:
            shapes |= {
                p + "mlp.gate_proj.weight": (F, C),
                p + "mlp.up_proj.weight": (F, C),
                p + "mlp.down_proj.weight": (C, F),
            }
    if arch == "phi2":
        shapes |= {"model.final_layernorm.weight": (C,), "model.final_layernorm.bias": (C,), "lm_head.bias": (V,)}
    else:
        shapes["model.norm.weight"] = (C,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (V, C)
    return shapes


def _init(name: str, shape: tuple[int, ...], arch: str, seed: int) -> torch.Tensor:
    # Seeded per tensor by name, so a tensor's values do not depend on which others exist or their order.
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    noise = torch.randn(shape, generator=gen, dtype=torch.float32)
    if "norm" in name and name.endswith(".weight"):
        # Gemma's RMSNorm scales by (1 + w), so its stored weights sit near 0; everyone else's near 1. Gemma 2 and
        # 3 norm each sublayer's output too: scaled by ~3 there, the sublayers outweigh the embedding in the
        # residual stream, and greedy decoding wanders instead of echoing the tied embedding's nearest token.
        if arch in ("gemma2", "gemma3") and ".post_" in name:
            return 2.0 + 0.1 * noise
        return 0.1 * noise if arch.startswith("gemma") else 1.0 + 0.1 * noise
    if name.endswith(".bias"):
        return 0.1 * noise
    if name == "model.embed_tokens.weight":
        # Gemma ties this to lm_head and multiplies it by sqrt(hidden) on the way in.
        return noise / math.sqrt(shape[1]) if arch.startswith("gemma") else noise
    # 2/sqrt(fan_in), well above the usual 0.02, so greedy decoding of random weights wanders
    # instead of locking onto one token.
    return noise * (2.0 / math.sqrt(shape[1]))


def make_weights(arch: str, cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    return {name: _init(name, shape, arch, seed) for name, shape in _shapes(arch, cfg).items()}


def _save_weights(weights: dict[str, torch.Tensor], out_dir: Path, sharded: bool) -> None:
    if not sharded:
        save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(weights)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for k, part in enumerate(halves, start=1):
        fname = f"model-{k:05d}-of-{len(halves):05d}.safetensors"
        save_file({n: weights[n] for n in part}, str(out_dir / fname), metadata={"format": "pt"})
        weight_map |= {n: fname for n in part}
    total = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(out_dir / "model.safetensors.index.json", index)


def write_checkpoint(arch: str, out_dir: Path, *, sharded: bool = False, seed: int = 0) -> Path:
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    out_dir = Path(out_dir)
    build_tokenizer(out_dir)
    vocab_size = Tokenizer.from_file(str(out_dir / "tokenizer.json")).get_vocab_size()
    cfg = make_config(arch, vocab_size)
    _write_json(out_dir / "config.json", cfg)
    _write_json(out_dir / "generation_config.json", {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID})
    _save_weights(make_weights(arch, cfg, seed), out_dir, sharded)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--arch", nargs="+", choices=ARCHS, default=list(ARCHS))
    parser.add_argument("--sharded", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for arch in args.arch:
        path = write_checkpoint(arch, args.out_dir / arch, sharded=args.sharded, seed=args.seed)
        print(path)


if __name__ == "__main__":
    main()
