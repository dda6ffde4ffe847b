"""Runner: requests in, OpenAI JSON out. The caller's thread validates, renders the chat template, tokenizes and
builds the request's sequences; the engine thread (engine.py) serves them."""
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

from .engine.block_manager import BlockManager
from .engine.engine import END, STOP, Engine
from .engine.grammar import GrammarCompiler
from .engine.output import StopStrings
from .engine.sampling import SamplingParams
from .engine.scheduler import Scheduler
from .engine.sequence import Request, Sequence
from .load import chat_template
from .requests import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("mistralrs")
TRUNCATE_RESERVE = 10  # completion room kept by truncate_sequence when max_tokens is unset


class ChatCompletionStreamer:
    """Iterator of OpenAI chunk JSON strings (the engine queues their bodies); ends once every choice has finished."""

    def __init__(self, out: queue.Queue):
        self._out = out

    def __iter__(self):
        return self

    def __next__(self) -> str:
        item = self._out.get()
        if item is END:
            self._out.put(END)  # later next() calls keep ending
            raise StopIteration
        if isinstance(item, BaseException):
            self._out.put(END)
            raise item
        return json.dumps(item)


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
    """Created by a loader's load(). Thread-safe: send requests from as many threads as you like."""

    def __init__(self, pipeline, *, max_seqs: int, truncate_sequence: bool, logfile: str | None,
                 threads: int | None = None, prefix_caching: bool = True, max_batched_tokens: int = 2048):
        if not isinstance(truncate_sequence, bool):
            raise TypeError(f"truncate_sequence must be a bool, got {truncate_sequence!r}")
        threads = cpu_threads(threads)
        self.pipeline = pipeline
        self.truncate_sequence = truncate_sequence
        mr = pipeline.model_runner
        if not isinstance(prefix_caching, bool):
            raise TypeError(f"prefix_caching must be a bool, got {prefix_caching!r}")
        if not isinstance(max_batched_tokens, int) or isinstance(max_batched_tokens, bool) or max_batched_tokens < 1:
            raise ValueError(f"max_batched_tokens must be an int >= 1, got {max_batched_tokens!r}")
        whole_prompts = getattr(mr.model, "whole_prompt_steps", False)
        self.scheduler = Scheduler(BlockManager(mr.num_blocks, mr.block_size, prefix_caching), max_seqs,
                                   max_batched_tokens, no_kv_cache=mr.no_kv_cache, chunked=not whole_prompts)
        self.grammars = GrammarCompiler(pipeline.tokenizer, pipeline.vocab_size, pipeline.eos_token_ids)
        self._log = JsonLines(logfile)
        # The engine must not hold the Runner, so that a Runner dropped without close() is collected (see __del__).
        log_response = self._log
        self.engine = Engine(pipeline, self.scheduler,
                             on_response=(lambda r: log_response("response", r)) if logfile else None)
        # torch's thread count belongs to the thread that sets it (and seeds threads started later).
        self.engine.call(lambda: torch.set_num_threads(threads))

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
                         stop_token_ids=request.stop_token_ids or [], stop_strings=list(request.stop_seqs or []),
                         logprobs=request.logprobs)
        self._grammar(req, request)
        return self._submit(req, request)

    def send_completion_request(self, request: CompletionRequest):
        if not isinstance(request, CompletionRequest):
            raise TypeError(f"expected a CompletionRequest, got {type(request).__name__}")
        if request.stream and request.best_of > request.n_choices:
            raise ValueError("best_of > n_choices cannot be streamed: the best candidates are known only at the end")
        ids = self.pipeline.tokenizer.encode(request.prompt, add_special_tokens=True).ids
        # best_of ranks its candidates by cumulative logprob: only then does sampling compute it
        params = self._params(request, logprobs=request.best_of > request.n_choices, top_logprobs=0)
        req = self._make(False, request, ids, params, max(request.best_of, request.n_choices), request.n_choices,
                         stop_token_ids=[], stop_strings=list(request.stop_seqs or []), logprobs=False)
        req.echo = request.prompt if request.echo_prompt else ""
        self._grammar(req, request)
        req.suffix = request.suffix or ""
        return self._submit(req, request)

    def _grammar(self, req: Request, request) -> None:
        if request.grammar is not None:
            for seq in req.seqs:
                seq.matcher = self.grammars.matcher(request.grammar, request.grammar_type)

    @contextlib.contextmanager
    def profiler(self, **profile_kwargs):
        """torch.profiler.profile(**profile_kwargs) recording the engine thread while the block runs
        (tools/profile_engine.py). The profiler records the thread that starts it, so it is started in the engine."""
        prof = torch.profiler.profile(**profile_kwargs)
        self.engine.call(prof.start)
        try:
            yield prof
        finally:
            self.engine.call(prof.stop)

    def stats(self) -> dict:
        """Counters of the engine: prefix cache hits (prompt tokens whose K/V were reused / prompt tokens admitted),
        evictions, cached and free KV blocks, preemptions, running and waiting sequences. Read on the engine thread,
        so the numbers are of one moment."""
        out = {}
        self.engine.call(lambda: out.update(self.scheduler.stats()))
        return out

    def close(self) -> None:
        """Stop the engine thread. Requests still in flight get an error."""
        self.engine.stop()

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None and engine.thread.is_alive():
            engine.inbox.put(STOP)  # no join: __del__ may run on any thread, the engine's own included

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
        if len(ids) + 1 > self.scheduler.capacity:  # the prompt and the first completion token
            raise ValueError(f"the prompt has {len(ids)} tokens and can never fit the KV cache "
                             f"({self.scheduler.capacity} tokens); load with a larger kv_cache_tokens")
        return ids

    def _make(self, chat: bool, r, ids, params, n_seqs: int, n_return: int, stop_token_ids, stop_strings,
              logprobs: bool) -> Request:
        ids = self._fit_prompt(ids, r.max_tokens)
        max_len = self.pipeline.max_model_len
        if r.max_tokens is not None:
            max_len = min(max_len, len(ids) + r.max_tokens)
        seed = r.seed if r.seed is not None else random.SystemRandom().randrange(2**62)
        req = Request(chat=chat, id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", seqs=[],
                       n_return=n_return, stream=r.stream, logprobs=logprobs)
        for i in range(n_seqs):
            gen = torch.Generator(device=self.pipeline.device)
            gen.manual_seed(seed + i)  # choice i of a seeded request is reproducible and differs from choice j
            req.seqs.append(Sequence(tokens=list(ids), group=req, index=i, prompt_len=len(ids), max_len=max_len,
                                     params=params, generator=gen, stop_token_ids=frozenset(stop_token_ids),
                                     stops=StopStrings(stop_strings) if stop_strings else None,
                                     prefix_offset=len(ids), read_offset=len(ids)))
        return req

    def _submit(self, req: Request, request):
        self._log("request", repr(request))
        self.engine.submit(req)
        if req.stream:
            return ChatCompletionStreamer(req.out)
        result = req.out.get()
        if isinstance(result, BaseException):
            raise result
        return json.dumps(result)


class JsonLines:
    """The `logfile`: one JSON object a line per request, response and chunk (None: no log)."""

    def __init__(self, path: str | None):
        self.path, self.lock = path, threading.Lock()

    def __call__(self, kind: str, payload) -> None:
        if self.path is None:
            return
        with self.lock, open(self.path, "a") as f:
            f.write(json.dumps({"time": time.time(), kind: payload}) + "\n")
