"""A loaded model as the Runner sees it (Pipeline), and the pieces the loaders assemble it from: the KV cache sized
for the device, the tokenizer and its special tokens, the EOS ids, the path of a quantized file."""
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from . import hub
from .config import read_json
from .gguf_tokenizer import tokenizer_from_gguf
from .model_runner import ModelRunner

log = logging.getLogger("mistralrs")
CPU_KV_CACHE_TOKENS = 8192


@dataclass
class Pipeline:
    """Everything a Runner needs of a loaded model."""
    model_id: str
    model_runner: ModelRunner
    tokenizer: Tokenizer
    chat_template: str | None
    special_tokens: dict
    eos_token_ids: set[int]
    max_model_len: int
    vocab_size: int
    repeat_last_n: int
    device: torch.device
    dtype: torch.dtype



def quantized_path(repo_id: str, filename: str, revision: str | None, token) -> Path:
    """quantized_model_id "" means quantized_filename is a local path; otherwise a file of that repo (or local dir)."""
    if not isinstance(filename, str) or not filename:
        raise ValueError(f"quantized_filename must be a non-empty str, got {filename!r}")
    if repo_id == "":
        path = Path(filename)
        if not path.is_file():
            raise FileNotFoundError(f"quantized_filename {filename!r} does not exist or is not a file "
                                    f"(quantized_model_id=\"\" means a local path)")
        return path
    if not isinstance(repo_id, str):
        raise TypeError(f"quantized_model_id must be a str (hub repo id, local directory, or \"\"), got {repo_id!r}")
    return hub.repo_file(repo_id, filename, revision=revision or "main", token=token)


def quantized_tokenizer(qfile, model_id: str | None, tokenizer_json: str | None, revision,
                        token) -> tuple[Tokenizer, dict, dict]:
    """Tokenizer, tokenizer_config and generation_config of a GGUF/GGML model: tokenizer_json, else model_id's
    tokenizer.json, else the file's own tokenizer.ggml.* metadata. model_id's tokenizer_config.json (chat template,
    special tokens) wins over the file's; no config.json is read."""
    kw = dict(revision=revision, token=token)
    path, tok_cfg, gen_cfg = None, {}, {}
    if tokenizer_json is not None:
        path = Path(tokenizer_json)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer_json {tokenizer_json!r} does not exist or is not a file")
    if model_id is not None:
        path = path or hub.optional_repo_file(model_id, "tokenizer.json", **kw)
        if p := hub.optional_repo_file(model_id, "tokenizer_config.json", **kw):
            tok_cfg = read_json(p)
        if p := hub.optional_repo_file(model_id, "generation_config.json", **kw):
            gen_cfg = read_json(p)
    has_vocab = bool(qfile.metadata.get("tokenizer.ggml.tokens"))
    if path is None and not has_vocab:
        raise FileNotFoundError(f"{qfile.path} carries no tokenizer (tokenizer.ggml.*) and none was given: pass "
                                f"model_id (a repo with tokenizer.json) or tokenizer_json")
    file_tok, file_cfg = tokenizer_from_gguf(qfile.metadata, qfile.path) if has_vocab else (None, {})
    tokenizer = tokenizer_from_file(path) if path is not None else file_tok
    return tokenizer, {**file_cfg, **tok_cfg}, gen_cfg


def kv_blocks(args, dtype, device, kv_cache_tokens, block_size,
              kv_sets: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The paged KV cache: per layer, K and V [NB, BS, KVH, D]; kv_sets of them per model layer under one block
    table (X-LoRA: 2). The model runner holds them; the scheduler's block manager hands out their NB blocks."""
    if block_size < 1:
        raise ValueError(f"the KV cache needs blocks of at least one token (got block_size={block_size})")
    n_layers = kv_sets * args.num_hidden_layers
    per_token = 2 * n_layers * args.num_key_value_heads * args.head_dim * dtype.itemsize
    if kv_cache_tokens is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            kv_cache_tokens = int(0.9 * free) // per_token
        else:
            kv_cache_tokens = CPU_KV_CACHE_TOKENS
    num_blocks = max(1, kv_cache_tokens // block_size)
    log.info("KV cache: %d blocks of %d tokens (%.1f MiB)", num_blocks, block_size,
             num_blocks * block_size * per_token / 2**20)
    shape = (num_blocks, block_size, args.num_key_value_heads, args.head_dim)  # [NB, BS, KVH, D]
    return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(n_layers)]


def load_tokenizer(files: hub.ModelFiles, model_id: str) -> tuple[Tokenizer, dict]:
    if files.tokenizer_json is None:
        raise FileNotFoundError(f"{model_id} has no tokenizer.json; pass tokenizer_json= to the loader")
    tok_cfg = read_json(files.tokenizer_config) if files.tokenizer_config else {}
    return tokenizer_from_file(files.tokenizer_json), tok_cfg


def tokenizer_from_file(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception that does not name the file
        raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from None


def eos_ids(tokenizer: Tokenizer, special: dict, cfg: dict, gen_cfg: dict) -> set[int]:
    """EOS from generation_config.json, config.json and tokenizer_config.json together."""
    ids = set()
    for value in (gen_cfg.get("eos_token_id"), cfg.get("eos_token_id")):
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    if special.get("eos_token") is not None and tokenizer.token_to_id(special["eos_token"]) is not None:
        ids.add(tokenizer.token_to_id(special["eos_token"]))
    return ids
