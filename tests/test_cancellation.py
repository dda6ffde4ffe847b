"""Cancellation: a stream closed, dropped or left by its `with` block, Runner.abort and a request's timeout each
end the request at the engine's next step and free its KV blocks; abandoned streams do not slow anyone else."""
import gc
import json
import random
import threading
import time

import pytest

import mistralrs
from mistralrs import ChatCompletionRequest, CompletionRequest, RequestAborted

from helpers import ARCHS, PROMPT

LONG = 400  # tokens: far more than any test waits for (the tiny model's length is 512)


def load(tiny_models, **kw):
    loader = mistralrs.NormalLoader(ARCHS["llama"], model_id=str(tiny_models["llama"]))
    return loader.load(token_source="none", **kw)


@pytest.fixture(scope="module")
def runner(tiny_models):
    with load(tiny_models, max_seqs=16) as r:
        yield r


def engine_state(runner):
    """(requests in flight, sequences scheduled, free blocks, all blocks), read on the engine thread."""
    out = []
    s = runner.scheduler
    runner.engine.call(lambda: out.append((len(runner.engine.live), len(s.running) + len(s.waiting),
                                           s.blocks.num_free, s.blocks.num_blocks)))
    return out[0]


def wait_idle(runner, timeout=30):
    """Wait until nothing is in flight; the cache must then be entirely free."""
    deadline = time.monotonic() + timeout
    while True:
        live, seqs, free, total = engine_state(runner)
        if (live, seqs) == (0, 0):
            assert free == total, f"{total - free} KV blocks still held with nothing in flight"
            return
        assert time.monotonic() < deadline, f"still {live} requests / {seqs} sequences in flight"
        time.sleep(0.01)


def long_stream(runner, **kw):
    return runner.send_completion_request(CompletionRequest(PROMPT, "m", max_tokens=LONG, stream=True, **kw))


def test_close_ends_the_stream_and_frees_its_blocks(runner):
    s = long_stream(runner)
    assert s.id.startswith("cmpl-")  # known before the first chunk
    first = json.loads(next(s))
    assert first["id"] == s.id
    s.close()
    with pytest.raises(StopIteration):
        next(s)
    wait_idle(runner)


def test_a_dropped_stream_is_aborted(runner):
    s = long_stream(runner)
    next(s)
    del s
    gc.collect()
    wait_idle(runner, timeout=5)  # LONG tokens would take far longer


def test_leaving_the_with_block_aborts_the_stream(runner):
    with long_stream(runner) as s:
        next(s)
    wait_idle(runner, timeout=5)
    chat = ChatCompletionRequest([{"role": "user", "content": "hi"}], "m", max_tokens=LONG, stream=True)
    for _ in runner.send_chat_completion_request(chat):
        break  # the loop variable's streamer is dropped right after
    gc.collect()
    wait_idle(runner, timeout=5)


def test_runner_abort_ends_a_waiting_caller(runner):
    got = []

    def caller():
        try:
            runner.send_completion_request(CompletionRequest(PROMPT, "m", max_tokens=LONG, request_id="job-1"))
        except Exception as e:
            got.append(e)

    t = threading.Thread(target=caller)
    t.start()
    while engine_state(runner)[0] == 0:
        time.sleep(0.005)
    runner.abort("job-1")
    t.join(10)
    assert not t.is_alive() and isinstance(got[0], RequestAborted)
    wait_idle(runner)
    s = long_stream(runner)
    runner.abort(s.id)
    with pytest.raises(RequestAborted):
        for _ in s:
            pass
    runner.abort("no-such-request")  # ignored
    with pytest.raises(TypeError):
        runner.abort(3)
    wait_idle(runner)


def hold_engine(runner, seconds: float) -> threading.Thread:
    """Keep the engine thread busy for `seconds`, as a long step would: the tiny model decodes LONG tokens in well
    under the timeouts below, so a test that needs a request still in flight when its time is up holds the engine."""
    t = threading.Thread(target=runner.engine.call, args=(lambda: time.sleep(seconds),))
    t.start()
    return t


def test_a_timeout_aborts_and_raises_in_the_caller(runner):
    t0 = time.monotonic()
    held = hold_engine(runner, 0.5)
    with pytest.raises(TimeoutError):
        runner.send_completion_request(CompletionRequest(PROMPT, "m", max_tokens=LONG, timeout=0.1))
    assert time.monotonic() - t0 < 2
    held.join()
    wait_idle(runner, timeout=5)
    s = long_stream(runner, timeout=0.3)
    with pytest.raises(TimeoutError):
        for _ in s:
            time.sleep(0.05)  # a slow reader
    wait_idle(runner, timeout=5)
    held = hold_engine(runner, 0.4)
    unread = long_stream(runner, timeout=0.2)  # never read: the engine expires it by itself
    held.join()
    time.sleep(0.1)
    wait_idle(runner, timeout=5)
    with pytest.raises(TimeoutError):
        list(unread)


def test_abandoned_streams_do_not_slow_a_fresh_request(runner):
    """32 long streams abandoned after their first chunk (16 running, 16 waiting): a fresh 8-token request is
    served within 2x its idle latency, and the cache is entirely free once idle."""
    fresh = CompletionRequest("The river", "m", max_tokens=8, temperature=0)

    def latency():
        t0 = time.perf_counter()
        assert json.loads(runner.send_completion_request(fresh))["usage"]["completion_tokens"] == 8
        return time.perf_counter() - t0

    wait_idle(runner)
    idle = min(latency() for _ in range(5))
    streams = [long_stream(runner) for _ in range(32)]
    for s in streams[:16]:
        next(s)
    del s, streams  # 16 dropped mid-generation, 16 before their first chunk
    gc.collect()
    # A round trip through the inbox: the 32 aborts are behind us. (Sent without it, the fresh request may wait one
    # more step: the engine can admit a waiting stream whose abort it has not read yet.)
    engine_state(runner)
    after = min(latency() for _ in range(3))  # without cancellation each would wait seconds
    print(f"\nfresh request: {idle * 1e3:.1f} ms idle, {after * 1e3:.1f} ms after abandoning 32 streams")
    assert after <= 2 * idle + 0.02, f"{after * 1e3:.1f} ms after abandoning 32 streams, {idle * 1e3:.1f} ms idle"
    wait_idle(runner)


@pytest.mark.parametrize("n, max_seqs, cache", [(400, 8, 192), pytest.param(1000, 16, 512, marks=pytest.mark.slow)])
def test_soak_with_streaming_cancellation(tiny_models, n, max_seqs, cache):
    """16 threads send n requests through max_seqs and a cache small enough to preempt: whole replies,
    streams read to the end, streams abandoned after a few chunks, aborts by id and timeouts, mixed. The whole and
    fully streamed replies equal their solo runs; every cancelled one ends; nothing is left held."""
    rng = random.Random(0)
    prompts = [(PROMPT * 3)[i: i + 20 + 7 * (i % 9)] for i in range(32)]
    plan = [(rng.choice(["whole", "stream", "abandon", "abort", "timeout"]), rng.randrange(32), 6 + rng.randrange(20))
            for _ in range(n)]
    with load(tiny_models, max_seqs=1) as solo:
        expected = {(p, n): json.loads(solo.send_completion_request(
            CompletionRequest(prompts[p], "m", max_tokens=n, temperature=0)))["choices"][0]["text"]
            for kind, p, n in plan if kind in ("whole", "stream")}
    errors = []
    with load(tiny_models, max_seqs=max_seqs, kv_cache_tokens=cache, block_size=8) as runner:
        def worker(k):
            for i in range(k, len(plan), 16):
                kind, p, n = plan[i]
                req = dict(prompt=prompts[p], model="m", max_tokens=n, temperature=0)
                long = {**req, "max_tokens": LONG}
                try:
                    if kind == "whole":
                        got = json.loads(runner.send_completion_request(CompletionRequest(**req)))["choices"][0]["text"]
                        assert got == expected[p, n], (i, got)
                    elif kind == "stream":
                        s = runner.send_completion_request(CompletionRequest(**req, stream=True))
                        got = "".join(json.loads(c)["choices"][0]["text"] for c in s)
                        assert got == expected[p, n], (i, got)
                    elif kind == "abandon":
                        s = runner.send_completion_request(CompletionRequest(**long, stream=True))
                        for _, _ in zip(range(i % 3), s):
                            pass
                        del s
                    elif kind == "abort":
                        s = runner.send_completion_request(CompletionRequest(**long, stream=True))
                        runner.abort(s.id)
                        try:
                            for _ in s:
                                pass
                        except RequestAborted:
                            pass
                    else:
                        try:
                            runner.send_completion_request(CompletionRequest(**long, timeout=0.05))
                        except TimeoutError:
                            pass
                except Exception as e:
                    errors.append((i, kind, repr(e)))

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        gc.collect()
        assert not errors, errors[:5]
        wait_idle(runner)
        assert runner.scheduler.preemptions > 0
