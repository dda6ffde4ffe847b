"""End to end through the Runner: prefill tok/s, decode tok/s at batch 1 and at max_seqs, time to first token, and
the throughput of many concurrent requests; transformers' generate on the same checkpoint is the peer. Then prefix
caching (time to first token behind a cached 1,024-token system prompt, 64 chats sharing one, on vs off) and chunked
prefill (the p99 gap between a running stream's tokens while long prompts arrive, chunked vs not). The measured
runner has prefix caching off, so that repeated prompts measure prefill.

The model is the built-in demo model unless MISTRALRS_BENCH_MODEL (a local directory or hub id) and
MISTRALRS_BENCH_ARCH (llama, mistral, gemma, mixtral, phi2) say otherwise.
"""
import json
import os
import shutil
import statistics
import threading
import time

import pytest
import torch
from conftest import timed

import mistralrs
from mistralrs import ChatCompletionRequest, CompletionRequest
from mistralrs.cli import ARCHS, DEMO_MODEL

MODEL = os.environ.get("MISTRALRS_BENCH_MODEL", str(DEMO_MODEL))
ARCH = os.environ.get("MISTRALRS_BENCH_ARCH", "llama")
MAX_SEQS = 16
PROMPT = "The import statement " * 40  # about 160 tokens


@pytest.fixture(scope="module")
def runner():
    with mistralrs.NormalLoader(ARCHS[ARCH], model_id=MODEL).load(token_source="none", max_seqs=MAX_SEQS,
                                                                  prefix_caching=False) as r:
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


SYSTEM = "You answer questions about the Python standard library, briefly and with one example. " * 64


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """MODEL allowed 4,096 positions (the demo model was trained on 512: rotary runs at any position, and these
    rows time the engine, not the answers)."""
    if not os.path.isdir(MODEL):
        return MODEL
    path = tmp_path_factory.mktemp("long")
    for f in os.listdir(MODEL):
        shutil.copy(os.path.join(MODEL, f), path / f)
    cfg = json.loads((path / "config.json").read_text())
    cfg["max_position_embeddings"] = max(cfg.get("max_position_embeddings", 0), 4096)
    (path / "config.json").write_text(json.dumps(cfg))
    return str(path)


def load_long(model, **kw):
    return mistralrs.NormalLoader(ARCHS[ARCH], model_id=model).load(token_source="none", kv_cache_tokens=65536, **kw)


def system_prompt(runner, n_tokens=1024) -> str:
    ids = runner.pipeline.tokenizer.encode(SYSTEM).ids[:n_tokens]
    return runner.pipeline.tokenizer.decode(ids)


def ttft(runner, prompt) -> float:
    start = time.perf_counter()
    for _ in runner.send_completion_request(CompletionRequest(prompt, "bench", max_tokens=1, temperature=0,
                                                              stream=True)):
        return time.perf_counter() - start


def test_prefix_cache_ttft(benchmark, record, long_model):
    with load_long(long_model) as on, load_long(long_model, prefix_caching=False) as off:
        system = system_prompt(on)
        ttft(on, system + " Question 0?")  # the system prompt's blocks are cached from here on
        cold = statistics.median(ttft(off, system + f" Question {i}?") for i in range(1, 4))
        benchmark.pedantic(lambda: ttft(on, system + " Question 5?"), rounds=5, warmup_rounds=1)
        warm = benchmark.stats.stats.median
        stats = on.stats()
    record(model=MODEL, system_prompt_tokens=1024, ttft_uncached_ms=cold * 1e3, ttft_cached_ms=warm * 1e3,
           speedup=cold / warm, hit_rate=stats["prefix_cache_hit_rate"])


def chats(runner, system, n=64, max_tokens=16) -> int:
    out = [0] * n

    def one(i):
        out[i] = complete(runner, system + f" Question {i}: what does module {i} do?", max_tokens)["usage"][
            "completion_tokens"]
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(out)


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["cache_on", "cache_off"])
def test_shared_system_prompt_throughput(benchmark, record, long_model, prefix_caching):
    with load_long(long_model, max_seqs=MAX_SEQS, prefix_caching=prefix_caching) as r:
        system = system_prompt(r, 512)
        n = chats(r, system)
        benchmark.pedantic(lambda: chats(r, system), rounds=1, warmup_rounds=0)
    record(model=MODEL, chats=64, system_prompt_tokens=512, prefix_caching=prefix_caching, completion_tokens=n,
           throughput_tok_s=n / benchmark.stats.stats.median)


@pytest.mark.parametrize("budget", [256, 1 << 20], ids=["chunked_256", "unchunked"])
def test_chunked_prefill_inter_token_latency(benchmark, record, long_model, budget):
    """8 streams decode while 4 prompts of ~2,000 tokens arrive one after another: the p99 and max gap between a
    stream's tokens (a whole long prefill, unchunked; a chunk's share of a step, chunked)."""
    gaps = []

    def streams_with_long_prompts():
        gaps.clear()

        def stream(i):
            last = None
            for _ in r.send_completion_request(CompletionRequest(f"Stream {i}: the os module", "bench",
                                                                 max_tokens=96, temperature=0, stream=True)):
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now
        threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(0.05)
        for k in range(4):
            complete(r, system_prompt(r, 2000) + f" Long {k}?", 1)
        for t in threads:
            t.join()

    with load_long(long_model, max_seqs=MAX_SEQS, prefix_caching=False, max_batched_tokens=budget) as r:
        streams_with_long_prompts()
        benchmark.pedantic(streams_with_long_prompts, rounds=1, warmup_rounds=0)
    gaps.sort()
    record(model=MODEL, max_batched_tokens=budget, streams=8, long_prompts=4,
           p99_gap_ms=gaps[int(0.99 * (len(gaps) - 1))] * 1e3, max_gap_ms=gaps[-1] * 1e3,
           median_gap_ms=statistics.median(gaps) * 1e3)
