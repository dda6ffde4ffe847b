"""A sequence (one choice of a request, from its prompt tokens to its finished text) and the request it answers.

Each field that changes while a sequence runs has one writer: the scheduler its tokens and num_cached (admission,
release, and Scheduler.postprocess after each step), output.py its text side (text, offsets, what was sent,
logprobs, cum_logprob), the engine its finish_reason, the model its model_state. The model runner only reads
sequences."""
import queue
from dataclasses import dataclass, field

import torch

from .sampling import SamplingParams


@dataclass(eq=False)  # compared and hashed by identity: the block manager keys block tables by sequence
class Sequence:
    tokens: list[int]                 # prompt, then completion
    num_cached: int = 0               # leading tokens whose K/V the cache holds
    model_state: object = None        # the model's own per-sequence state (X-LoRA: frozen scalings); only it reads this
    group: "Request" = None           # the request this sequence answers (set by the Request)
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
    tokens_sent: int = 0              # completion tokens (and their `logprobs` entries) already sent to a stream
    prefix_offset: int = 0            # incremental detokenization window: tokens[prefix_offset:read_offset] is
    read_offset: int = 0              # already in `text` (both start at prompt_len)

    @property
    def completion(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class Request:
    """A request's sequences (its choices, or best_of candidates) and the queue its records go to (output.py's Delta
    and Final; END; an exception)."""
    id: str
    seqs: list[Sequence]
    n_return: int
    stream: bool
    logprobs: bool
    deadline: float | None = None  # time.monotonic() by which it must be done (the request's timeout)
    out: queue.Queue = field(default_factory=queue.Queue)
    failed: bool = False
    answered: bool = False  # its Final, the stream's END or an error has been sent

    def __post_init__(self):
        for seq in self.seqs:
            seq.group = self
