"""The engine's output side: a sampled token becomes text, meets the stop checks, and leaves in a neutral record.

advance(seq): the sequence's new last token (Scheduler.postprocess appended it) extends its text; EOS, stop tokens,
the grammar's end, the length limit and stop strings decide whether it finishes. delta(seq): a stream's next Delta,
holding back text that may still turn into a stop string. final(req): the whole answer once every sequence of the
request has finished. The records hold text, token ids and raw logprobs; the caller's thread makes API bodies of them
(responses.py), decoding logprob tokens there, off the engine thread.
"""
from dataclasses import dataclass
from typing import NamedTuple

from .sequence import Request, Sequence


class Usage(NamedTuple):
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Delta:
    """What one choice of a request adds to its answer."""
    index: int                 # the choice
    text: str                  # its new text (a stream's possible stop string held back until ruled out)
    token_ids: list[int]       # the tokens generated since its last delta (EOS and stop tokens too)
    logprobs: list | None      # when the request asked: per token of token_ids, (token, logprob, [(top token,
                               # top logprob), ...])
    finish_reason: str | None  # on its last delta: "stop", "length" or "error"
    usage: Usage | None        # on its last delta: the prompt's and this choice's tokens


@dataclass(frozen=True)
class Final:
    """A request's whole answer: the choices it returns, each as one Delta of all its text and tokens (best_of's
    best first, indexed from 0), and the usage of every candidate generated."""
    choices: list[Delta]
    usage: Usage


class Output:
    def __init__(self, tokenizer, eos_token_ids):
        self.tokenizer, self.eos_token_ids = tokenizer, eos_token_ids

    def advance(self, seq: Sequence, logprob: float | None, top) -> str | None:
        """Extend seq's text with its newly sampled last token; the finish reason when the token ends it. logprob
        (and top, its top_logprobs pairs) is None when the request needs none (no logprobs reported, no best_of
        ranking)."""
        token = seq.tokens[-1]
        if logprob is not None:
            seq.cum_logprob += logprob
        if seq.group.logprobs:
            seq.logprobs.append((token, logprob, top))
        reason, text_end = None, len(seq.tokens)
        if token in self.eos_token_ids or token in seq.stop_token_ids:
            reason, text_end = "stop", text_end - 1  # the stop token is not part of the text
        elif seq.matcher is not None and (not seq.matcher.consume_token(token) or seq.matcher.is_stopped()):
            reason = "stop"  # the grammar is complete and allows nothing more
        elif len(seq.tokens) >= seq.max_len:
            reason = "length"
        before = len(seq.text)
        detokenize(self.tokenizer, seq, text_end, final=reason is not None)
        if seq.stops is not None and len(seq.text) > before:
            at = seq.stops.feed(seq.text[before:])
            if at is not None:
                seq.text, reason = seq.text[: before + at], "stop"
        return reason

    def delta(self, seq: Sequence) -> Delta | None:
        """seq's text and tokens not sent yet: all of them once seq has finished (with its finish reason and usage),
        else the text that cannot be the start of a stop string. None when there is no text to send."""
        reason = seq.finish_reason
        upto = len(seq.text) if reason or seq.stops is None else len(seq.text) - seq.stops.held()
        text = seq.text[seq.streamed:upto]
        if not text and reason is None:
            return None
        new = seq.tokens[seq.prompt_len + seq.tokens_sent:]
        logprobs = seq.logprobs[seq.tokens_sent:] if seq.group.logprobs else None  # one entry per completion token
        seq.streamed, seq.tokens_sent = upto, seq.tokens_sent + len(new)
        return Delta(seq.index, text, new, logprobs, reason,
                     Usage(seq.prompt_len, len(seq.completion)) if reason else None)

    def final(self, req: Request) -> Final:
        """The whole answer: best_of keeps the n_return candidates of highest cumulative logprob, best first."""
        best = sorted(req.seqs, key=lambda s: -s.cum_logprob)[: req.n_return] if len(req.seqs) > req.n_return \
            else req.seqs
        choices = [Delta(i, s.text, s.completion, s.logprobs if req.logprobs else None, s.finish_reason, None)
                   for i, s in enumerate(best)]
        return Final(choices, Usage(req.seqs[0].prompt_len, sum(len(s.completion) for s in req.seqs)))


def detokenize(tokenizer, seq: Sequence, end: int, final: bool) -> None:
    """Extend seq.text with the text of tokens[read_offset:end], decoding only a short window: the text that
    tokens[prefix_offset:end] adds to tokens[prefix_offset:read_offset] (a token's text can depend on the one
    before it). A tail that is not yet whole UTF-8 waits for the next token, unless the sequence is ending."""
    before = tokenizer.decode(seq.tokens[seq.prefix_offset:seq.read_offset], skip_special_tokens=True)
    after = tokenizer.decode(seq.tokens[seq.prefix_offset:end], skip_special_tokens=True)
    if len(after) > len(before) and (final or not after.endswith("\ufffd")):
        seq.text += after[len(before):]
        seq.prefix_offset, seq.read_offset = seq.read_offset, end


class StopStrings:
    """Stop strings found in a text that arrives piece by piece: one Knuth-Morris-Pratt automaton per string, so
    the work is linear: building the tables is linear in the strings' total length, and feeding a text of n
    characters costs O(n) per string (each character moves a state up by at most one, and each fallback moves it
    down), whatever the strings' lengths. state[j] is the length of the longest start of strings[j] that the text so
    far ends with: what a stream must hold back."""

    def __init__(self, strings: list[str], fallbacks: list[tuple[int, ...]] | None = None):
        if not all(strings):
            raise ValueError(f"stop strings must be non-empty, got {strings!r}")
        self.strings = strings
        self.fallback = fallbacks if fallbacks is not None else [fallback(s) for s in strings]
        self.state = [0] * len(strings)

    def fresh(self) -> "StopStrings":
        """A matcher of the same strings at the start of a text, sharing the tables (one per choice)."""
        return StopStrings(self.strings, self.fallback)

    def feed(self, piece: str) -> int | None:
        """Extend the text by piece; where in piece the earliest stop string starts, if one is now complete."""
        first = None
        for j, (s, back) in enumerate(zip(self.strings, self.fallback)):
            k = self.state[j]
            for i, c in enumerate(piece):
                while k and s[k] != c:
                    k = back[k]
                k += s[k] == c
                if k == len(s):  # a match ends at piece[i]; later ones of this string start later
                    start = i + 1 - k
                    first = start if first is None else min(first, start)
                    k = back[k]
                    break
            self.state[j] = k
        return first

    def held(self) -> int:
        return max(self.state, default=0)


def fallback(s: str) -> tuple[int, ...]:
    """KMP's failure function: back[k] is the length of the longest proper prefix of s[:k] that is also its
    suffix (k = 1 .. len(s)); where a partial match of length k fails, the search resumes from back[k]."""
    back = [0, 0]
    for k in range(1, len(s)):
        b = back[k]
        while b and s[b] != s[k]:
            b = back[b]
        back.append(b + (s[b] == s[k]))
    return tuple(back)
