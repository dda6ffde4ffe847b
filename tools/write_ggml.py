"""Write a legacy GGML file (GGJT version 3, llama.cpp's format from May to August 2023) from a Hugging Face Llama
checkpoint, as llama.cpp's old convert.py and quantize wrote it.

    python tools/write_ggml.py CHECKPOINT_DIR OUT.bin [--type f32|f16|q8_0|q4_0|q5_0]

Layout (little-endian): b"tjgg" (the u32 0x67676a74), version 3; hparams u32 n_vocab, n_embd, n_mult, n_head,
n_layer, n_rot, ftype; per token: length u32, text, score f32; per tensor: n_dims u32, name length u32, type u32,
dims u32[n_dims] (innermost first), name, zero padding to a multiple of 32 bytes from the file start, data.
Tensor names are Meta's; Q and K rows are permuted as convert.py did (the same permutation as GGUF's).
Vocab: tokenizer.model (SentencePiece) when present, else tokenizer.json; SentencePiece-style ones as convert.py
wrote them: "▁" as a space, control tokens
empty, <0xNN> as the raw byte, scores by merge rank. Byte-level BPE tokenizers have no such form; their tokens are
written as they are, and such a file needs model_id's tokenizer.json to run.
GGJT has no KV-head count, rope base, norm epsilon or rope scaling: a checkpoint with rope_scaling is refused.
"""
import argparse
import json
import struct
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import load_file

Q = gguf.GGMLQuantizationType
TYPES = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q5_0": Q.Q5_0}
FTYPES = {Q.F32: 0, Q.F16: 1, Q.Q4_0: 2, Q.Q8_0: 7, Q.Q5_0: 8}  # llama_ftype
GGJT_MAGIC, VERSION, N_MULT = 0x67676A74, 3, 256
NAMES = {
    "model.embed_tokens": "tok_embeddings",
    "model.norm": "norm",
    "lm_head": "output",
    "input_layernorm": "attention_norm",
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
}


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def meta_name(hf_name: str) -> str:
    base = hf_name.removesuffix(".weight")
    if base.startswith("model.layers."):
        _, _, layer, rest = base.split(".", 3)
        return f"layers.{layer}.{NAMES[rest]}.weight"
    return f"{NAMES[base]}.weight"


def sentencepiece_vocab(path: Path) -> list[tuple[bytes, float]]:
    """tokenizer.model as convert.py's SentencePieceVocab wrote it."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(path))
    out = []
    for i in range(sp.vocab_size()):
        if sp.is_unknown(i):
            text = " \u2047 ".encode()
        elif sp.is_control(i):
            text = b""
        elif sp.is_byte(i):
            text = bytes([int(sp.id_to_piece(i)[3:-1], 16)])
        else:
            text = sp.id_to_piece(i).replace("\u2581", " ").encode()
        out.append((text, sp.get_score(i)))
    return out


def vocab(ckpt: Path) -> list[tuple[bytes, float]]:
    if (ckpt / "tokenizer.model").exists():
        return sentencepiece_vocab(ckpt / "tokenizer.model")
    tj = json.loads((ckpt / "tokenizer.json").read_text())
    model = tj["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    rank = {m.replace(" ", ""): r for r, m in enumerate(merges)}
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    pieces = {i: t for t, i in model["vocab"].items()} | {i: t["content"] for i, t in added.items()}
    out = []
    for i in range(max(pieces) + 1):
        piece = pieces.get(i, "")
        score = -float(rank.get(piece, len(rank) + i))
        if not model.get("byte_fallback"):
            out.append((piece.encode("utf-8"), score))
        elif i in added and added[i].get("special"):
            out.append((b" \xe2\x81\x87 " if piece == "<unk>" else b"", score))  # convert.py: " ⁇ " and b""
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out.append((bytes([int(piece[3:5], 16)]), score))
        else:
            out.append((piece.replace("▁", " ").encode("utf-8"), score))
    return out


def tensor_type(shape: tuple[int, ...], requested) -> gguf.GGMLQuantizationType:
    if len(shape) == 1:
        return Q.F32
    if requested in (Q.F32, Q.F16) or shape[-1] % gguf.GGML_QUANT_SIZES[requested][0] == 0:
        return requested
    return Q.F16


def encode(x: np.ndarray, qtype) -> bytes:
    if qtype == Q.F32:
        return x.astype("<f4").tobytes()
    if qtype == Q.F16:
        return x.astype("<f2").tobytes()
    return gguf.quants.quantize(x.astype(np.float32), qtype).tobytes()


def write_ggml(ckpt, out, qtype="f32") -> Path:
    ckpt, out = Path(ckpt), Path(out)
    qtype = TYPES[qtype] if isinstance(qtype, str) else Q(qtype)
    cfg = json.loads((ckpt / "config.json").read_text())
    if cfg["model_type"] != "llama":
        raise ValueError(f"GGML files hold Llama models; this checkpoint is {cfg['model_type']!r}")
    if cfg.get("rope_scaling"):
        raise ValueError("GGJT files cannot express rope_scaling; remove it from config.json to write one anyway")
    H = cfg["num_attention_heads"]
    KVH = cfg.get("num_key_value_heads") or H
    head_dim = cfg["hidden_size"] // H
    if cfg.get("head_dim", head_dim) != head_dim:
        raise ValueError("GGJT files imply head_dim = hidden_size / num_attention_heads")
    weights = {k: v.float() for k, v in load_file(str(ckpt / "model.safetensors")).items()}
    tokens = vocab(ckpt)
    with open(out, "wb") as f:
        f.write(struct.pack("<II", GGJT_MAGIC, VERSION))
        f.write(struct.pack("<7I", len(tokens), cfg["hidden_size"], N_MULT, H, cfg["num_hidden_layers"], head_dim,
                            FTYPES[qtype]))
        for text, score in tokens:
            f.write(struct.pack("<I", len(text)) + text + struct.pack("<f", score))
        for hf_name, w in weights.items():
            if hf_name.endswith(("q_proj.weight", "k_proj.weight")):
                w = permute(w, H if "q_proj" in hf_name else KVH)
            name = meta_name(hf_name).encode()
            ttype = tensor_type(tuple(w.shape), qtype)
            dims = list(reversed(w.shape))
            f.write(struct.pack(f"<III{len(dims)}I", len(dims), len(name), ttype, *dims) + name)
            f.write(b"\0" * (-f.tell() % 32))
            f.write(encode(w.numpy(), ttype))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--type", choices=TYPES, default="f32")
    a = parser.parse_args()
    print(write_ggml(a.checkpoint, a.out, a.type))


if __name__ == "__main__":
    main()
