"""What the demo (`python -m mistralrs`) and the server (`mistralrs-server`, `python -m mistralrs serve`) share: the
flags that choose a loader and load()'s arguments, and the Runner they describe."""
import argparse
from pathlib import Path

import mistralrs

DEMO_MODEL = Path(__file__).parent / "data" / "demo-llama"
ARCHS = {"llama": mistralrs.LlamaLoader, "mistral": mistralrs.MistralLoader, "gemma": mistralrs.GemmaLoader,
         "mixtral": mistralrs.MixtralLoader, "phi2": mistralrs.Phi2Loader}
DTYPES = {"f32": mistralrs.DType.F32, "f16": mistralrs.DType.F16, "bf16": mistralrs.DType.BF16}


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """The loader's choice and load()'s arguments, shared by the demo and the server."""
    ap.add_argument("--model-id", help="local directory or hub id (default: the built-in demo model; with --gguf, "
                                       "the tokenizer repo, default: the GGUF's own tokenizer)")
    ap.add_argument("--arch", choices=ARCHS, default="llama")
    ap.add_argument("--gguf", help="GGUF file (local path, or a filename in --quantized-model-id)")
    ap.add_argument("--quantized-model-id", default="", help="hub repo holding --gguf ('' = local path)")
    ap.add_argument("--xlora-model-id", help="X-LoRA adapters repo (with --order-file)")
    ap.add_argument("--order-file", help="X-LoRA ordering file")
    ap.add_argument("--tgt-non-granular-index", type=int)
    ap.add_argument("--chat-template", help="a Jinja template, a template file or a JSON file with chat_template")
    ap.add_argument("--tokenizer-json")
    ap.add_argument("--dtype", choices=DTYPES, help="weights dtype (default: bf16 on CUDA, f32 on CPU)")
    ap.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    ap.add_argument("--max-seqs", type=int, default=16)
    ap.add_argument("--kv-cache-tokens", type=int, help="KV cache size in tokens")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--threads", type=int, help="CPU threads of the engine (default: one per physical core)")
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--max-batched-tokens", type=int, default=2048)
    ap.add_argument("--tensor-parallel-size", type=int, default=1,
                    help="split the model over N GPUs (or CPU processes); under torchrun, its world size")
    ap.add_argument("--truncate-sequence", action="store_true")
    ap.add_argument("--token-source", default="cache", choices=["cache", "literal", "envvar", "path", "none"])
    ap.add_argument("--token-source-value")


def load(a):
    """The Runner the flags describe (None on torchrun's ranks > 0, once rank 0 has closed)."""
    return make_loader(a).load(
        token_source=a.token_source, token_source_value=a.token_source_value, max_seqs=a.max_seqs,
        truncate_sequence=a.truncate_sequence, dtype=DTYPES.get(a.dtype), device=a.device,
        kv_cache_tokens=a.kv_cache_tokens, block_size=a.block_size, threads=a.threads,
        prefix_caching=not a.no_prefix_caching, max_batched_tokens=a.max_batched_tokens,
        tensor_parallel_size=a.tensor_parallel_size)


def make_loader(a):
    common = dict(chat_template=a.chat_template, tokenizer_json=a.tokenizer_json)
    xlora = dict(order_file=a.order_file, xlora_model_id=a.xlora_model_id,
                 tgt_non_granular_index=a.tgt_non_granular_index)
    if a.gguf:
        quant = dict(model_id=a.model_id, is_gguf=True, quantized_model_id=a.quantized_model_id,
                     quantized_filename=a.gguf, **common)
        if a.xlora_model_id:
            return mistralrs.XLoraQuantizedLoader(ARCHS[a.arch], **quant, **xlora)
        return mistralrs.QuantizedLoader(ARCHS[a.arch], **quant)
    model_id = a.model_id or str(DEMO_MODEL)
    if a.xlora_model_id:
        return mistralrs.XLoraLoader(ARCHS[a.arch], model_id=model_id, **common, **xlora)
    return mistralrs.NormalLoader(ARCHS[a.arch], model_id=model_id, **common)
