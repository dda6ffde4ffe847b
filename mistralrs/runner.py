"""Runner: requests in, OpenAI JSON out. The caller's thread validates, renders the chat template, tokenizes and
builds the request's sequences; the engine thread (engine.py) serves them and queues neutral records (deltas, a final
record); the caller's thread makes the OpenAI bodies of them (responses.py), logs them, and makes the JSON text once.
chat_completion() and completion() hand the bodies over as dicts (the server serialises them itself)."""
import contextlib
import json
import logging
import os
import queue
import random
import threading
import time
import uuid

import torch

from . import kernels, responses
from .engine.block_manager import BlockManager
from .engine.engine import END, STOP, Engine
from .engine.grammar import GrammarCompiler
from .engine.output import StopStrings
from .engine.sampling import SamplingParams
from .engine.scheduler import Scheduler
from .engine.sequence import Request, Sequence
from .load import chat_template
from .requests import ChatCompletionRequest, CompletionRequest, Limits

log = logging.getLogger("mistralrs")
TRUNCATE_RESERVE = 10  # completion room kept by truncate_sequence when max_tokens is unset


class RequestAborted(RuntimeError):
    """Raised to the caller of a request that Runner.abort ended."""


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class ChatCompletionStreamer:
    """Iterator of OpenAI chunk JSON strings, one per delta the engine queues; ends once every choice has finished.
    bodies() gives the same chunks as dicts. `id` is the request's id (its chunks' `id`). close() (also on garbage
    collection and at the end of a `with` block) aborts the request: its sequences stop and free their KV blocks at
    the engine's next step."""

    def __init__(self, req: Request, engine: Engine, reply: responses.Reply, log: "JsonLines"):
        self.id, self._out, self._deadline, self._engine = req.id, req.out, req.deadline, engine
        self._reply, self._log = reply, log
        self._started: set[int] = set()  # choices that have had a chunk: a choice's first chunk differs
        self._done = False

    def __iter__(self):
        return self

    def __next__(self) -> str:
        body = self._next_body()
        if body is None:
            raise StopIteration
        return json.dumps(body)

    def bodies(self):
        """The chunks as dicts, for a reader that serialises them itself (the server)."""
        while (body := self._next_body()) is not None:
            yield body

    def _next_body(self) -> dict | None:
        """The next chunk's body, None at the end."""
        if self._done:
            return None
        try:  # the timeout covers the request as its reader sees it: chunks queued past it are not handed out
            if _remaining(self._deadline) == 0:
                raise queue.Empty
            item = self._out.get(timeout=_remaining(self._deadline))
        except queue.Empty:
            self._abort(TimeoutError(f"request {self.id} timed out"))
            raise TimeoutError(f"request {self.id} did not finish within its timeout") from None
        if item is END:
            self._done = True
            return None
        if isinstance(item, BaseException):
            self._done = True
            raise item
        try:
            body = responses.chunk(self._reply, item, first=item.index not in self._started)
        except BaseException:  # a failure here fails the request, as one on the engine thread would
            self._abort(None)
            raise
        self._started.add(item.index)
        self._log("response", body)
        return body

    def _abort(self, error) -> None:
        if not self._done:
            self._done = True
            self._engine.abort(self.id, error)

    def close(self) -> None:
        self._abort(None)

    def __del__(self):
        if hasattr(self, "_done"):  # __init__ finished
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on: hyperthread siblings count once."""
    try:
        topology = "/sys/devices/system/cpu/cpu{}/topology/{}"
        return len({tuple(open(topology.format(c, f)).read() for f in ("physical_package_id", "core_id"))
                    for c in os.sched_getaffinity(0)})
    except (AttributeError, OSError):  # no affinity call (macOS, Windows) or no sysfs topology
        pass
    try:
        import psutil
        return psutil.cpu_count(logical=False) or torch.get_num_threads()
    except ImportError:
        return torch.get_num_threads()


def cpu_threads(threads) -> int:
    """load()'s `threads`: the intra-op thread count of the engine thread. None: torch's count in the calling thread
    (torch.set_num_threads, OMP_NUM_THREADS, else torch's default), at most one per physical core."""
    if threads is None:
        return max(1, min(torch.get_num_threads(), physical_cores()))
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"threads must be an int >= 1 or None (one per physical core), got {threads!r}")
    return threads


class Runner:
    """Created by a loader's load(). Thread-safe: send requests from as many threads as you like. Every request
    sent before, during or after close() gets an answer or an exception."""

    def __init__(self, pipeline, *, max_seqs: int, truncate_sequence: bool, log: "JsonLines",
                 limits: Limits | None = None, prefix_caching: bool = True, max_batched_tokens: int = 2048):
        """log: the `logfile` (JsonLines(None): none)."""
        if not isinstance(truncate_sequence, bool):
            raise TypeError(f"truncate_sequence must be a bool, got {truncate_sequence!r}")
        self.pipeline = pipeline
        self._profile = None  # the profiler() running on the engine thread, if any
        self.truncate_sequence = truncate_sequence
        self.limits = limits or Limits()
        self.templates = chat_template.TemplateLimits(self.limits.max_template_chars, self.limits.template_timeout)
        mr = pipeline.model_runner
        if not isinstance(prefix_caching, bool):
            raise TypeError(f"prefix_caching must be a bool, got {prefix_caching!r}")
        if not isinstance(max_batched_tokens, int) or isinstance(max_batched_tokens, bool) or max_batched_tokens < 1:
            raise ValueError(f"max_batched_tokens must be an int >= 1, got {max_batched_tokens!r}")
        self.scheduler = Scheduler(BlockManager(mr.num_blocks, mr.block_size, prefix_caching), max_seqs,
                                   max_batched_tokens, no_kv_cache=mr.no_kv_cache,
                                   chunked=not pipeline.whole_prompt_steps)
        self.grammars = GrammarCompiler(pipeline.tokenizer, pipeline.vocab_size, pipeline.eos_token_ids)
        self._log = log
        # The engine must not hold the Runner, so that a Runner dropped without close() is collected (see __del__).
        self.engine = Engine(pipeline, self.scheduler)
        # CPU: the kernels' thread team gets the threads, and the engine thread's own torch ops run on it alone
        # (kernels/threads_cpu.cpp says why). Elsewhere torch's count, which belongs to the thread that sets it.
        if mr.device.type == "cpu":
            self.engine.call(lambda: kernels.set_cpu_threads(pipeline.threads))
        else:
            self.engine.call(lambda: torch.set_num_threads(pipeline.threads))

    def send_chat_completion_request(self, request: ChatCompletionRequest):
        return _json(self.chat_completion(request))

    def send_completion_request(self, request: CompletionRequest):
        return _json(self.completion(request))

    def chat_completion(self, request: ChatCompletionRequest) -> "dict | ChatCompletionStreamer":
        """send_chat_completion_request's answer before its JSON text: the response body as a dict, or the streamer
        (whose bodies() gives its chunks as dicts), for a caller that serialises them itself (the server)."""
        if not isinstance(request, ChatCompletionRequest):
            raise TypeError(f"expected a ChatCompletionRequest, got {type(request).__name__}")
        request = request.frozen()  # from here on, what the caller does to its object cannot reach the engine
        p = self.pipeline
        self._check_choices(request.n_choices, 1)
        if isinstance(request.messages, str):
            ids = self._encode(request.messages, add_special_tokens=True)
        else:
            self._check_chars("messages", sum(len(m["content"]) for m in request.messages))
            text = self.templates.render(p.chat_template, request.messages, p.special_tokens)
            ids = self._encode(text, add_special_tokens=False)
        self._check_token_ids("stop_token_ids", request.stop_token_ids or [])
        stops = list(request.stop_seqs or [])
        self._check_stops(stops)
        top = request.top_logprobs or 0
        params = self._params(request, logprobs=request.logprobs, top_logprobs=top if request.logprobs else 0)
        req, reply = self._make(True, request, ids, params, request.n_choices, request.n_choices,
                                stop_token_ids=request.stop_token_ids or [], stop_strings=stops,
                                logprobs=request.logprobs)
        return self._submit(req, reply, request)

    def completion(self, request: CompletionRequest) -> "dict | ChatCompletionStreamer":
        """send_completion_request's answer before its JSON text (see chat_completion)."""
        if not isinstance(request, CompletionRequest):
            raise TypeError(f"expected a CompletionRequest, got {type(request).__name__}")
        request = request.frozen()
        if request.stream and request.best_of > request.n_choices:
            raise ValueError("best_of > n_choices cannot be streamed: the best candidates are known only at the end")
        self._check_choices(request.n_choices, request.best_of)
        stops = list(request.stop_seqs or [])
        self._check_stops(stops)
        ids = self._encode(request.prompt, add_special_tokens=True)
        # best_of ranks its candidates by cumulative logprob: only then does sampling compute it
        params = self._params(request, logprobs=request.best_of > request.n_choices, top_logprobs=0)
        req, reply = self._make(False, request, ids, params, max(request.best_of, request.n_choices),
                                request.n_choices, stop_token_ids=[], stop_strings=stops, logprobs=False,
                                echo=request.prompt if request.echo_prompt else "", suffix=request.suffix or "")
        return self._submit(req, reply, request)

    def abort(self, request_id: str) -> None:
        """End a request in flight: its caller gets RequestAborted (a stream's reader, from next()), its sequences
        stop and free their KV blocks at the engine's next step. An unknown or finished id is ignored. The id is the
        response's `id`: a request's own `request_id=`, or a streamer's `id`."""
        if not isinstance(request_id, str):
            raise TypeError(f"request_id must be a str, got {request_id!r}")
        self.engine.abort(request_id, RequestAborted(f"request {request_id} was aborted"))

    @contextlib.contextmanager
    def profiler(self, **profile_kwargs):
        """torch.profiler.profile(**profile_kwargs) recording the engine thread while the block runs
        (tools/profile_engine.py). The profiler records the thread that starts it, so it is started in the engine.
        After close() it raises RuntimeError."""
        prof = torch.profiler.profile(**profile_kwargs)
        self.engine.call(prof.start)
        self._profile = prof
        try:
            yield prof
        finally:
            if self._profile is not prof:  # close() stopped it, on the engine thread, before that thread ended
                raise RuntimeError("the Runner was closed during the profile")
            self._profile = None
            self.engine.call(prof.stop)

    def stats(self) -> dict:
        """Counters of the engine: prefix cache hits (prompt tokens whose K/V were reused / prompt tokens admitted),
        evictions, cached and free KV blocks, preemptions, running and waiting sequences; `weight_bytes`, the
        resident weight bytes of each rank (one for a model on one device). Read on the engine thread, so the
        numbers are of one moment."""
        out = {"weight_bytes": self.pipeline.model_runner.weight_bytes}
        self.engine.call(lambda: out.update(self.scheduler.stats()))
        return out

    def close(self) -> None:
        """Stop the engine thread after its current step. Requests in flight, and any sent from now on, get a
        RuntimeError."""
        # A profiler must stop on the thread it records: left running there, its callbacks outlive the thread and
        # the interpreter crashes at exit (SIGSEGV, "Requested callback is not found").
        prof, self._profile = self._profile, None
        if prof is not None:
            with contextlib.suppress(RuntimeError):
                self.engine.call(prof.stop)
        self.engine.stop()

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None and engine.thread.is_alive():
            engine.closed = True  # nobody else holds this Runner, so nobody is sending: no lock needed
            engine.inbox.put(STOP)  # no join: __del__ may run on any thread, the engine's own included

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_choices(self, n_choices: int, best_of: int) -> None:
        m = self.limits.max_choices
        for name, n in (("n_choices", n_choices), ("best_of", best_of)):
            if n > m:
                raise ValueError(f"{name}={n} is over the limit of {m} (load(max_choices=...))")

    def _check_stops(self, stops: list[str]) -> None:
        lim = self.limits
        if len(stops) > lim.max_stop_strings:
            raise ValueError(f"stop_seqs has {len(stops)} strings, over the limit of {lim.max_stop_strings} "
                             f"(load(max_stop_strings=...))")
        if stops and max(map(len, stops)) > lim.max_stop_length:
            raise ValueError(f"a stop string has {max(map(len, stops))} characters, over the limit of "
                             f"{lim.max_stop_length} (load(max_stop_length=...))")

    def _check_chars(self, what: str, n: int) -> None:
        if n > self.limits.max_prompt_chars:
            raise ValueError(f"{what} has {n} characters, over the limit of {self.limits.max_prompt_chars} "
                             f"(load(max_prompt_chars=...))")

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        self._check_chars("the prompt", len(text))
        try:  # encode_batch releases the GIL (encode holds it: a long prompt would stall the engine thread)
            return self.pipeline.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # tokenizers' PanicException is a BaseException, not an Exception
            raise ValueError(f"the tokenizer failed on the prompt: {type(e).__name__}: {e}") from None

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
        if len(ids) + 1 > self.scheduler.capacity:  # the prompt and the first completion token
            raise ValueError(f"the prompt has {len(ids)} tokens and can never fit the KV cache "
                             f"({self.scheduler.capacity} tokens); load with a larger kv_cache_tokens")
        return ids

    def _make(self, chat: bool, r, ids, params, n_seqs: int, n_return: int, stop_token_ids, stop_strings,
              logprobs: bool, echo: str = "", suffix: str = "") -> tuple[Request, responses.Reply]:
        """The request and its n_seqs sequences, every field set here (the prompt fitted to the model, the length
        limit, a generator per choice, the stop tables and a grammar matcher per choice), and what its bodies say."""
        ids = self._fit_prompt(ids, r.max_tokens)
        max_len = self.pipeline.max_model_len
        if r.max_tokens is not None:
            max_len = min(max_len, len(ids) + r.max_tokens)
        seed = r.seed if r.seed is not None else random.SystemRandom().randrange(2**62)
        created, deadline = int(time.time()), None if r.timeout is None else time.monotonic() + r.timeout
        stops = StopStrings(stop_strings) if stop_strings else None  # the tables once, a matcher per choice
        seqs = []
        for i in range(n_seqs):
            gen = torch.Generator(device=self.pipeline.device)
            gen.manual_seed(seed + i)  # choice i of a seeded request is reproducible and differs from choice j
            matcher = None if r.grammar is None else self.grammars.matcher(r.grammar, r.grammar_type)
            seqs.append(Sequence(tokens=list(ids), index=i, prompt_len=len(ids), max_len=max_len, params=params,
                                 generator=gen, stop_token_ids=frozenset(stop_token_ids), matcher=matcher,
                                 stops=stops.fresh() if stops else None, prefix_offset=len(ids),
                                 read_offset=len(ids)))
        rid = r.request_id or f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        reply = responses.Reply(chat=chat, id=rid, model=self.pipeline.model_id, created=created,
                                tokenizer=self.pipeline.tokenizer, echo=echo, suffix=suffix)
        return Request(id=rid, seqs=seqs, n_return=n_return, stream=r.stream, logprobs=logprobs,
                       deadline=deadline), reply

    def _submit(self, req: Request, reply: responses.Reply, request) -> "dict | ChatCompletionStreamer":
        self._log("request", repr(request))
        self.engine.submit(req)
        if req.stream:
            return ChatCompletionStreamer(req, self.engine, reply, self._log)
        try:
            result = req.out.get(timeout=_remaining(req.deadline))
        except queue.Empty:
            self.engine.abort(req.id, TimeoutError(f"request {req.id} timed out"))
            raise TimeoutError(f"request {req.id} did not finish within its timeout") from None
        except BaseException:  # interrupted while waiting (KeyboardInterrupt): the request must not go on
            self.engine.abort(req.id, None)
            raise
        if result is END:
            raise RequestAborted(f"request {req.id} was aborted")
        if isinstance(result, BaseException):
            raise result
        body = responses.response(reply, result)
        self._log("response", body)
        return body


def _json(answer):
    """A response body as JSON text; a streamer as it is (it makes each chunk's text)."""
    return answer if isinstance(answer, ChatCompletionStreamer) else json.dumps(answer)


class JsonLines:
    """The `logfile`: one JSON object a line per request, response and chunk (None: no log). Created mode 0600:
    it holds every prompt and reply."""

    def __init__(self, path):
        if path is not None and (isinstance(path, bool) or not isinstance(path, (str, os.PathLike))):
            raise TypeError(f"logfile must be a path (str or os.PathLike) or None, got {path!r}")
        self.path, self.lock = (None if path is None else os.fspath(path)), threading.Lock()
        self.failed = False  # a write failed: warned once, later lines are tried and dropped silently
        if self.path is not None:
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))  # fail at load, not later

    def __call__(self, kind: str, payload) -> None:
        if self.path is None:
            return
        line = json.dumps({"time": time.time(), kind: payload}) + "\n"
        with self.lock:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                with open(fd, "a", closefd=True) as f:
                    f.write(line)
            except OSError as e:  # a side channel: a full disk or a removed folder must not fail the request
                if not self.failed:
                    self.failed = True
                    log.warning("mistralrs: cannot write the logfile %s (%s); requests are served, their lines lost "
                                "until it can be written again", self.path, e)
