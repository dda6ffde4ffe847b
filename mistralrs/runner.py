"""Runner: requests in, OpenAI JSON out. Callers' threads validate and tokenize; one engine thread owns the model.

caller thread:  validate -> chat template -> tokenize -> Sequences -> inbox
engine thread:  inbox -> scheduler -> model step -> sample -> detokenize, stop checks -> reply queue / stream
"""
import contextlib
import json
import logging
import queue
import random
import threading
import time
import uuid
from dataclasses import dataclass, field

import torch
from torch.profiler import record_function

from . import chat_template, responses
from .grammar import GrammarCompiler, allowed_tokens
from .requests import ChatCompletionRequest, CompletionRequest
from .sampling import SamplingParams, sample
from .scheduler import Scheduler
from .sequence import Sequence

log = logging.getLogger("mistralrs")
_END = object()
_STOP = object()
TRUNCATE_RESERVE = 10  # completion room kept by truncate_sequence when max_tokens is unset


@dataclass(eq=False)
class _Request:
    chat: bool
    id: str
    seqs: list[Sequence]
    n_return: int
    stream: bool
    logprobs: bool
    stop_strings: list[str]
    echo: str = ""
    suffix: str = ""
    created: int = field(default_factory=responses.now)
    out: queue.Queue = field(default_factory=queue.Queue)
    failed: bool = False
    answered: bool = False  # its final response (or the stream's end) has been sent


class ChatCompletionStreamer:
    """Iterator of OpenAI chunk JSON strings; ends once every choice has finished."""

    def __init__(self, out: queue.Queue):
        self._out = out

    def __iter__(self):
        return self

    def __next__(self) -> str:
        item = self._out.get()
        if item is _END:
            self._out.put(_END)  # later next() calls keep ending
            raise StopIteration
        if isinstance(item, BaseException):
            self._out.put(_END)
            raise item
        return item


class Runner:
    """Created by a loader's load(). Thread-safe: send requests from as many threads as you like."""

    def __init__(self, pipeline, *, max_seqs: int, truncate_sequence: bool, logfile: str | None):
        if not isinstance(truncate_sequence, bool):
            raise TypeError(f"truncate_sequence must be a bool, got {truncate_sequence!r}")
        self.pipeline = pipeline
        self.truncate_sequence = truncate_sequence
        self.scheduler = Scheduler(pipeline.model_runner, max_seqs)
        self.grammars = GrammarCompiler(pipeline.tokenizer, pipeline.vocab_size, pipeline.eos_token_ids)
        self._logfile, self._log_lock = logfile, threading.Lock()
        self._inbox: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._engine, name="mistralrs-engine", daemon=True)
        self._thread.start()

    def send_chat_completion_request(self, request: ChatCompletionRequest):
        if not isinstance(request, ChatCompletionRequest):
            raise TypeError(f"expected a ChatCompletionRequest, got {type(request).__name__}")
        p = self.pipeline
        if isinstance(request.messages, str):
            ids = p.tokenizer.encode(request.messages, add_special_tokens=True).ids
        else:
            text = chat_template.render(p.chat_template, request.messages, p.special_tokens)
            ids = p.tokenizer.encode(text, add_special_tokens=False).ids
        self._check_token_ids("stop_token_ids", request.stop_token_ids or [])
        top = request.top_logprobs or 0
        params = self._params(request, logprobs=request.logprobs, top_logprobs=top if request.logprobs else 0)
        req = self._make(True, request, ids, params, request.n_choices, request.n_choices,
                         stop_token_ids=request.stop_token_ids or [], stop_strings=[])
        return self._submit(req, request)

    def send_completion_request(self, request: CompletionRequest):
        if not isinstance(request, CompletionRequest):
            raise TypeError(f"expected a CompletionRequest, got {type(request).__name__}")
        if request.stream and request.best_of > request.n_choices:
            raise ValueError("best_of > n_choices cannot be streamed: the best candidates are known only at the end")
        ids = self.pipeline.tokenizer.encode(request.prompt, add_special_tokens=True).ids
        params = self._params(request, logprobs=False, top_logprobs=0)
        req = self._make(False, request, ids, params, max(request.best_of, request.n_choices), request.n_choices,
                         stop_token_ids=[], stop_strings=list(request.stop_seqs or []))
        req.echo = request.prompt if request.echo_prompt else ""
        if request.grammar is not None:
            for seq in req.seqs:
                seq.matcher = self.grammars.matcher(request.grammar, request.grammar_type)
        req.suffix = request.suffix or ""
        return self._submit(req, request)

    @contextlib.contextmanager
    def profiler(self, **profile_kwargs):
        """torch.profiler.profile(**profile_kwargs) recording the engine thread while the block runs
        (tools/profile.py). The profiler records the thread that starts it, so it is started in the engine."""
        prof = torch.profiler.profile(**profile_kwargs)
        self._in_engine(prof.start)
        try:
            yield prof
        finally:
            self._in_engine(prof.stop)

    def _in_engine(self, fn) -> None:
        done = threading.Event()
        self._inbox.put((fn, done))
        done.wait()

    def close(self) -> None:
        """Stop the engine thread. Requests still in flight get an error."""
        self._inbox.put(_STOP)
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_token_ids(self, name: str, ids) -> None:
        for t in ids:
            if t >= self.pipeline.vocab_size:
                raise ValueError(f"{name} has token id {t}, outside the vocabulary (size {self.pipeline.vocab_size})")

    def _params(self, r, logprobs: bool, top_logprobs: int) -> SamplingParams:
        self._check_token_ids("logit_bias", (r.logit_bias or {}).keys())
        return SamplingParams(
            temperature=1.0 if r.temperature is None else float(r.temperature), top_k=r.top_k, top_p=r.top_p,
            presence_penalty=r.presence_penalty or 0.0, frequency_penalty=r.frequency_penalty or 0.0,
            logit_bias={int(k): float(v) for k, v in (r.logit_bias or {}).items()},
            logprobs=logprobs, top_logprobs=top_logprobs)

    def _fit_prompt(self, ids: list[int], max_tokens: int | None) -> list[int]:
        """Model length counts prompt + completion; truncation drops the oldest prompt tokens."""
        max_len = self.pipeline.max_model_len
        if not ids:
            raise ValueError("the prompt is empty")
        reserve = max_tokens or TRUNCATE_RESERVE
        if self.truncate_sequence and len(ids) + reserve > max_len:
            if reserve >= max_len:
                raise ValueError(f"max_tokens={max_tokens} leaves no room for a prompt in the model's {max_len} tokens")
            log.warning("prompt of %d tokens truncated to its last %d", len(ids), max_len - reserve)
            ids = ids[-(max_len - reserve):]
        if len(ids) >= max_len:
            raise ValueError(f"the prompt has {len(ids)} tokens, the model holds {max_len} (prompt + completion); "
                             "load with truncate_sequence=True to keep the prompt's last tokens")
        blocks = self.pipeline.model_runner.blocks
        if blocks.blocks_for(len(ids) + 1) > blocks.num_blocks:
            raise ValueError(f"the prompt has {len(ids)} tokens and can never fit the KV cache "
                             f"({blocks.num_blocks * blocks.block_size} tokens); load with a larger kv_cache_tokens")
        return ids

    def _make(self, chat: bool, r, ids, params, n_seqs: int, n_return: int, stop_token_ids, stop_strings) -> _Request:
        ids = self._fit_prompt(ids, r.max_tokens)
        max_len = self.pipeline.max_model_len
        if r.max_tokens is not None:
            max_len = min(max_len, len(ids) + r.max_tokens)
        seed = r.seed if r.seed is not None else random.SystemRandom().randrange(2**62)
        req = _Request(chat=chat, id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", seqs=[],
                       n_return=n_return, stream=r.stream, logprobs=params.logprobs, stop_strings=stop_strings)
        for i in range(n_seqs):
            gen = torch.Generator(device=self.pipeline.device)
            gen.manual_seed(seed + i)  # choice i of a seeded request is reproducible and differs from choice j
            req.seqs.append(Sequence(tokens=list(ids), group=req, index=i, prompt_len=len(ids), max_len=max_len,
                                     params=params, generator=gen, stop_token_ids=frozenset(stop_token_ids)))
        return req

    def _submit(self, req: _Request, request):
        if not self._thread.is_alive():
            raise RuntimeError("the Runner's engine thread is not running (was close() called?)")
        self._log("request", repr(request))
        self._inbox.put(req)
        if req.stream:
            return ChatCompletionStreamer(req.out)
        result = req.out.get()
        if isinstance(result, BaseException):
            raise result
        return result

    def _log(self, kind: str, payload) -> None:
        if self._logfile is None:
            return
        with self._log_lock, open(self._logfile, "a") as f:
            f.write(json.dumps({"time": time.time(), kind: payload}) + "\n")

    def _send(self, req: _Request, item) -> None:
        if isinstance(item, str):
            self._log("response", json.loads(item))
        req.out.put(item)

    # ---- engine thread ----

    def _engine(self) -> None:
        while True:
            try:
                item = self._inbox.get(block=not self.scheduler.has_work())
                while True:
                    if item is _STOP:
                        return self._fail_all(RuntimeError("the Runner was closed"))
                    if isinstance(item, tuple):  # (fn, done): run fn on this thread
                        item[0]()
                        item[1].set()
                    else:
                        for seq in item.seqs:
                            self.scheduler.add(seq)
                    item = self._inbox.get_nowait()
            except queue.Empty:
                pass
            self._step()

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
                logits = self.pipeline.model_runner.step(batch)
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
        p = self.pipeline
        seq.tokens.append(token)
        seq.cum_logprob += logprob
        if seq.group.logprobs:
            seq.logprobs.append((token, logprob, top))
        completion = seq.completion
        reason = None
        if token in p.eos_token_ids or token in seq.stop_token_ids:
            reason, completion = "stop", completion[:-1]
        elif seq.matcher is not None and (not seq.matcher.consume_token(token) or seq.matcher.is_stopped()):
            reason = "stop"  # the grammar is complete and allows nothing more
        elif len(seq.tokens) >= seq.max_len:
            reason = "length"
        text = p.tokenizer.decode(completion, skip_special_tokens=True)
        for s in seq.group.stop_strings:
            at = text.find(s)
            if at >= 0:
                text, reason = text[:at], "stop"
        seq.text = text
        if reason is not None:
            self._finish(seq, reason)
        elif seq.group.stream:
            self._stream(seq, self._settled(seq))

    def _settled(self, seq: Sequence) -> int:
        """How much of seq.text can be streamed: not an incomplete UTF-8 tail, not a possible stop-string start."""
        text = seq.text.rstrip("\ufffd")
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
            self._send(req, _END if req.stream else self._response(req))
            req.answered = True

    def _response(self, req: _Request) -> str:
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

    def _fail(self, req: _Request, error: BaseException) -> None:
        req.failed = req.answered = True
        for seq in req.seqs:
            self.scheduler.remove(seq)
            seq.finish_reason = seq.finish_reason or "error"
        req.out.put(error)

    def _fail_all(self, error: BaseException) -> None:
        for req in {s.group for s in list(self.scheduler.running) + list(self.scheduler.waiting)}:
            self._fail(req, error)
