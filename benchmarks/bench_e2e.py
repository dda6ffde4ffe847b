"""End to end through the Runner: prefill tok/s, decode tok/s at batch 1 and at max_seqs, time to first token, and
the throughput of many concurrent requests; transformers' generate on the same checkpoint is the peer.

The model is the built-in demo model unless MISTRALRS_BENCH_MODEL (a local directory or hub id) and
MISTRALRS_BENCH_ARCH (llama, mistral, gemma, mixtral, phi2) say otherwise.
"""
import json
import os
import threading
import time

import pytest
import torch
from conftest import timed

import mistralrs
from mistralrs import ChatCompletionRequest, CompletionRequest
from mistralrs.__main__ import ARCHS, DEMO_MODEL

MODEL = os.environ.get("MISTRALRS_BENCH_MODEL", str(DEMO_MODEL))
ARCH = os.environ.get("MISTRALRS_BENCH_ARCH", "llama")
MAX_SEQS = 16
PROMPT = "The import statement " * 40  # about 160 tokens


@pytest.fixture(scope="module")
def runner():
    with mistralrs.NormalLoader(ARCHS[ARCH], model_id=MODEL).load(token_source="none", max_seqs=MAX_SEQS) as r:
        yield r


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return (AutoModelForCausalLM.from_pretrained(MODEL, dtype=dtype).to(device).eval(),
            AutoTokenizer.from_pretrained(MODEL), device)


def complete(runner, prompt, max_tokens, **kw):
    return json.loads(runner.send_completion_request(
        CompletionRequest(prompt, "bench", max_tokens=max_tokens, temperature=0, **kw)))


def test_prefill(benchmark, record, runner):
    n = complete(runner, PROMPT, 1)["usage"]["prompt_tokens"]
    benchmark.pedantic(lambda: complete(runner, PROMPT, 1), rounds=5, warmup_rounds=1)
    record(model=MODEL, prompt_tokens=n, prefill_tok_s=n / benchmark.stats.stats.median)


def test_decode_batch1_and_ttft(benchmark, record, runner, hf):
    tokens = 64

    def stream():
        start, first = time.perf_counter(), None
        for chunk in runner.send_chat_completion_request(ChatCompletionRequest(
                "The import statement", "bench", max_tokens=tokens, temperature=0, stream=True)):
            first = first or time.perf_counter()
            usage = json.loads(chunk).get("usage") or {}
        return first - start, time.perf_counter() - first, usage.get("completion_tokens", tokens)

    benchmark.pedantic(stream, rounds=3, warmup_rounds=1)
    ttft, rest, n = stream()
    model, tok, device = hf
    ids = tok("The import statement", return_tensors="pt").input_ids.to(device)
    gen = lambda: model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    peer = timed(gen, reps=3)
    ours = benchmark.stats.stats.median
    record(model=MODEL, completion_tokens=n, ttft_ms=ttft * 1e3, decode_tok_s=(n - 1) / rest,
           transformers_tok_s=tokens / peer, speedup_vs_transformers=(n / ours) / (tokens / peer))


def test_decode_at_max_seqs(benchmark, record, runner):
    def batch():
        out = [None] * MAX_SEQS

        def one(i):
            out[i] = complete(runner, f"Question {i}: what does", 48, seed=i)
        threads = [threading.Thread(target=one, args=(i,)) for i in range(MAX_SEQS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(r["usage"]["completion_tokens"] for r in out)

    n = batch()
    benchmark.pedantic(batch, rounds=3, warmup_rounds=1)
    record(model=MODEL, sequences=MAX_SEQS, completion_tokens=n, decode_tok_s=n / benchmark.stats.stats.median)


def test_concurrent_requests(benchmark, record, runner):
    requests = [(f"Item {i}. " * (1 + i % 7), 8 + 4 * (i % 5)) for i in range(64)]

    def serve():
        total = [0] * 8

        def worker(k):
            for prompt, m in requests[k::8]:
                total[k] += complete(runner, prompt, m)["usage"]["completion_tokens"]
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(total)

    n = serve()
    benchmark.pedantic(serve, rounds=2, warmup_rounds=0)
    record(model=MODEL, requests=64, threads=8, max_seqs=MAX_SEQS, completion_tokens=n,
           throughput_tok_s=n / benchmark.stats.stats.median)
