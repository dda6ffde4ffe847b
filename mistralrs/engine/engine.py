"""The engine thread: it owns the model and turns queued requests into replies.

inbox -> scheduler -> model step -> sample -> output.py (detokenize, stop checks, JSON) -> each request's reply
queue / stream
"""
import contextlib
import logging
import queue
import threading

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


def phase(name: str):
    """A record_function range naming an engine phase in a torch.profiler trace (tools/profile_engine.py). Opening one
    costs about 20 us even with no profiler running, so it is opened only while one records this thread."""
    return record_function(name) if torch.autograd._profiler_enabled() else contextlib.nullcontext()


class Engine:
    def __init__(self, pipeline, scheduler: Scheduler, on_response=None):
        """on_response(dict) sees every response and chunk sent (the Runner's logfile)."""
        self.pipeline, self.scheduler, self.on_response = pipeline, scheduler, on_response
        self.output = Output(pipeline.tokenizer, pipeline.model_id, pipeline.eos_token_ids)
        self.inbox: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="mistralrs-engine", daemon=True)
        self.thread.start()

    def submit(self, req: Request) -> None:
        if not self.thread.is_alive():
            raise RuntimeError("the Runner's engine thread is not running (was close() called?)")
        self.inbox.put(req)

    def call(self, fn) -> None:
        """Run fn on the engine thread and wait for it (to start a profiler there, say); its error is raised here."""
        done, errors = threading.Event(), []
        self.inbox.put((fn, done, errors))
        done.wait()
        if errors:
            raise errors[0]

    def stop(self) -> None:
        self.inbox.put(STOP)
        self.thread.join()

    def _send(self, req: Request, item) -> None:
        """Queue a response or chunk body (a dict, made JSON by the caller's thread), END, or an error."""
        if item is None:  # a stream chunk with nothing to say
            return
        if isinstance(item, dict) and self.on_response is not None:
            self.on_response(item)
        req.out.put(item)

    def _loop(self) -> None:
        while True:
            try:
                if not self._take_inbox():
                    return
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
                    self._fail_all(RuntimeError("the Runner was closed"))
                    return False
                if isinstance(item, tuple):  # (fn, done, errors) from call()
                    fn, done, errors = item
                    try:
                        fn()
                    except Exception as e:
                        errors.append(e)
                    finally:
                        done.set()
                else:
                    for seq in item.seqs:
                        self.scheduler.add(seq)
                item = self.inbox.get_nowait()
        except queue.Empty:
            return True

    def _step(self) -> None:
        with phase("mistralrs.schedule"):
            step = self.scheduler.schedule()
            for seq in step.too_long:
                self._finish(seq, "length")
        if not step.seqs:
            return
        try:
            with phase("mistralrs.forward"):
                batch = step.seqs
                logits = self.pipeline.model_runner.step(batch, self.scheduler.block_tables(batch), step.num_tokens)
                # a prompt prefilled in chunks samples only after its last chunk
                done = [i for i, s in enumerate(batch) if s.num_cached == len(s.tokens)]
                if len(done) < len(batch):
                    batch, logits = [batch[i] for i in done], logits[done]
            if not batch:
                return
            with phase("mistralrs.sample"):
                n = self.pipeline.repeat_last_n
                allowed = allowed_tokens([s.matcher for s in batch], logits.shape[-1], logits.device)
                sampled = sample(logits, [s.params for s in batch], [s.tokens[-n:] if n else [] for s in batch],
                                 [s.generator for s in batch], allowed)
            with phase("mistralrs.detokenize"):
                for seq, tok, lp, top in zip(batch, sampled.tokens, sampled.logprobs, sampled.top):
                    if seq.group.failed:
                        continue
                    reason = self.output.advance(seq, tok, lp, top)
                    if reason is not None:
                        self._finish(seq, reason)
                    elif seq.group.stream:
                        self._send(seq.group, self.output.chunk(seq))
        except Exception as e:  # a failed step fails only the requests it touched
            log.exception("engine step failed")
            for req in {s.group for s in step.seqs}:
                if not req.answered:
                    self._fail(req, e)

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        self.scheduler.remove(seq)
        req = seq.group
        if req.stream:
            self._send(req, self.output.chunk(seq))
        if all(s.finished for s in req.seqs):
            self._send(req, END if req.stream else self.output.response(req))
            req.answered = True

    def _fail(self, req: Request, error: BaseException) -> None:
        req.failed = req.answered = True
        for seq in req.seqs:
            self.scheduler.remove(seq)
            seq.finish_reason = seq.finish_reason or "error"
        req.out.put(error)

    def _fail_all(self, error: BaseException) -> None:
        for req in {s.group for s in list(self.scheduler.running) + list(self.scheduler.waiting)}:
            self._fail(req, error)
