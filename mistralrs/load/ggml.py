"""Legacy GGML files (GGJT v3: llama.cpp's format from May to August 2023, Llama models only), read into the form
of a GGUF file so that the GGUF model and tokenizer code load them.

Layout (little-endian): magic u32 0x67676a74 ("ggjt"), version u32 3; hparams u32 n_vocab, n_embd, n_mult, n_head,
n_layer, n_rot, ftype; n_vocab tokens (length u32, text, score f32); then tensors to the end of the file: n_dims u32,
name length u32, type u32 (ggml type ids, the same as GGUF's), dims u32[n_dims] (innermost first), name, padding to
a multiple of 32 bytes from the start of the file, data. Block formats are GGUF's (v3 made d an fp16).

Tokens are SentencePiece pieces with "▁" written as a space, control tokens empty and byte tokens <0xNN> as the raw
byte. Tensor names are Meta's (tok_embeddings, layers.N.attention.wq, ...); Q and K rows are permuted as in GGUF.
The file has no KV-head count (`gqa` gives it: n_kv_head = n_head / gqa), no norm epsilon (1e-5), no rope base
(10000), no context length (4096); the FFN width is read off layers.0.feed_forward.w1 (n_mult only rounds it).
"""
import re
import struct
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES

from ..kernels.dequant import row_bytes
from .gguf import Cursor, GGUFFile, RawTensor, map_file, tensor_type
from .gguf_tokenizer import BYTE, CONTROL, NORMAL, UNKNOWN

GGJT_MAGIC = 0x67676A74
OLDER_MAGICS = {0x67676D6C: "unversioned 'ggml'", 0x67676D66: "'ggmf'"}
HPARAMS = ("n_vocab", "n_embd", "n_mult", "n_head", "n_layer", "n_rot", "ftype")
MAX_SEQ_LEN, RMS_EPS, ROPE_THETA = 4096, 1e-5, 10000.0
# Meta's tensor names -> llama.cpp's GGUF names
NAMES = {
    "tok_embeddings": "token_embd",
    "norm": "output_norm",
    "output": "output",
    "layers.{i}.attention_norm": "blk.{i}.attn_norm",
    "layers.{i}.attention.wq": "blk.{i}.attn_q",
    "layers.{i}.attention.wk": "blk.{i}.attn_k",
    "layers.{i}.attention.wv": "blk.{i}.attn_v",
    "layers.{i}.attention.wo": "blk.{i}.attn_output",
    "layers.{i}.ffn_norm": "blk.{i}.ffn_norm",
    "layers.{i}.feed_forward.w1": "blk.{i}.ffn_gate",
    "layers.{i}.feed_forward.w2": "blk.{i}.ffn_down",
    "layers.{i}.feed_forward.w3": "blk.{i}.ffn_up",
}
_LAYER = re.compile(r"^layers\.(\d+)\.")


def _gguf_name(name: str, path: Path) -> str:
    stem, _, suffix = name.rpartition(".")
    fmt = {}
    if m := _LAYER.match(stem):
        fmt["i"], stem = int(m.group(1)), "layers.{i}." + stem[m.end():]
    if stem not in NAMES or suffix != "weight":
        raise ValueError(f"{path}: tensor {name!r} is not part of a GGML Llama model")
    return f"{NAMES[stem].format(**fmt)}.{suffix}"


def _header(c: Cursor, path: Path) -> dict:
    magic = c.u32("the magic number")
    if magic in OLDER_MAGICS:
        raise ValueError(f"{path} is an {OLDER_MAGICS[magic]} GGML file; only GGJT version 3 is supported")
    if magic != GGJT_MAGIC:
        first = struct.pack("<I", magic)
        hint = "; it is a GGUF file: pass is_gguf=True" if first == b"GGUF" else ""
        raise ValueError(f"{path} is not a GGML (GGJT) file: it starts with {first!r}{hint}")
    version = c.u32("version")
    if version != 3:
        raise ValueError(f"{path}: GGJT version {version} is not supported (older versions used other block "
                         f"formats); supported: 3")
    hp = {k: c.u32(f"hparam {k}") for k in HPARAMS}
    if not hp["n_head"] or not hp["n_layer"] or hp["n_embd"] % hp["n_head"]:
        raise ValueError(f"{path}: hparams {hp} do not describe a model (n_embd must be a multiple of n_head)")
    return hp


def _vocab(c: Cursor, n: int, path: Path) -> tuple[list[str], list[float], list[int]]:
    """The pieces as GGUF writes them, as llama.cpp's convert_llama_ggml_to_gguf.py turns them back."""
    c.count(n, 8, "n_vocab")
    tokens, scores, types = [], [], []
    for i in range(n):
        text = c.string_u32(f"token {i}")
        scores.append(struct.unpack("<f", c.take(4, f"score of token {i}"))[0])
        if i <= 2:
            token, kind = ("<unk>", UNKNOWN) if i == 0 else ("<s>" if i == 1 else "</s>", CONTROL)
        elif not text:
            token, kind = f"[CONTROL{i}]", CONTROL
        elif 3 <= i <= 258 and len(text) == 1:
            token, kind = f"<0x{text[0]:02X}>", BYTE
        else:
            try:
                token, kind = text.decode("utf-8").replace(" ", "▁"), NORMAL
            except UnicodeDecodeError:
                raise ValueError(f"{path}: token {i} is not valid UTF-8: {text!r}") from None
        tokens.append(token)
        types.append(kind)
    return tokens, scores, types


def _tensors(c: Cursor, buf, path: Path) -> dict[str, RawTensor]:
    data = np.frombuffer(buf, dtype=np.uint8)
    tensors = {}
    while c.pos < len(buf):
        n_dims = c.u32("tensor dimension count")
        name_len = c.u32("tensor name length")
        raw_type = c.u32("tensor type")
        if not 1 <= n_dims <= 2:
            raise ValueError(f"{path}: a tensor at byte {c.pos} has {n_dims} dimensions; GGJT allows 1 or 2")
        dims = [c.u32("tensor dimensions") for _ in range(n_dims)]
        name = c.take(name_len, "tensor name").decode("utf-8", "replace")
        qtype = tensor_type(raw_type, name, path)
        if min(dims) < 1 or dims[0] % GGML_QUANT_SIZES[qtype][0]:
            raise ValueError(f"{path}: tensor {name!r} has dimensions {dims}, impossible for type {qtype.name}")
        c.take(-c.pos % 32, f"padding before tensor {name!r}")
        shape = tuple(reversed(dims))
        rows, width = (shape[0] if n_dims == 2 else 1), row_bytes(qtype, dims[0])
        start = c.pos
        c.take(rows * width, f"data of tensor {name!r}")
        gname = _gguf_name(name, path)
        if gname in tensors:
            raise ValueError(f"{path}: tensor {name!r} appears twice")
        tensors[gname] = RawTensor(gname, qtype, shape, data[start:start + rows * width].reshape(rows, width))
    return tensors


def read_ggml(path, gqa: int = 1) -> GGUFFile:
    path = Path(path)
    buf = map_file(path, "GGML")
    c = Cursor(buf, path)
    hp = _header(c, path)
    tokens, scores, types = _vocab(c, hp["n_vocab"], path)
    tensors = _tensors(c, buf, path)
    n_head, head_dim = hp["n_head"], hp["n_embd"] // hp["n_head"]
    if n_head % gqa:
        raise ValueError(f"gqa={gqa} does not divide n_head={n_head} of {path}")
    for needed in ("blk.0.attn_k.weight", "blk.0.ffn_gate.weight"):
        if needed not in tensors:
            raise ValueError(f"{path}: tensor {needed!r} is missing")
    kv_rows = tensors["blk.0.attn_k.weight"].shape[0]
    if kv_rows != n_head // gqa * head_dim:
        hint = f"pass gqa={n_head * head_dim // kv_rows}" if kv_rows and n_head * head_dim % kv_rows == 0 else ""
        raise ValueError(f"{path}: layers.0.attention.wk has {kv_rows} rows, but n_head / gqa = {n_head} / {gqa} "
                         f"KV heads of {head_dim} make {n_head // gqa * head_dim}; {hint or 'check the file'}")
    metadata = {
        "general.architecture": "llama",
        "llama.vocab_size": hp["n_vocab"],
        "llama.embedding_length": hp["n_embd"],
        "llama.block_count": hp["n_layer"],
        "llama.feed_forward_length": tensors["blk.0.ffn_gate.weight"].shape[0],
        "llama.attention.head_count": n_head,
        "llama.attention.head_count_kv": n_head // gqa,
        "llama.rope.dimension_count": hp["n_rot"],
        "llama.context_length": MAX_SEQ_LEN,
        "llama.attention.layer_norm_rms_epsilon": RMS_EPS,
        "llama.rope.freq_base": ROPE_THETA,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }
    return GGUFFile(path, metadata, tensors)
