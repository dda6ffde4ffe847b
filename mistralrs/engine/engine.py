"""The engine thread: it owns the model and turns queued requests into replies.

inbox -> scheduler -> model step -> sample -> scheduler.postprocess (the tokens join their sequences) -> output.py
(detokenize, stop checks) -> neutral records (output.Delta, output.Final) on each request's queue; the caller's thread
makes API bodies and JSON of them (runner.py, responses.py)

Callers talk to it only through the inbox: requests, aborts (a closed stream, Runner.abort, a timeout), calls and
STOP. The inbox is a SimpleQueue, whose put() is safe from __del__ (a dropped streamer aborts its request there).
"""
import atexit
import contextlib
import logging
import queue
import threading
import time
import weakref
from dataclasses import dataclass

import torch
from torch.profiler import record_function

from .grammar import allowed_tokens
from .output import Output
from .sampling import sample
from .scheduler import Scheduler
from .sequence import Request, Sequence

log = logging.getLogger("mistralrs")
END = object()   # the last item of a stream's reply queue
STOP = object()  # tells the engine thread to end
EXIT_JOIN_S = 30  # how long interpreter exit waits for an engine to finish its step


@dataclass
class Abort:
    request_id: str
    error: BaseException | None  # what the request's caller gets; None: its stream's reader left, the stream ends


def phase(name: str):
    """A record_function range naming an engine phase in a torch.profiler trace (tools/profile_engine.py). Opening one
    costs about 20 us even with no profiler running, so it is opened only while one records this thread."""
    return record_function(name) if torch.autograd._profiler_enabled() else contextlib.nullcontext()


# Engines whose thread may still run. At interpreter exit each is stopped and joined (_stop_at_exit): a daemon thread
# frozen inside a torch op while the process tears down its C++ state dies with SIGABRT.
_ENGINES: "weakref.WeakSet[Engine]" = weakref.WeakSet()


@atexit.register
def _stop_at_exit() -> None:
    for engine in list(_ENGINES):
        engine.stop(timeout=EXIT_JOIN_S)


class Engine:
    def __init__(self, pipeline, scheduler: Scheduler):
        self.pipeline, self.scheduler = pipeline, scheduler
        self.output = Output(pipeline.tokenizer, pipeline.eos_token_ids)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.live: dict[str, Request] = {}  # requests in flight by id; the engine thread's alone
        self.timed: set[Request] = set()     # those of them with a deadline (most steps have none to check)
        # closed is set, and STOP queued, under the lock that submit() and call() hold while they queue: whatever
        # they queue is ahead of STOP, so the engine answers it before it stops.
        self.lock, self.closed = threading.Lock(), False
        self.thread = threading.Thread(target=self._loop, name="mistralrs-engine", daemon=True)
        self.thread.start()
        _ENGINES.add(self)

    def submit(self, req: Request) -> None:
        with self.lock:
            if self.closed or not self.thread.is_alive():
                raise RuntimeError("the Runner is closed")
            self.inbox.put(req)

    def abort(self, request_id: str, error: BaseException | None) -> None:
        """End a request at the next step, whatever it is doing; unknown or finished ids are ignored."""
        self.inbox.put(Abort(request_id, error))

    def call(self, fn) -> None:
        """Run fn on the engine thread and wait for it (to start a profiler there, say); its error is raised here."""
        done, errors = threading.Event(), []
        with self.lock:
            if self.closed or not self.thread.is_alive():
                raise RuntimeError("the Runner is closed")
            self.inbox.put((fn, done, errors))
        done.wait()
        if errors:
            raise errors[0]

    def stop(self, timeout: float | None = None) -> None:
        """Fail what is in flight and end the thread, after its current step. Idempotent."""
        with self.lock:
            if not self.closed:
                self.closed = True
                self.inbox.put(STOP)
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout)

    def _send(self, req: Request, item) -> None:
        """Queue a record (a stream's Delta, a Final), END, or an error."""
        if item is not None:  # None: a delta with nothing to say
            req.out.put(item)

    def _loop(self) -> None:
        while True:
            try:
                if not self._take_inbox():
                    return
                self._expire()
                self._step()
            except Exception as e:  # an engine bug must not leave callers waiting forever
                log.exception("engine failure")
                self._fail_all(e)

    def _take_inbox(self) -> bool:
        """Take what callers queued, waiting for it when there is no work; False once told to stop."""
        if self.inbox.empty() and self.scheduler.has_work():
            return True  # most decode steps: no need for get()'s lock and queue.Empty exception
        try:
            item = self.inbox.get(block=not self.scheduler.has_work())
            while True:
                if item is STOP:
                    self._shutdown()
                    return False
                if isinstance(item, Abort):
                    self._abort(item)
                elif isinstance(item, tuple):  # (fn, done, errors) from call()
                    fn, done, errors = item
                    try:
                        fn()
                    except Exception as e:
                        errors.append(e)
                    finally:
                        done.set()
                else:
                    self._admit(item)
                item = self.inbox.get_nowait()
        except queue.Empty:
            return True

    def _admit(self, req: Request) -> None:
        if req.id in self.live:
            req.out.put(ValueError(f"request_id {req.id!r} is already used by a request in flight"))
            return
        self.live[req.id] = req
        if req.deadline is not None:
            self.timed.add(req)
        for seq in req.seqs:
            self.scheduler.add(seq)

    def _abort(self, a: Abort) -> None:
        req = self.live.get(a.request_id)
        if req is None:
            return
        self._fail(req, a.error if a.error is not None else END)

    def _expire(self) -> None:
        if not self.timed:
            return
        now = time.monotonic()
        for req in [r for r in self.timed if r.deadline <= now]:
            self._fail(req, TimeoutError(f"request {req.id} did not finish within its timeout"))

    def _step(self) -> None:
        with phase("mistralrs.schedule"):
            batch = self.scheduler.schedule()
            for seq in batch.too_long:
                self._finish(seq, "length")
        if not batch.seqs:
            return
        try:
            with phase("mistralrs.forward"):
                logits = self.pipeline.model_runner.step(batch.seqs, self.scheduler.block_tables(batch.seqs),
                                                         batch.num_tokens)
        except Exception as e:  # a failed forward fails only the requests it touched
            log.exception("engine step failed")
            for req in {s.group for s in batch.seqs}:
                if not req.answered:
                    self._fail(req, e)
            return
        sampling = [batch.seqs[i] for i in batch.sampled]  # a prompt prefilled in chunks samples after its last
        if len(sampling) < len(batch.seqs):
            logits = logits[batch.sampled]
        with phase("mistralrs.sample"):
            sampled = self._sample(sampling, logits) if sampling else []
        self.scheduler.postprocess(batch, [tok for tok, _, _ in sampled])
        with phase("mistralrs.detokenize"):
            for seq, (_, lp, top) in zip(sampling, sampled):
                if seq.group.answered:  # failed in sampling, or an earlier sequence of its request failed
                    continue
                try:
                    reason = self.output.advance(seq, lp, top)
                    if reason is not None:
                        self._finish(seq, reason)
                    elif seq.group.stream:
                        self._send(seq.group, self.output.delta(seq))
                except Exception as e:  # fails this request alone
                    log.exception("output of request %s failed", seq.group.id)
                    self._fail(seq.group, e)

    def _sample(self, batch: list[Sequence], logits: torch.Tensor) -> list[tuple]:
        """(token, logprob, top) per sequence. When the batch fails, each row is sampled alone and a row that
        still fails fails its request only. sample() checks every row before drawing any token, so the rows that
        are retried draw from their generators once, as they would have alone."""
        n = self.pipeline.repeat_last_n

        def run(seqs, rows):
            allowed = allowed_tokens([s.matcher for s in seqs], rows.shape[-1], rows.device)
            s = sample(rows, [q.params for q in seqs], [q.tokens[-n:] if n else [] for q in seqs],
                       [q.generator for q in seqs], allowed)
            return list(zip(s.tokens, s.logprobs, s.top))

        try:
            return run(batch, logits)
        except Exception:
            log.exception("sampling a batch of %d failed; sampling its rows one by one", len(batch))
        out = []
        for i, seq in enumerate(batch):
            try:
                out += run([seq], logits[i:i + 1])
            except Exception as e:
                self._fail(seq.group, e)
                out.append((None, None, None))
        return out

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        self.scheduler.remove(seq)
        req = seq.group
        if req.stream:
            self._send(req, self.output.delta(seq))
        if all(s.finished for s in req.seqs):
            self._send(req, END if req.stream else self.output.final(req))
            req.answered = True
            self._forget(req)

    def _fail(self, req: Request, error, release: bool = True) -> None:
        """Answer req with error (or END: its stream just ends) and drop its sequences, freeing their blocks."""
        req.failed = req.answered = True
        if release:
            self.scheduler.remove_all(req.seqs)
        for seq in req.seqs:
            seq.finish_reason = seq.finish_reason or "error"
        self._forget(req)
        req.out.put(error)

    def _forget(self, req: Request) -> None:
        self.live.pop(req.id, None)
        self.timed.discard(req)

    def _fail_all(self, error: BaseException) -> None:
        self.scheduler.clear()  # at once: one by one would be quadratic in a large backlog
        for req in list(self.live.values()):
            self._fail(req, error, release=False)

    def _shutdown(self) -> None:
        """STOP: everything in flight, and anything still queued behind STOP, gets an error; then the model runner
        closes (a tensor-parallel model's other ranks end)."""
        closed = RuntimeError("the Runner was closed")
        self._fail_all(closed)
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Request):
                item.out.put(closed)
            elif isinstance(item, tuple):
                item[2].append(closed)
                item[1].set()
        try:
            self.pipeline.model_runner.close()
        except Exception:
            log.exception("closing the model runner failed")
