"""The CPU kernels' thread team (kernels/threads_cpu.cpp): a decode gives the same logits at any thread count, the
engine thread starts no OpenMP pool of its own, and concurrent callers share the team safely."""
import threading

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import mistralrs
from mistralrs import kernels
from mistralrs.engine.sequence import Sequence
from mistralrs.kernels import cpu_ext, gguf_cpu
from mistralrs.kernels.dequant import dequantize

from helpers import ARCHS, Driver, gguf_quantized, load, run_python

pytestmark = pytest.mark.skipif(cpu_ext.UNAVAILABLE is not None, reason=f"{cpu_ext.UNAVAILABLE}")
PROMPT_IDS = [1, 17, 42, 99, 7, 3, 250, 11, 64, 5, 120, 33]  # prefill (12 rows) then 6 decode steps


def engine_logits(runner, n: int = 6) -> torch.Tensor:
    """[1 + n, V]: a prefill's last logits then n greedy decode steps', computed on the engine thread (its team)."""
    out = []

    def run():
        d, seq = Driver(runner), Sequence(list(PROMPT_IDS))
        for _ in range(n + 1):
            out.append(d.step([seq]))
            seq.tokens.append(int(out[-1].argmax(-1)))
        d.finish(seq)
    runner.engine.call(run)
    return torch.cat(out)


def load_gguf(path, threads):
    loader = mistralrs.QuantizedLoader(ARCHS["llama"], model_id=None, is_gguf=True, quantized_model_id="",
                                       quantized_filename=str(path))
    return loader.load(token_source="none", threads=threads, kv_cache_tokens=256)


@pytest.mark.parametrize("weights", ["f32-safetensors", "q8_0", "q4_0"])
def test_decode_logits_are_identical_at_1_2_and_3_threads(tiny_models, gguf_file, weights):
    logits = []
    for threads in (1, 2, 3):
        runner = (load(tiny_models["llama"], "llama", threads=threads, kv_cache_tokens=256)
                  if weights == "f32-safetensors" else load_gguf(gguf_file("llama", weights), threads))
        with runner:
            logits.append(engine_logits(runner))
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])


def test_the_engine_thread_starts_no_openmp_pool(tiny_models):
    """A second libgomp pool (one per thread that runs a parallel region) throttles every pool's spinning: the
    engine thread's torch ops run serially, so serving (a prefill, decodes, a parallel-sized torch op on the engine
    thread) adds the team's worker and no other thread."""
    out = run_python("""
import os, sys, torch
from helpers import load
from mistralrs import CompletionRequest
torch.ones(1 << 22).sum()  # the main thread's pool exists, as after any load
names = lambda: {t: open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")}
with load(sys.argv[1], "llama", threads=2) as runner:
    before = names()
    runner.send_completion_request(CompletionRequest(" ".join(["hello world"] * 40), "m", max_tokens=8,
                                                     temperature=0))
    runner.engine.call(lambda: torch.softmax(torch.randn(1 << 20), 0))
    print(sorted(name for t, name in names().items() if t not in before))
""", str(tiny_models["llama"]), env={"TOKENIZERS_PARALLELISM": "false"})  # no rayon pool for the tokenizer
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "['mistralrs-cpu']"


def test_concurrent_callers_get_their_own_results():
    """Callers on several threads at once: one runs on the team, the others find it busy and run on their own
    thread; each result is the one a lone call gives."""
    N, K = 300, 256
    w = torch.from_numpy(gguf_quantized(Q.Q8_0, N, K, np.random.default_rng(0)))
    xs = [torch.randn(1 + i % 3, K) for i in range(6)]
    expect = [gguf_cpu.gguf_matmul(x, w, Q.Q8_0, N, K) for x in xs]
    got, errors = [None] * len(xs), []

    def call(i):
        try:
            for _ in range(50):
                got[i] = gguf_cpu.gguf_matmul(xs[i], w, Q.Q8_0, N, K)
                assert torch.equal(got[i], expect[i])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    ref = xs[0] @ dequantize(w, Q.Q8_0, (N, K)).T
    torch.testing.assert_close(got[0], ref, atol=2e-2 * ref.abs().max().item(), rtol=0)


def test_set_cpu_threads_applies_to_the_calling_thread_only():
    seen = []

    def engine_like():
        kernels.set_cpu_threads(3)
        seen.append((kernels.cpu_threads(), torch.get_num_threads()))
    t = threading.Thread(target=engine_like)
    t.start()
    t.join()
    assert seen == [(3, 1)]  # the team's count; torch's own ops there run serially
    assert kernels.cpu_threads() == torch.get_num_threads()  # this thread still follows torch's count
