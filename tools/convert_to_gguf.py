"""Convert a Hugging Face checkpoint (llama, mistral, mixtral, gemma, gemma2, gemma3_text, phi-2) to GGUF, laid out as
llama.cpp's convert_hf_to_gguf.py lays it out, so mistralrs's GGUF loader is tested on the layout real files have.

    python tools/convert_to_gguf.py CHECKPOINT_DIR OUT.gguf [--type f32|f16|q8_0|q4_0|q5_0|q4_k]

As llama.cpp's converter does:
  - architecture "llama" for Llama, Mistral and Mixtral (llama.expert_count set), "gemma", "gemma2", "gemma3",
    "phi2"; its key names (Gemma 2: soft caps and sliding window; Gemma 3: sliding window, linear rope scaling)
  - llama: Q and K rows permuted for llama.cpp's interleaved rotary (LlamaModel.permute); Llama 3 rope scaling
    written as a `rope_freqs` tensor of per-frequency divisors
  - gemma, gemma2, gemma3: norm weights (q_norm and k_norm too) stored as 1 + w; no `output` tensor (tied to
    token_embd)
  - mixtral: the experts of a layer stacked into blk.N.ffn_{gate,up,down}_exps [E, ...]
  - 1-D tensors and ffn_gate_inp stay F32; other weights take the requested type when their rows fit its blocks,
    else llama.cpp's fallback (Q4_K -> Q5_0, then F16)
  - tokenizer: tokenizer.model (SentencePiece) when present, as model "llama" with its scores and token types;
    else tokenizer.json: byte-level BPE as model "gpt2" (tokens, merges, pre "gpt-2"); SentencePiece-style BPE (byte_fallback)
    as model "llama" (tokens, scores); token types, bos/eos/unk ids, add_bos_token, chat template
Not as llama.cpp does:
  - Mistral's sliding window is written as `llama.attention.sliding_window` (llama.cpp defines the key but does not
    write it for llama models); --no-sliding-window leaves it out
  - Q4_K is quantized here by a simple min/max quantizer (gguf-py cannot quantize K-quants), so the values differ
    from llama-quantize's (the format is the same)
  - --per-expert writes Mixtral's experts one tensor each (blk.N.ffn_gate.E), as files from before April 2024 did;
    --fused-qkv writes Phi-2's q, k, v as one attn_qkv tensor, as files converted from Microsoft's checkpoint did
"""
import argparse
import json
import math
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import load_file

Q = gguf.GGMLQuantizationType
ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA, "mixtral": gguf.MODEL_ARCH.LLAMA,
         "gemma": gguf.MODEL_ARCH.GEMMA, "gemma2": gguf.MODEL_ARCH.GEMMA2, "gemma3_text": gguf.MODEL_ARCH.GEMMA3,
         "phi": gguf.MODEL_ARCH.PHI2}
GEMMAS = (gguf.MODEL_ARCH.GEMMA, gguf.MODEL_ARCH.GEMMA2, gguf.MODEL_ARCH.GEMMA3)
TYPES = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q5_0": Q.Q5_0, "q4_k": Q.Q4_K}
FILE_TYPES = {Q.F32: gguf.LlamaFileType.ALL_F32, Q.F16: gguf.LlamaFileType.MOSTLY_F16,
              Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
              Q.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0, Q.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_S}
FALLBACK = {Q.Q4_K: Q.Q5_0}


def tensor_type(gguf_name: str, shape: tuple[int, ...], requested: gguf.GGMLQuantizationType):
    """The type llama.cpp would store this tensor in, given the requested file type."""
    if len(shape) == 1 or gguf_name.endswith("ffn_gate_inp.weight") or gguf_name == "rope_freqs.weight":
        return Q.F32
    qtype = requested
    while qtype not in (Q.F32, Q.F16) and shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = FALLBACK.get(qtype, Q.F16)
    return qtype


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """Q4_K blocks of 256 weights: 8 sub-blocks of 32, each w = d * sc * q - dmin * m with 6-bit sc, m and 4-bit q.
    Simple min/max per sub-block (llama.cpp searches for better scales)."""
    rows = x.reshape(-1, 8, 32).astype(np.float32)  # [B, sub-block, weight]
    lo = np.minimum(rows.min(-1), 0)
    scale, mins = (rows.max(-1) - lo) / 15, -lo  # [B, 8]
    d = (scale.max(-1, keepdims=True) / 63).astype(np.float16)
    dmin = (mins.max(-1, keepdims=True) / 63).astype(np.float16)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d > 0, np.rint(scale / d.astype(np.float32)), 0).clip(0, 63).astype(np.uint8)
        m = np.where(dmin > 0, np.rint(mins / dmin.astype(np.float32)), 0).clip(0, 63).astype(np.uint8)
        step = (d.astype(np.float32) * sc)[..., None]
        offset = (dmin.astype(np.float32) * m)[..., None]
        q = np.where(step > 0, np.rint((rows + offset) / step), 0).clip(0, 15).astype(np.uint8)
    scales = np.concatenate([sc[:, :4] | (sc[:, 4:] >> 4 << 6), m[:, :4] | (m[:, 4:] >> 4 << 6),
                             (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)], axis=-1)  # [B, 12]
    q = q.reshape(-1, 4, 2, 32)  # [B, c, half, l]: qs[32c + l] holds w[64c + l] (low) and w[64c + 32 + l] (high)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    blocks = np.concatenate([d.view(np.uint8), dmin.view(np.uint8), scales, qs], axis=-1)  # [B, 144]
    return blocks.reshape(*x.shape[:-1], x.shape[-1] // 256 * 144)


def encode(x: np.ndarray, qtype) -> np.ndarray:
    if qtype == Q.F32:
        return x.astype(np.float32)
    if qtype == Q.F16:
        return x.astype(np.float16)
    if qtype == Q.Q4_K:
        return quantize_q4_k(x)
    return gguf.quants.quantize(x.astype(np.float32), qtype)


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's LlamaModel.permute: within each head, rows (c, i) -> (i, c), c in {0, 1}, i < D / 2."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    index = ckpt / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    weights = {}
    for f in files:
        weights.update(load_file(str(ckpt / f)))
    return {k: v.float() for k, v in weights.items()}


def rope_factors(cfg: dict, head_dim: int) -> torch.Tensor | None:
    """Llama 3 scaling as llama.cpp's LlamaModel.generate_extra_tensors writes it: a divisor per frequency."""
    rs = cfg.get("rope_scaling") or {}
    if rs.get("rope_type", rs.get("type")) != "llama3":
        return None
    freqs = 1.0 / (cfg.get("rope_theta", 10000.0) ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, lo, hi = rs.get("factor", 8.0), rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
    old = rs.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def gguf_tensors(cfg: dict, weights: dict[str, torch.Tensor], *, per_expert=False, fused_qkv=False):
    """(llama.cpp name, float tensor) pairs in llama.cpp's layout."""
    model_type = cfg["model_type"]
    arch = ARCHS[model_type]
    L, H = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    KVH = cfg.get("num_key_value_heads") or H
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // H
    names = gguf.get_tensor_name_map(arch, L)
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    out = []
    for name, w in weights.items():
        base, _, suffix = name.rpartition(".")
        if ".block_sparse_moe.experts." in name:
            _, _, layer, _, _, e, proj = base.split(".")  # model.layers.{i}.block_sparse_moe.experts.{e}.w{1,2,3}
            if per_expert:
                kind = {"w1": "ffn_gate", "w2": "ffn_down", "w3": "ffn_up"}[proj]
                out.append((f"blk.{layer}.{kind}.{e}.{suffix}", w))
            else:
                experts.setdefault((int(layer), proj), {})[int(e)] = w
            continue
        if arch == gguf.MODEL_ARCH.LLAMA and base.endswith(("q_proj", "k_proj")):
            w = permute(w, H if base.endswith("q_proj") else KVH)
        if arch in GEMMAS and name.endswith("norm.weight"):
            w = w + 1
        if fused_qkv and base.endswith(("q_proj", "k_proj", "v_proj")):
            qkv.setdefault((int(base.split(".")[2]), suffix), {})[base[-6]] = w
            continue
        gname = names.get_name(base)
        if gname is None:
            raise ValueError(f"no GGUF name for {name}")
        out.append((f"{gname}.{suffix}", w))
    for (layer, proj), ws in sorted(experts.items()):
        stacked = torch.stack([ws[e] for e in range(len(ws))])
        out.append((f"{names.get_name(f'model.layers.{layer}.block_sparse_moe.experts.{proj}')}.weight", stacked))
    for (layer, suffix), ws in sorted(qkv.items()):
        out.append((f"blk.{layer}.attn_qkv.{suffix}", torch.cat([ws["q"], ws["k"], ws["v"]])))
    if (factors := rope_factors(cfg, head_dim)) is not None:
        out.append(("rope_freqs.weight", factors))
    return out


def write_hparams(w: gguf.GGUFWriter, cfg: dict, qtype, sliding_window: bool) -> None:
    model_type = cfg["model_type"]
    H = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // H
    w.add_name(f"tiny-{model_type}")
    w.add_context_length(cfg.get("max_position_embeddings", 4096))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(H)
    w.add_head_count_kv(cfg.get("num_key_value_heads") or H)
    w.add_file_type(FILE_TYPES[qtype])
    if model_type == "phi":
        w.add_layer_norm_eps(cfg["layer_norm_eps"])
        w.add_rope_dimension_count(int(cfg.get("partial_rotary_factor", 0.5) * head_dim))
        return
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    if cfg.get("head_dim"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if model_type == "gemma":
        return
    if model_type in ("gemma2", "gemma3_text"):
        write_gemma_hparams(w, cfg)
        return
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(head_dim)
    rs = cfg.get("rope_scaling") or {}
    if rs.get("rope_type", rs.get("type")) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rs["factor"])
    if model_type == "mixtral":
        w.add_expert_count(cfg["num_local_experts"])
        w.add_expert_used_count(cfg["num_experts_per_tok"])
    if sliding_window and cfg.get("sliding_window"):
        w.add_sliding_window(cfg["sliding_window"])


def write_gemma_hparams(w: gguf.GGUFWriter, cfg: dict) -> None:
    """What llama.cpp's Gemma2Model / Gemma3Model write. llama.cpp fixes the rest per architecture, so a config
    that differs from it cannot be written: the layer pattern, the query scale, Gemma 3's local rope base."""
    gemma2, n = cfg["model_type"] == "gemma2", cfg["num_hidden_layers"]
    pattern, big = (2, n == 46) if gemma2 else (6, n == 62)
    types = cfg.get("layer_types") or [
        "sliding_attention" if (i + 1) % cfg.get("sliding_window_pattern", pattern) else "full_attention"
        for i in range(n)]
    scalar = cfg["hidden_size"] // cfg["num_attention_heads"] if big else cfg["head_dim"]
    if types != ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]:
        raise ValueError(f"llama.cpp's {cfg['model_type']} has a sliding window on {pattern - 1} of {pattern} layers, "
                         f"not {types}")
    if cfg["query_pre_attn_scalar"] != scalar:
        raise ValueError(f"llama.cpp scales this model's queries by {scalar}^-0.5, not by query_pre_attn_scalar "
                         f"{cfg['query_pre_attn_scalar']}^-0.5")
    w.add_sliding_window(cfg["sliding_window"])
    if gemma2:
        w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
        return
    if cfg.get("attn_logit_softcapping") is not None or cfg.get("rope_local_base_freq", 10000.0) != 10000.0:
        raise ValueError("llama.cpp's Gemma 3 has no attention soft cap and a local rope base of 10000")
    if cfg.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    rs = cfg.get("rope_scaling") or {}
    if rs.get("rope_type", rs.get("type")) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rs["factor"])


def _merges(model: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def write_sentencepiece(w: gguf.GGUFWriter, ckpt: Path, tc: dict) -> None:
    """tokenizer.model through gguf-py's SentencePieceVocab, as llama.cpp's _set_vocab_sentencepiece does."""
    vocab = gguf.vocab.SentencePieceVocab(ckpt)
    tokens, scores, types = zip(*vocab.all_tokens())
    sp = vocab.sentencepiece_tokenizer
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(list(tokens))
    w.add_token_scores(list(scores))
    w.add_token_types(list(types))
    for i, add in ((sp.bos_id(), w.add_bos_token_id), (sp.eos_id(), w.add_eos_token_id),
                   (sp.unk_id(), w.add_unk_token_id)):
        if i >= 0:
            add(i)
    w.add_add_bos_token(bool(tc.get("add_bos_token", True)))
    w.add_add_eos_token(bool(tc.get("add_eos_token", False)))


def write_tokenizer(w: gguf.GGUFWriter, ckpt: Path) -> None:
    tc_path = ckpt / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text()) if tc_path.exists() else {}
    if (ckpt / "tokenizer.model").exists():  # llama.cpp prefers the SentencePiece model when there is one
        write_sentencepiece(w, ckpt, tc)
        if tc.get("chat_template"):
            w.add_chat_template(tc["chat_template"])
        return
    tj = json.loads((ckpt / "tokenizer.json").read_text())
    model = tj["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"only BPE tokenizer.json files convert here, this one is {model.get('type')}")
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    size = max([*model["vocab"].values(), *added]) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, i in model["vocab"].items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    spm = bool(model.get("byte_fallback"))
    if spm:
        for i, text in enumerate(tokens):
            if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
                types[i] = gguf.TokenType.BYTE
        # SentencePiece merges the pair whose result scores highest: score a token by the rank of its merge
        rank = {"".join(m.split(" ")): r for r, m in enumerate(_merges(model))}
        scores = [-float(rank.get(t, len(rank) + i)) for i, t in enumerate(tokens)]
    for i, t in added.items():
        tokens[i] = t["content"]
        types[i] = gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED
    w.add_tokenizer_model("llama" if spm else "gpt2")
    if not spm:
        w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    if spm:
        w.add_token_scores(scores)
    w.add_token_merges(_merges(model))
    ids = {t: i for i, t in enumerate(tokens)}
    for key, add in (("bos_token", w.add_bos_token_id), ("eos_token", w.add_eos_token_id),
                     ("unk_token", w.add_unk_token_id)):
        value = tc.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if value in ids:
            add(ids[value])
    w.add_add_bos_token(bool(tc.get("add_bos_token", spm)))
    w.add_add_eos_token(bool(tc.get("add_eos_token", False)))
    if tc.get("chat_template"):
        w.add_chat_template(tc["chat_template"])


def convert(ckpt, out, qtype=Q.F32, *, sliding_window=True, per_expert=False, fused_qkv=False) -> Path:
    ckpt, out = Path(ckpt), Path(out)
    qtype = TYPES[qtype] if isinstance(qtype, str) else Q(qtype)
    cfg = json.loads((ckpt / "config.json").read_text())
    if cfg["model_type"] not in ARCHS:
        raise ValueError(f"model_type {cfg['model_type']!r} is not one of {', '.join(ARCHS)}")
    w = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[ARCHS[cfg["model_type"]]])
    write_hparams(w, cfg, qtype, sliding_window)
    write_tokenizer(w, ckpt)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, t in gguf_tensors(cfg, read_weights(ckpt), per_expert=per_expert, fused_qkv=fused_qkv):
        ttype = tensor_type(name, tuple(t.shape), qtype)
        data = encode(t.numpy(), ttype)
        w.add_tensor(name, data, raw_dtype=ttype if ttype not in (Q.F32, Q.F16) else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--type", choices=TYPES, default="f32")
    parser.add_argument("--no-sliding-window", action="store_true")
    parser.add_argument("--per-expert", action="store_true")
    parser.add_argument("--fused-qkv", action="store_true")
    a = parser.parse_args()
    print(convert(a.checkpoint, a.out, a.type, sliding_window=not a.no_sliding_window, per_expert=a.per_expert,
                  fused_qkv=a.fused_qkv))


if __name__ == "__main__":
    main()
