"""Grammar-constrained decoding on llguidance: a token mask every step, so only grammatical tokens are sampled.

grammar_type: "regex", "json_schema", "lark", or "gbnf" (converted to lark). The model's real EOS ids are the
grammar's end token: EOS is allowed exactly when the text so far is a complete match.
"""
import threading

import llguidance
import torch
from llguidance.gbnf_to_lark import gbnf_to_lark
from tokenizers import Tokenizer

COMPILERS = {
    "regex": llguidance.LLMatcher.grammar_from_regex,
    # Compact JSON unless the schema's own "x-guidance" says otherwise: free whitespace lets small models wander.
    "json_schema": lambda g: llguidance.LLMatcher.grammar_from_json_schema(
        g, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}),
    "lark": llguidance.LLMatcher.grammar_from_lark,
    "gbnf": lambda g: llguidance.LLMatcher.grammar_from_lark(gbnf_to_lark(g)),
}


class GrammarCompiler:
    """Compiles request grammars against one model's tokenizer (built once, on first use: it takes about 1 s)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: set[int]):
        self._args = (tokenizer, vocab_size, sorted(eos_token_ids))
        self._lltok = None
        self._lock = threading.Lock()

    def _tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._lltok is None:
                tokenizer, vocab, eos = self._args
                self._lltok = llguidance.LLTokenizer(tokenizer.to_str(), n_vocab=vocab, eos_token=eos)
            return self._lltok

    def matcher(self, grammar: str, grammar_type: str) -> llguidance.LLMatcher:
        """A fresh matcher for one sequence; a grammar that does not compile is a ValueError."""
        try:
            source = COMPILERS[grammar_type](grammar)
        except Exception as e:
            raise ValueError(f"invalid {grammar_type} grammar: {e}") from None
        message = llguidance.LLMatcher.validate_grammar(source, self._tokenizer())  # "" when valid
        if message:
            raise ValueError(f"invalid {grammar_type} grammar: {message}")
        m = llguidance.LLMatcher(self._tokenizer(), source)
        if m.is_error():
            raise ValueError(f"invalid {grammar_type} grammar: {m.get_error()}")
        return m


def allowed_tokens(matchers: list, vocab_size: int, device: torch.device) -> torch.Tensor | None:
    """[B, V] bool mask of the tokens each row's grammar allows (all tokens for rows without one)."""
    if not any(matchers):
        return None
    import llguidance.torch  # imported on first use: it compiles a torch function at import time
    bitmask = llguidance.torch.allocate_token_bitmask(len(matchers), vocab_size)  # [B, ceil(V / 32)] int32
    for b, m in enumerate(matchers):
        if m is None:
            bitmask[b] = -1
        else:
            llguidance.torch.fill_next_token_bitmask(m, bitmask, b)
    bits = torch.arange(32, dtype=torch.int32)
    allowed = (bitmask[:, :, None] >> bits) & 1  # [B, V / 32, 32]: bit j of word w is token 32 w + j
    return allowed.reshape(len(matchers), -1)[:, :vocab_size].bool().to(device)
