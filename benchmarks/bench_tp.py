"""Tensor parallelism: what the collectives cost per decode step, and the decode speed at N ranks against one.

The demo model (or MISTRALRS_BENCH_MODEL / MISTRALRS_BENCH_ARCH, or a GGUF file MISTRALRS_BENCH_GGUF) decodes a 64-token greedy completion at batch 1
and at batch 8 with tensor_parallel_size N = 1, 2 (CPU, gloo) or 1, 2, 4, 8 up to the GPU count (NCCL; one GPU:
N = 1 only). Rank 0 times
every collective it takes part in (the step's broadcast, the all-reduces after each attention and MLP and of the
embedding, the logits gather): comm_us_per_step is their wall time per decode step, comm_share its share of the
step. On the CPU the ranks also share the cores (each gets threads / N), so N > 1 measures overhead, not scaling;
on GPUs NCCL's collectives are asynchronous and rank 0's figure counts their launch and the waits that block it.
"""
import json
import os
import threading
import time

import pytest
import torch

import mistralrs
from mistralrs import CompletionRequest
from mistralrs.cli import ARCHS, DEMO_MODEL

MODEL = os.environ.get("MISTRALRS_BENCH_MODEL", str(DEMO_MODEL))
ARCH = os.environ.get("MISTRALRS_BENCH_ARCH", "llama")
GGUF = os.environ.get("MISTRALRS_BENCH_GGUF")  # e.g. the real Gemma 3 270M Q4_K_M of tools/real_models.py
TOKENS = 64
SIZES = [n for n in (1, 2, 4, 8) if n <= torch.cuda.device_count()] if torch.cuda.is_available() else [1, 2]
ONE_RANK: dict[int, float] = {}  # batch -> tok/s at N = 1, for the ratio


def decode(runner, batch: int) -> tuple[float, int, int]:
    """(seconds, completion tokens, decode steps) of `batch` concurrent greedy completions of up to 64 tokens."""
    tokens = [0] * batch

    def one(i):
        reply = runner.send_completion_request(CompletionRequest(f"The import statement {i}", "bench",
                                                                 max_tokens=TOKENS, temperature=0))
        tokens[i] = json.loads(reply)["usage"]["completion_tokens"]
    threads = [threading.Thread(target=one, args=(i,)) for i in range(batch)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, sum(tokens), max(tokens)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("n", SIZES, ids=[f"tp{n}" for n in SIZES])
def test_tensor_parallel_decode(benchmark, record, n, batch):
    loader = (mistralrs.QuantizedLoader(ARCHS[ARCH], model_id=None, is_gguf=True, quantized_model_id="",
                                        quantized_filename=GGUF) if GGUF
              else mistralrs.NormalLoader(ARCHS[ARCH], model_id=MODEL))
    with loader.load(token_source="none", tensor_parallel_size=n, kv_cache_tokens=4096) as runner:
        tp = runner.pipeline.model_runner.tp
        decode(runner, batch)  # warm-up: kernels built, tables sized
        comm = (tp.comm_seconds, tp.comm_calls) if tp else (0.0, 0)
        seconds, tokens, steps = benchmark.pedantic(lambda: decode(runner, batch), rounds=1, iterations=1)
        comm_s, calls = ((tp.comm_seconds - comm[0], tp.comm_calls - comm[1]) if tp else (0.0, 0))
        weights = runner.stats()["weight_bytes"]
    tok_s = tokens / seconds
    if n == 1:
        ONE_RANK[batch] = tok_s
    step = seconds / steps
    record(model=GGUF or MODEL, tensor_parallel_size=n, batch=batch, decode_tok_s=tok_s, step_ms=step * 1e3,
           comm_us_per_step=comm_s / steps * 1e6, comm_share=comm_s / seconds,
           collectives_per_step=calls / steps, weight_mib_per_rank=[round(b / 2**20, 2) for b in weights],
           **({"speedup_vs_tp1": tok_s / ONE_RANK[batch]} if batch in ONE_RANK and n > 1 else {}))
