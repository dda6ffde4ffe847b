"""A sequence (one choice of a request, from its prompt tokens to its finished text) and the request it answers."""
import queue
import time
from dataclasses import dataclass, field

import torch

from .model_runner import SeqState
from .sampling import SamplingParams


@dataclass(eq=False)
class Sequence(SeqState):
    group: "Request" = None           # the request this sequence answers
    index: int = 0                    # choice index within the request
    prompt_len: int = 0
    max_len: int = 0                  # stop ("length") once the sequence holds this many tokens
    params: SamplingParams = field(default_factory=SamplingParams)
    generator: torch.Generator | None = None
    stop_token_ids: frozenset = frozenset()
    matcher: object = None            # llguidance matcher of a grammar-constrained request
    stops: object = None              # output.StopStrings of a request with stop strings: matches and hold-back
    logprobs: list = field(default_factory=list)  # per generated token: (token, logprob, top pairs)
    cum_logprob: float = 0.0
    finish_reason: str | None = None
    text: str = ""                    # completion text decided so far (stop strings cut, special tokens skipped)
    streamed: int = 0                 # characters of `text` already sent to a stream
    prefix_offset: int = 0            # incremental detokenization window: tokens[prefix_offset:read_offset] is
    read_offset: int = 0              # already in `text` (both start at prompt_len)
    logprobs_streamed: int = 0        # entries of `logprobs` already sent to a stream

    @property
    def completion(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class Request:
    """A request's sequences (its choices, or best_of candidates) and the queue its answers go to."""
    chat: bool
    id: str
    seqs: list[Sequence]
    n_return: int
    stream: bool
    logprobs: bool
    echo: str = ""
    suffix: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    out: queue.Queue = field(default_factory=queue.Queue)
    deadline: float | None = None  # time.monotonic() by which it must be done (the request's timeout)
    failed: bool = False
    answered: bool = False  # its final response, the stream's end or an error has been sent
