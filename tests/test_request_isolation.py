"""A bad request fails alone: its values are checked in the caller's thread on an immutable copy, and whatever
can still go wrong in one row of a step (sampling, output) fails that request only, the others' outputs equal to
their solo runs. Every request here carries a timeout, so a regression fails instead of hanging the session."""
import dataclasses
import json
import os
import threading
import time

import pytest

import mistralrs
from mistralrs import ChatCompletionRequest, CompletionRequest

from helpers import ARCHS, PROMPT

T = 60  # seconds any request here may take before the test fails


@pytest.fixture(scope="module")
def runner(tiny_models):
    loader = mistralrs.NormalLoader(ARCHS["llama"], model_id=str(tiny_models["llama"]))
    with loader.load(token_source="none", max_seqs=8) as r:
        yield r


def text(reply: str) -> str:
    return json.loads(reply)["choices"][0]["text"]


def prompts(n):
    return [(PROMPT * 2)[3 * i: 3 * i + 40] for i in range(n)]


@pytest.mark.parametrize("field, value", [("temperature", 1e-50), ("temperature", float("inf")), ("top_k", 2**63),
                                          ("top_p", float("nan")), ("max_tokens", 2**63), ("seed", 2**64),
                                          ("logit_bias", {5: float("nan")}), ("logit_bias", {5: 1e300}),
                                          ("presence_penalty", float("-inf")), ("timeout", 0.0)])
def test_a_value_set_after_construction_is_checked_when_sent(runner, field, value):
    req = CompletionRequest(PROMPT, "m", max_tokens=3, timeout=T)
    setattr(req, field, value)  # the constructor saw good values; the Runner checks again what it will use
    with pytest.raises((ValueError, TypeError), match=field):
        runner.send_completion_request(req)
    chat = ChatCompletionRequest([{"role": "user", "content": "hi"}], "m", max_tokens=3, timeout=T)
    setattr(chat, field, value)
    with pytest.raises((ValueError, TypeError), match=field):
        runner.send_chat_completion_request(chat)


def test_numpy_and_bool_values_are_judged_as_numbers():
    np = pytest.importorskip("numpy")
    r = CompletionRequest(PROMPT, "m", temperature=np.float32(0.5), top_k=np.int64(4), max_tokens=np.int32(3))
    f = r.frozen()
    assert (type(f.temperature), type(f.top_k), type(f.max_tokens)) == (float, int, int)
    with pytest.raises(TypeError):
        CompletionRequest(PROMPT, "m", max_tokens=True)


def test_a_sent_request_is_a_copy_that_later_mutation_cannot_reach(runner):
    bias = {7: 5.0}
    req = CompletionRequest(PROMPT, "m", max_tokens=12, temperature=0, logit_bias=bias, stop_seqs=["zzz"], timeout=T)
    expected = text(runner.send_completion_request(req))
    req.stream = True
    stream = runner.send_completion_request(req)
    bias[7] = float("nan")  # poison the caller's objects while the engine serves the request
    req.stop_seqs.append("")
    req.temperature = 1e-50
    req.max_tokens = 1
    got = "".join(json.loads(c)["choices"][0]["text"] for c in stream)
    assert got == expected
    frozen = CompletionRequest(PROMPT, "m").frozen()
    with pytest.raises(AttributeError, match="immutable"):
        frozen.temperature = 0.5


def _held_until(runner, ready) -> threading.Thread:
    """Hold the engine thread (from a thread of its own) until ready() says every request is in its inbox (or was
    refused before it), so that they enter the scheduler together and share their first step: a test about a batch
    must not depend on thread timing."""
    started = threading.Event()

    def hold():
        started.set()
        deadline = time.monotonic() + T
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.001)

    holder = threading.Thread(target=runner.engine.call, args=(hold,))
    holder.start()
    started.wait(T)
    return holder


def _concurrently(runner, requests):
    """Send every request at once from its own thread, the engine held until all are queued; each result is the
    reply text or the exception raised."""
    results, barrier = [None] * len(requests), threading.Barrier(len(requests))
    # while the engine is held, a result can only be a request refused in its caller's thread
    holder = _held_until(runner, lambda: runner.engine.inbox.qsize() + sum(r is not None for r in results)
                         >= len(requests))

    def worker(i):
        barrier.wait()
        try:
            results[i] = text(runner.send_completion_request(requests[i]))
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(T)
    holder.join(T)
    return results


def test_the_issues_poisoned_requests_fail_alone_among_concurrent_ones(runner):
    """temperature=1e-50, top_k=2**63 and a NaN written into logit_bias after construction used to fail every
    request of the engine step; now each is refused in its caller's thread and the others equal their solo runs."""
    good = [CompletionRequest(p, "m", max_tokens=10, temperature=0, timeout=T) for p in prompts(6)]
    solo = [text(runner.send_completion_request(r)) for r in good]
    bad = [CompletionRequest(PROMPT, "m", max_tokens=10, timeout=T, logit_bias={4: 1.0}) for _ in range(3)]
    bad[0].temperature = 1e-50
    bad[1].top_k = 2**63
    bad[2].logit_bias[4] = float("nan")
    results = _concurrently(runner, [good[0], bad[0], *good[1:3], bad[1], *good[3:], bad[2]])
    assert [type(r) for r in (results[1], results[4], results[-1])] == [ValueError] * 3
    assert [r for i, r in enumerate(results) if i not in (1, 4, len(results) - 1)] == solo


def test_a_row_that_fails_in_sampling_fails_its_request_alone(runner, monkeypatch, caplog):
    """A NaN logit bias cannot be sent any more, so it is put in past the checks: the engine's sampling of that
    row fails, the batch is resampled row by row, and only the poisoned request gets the error."""
    good = [CompletionRequest(p, "m", max_tokens=10, temperature=0, timeout=T) for p in prompts(5)]
    good += [CompletionRequest(p, "m", max_tokens=10, temperature=0.8, seed=i, timeout=T)
             for i, p in enumerate(prompts(2))]
    solo = [text(runner.send_completion_request(r)) for r in good]
    params = runner._params

    def poisoned(r, **kw):
        p = params(r, **kw)
        return dataclasses.replace(p, logit_bias={3: float("nan")}) if r.request_id == "poison" else p

    monkeypatch.setattr(runner, "_params", poisoned)
    bad = CompletionRequest(PROMPT, "m", max_tokens=10, temperature=1.0, timeout=T, request_id="poison")
    results = _concurrently(runner, [bad, *good])
    assert isinstance(results[0], ValueError) and "non-finite" in str(results[0])
    assert results[1:] == solo
    shared = [r.args[0] for r in caplog.records if "one by one" in r.getMessage() and r.args[0] > 1]
    assert shared, "the poisoned request never shared a step with the others"


def test_a_failure_in_one_output_fails_its_request_alone(runner, monkeypatch):
    good = [CompletionRequest(p, "m", max_tokens=8, temperature=0, timeout=T) for p in prompts(4)]
    solo = [text(runner.send_completion_request(r)) for r in good]
    advance = runner.engine.output.advance

    def broken(seq, *args):
        if seq.group.id == "broken" and len(seq.completion) == 2:
            raise RuntimeError("injected output failure")
        return advance(seq, *args)

    monkeypatch.setattr(runner.engine.output, "advance", broken)
    bad = CompletionRequest(PROMPT, "m", max_tokens=8, temperature=0, timeout=T, request_id="broken")
    results = _concurrently(runner, [*good[:2], bad, *good[2:]])
    assert isinstance(results[2], RuntimeError) and "injected" in str(results[2])
    assert results[:2] + results[3:] == solo


def test_the_same_request_id_twice_in_flight_is_refused(runner):
    first = runner.send_completion_request(CompletionRequest(PROMPT, "m", max_tokens=300, stream=True,
                                                             request_id="twice", timeout=T))
    with pytest.raises(ValueError, match="twice"):
        runner.send_completion_request(CompletionRequest(PROMPT, "m", max_tokens=3, request_id="twice", timeout=T))
    assert first.id == "twice"
    assert len(list(first)) > 1


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (a file whose writes fail: ENOSPC)")
def test_a_logfile_that_cannot_be_written_warns_once_and_serves(tiny_models, caplog):
    """The log is a side channel: with a logfile on a full disk, 20 requests (4 of them streamed) are answered as
    without one, and the failure is said once, with the path and the error."""
    loader = mistralrs.NormalLoader(ARCHS["llama"], model_id=str(tiny_models["llama"]))
    requests = [CompletionRequest(p, "m", max_tokens=6, temperature=0, timeout=T, stream=i >= 16)
                for i, p in enumerate(prompts(20))]
    def answer(runner, r):
        if not r.stream:
            return text(runner.send_completion_request(r))
        return "".join(json.loads(c)["choices"][0]["text"] for c in runner.send_completion_request(r))

    with loader.load(token_source="none", max_seqs=8) as plain:
        expect = [answer(plain, r) for r in requests]
    with caplog.at_level("WARNING", logger="mistralrs"):
        with loader.load(token_source="none", max_seqs=8, logfile="/dev/full") as full:
            got = [answer(full, r) for r in requests]
    assert got == expect
    warned = [r.getMessage() for r in caplog.records if "logfile" in r.getMessage()]
    assert len(warned) == 1 and "/dev/full" in warned[0] and "No space left" in warned[0], warned
