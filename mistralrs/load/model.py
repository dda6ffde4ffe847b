"""The load pipeline: a loader's options -> the model on its device, its tokenizer and KV cache -> the Pipeline a
Runner serves (loader.py, the API's classes, checks the arguments and calls load_pipeline).

    read       config.json + safetensors (safetensors.py), or a GGUF / GGML file (gguf.py, ggml.py, gguf_model.py),
               into a model file's graph; the tokenizer and the EOS configs (tokenizer.py)
    passes     over the built model, in the order of model_passes: X-LoRA, tensor parallel, the CPU layouts
    KV cache   sized from kv_cache_tokens or the free memory; every rank of a tensor-parallel model the same
Weights and the KV cache are checked against the memory the device can still give before they are allocated
(check_fits). Tensor parallel: load_pipeline starts the ranks (tensor_parallel/workers.py), and each
loads its own shard with load_shard.
"""
import logging
import math
import os
from dataclasses import dataclass
from functools import partial

import torch

from .. import cpu_decode
from ..engine.model_runner import ModelRunner
from ..engine.pipeline import Pipeline
from ..linears import cpu_matvec_layout
from ..model_args import check_args, parameter_count, read_json
from ..models import gemma, llama, mistral, mixtral, phi2
from ..tensor_parallel import workers
from ..tensor_parallel.group import TensorParallel, join_ranks
from ..tensor_parallel.shard import Shard, local_args
from . import chat_template, hub
from .ggml import read_ggml
from .gguf import read_gguf
from .gguf_model import load_gguf_model, resident_bytes
from .safetensors import load_state, read_safetensors
from .tokenizer import eos_ids, load_tokenizer, quantized_tokenizer
from .xlora import load_xlora

log = logging.getLogger("mistralrs")
CPU_KV_CACHE_TOKENS = 8192
MAX_BLOCK_SIZE = 1024
# The model file each of the API's architecture loaders (loader.py) loads, by the loader's name.
MODEL_FILES = {"LlamaLoader": llama, "MistralLoader": mistral, "MixtralLoader": mixtral, "GemmaLoader": gemma,
               "Phi2Loader": phi2}


def load_pipeline(loader, *, device: torch.device, threads: int, tensor_parallel_size, **shard) -> Pipeline | None:
    """What a Runner serves of loader's model (loader: an ArchLoader, its options and model file). shard: the
    arguments of load_shard. None on torchrun's ranks > 0, once rank 0 has closed its Runner."""
    tp = start_tensor_parallel(loader, tensor_parallel_size, device, threads, shard)
    if tp is not None and device.type == "cpu":
        threads = max(1, threads // tp.world)  # the ranks share the cores
    if tp is not None and tp.rank > 0:  # torchrun's rank > 0: serve rank 0 until its Runner closes
        workers.serve(load_shard(loader, device=tp.device, tp=tp, **shard)[1])
        return None
    try:
        loaded, model_runner = load_shard(loader, device=tp.device if tp else device, tp=tp, **shard)
    except BaseException:
        if tp is not None:
            tp.abort("rank 0 failed to load")
        raise
    template, special = chat_template.resolve(loader.options.chat_template, loaded.tok_cfg)
    return Pipeline(
        model_id=loaded.model_id, model_runner=model_runner, tokenizer=loaded.tokenizer, chat_template=template,
        special_tokens=special, eos_token_ids=eos_ids(loaded.tokenizer, special, *loaded.eos_configs),
        max_model_len=loaded.args.max_position_embeddings, vocab_size=loaded.args.vocab_size,
        repeat_last_n=loader.options.repeat_last_n, device=model_runner.device, dtype=shard["dtype"],
        threads=threads, whole_prompt_steps=loader.options.kind.is_xlora and model_runner.model.whole_prompt_steps)


def start_tensor_parallel(loader, n, device: torch.device, threads: int, shard: dict) -> TensorParallel | None:
    """This process's rank of an n-rank model (workers.start), None for n == 1. Checked first: what fails on every
    rank must not spawn any."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"tensor_parallel_size must be an int >= 1, got {n!r}")
    if n == 1:
        return None
    if loader.options.kind.is_xlora:
        raise ValueError("tensor_parallel_size > 1 is not supported for X-LoRA models")
    workers.devices(device, n)
    return workers.start(partial(load_shard, loader), n, device, max(1, threads // n), shard)


@dataclass
class Loaded:
    """A model and its tokenizer as read from the files, before the passes and the KV cache."""
    model_id: str
    model: torch.nn.Module
    args: object
    tokenizer: object
    tok_cfg: dict
    eos_configs: tuple[dict, dict]  # config.json-like and generation_config.json-like dicts with eos_token_id


def load_shard(loader, *, token, revision, quantized_revision, xlora_revision, dtype, device, kv_cache_tokens,
               block_size, tp: TensorParallel | None = None) -> tuple[Loaded, ModelRunner]:
    """The model (tp: this rank's shard of it), its tokenizer and KV cache, and the model runner over them."""
    o = loader.options
    loaded = (read_quantized(loader, token, revision, quantized_revision, dtype, device, tp) if o.kind.is_quantized
              else read_normal(loader, token, revision, dtype, device, tp))
    model = loaded.model
    for apply in model_passes(loader, loaded.args, tp, token=token, xlora_revision=xlora_revision, dtype=dtype,
                              device=device):
        model = apply(model)
    args = local_args(loaded.args, tp.world) if tp is not None else loaded.args
    kv_sets = 2 if o.kind.is_xlora else 1  # X-LoRA: the scaling pass's K/V and the real pass's (models/xlora.py)
    blocks = kv_cache(args, dtype, device, kv_cache_tokens, block_size, kv_sets, tp)
    model_runner = ModelRunner(model, blocks, device, o.no_kv_cache, tp, per_sequence_state=o.kind.is_xlora)
    weights = resident_bytes(model)
    model_runner.weight_bytes = tp.gather_ints(weights) if tp is not None else [weights]
    if tp is not None:
        log.info("tensor parallel: %d ranks, weights of each %s MiB", tp.world,
                 " / ".join(f"{b / 2**20:.1f}" for b in model_runner.weight_bytes))
    return loaded, model_runner


def model_passes(loader, args, tp: TensorParallel | None, *, token, xlora_revision, dtype, device) -> list:
    """What is done to a model once built and loaded, in this order: X-LoRA swaps the base's LoRA linears for
    adapter-mixing ones and wraps it with its classifier (before any pass changes those linears); a tensor-parallel
    shard joins its ranks; on the CPU, the matvec layout (fused projections, CpuLinear), then the C++ decode layers
    over those linears. Each takes a model and returns it."""
    o = loader.options
    passes = []
    if o.kind.is_xlora:
        passes.append(lambda model: load_xlora(
            model, loader.module.HF_RENAMES, o.model_id, o.order_file, o.xlora_model_id, args.hidden_size, dtype,
            device, o.tgt_non_granular_index, revision=xlora_revision or "main", token=token))
    if tp is not None:
        passes.append(lambda model: join_ranks(model, tp, args.vocab_size))
    return passes + [cpu_matvec_layout, cpu_decode.add_decode_layers]


def read_normal(loader, token, revision, dtype, device, tp=None) -> Loaded:
    """A safetensors checkpoint: config.json -> the model file's Args -> its graph on the meta device, filled from the
    weights files (tp: only this rank's slices)."""
    o, m = loader.options, loader.module
    files = hub.model_files(o.model_id, revision=revision, token=token, tokenizer_json=o.tokenizer_json)
    cfg = read_json(files.config)
    if cfg.get("model_type") not in m.MODEL_TYPES:
        raise ValueError(f"{o.model_id}: config.json has model_type {cfg.get('model_type')!r}, but "
                         f"{type(loader).__name__} loads model_type {' or '.join(map(repr, m.MODEL_TYPES))}")
    try:
        args = m.Args.from_hf(cfg)
    except (TypeError, AttributeError, ZeroDivisionError, KeyError) as e:  # values of the wrong type or zero
        raise ValueError(f"{files.config}: {type(e).__name__}: {e}") from None
    except ValueError as e:
        raise ValueError(f"{files.config}: {e}") from None
    check_args(args, str(files.config))
    shard = Shard.of(m.build, args, tp)
    check_fits(f"{files.config}: the weights", parameter_count(args) * dtype.itemsize // (tp.world if tp else 1),
               device)
    with torch.device("meta"):
        model = m.build(local_args(args, tp.world) if tp else args)
    load_state(model, read_safetensors(files.weights, m.HF_RENAMES, dtype, device, shard), o.model_id)
    tokenizer, tok_cfg = load_tokenizer(files, o.model_id)
    gen_cfg = read_json(files.generation_config) if files.generation_config else {}
    return Loaded(o.model_id, model, args, tokenizer, tok_cfg, (cfg, gen_cfg))


def read_quantized(loader, token, revision, quantized_revision, dtype, device, tp=None) -> Loaded:
    """A GGUF or GGML file, weights kept quantized (also the base of X-LoRA on GGUF/GGML), with the file's tokenizer
    or model_id's."""
    o, m = loader.options, loader.module
    path = hub.quantized_path(o.quantized_model_id, o.quantized_filename, quantized_revision, token)
    if o.kind.is_gguf:
        qfile = read_gguf(path)
    elif m is not llama:
        raise ValueError(f"legacy GGML files hold Llama models only; {type(loader).__name__} loads GGUF files "
                         f"(is_gguf=True)")
    else:
        qfile = read_ggml(path, gqa=o.gqa or 1)
    check_architecture(qfile, type(loader).__name__)
    check_fits(f"{path}: the weights", quantized_weight_bytes(qfile, dtype) // (tp.world if tp else 1), device)
    model, args = load_gguf_model(m, qfile, dtype, device, tp)
    tokenizer, tok_cfg, gen_cfg, eog = quantized_tokenizer(qfile, o.model_id, o.tokenizer_json, revision, token)
    cfg = {"eos_token_id": sorted(eog)}  # llama.cpp's end-of-generation set stands in for config.json's
    return Loaded(o.model_id or o.quantized_filename, model, args, tokenizer, tok_cfg, (cfg, gen_cfg))


def check_architecture(qfile, loader_name: str) -> None:
    """The file's general.architecture must be one the loader's model file reads; else name the loaders that do."""
    arch = qfile.metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise ValueError(f"{qfile.path}: GGUF metadata has no 'general.architecture'")
    if arch in MODEL_FILES[loader_name].GGUF_ARCHITECTURES:
        return
    fits = [name for name, m in MODEL_FILES.items() if arch in m.GGUF_ARCHITECTURES]
    known = dict.fromkeys(a for m in MODEL_FILES.values() for a in m.GGUF_ARCHITECTURES)
    hint = (f"load it with {', '.join(fits[:-1])} or {fits[-1]}" if len(fits) > 1 else f"load it with {fits[0]}"
            ) if fits else f"mistralrs has no loader for it; supported: {', '.join(known)}"
    raise ValueError(f"{qfile.path} holds a {arch!r} model (general.architecture), which {loader_name} does not "
                     f"load; {hint}")


def kv_cache(args, dtype, device, kv_cache_tokens, block_size, kv_sets: int = 1,
             tp: TensorParallel | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The paged KV cache: per layer, K and V [NB, BS, KVH, D]; kv_sets of them per model layer under one block
    table (X-LoRA: 2). The model runner holds them; the scheduler's block manager hands out their NB blocks, which
    every rank of a tensor-parallel model (tp) must have: they take the least of their counts."""
    check_kv_options(kv_cache_tokens, block_size)
    n_layers = kv_sets * args.num_hidden_layers
    per_token = 2 * n_layers * args.num_key_value_heads * args.head_dim * dtype.itemsize
    if kv_cache_tokens is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            kv_cache_tokens = max(block_size, int(0.9 * free) // per_token)
        else:
            kv_cache_tokens = CPU_KV_CACHE_TOKENS
    num_blocks = kv_cache_tokens // block_size if tp is None else tp.min_int(kv_cache_tokens // block_size)
    check_fits(f"a KV cache of {num_blocks * block_size} tokens", num_blocks * block_size * per_token, device)
    log.info("KV cache: %d blocks of %d tokens (%.1f MiB)", num_blocks, block_size,
             num_blocks * block_size * per_token / 2**20)
    shape = (num_blocks, block_size, args.num_key_value_heads, args.head_dim)  # [NB, BS, KVH, D]
    return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(n_layers)]


def check_kv_options(kv_cache_tokens, block_size) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or not 1 <= block_size <= MAX_BLOCK_SIZE:
        raise ValueError(f"block_size must be an int in [1, {MAX_BLOCK_SIZE}], got {block_size!r}")
    if kv_cache_tokens is not None and (isinstance(kv_cache_tokens, bool) or not isinstance(kv_cache_tokens, int)
                                        or kv_cache_tokens < block_size):
        raise ValueError(f"kv_cache_tokens must be an int >= block_size ({block_size}) or None, "
                         f"got {kv_cache_tokens!r}")


def quantized_weight_bytes(qfile, dtype: torch.dtype) -> int:
    """What a GGUF/GGML file's weights take once loaded: quantized tensors keep their bytes, float ones become dtype."""
    return sum(t.data.nbytes if t.quantized else math.prod(t.shape) * dtype.itemsize for t in qfile.tensors.values())


def available_memory(device: torch.device) -> int | None:
    """Bytes this process may still allocate on device: free GPU memory, or on the CPU the least of the system's
    available memory, the cgroup's room and the address-space limit (None when none can be read)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    room = []
    try:
        with open("/proc/meminfo") as f:
            room += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except OSError:
        pass
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit != "max":
            room.append(int(limit) - int(open("/sys/fs/cgroup/memory.current").read()))
    except (OSError, ValueError):
        pass
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            with open("/proc/self/statm") as f:
                room.append(soft - int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE"))
    except (ImportError, OSError, ValueError):
        pass
    return min(room) if room else None


def check_fits(what: str, nbytes: int, device: torch.device) -> None:
    """Refuse an allocation that cannot succeed, before trying it (a corrupt config must not swap the machine)."""
    room = available_memory(device)
    if room is not None and nbytes > room:
        raise ValueError(f"{what} would need {nbytes / 2**30:.1f} GiB on {device}, only {max(room, 0) / 2**30:.1f} "
                         f"GiB are available")
