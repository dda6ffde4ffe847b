"""The engine's output side: a sampled token becomes text, meets the stop checks, and leaves in an OpenAI body.

advance(seq): the sequence's new last token (Scheduler.postprocess appended it) extends its text; EOS, stop tokens,
the grammar's end, the length limit and stop strings decide whether it finishes. chunk(seq): a stream's next chunk,
holding back text that may still turn into a stop string. response(req): the final response once every sequence of the request has finished.
"""
from .. import responses
from .sequence import Request, Sequence


class Output:
    def __init__(self, tokenizer, model_id: str, eos_token_ids):
        self.tokenizer, self.model_id, self.eos_token_ids = tokenizer, model_id, eos_token_ids

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

    def chunk(self, seq: Sequence) -> dict | None:
        """The stream chunk of seq's text not sent yet: all of it once seq has finished (with its finish reason and
        usage), else what cannot be the start of a stop string. None when there is nothing to send."""
        req, reason = seq.group, seq.finish_reason
        upto = len(seq.text) if reason or seq.stops is None else len(seq.text) - seq.stops.held()
        delta = seq.text[seq.streamed:upto]
        if not delta and reason is None:
            return None
        use = responses.usage(seq.prompt_len, len(seq.completion)) if reason else None
        if req.chat:
            lps = None
            if req.logprobs:  # every token since the last chunk, also those whose text was held back
                lps = responses.chat_logprobs(self.tokenizer, seq.logprobs[seq.logprobs_streamed:])
                seq.logprobs_streamed = len(seq.logprobs)
            chunk = responses.chat_chunk(req.id, self.model_id, req.created, seq.index, delta, reason, lps,
                                         seq.streamed == 0, use)
        else:
            text = (req.echo if seq.streamed == 0 else "") + delta + (req.suffix if reason else "")
            chunk = responses.completion(req.id, self.model_id, req.created,
                                         [responses.completion_choice(seq.index, text, reason)], use)
        seq.streamed = upto
        return chunk

    def response(self, req: Request) -> dict:
        """The whole answer: best_of keeps the n_return candidates of highest cumulative logprob, best first."""
        best = sorted(req.seqs, key=lambda s: -s.cum_logprob)[: req.n_return] if len(req.seqs) > req.n_return \
            else req.seqs
        use = responses.usage(req.seqs[0].prompt_len, sum(len(s.completion) for s in req.seqs))
        if req.chat:
            choices = [responses.chat_choice(i, s.text, s.finish_reason,
                                             responses.chat_logprobs(self.tokenizer, s.logprobs) if req.logprobs
                                             else None)
                       for i, s in enumerate(best)]
            return responses.chat_completion(req.id, self.model_id, req.created, choices, use)
        choices = [responses.completion_choice(i, req.echo + s.text + req.suffix, s.finish_reason)
                   for i, s in enumerate(best)]
        return responses.completion(req.id, self.model_id, req.created, choices, use)


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
