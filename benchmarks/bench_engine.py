"""Engine overhead per token: what a decode step costs outside the model.

Definition: at batch 1, over a 128-token greedy completion of the demo model (or MISTRALRS_BENCH_MODEL), each decode
step's wall time, from the start of one model forward to the start of the next, less the time spent inside the
model (its forward and its logits, GPU-synchronised). What is left is the engine's own work per token: the inbox,
the scheduler, the attention metadata, sampling, detokenizing, stop checks and the response or chunk JSON. The
figure is the median over every decode step of five requests (the prefill step is left out).

engine_overhead_cpu_ms is the same with the engine thread's CPU time in place of wall time: on a busy machine the
wall figure also counts the time the thread waits for a core, the CPU figure does not.
"""
import os
import statistics
import time

import pytest
import torch

import mistralrs
from mistralrs import CompletionRequest
from mistralrs.cli import ARCHS, DEMO_MODEL

MODEL = os.environ.get("MISTRALRS_BENCH_MODEL", str(DEMO_MODEL))
ARCH = os.environ.get("MISTRALRS_BENCH_ARCH", "llama")
TOKENS = 128


class TimedModel:
    """The model with its calls timed; each forward opens a step. calls[i] = [start, seconds inside the model] in
    wall time, cpu_calls[i] the same in the calling (engine) thread's CPU time."""

    def __init__(self, model):
        self.model, self.calls, self.cpu_calls = model, [], []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def _timed(self, fn, *args, **kw):
        start, cpu_start = time.perf_counter(), time.thread_time()
        out = fn(*args, **kw)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out, (start, time.perf_counter() - start), (cpu_start, time.thread_time() - cpu_start)

    def __call__(self, *args, **kw):
        out, wall, cpu = self._timed(self.model, *args, **kw)
        self.calls.append(list(wall))
        self.cpu_calls.append(list(cpu))
        return out

    def logits(self, hidden):
        out, wall, cpu = self._timed(self.model.logits, hidden)
        self.calls[-1][1] += wall[1]
        self.cpu_calls[-1][1] += cpu[1]
        return out


@pytest.fixture(scope="module")
def timed_runner():
    with mistralrs.NormalLoader(ARCHS[ARCH], model_id=MODEL).load(token_source="none") as r:
        model_runner = r.pipeline.model_runner
        timed = model_runner.model = TimedModel(model_runner.model)
        # the model runner binds its forward at construction: route it through the timed model too
        model_runner.forward = lambda ids, positions, meta, kv_caches, seqs: timed(ids, positions, meta, kv_caches)
        yield r, timed


def outside(calls) -> list[float]:
    """Per decode step: the time from its forward's start to the next forward's start, less the model's time."""
    return [(calls[i + 1][0] - calls[i][0]) - calls[i][1] for i in range(1, len(calls) - 1)]


def decode_overheads(runner, timed, stream: bool) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds outside the model for each decode step of one 128-token completion."""
    timed.calls.clear()
    timed.cpu_calls.clear()
    reply = runner.send_completion_request(CompletionRequest("The import statement", "bench", max_tokens=TOKENS,
                                                             temperature=0, stream=stream))
    if stream:
        for _ in reply:
            pass
    return outside(timed.calls), outside(timed.cpu_calls)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_engine_overhead_per_token(benchmark, record, timed_runner, stream):
    runner, timed = timed_runner
    rounds = []
    benchmark.pedantic(lambda: rounds.append(decode_overheads(runner, timed, stream)), rounds=5, warmup_rounds=1)
    wall = sorted(s for w, _ in rounds[1:] for s in w)  # rounds[0] is pedantic's warm-up
    cpu = [s for _, c in rounds[1:] for s in c]
    forward = statistics.median(s for _, s in timed.calls[1:])
    record(model=MODEL, batch=1, completion_tokens=TOKENS, decode_steps=len(wall),
           engine_overhead_ms=statistics.median(wall) * 1e3, engine_overhead_p90_ms=wall[int(0.9 * len(wall))] * 1e3,
           engine_overhead_cpu_ms=statistics.median(cpu) * 1e3, model_forward_ms=forward * 1e3)
