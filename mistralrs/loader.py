"""The loaders of the API: five architecture classes and the four wrappers that pick a model kind."""
import logging
import math
import os
from dataclasses import dataclass

import torch

from . import cpu_decode, tensor_parallel
from .engine import workers
from .engine.model_runner import ModelRunner
from .engine.pipeline import Pipeline
from .linears import cpu_matvec_layout
from .load import chat_template, hub
from .load.ggml import read_ggml
from .load.gguf import read_gguf
from .load.gguf_model import load_gguf_model, resident_bytes
from .load.safetensors import load_state, read_safetensors
from .load.tokenizer import eos_ids, load_tokenizer, quantized_tokenizer
from .model_args import check_args, parameter_count, read_json
from .models import gemma, llama, mistral, mixtral, phi2
from .models.xlora import load_xlora
from .requests import Limits, ModelKind, model_dtype
from .tensor_parallel import Shard, TensorParallel, local_args

log = logging.getLogger("mistralrs")
CPU_KV_CACHE_TOKENS = 8192
MAX_BLOCK_SIZE = 1024

@dataclass
class LoaderOptions:
    model_id: str | None
    kind: ModelKind
    no_kv_cache: bool
    use_flash_attn: bool | None
    repeat_last_n: int
    gqa: int | None
    order_file: str | None
    quantized_model_id: str | None
    quantized_filename: str | None
    xlora_model_id: str | None
    chat_template: str | None
    tokenizer_json: str | None
    tgt_non_granular_index: int | None

    def check(self):
        if not isinstance(self.kind, ModelKind):
            raise TypeError(f"kind must be a mistralrs.ModelKind, got {self.kind!r}")
        xlora, quantized = self.kind.is_xlora, self.kind.is_quantized
        # A GGUF file can carry its own tokenizer, so a quantized model needs no model_id.
        if not isinstance(self.model_id, str) and not (quantized and self.model_id is None):
            raise TypeError(f"model_id must be a str (hub repo id or local directory), got {self.model_id!r}")
        for name, needed in (("order_file", xlora), ("xlora_model_id", xlora),
                             ("quantized_model_id", quantized), ("quantized_filename", quantized)):
            given = getattr(self, name) is not None
            if given != needed:
                raise ValueError(f"{name} is {'required' if needed else 'not allowed'} for model kind {self.kind.name}")
        if not isinstance(self.repeat_last_n, int) or self.repeat_last_n < 0:
            raise ValueError(f"repeat_last_n must be an int >= 0, got {self.repeat_last_n!r}")
        if self.gqa is not None and (not isinstance(self.gqa, int) or self.gqa < 1):
            raise ValueError(f"gqa must be an int >= 1 or None, got {self.gqa!r}")


class ArchLoader:
    """An architecture. Usable directly with a model kind, as the original bindings allowed, or passed (as the class
    or an instance) to NormalLoader and the other wrappers."""
    module = None

    def __init__(self, model_id=None, kind=ModelKind.Normal, no_kv_cache=False, use_flash_attn=None,
                 repeat_last_n=64, gqa=None, order_file=None, quantized_model_id=None, quantized_filename=None,
                 xlora_model_id=None, chat_template=None, tokenizer_json=None, tgt_non_granular_index=None):
        if isinstance(model_id, os.PathLike):  # a Path would reach the response JSON as "model" and fail there
            model_id = os.fspath(model_id)
        self.options = LoaderOptions(
            model_id=model_id, kind=kind, no_kv_cache=no_kv_cache, use_flash_attn=use_flash_attn,
            repeat_last_n=repeat_last_n, gqa=gqa, order_file=order_file, quantized_model_id=quantized_model_id,
            quantized_filename=quantized_filename, xlora_model_id=xlora_model_id, chat_template=chat_template,
            tokenizer_json=tokenizer_json, tgt_non_granular_index=tgt_non_granular_index)
        if model_id is not None or kind is not ModelKind.Normal:
            self.options.check()

    def load(self, token_source="cache", max_seqs=16, truncate_sequence=False, logfile=None, revision=None,
             token_source_value=None, dtype=None, *, device=None, kv_cache_tokens=None, block_size=16,
             quantized_revision=None, xlora_revision=None, threads=None, prefix_caching=True,
             max_batched_tokens=2048, max_choices=Limits.max_choices,
             max_stop_strings=Limits.max_stop_strings, max_stop_length=Limits.max_stop_length,
             max_prompt_chars=Limits.max_prompt_chars, max_template_chars=Limits.max_template_chars,
             template_timeout=Limits.template_timeout, tensor_parallel_size=1):
        """Load the model and return a Runner serving it.

        Keyword-only extras: `device` (default cuda if available, else cpu), `kv_cache_tokens` (KV cache size in
        tokens; default: 90% of free GPU memory on CUDA, 8192 on CPU), `block_size` (tokens per KV block),
        `quantized_revision` (revision of quantized_model_id; default "main"; `revision` is model_id's),
        `xlora_revision` (revision of xlora_model_id; default "main"), `threads` (CPU threads of the engine, an
        int >= 1; default: torch's thread count in the calling thread, at most one per physical core),
        `prefix_caching` (reuse the KV blocks of prompt prefixes already computed; default True),
        `max_batched_tokens` (tokens one step computes at most; longer prompts are prefilled in chunks while the
        running sequences keep decoding; default 2048).
        Bounds on one request's work, each a clear ValueError when passed: `max_choices` (n_choices and best_of),
        `max_stop_strings` and `max_stop_length` (characters of each), `max_prompt_chars` (characters given to the
        tokenizer), `max_template_chars` (characters a chat template may render) and `template_timeout` (seconds
        it may run).
        `tensor_parallel_size` N > 1 splits the model over N ranks (tensor_parallel.py): this process is rank 0 and
        spawns the others, each on its own GPU (cuda:0 .. N-1 from `device`'s index) or on the CPU (gloo); under
        torchrun, every rank's script calls load() and it returns None on ranks > 0 once rank 0 closes its Runner."""
        from .runner import JsonLines, Runner, cpu_threads

        o = self.options
        if o.model_id is None and not o.kind.is_quantized:
            raise ValueError(f"{type(self).__name__} needs a model_id to load")
        o.check()
        if not isinstance(max_seqs, int) or isinstance(max_seqs, bool) or max_seqs < 1:
            raise ValueError(f"max_seqs must be an int >= 1, got {max_seqs!r}")
        threads = cpu_threads(threads)
        limits = Limits(max_choices=max_choices, max_stop_strings=max_stop_strings, max_stop_length=max_stop_length,
                        max_prompt_chars=max_prompt_chars, max_template_chars=max_template_chars,
                        template_timeout=template_timeout)
        JsonLines(logfile)  # a bad logfile or KV option fails before the model loads
        check_kv_options(kv_cache_tokens, block_size)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        shard = dict(token=hub.resolve_token(token_source, token_source_value), revision=revision,
                     quantized_revision=quantized_revision, xlora_revision=xlora_revision,
                     dtype=model_dtype(dtype, device), kv_cache_tokens=kv_cache_tokens, block_size=block_size)
        tp = self._tensor_parallel(tensor_parallel_size, device, threads, shard)
        if tp is not None and device.type == "cpu":
            threads = max(1, threads // tp.world)  # the ranks share the cores
        if tp is not None and tp.rank > 0:  # torchrun's rank > 0: serve rank 0 until its Runner closes
            workers.serve(self.load_shard(device=tp.device, tp=tp, **shard)[1])
            return None
        try:
            loaded, model_runner = self.load_shard(device=tp.device if tp else device, tp=tp, **shard)
        except BaseException:
            if tp is not None:
                tp.abort("rank 0 failed to load")
            raise
        template, special = chat_template.resolve(o.chat_template, loaded.tok_cfg)
        pipeline = Pipeline(
            model_id=loaded.model_id, model_runner=model_runner,
            tokenizer=loaded.tokenizer, chat_template=template, special_tokens=special,
            eos_token_ids=eos_ids(loaded.tokenizer, special, *loaded.eos_configs),
            max_model_len=loaded.args.max_position_embeddings, vocab_size=loaded.args.vocab_size,
            repeat_last_n=o.repeat_last_n, device=model_runner.device, dtype=shard["dtype"])
        return Runner(pipeline, max_seqs=max_seqs, truncate_sequence=truncate_sequence, logfile=logfile,
                      threads=threads, limits=limits, prefix_caching=prefix_caching,
                      max_batched_tokens=max_batched_tokens)

    def _tensor_parallel(self, n, device: torch.device, threads: int, shard: dict) -> TensorParallel | None:
        """This process's rank of an n-rank model (workers.start), None for n == 1. Checked first: what fails on every
        rank must not spawn any."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"tensor_parallel_size must be an int >= 1, got {n!r}")
        if n == 1:
            return None
        if self.options.kind.is_xlora:
            raise ValueError("tensor_parallel_size > 1 is not supported for X-LoRA models")
        workers.devices(device, n)
        return workers.start(self, n, device, max(1, threads // n), shard)

    def load_shard(self, *, token, revision, quantized_revision, xlora_revision, dtype, device, kv_cache_tokens,
                   block_size, tp: TensorParallel | None = None) -> tuple["Loaded", ModelRunner]:
        """The model (tp: this rank's shard of it), its tokenizer and KV cache, and the model runner over them."""
        o = self.options
        loaded = (self._quantized(token, revision, quantized_revision, dtype, device, tp) if o.kind.is_quantized
                  else self._normal(token, revision, dtype, device, tp))
        model, kv_sets = self._maybe_xlora(loaded.model, loaded.args, token, xlora_revision, dtype, device)
        args = loaded.args
        if tp is not None:
            model, args = tensor_parallel.attach(model, tp, args.vocab_size), local_args(args, tp.world)
        model = cpu_decode.attach(cpu_matvec_layout(model))
        blocks = kv_cache(args, dtype, device, kv_cache_tokens, block_size, kv_sets, tp)
        model_runner = ModelRunner(model, blocks, device, o.no_kv_cache, tp)
        weights = resident_bytes(model)
        model_runner.weight_bytes = tp.gather_ints(weights) if tp is not None else [weights]
        if tp is not None:
            log.info("tensor parallel: %d ranks, weights of each %s MiB", tp.world,
                     " / ".join(f"{b / 2**20:.1f}" for b in model_runner.weight_bytes))
        return loaded, model_runner

    def _normal(self, token, revision, dtype, device, tp=None) -> "Loaded":
        o, m = self.options, self.module
        files = hub.model_files(o.model_id, revision=revision, token=token, tokenizer_json=o.tokenizer_json)
        cfg = read_json(files.config)
        if cfg.get("model_type") not in m.MODEL_TYPES:
            raise ValueError(f"{o.model_id}: config.json has model_type {cfg.get('model_type')!r}, but "
                             f"{type(self).__name__} loads model_type {' or '.join(map(repr, m.MODEL_TYPES))}")
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

    def _quantized(self, token, revision, quantized_revision, dtype, device, tp=None) -> "Loaded":
        o = self.options
        model, args, qfile = self._quantized_base(token, quantized_revision, dtype, device, tp)
        tokenizer, tok_cfg, gen_cfg, eog = quantized_tokenizer(qfile, o.model_id, o.tokenizer_json, revision, token)
        cfg = {"eos_token_id": sorted(eog)}  # llama.cpp's end-of-generation set stands in for config.json's
        return Loaded(o.model_id or o.quantized_filename, model, args, tokenizer, tok_cfg, (cfg, gen_cfg))

    def _maybe_xlora(self, model, args, token, xlora_revision, dtype, device):
        """(model, KV sets): for the X-LoRA kinds, model wrapped with its adapters and classifier, and 2 KV sets,
        the scaling pass's and the real pass's (see xlora.py)."""
        o = self.options
        if not o.kind.is_xlora:
            return model, 1
        return load_xlora(model, self.module.HF_RENAMES, o.model_id, o.order_file, o.xlora_model_id,
                          args.hidden_size, dtype, device, o.tgt_non_granular_index, revision=xlora_revision or "main",
                          token=token), 2

    def _quantized_base(self, token, quantized_revision, dtype, device, tp=None):
        """(model, args, file) of a GGUF or GGML model, weights kept quantized; also the base of X-LoRA on GGUF/GGML."""
        o, m = self.options, self.module
        path = hub.quantized_path(o.quantized_model_id, o.quantized_filename, quantized_revision, token)
        if o.kind.is_gguf:
            qfile = read_gguf(path)
        elif m is not llama:
            raise ValueError(f"legacy GGML files hold Llama models only; {type(self).__name__} loads GGUF files "
                             f"(is_gguf=True)")
        else:
            qfile = read_ggml(path, gqa=o.gqa or 1)
        check_architecture(qfile, type(self))
        check_fits(f"{path}: the weights", quantized_weight_bytes(qfile, dtype) // (tp.world if tp else 1), device)
        model, args = load_gguf_model(m, qfile, dtype, device, tp)
        return model, args, qfile


@dataclass
class Loaded:
    """A model and its tokenizer as read from the files, before X-LoRA and the KV cache."""
    model_id: str
    model: torch.nn.Module
    args: object
    tokenizer: object
    tok_cfg: dict
    eos_configs: tuple[dict, dict]  # config.json-like and generation_config.json-like dicts with eos_token_id


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


def quantized_weight_bytes(qfile, dtype: torch.dtype) -> int:
    """What a GGUF/GGML file's weights take once loaded: quantized tensors keep their bytes, float ones become dtype."""
    return sum(t.data.nbytes if t.quantized else math.prod(t.shape) * dtype.itemsize for t in qfile.tensors.values())


def check_kv_options(kv_cache_tokens, block_size) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or not 1 <= block_size <= MAX_BLOCK_SIZE:
        raise ValueError(f"block_size must be an int in [1, {MAX_BLOCK_SIZE}], got {block_size!r}")
    if kv_cache_tokens is not None and (isinstance(kv_cache_tokens, bool) or not isinstance(kv_cache_tokens, int)
                                        or kv_cache_tokens < block_size):
        raise ValueError(f"kv_cache_tokens must be an int >= block_size ({block_size}) or None, "
                         f"got {kv_cache_tokens!r}")


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


class MistralLoader(ArchLoader):
    module = mistral


class GemmaLoader(ArchLoader):
    module = gemma


class LlamaLoader(ArchLoader):
    module = llama


class MixtralLoader(ArchLoader):
    module = mixtral


class Phi2Loader(ArchLoader):
    module = phi2


ARCH_LOADERS = (LlamaLoader, MistralLoader, MixtralLoader, GemmaLoader, Phi2Loader)


def check_architecture(qfile, loader: type[ArchLoader]) -> None:
    """The file's general.architecture must be one the loader's model file reads; else name the loaders that do."""
    arch = qfile.metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise ValueError(f"{qfile.path}: GGUF metadata has no 'general.architecture'")
    if arch in loader.module.GGUF_ARCHITECTURES:
        return
    fits = [c.__name__ for c in ARCH_LOADERS if arch in c.module.GGUF_ARCHITECTURES]
    known = dict.fromkeys(a for c in ARCH_LOADERS for a in c.module.GGUF_ARCHITECTURES)
    hint = (f"load it with {', '.join(fits[:-1])} or {fits[-1]}" if len(fits) > 1 else f"load it with {fits[0]}"
            ) if fits else f"mistralrs has no loader for it; supported: {', '.join(known)}"
    raise ValueError(f"{qfile.path} holds a {arch!r} model (general.architecture), which {loader.__name__} does not "
                     f"load; {hint}")


def _arch(loader_class) -> type[ArchLoader]:
    if isinstance(loader_class, ArchLoader):
        return type(loader_class)
    if isinstance(loader_class, type) and issubclass(loader_class, ArchLoader) and loader_class is not ArchLoader:
        return loader_class
    raise TypeError("the first argument must be one of MistralLoader, GemmaLoader, LlamaLoader, MixtralLoader, "
                    f"Phi2Loader (the class or an instance), got {loader_class!r}")


class _Wrapper:
    def load(self, token_source="cache", max_seqs=16, truncate_sequence=False, logfile=None, revision=None,
             token_source_value=None, dtype=None, **extras):
        return self.inner.load(token_source, max_seqs, truncate_sequence, logfile, revision, token_source_value,
                               dtype, **extras)
    load.__doc__ = ArchLoader.load.__doc__


class NormalLoader(_Wrapper):
    def __init__(self, loader_class, /, model_id, no_kv_cache=False, use_flash_attn=None, repeat_last_n=64, gqa=None,
                 chat_template=None, tokenizer_json=None):
        self.inner = _arch(loader_class)(model_id, ModelKind.Normal, no_kv_cache=no_kv_cache,
                                         use_flash_attn=use_flash_attn, repeat_last_n=repeat_last_n, gqa=gqa,
                                         chat_template=chat_template, tokenizer_json=tokenizer_json)


class XLoraLoader(_Wrapper):
    def __init__(self, loader_class, /, model_id, no_kv_cache=False, use_flash_attn=None, repeat_last_n=64, gqa=None,
                 order_file=None, xlora_model_id=None, chat_template=None, tokenizer_json=None,
                 tgt_non_granular_index=None):
        self.inner = _arch(loader_class)(model_id, ModelKind.XLoraNormal, no_kv_cache=no_kv_cache,
                                         use_flash_attn=use_flash_attn, repeat_last_n=repeat_last_n, gqa=gqa,
                                         order_file=order_file, xlora_model_id=xlora_model_id,
                                         chat_template=chat_template, tokenizer_json=tokenizer_json,
                                         tgt_non_granular_index=tgt_non_granular_index)


class QuantizedLoader(_Wrapper):
    def __init__(self, loader_class, /, model_id, is_gguf, no_kv_cache=False, use_flash_attn=None, repeat_last_n=64,
                 gqa=None, quantized_model_id=None, quantized_filename=None, chat_template=None, tokenizer_json=None):
        kind = ModelKind.QuantizedGGUF if _is_gguf(is_gguf) else ModelKind.QuantizedGGML
        self.inner = _arch(loader_class)(model_id, kind, no_kv_cache=no_kv_cache, use_flash_attn=use_flash_attn,
                                         repeat_last_n=repeat_last_n, gqa=gqa, quantized_model_id=quantized_model_id,
                                         quantized_filename=quantized_filename, chat_template=chat_template,
                                         tokenizer_json=tokenizer_json)


class XLoraQuantizedLoader(_Wrapper):
    def __init__(self, loader_class, /, model_id, is_gguf, no_kv_cache=False, use_flash_attn=None, repeat_last_n=64,
                 gqa=1, order_file=None, quantized_model_id=None, quantized_filename=None, xlora_model_id=None,
                 chat_template=None, tokenizer_json=None, tgt_non_granular_index=None):
        kind = ModelKind.XLoraGGUF if _is_gguf(is_gguf) else ModelKind.XLoraGGML
        self.inner = _arch(loader_class)(model_id, kind, no_kv_cache=no_kv_cache, use_flash_attn=use_flash_attn,
                                         repeat_last_n=repeat_last_n, gqa=gqa, order_file=order_file,
                                         quantized_model_id=quantized_model_id, quantized_filename=quantized_filename,
                                         xlora_model_id=xlora_model_id, chat_template=chat_template,
                                         tokenizer_json=tokenizer_json, tgt_non_granular_index=tgt_non_granular_index)


def _is_gguf(is_gguf) -> bool:
    if not isinstance(is_gguf, bool):
        raise TypeError(f"is_gguf must be a bool (True for GGUF, False for legacy GGML), got {is_gguf!r}")
    return is_gguf
