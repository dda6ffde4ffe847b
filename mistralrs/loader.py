"""The loaders of the API: five architecture classes and the four wrappers that pick a model kind. load() checks its
arguments, has load/model.py load the model, and returns the Runner serving it."""
import os
from dataclasses import dataclass

import torch

from .load import hub
from .load.model import check_kv_options, load_pipeline
from .models import gemma, llama, mistral, mixtral, phi2
from .requests import Limits, ModelKind, model_dtype
from .runner import JsonLines, Runner, cpu_threads


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
        `tensor_parallel_size` N > 1 splits the model over N ranks (tensor_parallel/): this process is rank 0 and
        spawns the others, each on its own GPU (cuda:0 .. N-1 from `device`'s index) or on the CPU (gloo); under
        torchrun, every rank's script calls load() and it returns None on ranks > 0 once rank 0 closes its Runner."""
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
        lines = JsonLines(logfile)  # a bad logfile or KV option fails before the model loads
        check_kv_options(kv_cache_tokens, block_size)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        pipeline = load_pipeline(
            self, device=device, threads=threads, tensor_parallel_size=tensor_parallel_size,
            token=hub.resolve_token(token_source, token_source_value), revision=revision,
            quantized_revision=quantized_revision, xlora_revision=xlora_revision, dtype=model_dtype(dtype, device),
            kv_cache_tokens=kv_cache_tokens, block_size=block_size)
        if pipeline is None:  # torchrun's rank > 0: it served rank 0, which has closed its Runner
            return None
        return Runner(pipeline, max_seqs=max_seqs, truncate_sequence=truncate_sequence, log=lines, limits=limits,
                      prefix_caching=prefix_caching, max_batched_tokens=max_batched_tokens)


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
