"""The engine thread: it owns the model and turns queued requests into replies.

inbox -> scheduler -> model step -> sample -> detokenize, stop checks -> each request's reply queue / stream
"""
import json
import logging
import queue
import threading

from torch.profiler import record_function

from . import responses
from .grammar import allowed_tokens
from .sampling import sample
from .scheduler import Scheduler
from .sequence import Request, Sequence

log = logging.getLogger("mistralrs")
END = object()   # the last item of a stream's reply queue
STOP = object()  # tells the engine thread to end


class Engine:
    def __init__(self, pipeline, scheduler: Scheduler, on_response=None):
        """on_response(dict) sees every response and chunk sent (the Runner's logfile)."""
        self.pipeline, self.scheduler, self.on_response = pipeline, scheduler, on_response
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
        if isinstance(item, str) and self.on_response is not None:
            self.on_response(json.loads(item))
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
        # The record_function ranges name the phases in a torch.profiler trace (tools/profile.py); they cost
        # nothing when no profiler runs.
        with record_function("mistralrs.schedule"):
            batch, too_long = self.scheduler.schedule()
            for seq in too_long:
                self._finish(seq, "length")
        if not batch:
            return
        try:
            with record_function("mistralrs.forward"):
                logits = self.pipeline.model_runner.step(batch, self.scheduler.block_tables(batch))
            with record_function("mistralrs.sample"):
                n = self.pipeline.repeat_last_n
                allowed = allowed_tokens([s.matcher for s in batch], logits.shape[-1], logits.device)
                sampled = sample(logits, [s.params for s in batch], [s.tokens[-n:] if n else [] for s in batch],
                                 [s.generator for s in batch], allowed)
            with record_function("mistralrs.detokenize"):
                for seq, tok, lp, top in zip(batch, sampled.tokens, sampled.logprobs, sampled.top):
                    if not seq.group.failed:
                        self._advance(seq, tok, lp, top)
        except Exception as e:  # a failed step fails only the requests it touched
            log.exception("engine step failed")
            for req in {s.group for s in batch}:
                if not req.answered:
                    self._fail(req, e)

    def _advance(self, seq: Sequence, token: int, logprob: float, top) -> None:
        seq.tokens.append(token)
        seq.cum_logprob += logprob
        if seq.group.logprobs:
            seq.logprobs.append((token, logprob, top))
        reason, text_end = None, len(seq.tokens)
        if token in self.pipeline.eos_token_ids or token in seq.stop_token_ids:
            reason, text_end = "stop", text_end - 1  # the stop token is not part of the text
        elif seq.matcher is not None and (not seq.matcher.consume_token(token) or seq.matcher.is_stopped()):
            reason = "stop"  # the grammar is complete and allows nothing more
        elif len(seq.tokens) >= seq.max_len:
            reason = "length"
        searched_from = len(seq.text)
        self._detokenize(seq, text_end, final=reason is not None)
        for s in seq.group.stop_strings:  # only where new text could complete a stop string
            at = seq.text.find(s, max(0, searched_from - len(s) + 1))
            if at >= 0:
                seq.text, reason = seq.text[:at], "stop"
        if reason is not None:
            self._finish(seq, reason)
        elif seq.group.stream:
            self._stream(seq, self._settled(seq))

    def _detokenize(self, seq: Sequence, end: int, final: bool) -> None:
        """Extend seq.text with the text of tokens[read_offset:end], decoding only a short window: the text that
        tokens[prefix_offset:end] adds to tokens[prefix_offset:read_offset] (a token's text can depend on the one
        before it). A tail that is not yet whole UTF-8 waits for the next token, unless the sequence is ending."""
        decode = self.pipeline.tokenizer.decode
        before = decode(seq.tokens[seq.prefix_offset:seq.read_offset], skip_special_tokens=True)
        after = decode(seq.tokens[seq.prefix_offset:end], skip_special_tokens=True)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            seq.text += after[len(before):]
            seq.prefix_offset, seq.read_offset = seq.read_offset, end

    def _settled(self, seq: Sequence) -> int:
        """How much of seq.text can be streamed: not a possible start of a stop string."""
        text = seq.text
        held = max((k for s in seq.group.stop_strings for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return len(text) - held

    def _stream(self, seq: Sequence, upto: int, finish_reason: str | None = None) -> None:
        req = seq.group
        delta = seq.text[seq.streamed:upto]
        if not delta and finish_reason is None:
            return
        use = responses.usage(seq.prompt_len, len(seq.completion)) if finish_reason else None
        if req.chat:
            lps = None
            if req.logprobs:  # every token since the last chunk, also those whose text was held back
                lps = responses.chat_logprobs(self.pipeline.tokenizer, seq.logprobs[seq.logprobs_streamed:])
                seq.logprobs_streamed = len(seq.logprobs)
            chunk = responses.chat_chunk(req.id, self.pipeline.model_id, req.created, seq.index, delta,
                                         finish_reason, lps, seq.streamed == 0, use)
        else:
            text = (req.echo if seq.streamed == 0 else "") + delta + (req.suffix if finish_reason else "")
            chunk = responses.completion(req.id, self.pipeline.model_id, req.created,
                                         [responses.completion_choice(seq.index, text, finish_reason)], use)
        seq.streamed = upto
        self._send(req, chunk)

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        self.scheduler.remove(seq)
        req = seq.group
        if req.stream:
            self._stream(seq, len(seq.text), reason)
        if all(s.finished for s in req.seqs):
            self._send(req, END if req.stream else self._response(req))
            req.answered = True

    def _response(self, req: Request) -> str:
        p = self.pipeline
        best = sorted(req.seqs, key=lambda s: -s.cum_logprob)[: req.n_return] if len(req.seqs) > req.n_return \
            else req.seqs
        use = responses.usage(req.seqs[0].prompt_len, sum(len(s.completion) for s in req.seqs))
        if req.chat:
            choices = [responses.chat_choice(i, s.text, s.finish_reason,
                                             responses.chat_logprobs(p.tokenizer, s.logprobs) if req.logprobs else None)
                       for i, s in enumerate(best)]
            return responses.chat_completion(req.id, p.model_id, req.created, choices, use)
        choices = [responses.completion_choice(i, req.echo + s.text + req.suffix, s.finish_reason)
                   for i, s in enumerate(best)]
        return responses.completion(req.id, p.model_id, req.created, choices, use)

    def _fail(self, req: Request, error: BaseException) -> None:
        req.failed = req.answered = True
        for seq in req.seqs:
            self.scheduler.remove(seq)
            seq.finish_reason = seq.finish_reason or "error"
        req.out.put(error)

    def _fail_all(self, error: BaseException) -> None:
        for req in {s.group for s in list(self.scheduler.running) + list(self.scheduler.waiting)}:
            self._fail(req, error)
