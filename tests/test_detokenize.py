"""Incremental detokenization equals decoding the whole completion, for any token sequence."""
import random

import pytest
from tokenizers import SentencePieceBPETokenizer, Tokenizer

from mistralrs.engine.output import detokenize
from mistralrs.engine.sequence import Sequence

TEXT = ["The quick brown fox jumps over the lazy dog.", "Ünïcödé wörds: naïve café, 東京 and emoji 🙂!",
        "def f(x):\n    return x ** 2  # squares"] * 20


def sentencepiece_like() -> Tokenizer:
    """Metaspace pre-tokenizer and decoder (the leading-space handling of Llama/Mistral tokenizers)."""
    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(TEXT, vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    return sp._tokenizer


@pytest.mark.parametrize("kind", ["byte_level", "sentencepiece"])
def test_incremental_equals_full_decode(tiny_models, kind):
    tok = Tokenizer.from_file(str(tiny_models["llama"] / "tokenizer.json")) if kind == "byte_level" \
        else sentencepiece_like()
    rng = random.Random(0)
    V = tok.get_vocab_size()
    for trial in range(200):
        if trial % 2:  # real text, cut anywhere
            ids = tok.encode(rng.choice(TEXT)).ids[: rng.randrange(1, 40)]
        else:  # arbitrary ids: partial UTF-8 bytes, special tokens, anything
            ids = [rng.randrange(V) for _ in range(rng.randrange(1, 40))]
        prompt = [rng.randrange(V) for _ in range(3)]
        seq = Sequence(tokens=list(prompt), prompt_len=3, prefix_offset=3, read_offset=3)
        for i, t in enumerate(ids):
            seq.tokens.append(t)
            detokenize(tok, seq, len(seq.tokens), final=i == len(ids) - 1)
        assert seq.text == tok.decode(ids, skip_special_tokens=True), (kind, ids)
